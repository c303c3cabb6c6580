"""The options of one preprocessing job (``lfzh-preprocess --help``): those that change its output,
which go into the manifest and make the job's identity, and those that only change how it runs."""
from __future__ import annotations

import dataclasses

from lfzh_ds import near_duplicates
from lfzh_ds.constants import DEFAULT_SEQ_LEN
from lfzh_ds.errors import ConfigError
from lfzh_ds.shards import MAX_SEQ_LEN

from . import readers
from .clean import CleanOptions
from .filters import FilterOptions
from .process import DocumentOptions

# the options a shard's bytes depend on besides its documents; part of a written shard's record
SHARD_CONFIG = ("seq_len", "dupe_factor", "seed", "mask_prob", "max_predictions", "wwm_max_word_len")


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
            raise ConfigError("no --input given")
        if not self.output:
            raise ConfigError("no --output given")
        if self.format not in readers.FORMATS:
            raise ConfigError(f"--format must be one of {readers.FORMATS}, got {self.format!r}")
        if self.text_docs not in readers.TEXT_DOCS:
            raise ConfigError(f"--text-docs must be one of {readers.TEXT_DOCS}, got {self.text_docs!r}")
        if not 8 <= self.seq_len <= MAX_SEQ_LEN:
            raise ConfigError(f"--seq-len must be between 8 and {MAX_SEQ_LEN} (ids are stored as uint16), got {self.seq_len}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError(f"--mask-prob must be in (0, 1), got {self.mask_prob}")
        if self.max_predictions < 1 or self.dupe_factor < 1 or self.rows_per_shard < 1:
            raise ConfigError("--max-predictions, --dupe-factor and --rows-per-shard must be at least 1")
        if self.wwm_max_word_len is not None and self.wwm_max_word_len < 1:
            raise ConfigError(f"--wwm-max-word-len must be at least 1, got {self.wwm_max_word_len}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 < self.near_dedup_threshold <= 1.0:
            raise ConfigError(f"--near-dedup-threshold must be in (0, 1], got {self.near_dedup_threshold}")
        for name, value in dataclasses.asdict(self.filters).items():
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1], got {value}")
        if self.num_workers is not None and self.num_workers < 1:
            raise ConfigError(f"--num-workers must be at least 1, got {self.num_workers}")

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

    def document_options(self) -> DocumentOptions:
        """What a worker needs to turn a chunk's records into documents."""
        return DocumentOptions(min_chars=self.min_chars, max_chars=self.max_chars, clean=self.clean,
                               filters=self.filters, near_dedup=self.near_dedup_config() is not None)

    def shard_config(self) -> dict:
        """The options (``SHARD_CONFIG``) that a shard's bytes depend on besides its documents."""
        return {k: getattr(self, k) for k in SHARD_CONFIG}
