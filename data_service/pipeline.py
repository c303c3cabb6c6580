"""The preprocessing job on Ray: corpus files in, Arrow shards + manifest + rejects report out.

In-process use::

    from data_service.pipeline import PipelineConfig, run
    result = run(PipelineConfig(inputs=["corpus/*.jsonl"], output="data/inews", seq_len=512))
    result.manifest["totals"]

``run(config: PipelineConfig) -> RunResult``. With ``config.ray_address=None`` it starts a local
Ray (dashboard off, ``num_workers`` CPUs) and shuts it down at the end; with ``"auto"`` or
``"HOST:PORT"`` it joins that cluster (``RayUnavailable`` if none answers there); if the calling
process is already connected to Ray (``ray.is_initialized()``) it uses that connection and leaves
it open. ``num_workers`` caps the tasks in flight on a cluster or an existing connection.

What runs where (``shared_storage``: whether the workers see the inputs and the output folder at
the paths the driver sees, e.g. a shared filesystem; by default, when every Ray node runs on this
machine):
1. driver: list the inputs, hash them, detect formats, cut them into chunks (byte ranges ending on
   a record boundary); with shared storage it sends each worker a byte range (the bytes of a
   compressed input, which cannot be read from the middle), otherwise the chunk's bytes;
2. workers (``process.process_chunk``): parse, clean, drop short/long documents, apply the quality
   filters (``filters.py``), hash, segment and tokenize, and compute each document's MinHash LSH
   keys; each result is stored under ``OUTPUT/_work/chunks/``, by the worker itself with shared
   storage, otherwise by the driver;
3. driver: global exact dedup, then near dedup (``lfzh_ds.near_duplicates``: candidate pairs from
   the LSH keys of the whole corpus, checked by exact Jaccard on the stored cleaned texts; the
   earliest copy in input order is kept), the train/validation split (by content hash, so a
   document and its duplicates land in one split), then the shard plan (documents never cross shards);
4. workers (``pack.build_shard``): gather the shard's documents from the stored chunk results
   (with shared storage; otherwise the driver sends them), pack, mask ``dupe_factor`` times, encode
   the Arrow file and write it atomically (temporary name, fsync, rename); without shared storage
   the driver writes it;
5. driver: ``rejects.json``, then ``manifest.json`` (its presence means the job is complete),
   then removes ``_work`` (unless ``keep_work``).

Determinism: chunk results are consumed in input order and every random choice is seeded from
(seed, split, shard, row, copy), so the bytes do not depend on the number of workers or nodes.
Resume: rerunning the same command reuses finished chunk results and every shard whose file
still has the sha256 recorded when it was written; everything else is redone. A finished output
is verified and left alone.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa

from lfzh_ds import near_duplicates
from lfzh_ds.atomic_files import TEMPORARY_GLOB, write_atomic, write_json_atomic
from lfzh_ds.constants import DEFAULT_SEQ_LEN, SCHEMA_VERSION, VOCAB_SIZE
from lfzh_ds.shards import MANIFEST_NAME, MAX_SEQ_LEN, SPLITS, file_sha256, shard_name
from lfzh_ds.tokenization import vocab_md5

from . import readers
from .clean import CleanOptions, jionlp_version
from .filters import FilterOptions
from .manifest import REJECTS_NAME, RejectsReport, StageCounts
from .pack import build_shard
from .process import DocumentOptions, process_chunk
from .segment import jieba_dictionary_id

WORK_DIR = "_work"
_CHUNK_META = b"lfzh_ds.chunk"


class JobConflict(RuntimeError):
    """The output folder holds a job with another configuration or other inputs."""


class RayUnavailable(RuntimeError):
    """No Ray cluster answers at ``--ray-address``."""


class SharedStorageError(readers.InputError):
    """A worker cannot read an input or write to the output folder at the driver's path."""


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """One preprocessing job; the fields mirror ``lfzh-preprocess --help`` (``chunk_bytes`` is ``--chunk-mb``)."""

    inputs: tuple = ()
    output: str = ""
    format: str = "auto"
    field: str | None = None
    text_docs: str = "lines"
    seq_len: int = DEFAULT_SEQ_LEN
    mask_prob: float = 0.10
    max_predictions: int = 400
    dupe_factor: int = 2
    wwm_max_word_len: int | None = None
    seed: int = 0
    val_fraction: float = 0.01
    min_chars: int = 10
    max_chars: int = 1_000_000
    dedup: bool = True
    near_dedup: bool = True
    near_dedup_threshold: float = near_duplicates.DEFAULT_THRESHOLD
    clean: CleanOptions = CleanOptions()
    filters: FilterOptions = FilterOptions()
    rows_per_shard: int = 1024
    # runtime options: they change how the job runs, never its output
    chunk_bytes: int = 4 << 20
    ray_address: str | None = None
    shared_storage: bool | None = None  # None: True when every Ray node runs on this machine
    num_workers: int | None = None
    keep_work: bool = False
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        if not self.inputs:
            raise ValueError("no --input given")
        if not self.output:
            raise ValueError("no --output given")
        if self.format not in readers.FORMATS:
            raise ValueError(f"--format must be one of {readers.FORMATS}, got {self.format!r}")
        if self.text_docs not in readers.TEXT_DOCS:
            raise ValueError(f"--text-docs must be one of {readers.TEXT_DOCS}, got {self.text_docs!r}")
        if not 8 <= self.seq_len <= MAX_SEQ_LEN:
            raise ValueError(f"--seq-len must be between 8 and {MAX_SEQ_LEN} (ids are stored as uint16), got {self.seq_len}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"--mask-prob must be in (0, 1), got {self.mask_prob}")
        if self.max_predictions < 1 or self.dupe_factor < 1 or self.rows_per_shard < 1:
            raise ValueError("--max-predictions, --dupe-factor and --rows-per-shard must be at least 1")
        if self.wwm_max_word_len is not None and self.wwm_max_word_len < 1:
            raise ValueError(f"--wwm-max-word-len must be at least 1, got {self.wwm_max_word_len}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 < self.near_dedup_threshold <= 1.0:
            raise ValueError(f"--near-dedup-threshold must be in (0, 1], got {self.near_dedup_threshold}")
        for name, value in dataclasses.asdict(self.filters).items():
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {value}")
        if self.num_workers is not None and self.num_workers < 1:
            raise ValueError(f"--num-workers must be at least 1, got {self.num_workers}")

    def output_config(self) -> dict:
        """Every option that changes the output; this goes into the manifest."""
        return {
            "format": self.format, "field": self.field, "text_docs": self.text_docs,
            "seq_len": self.seq_len, "mask_prob": self.mask_prob, "max_predictions": self.max_predictions,
            "dupe_factor": self.dupe_factor, "wwm_max_word_len": self.wwm_max_word_len, "seed": self.seed,
            "val_fraction": self.val_fraction, "min_chars": self.min_chars, "max_chars": self.max_chars,
            "dedup": self.dedup, "near_dedup": self.near_dedup_config(), "clean": dataclasses.asdict(self.clean),
            "filters": dataclasses.asdict(self.filters), "rows_per_shard": self.rows_per_shard,
        }

    def near_dedup_config(self) -> dict | None:
        """The near-dedup rule, or None when it is off (``near_dedup=False``, or ``dedup=False``: keep every copy)."""
        if not (self.dedup and self.near_dedup):
            return None
        return {"threshold": self.near_dedup_threshold, "ngram": near_duplicates.NGRAM,
                "bands": near_duplicates.NUM_BANDS, "rows_per_band": near_duplicates.BAND_ROWS}


@dataclasses.dataclass
class RunResult:
    output: Path
    manifest: dict
    rejects: dict
    up_to_date: bool = False  # True: the output was already complete and verified
    chunks_processed: int = 0
    chunks_reused: int = 0
    shards_built: int = 0
    shards_reused: int = 0
    seconds: float = 0.0
    characters_processed: int = 0  # characters of the documents segmented in this run
    max_in_flight: int = 0  # the most Ray tasks submitted and not yet finished at one time
    shared_storage: bool | None = None  # whether the workers read and wrote the files themselves (None: no task ran)


# ---------------------------------------------------------------- progress

class Progress:
    """One status line on stderr: documents, characters and tokens per second."""

    def __init__(self, enabled: bool, stream=sys.stderr):
        self.enabled, self.stream = enabled, stream
        self.tty = enabled and stream.isatty()
        self.start = self.last = time.monotonic()
        self.docs = self.chars = self.tokens = 0
        self.stage = ""

    def add(self, docs: int, chars: int, tokens: int) -> None:
        self.docs += docs
        self.chars += chars
        self.tokens += tokens
        self.show()

    def show(self, stage: str | None = None, force: bool = False) -> None:
        if stage is not None:
            self.stage = stage
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < (0.5 if self.tty else 10.0)):
            return
        self.last = now
        dt = max(now - self.start, 1e-9)
        line = (f"[preprocess] {self.stage:<28} docs {self.docs:>9,} ({self.docs / dt:,.0f}/s)  "
                f"chars {self.chars:>12,} ({self.chars / dt:,.0f}/s)  tokens {self.tokens:>12,} ({self.tokens / dt:,.0f}/s)")
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.show(force=True)
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()


# ---------------------------------------------------------------- Ray plumbing

class _RaySession:
    """Ray is started (or joined) only when there is work for it; shut down (or left) only if we
    started (or joined) it. ``local``: we started a local Ray with ``num_workers`` CPUs."""

    def __init__(self, config: PipelineConfig):
        self.config, self.ready, self.owned, self.local = config, False, False, False

    def ensure(self) -> None:
        import ray

        if self.ready:
            return
        self.ready = True
        if ray.is_initialized():
            return
        runtime_env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
        address = self.config.ray_address
        if address:
            try:  # Ray itself retries an address where nothing answers for many minutes
                if address != "auto":
                    host, _, port = address.split("://")[-1].rpartition(":")
                    socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
                ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
            except (OSError, ValueError) as err:  # ConnectionError is an OSError
                raise RayUnavailable(f"--ray-address {address}: no Ray cluster answers there "
                                     f"({type(err).__name__}: {err}); check the address, or start one with "
                                     f"`ray start --head`") from None
        else:
            ray.init(address="local", num_cpus=self.config.num_workers or os.cpu_count(), include_dashboard=False,
                     runtime_env=runtime_env, logging_level=logging.WARNING)
            self.local = True
        self.owned = True

    def shared_storage(self) -> bool:
        """``config.shared_storage``, or if that is None whether every live Ray node runs on this machine
        (a local Ray, or a cluster of one machine): then the workers see what the driver sees."""
        import ray

        if self.config.shared_storage is not None:
            return self.config.shared_storage
        here = ray.util.get_node_ip_address()
        return all(node["NodeManagerAddress"] == here for node in ray.nodes() if node["Alive"])

    def close(self) -> None:
        if self.owned:
            import ray

            ray.shutdown()
            self.owned = False


@functools.cache  # one remote function per process: Ray exports it once per session, not once per job
def _remote(fn):
    import ray

    return ray.remote(num_cpus=1, max_retries=5)(fn)


def _max_in_flight(config: PipelineConfig, ray_session: "_RaySession") -> int:
    """Tasks submitted at once. Twice the CPUs, so a worker never waits for the driver's next
    submission, unless ``num_workers`` caps a Ray that we did not start locally with that many CPUs
    (a cluster joined by ``ray_address`` or an existing connection): then exactly that many."""
    import ray

    if config.num_workers and not ray_session.local:
        return config.num_workers
    return 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))


class _Window:
    """Submit tasks with at most ``limit`` in flight; hand back results as they finish."""

    def __init__(self, limit: int, result: RunResult):
        self.limit, self.pending, self.result = limit, {}, result

    def submit(self, ref, key):
        self.pending[ref] = key
        self.result.max_in_flight = max(self.result.max_in_flight, len(self.pending))

    def full(self) -> bool:
        return len(self.pending) >= self.limit

    def wait_one(self):
        import ray

        (ref,), _ = ray.wait(list(self.pending), num_returns=1)
        key = self.pending.pop(ref)
        try:
            return key, ray.get(ref)
        except ray.exceptions.RayTaskError as err:  # a worker's clear one-line error, without Ray's traceback
            if isinstance(err.cause, SharedStorageError):
                raise SharedStorageError(str(err.cause)) from None
            raise


# ---------------------------------------------------------------- chunk results on disk

def _chunk_path(work: Path, key) -> Path:
    return work / "chunks" / f"f{key[0]:05d}-c{key[1]:06d}.arrow"


def _write_chunk_result(path: Path, job_id: str, chunk_bytes: int, key, input_path: str, result: dict) -> None:
    lengths = result["token_lengths"]
    offsets = pa.array(np.concatenate(([0], np.cumsum(lengths))).astype(np.int64))
    meta = {"job": job_id, "key": list(key), "chunk_bytes": chunk_bytes, "path": input_path,
            "records": result["records"], "rejects": result["rejects"], "stages": result["stages"]}
    columns = {
        "line": result["line"], "offset": result["offset"], "chars": result["chars"],
        "hash": pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(lengths),
                                                     [None, pa.py_buffer(result["hashes"].tobytes())]),
        "tokens": pa.LargeListArray.from_arrays(offsets, pa.array(result["tokens"], pa.uint16())),
        "word_starts": pa.LargeListArray.from_arrays(offsets, pa.array(result["word_starts"], pa.uint8())),
    }
    if "bands" in result:  # near dedup: the LSH keys and the cleaned text (for the exact Jaccard check)
        columns["bands"] = pa.FixedSizeListArray.from_arrays(pa.array(result["bands"].reshape(-1), pa.uint64()),
                                                             near_duplicates.NUM_BANDS)
        columns["text"] = pa.array(result["texts"], pa.large_string())
    table = pa.table(columns).replace_schema_metadata({_CHUNK_META: json.dumps(meta)})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    write_atomic(path, sink.getvalue().to_pybytes())


def _store_chunk_result(out: dict, path: Path, job_id: str, chunk_bytes: int, key, input_path: str) -> dict:
    """Write a chunk's result; returns its documents, characters and tokens (for the progress line)."""
    _write_chunk_result(path, job_id, chunk_bytes, key, input_path, out)
    return {"docs": len(out["chars"]), "chars": int(out["chars"].sum()), "tokens": int(out["token_lengths"].sum())}


def _process_and_store(chunk: readers.Chunk, options: DocumentOptions, path: str, job_id: str, chunk_bytes: int,
                       key) -> dict:
    """Stage 2 on a worker that sees the inputs and the output: read the chunk's byte range (unless it
    carries its bytes), process it, store the result where the driver will look for it."""
    try:
        if chunk.data is None:
            chunk = readers.read_range(chunk)
    except (OSError, readers.InputError) as err:
        raise SharedStorageError(f"{chunk.path}: a worker on {socket.gethostname()} cannot read {chunk.source} "
                                 f"({err}); with shared storage every node must see the inputs at the same path "
                                 f"(or URI); pass --shared-storage off to send them from this machine") from None
    out = process_chunk(chunk, options)
    try:
        return _store_chunk_result(out, Path(path), job_id, chunk_bytes, key, chunk.path)
    except OSError as err:
        raise SharedStorageError(f"a worker on {socket.gethostname()} cannot write {path} ({err}); with shared "
                                 f"storage every node must see the output folder at the same path; pass "
                                 f"--shared-storage off to write it from this machine only") from None


def _jaccard_of_pairs(refs, paths) -> list[float]:
    """Exact Jaccard of candidate pairs ``((chunk number, row), (chunk number, row))``, on a worker that
    sees the stored chunk results (chunk ``number`` at ``paths[number]``)."""
    cache, sets = OrderedDict(), {}

    def shingle_set(ref):
        if ref not in sets:
            sets[ref] = near_duplicates.shingles(_cached_chunk(cache, ref[0], paths, 64).text(ref[1]))
        return sets[ref]

    return [near_duplicates.jaccard(shingle_set(a), shingle_set(b)) for a, b in refs]


def _pair_similarities_on_workers(config: PipelineConfig, result: RunResult, ray_session: _RaySession):
    """With shared storage (and Ray up), a ``similarities`` for ``_plan`` that spreads the candidate pairs'
    exact Jaccard over the workers in batches of consecutive pairs; otherwise None (the driver does it)."""
    if not result.shared_storage or config.near_dedup_config() is None:
        return None

    def similarities(refs, paths):
        window, scores = _Window(_max_in_flight(config, ray_session), result), [None] * len(refs)

        def finish_one():
            start, batch = window.wait_one()
            scores[start:start + len(batch)] = batch

        step = max(256, -(-len(refs) // window.limit))
        for start in range(0, len(refs), step):
            batch = refs[start:start + step]
            while window.full():
                finish_one()
            needed = {number: paths[number] for pair in batch for number, _ in pair}
            window.submit(_remote(_jaccard_of_pairs).remote(batch, needed), start)
        while window.pending:
            finish_one()
        return scores

    return similarities


def _build_shard_file(split: str, index: int, docs, chunk_paths: dict, output: str, shard_config: dict) -> dict:
    """Stage 4 on a worker that sees the output: gather the shard's documents from the stored chunk
    results, pack and mask them, write the shard. Returns its stats."""
    tokens, starts, lengths = _gather(docs, chunk_paths, OrderedDict())
    data, stats = build_shard(split, index, tokens, starts, lengths, shard_config)
    write_atomic(Path(output) / shard_name(split, index), data)
    return stats


class _ChunkFile:
    """A stored chunk result, memory-mapped."""

    def __init__(self, path: Path):
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        self.table = reader.read_all()
        self.meta = json.loads(self.table.schema.metadata[_CHUNK_META])
        tokens = self.table.column("tokens").combine_chunks()
        self.token_offsets = tokens.offsets.to_numpy()
        self.tokens = tokens.values.to_numpy()
        self.word_starts = self.table.column("word_starts").combine_chunks().values.to_numpy()

    @property
    def num_docs(self) -> int:
        return self.table.num_rows

    def column(self, name) -> np.ndarray:
        return self.table.column(name).to_numpy()

    def hashes(self) -> list[bytes]:
        return self.table.column("hash").to_pylist()

    def bands(self) -> np.ndarray:
        """[documents, NUM_BANDS] uint64 LSH keys (stored when near dedup is on)."""
        values = self.table.column("bands").combine_chunks().values.to_numpy()
        return values.reshape(-1, near_duplicates.NUM_BANDS)

    def text(self, row: int) -> str:
        return self.table.column("text")[row].as_py()


def _cached_chunk(cache: OrderedDict, number: int, paths, size: int = 4) -> _ChunkFile:
    """Chunk ``number`` of the plan (stored at ``paths[number]``), from a cache of the last ``size`` opened."""
    if number not in cache:
        cache[number] = _ChunkFile(Path(paths[number]))
        while len(cache) > size:
            cache.popitem(last=False)
    return cache[number]


def _load_chunk(path: Path, job_id: str, chunk_bytes: int) -> _ChunkFile | None:
    """The stored result if it is readable and belongs to this job and chunking, else None (it is redone)."""
    if not path.is_file():
        return None
    try:
        chunk = _ChunkFile(path)
    except (OSError, pa.ArrowInvalid, KeyError, ValueError, TypeError):
        return None
    return chunk if chunk.meta.get("job") == job_id and chunk.meta.get("chunk_bytes") == chunk_bytes else None


# ---------------------------------------------------------------- the job

def _validation_limit(val_fraction: float) -> int:
    """A document is in the validation split when the first 8 bytes of its content hash, as a big-endian
    integer, are below this (the integer form of ``< val_fraction * 2**64``, exact for every float)."""
    return math.ceil(val_fraction * 2.0 ** 64)


def _holds_work(work: Path) -> bool:
    """Whether an unfinished job stored any chunk or shard result yet."""
    return any(any((work / part).glob("*")) for part in ("chunks", "shards") if (work / part).is_dir())


def _conflict(output: Path, what: str, old_config: dict, new_config: dict, old_inputs, new_inputs) -> JobConflict:
    diffs = [f"{k}: {old_config.get(k)!r} -> {new_config.get(k)!r}"
             for k in sorted(set(old_config) | set(new_config)) if old_config.get(k) != new_config.get(k)]
    old_inputs = [{k: i.get(k) for k in ("path", "bytes", "sha256")} for i in old_inputs or []]
    if old_inputs != new_inputs:
        changed = sorted({i["path"] for i in old_inputs} ^ {i["path"] for i in new_inputs}) or \
            [n["path"] for o, n in zip(old_inputs, new_inputs) if o != n] or ["the input order"]
        diffs.append(f"inputs differ: {', '.join(changed[:3])}")
    return JobConflict(f"{output} already holds {what} made with other settings or inputs "
                       f"({'; '.join(diffs[:6])}); use another --output, or pass --overwrite to delete it and "
                       f"start again")


def _clear_output(output: Path) -> None:
    for pattern in (MANIFEST_NAME, REJECTS_NAME, *(f"{s}-*.arrow" for s in SPLITS), TEMPORARY_GLOB):
        for p in output.glob(pattern):
            p.unlink()
    shutil.rmtree(output / WORK_DIR, ignore_errors=True)


def _finished_and_valid(output: Path, manifest_config: dict, inputs: list[dict]) -> dict | None:
    """The existing manifest if the output is complete for this exact job and every shard checks out."""
    path = output / MANIFEST_NAME
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("config") != manifest_config or \
            [{k: i.get(k) for k in ("path", "bytes", "sha256")} for i in manifest.get("inputs", [])] != inputs:
        raise _conflict(output, "a finished dataset", manifest.get("config", {}), manifest_config,
                        manifest.get("inputs"), inputs)
    if not (output / REJECTS_NAME).is_file():
        return None
    for split in SPLITS:
        for entry in manifest["splits"][split]["shards"]:
            shard = output / entry["file"]
            if not shard.is_file() or file_sha256(shard) != entry["sha256"]:
                return None
    return manifest


def _output_folder(output: str) -> Path:
    """The output folder: a path, or a URI of a filesystem that pyarrow maps to this machine's (``file://``)."""
    if not readers.is_uri(output):
        return Path(output)
    from pyarrow import fs

    try:
        filesystem, path = fs.FileSystem.from_uri(output)
    except (OSError, ValueError) as err:
        raise ValueError(f"--output {output}: pyarrow cannot open this URI ({err})") from None
    if not isinstance(filesystem, fs.LocalFileSystem):
        raise ValueError(f"--output {output}: the output must be a folder on a mounted filesystem (a path or a "
                         f"file:// URI): shards are renamed into place atomically and memory-mapped by training; "
                         f"write it to a local or shared folder and copy it to {type(filesystem).__name__} after")
    return Path(path)


def run(config: PipelineConfig) -> RunResult:
    """Run (or finish, or verify) the preprocessing job described by ``config``."""
    config.validate()
    t0 = time.monotonic()
    output = _output_folder(config.output)
    if config.overwrite and output.exists():
        _clear_output(output)
    output.mkdir(parents=True, exist_ok=True)
    work = output / WORK_DIR
    for stale in output.glob(TEMPORARY_GLOB):
        stale.unlink()

    files = readers.expand_inputs(config.inputs)
    inputs = [readers.describe_input(name) for name in files]
    manifest_config = config.output_config()
    done = _finished_and_valid(output, manifest_config, inputs)
    if done is not None:
        if not config.keep_work:
            shutil.rmtree(work, ignore_errors=True)
        rejects = json.loads((output / REJECTS_NAME).read_text(encoding="utf-8"))
        return RunResult(output, done, rejects, up_to_date=True, seconds=time.monotonic() - t0)
    job = {"config": manifest_config, "inputs": inputs}
    job_id = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()
    job_file = work / "job.json"
    if job_file.is_file():
        old_job = json.loads(job_file.read_text(encoding="utf-8"))
        # another job's results are not thrown away silently; one that stored none (its Ray never came up) is
        if old_job.get("job_id") != job_id and _holds_work(work):
            raise _conflict(output, "an unfinished job", old_job.get("config", {}), manifest_config,
                            old_job.get("inputs"), inputs)
    (work / "chunks").mkdir(parents=True, exist_ok=True)
    (work / "shards").mkdir(parents=True, exist_ok=True)
    write_json_atomic(job_file, {**job, "job_id": job_id})
    _reopen_finished_output(output, work)

    rejects = RejectsReport()
    formats = []
    for index, (path, info) in enumerate(zip(files, inputs)):
        fmt = readers.detect_format(path, config.field) if config.format == "auto" else config.format
        if fmt == "empty" or (info["bytes"] == 0):
            rejects.add(readers.EMPTY_FILE, (index, 0), {"file": str(path), "line": 0, "byte_offset": 0,
                                                         "detail": "no records in the file", "snippet": ""})
            fmt = "empty"
        formats.append(fmt)

    progress = Progress(config.progress)
    result = RunResult(output, {}, {})
    ray_session = _RaySession(config)
    try:
        keys = _process_all_chunks(config, files, formats, work, job_id, progress, result, ray_session)
        plan, totals, stages = _plan(config, keys, work, rejects, _pair_similarities_on_workers(config, result, ray_session))
        shards = _build_all_shards(config, plan, work, output, progress, result, ray_session)
    finally:
        progress.close()
        ray_session.close()

    manifest = _manifest(manifest_config, inputs, formats, shards, plan, totals, rejects, stages)
    rejects_json = rejects.to_json()
    write_json_atomic(output / REJECTS_NAME, rejects_json)
    write_json_atomic(output / MANIFEST_NAME, manifest)
    if not config.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    result.manifest, result.rejects = manifest, rejects_json
    result.seconds = time.monotonic() - t0
    return result


def _document_options(config: PipelineConfig) -> DocumentOptions:
    return DocumentOptions(min_chars=config.min_chars, max_chars=config.max_chars, clean=config.clean,
                           filters=config.filters, near_dedup=config.near_dedup_config() is not None)


def _process_all_chunks(config, files, formats, work, job_id, progress, result, ray_session):
    """Stage 2 for every chunk not already stored; returns the chunk keys in input order."""
    options = _document_options(config)
    keys = []
    window = None
    progress.show("segmenting", force=True)

    def finish_one():
        (key, path), out = window.wait_one()
        counts = out if result.shared_storage else \
            _store_chunk_result(out, _chunk_path(work, key), job_id, config.chunk_bytes, key, path)
        result.chunks_processed += 1
        result.characters_processed += counts["chars"]
        progress.add(counts["docs"], counts["chars"], counts["tokens"])

    for file_index, (path, fmt) in enumerate(zip(files, formats)):
        if fmt == "empty":
            continue
        ranges_only = None  # with shared storage the workers read an uncompressed input's byte ranges themselves
        for k, chunk in enumerate(readers.iter_chunks(path, file_index, fmt, config.field, config.text_docs,
                                                      config.chunk_bytes)):
            key = (file_index, k)
            keys.append(key)
            if _load_chunk(_chunk_path(work, key), job_id, config.chunk_bytes) is not None:
                result.chunks_reused += 1
                continue
            if window is None:
                ray_session.ensure()
                window = _Window(_max_in_flight(config, ray_session), result)
                result.shared_storage = ray_session.shared_storage()
            while window.full():
                finish_one()
            if not result.shared_storage:
                window.submit(_remote(process_chunk).remote(chunk, options), (key, path))
                continue
            if ranges_only is None:
                ranges_only = not readers.is_compressed(path)
            target = _chunk_path(work.resolve(), key)
            window.submit(_remote(_process_and_store).remote(
                dataclasses.replace(chunk, data=None) if ranges_only else chunk, options, str(target), job_id,
                config.chunk_bytes, key), (key, path))
    while window is not None and window.pending:
        finish_one()
    return keys


def _plan(config, keys, work, rejects: RejectsReport, similarities=None):
    """Global exact and near dedup, train/validation split, and the shard plan (pure function of the
    chunk results). Returns the plan, the totals and the stage counts. ``similarities``, if given,
    computes the exact Jaccard of candidate pairs elsewhere (see ``_near_duplicates``)."""
    seen: dict[bytes, tuple] = {}
    docs = []  # documents left after exact dedup, in input order: (chunk number, row, tokens, hash, characters)
    bands = []
    stages = StageCounts(_document_options(config).stages())
    exact = StageCounts(["exact_dedup"])
    totals = {"records": 0, "documents": 0, "characters": 0, "document_tokens": 0}
    for number, key in enumerate(keys):
        chunk = _ChunkFile(_chunk_path(work, key))
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
            docs.append((number, row, int(lengths[row]), digest, int(chars[row])))
            rows.append(row)
        if config.near_dedup_config():
            bands.append(chunk.bands()[rows])
    stages.merge(exact)
    if config.near_dedup_config():
        near = StageCounts(["near_dedup"])
        bands = np.concatenate(bands) if bands else np.zeros((0, near_duplicates.NUM_BANDS), np.uint64)
        removed = _near_duplicates(config, keys, work, docs, bands, rejects, similarities)
        for index, doc in enumerate(docs):
            near.enter("near_dedup", doc[4])
            if index not in removed:
                near.leave("near_dedup", doc[4])
        docs = [doc for index, doc in enumerate(docs) if index not in removed]
        stages.merge(near)

    split_docs = {s: [] for s in SPLITS}  # per split: (chunk number, row, tokens, hash)
    limit = _validation_limit(config.val_fraction)
    for number, row, length, digest, chars in docs:
        split = "validation" if int.from_bytes(digest[:8], "big") < limit else "train"
        split_docs[split].append((number, row, length, digest))
        totals["documents"] += 1
        totals["characters"] += chars
        totals["document_tokens"] += length

    body = config.seq_len - 2
    target = config.rows_per_shard * body
    plan = {s: [] for s in SPLITS}
    for split, docs in split_docs.items():
        current, stream = [], 0
        for doc in docs:
            stream += doc[2] + (1 if current else 0)
            current.append(doc)
            if stream >= target:
                plan[split].append(current)
                current, stream = [], 0
        if current:
            plan[split].append(current)
    return {"keys": keys, "shards": plan}, totals, stages


def _near_duplicates(config, keys, work, docs, bands, rejects: RejectsReport, similarities=None) -> set[int]:
    """Indices into ``docs`` of the near-duplicates of earlier kept documents, each added to ``rejects``
    with the location of the document it repeats. The exact Jaccard of the candidate pairs is computed
    here, one pair at a time as the rule asks, or, with ``similarities(refs, paths) -> scores``, for all
    candidate pairs at once (by the workers): the same numbers, so the same documents go."""
    cache, shingles, paths = OrderedDict(), OrderedDict(), [_chunk_path(work, key) for key in keys]

    def shingle_set(index):
        if index not in shingles:
            number, row = docs[index][:2]
            shingles[index] = near_duplicates.shingles(_cached_chunk(cache, number, paths, 64).text(row))
            while len(shingles) > 4096:
                shingles.popitem(last=False)
        return shingles[index]

    def location(index):
        number, row = docs[index][:2]
        chunk = _cached_chunk(cache, number, paths, 64)
        return chunk, int(chunk.column("line")[row]), int(chunk.column("offset")[row])

    pairs = near_duplicates.candidate_pairs(bands)
    if similarities is not None and len(pairs):
        refs = [(docs[i][:2], docs[j][:2]) for i, j in pairs.tolist()]
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
                     "snippet": chunk.text(int(docs[index][1]))[:60], "duplicate_of": original})
    return set(removed)


def _documents_sha256(docs) -> str:
    h = hashlib.sha256()
    for doc in docs:
        h.update(doc[3])
    return h.hexdigest()


def _gather(docs, paths, cache: OrderedDict):
    """Concatenated tokens/word starts and lengths of a shard's documents ``(chunk number, row, tokens, ...)``,
    from the stored chunks (chunk ``number`` at ``paths[number]``)."""
    tokens, starts, lengths = [], [], []
    for number, row, n, *_ in docs:
        chunk = _cached_chunk(cache, number, paths)
        a, b = chunk.token_offsets[row], chunk.token_offsets[row + 1]
        tokens.append(chunk.tokens[a:b])
        starts.append(chunk.word_starts[a:b])
        lengths.append(n)
    return np.concatenate(tokens), np.concatenate(starts), np.array(lengths, dtype=np.int64)


# the options a shard's bytes depend on besides its documents; part of a written shard's record
_SHARD_CONFIG = ("seq_len", "dupe_factor", "seed", "mask_prob", "max_predictions", "wwm_max_word_len")


def _reopen_finished_output(output: Path, work: Path) -> None:
    """A finished output with a bad shard is being redone: its manifest entries become the records
    of the shards written so far, and the manifest goes (its presence means "complete")."""
    path = output / MANIFEST_NAME
    if not path.is_file():
        return
    manifest = json.loads(path.read_text(encoding="utf-8"))
    shard_config = {k: manifest.get("config", {}).get(k) for k in _SHARD_CONFIG}
    for split in SPLITS:
        for entry in manifest.get("splits", {}).get(split, {}).get("shards", []):
            sidecar = work / "shards" / f"{entry['file']}.json"
            if not sidecar.is_file():
                write_json_atomic(sidecar, {**entry, "shard_config": shard_config})
    path.unlink()


def _build_all_shards(config, plan, work, output, progress, result, ray_session):
    """Stage 4 for every shard that is missing or does not match what was recorded when it was written
    (its documents, its masking options and its sha256)."""
    shard_config = {k: getattr(config, k) for k in _SHARD_CONFIG}
    entries = {s: [None] * len(plan["shards"][s]) for s in SPLITS}
    window, cache = None, OrderedDict()
    paths = [_chunk_path(work.resolve(), key) for key in plan["keys"]]
    progress.show("packing and masking", force=True)

    def finish_one():
        (split, index, docs_sha), stats = window.wait_one()
        name = shard_name(split, index)
        if not result.shared_storage:
            data, stats = stats
            write_atomic(output / name, data)
        entry = {"file": name, "rows": stats["rows"], "tokens": stats["tokens"],
                 "documents": len(plan["shards"][split][index]), "predictions": stats["predictions"],
                 "sha256": stats["sha256"], "documents_sha256": docs_sha}
        write_json_atomic(work / "shards" / f"{name}.json", {**entry, "shard_config": shard_config})
        entries[split][index] = entry
        result.shards_built += 1

    for split in SPLITS:
        for index, docs in enumerate(plan["shards"][split]):
            name = shard_name(split, index)
            docs_sha = _documents_sha256(docs)
            recorded = None
            sidecar = work / "shards" / f"{name}.json"
            if sidecar.is_file():
                recorded = json.loads(sidecar.read_text(encoding="utf-8"))
            if recorded and recorded.pop("shard_config", None) == shard_config \
                    and recorded.get("documents_sha256") == docs_sha and (output / name).is_file() \
                    and file_sha256(output / name) == recorded["sha256"]:
                entries[split][index] = recorded
                result.shards_reused += 1
                continue
            if window is None:
                ray_session.ensure()
                window = _Window(_max_in_flight(config, ray_session), result)
                if result.shared_storage is None:  # every chunk result was reused
                    result.shared_storage = ray_session.shared_storage()
            while window.full():
                finish_one()
            if result.shared_storage:  # the worker reads the documents from the stored chunk results
                refs = [doc[:3] for doc in docs]
                task = _remote(_build_shard_file).remote(split, index, refs, {n: str(paths[n]) for n, *_ in refs},
                                                         str(output.resolve()), shard_config)
            else:
                task = _remote(build_shard).remote(split, index, *_gather(docs, paths, cache), shard_config)
            window.submit(task, (split, index, docs_sha))
    while window is not None and window.pending:
        finish_one()
    # shards of an earlier, larger plan for the same job cannot exist (same job => same plan)
    return entries


def _manifest(manifest_config, inputs, formats, shards, plan, totals, rejects: RejectsReport,
              stages: StageCounts) -> dict:
    splits = {}
    for split in SPLITS:
        entries = shards[split]
        splits[split] = {"shards": entries, "rows": sum(e["rows"] for e in entries),
                         "tokens": sum(e["tokens"] for e in entries),
                         "documents": sum(e["documents"] for e in entries)}
    return {
        "schema_version": SCHEMA_VERSION,
        "config": manifest_config,
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


def summary_table(result: RunResult) -> str:
    """The final report: per split shards/rows/documents/tokens, rejects by reason, speed."""
    m, lines = result.manifest, []
    state = "already complete, verified" if result.up_to_date else \
        f"{result.chunks_processed} chunks processed, {result.chunks_reused} reused; " \
        f"{result.shards_built} shards written, {result.shards_reused} kept"
    if result.shared_storage is not None:
        state += "; workers read and wrote shared storage" if result.shared_storage else "; data sent to the workers"
    lines.append(f"output     {result.output}  ({state})")
    lines.append(f"{'split':<11}{'shards':>8}{'rows':>10}{'documents':>11}{'tokens':>14}")
    for split in SPLITS:
        s = m["splits"][split]
        lines.append(f"{split:<11}{len(s['shards']):>8,}{s['rows']:>10,}{s['documents']:>11,}{s['tokens']:>14,}")
    t = m["totals"]
    lines.append(f"{'total':<11}{'':>8}{t['rows']:>10,}{t['documents']:>11,}{t['tokens']:>14,}"
                 f"   ({t['characters']:,} characters from {t['records']:,} records)")
    if t["rejected"]:
        reasons = ", ".join(f"{r} {n:,}" for r, n in m["rejects"].items())
        lines.append(f"rejected   {t['rejected']:,}: {reasons}  (examples in {result.output / REJECTS_NAME})")
    else:
        lines.append("rejected   0")
    lines.append(f"{'stage':<17}{'documents in':>14}{'out':>11}{'characters in':>16}{'out':>14}")
    for st in m["stages"]:
        lines.append(f"{st['stage']:<17}{st['documents_in']:>14,}{st['documents_out']:>11,}"
                     f"{st['characters_in']:>16,}{st['characters_out']:>14,}")
    if result.seconds and result.characters_processed:
        lines.append(f"time       {result.seconds:.1f} s, {result.characters_processed / result.seconds:,.0f} "
                     f"characters/s segmented end to end")
    else:
        lines.append(f"time       {result.seconds:.1f} s")
    return "\n".join(lines)
