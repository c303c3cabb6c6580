"""The job's plan: which input files, in which formats; then, from the stored chunk results, which
documents survive exact and near dedup, which split each goes to, and which shard each lands in.

The plan is a pure function of the inputs, the output options and the chunk results, consumed in
input order, so it does not depend on the number of workers or nodes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lfzh_ds import near_duplicates
from lfzh_ds.shards import SPLITS, shard_name

from . import readers
from .config import PipelineConfig
from .manifest import RejectsReport, StageCounts
from .work_folder import ChunkFile, cached_chunk, chunk_path


class DocumentRef(NamedTuple):
    """Where a document is stored: row ``row`` of the chunk result of chunk number ``chunk`` (``Plan.keys[chunk]``)."""
    chunk: int
    row: int


class PlannedDocument(NamedTuple):
    """A document of the plan (it survived exact dedup). ``work_folder.gather`` unpacks the first three fields."""
    chunk: int  # chunk number: the chunk result of ``Plan.keys[chunk]``
    row: int  # its row in that chunk result
    tokens: int  # its length in tokens
    content_hash: bytes
    characters: int  # after cleaning

    @property
    def ref(self) -> DocumentRef:
        return DocumentRef(self.chunk, self.row)


class PlannedShard(NamedTuple):
    """One shard of the plan: its documents, in input order, and the sha256 that identifies them."""
    split: str
    index: int
    documents: list[PlannedDocument]
    documents_sha256: str  # ``documents_sha256(documents)``, recorded in the manifest

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)


@dataclasses.dataclass
class Plan:
    keys: list  # the chunk keys (file index, chunk index) in input order: chunk number n is keys[n]
    shards: dict[str, list[PlannedShard]]  # per split, its shards in order
    totals: dict  # records, documents, characters, document_tokens
    stages: StageCounts


def input_files(config: PipelineConfig) -> tuple[list[str], list[dict]]:
    """The input files (folders and globs expanded) and their ``{path, bytes, sha256}``."""
    files = readers.expand_inputs(config.inputs)
    return files, [readers.describe_input(name) for name in files]


def input_formats(config: PipelineConfig, files, inputs, rejects: RejectsReport) -> list[str]:
    """Each input's format (``--format``, or detected); an input without records is ``empty`` and a reject."""
    formats = []
    for index, (path, info) in enumerate(zip(files, inputs)):
        fmt = readers.detect_format(path, config.field) if config.format == "auto" else config.format
        if fmt == "empty" or (info["bytes"] == 0):
            rejects.add(readers.EMPTY_FILE, (index, 0), {"file": str(path), "line": 0, "byte_offset": 0,
                                                         "detail": "no records in the file", "snippet": ""})
            fmt = "empty"
        formats.append(fmt)
    return formats


def validation_limit(val_fraction: float) -> int:
    """A document is in the validation split when the first 8 bytes of its content hash, as a big-endian
    integer, are below this (the integer form of ``< val_fraction * 2**64``, exact for every float)."""
    return math.ceil(val_fraction * 2.0 ** 64)


def plan_shards(config: PipelineConfig, keys, work: Path, rejects: RejectsReport, similarities=None) -> Plan:
    """Global exact and near dedup, train/validation split, and the shard plan of the chunk results
    ``keys`` stored in ``work``. ``similarities``, if given, computes the exact Jaccard of candidate
    pairs elsewhere (see ``_near_duplicates``)."""
    seen: dict[bytes, tuple] = {}
    docs: list[PlannedDocument] = []  # documents left after exact dedup, in input order
    bands = []
    stages = StageCounts(config.document_options().stages())
    exact = StageCounts(["exact_dedup"])
    totals = {"records": 0, "documents": 0, "characters": 0, "document_tokens": 0}
    for number, key in enumerate(keys):
        chunk = ChunkFile(chunk_path(work, key))
        totals["records"] += chunk.meta["records"]
        rejects.merge(RejectsReport.from_state(chunk.meta["rejects"]))
        stages.merge(StageCounts.from_state(chunk.meta["stages"]))
        lines, offsets, chars = chunk.column("line"), chunk.column("offset"), chunk.column("chars")
        lengths = np.diff(chunk.token_offsets)
        rows = []
        for row, digest in enumerate(chunk.hashes()):
            exact.enter("exact_dedup", int(chars[row]))
            if config.dedup and digest in seen:
                first = seen[digest]
                rejects.add(readers.DUPLICATE, (key[0], int(offsets[row])),
                            {"file": chunk.meta["path"], "line": int(lines[row]), "byte_offset": int(offsets[row]),
                             "detail": f"same text as {first[0]} line {first[1]}", "snippet": ""})
                continue
            exact.leave("exact_dedup", int(chars[row]))
            seen[digest] = (chunk.meta["path"], int(lines[row]))
            docs.append(PlannedDocument(number, row, int(lengths[row]), digest, int(chars[row])))
            rows.append(row)
        if config.near_dedup_config():
            bands.append(chunk.bands()[rows])
    stages.merge(exact)
    if config.near_dedup_config():
        near = StageCounts(["near_dedup"])
        bands = np.concatenate(bands) if bands else np.zeros((0, near_duplicates.NUM_BANDS), np.uint64)
        removed = _near_duplicates(config, keys, work, docs, bands, rejects, similarities)
        for index, doc in enumerate(docs):
            near.enter("near_dedup", doc.characters)
            if index not in removed:
                near.leave("near_dedup", doc.characters)
        docs = [doc for index, doc in enumerate(docs) if index not in removed]
        stages.merge(near)

    split_docs = {s: [] for s in SPLITS}
    limit = validation_limit(config.val_fraction)
    for doc in docs:
        split = "validation" if int.from_bytes(doc.content_hash[:8], "big") < limit else "train"
        split_docs[split].append(doc)
        totals["documents"] += 1
        totals["characters"] += doc.characters
        totals["document_tokens"] += doc.tokens

    target = config.rows_per_shard * (config.seq_len - 2)
    shards = {s: [] for s in SPLITS}
    for split, docs in split_docs.items():
        current, stream = [], 0
        for doc in docs:
            stream += doc.tokens + (1 if current else 0)
            current.append(doc)
            if stream >= target:
                shards[split].append(current)
                current, stream = [], 0
        if current:
            shards[split].append(current)
    shards = {split: [PlannedShard(split, index, documents, documents_sha256(documents))
                      for index, documents in enumerate(shards[split])] for split in SPLITS}
    return Plan(keys, shards, totals, stages)


def empty_validation_warning(config: PipelineConfig, plan: Plan) -> str | None:
    """One line when ``--val-fraction`` asked for a validation split and too few documents gave it none."""
    if config.val_fraction == 0 or plan.shards["validation"]:
        return None
    documents = plan.totals["documents"]
    return (f"the validation split is empty: {documents:,} documents are too few for --val-fraction "
            f"{config.val_fraction} (about {documents * config.val_fraction:.2f} expected); pass more input "
            f"or a larger --val-fraction")


def _near_duplicates(config, keys, work, docs, bands, rejects: RejectsReport, similarities=None) -> set[int]:
    """Indices into ``docs`` of the near-duplicates of earlier kept documents, each added to ``rejects``
    with the location of the document it repeats. The exact Jaccard of the candidate pairs is computed
    here, one pair at a time as the rule asks, or, with ``similarities(refs, paths) -> scores``, for all
    candidate pairs at once (by the workers): the same numbers, so the same documents go."""
    cache, shingles, paths = OrderedDict(), OrderedDict(), [chunk_path(work, key) for key in keys]

    def shingle_set(index):
        if index not in shingles:
            doc = docs[index]
            shingles[index] = near_duplicates.shingles(cached_chunk(cache, doc.chunk, paths, 64).text(doc.row))
            while len(shingles) > 4096:
                shingles.popitem(last=False)
        return shingles[index]

    def location(index):
        doc = docs[index]
        chunk = cached_chunk(cache, doc.chunk, paths, 64)
        return chunk, int(chunk.column("line")[doc.row]), int(chunk.column("offset")[doc.row])

    pairs = near_duplicates.candidate_pairs(bands)
    if similarities is not None and len(pairs):
        refs = [(docs[i].ref, docs[j].ref) for i, j in pairs.tolist()]
        scores = dict(zip(map(tuple, pairs.tolist()), similarities(refs, [str(p.resolve()) for p in paths])))
        similarity = lambda i, j: scores[(i, j)]  # noqa: E731
    else:
        similarity = lambda i, j: near_duplicates.jaccard(shingle_set(i), shingle_set(j))  # noqa: E731
    removed = near_duplicates.near_duplicates(pairs, similarity, config.near_dedup_threshold)
    for index, (first, score) in removed.items():
        chunk, line, offset = location(index)
        kept, kept_line, kept_offset = location(first)
        original = {"file": kept.meta["path"], "line": kept_line, "byte_offset": kept_offset}
        rejects.add(readers.NEAR_DUPLICATE, (chunk.meta["key"][0], offset),
                    {"file": chunk.meta["path"], "line": line, "byte_offset": offset,
                     "detail": f"Jaccard {score:.3f} of character {near_duplicates.NGRAM}-grams with "
                               f"{original['file']} line {kept_line}",
                     "snippet": chunk.text(docs[index].row)[:60], "duplicate_of": original})
    return set(removed)


def documents_sha256(docs: list[PlannedDocument]) -> str:
    """The sha256 of a shard's documents' content hashes, in order (``documents_sha256`` in the manifest)."""
    h = hashlib.sha256()
    for doc in docs:
        h.update(doc.content_hash)
    return h.hexdigest()
