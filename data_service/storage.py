"""Who reads and writes the files: the job's storage mode, chosen once when Ray starts (``storage_mode``).

``SharedStorage``: the workers see the inputs and the output folder at the paths the driver sees (a shared
filesystem, or every Ray node on this machine). A worker reads its chunk's byte range itself (the bytes of a
compressed input are sent: it cannot be read from the middle) and stores the chunk result; it computes the
exact Jaccard of near-dedup candidate pairs from the stored results; it gathers a shard's documents from
them and writes the shard and its record. The driver sends only ranges and references.

``DriverStorage``: the driver reads every chunk and sends its bytes, stores each chunk result that comes
back, does near dedup itself, gathers each shard's documents and sends them, and writes the shard that comes
back. The workers touch no file.

The two give the same bytes. For each stage a mode answers which task to submit (``chunk_task``,
``shard_task``) and what to do with its answer (``chunk_finished``, ``shard_finished``), so the stages in
``pipeline.py`` are written once, over ``tasks.run_tasks``. The functions the workers run in shared storage
are here too.
"""
from __future__ import annotations

import dataclasses
import socket
from collections import OrderedDict
from pathlib import Path

from lfzh_ds import near_duplicates
from lfzh_ds.atomic_files import write_atomic

from . import readers
from .config import PipelineConfig
from .pack import build_shard
from .plan import DocumentRef, PlannedShard
from .process import ChunkCounts, ChunkResult, DocumentOptions, process_chunk
from .ray_session import SharedStorageError
from .tasks import Task
from .work_folder import cached_chunk, chunk_path, gather, store_chunk_result, write_shard_record


@dataclasses.dataclass
class StorageMode:
    """What both modes need to know about the job."""

    output: Path
    work: Path
    job_id: str
    chunk_bytes: int
    options: DocumentOptions
    shard_config: dict

    shared = False  # whether the workers read and write the files themselves (``RunResult.shared_storage``)


def storage_mode(shared: bool, config: PipelineConfig, output: Path, work: Path, job_id: str) -> StorageMode:
    """``SharedStorage`` or ``DriverStorage`` for this job (``shared``: ``RaySession.shared_storage()``)."""
    mode = SharedStorage if shared else DriverStorage
    return mode(output, work, job_id, config.chunk_bytes, config.document_options(), config.shard_config())


@dataclasses.dataclass
class DriverStorage(StorageMode):
    """The driver sends the data and writes every file (``--shared-storage off``)."""

    # the stored chunk results opened last, for gathering shards' documents
    _chunks: OrderedDict = dataclasses.field(default_factory=OrderedDict, repr=False)

    def chunk_task(self, key, chunk: readers.Chunk) -> Task:
        return Task((key, chunk.path), process_chunk, (chunk, self.options))

    def chunk_finished(self, task_key, result: ChunkResult) -> ChunkCounts:
        key, input_path = task_key
        store_chunk_result(result.as_dict(), chunk_path(self.work, key), self.job_id, self.chunk_bytes, key, input_path)
        return result.counts()

    def shard_task(self, shard: PlannedShard, chunk_paths: list[Path]) -> Task:
        tokens, starts, lengths = gather(shard.documents, chunk_paths, self._chunks)
        return Task(shard, build_shard, (shard.split, shard.index, tokens, starts, lengths, self.shard_config))

    def shard_finished(self, shard: PlannedShard, built) -> dict:
        data, stats = built
        return write_shard_and_record(self.output, self.work, shard, data, stats, self.shard_config)


@dataclasses.dataclass
class SharedStorage(StorageMode):
    """The workers read the inputs and write the chunk results and shards themselves."""

    shared = True
    # per input: whether it is uncompressed, so that a worker reads its chunks' byte ranges itself
    _ranges_only: dict = dataclasses.field(default_factory=dict, repr=False)

    def chunk_task(self, key, chunk: readers.Chunk) -> Task:
        if chunk.path not in self._ranges_only:
            self._ranges_only[chunk.path] = not readers.is_compressed(chunk.path)
        sent = dataclasses.replace(chunk, data=None) if self._ranges_only[chunk.path] else chunk
        target = chunk_path(self.work.resolve(), key)
        return Task((key, chunk.path), _process_and_store,
                    (sent, self.options, str(target), self.job_id, self.chunk_bytes, key))

    def chunk_finished(self, task_key, counts: ChunkCounts) -> ChunkCounts:
        return counts  # the worker stored the result

    def pairs_task(self, start: int, refs: list[tuple[DocumentRef, DocumentRef]], chunk_paths: list[str]) -> Task:
        """The exact Jaccard of the candidate pairs ``refs`` (from position ``start`` of the job's list)."""
        needed = {ref.chunk: chunk_paths[ref.chunk] for pair in refs for ref in pair}
        return Task(start, _jaccard_of_pairs, (refs, needed))

    def shard_task(self, shard: PlannedShard, chunk_paths: list[Path]) -> Task:
        needed = {doc.chunk: str(chunk_paths[doc.chunk]) for doc in shard.documents}
        return Task(shard, _build_shard_file, (shard, needed, str(self.output.resolve()), str(self.work.resolve()),
                                               self.shard_config))

    def shard_finished(self, shard: PlannedShard, entry: dict) -> dict:
        return entry  # the worker wrote the shard and its record


def write_shard_and_record(output: Path, work: Path, shard: PlannedShard, data: bytes, stats: dict,
                           shard_config: dict) -> dict:
    """Write a shard, then the record a rerun checks before it keeps the shard (a shard without one is rebuilt).
    Returns the shard's manifest entry."""
    write_atomic(output / shard.name, data)
    entry = {"file": shard.name, "rows": stats["rows"], "tokens": stats["tokens"], "documents": len(shard.documents),
             "predictions": stats["predictions"], "sha256": stats["sha256"],
             "documents_sha256": shard.documents_sha256}
    write_shard_record(work, entry, shard_config)
    return entry


# ---------------------------------------------------------------- what the workers run with shared storage

def _process_and_store(chunk: readers.Chunk, options: DocumentOptions, path: str, job_id: str, chunk_bytes: int,
                       key) -> ChunkCounts:
    """Stage 2 on a worker that sees the inputs and the output: read the chunk's byte range (unless it
    carries its bytes), process it, store the result where the driver will look for it."""
    try:
        if chunk.data is None:
            chunk = readers.read_range(chunk)
    except (OSError, readers.InputError) as err:
        raise SharedStorageError(f"{chunk.path}: a worker on {socket.gethostname()} cannot read {chunk.source} "
                                 f"({err}); with shared storage every node must see the inputs at the same path "
                                 f"(or URI); pass --shared-storage off to send them from this machine") from None
    result = process_chunk(chunk, options)
    try:
        store_chunk_result(result.as_dict(), Path(path), job_id, chunk_bytes, key, chunk.path)
    except OSError as err:
        raise SharedStorageError(f"a worker on {socket.gethostname()} cannot write {path} ({err}); with shared "
                                 f"storage every node must see the output folder at the same path; pass "
                                 f"--shared-storage off to write it from this machine only") from None
    return result.counts()


def _jaccard_of_pairs(refs: list[tuple[DocumentRef, DocumentRef]], paths: dict) -> list[float]:
    """Exact Jaccard of candidate pairs of documents, on a worker that sees the stored chunk results
    (chunk ``number`` at ``paths[number]``)."""
    cache, sets = OrderedDict(), {}

    def shingle_set(ref: DocumentRef):
        if ref not in sets:
            sets[ref] = near_duplicates.shingles(cached_chunk(cache, ref.chunk, paths, 64).text(ref.row))
        return sets[ref]

    return [near_duplicates.jaccard(shingle_set(a), shingle_set(b)) for a, b in refs]


def _build_shard_file(shard: PlannedShard, chunk_paths: dict, output: str, work: str, shard_config: dict) -> dict:
    """Stage 4 on a worker that sees the output: gather the shard's documents from the stored chunk
    results, pack and mask them, write the shard and its record (here, not on the driver: a job killed while
    the driver waits on other tasks keeps every shard already written). Returns its manifest entry."""
    tokens, starts, lengths = gather(shard.documents, chunk_paths, OrderedDict())
    data, stats = build_shard(shard.split, shard.index, tokens, starts, lengths, shard_config)
    return write_shard_and_record(Path(output), Path(work), shard, data, stats, shard_config)
