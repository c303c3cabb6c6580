"""Longformer_ZH-DS: a Chinese Longformer with Ray preprocessing and DeepSpeed training.

The model's public face is here: ``from lfzh_ds import LongformerZhConfig, LongformerZhModel,
LongformerZhForMaskedLM, LongformerZhForSequenceClassification``. Those names are imported on first use
(module ``__getattr__``), so that importing ``lfzh_ds`` or a light module of it (``lfzh_ds.masking``,
``lfzh_ds.shards``, ``lfzh_ds.tokenization``) does not import torch or transformers. ``import lfzh_ds``
also registers the model with transformers' Auto classes, at once if they are loaded, else as soon as they
are (see ``auto_registration``): ``AutoModelForMaskedLM.from_pretrained(dir)`` then loads a model this
toolkit saved.
"""
from __future__ import annotations

import importlib

from .auto_registration import register_with_auto_classes
from .constants import CLS_ID, MASK_ID, PAD_ID, SEP_ID, UNK_ID, VOCAB_SIZE
from .tokenization import load_tokenizer, normalize_text

_LAZY = {
    "LongformerZhConfig": ".configuration",
    "LongformerZhModel": ".modeling",
    "LongformerZhForMaskedLM": ".modeling",
    "LongformerZhForSequenceClassification": ".modeling",
}

__all__ = ["CLS_ID", "MASK_ID", "PAD_ID", "SEP_ID", "UNK_ID", "VOCAB_SIZE", "load_tokenizer", "normalize_text", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


register_with_auto_classes()
