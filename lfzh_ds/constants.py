"""One source of truth for the constants every part of the toolkit shares."""
from pathlib import Path

RESOURCES_DIR = Path(__file__).resolve().parent / "resources"
VOCAB_FILE = RESOURCES_DIR / "vocab.txt"
VOCAB_MD5 = "3b5b76c4aef48ecf8cb3abaafe960f09"
VOCAB_SIZE = 21128

# Special token ids of the Chinese BERT vocab (checked against the file by the tests).
PAD_ID = 0
UNK_ID = 100
CLS_ID = 101
SEP_ID = 102
MASK_ID = 103
MASK_TOKEN = "[MASK]"
SPECIAL_IDS = (PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID)
# Ids 1..99 are [unused*]; 104 onwards are real tokens. Random replacement in masking draws from here.
FIRST_REAL_TOKEN_ID = 104

# Label value ignored by the loss (PyTorch / transformers convention).
IGNORE_INDEX = -100

# The upstream model's geometry (the released Longformer_ZH).
DEFAULT_MAX_POSITIONS = 4096
DEFAULT_ATTENTION_WINDOW = 512
DEFAULT_SEQ_LEN = 4096

# Version of the Arrow shard + manifest layout written by data_service.
SCHEMA_VERSION = 1
