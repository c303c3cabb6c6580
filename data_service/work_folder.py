"""The output folder and its ``_work`` folder: the job's identity, the stored chunk results, the shard records.

``OUTPUT/_work/job.json`` names the job (its output config and inputs, hashed into the job id);
``_work/chunks/`` holds one Arrow file per chunk result, tagged with the job id and the chunk size,
so a rerun reuses exactly the results of the same job and chunking; ``_work/shards/NAME.json``
records what each shard file was built from (its documents, masking options and sha256), so a rerun
keeps exactly the shards that still match. ``manifest.json`` in the output means the job is complete.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
from pyarrow import fs

from lfzh_ds import near_duplicates
from lfzh_ds.atomic_files import TEMPORARY_GLOB, write_atomic, write_json_atomic
from lfzh_ds.errors import ConfigError, UserError
from lfzh_ds.shards import MANIFEST_NAME, SPLITS, file_sha256

from . import readers
from .config import SHARD_CONFIG
from .manifest import REJECTS_NAME

WORK_DIR = "_work"
_CHUNK_META = b"lfzh_ds.chunk"


class JobConflict(UserError):
    """The output folder holds a job with another configuration or other inputs: give another --output."""


# ---------------------------------------------------------------- the output folder

def output_folder(output: str) -> Path:
    """The output folder: a path, or a URI of a filesystem that pyarrow maps to this machine's (``file://``)."""
    if not readers.is_uri(output):
        return Path(output)
    try:
        filesystem, path = fs.FileSystem.from_uri(output)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--output {output}: pyarrow cannot open this URI ({err})") from None
    if not isinstance(filesystem, fs.LocalFileSystem):
        raise ConfigError(f"--output {output}: the output must be a folder on a mounted filesystem (a path or a "
                          f"file:// URI): shards are renamed into place atomically and memory-mapped by training; "
                          f"write it to a local or shared folder and copy it to {type(filesystem).__name__} after")
    return Path(path)


def clear_output(output: Path) -> None:
    """Delete everything a job writes into ``output`` (``--overwrite``)."""
    for pattern in (MANIFEST_NAME, REJECTS_NAME, *(f"{s}-*.arrow" for s in SPLITS), TEMPORARY_GLOB):
        for p in output.glob(pattern):
            p.unlink()
    shutil.rmtree(output / WORK_DIR, ignore_errors=True)


def finished_manifest(output: Path, manifest_config: dict, inputs: list[dict]) -> dict | None:
    """The existing manifest if the output is complete for this exact job and every shard checks out."""
    path = output / MANIFEST_NAME
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("config") != manifest_config or _identity(manifest.get("inputs")) != inputs:
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


def reopen_finished_output(output: Path, work: Path) -> None:
    """A finished output with a bad shard is being redone: its manifest entries become the records
    of the shards written so far, and the manifest goes (its presence means "complete")."""
    path = output / MANIFEST_NAME
    if not path.is_file():
        return
    manifest = json.loads(path.read_text(encoding="utf-8"))
    shard_config = {k: manifest.get("config", {}).get(k) for k in SHARD_CONFIG}
    for split in SPLITS:
        for entry in manifest.get("splits", {}).get(split, {}).get("shards", []):
            if not shard_record_path(work, entry["file"]).is_file():
                write_shard_record(work, entry, shard_config)
    path.unlink()


# ---------------------------------------------------------------- the job's identity

def start_job(work: Path, manifest_config: dict, inputs: list[dict]) -> str:
    """Claim ``work`` for this job and return its id. Another job's results are not thrown away
    silently (``JobConflict``); one that stored none (its Ray never came up) is."""
    job = {"config": manifest_config, "inputs": inputs}
    job_id = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()
    job_file = work / "job.json"
    if job_file.is_file():
        old_job = json.loads(job_file.read_text(encoding="utf-8"))
        if old_job.get("job_id") != job_id and _holds_work(work):
            raise _conflict(work.parent, "an unfinished job", old_job.get("config", {}), manifest_config,
                            old_job.get("inputs"), inputs)
    (work / "chunks").mkdir(parents=True, exist_ok=True)
    (work / "shards").mkdir(parents=True, exist_ok=True)
    write_json_atomic(job_file, {**job, "job_id": job_id})
    return job_id


def _identity(inputs) -> list[dict]:
    """What makes two lists of inputs the same job: each file's path, size and sha256, in order."""
    return [{k: i.get(k) for k in ("path", "bytes", "sha256")} for i in inputs or []]


def _holds_work(work: Path) -> bool:
    """Whether an unfinished job stored any chunk or shard result yet."""
    return any(any((work / part).glob("*")) for part in ("chunks", "shards") if (work / part).is_dir())


def _conflict(output: Path, what: str, old_config: dict, new_config: dict, old_inputs, new_inputs) -> JobConflict:
    diffs = [f"{k}: {old_config.get(k)!r} -> {new_config.get(k)!r}"
             for k in sorted(set(old_config) | set(new_config)) if old_config.get(k) != new_config.get(k)]
    old_inputs = _identity(old_inputs)
    if old_inputs != new_inputs:
        changed = sorted({i["path"] for i in old_inputs} ^ {i["path"] for i in new_inputs}) or \
            [n["path"] for o, n in zip(old_inputs, new_inputs) if o != n] or ["the input order"]
        diffs.append(f"inputs differ: {', '.join(changed[:3])}")
    return JobConflict(f"{output} already holds {what} made with other settings or inputs "
                       f"({'; '.join(diffs[:6])}); use another --output, or pass --overwrite to delete it and "
                       f"start again")


# ---------------------------------------------------------------- stored chunk results and shard records

def chunk_path(work: Path, key) -> Path:
    return work / "chunks" / f"f{key[0]:05d}-c{key[1]:06d}.arrow"


def shard_record_path(work: Path, name: str) -> Path:
    return work / "shards" / f"{name}.json"


def write_shard_record(work: Path, entry: dict, shard_config: dict) -> None:
    """What a rerun checks before it keeps a written shard: its manifest entry and the options it was built with."""
    write_json_atomic(shard_record_path(work, entry["file"]), {**entry, "shard_config": shard_config})


def store_chunk_result(out: dict, path: Path, job_id: str, chunk_bytes: int, key, input_path: str) -> dict:
    """Write a chunk's result (``process.process_chunk``'s) as an Arrow file; returns its documents,
    characters and tokens (for the progress line)."""
    lengths = out["token_lengths"]
    offsets = pa.array(np.concatenate(([0], np.cumsum(lengths))).astype(np.int64))
    meta = {"job": job_id, "key": list(key), "chunk_bytes": chunk_bytes, "path": input_path,
            "records": out["records"], "rejects": out["rejects"], "stages": out["stages"]}
    columns = {
        "line": out["line"], "offset": out["offset"], "chars": out["chars"],
        "hash": pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(lengths),
                                                     [None, pa.py_buffer(out["hashes"].tobytes())]),
        "tokens": pa.LargeListArray.from_arrays(offsets, pa.array(out["tokens"], pa.uint16())),
        "word_starts": pa.LargeListArray.from_arrays(offsets, pa.array(out["word_starts"], pa.uint8())),
    }
    if "bands" in out:  # near dedup: the LSH keys and the cleaned text (for the exact Jaccard check)
        columns["bands"] = pa.FixedSizeListArray.from_arrays(pa.array(out["bands"].reshape(-1), pa.uint64()),
                                                             near_duplicates.NUM_BANDS)
        columns["text"] = pa.array(out["texts"], pa.large_string())
    table = pa.table(columns).replace_schema_metadata({_CHUNK_META: json.dumps(meta)})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    write_atomic(path, sink.getvalue().to_pybytes())
    return {"docs": len(out["chars"]), "chars": int(out["chars"].sum()), "tokens": int(lengths.sum())}


class ChunkFile:
    """A stored chunk result, memory-mapped."""

    def __init__(self, path: Path):
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        self.table = reader.read_all()
        self.meta = json.loads(self.table.schema.metadata[_CHUNK_META])
        tokens = self.table.column("tokens").combine_chunks()
        self.token_offsets = tokens.offsets.to_numpy()
        self.tokens = tokens.values.to_numpy()
        self.word_starts = self.table.column("word_starts").combine_chunks().values.to_numpy()

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


def cached_chunk(cache: OrderedDict, number: int, paths, size: int = 4) -> ChunkFile:
    """Chunk ``number`` of the plan (stored at ``paths[number]``), from a cache of the last ``size`` opened."""
    if number not in cache:
        cache[number] = ChunkFile(Path(paths[number]))
        while len(cache) > size:
            cache.popitem(last=False)
    return cache[number]


def load_chunk(path: Path, job_id: str, chunk_bytes: int) -> ChunkFile | None:
    """The stored result if it is readable and belongs to this job and chunking, else None (it is redone)."""
    if not path.is_file():
        return None
    try:
        chunk = ChunkFile(path)
    except (OSError, pa.ArrowInvalid, KeyError, ValueError, TypeError):
        return None
    return chunk if chunk.meta.get("job") == job_id and chunk.meta.get("chunk_bytes") == chunk_bytes else None


def gather(docs, paths, cache: OrderedDict):
    """Concatenated tokens/word starts and lengths of a shard's documents ``(chunk number, row, tokens, ...)``,
    from the stored chunks (chunk ``number`` at ``paths[number]``)."""
    tokens, starts, lengths = [], [], []
    for number, row, n, *_ in docs:
        chunk = cached_chunk(cache, number, paths)
        a, b = chunk.token_offsets[row], chunk.token_offsets[row + 1]
        tokens.append(chunk.tokens[a:b])
        starts.append(chunk.word_starts[a:b])
        lengths.append(n)
    return np.concatenate(tokens), np.concatenate(starts), np.array(lengths, dtype=np.int64)
