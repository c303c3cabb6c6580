"""Segmentation (jieba) and tokenization (the vendored Chinese BERT vocab) with word boundaries.

Tokenizing jieba word by word gives exactly the ids of tokenizing the whole text when every cut
between two words is also a cut of BERT's pre-tokenizer (whitespace, punctuation, CJK
characters). jieba sometimes cuts inside what BERT treats as one word (``café`` -> ``caf`` +
``é``, kana runs); such pieces are merged back first, so the ids always equal
``load_tokenizer()(text)``, and a merged piece is one word for masking. Word-by-word tokenization
with a cache is what makes this stage several times faster than the tokenizer on whole texts.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import unicodedata
from pathlib import Path

import jieba
import numpy as np

from lfzh_ds.tokenization import load_tokenizer

_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
               (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
_CACHE_LIMIT = 500_000


@functools.lru_cache(maxsize=65536)
def is_bert_cut(ch: str) -> bool:
    """True if BERT's pre-tokenizer always cuts before and after ``ch``."""
    cp = ord(ch)
    if ch in " \t\n\r" or unicodedata.category(ch) == "Zs":
        return True
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    if unicodedata.category(ch).startswith("P"):
        return True
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


@functools.lru_cache(maxsize=None)
def _jieba():
    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    return jieba


def jieba_dictionary_id() -> dict:
    """Which jieba and which dictionary segmented the text (for the manifest)."""
    # no initialize(): the driver only needs to know which dictionary the workers load
    dict_path = jieba.dt.dictionary or str(Path(jieba.__file__).parent / "dict.txt")
    return {"jieba_version": jieba.__version__, "dictionary": Path(dict_path).name,
            "dictionary_md5": hashlib.md5(Path(dict_path).read_bytes()).hexdigest(), "hmm": True}


def merge_for_bert(words: list[str]) -> list[str]:
    """Join neighbouring jieba words whose cut is not a BERT pre-tokenizer cut."""
    units: list[str] = []
    for w in words:
        if units and not is_bert_cut(w[0]) and not is_bert_cut(units[-1][-1]):
            units[-1] += w
        else:
            units.append(w)
    return units


class WordTokenizer:
    """``text -> (ids uint16, word_starts uint8)``; one per worker process (it caches words)."""

    def __init__(self):
        self._backend = load_tokenizer().backend_tokenizer
        self._cache: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def _fill(self, units) -> None:
        missing = [u for u in set(units) if u not in self._cache]
        if not missing:
            return
        if len(self._cache) + len(missing) > _CACHE_LIMIT:
            self._cache.clear()
        for unit, enc in zip(missing, self._backend.encode_batch(missing, add_special_tokens=False)):
            ids = tuple(enc.ids)
            self._cache[unit] = (ids, (1,) + (0,) * (len(ids) - 1) if ids else ())

    def words(self, text: str) -> list[str]:
        return merge_for_bert(_jieba().lcut(text))

    def __call__(self, text: str):
        units = self.words(text)
        self._fill(units)
        ids: list[int] = []
        starts: list[int] = []
        cache = self._cache
        for u in units:
            i, s = cache[u]
            ids.extend(i)
            starts.extend(s)
        return np.array(ids, dtype=np.uint16), np.array(starts, dtype=np.uint8)
