"""Whole-word masking for Chinese MLM: the one masking rule used by the data service and the reader.

A sequence comes with ``word_starts``: 1 where a token begins a word (a jieba word, stored by the
data service), 0 where it continues the previous token's word. Special tokens ([PAD], [UNK],
[CLS], [SEP], [MASK]) are never masked and never part of a word.

The rule (the upstream's, made exact):
- ``target = min(max_predictions, max(1, round_half_up(mask_prob * maskable_tokens)))``.
- Whole words are visited in a random order; a word is chosen if it still fits in the target
  (words that would overshoot are skipped, later shorter words may still fill the gap), until
  exactly ``target`` tokens are covered or no word fits. A word is never split.
- Of the chosen tokens, exactly ``round_half_up(0.8 k)`` become ``[MASK]``, ``round_half_up(0.1 k)``
  a random real token (ids ``FIRST_REAL_TOKEN_ID..VOCAB_SIZE-1``, never a special or ``[unused]``
  token) and the rest keep their id. Labels are the original ids at the chosen positions.
- ``max_word_len`` reproduces the upstream (``--wwm-max-word-len 3``): its ``get_new_segment`` only
  grouped characters into words of up to three characters, so longer words are masked as single
  tokens.

Everything random comes from the ``numpy.random.Generator`` passed in, so a mask is a pure
function of (sequence, word boundaries, generator state). Callers seed it with
``mask_rng(seed, ...)``.
"""
from __future__ import annotations

import numpy as np

from .constants import FIRST_REAL_TOKEN_ID, IGNORE_INDEX, MASK_ID, SPECIAL_IDS, VOCAB_SIZE

MASK_TOKEN_FRACTION = 0.8
RANDOM_TOKEN_FRACTION = 0.1


def round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def mask_rng(*keys: int) -> np.random.Generator:
    """A generator determined only by the given non-negative integers (seed, epoch, index, ...)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in keys])))


def whole_word_spans(input_ids: np.ndarray, word_starts: np.ndarray, max_word_len: int | None = None):
    """(starts, lengths) of the maskable words of one sequence, in position order."""
    ids = np.asarray(input_ids)
    maskable = ~np.isin(ids, SPECIAL_IDS)
    prev_maskable = np.concatenate(([False], maskable[:-1]))
    begins = maskable & ((np.asarray(word_starts) != 0) | ~prev_maskable)
    starts = np.flatnonzero(begins)
    if starts.size == 0:
        return starts, starts.copy()
    word_of_token = np.cumsum(begins) - 1
    lengths = np.bincount(word_of_token[maskable], minlength=starts.size)
    if max_word_len is not None and max_word_len > 0:
        too_long = lengths > max_word_len
        if too_long.any():
            # longer words become single-token words, as in the upstream's segmentation
            pieces_start = [np.arange(s, s + n) if long else np.array([s])
                            for s, n, long in zip(starts, lengths, too_long)]
            pieces_len = [np.ones(n, dtype=lengths.dtype) if long else np.array([n])
                          for n, long in zip(lengths, too_long)]
            starts, lengths = np.concatenate(pieces_start), np.concatenate(pieces_len)
    return starts, lengths


def whole_word_mask(input_ids, word_starts, rng: np.random.Generator, *, mask_prob: float,
                    max_predictions: int, max_word_len: int | None = None):
    """Choose positions and their replacement ids for one sequence.

    Returns ``(positions, replacement_ids)``: sorted int64 positions and the ids to put there
    (``[MASK]``, a random real token, or the original id). Use ``apply_mask`` to build the model
    inputs and labels.
    """
    ids = np.asarray(input_ids)
    starts, lengths = whole_word_spans(ids, word_starts, max_word_len)
    maskable_tokens = int(lengths.sum())
    if maskable_tokens == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy()
    target = min(int(max_predictions), max(1, round_half_up(mask_prob * maskable_tokens)))

    order = rng.permutation(starts.size)
    covered_after = np.cumsum(lengths[order])
    n_prefix = int(np.searchsorted(covered_after, target, side="right"))
    chosen = list(order[:n_prefix])
    covered = int(covered_after[n_prefix - 1]) if n_prefix else 0
    for w in order[n_prefix:]:  # the upstream's "skip a word that overshoots, keep looking"
        if covered == target:
            break
        if lengths[w] <= target - covered:
            chosen.append(w)
            covered += int(lengths[w])

    chosen = np.sort(np.asarray(chosen, dtype=np.int64))  # word order = position order
    chosen_len = lengths[chosen]
    within_word = np.arange(int(chosen_len.sum())) - np.repeat(np.cumsum(chosen_len) - chosen_len, chosen_len)
    positions = np.repeat(starts[chosen], chosen_len) + within_word
    k = positions.size
    n_mask = round_half_up(MASK_TOKEN_FRACTION * k)
    n_random = min(k - n_mask, round_half_up(RANDOM_TOKEN_FRACTION * k))
    role = rng.permutation(k)  # role[j] < n_mask: [MASK]; < n_mask + n_random: random; else keep
    replacement = ids[positions].astype(np.int64)
    replacement[role < n_mask] = MASK_ID
    is_random = (role >= n_mask) & (role < n_mask + n_random)
    replacement[is_random] = rng.integers(FIRST_REAL_TOKEN_ID, VOCAB_SIZE, size=int(is_random.sum()))
    return positions, replacement


def apply_mask(input_ids, positions, replacement_ids):
    """(masked input ids, labels) as int64 arrays; labels are IGNORE_INDEX except at ``positions``."""
    original = np.asarray(input_ids, dtype=np.int64)
    masked = original.copy()
    labels = np.full_like(original, IGNORE_INDEX)
    positions = np.asarray(positions, dtype=np.int64)
    masked[positions] = replacement_ids
    labels[positions] = original[positions]
    return masked, labels
