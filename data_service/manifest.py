"""The manifest, the rejects report and the per-stage counts of the output folder: built here.

``manifest.json`` (byte-identical for the same inputs, config and seed)::

    schema_version      lfzh_ds.constants.SCHEMA_VERSION
    config              every option that changes the output (seq_len, masking, cleaning, split, ...)
    inputs              [{path, format, bytes, sha256}] in input order: every file found, folders and
                        globs expanded (a folder's files recursively, sorted, hidden ones skipped)
    vocab_md5, vocab_size
    jieba               {jieba_version, dictionary, dictionary_md5, hmm}
    jionlp_version
    splits              {train|validation: {shards: [{file, rows, tokens, documents, predictions,
                                                      sha256, documents_sha256}], rows, tokens, documents}}
    totals              {records, documents, characters, document_tokens, rows, tokens, rejected}
                        (document_tokens: the documents' own tokens; tokens: packed tokens before the
                        padding, [CLS]/[SEP] included, as in the splits)
    rejects             {reason: count}
    stages              [{stage, documents_in, characters_in, documents_out, characters_out}] in the
                        order the stages run: read (records in, documents out; characters of the
                        records that decode), max_length, clean (characters after cleaning leave it),
                        min_length, each quality filter that is on, tokenize, exact_dedup, near_dedup

An empty validation split is explained by ``splits.validation.documents`` (0), ``totals.documents``
and ``config.val_fraction``: documents go to validation by content hash with that probability.

``documents_sha256`` hashes the content hashes of the shard's documents in order; a rerun uses
it to know that an existing shard file was built from the same documents.

``rejects.json``: ``{"total": N, "reasons": {reason: {"count": n, "examples": [{file, line,
byte_offset, detail, snippet}]}}}``, at most ``MAX_EXAMPLES`` examples per reason, the first ones
in input order.
"""
from __future__ import annotations

from lfzh_ds.constants import SCHEMA_VERSION, VOCAB_SIZE
from lfzh_ds.shards import SPLITS
from lfzh_ds.tokenization import vocab_md5

from .clean import jionlp_version
from .segment import jieba_dictionary_id

MAX_EXAMPLES = 5
REJECTS_NAME = "rejects.json"


class StageCounts:
    """Documents and characters entering and leaving each stage of the pipeline, in stage order."""

    def __init__(self, names=()):
        self.rows: dict[str, list[int]] = {name: [0, 0, 0, 0] for name in names}

    def enter(self, stage: str, chars: int) -> None:
        row = self.rows[stage]
        row[0] += 1
        row[1] += chars

    def leave(self, stage: str, chars: int) -> None:
        row = self.rows[stage]
        row[2] += 1
        row[3] += chars

    def merge(self, other: "StageCounts") -> None:
        for name, counts in other.rows.items():
            row = self.rows.setdefault(name, [0, 0, 0, 0])
            for k, value in enumerate(counts):
                row[k] += value

    def to_json(self) -> list[dict]:
        return [{"stage": name, "documents_in": r[0], "characters_in": r[1], "documents_out": r[2],
                 "characters_out": r[3]} for name, r in self.rows.items()]

    def to_state(self) -> list:
        return [[name, row] for name, row in self.rows.items()]

    @classmethod
    def from_state(cls, state) -> "StageCounts":
        counts = cls()
        counts.rows = {name: list(row) for name, row in state}
        return counts


class RejectsReport:
    """Counts per reason plus the first ``MAX_EXAMPLES`` examples in input order."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self._examples: dict[str, list[tuple[tuple, dict]]] = {}

    def add(self, reason: str, order: tuple, example: dict, count: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + count
        kept = self._examples.setdefault(reason, [])
        kept.append((tuple(order), example))
        kept.sort(key=lambda item: item[0])
        del kept[MAX_EXAMPLES:]

    def merge(self, other: "RejectsReport") -> None:
        for reason, count in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + count
            kept = self._examples.setdefault(reason, [])
            kept.extend(other._examples.get(reason, []))
            kept.sort(key=lambda item: item[0])
            del kept[MAX_EXAMPLES:]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_json(self) -> dict:
        return {"total": self.total,
                "reasons": {r: {"count": self.counts[r], "examples": [e for _, e in self._examples.get(r, [])]}
                            for r in sorted(self.counts)}}

    def to_state(self) -> dict:
        return {"counts": self.counts, "examples": {r: [[list(o), e] for o, e in ex]
                                                    for r, ex in self._examples.items()}}

    @classmethod
    def from_state(cls, state: dict) -> "RejectsReport":
        report = cls()
        report.counts = dict(state["counts"])
        report._examples = {r: [(tuple(o), e) for o, e in ex] for r, ex in state["examples"].items()}
        return report


def build_manifest(output_config: dict, inputs: list[dict], formats: list[str], shards: dict, totals: dict,
                   rejects: RejectsReport, stages: StageCounts) -> dict:
    """``manifest.json`` of a finished job: ``shards`` holds each split's shard entries in order, ``totals``
    the plan's record, document and character counts."""
    splits = {}
    for split in SPLITS:
        entries = shards[split]
        splits[split] = {"shards": entries, "rows": sum(e["rows"] for e in entries),
                         "tokens": sum(e["tokens"] for e in entries),
                         "documents": sum(e["documents"] for e in entries)}
    return {
        "schema_version": SCHEMA_VERSION,
        "config": output_config,
        "inputs": [{**info, "format": fmt} for info, fmt in zip(inputs, formats)],
        "vocab_md5": vocab_md5(),
        "vocab_size": VOCAB_SIZE,
        "jieba": jieba_dictionary_id(),
        "jionlp_version": jionlp_version(),
        "splits": splits,
        "totals": {**totals, "rows": sum(s["rows"] for s in splits.values()),
                   "tokens": sum(s["tokens"] for s in splits.values()), "rejected": rejects.total},
        "rejects": dict(sorted(rejects.counts.items())),
        "stages": stages.to_json(),
    }
