"""Documents to token ids: ``[CLS] title [SEP] content [SEP]`` pairs, cut to the model's length.

The model sees a document the way the CCF competition's BERT baselines fed it, as a sentence pair
(``[CLS] text [SEP]`` without a title), after :func:`lfzh_ds.tokenization.normalize_text`. A longer
document keeps its beginning (``head``) or its beginning and end (``head+tail``).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..constants import SEP_ID
from ..errors import ConfigError
from ..tokenization import normalize_text
from .tasks import Example

TRUNCATION_STRATEGIES = ("head", "head+tail")
# head+tail keeps this share of the token budget from the start of the document and the rest from
# its end (Sun et al. 2019 found head 128 + tail 382 of 512 best for long reviews).
DEFAULT_HEAD_FRACTION = 0.25


def truncate_ids(ids: list[int], max_len: int, strategy: str = "head", head_fraction: float = DEFAULT_HEAD_FRACTION) -> list[int]:
    """Cut a ``[CLS] ... [SEP]`` sequence to ``max_len`` tokens, keeping ``[CLS]`` first and ``[SEP]`` last.

    ``head`` keeps the beginning; ``head+tail`` keeps ``head_fraction`` of the budget from the
    beginning and the rest from the end (the end of a news article often carries its verdict).
    """
    if strategy not in TRUNCATION_STRATEGIES:
        raise ConfigError(f"truncation {strategy!r}: choose one of {TRUNCATION_STRATEGIES}")
    if max_len < 3:
        raise ConfigError(f"max_len={max_len} leaves no room for text between [CLS] and [SEP]")
    if not 0 <= head_fraction <= 1:
        raise ConfigError(f"head_fraction (--head-fraction) {head_fraction} is not between 0 and 1 (the share of the budget kept from the start)")
    if len(ids) <= max_len:
        return list(ids)
    body = ids[1:-1]
    budget = max_len - 2
    if strategy == "head":
        kept = body[:budget]
    else:
        n_head = int(round(budget * head_fraction))
        n_tail = budget - n_head
        kept = body[:n_head] + (body[-n_tail:] if n_tail else [])
    return [ids[0]] + kept + [ids[-1]]


@dataclass
class EncodedSplit:
    """Token ids and segment ids of one split, and how many documents were cut to ``max_len``."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    num_truncated: int

    @property
    def truncated_share(self) -> float:
        return self.num_truncated / len(self.input_ids) if self.input_ids else 0.0

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]


def segment_ids(ids: list[int], has_title: bool) -> list[int]:
    """BERT pair segments: 0 up to and including the first ``[SEP]``, 1 after it (all 0 without a title)."""
    if not has_title or SEP_ID not in ids:
        return [0] * len(ids)
    first_sep = ids.index(SEP_ID)
    return [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)


def encode_examples(
    examples: list[Example], tokenizer, max_len: int, truncation: str = "head", head_fraction: float = DEFAULT_HEAD_FRACTION
) -> EncodedSplit:
    """``[CLS] title [SEP] text [SEP]`` (``[CLS] text [SEP]`` without a title), truncated to ``max_len``."""
    input_ids, token_type_ids, truncated = [], [], 0
    step = 256  # bounded memory for very long documents
    for start in range(0, len(examples), step):
        chunk = examples[start : start + step]
        with_title = [e for e in chunk if e.title]
        without = [e for e in chunk if not e.title]
        encoded = {}
        if with_title:
            titles = [normalize_text(e.title) for e in with_title]
            texts = [normalize_text(e.text) for e in with_title]
            ids = tokenizer(titles, texts, add_special_tokens=True)["input_ids"]
            encoded.update({id(e): seq for e, seq in zip(with_title, ids)})
        if without:
            ids = tokenizer([normalize_text(e.text) for e in without], add_special_tokens=True)["input_ids"]
            encoded.update({id(e): seq for e, seq in zip(without, ids)})
        for e in chunk:
            seq = encoded[id(e)]
            if len(seq) > max_len:
                truncated += 1
                seq = truncate_ids(seq, max_len, truncation, head_fraction)
            input_ids.append(seq)
            token_type_ids.append(segment_ids(seq, bool(e.title)))
    return EncodedSplit(input_ids, token_type_ids, truncated)
