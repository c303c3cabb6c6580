"""The preprocessing job on Ray: corpus files in, Arrow shards + manifest + rejects report out.

In-process use::

    from data_service.config import PipelineConfig
    from data_service.pipeline import run
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
1. driver: list the inputs (folders and globs expanded), hash them, detect formats, cut them into
   chunks (byte ranges ending on a record boundary); with shared storage it sends each worker a
   byte range (the bytes of a compressed input, which cannot be read from the middle), otherwise
   the chunk's bytes;
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

This file is the driver: ``run`` and the stages in the order they run, with the functions the
workers run for them. Beside it: ``config.py`` (the job's options), ``plan.py`` (inputs, dedup,
split, shard plan), ``work_folder.py`` (job identity, stored chunk results, shard records),
``manifest.py`` (the manifest and rejects report), ``ray_session.py`` (starting or joining Ray,
tasks in flight).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import sys
import time
from collections import OrderedDict
from pathlib import Path

from lfzh_ds import near_duplicates
from lfzh_ds.atomic_files import TEMPORARY_GLOB, write_atomic, write_json_atomic
from lfzh_ds.shards import MANIFEST_NAME, SPLITS, file_sha256, shard_name

from . import readers
from .config import PipelineConfig
from .manifest import REJECTS_NAME, RejectsReport, build_manifest
from .pack import build_shard
from .plan import Plan, documents_sha256, empty_validation_warning, input_files, input_formats, plan_shards
from .process import DocumentOptions, process_chunk
from .ray_session import RaySession, SharedStorageError, TaskWindow, remote
from .work_folder import (WORK_DIR, cached_chunk, chunk_path, clear_output, finished_manifest, gather, load_chunk,
                          output_folder, reopen_finished_output, shard_record_path, start_job, store_chunk_result,
                          write_shard_record)


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


@dataclasses.dataclass
class _Job:
    """What the stages of one run share."""

    config: PipelineConfig
    output: Path
    work: Path
    job_id: str
    files: list[str]
    formats: list[str]
    progress: Progress
    result: RunResult
    ray: RaySession

    def window(self) -> TaskWindow:
        """A new window of Ray tasks (Ray is started or joined on the first one, which also settles
        ``result.shared_storage``)."""
        self.ray.ensure()
        window = TaskWindow(self.ray.max_in_flight(), self.result)
        if self.result.shared_storage is None:
            self.result.shared_storage = self.ray.shared_storage()
        return window


def run(config: PipelineConfig) -> RunResult:
    """Run (or finish, or verify) the preprocessing job described by ``config``."""
    config.validate()
    t0 = time.monotonic()
    files, inputs = input_files(config)  # before the output folder exists: a missing input leaves nothing behind
    output = output_folder(config.output)
    if config.overwrite and output.exists():
        clear_output(output)
    output.mkdir(parents=True, exist_ok=True)
    work = output / WORK_DIR
    for stale in output.glob(TEMPORARY_GLOB):
        stale.unlink()

    manifest_config = config.output_config()
    done = finished_manifest(output, manifest_config, inputs)
    if done is not None:
        if not config.keep_work:
            shutil.rmtree(work, ignore_errors=True)
        rejects = json.loads((output / REJECTS_NAME).read_text(encoding="utf-8"))
        return RunResult(output, done, rejects, up_to_date=True, seconds=time.monotonic() - t0)
    job_id = start_job(work, manifest_config, inputs)
    reopen_finished_output(output, work)

    rejects = RejectsReport()
    formats = input_formats(config, files, inputs, rejects)
    job = _Job(config, output, work, job_id, files, formats, Progress(config.progress), RunResult(output, {}, {}),
               RaySession(config))
    try:
        keys = _process_all_chunks(job)
        plan = plan_shards(config, keys, work, rejects, _pair_similarities_on_workers(job))
        shards = _build_all_shards(job, plan)
    finally:
        job.progress.close()
        job.ray.close()
    warning = empty_validation_warning(config, plan)
    if warning:
        print(f"[preprocess] warning: {warning}", file=sys.stderr)

    manifest = build_manifest(manifest_config, inputs, formats, shards, plan.totals, rejects, plan.stages)
    rejects_json = rejects.to_json()
    write_json_atomic(output / REJECTS_NAME, rejects_json)
    write_json_atomic(output / MANIFEST_NAME, manifest)
    if not config.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    result = job.result
    result.manifest, result.rejects = manifest, rejects_json
    result.seconds = time.monotonic() - t0
    return result


# ---------------------------------------------------------------- stage 2: chunks

def _process_all_chunks(job: _Job) -> list:
    """Stage 2 for every chunk not already stored; returns the chunk keys in input order."""
    config, result, work = job.config, job.result, job.work
    options = config.document_options()
    keys = []
    window = None
    job.progress.show("segmenting", force=True)

    def finish_one():
        (key, path), out = window.wait_one()
        counts = out if result.shared_storage else \
            store_chunk_result(out, chunk_path(work, key), job.job_id, config.chunk_bytes, key, path)
        result.chunks_processed += 1
        result.characters_processed += counts["chars"]
        job.progress.add(counts["docs"], counts["chars"], counts["tokens"])

    for file_index, (path, fmt) in enumerate(zip(job.files, job.formats)):
        if fmt == "empty":
            continue
        ranges_only = None  # with shared storage the workers read an uncompressed input's byte ranges themselves
        for k, chunk in enumerate(readers.iter_chunks(path, file_index, fmt, config.field, config.text_docs,
                                                      config.chunk_bytes)):
            key = (file_index, k)
            keys.append(key)
            if load_chunk(chunk_path(work, key), job.job_id, config.chunk_bytes) is not None:
                result.chunks_reused += 1
                continue
            if window is None:
                window = job.window()
            while window.full():
                finish_one()
            if not result.shared_storage:
                window.submit(remote(process_chunk).remote(chunk, options), (key, path))
                continue
            if ranges_only is None:
                ranges_only = not readers.is_compressed(path)
            target = chunk_path(work.resolve(), key)
            window.submit(remote(_process_and_store).remote(
                dataclasses.replace(chunk, data=None) if ranges_only else chunk, options, str(target), job.job_id,
                config.chunk_bytes, key), (key, path))
    while window is not None and window.pending:
        finish_one()
    return keys


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
        return store_chunk_result(out, Path(path), job_id, chunk_bytes, key, chunk.path)
    except OSError as err:
        raise SharedStorageError(f"a worker on {socket.gethostname()} cannot write {path} ({err}); with shared "
                                 f"storage every node must see the output folder at the same path; pass "
                                 f"--shared-storage off to write it from this machine only") from None


# ---------------------------------------------------------------- stage 3: near dedup on the workers

def _pair_similarities_on_workers(job: _Job):
    """With shared storage (and Ray up), a ``similarities`` for ``plan_shards`` that spreads the candidate
    pairs' exact Jaccard over the workers in batches of consecutive pairs; otherwise None (the driver does it)."""
    if not job.result.shared_storage or job.config.near_dedup_config() is None:
        return None

    def similarities(refs, paths):
        window, scores = job.window(), [None] * len(refs)

        def finish_one():
            start, batch = window.wait_one()
            scores[start:start + len(batch)] = batch

        step = max(256, -(-len(refs) // window.limit))
        for start in range(0, len(refs), step):
            batch = refs[start:start + step]
            while window.full():
                finish_one()
            needed = {number: paths[number] for pair in batch for number, _ in pair}
            window.submit(remote(_jaccard_of_pairs).remote(batch, needed), start)
        while window.pending:
            finish_one()
        return scores

    return similarities


def _jaccard_of_pairs(refs, paths) -> list[float]:
    """Exact Jaccard of candidate pairs ``((chunk number, row), (chunk number, row))``, on a worker that
    sees the stored chunk results (chunk ``number`` at ``paths[number]``)."""
    cache, sets = OrderedDict(), {}

    def shingle_set(ref):
        if ref not in sets:
            sets[ref] = near_duplicates.shingles(cached_chunk(cache, ref[0], paths, 64).text(ref[1]))
        return sets[ref]

    return [near_duplicates.jaccard(shingle_set(a), shingle_set(b)) for a, b in refs]


# ---------------------------------------------------------------- stage 4: shards

def _build_all_shards(job: _Job, plan: Plan) -> dict:
    """Stage 4 for every shard that is missing or does not match what was recorded when it was written
    (its documents, its masking options and its sha256). Returns each split's manifest entries."""
    output, work, result = job.output, job.work, job.result
    shard_config = job.config.shard_config()
    entries = {s: [None] * len(plan.shards[s]) for s in SPLITS}
    window, cache = None, OrderedDict()
    paths = [chunk_path(work.resolve(), key) for key in plan.keys]
    job.progress.show("packing and masking", force=True)

    def finish_one():
        (split, index, docs_sha), built = window.wait_one()
        if result.shared_storage:  # the worker wrote the shard and its record
            entry = built
        else:
            data, stats = built
            entry = write_shard_and_record(output, work, split, index, data, stats,
                                           len(plan.shards[split][index]), docs_sha, shard_config)
        entries[split][index] = entry
        result.shards_built += 1

    for split in SPLITS:
        for index, docs in enumerate(plan.shards[split]):
            name = shard_name(split, index)
            docs_sha = documents_sha256(docs)
            recorded = None
            record = shard_record_path(work, name)
            if record.is_file():
                recorded = json.loads(record.read_text(encoding="utf-8"))
            if recorded and recorded.pop("shard_config", None) == shard_config \
                    and recorded.get("documents_sha256") == docs_sha and (output / name).is_file() \
                    and file_sha256(output / name) == recorded["sha256"]:
                entries[split][index] = recorded
                result.shards_reused += 1
                continue
            if window is None:
                window = job.window()  # settles shared storage if every chunk result was reused
            while window.full():
                finish_one()
            if result.shared_storage:  # the worker reads the documents from the stored chunk results
                refs = [doc[:3] for doc in docs]
                task = remote(_build_shard_file).remote(split, index, refs, {n: str(paths[n]) for n, *_ in refs},
                                                        str(output.resolve()), str(work.resolve()), docs_sha,
                                                        shard_config)
            else:
                task = remote(build_shard).remote(split, index, *gather(docs, paths, cache), shard_config)
            window.submit(task, (split, index, docs_sha))
    while window is not None and window.pending:
        finish_one()
    # shards of an earlier, larger plan for the same job cannot exist (same job => same plan)
    return entries


def write_shard_and_record(output: Path, work: Path, split: str, index: int, data: bytes, stats: dict,
                           documents: int, docs_sha: str, shard_config: dict) -> dict:
    """Write a shard, then the record a rerun checks before it keeps the shard (a shard without one is rebuilt).
    Returns the shard's manifest entry."""
    name = shard_name(split, index)
    write_atomic(output / name, data)
    entry = {"file": name, "rows": stats["rows"], "tokens": stats["tokens"], "documents": documents,
             "predictions": stats["predictions"], "sha256": stats["sha256"], "documents_sha256": docs_sha}
    write_shard_record(work, entry, shard_config)
    return entry


def _build_shard_file(split: str, index: int, docs, chunk_paths: dict, output: str, work: str, docs_sha: str,
                      shard_config: dict) -> dict:
    """Stage 4 on a worker that sees the output: gather the shard's documents from the stored chunk
    results, pack and mask them, write the shard and its record (here, not on the driver: a job killed while
    the driver waits on other tasks keeps every shard already written). Returns its manifest entry."""
    tokens, starts, lengths = gather(docs, chunk_paths, OrderedDict())
    data, stats = build_shard(split, index, tokens, starts, lengths, shard_config)
    return write_shard_and_record(Path(output), Path(work), split, index, data, stats, len(docs), docs_sha,
                                  shard_config)


# ---------------------------------------------------------------- the report

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
