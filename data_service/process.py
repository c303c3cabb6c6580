"""The per-chunk work a Ray worker does: parse, clean, filter, hash, segment and tokenize.

Exact dedup is not done here but by the driver over all chunks in input order, so which copy is
kept (the first) and how the duplicates are reported never depend on the chunking.

``process_chunk`` is a plain function of its arguments (Ray may run it twice after a worker dies,
and the answer is the same); nothing here knows about Ray.
"""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from .clean import CleanOptions, clean_document
from .manifest import RejectsReport
from .readers import PROCESSING_ERROR, TOO_LONG, TOO_SHORT, Chunk, iter_records
from .segment import WordTokenizer

HASH_BYTES = 16
SNIPPET_CHARS = 60


@dataclasses.dataclass(frozen=True)
class DocumentOptions:
    min_chars: int = 10
    max_chars: int = 1_000_000
    clean: CleanOptions = CleanOptions()


_tokenizer: WordTokenizer | None = None


def _word_tokenizer() -> WordTokenizer:
    global _tokenizer
    if _tokenizer is None:  # once per worker process: jieba's dictionary takes ~1 s to load
        _tokenizer = WordTokenizer()
    return _tokenizer


def content_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=HASH_BYTES).digest()


def snippet(chunk: Chunk, offset: int) -> str:
    start = offset - chunk.start_offset
    raw = chunk.data[start:start + 4 * SNIPPET_CHARS].split(b"\n", 1)[0]
    return raw.decode("utf-8", errors="replace")[:SNIPPET_CHARS]


def process_chunk(chunk: Chunk, options: DocumentOptions) -> dict:
    """Documents of one chunk, ready for packing, plus its rejects.

    Returns numpy arrays, one entry per kept document in input order: ``line``, ``offset``,
    ``chars`` (after cleaning), ``token_lengths``, ``hashes`` ([n, 16] uint8 content hashes of
    the cleaned text), and the concatenated ``tokens`` (uint16) and ``word_starts`` (uint8);
    ``rejects`` (a ``RejectsReport`` state) and ``records`` (records seen).
    """
    tokenizer = _word_tokenizer()
    rejects = RejectsReport()
    lines, offsets, chars, lengths, hashes = [], [], [], [], []
    tokens, starts = [], []
    records = 0

    def reject(reason, record, detail):
        rejects.add(reason, (chunk.file_index, record.offset),
                    {"file": chunk.path, "line": record.line, "byte_offset": record.offset,
                     "detail": detail, "snippet": snippet(chunk, record.offset)})

    for record in iter_records(chunk):
        records += 1
        if record.reject is not None:
            reject(record.reject, record, record.detail)
            continue
        if len(record.text) > options.max_chars:
            reject(TOO_LONG, record, f"{len(record.text):,} characters, more than --max-chars {options.max_chars:,}")
            continue
        try:
            text = clean_document(record.text, options.clean)
            if len(text) < options.min_chars:
                reject(TOO_SHORT, record, f"{len(text)} characters after cleaning, fewer than --min-chars {options.min_chars}")
                continue
            digest = content_hash(text)
            ids, ws = tokenizer(text)
        except Exception as err:  # a document that breaks a library must not stop the job
            reject(PROCESSING_ERROR, record, f"{type(err).__name__}: {err}")
            continue
        if ids.size == 0:
            reject(TOO_SHORT, record, "no tokens after cleaning")
            continue
        lines.append(record.line)
        offsets.append(record.offset)
        chars.append(len(text))
        lengths.append(ids.size)
        hashes.append(digest)
        tokens.append(ids)
        starts.append(ws)

    return {
        "line": np.array(lines, dtype=np.int64),
        "offset": np.array(offsets, dtype=np.int64),
        "chars": np.array(chars, dtype=np.int64),
        "token_lengths": np.array(lengths, dtype=np.int64),
        "hashes": np.frombuffer(b"".join(hashes), dtype=np.uint8).reshape(-1, HASH_BYTES),
        "tokens": np.concatenate(tokens) if tokens else np.zeros(0, np.uint16),
        "word_starts": np.concatenate(starts) if starts else np.zeros(0, np.uint8),
        "rejects": rejects.to_state(),
        "records": records,
    }
