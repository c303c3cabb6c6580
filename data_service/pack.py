"""Packing documents into fixed-length sequences and building one shard (static masks included).

A shard's documents are concatenated into one token stream with ``[SEP]`` between documents,
cut every ``seq_len - 2`` tokens, and each piece is wrapped as ``[CLS] piece [SEP]``; only the
last sequence of a shard is shorter, and it is padded (``num_tokens`` says where the padding
starts). Documents never cross shards, so every shard can be built on its own.
"""
from __future__ import annotations

import hashlib

import numpy as np

from lfzh_ds.constants import CLS_ID, PAD_ID, SEP_ID
from lfzh_ds.masking import mask_rng, whole_word_mask
from lfzh_ds.shards import SPLIT_KEYS, encode_shard


def pack_documents(tokens: np.ndarray, word_starts: np.ndarray, doc_lengths: np.ndarray, seq_len: int):
    """(input_ids [rows, seq_len] uint16, word_starts [rows, seq_len] uint8, num_tokens [rows]).

    ``tokens``/``word_starts`` are the documents' ids and word-start flags concatenated, and
    ``doc_lengths`` their lengths in tokens.
    """
    body = seq_len - 2
    n_docs = len(doc_lengths)
    stream_len = int(np.sum(doc_lengths)) + max(n_docs - 1, 0)
    stream = np.empty(stream_len, dtype=np.uint16)
    stream_ws = np.empty(stream_len, dtype=np.uint8)
    # the separator after document d sits at (tokens of documents 0..d) + d earlier separators
    doc_starts = np.concatenate(([0], np.cumsum(doc_lengths)[:-1])).astype(np.int64)
    is_sep = np.zeros(stream_len, dtype=bool)
    sep_positions = doc_starts[1:] + np.arange(n_docs - 1, dtype=np.int64)
    is_sep[sep_positions] = True
    stream[is_sep], stream_ws[is_sep] = SEP_ID, 1
    stream[~is_sep], stream_ws[~is_sep] = tokens, word_starts

    rows = max(1, -(-stream_len // body))
    input_ids = np.full((rows, seq_len), PAD_ID, dtype=np.uint16)
    ws = np.ones((rows, seq_len), dtype=np.uint8)
    num_tokens = np.full(rows, seq_len, dtype=np.int64)
    full = stream_len // body
    input_ids[:full, 1:-1] = stream[: full * body].reshape(full, body)
    ws[:full, 1:-1] = stream_ws[: full * body].reshape(full, body)
    rest = stream_len - full * body
    if rest or full == 0:
        input_ids[full, 1:1 + rest] = stream[full * body:]
        ws[full, 1:1 + rest] = stream_ws[full * body:]
        input_ids[full, 1 + rest] = SEP_ID
        num_tokens[full] = rest + 2
    input_ids[:, 0] = CLS_ID
    input_ids[:full, -1] = SEP_ID
    return input_ids, ws, num_tokens


def build_shard(split: str, shard_index: int, tokens, word_starts, doc_lengths, config: dict):
    """Pack and statically mask one shard. Returns (file bytes, stats dict)."""
    seq_len = int(config["seq_len"])
    input_ids, ws, num_tokens = pack_documents(tokens, word_starts, doc_lengths, seq_len)
    positions: list[list[np.ndarray]] = []
    replacements: list[list[np.ndarray]] = []
    for row in range(input_ids.shape[0]):
        row_pos, row_ids = [], []
        for copy in range(int(config["dupe_factor"])):
            rng = mask_rng(config["seed"], SPLIT_KEYS[split], shard_index, row, copy)
            p, r = whole_word_mask(input_ids[row], ws[row], rng, mask_prob=config["mask_prob"],
                                   max_predictions=config["max_predictions"],
                                   max_word_len=config["wwm_max_word_len"])
            row_pos.append(p)
            row_ids.append(r)
        positions.append(row_pos)
        replacements.append(row_ids)
    data = encode_shard(input_ids, ws, num_tokens, positions, replacements)
    stats = {"rows": int(input_ids.shape[0]), "tokens": int(num_tokens.sum()),
             "predictions": int(sum(len(p) for row in positions for p in row)),
             "sha256": hashlib.sha256(data).hexdigest()}
    return data, stats
