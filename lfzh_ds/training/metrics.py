"""Run metrics: one JSON line per optimizer step in ``RUN_DIR/metrics.jsonl``, TensorBoard, console, curves PNG.

Only rank 0 writes. A training line::

    {"kind": "train", "step": 12, "loss": 9.81, "bpc": 14.15, "lr": 3e-05, "loss_scale": 65536.0,
     "skipped_steps": 0, "tokens": 98304, "samples": 96, "tokens_per_second": 5120.3, "wall_time": 1764080000.1,
     "elapsed_seconds": 19.2}

``tokens`` and ``samples`` are cumulative (non-padding tokens and sequences the model has trained on),
``wall_time`` is the Unix time. A validation line: ``{"kind": "val", "step": 12, "val_loss": ..., "val_bpc": ...,
"val_masked_tokens": ..., "val_sequences": ..., "wall_time": ...}``. When a run resumes, lines past the checkpoint
it resumes from (written by the interrupted run) are dropped, so every step appears once.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

METRICS_FILENAME = "metrics.jsonl"
CURVES_FILENAME = "curves.png"


class MetricsLogger:
    def __init__(self, run_dir, *, enabled: bool, monitor=None, resume_step: int | None = None):
        self.path = Path(run_dir) / METRICS_FILENAME
        self.enabled = enabled
        self.monitor = monitor if (monitor is not None and getattr(monitor, "enabled", False)) else None
        self.dropped = 0
        if not enabled:
            return
        if resume_step is None:
            self.path.write_text("")
        else:
            self.dropped = truncate_after(self.path, resume_step)

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
                      for key in ("loss", "bpc", "lr", "loss_scale", "skipped_steps", "tokens_per_second", "samples")
                      if record.get(key) is not None and math.isfinite(float(record[key]))]
            self.monitor.write_events(events)

    def log_val(self, record: dict) -> None:
        if not self.enabled:
            return
        self._append({"kind": "val", **record})
        if self.monitor is not None:
            step = record["step"]
            self.monitor.write_events([("val/bpc", float(record["val_bpc"]), step),
                                       ("val/loss", float(record["val_loss"]), step)])


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
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
    return dropped


def read_metrics(path) -> tuple[list[dict], list[dict]]:
    """(training lines, validation lines) of a ``metrics.jsonl`` (or its run folder), each sorted by step."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is this the --output-dir of launch/pretrain.py?")
    train, val = {}, {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{number} is not a JSON line") from None
        (val if record.get("kind") == "val" else train)[record["step"]] = record
    return [train[s] for s in sorted(train)], [val[s] for s in sorted(val)]


def format_step(record: dict, max_steps: int) -> str:
    return (f"step {record['step']}/{max_steps} | loss {record['loss']:.4f} | bpc {record['bpc']:.3f} | "
            f"lr {record['lr']:.3g} | loss scale {record['loss_scale']:g} | skipped {record['skipped_steps']} | "
            f"{record['tokens_per_second']:,.0f} tokens/s | samples {record['samples']:,}")


def plot_curves(run_dir, out_path=None) -> Path:
    """Training loss, validation BPC and learning rate against steps, as a PNG next to ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    train, val = read_metrics(run_dir)
    out_path = Path(out_path) if out_path else run_dir / CURVES_FILENAME
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train], lw=1)
    axes[0].set_title("training loss (masked-token cross-entropy, nats)")
    if val:
        axes[1].plot([r["step"] for r in val], [r["val_bpc"] for r in val], marker="o", label="model")
        for r in (val[0], val[-1]):
            axes[1].annotate(f"{r['val_bpc']:.2f}", (r["step"], r["val_bpc"]), textcoords="offset points",
                             xytext=(4, 4))
        baseline = [r["frequency_baseline_bpc"] for r in val if r.get("frequency_baseline_bpc") is not None]
        if baseline:
            axes[1].axhline(baseline[-1], color="gray", ls="--",
                            label=f"character frequencies alone ({baseline[-1]:.2f})")
            axes[1].legend(loc="upper right")
    axes[1].set_title("validation BPC (bits per masked character)")
    axes[2].plot(steps, [r["lr"] for r in train], lw=1)
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.suptitle(run_title(run_dir))
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def run_title(run_dir) -> str:
    """The run's folder and what it trains, from the files launch/pretrain.py writes beside the metrics."""
    run_dir = Path(run_dir).resolve()
    parts = [f"{run_dir.parent.name}/{run_dir.name}"]
    try:
        model = json.loads((run_dir / "model_config.json").read_text(encoding="utf-8"))
        parts.append(f"{model['num_hidden_layers']} layers x {model['hidden_size']} hidden, "
                     f"{model.get('attention_backend', '')} window {model.get('attention_window')}")
        args = json.loads((run_dir / "args.json").read_text(encoding="utf-8"))
        masking = args.get("masking") or "static"
        if args.get("mask_prob"):
            masking += f" {args['mask_prob']:.0%}"
        parts.append(f"data {Path(args['data']).name}, {masking} masking, seed {args.get('seed')}")
    except (OSError, KeyError, TypeError, ValueError):
        pass  # a metrics file alone still gets its curves
    return " | ".join(parts)


class Throughput:
    """Tokens per second over the steps since the previous call."""

    def __init__(self):
        self._time = time.perf_counter()
        self._tokens = 0

    def update(self, tokens_total: int) -> float:
        now = time.perf_counter()
        rate = (tokens_total - self._tokens) / max(now - self._time, 1e-9)
        self._time, self._tokens = now, tokens_total
        return rate

    def reset(self, tokens_total: int) -> None:
        self._time, self._tokens = time.perf_counter(), tokens_total
