"""Run metrics: one JSON line per optimizer step in ``RUN_DIR/metrics.jsonl``, TensorBoard, console, curves PNG.

Only rank 0 writes. A training line::

    {"kind": "train", "step": 12, "loss": 9.81, "bpc": 14.15, "lr": 3e-05, "loss_scale": 65536.0,
     "skipped_steps": 0, "tokens": 98304, "samples": 96, "tokens_per_second": 5120.3, "padding_efficiency": 0.97,
     "tflops_per_second": 41.3, "mfu": 0.079, "wall_time": 1764080000.1, "elapsed_seconds": 19.2}

``tokens`` and ``samples`` are cumulative (non-padding tokens and sequences the model has trained on),
``wall_time`` is the Unix time. ``tokens_per_second`` (non-padding tokens of all processes), ``padding_efficiency``
(the step's non-padding share of its positions), ``tflops_per_second`` (model FLOPs of all processes, counted by
``ModelFlops``) and ``mfu`` (``tflops_per_second`` over the peak of all processes; null without a known peak) are
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
from ..constants import IGNORE_INDEX
from ..errors import InputError, MissingFileError

METRICS_FILENAME = "metrics.jsonl"
CURVES_FILENAME = "curves.png"


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


def format_step(record: dict, max_steps: int) -> str:
    return (f"step {record['step']}/{max_steps} | loss {record['loss']:.4f} | bpc {record['bpc']:.3f} | "
            f"lr {record['lr']:.3g} | loss scale {record['loss_scale']:g} | skipped {record['skipped_steps']} | "
            f"{record['tokens_per_second']:,.0f} tokens/s | padding eff. {record['padding_efficiency']:.1%} | "
            f"{record['tflops_per_second']:.3g} TFLOP/s" + (f" | MFU {record['mfu']:.1%}" if record.get("mfu") is not None
                                                           else "") + f" | samples {record['samples']:,}")


def plot_curves(run_dir, out_path=None) -> Path:
    """Training loss, the validation number (pretraining's BPC, fine-tuning's dev macro-F1) and learning rate
    against steps, as a PNG next to ``metrics.jsonl``."""
    import matplotlib  # lazily: only the curves need it, and it takes a second to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    train, val = read_metrics(run_dir)
    out_path = Path(out_path) if out_path else run_dir / CURVES_FILENAME
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train], lw=1)
    finetuning = bool(val) and "val_macro_f1" in val[0]
    key, title = (("val_macro_f1", "dev macro-F1") if finetuning else
                  ("val_bpc", "validation BPC (bits per masked character)"))
    axes[0].set_title("training loss (cross-entropy, nats)" if finetuning else
                      "training loss (masked-token cross-entropy, nats)")
    if val:
        axes[1].plot([r["step"] for r in val], [r[key] for r in val], marker="o", label="model")
        for r in (val[0], val[-1]):
            axes[1].annotate(f"{r[key]:.2f}", (r["step"], r[key]), textcoords="offset points", xytext=(4, 4))
        baseline = [r["frequency_baseline_bpc"] for r in val if r.get("frequency_baseline_bpc") is not None]
        if baseline:
            axes[1].axhline(baseline[-1], color="gray", ls="--",
                            label=f"character frequencies alone ({baseline[-1]:.2f})")
            axes[1].legend(loc="upper right")
    axes[1].set_title(title)
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
        window = model.get("attention_window")
        window = ("windows " + "/".join(map(str, window))) if isinstance(window, list) else f"window {window}"
        parts.append(f"{model['num_hidden_layers']} layers x {model['hidden_size']} hidden, "
                     f"{model.get('attention_backend', '')} {window}")
        args = json.loads((run_dir / "args.json").read_text(encoding="utf-8"))
        masking = args.get("masking") or "static"
        if args.get("mask_prob"):
            masking += f" {args['mask_prob']:.0%}"
        parts.append(f"data {Path(args['data']).name}, {masking} masking, seed {args.get('seed')}")
    except (OSError, KeyError, TypeError, ValueError):
        pass  # a metrics file alone still gets its curves
    return " | ".join(parts)


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


# ---------------------------------------------------------------------------------------------- FLOPs and MFU

# Dense 16-bit (fp16/bf16) tensor-core peaks in TFLOP/s per GPU, fp32 accumulation, no sparsity (vendors' datasheets),
# matched against torch.cuda.get_device_name() in this order. fp32 runs, and other devices, need --peak-tflops.
GPU_PEAK_TFLOPS_16BIT = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0),
                         ("V100-PCIE", 112.0), ("V100", 125.0), ("TITAN RTX", 130.0), ("RTX 4090", 165.0),
                         ("RTX 3090", 71.0), ("T4", 65.0))


def peak_tflops_of(device_name: str | None, precision: str) -> float | None:
    """The table's peak for a GPU name and a 16-bit precision, else None."""
    if not device_name or precision not in ("fp16", "bf16"):
        return None
    for key, peak in GPU_PEAK_TFLOPS_16BIT:
        if key.lower() in device_name.lower():
            return peak
    return None


def attention_pairs(config, seq_len: int, layer: int) -> int:
    """(query, key) pairs one head of ``layer`` scores in a sequence padded to ``seq_len``: the attention band
    (block-sparse: the block layout's blocks x block size squared; sliding chunks: keys within half the window on
    each side, clipped at the ends), never a dense ``seq_len`` squared. Token-level global attention, which
    pretraining does not use, is not counted."""
    if config.attention_backend == "block_sparse":
        from ..attention.layout import block_sparse_layout  # lazily: curves and metrics need no torch

        block = config.sparse_block_size
        layout = block_sparse_layout(-(-seq_len // block), config.layer_sliding_window_blocks(layer),
                                     config.global_block_indices, config.global_block_end_indices)
        return int(layout[0].sum()) * block * block
    half = config.layer_attention_window(layer) // 2
    return sum(min(i + half, seq_len - 1) - max(i - half, 0) + 1 for i in range(seq_len))


class ModelFlops:
    """Training FLOPs of a micro-batch: 3x the forward (the backward costs twice the forward; activation
    checkpointing's recomputation is not counted, as MFU does not count it). A multiply-add is 2 FLOPs.

    Forward, per sequence padded to L and per layer: the Q, K, V and output projections ``8 L h^2``, the
    feed-forward ``4 L h f``, and attention ``4 h P`` (scores and weighted values over the ``P`` pairs of
    ``attention_pairs``, all heads together); per masked token, the masked-LM head ``2 h^2 + 2 h V`` (the head only
    runs on masked positions; ``V`` is ``output_vocab_size`` when the training softmax runs over fewer tokens than
    the vocab). Embeddings, LayerNorm, softmax and dropout are left out (elementwise).
    """

    def __init__(self, config, output_vocab_size: int | None = None):
        self.config = config
        self.output_vocab_size = output_vocab_size or config.vocab_size
        self._per_sequence: dict[int, int] = {}

    def encoder_forward(self, seq_len: int) -> int:
        if seq_len not in self._per_sequence:
            c = self.config
            multiple = c.padding_multiple()
            padded = -(-seq_len // multiple) * multiple
            h, f = c.hidden_size, c.intermediate_size
            self._per_sequence[seq_len] = sum(8 * padded * h * h + 4 * padded * h * f
                                              + 4 * h * attention_pairs(c, padded, layer)
                                              for layer in range(c.num_hidden_layers))
        return self._per_sequence[seq_len]

    def head_forward(self, masked_tokens: int) -> int:
        h = self.config.hidden_size
        return masked_tokens * (2 * h * h + 2 * h * self.output_vocab_size)

    def training(self, sequences: int, seq_len: int, masked_tokens: int) -> int:
        return 3 * (sequences * self.encoder_forward(seq_len) + self.head_forward(masked_tokens))

    def of_batch(self, batch: dict) -> int:
        sequences, seq_len = batch["input_ids"].shape
        return self.training(sequences, seq_len, int((batch["labels"] != IGNORE_INDEX).sum()))
