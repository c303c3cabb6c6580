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

This file is the driver: ``run`` and the stages in the order they run, each one the task loop
(``tasks.run_tasks``) over the work a rerun does not find stored. Beside it: ``config.py`` (the job's
options), ``plan.py`` (inputs, dedup, split, shard plan), ``storage.py`` (the storage mode: the task
each stage submits and who stores its answer, and the functions the workers run with shared
storage), ``work_folder.py`` (job identity, stored chunk results, shard records), ``manifest.py``
(the manifest and rejects report), ``ray_session.py`` (starting or joining Ray, tasks in flight).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from lfzh_ds.atomic_files import TEMPORARY_GLOB, write_json_atomic
from lfzh_ds.shards import MANIFEST_NAME, SPLITS, file_sha256

from . import readers
from .config import PipelineConfig
from .manifest import REJECTS_NAME, RejectsReport, build_manifest
from .plan import Plan, PlannedShard, empty_validation_warning, input_files, input_formats, plan_shards
from .ray_session import RaySession, TaskWindow
from .storage import StorageMode, storage_mode
from .tasks import run_tasks
from .work_folder import (
    WORK_DIR,
    chunk_path,
    clear_output,
    finished_manifest,
    load_chunk,
    output_folder,
    reopen_finished_output,
    shard_record_path,
    start_job,
)


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
    storage: StorageMode | None = None  # SharedStorage or DriverStorage, chosen once, when Ray starts

    def run_tasks(self, todo, make_task, finish) -> None:
        """``tasks.run_tasks`` on this job's Ray (``make_task`` may use ``self.storage``: it is set by then)."""
        run_tasks(todo, self._window, make_task, finish)

    def _window(self) -> TaskWindow:
        """A window of Ray tasks for one stage. The first one starts (or joins) Ray and chooses the storage mode."""
        self.ray.ensure()
        if self.storage is None:
            self.storage = storage_mode(self.ray.shared_storage(), self.config, self.output, self.work, self.job_id)
            self.result.shared_storage = self.storage.shared
        return TaskWindow(self.ray.max_in_flight(), self.result)


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
    config, result = job.config, job.result
    keys = []
    job.progress.show("segmenting", force=True)

    def chunks_to_process():
        for file_index, (path, fmt) in enumerate(zip(job.files, job.formats)):
            if fmt == "empty":
                continue
            for k, chunk in enumerate(readers.iter_chunks(path, file_index, fmt, config.field, config.text_docs,
                                                          config.chunk_bytes)):
                key = (file_index, k)
                keys.append(key)
                if load_chunk(chunk_path(job.work, key), job.job_id, config.chunk_bytes) is not None:
                    result.chunks_reused += 1
                    continue
                yield key, chunk

    def finish(task_key, answer):
        counts = job.storage.chunk_finished(task_key, answer)
        result.chunks_processed += 1
        result.characters_processed += counts.characters
        job.progress.add(counts.documents, counts.characters, counts.tokens)

    job.run_tasks(chunks_to_process(), lambda item: job.storage.chunk_task(*item), finish)
    return keys


# ---------------------------------------------------------------- stage 3: near dedup on the workers

def _pair_similarities_on_workers(job: _Job):
    """With shared storage (and Ray up), a ``similarities`` for ``plan_shards`` that spreads the candidate
    pairs' exact Jaccard over the workers in batches of consecutive pairs; otherwise None (the driver does it)."""
    if job.storage is None or not job.storage.shared or job.config.near_dedup_config() is None:
        return None

    def similarities(refs, paths):
        scores = [None] * len(refs)
        step = max(256, -(-len(refs) // job.ray.max_in_flight()))
        batches = ((start, refs[start:start + step]) for start in range(0, len(refs), step))

        def finish(start, batch_scores):
            scores[start:start + len(batch_scores)] = batch_scores

        job.run_tasks(batches, lambda batch: job.storage.pairs_task(*batch, paths), finish)
        return scores

    return similarities


# ---------------------------------------------------------------- stage 4: shards

def _build_all_shards(job: _Job, plan: Plan) -> dict:
    """Stage 4 for every shard that is missing or does not match what was recorded when it was written
    (its documents, its masking options and its sha256). Returns each split's manifest entries."""
    shard_config = job.config.shard_config()
    entries = {s: [None] * len(plan.shards[s]) for s in SPLITS}
    chunk_paths = [chunk_path(job.work.resolve(), key) for key in plan.keys]
    job.progress.show("packing and masking", force=True)

    def shards_to_build():
        for split in SPLITS:
            for shard in plan.shards[split]:
                recorded = _kept_shard(job, shard, shard_config)
                if recorded is not None:
                    entries[split][shard.index] = recorded
                    job.result.shards_reused += 1
                    continue
                yield shard

    def finish(shard: PlannedShard, answer):
        entries[shard.split][shard.index] = job.storage.shard_finished(shard, answer)
        job.result.shards_built += 1

    job.run_tasks(shards_to_build(), lambda shard: job.storage.shard_task(shard, chunk_paths), finish)
    # shards of an earlier, larger plan for the same job cannot exist (same job => same plan)
    return entries


def _kept_shard(job: _Job, shard: PlannedShard, shard_config: dict) -> dict | None:
    """The manifest entry of a shard file a rerun keeps: its record says it was built from these documents with
    these options, and the file still has the sha256 recorded. None: the shard is (re)built."""
    record = shard_record_path(job.work, shard.name)
    if not record.is_file():
        return None
    recorded = json.loads(record.read_text(encoding="utf-8"))
    if recorded.pop("shard_config", None) == shard_config and recorded.get("documents_sha256") == \
            shard.documents_sha256 and (job.output / shard.name).is_file() \
            and file_sha256(job.output / shard.name) == recorded["sha256"]:
        return recorded
    return None


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
