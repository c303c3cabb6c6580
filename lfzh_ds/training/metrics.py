"""The metrics record of a run: one JSON line per optimizer step and per evaluation in ``RUN_DIR/metrics.jsonl``
(written with TensorBoard events), read back by ``read_metrics``; the step's throughput.

What the lines draw is in ``curves`` (each objective supplies its ``CurveSpec``), the FLOPs and MFU in ``flops``, the
console line in each objective (``Objective.console_line``). Only rank 0 writes. A training line::

    {"kind": "train", "step": 12, "loss": 9.81, "bpc": 14.15, "lr": 3e-05, "loss_scale": 65536.0,
     "skipped_steps": 0, "tokens": 98304, "samples": 96, "tokens_per_second": 5120.3, "padding_efficiency": 0.97,
     "tflops_per_second": 41.3, "mfu": 0.079, "wall_time": 1764080000.1, "elapsed_seconds": 19.2}

``tokens`` and ``samples`` are cumulative (non-padding tokens and sequences the model has trained on),
``wall_time`` is the Unix time. ``tokens_per_second`` (non-padding tokens of all processes), ``padding_efficiency``
(the step's non-padding share of its positions), ``tflops_per_second`` (model FLOPs of all processes, counted by
``flops.ModelFlops``) and ``mfu`` (``tflops_per_second`` over the peak of all processes; null without a known peak) are
the step's own, from its start to the end of its optimizer step. A validation line: ``{"kind": "val", "step": 12, "val_loss": ..., "val_bpc": ...,
"val_masked_tokens": ..., "val_sequences": ..., "wall_time": ...}``. When a run resumes, lines past the checkpoint
it resumes from (written by the interrupted run) are dropped, so every step appears once.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ..atomic_files import write_atomic
from ..errors import InputError, MissingFileError
from ..run_folder import METRICS_FILENAME


class MetricsLogger:
    """Rank 0's writer of ``metrics.jsonl`` and of TensorBoard events (through DeepSpeed's monitor). A new run starts
    the file empty; a resumed one appends (the checkpoint manager has dropped the interrupted run's tail)."""

    def __init__(self, run_dir, *, enabled: bool, monitor=None, append: bool = False):
        self.path = Path(run_dir) / METRICS_FILENAME
        self.enabled = enabled
        self.monitor = monitor if (monitor is not None and getattr(monitor, "enabled", False)) else None
        if enabled and not append:
            self.path.write_text("")

    def _append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")

    def log_train(self, record: dict) -> None:
        if not self.enabled:
            return
        self._append({"kind": "train", **record})
        if self.monitor is not None:
            step = record["step"]
            events = [(f"train/{key}", float(record[key]), step)
                      for key in ("loss", "bpc", "lr", "loss_scale", "skipped_steps", "tokens_per_second", "samples",
                                  "padding_efficiency", "tflops_per_second", "mfu")
                      if record.get(key) is not None and math.isfinite(float(record[key]))]
            self.monitor.write_events(events)

    def log_val(self, record: dict) -> None:
        if not self.enabled:
            return
        self._append({"kind": "val", **record})
        if self.monitor is not None:  # every number of the line: val/bpc, val/loss, val/macro_f1, ...
            step = record["step"]
            self.monitor.write_events([(f"val/{key[4:]}", float(value), step) for key, value in record.items()
                                       if key.startswith("val_") and isinstance(value, (int, float))
                                       and math.isfinite(value)])


def truncate_after(path, step: int) -> int:
    """Drop lines whose step is past ``step`` (an interrupted run's tail); returns how many were dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            dropped += 1
            continue
        if record.get("step", 0) > step:
            dropped += 1
        else:
            kept.append(line)
    write_atomic(path, "".join(line + "\n" for line in kept))
    return dropped


def read_metrics(path) -> tuple[list[dict], list[dict]]:
    """(training lines, validation lines) of a ``metrics.jsonl`` (or its run folder), each sorted by step."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILENAME
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist: is this the --output-dir of launch/pretrain.py?")
    train, val = {}, {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(f"{path}:{number} is not a JSON line") from None
        (val if record.get("kind") == "val" else train)[record["step"]] = record
    return [train[s] for s in sorted(train)], [val[s] for s in sorted(val)]


class Throughput:
    """Tokens per second over the steps since the previous call (``seconds``: that interval)."""

    def __init__(self):
        self._time = time.perf_counter()
        self._tokens = 0
        self.seconds = 0.0

    def update(self, tokens_total: int) -> float:
        now = time.perf_counter()
        self.seconds = max(now - self._time, 1e-9)
        rate = (tokens_total - self._tokens) / self.seconds
        self._time, self._tokens = now, tokens_total
        return rate

    def reset(self, tokens_total: int) -> None:
        self._time, self._tokens = time.perf_counter(), tokens_total


# Where the names this module held before the curves and the FLOPs moved out live now: the paths users' code and older
# docs import keep working (lazily, so the record's reader stays light and imports no training stack).
_MOVED = {"plot_curves": "curves", "run_title": "curves", "CURVES_FILENAME": "curves", "ModelFlops": "flops",
          "attention_pairs": "flops", "peak_tflops_of": "flops", "GPU_PEAK_TFLOPS_16BIT": "flops",
          "format_step": "pretraining"}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f"{__package__}.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
