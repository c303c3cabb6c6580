"""The per-chunk work a Ray worker does: parse, clean, filter, hash, segment and tokenize.

Exact and near dedup are not done here but by the driver over all chunks in input order, so which
copy is kept (the first) and how the duplicates are reported never depend on the chunking; the
worker computes what they need (a content hash, and the MinHash LSH keys of the cleaned text).

Stage statistics: every document is counted entering and leaving each stage it reaches
(``WORKER_STAGES``, then the quality filters that are on, then ``tokenize``), with its characters
(the raw text's before ``clean``, the cleaned text's after).

``process_chunk`` is a plain function of its arguments (Ray may run it twice after a worker dies,
and the answer is the same); nothing here knows about Ray.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import NamedTuple

import numpy as np

from lfzh_ds.near_duplicates import NUM_BANDS, band_keys

from .clean import CleanOptions, clean_document
from .filters import FilterOptions, failed_filter
from .manifest import RejectsReport, StageCounts
from .readers import PROCESSING_ERROR, TOO_LONG, TOO_SHORT, Chunk, Record, iter_records
from .segment import WordTokenizer

HASH_BYTES = 16
SNIPPET_CHARS = 60


@dataclasses.dataclass(frozen=True)
class DocumentOptions:
    min_chars: int = 10
    max_chars: int = 1_000_000
    clean: CleanOptions = CleanOptions()
    filters: FilterOptions = FilterOptions()
    near_dedup: bool = True  # compute LSH keys and keep the cleaned text for the driver's near dedup

    def stages(self) -> tuple[str, ...]:
        return ("read", "max_length", "clean", "min_length", *self.filters.active(), "tokenize")


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


class ChunkCounts(NamedTuple):
    """A chunk's kept documents, their characters (after cleaning) and tokens: what the progress line adds up."""
    documents: int
    characters: int
    tokens: int


@dataclasses.dataclass(frozen=True)
class ChunkResult:
    """``process_chunk``'s answer for one chunk: one entry per kept document, in input order, then the chunk's
    rejects and stage counts. ``work_folder.store_chunk_result`` stores it (``as_dict``), ``work_folder.ChunkFile``
    reads it back."""

    line: np.ndarray  # int64 line numbers
    offset: np.ndarray  # int64 byte offsets
    chars: np.ndarray  # int64 characters after cleaning
    token_lengths: np.ndarray  # int64
    hashes: np.ndarray  # [n, HASH_BYTES] uint8 content hashes of the cleaned texts
    tokens: np.ndarray  # uint16: the documents' token ids, concatenated
    word_starts: np.ndarray  # uint8: one per token, 1 where a jieba word starts
    rejects: dict  # a RejectsReport state
    stages: list  # a StageCounts state
    records: int  # records seen
    bands: np.ndarray | None = None  # with near dedup: [n, NUM_BANDS] uint64 MinHash LSH keys
    texts: list[str] | None = None  # with near dedup: the cleaned texts (for the exact Jaccard check)

    def counts(self) -> ChunkCounts:
        return ChunkCounts(len(self.chars), int(self.chars.sum()), int(self.token_lengths.sum()))

    def as_dict(self) -> dict:
        """The mapping ``work_folder.store_chunk_result`` writes: every field, ``bands`` and ``texts`` only with
        near dedup."""
        out = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        if self.bands is None:
            del out["bands"], out["texts"]
        return out


class _Kept(NamedTuple):
    text: str  # cleaned
    content_hash: bytes
    ids: np.ndarray
    word_starts: np.ndarray
    bands: np.ndarray | None


class _Rejected(NamedTuple):
    reason: str
    detail: str
    text: str | None = None  # the text a filter saw (the report's snippet); None: the record's raw bytes


def process_chunk(chunk: Chunk, options: DocumentOptions) -> ChunkResult:
    """The documents of one chunk, ready for packing, with its rejects and stage counts."""
    tokenizer = _word_tokenizer()
    rejects = RejectsReport()
    stages = StageCounts(options.stages())
    kept: list[tuple[Record, _Kept]] = []
    records = 0
    for record in iter_records(chunk):
        records += 1
        outcome = _process_record(record, options, tokenizer, stages)
        if isinstance(outcome, _Kept):
            kept.append((record, outcome))
            continue
        snip = snippet(chunk, record.offset) if outcome.text is None else outcome.text[:SNIPPET_CHARS]
        rejects.add(outcome.reason, (chunk.file_index, record.offset),
                    {"file": chunk.path, "line": record.line, "byte_offset": record.offset, "detail": outcome.detail,
                     "snippet": snip})

    docs = [doc for _, doc in kept]
    near_dedup = {}
    if options.near_dedup:
        near_dedup = {"bands": np.stack([d.bands for d in docs]) if docs else np.zeros((0, NUM_BANDS), np.uint64),
                      "texts": [d.text for d in docs]}
    return ChunkResult(
        line=np.array([record.line for record, _ in kept], dtype=np.int64),
        offset=np.array([record.offset for record, _ in kept], dtype=np.int64),
        chars=np.array([len(d.text) for d in docs], dtype=np.int64),
        token_lengths=np.array([d.ids.size for d in docs], dtype=np.int64),
        hashes=np.frombuffer(b"".join(d.content_hash for d in docs), dtype=np.uint8).reshape(-1, HASH_BYTES),
        tokens=np.concatenate([d.ids for d in docs]) if docs else np.zeros(0, np.uint16),
        word_starts=np.concatenate([d.word_starts for d in docs]) if docs else np.zeros(0, np.uint8),
        rejects=rejects.to_state(), stages=stages.to_state(), records=records, **near_dedup)


def _process_record(record: Record, options: DocumentOptions, tokenizer: WordTokenizer,
                    stages: StageCounts) -> _Kept | _Rejected:
    """One record through the stages, counted entering and leaving each one it reaches."""
    raw_chars = len(record.text) if record.text is not None else 0  # a record that does not decode: 0
    stages.enter("read", raw_chars)
    if record.reject is not None:
        return _Rejected(record.reject, record.detail)
    stages.leave("read", raw_chars)
    stages.enter("max_length", raw_chars)
    if raw_chars > options.max_chars:
        return _Rejected(TOO_LONG, f"{raw_chars:,} characters, more than --max-chars {options.max_chars:,}")
    stages.leave("max_length", raw_chars)
    stages.enter("clean", raw_chars)
    try:
        text = clean_document(record.text, options.clean)
        stages.leave("clean", len(text))
        stages.enter("min_length", len(text))
        if len(text) < options.min_chars:
            return _Rejected(TOO_SHORT, f"{len(text)} characters after cleaning, fewer than --min-chars "
                                        f"{options.min_chars}")
        stages.leave("min_length", len(text))
        failed = failed_filter(text, options.filters, stages)
        if failed is not None:
            return _Rejected(failed[0], failed[1], text)  # the snippet of the text the filter saw
        stages.enter("tokenize", len(text))
        digest = content_hash(text)
        ids, word_starts = tokenizer(text)
        keys = band_keys(text) if options.near_dedup else None
    except Exception as err:  # a document that breaks a library must not stop the job
        return _Rejected(PROCESSING_ERROR, f"{type(err).__name__}: {err}")
    if ids.size == 0:
        return _Rejected(TOO_SHORT, "no tokens after cleaning")
    stages.leave("tokenize", len(text))
    return _Kept(text, digest, ids, word_starts, keys)
