"""The Chinese BERT tokenizer over the vendored vocab, and the text normalisation it needs.

The vocab lacks curly quotes, dashes, ellipses and full-width Latin letters, so without
normalisation about 1% of news characters become ``[UNK]``. We normalise only what the vocab
cannot represent: a character the vocab knows (for example the full-width comma ``，`` that the
released model was trained on) is left alone, anything else goes through NFKC and a small table.
"""
from __future__ import annotations

import functools
import hashlib
import sys
import unicodedata

from .constants import VOCAB_FILE, VOCAB_MD5, VOCAB_SIZE

# Characters NFKC leaves alone but the vocab does not have; mapped to ASCII forms it does have.
_EXTRA_MAP = {
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"',
    "\u2013": "-", "\u2014": "-", "\u2015": "-", "\u2212": "-",
    "\u2026": "...",
    "\ufeff": "", "\u200b": "", "\u200c": "", "\u200d": "", "\u2060": "",
    "\x00": "",
}


def vocab_md5(path=VOCAB_FILE) -> str:
    return hashlib.md5(open(path, "rb").read()).hexdigest()


@functools.lru_cache(maxsize=None)
def _vocab_chars() -> frozenset:
    with open(VOCAB_FILE, encoding="utf-8") as f:
        return frozenset(line.rstrip("\n") for line in f if len(line.rstrip("\n")) == 1)


@functools.lru_cache(maxsize=None)
def _translation_table() -> dict:
    known = _vocab_chars()
    table = {}
    for cp in range(sys.maxunicode + 1):
        ch = chr(cp)
        if ch in known or (0xD800 <= cp <= 0xDFFF):
            continue
        if ch in _EXTRA_MAP:
            table[cp] = _EXTRA_MAP[ch]
            continue
        if unicodedata.decomposition(ch).startswith("<"):  # a compatibility mapping exists
            norm = unicodedata.normalize("NFKC", ch)
            if norm != ch:
                table[cp] = "".join(_EXTRA_MAP.get(c, c) for c in norm)
    return table


def normalize_text(text: str) -> str:
    """Map characters the vocab lacks to forms it has (NFKC + curly quotes, dashes, ellipsis, BOM).

    Characters present in the vocab are never changed, so text the released model saw tokenizes
    exactly as before.
    """
    return text.translate(_translation_table())


# The length limit of a tokenizer that belongs to no model (the data service tokenizes whole documents and packs
# them itself); a tokenizer saved beside a model carries that model's number of positions instead.
NO_MODEL_MAX_LENGTH = 1_000_000


@functools.lru_cache(maxsize=None)
def load_tokenizer(model_max_length: int = NO_MODEL_MAX_LENGTH):
    """A fast BERT tokenizer over the vendored 21,128-entry Chinese vocab.

    ``model_max_length``: give the model's ``max_position_embeddings`` for a tokenizer saved with a model, so that
    ``truncation=True`` (and transformers' pipelines) cut inputs to what the model can take.

    Built with ``vocab=`` because transformers 5 silently ignores ``vocab_file=``. transformers is imported
    here, not at module level, so data-service workers that only normalise text start about 2 s faster.
    """
    from transformers import BertTokenizerFast

    actual = vocab_md5()
    if actual != VOCAB_MD5:
        raise RuntimeError(f"vendored vocab {VOCAB_FILE} has md5 {actual}, expected {VOCAB_MD5}; reinstall the package")
    with open(VOCAB_FILE, encoding="utf-8") as f:
        vocab = {tok.rstrip("\n"): i for i, tok in enumerate(f)}
    tok = BertTokenizerFast(vocab=vocab, do_lower_case=True, tokenize_chinese_chars=True,
                            model_max_length=model_max_length)
    if len(tok) != VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {len(tok)} entries, expected {VOCAB_SIZE}")
    return tok
