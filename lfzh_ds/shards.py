"""The shard format written by ``data_service`` and the training-side reader over it.

A dataset folder holds ``manifest.json``, ``rejects.json`` and Arrow IPC *file* shards
(uncompressed, one record batch each, so they can be memory-mapped), named
``{split}-{index:05d}.arrow``. One row is one packed sequence of exactly ``seq_len`` tokens:

| column | Arrow type | meaning |
| --- | --- | --- |
| ``input_ids`` | fixed_size_list<uint16>[seq_len] | original ids: ``[CLS] doc [SEP] doc ... [SEP]``, then ``[PAD]`` |
| ``word_starts`` | fixed_size_list<uint8>[seq_len] | 1 where a token begins a (jieba) word, 0 where it continues one |
| ``num_tokens`` | uint16 | tokens before the padding (the attention mask is 1 there) |
| ``masked_positions`` | list<list<uint16>> | per static copy (``dupe_factor`` of them): the predicted positions |
| ``masked_ids`` | list<list<uint16>> | per static copy: the ids placed at those positions |

Labels are the original ``input_ids`` at ``masked_positions``. The manifest (schema version,
the full config, vocab md5, jieba dictionary id, per shard file/rows/tokens/documents/sha256,
totals) is described in ``data_service.manifest``.
"""
from __future__ import annotations

import bisect
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from .constants import SCHEMA_VERSION, VOCAB_MD5
from .errors import ConfigError, ShardError
from .masking import apply_mask, mask_rng, whole_word_mask

MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "validation")
SPLIT_KEYS = {"train": 0, "validation": 1}  # mixed into static mask seeds
MAX_SEQ_LEN = np.iinfo(np.uint16).max


# Dynamic masking's units. "mixed" masks a sequence by characters with this probability, else by whole words: whole
# words alone never show the model a lone [MASK] between characters of its own word (what a fill-in-the-blank asks),
# characters alone never a word masked whole (what the upstream's validation masks are); measured in the README.
MASK_UNITS = ("word", "character", "mixed")
MIXED_CHARACTER_SHARE = 0.5


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.arrow"


def shard_schema(seq_len: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("input_ids", pa.list_(pa.uint16(), seq_len), nullable=False),
            pa.field("word_starts", pa.list_(pa.uint8(), seq_len), nullable=False),
            pa.field("num_tokens", pa.uint16(), nullable=False),
            pa.field("masked_positions", pa.list_(pa.list_(pa.uint16())), nullable=False),
            pa.field("masked_ids", pa.list_(pa.list_(pa.uint16())), nullable=False),
        ],
        metadata={"lfzh_ds.schema_version": str(SCHEMA_VERSION), "lfzh_ds.seq_len": str(seq_len)},
    )


def _nested_uint16(per_row_copies: list[list[np.ndarray]]) -> pa.Array:
    inner_lengths = [len(a) for copies in per_row_copies for a in copies]
    values = (np.concatenate([a for copies in per_row_copies for a in copies]).astype(np.uint16)
              if inner_lengths else np.zeros(0, np.uint16))
    inner_offsets = np.concatenate(([0], np.cumsum(inner_lengths))).astype(np.int32)
    outer_offsets = np.concatenate(([0], np.cumsum([len(c) for c in per_row_copies]))).astype(np.int32)
    inner = pa.ListArray.from_arrays(pa.array(inner_offsets), pa.array(values, pa.uint16()))
    return pa.ListArray.from_arrays(pa.array(outer_offsets), inner)


def encode_shard(input_ids: np.ndarray, word_starts: np.ndarray, num_tokens: np.ndarray,
                 masked_positions: list[list[np.ndarray]], masked_ids: list[list[np.ndarray]]) -> bytes:
    """The exact bytes of one shard file (deterministic for the same arrays)."""
    rows, seq_len = input_ids.shape
    schema = shard_schema(seq_len)
    batch = pa.record_batch(
        [
            pa.FixedSizeListArray.from_arrays(pa.array(input_ids.reshape(-1).astype(np.uint16)), seq_len),
            pa.FixedSizeListArray.from_arrays(pa.array(word_starts.reshape(-1).astype(np.uint8)), seq_len),
            pa.array(num_tokens.astype(np.uint16), pa.uint16()),
            _nested_uint16(masked_positions),
            _nested_uint16(masked_ids),
        ],
        schema=schema,
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class _OpenShard:
    """Zero-copy numpy views over one memory-mapped shard."""

    def __init__(self, path: Path, seq_len: int, expected_rows: int):
        try:
            source = pa.memory_map(str(path), "r")
            reader = pa.ipc.open_file(source)
            if reader.num_record_batches != 1:
                raise ValueError(f"{reader.num_record_batches} record batches, expected 1")
            batch = reader.get_batch(0)
        except (OSError, pa.ArrowInvalid, ValueError) as err:
            raise ShardError(f"shard {path} cannot be read as an Arrow IPC file ({err}); "
                             f"rerun the preprocess command to rebuild it") from err
        meta = batch.schema.metadata or {}
        version = meta.get(b"lfzh_ds.schema_version", b"?").decode()
        if version != str(SCHEMA_VERSION) or batch.num_rows != expected_rows or \
                batch.schema.field("input_ids").type.list_size != seq_len:
            raise ShardError(f"shard {path} has schema version {version}, {batch.num_rows} rows and "
                             f"seq_len {batch.schema.field('input_ids').type.list_size}; the manifest expects "
                             f"version {SCHEMA_VERSION}, {expected_rows} rows, seq_len {seq_len}")
        self.rows = batch.num_rows
        self.input_ids = batch.column("input_ids").flatten().to_numpy().reshape(self.rows, seq_len)
        self.word_starts = batch.column("word_starts").flatten().to_numpy().reshape(self.rows, seq_len)
        self.num_tokens = batch.column("num_tokens").to_numpy()
        self._positions = _NestedView(batch.column("masked_positions"))
        self._ids = _NestedView(batch.column("masked_ids"))

    def static_mask(self, row: int, copy: int):
        return self._positions.get(row, copy), self._ids.get(row, copy)


class _NestedView:
    """Index into list<list<uint16>> without materialising Python objects."""

    def __init__(self, array: pa.ListArray):
        self.outer = array.offsets.to_numpy()
        inner = array.flatten()
        self.inner = inner.offsets.to_numpy()
        self.values = inner.flatten().to_numpy()

    def get(self, row: int, copy: int) -> np.ndarray:
        j = self.outer[row] + copy
        if j >= self.outer[row + 1]:
            raise IndexError(f"row {row} has no static mask copy {copy}")
        return self.values[self.inner[j]:self.inner[j + 1]]


def read_manifest(data_dir) -> dict:
    path = Path(data_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShardError(f"no {MANIFEST_NAME} in {data_dir}; run `lfzh-preprocess --output {data_dir} ...` "
                         f"first (or finish an interrupted run by rerunning the same command)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardError(f"{path} is not valid JSON ({err}); rerun the preprocess command") from err
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(f"{path} has schema version {manifest.get('schema_version')}, this code reads "
                         f"version {SCHEMA_VERSION}; preprocess the corpus again with this version")
    if manifest.get("vocab_md5") != VOCAB_MD5:
        raise ShardError(f"{path} was made with a vocab of md5 {manifest.get('vocab_md5')}, this package's vocab "
                         f"is {VOCAB_MD5}; preprocess the corpus again with this package")
    return manifest


class ShardDataset:
    """Map-style dataset over the shards of one split.

    ``masking="static"``: every stored masked copy is a sample, ``len = rows * dupe_factor``
    (index ``i`` is copy ``i // rows`` of row ``i % rows``). ``masking="dynamic"``: every sequence
    once, ``len = rows``, re-masked with the manifest's masking config from
    ``(seed, epoch, index)`` only (call ``set_epoch``).

    ``ds[i]`` is a dict of int64 torch tensors ``input_ids``, ``attention_mask``, ``labels``
    (``-100`` where nothing is predicted), each of length ``seq_len``.
    """

    def __init__(self, data_dir, split: str = "train", masking: str = "static", seed: int = 0,
                 verify: bool = True, mask_prob: float | None = None, max_predictions: int | None = None,
                 mask_unit: str | None = None):
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
        if masking not in ("static", "dynamic"):
            raise ConfigError(f"masking must be 'static' or 'dynamic', got {masking!r}")
        if (mask_prob is not None or max_predictions is not None or mask_unit is not None) and masking != "dynamic":
            raise ConfigError("mask_prob, max_predictions and mask_unit choose the masks at training time: they need "
                              "masking='dynamic' (static masks were fixed by the data service)")
        if mask_unit not in (None, *MASK_UNITS):
            raise ConfigError(f"mask_unit must be one of {', '.join(MASK_UNITS)}, got {mask_unit!r}")
        if mask_prob is not None and not 0.0 < mask_prob < 1.0:
            raise ConfigError(f"mask_prob must be between 0 and 1, got {mask_prob}")
        self.data_dir = Path(data_dir)
        self.split, self.masking, self.seed, self.epoch = split, masking, int(seed), 0
        self.manifest = read_manifest(self.data_dir)
        self.config = self.manifest["config"]
        self.seq_len = int(self.config["seq_len"])
        self.dupe_factor = int(self.config["dupe_factor"])
        # dynamic masking's rule: the manifest's, or a rate chosen at training time (then no cap by default)
        self.mask_prob = self.config.get("mask_prob") if mask_prob is None else float(mask_prob)
        if max_predictions is None:
            max_predictions = self.seq_len if mask_prob is not None else self.config.get("max_predictions")
        self.max_predictions = max_predictions
        # whole words up to the shards' word length (the upstream's rule), every character on its own, or a draw
        # between the two for each sequence ("mixed")
        self.mask_unit = mask_unit or "word"
        self.max_word_len = 1 if mask_unit == "character" else self.config.get("wwm_max_word_len")
        self.shards = list(self.manifest["splits"][split]["shards"])
        for entry in self.shards:
            path = self.data_dir / entry["file"]
            if not path.is_file():
                raise ShardError(f"shard {path} listed in {self.data_dir / MANIFEST_NAME} is missing; "
                                 f"rerun the preprocess command to rebuild it")
            if verify:
                actual = file_sha256(path)
                if actual != entry["sha256"]:
                    raise ShardError(f"shard {path} is corrupt: sha256 {actual} but the manifest says "
                                     f"{entry['sha256']}; rerun the preprocess command to rebuild it")
        self._row_ends = list(np.cumsum([e["rows"] for e in self.shards]))
        self.num_rows = int(self._row_ends[-1]) if self.shards else 0
        self._open: dict[int, _OpenShard] = {}

    def __getstate__(self):  # memory maps are reopened in each DataLoader worker
        state = dict(self.__dict__)
        state["_open"] = {}
        return state

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_rows * (self.dupe_factor if self.masking == "static" else 1)

    def _locate(self, row: int):
        k = bisect.bisect_right(self._row_ends, row)
        start = self._row_ends[k - 1] if k else 0
        if k not in self._open:
            entry = self.shards[k]
            self._open[k] = _OpenShard(self.data_dir / entry["file"], self.seq_len, entry["rows"])
        return self._open[k], row - start

    def sequence(self, row: int):
        """(input_ids, word_starts, num_tokens) of one packed sequence, unmasked."""
        shard, local = self._locate(row)
        return shard.input_ids[local], shard.word_starts[local], int(shard.num_tokens[local])

    def __getitem__(self, index: int):
        import torch

        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        if self.masking == "static":
            copy, row = divmod(index, self.num_rows)
            shard, local = self._locate(row)
            ids = shard.input_ids[local]
            positions, replacement = shard.static_mask(local, copy)
        else:
            row = index
            shard, local = self._locate(row)
            ids = shard.input_ids[local]
            rng = mask_rng(self.seed, self.epoch, index)
            max_word_len = self.max_word_len
            if self.mask_unit == "mixed" and rng.random() < MIXED_CHARACTER_SHARE:
                max_word_len = 1
            positions, replacement = whole_word_mask(
                ids, shard.word_starts[local], rng, mask_prob=self.mask_prob, max_predictions=self.max_predictions,
                max_word_len=max_word_len)
        masked, labels = apply_mask(ids, positions, replacement)
        attention = np.zeros(self.seq_len, dtype=np.int64)
        attention[: int(shard.num_tokens[local])] = 1
        return {"input_ids": torch.from_numpy(masked), "attention_mask": torch.from_numpy(attention),
                "labels": torch.from_numpy(labels)}
