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

import numpy as np

from lfzh_ds.near_duplicates import NUM_BANDS, band_keys

from .clean import CleanOptions, clean_document
from .filters import FilterOptions, failed_filter
from .manifest import RejectsReport, StageCounts
from .readers import PROCESSING_ERROR, TOO_LONG, TOO_SHORT, Chunk, iter_records
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


def process_chunk(chunk: Chunk, options: DocumentOptions) -> dict:
    """Documents of one chunk, ready for packing, plus its rejects and stage counts.

    Returns numpy arrays, one entry per kept document in input order: ``line``, ``offset``,
    ``chars`` (after cleaning), ``token_lengths``, ``hashes`` ([n, 16] uint8 content hashes of
    the cleaned text), the concatenated ``tokens`` (uint16) and ``word_starts`` (uint8), and with
    ``options.near_dedup`` the ``bands`` ([n, NUM_BANDS] uint64 LSH keys) and ``texts`` (the
    cleaned texts); ``rejects`` (a ``RejectsReport`` state), ``stages`` (a ``StageCounts`` state)
    and ``records`` (records seen).
    """
    tokenizer = _word_tokenizer()
    rejects = RejectsReport()
    stages = StageCounts(options.stages())
    lines, offsets, chars, lengths, hashes = [], [], [], [], []
    tokens, starts, bands, texts = [], [], [], []
    records = 0

    def reject(reason, record, detail, text=None):
        rejects.add(reason, (chunk.file_index, record.offset),
                    {"file": chunk.path, "line": record.line, "byte_offset": record.offset, "detail": detail,
                     "snippet": snippet(chunk, record.offset) if text is None else text[:SNIPPET_CHARS]})

    for record in iter_records(chunk):
        records += 1
        raw_chars = len(record.text) if record.text is not None else 0  # a record that does not decode: 0
        stages.enter("read", raw_chars)
        if record.reject is not None:
            reject(record.reject, record, record.detail)
            continue
        stages.leave("read", raw_chars)
        stages.enter("max_length", raw_chars)
        if raw_chars > options.max_chars:
            reject(TOO_LONG, record, f"{raw_chars:,} characters, more than --max-chars {options.max_chars:,}")
            continue
        stages.leave("max_length", raw_chars)
        stages.enter("clean", raw_chars)
        try:
            text = clean_document(record.text, options.clean)
            stages.leave("clean", len(text))
            stages.enter("min_length", len(text))
            if len(text) < options.min_chars:
                reject(TOO_SHORT, record, f"{len(text)} characters after cleaning, fewer than --min-chars {options.min_chars}")
                continue
            stages.leave("min_length", len(text))
            failed = failed_filter(text, options.filters, stages)
            if failed is not None:
                reject(failed[0], record, failed[1], text)  # the snippet of the text the filter saw
                continue
            stages.enter("tokenize", len(text))
            digest = content_hash(text)
            ids, ws = tokenizer(text)
            keys = band_keys(text) if options.near_dedup else None
        except Exception as err:  # a document that breaks a library must not stop the job
            reject(PROCESSING_ERROR, record, f"{type(err).__name__}: {err}")
            continue
        if ids.size == 0:
            reject(TOO_SHORT, record, "no tokens after cleaning")
            continue
        stages.leave("tokenize", len(text))
        lines.append(record.line)
        offsets.append(record.offset)
        chars.append(len(text))
        lengths.append(ids.size)
        hashes.append(digest)
        tokens.append(ids)
        starts.append(ws)
        if options.near_dedup:
            bands.append(keys)
            texts.append(text)

    out = {
        "line": np.array(lines, dtype=np.int64),
        "offset": np.array(offsets, dtype=np.int64),
        "chars": np.array(chars, dtype=np.int64),
        "token_lengths": np.array(lengths, dtype=np.int64),
        "hashes": np.frombuffer(b"".join(hashes), dtype=np.uint8).reshape(-1, HASH_BYTES),
        "tokens": np.concatenate(tokens) if tokens else np.zeros(0, np.uint16),
        "word_starts": np.concatenate(starts) if starts else np.zeros(0, np.uint8),
        "rejects": rejects.to_state(),
        "stages": stages.to_state(),
        "records": records,
    }
    if options.near_dedup:
        out["bands"] = np.stack(bands) if bands else np.zeros((0, NUM_BANDS), np.uint64)
        out["texts"] = texts
    return out
