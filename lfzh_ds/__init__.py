"""Longformer_ZH-DS: a Chinese Longformer with Ray preprocessing and DeepSpeed training."""
from .constants import CLS_ID, MASK_ID, PAD_ID, SEP_ID, UNK_ID, VOCAB_SIZE
from .tokenization import load_tokenizer, normalize_text

__all__ = ["CLS_ID", "MASK_ID", "PAD_ID", "SEP_ID", "UNK_ID", "VOCAB_SIZE", "load_tokenizer", "normalize_text"]
