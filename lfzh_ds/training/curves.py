"""The curves PNG of a run: training loss, the objective's validation number and the learning rate against steps.

What the middle panel shows is the objective's to say: each objective names a ``CurveSpec`` as its ``curves``
(pretraining's validation BPC against the character-frequency baseline, fine-tuning's dev macro-F1), which the
training loop passes here at the end of a run. The specs are written down here, as data, so that
``launch/evaluate.py curves`` draws any run folder without importing the training stack: it passes them all
(``OBJECTIVE_CURVES``) and the one whose number the run's validation lines hold is drawn.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..run_folder import ARGS_FILENAME, CURVES_FILENAME, RUN_MODEL_CONFIG_FILENAME
from .metrics import read_metrics


@dataclass(frozen=True)
class CurveSpec:
    """What an objective's curves show: the title of the training loss, the validation line's number (``val_key``)
    and its title, and optionally a reference number of the validation lines drawn as a dashed line."""

    loss_title: str
    val_key: str
    val_title: str
    baseline_key: str | None = None
    baseline_label: str = "baseline"


MASKED_LM_CURVES = CurveSpec(loss_title="training loss (masked-token cross-entropy, nats)", val_key="val_bpc",
                             val_title="validation BPC (bits per masked character)",
                             baseline_key="frequency_baseline_bpc", baseline_label="character frequencies alone")
CLASSIFICATION_CURVES = CurveSpec(loss_title="training loss (cross-entropy, nats)", val_key="val_macro_f1",
                                  val_title="dev macro-F1")
OBJECTIVE_CURVES = (MASKED_LM_CURVES, CLASSIFICATION_CURVES)  # pretraining's first: a run without validation


def choose_spec(val: list[dict], specs) -> CurveSpec:
    """The spec among ``specs`` whose number the validation lines hold (the first spec when there is none)."""
    specs = (specs,) if isinstance(specs, CurveSpec) else tuple(specs)
    return next((spec for spec in specs if val and spec.val_key in val[0]), specs[0])


def plot_curves(run_dir, out_path=None, curves=OBJECTIVE_CURVES) -> Path:
    """The curves of ``curves`` (a ``CurveSpec``, or several to choose from with ``choose_spec``; by default every
    objective's) against steps, as a PNG next to ``metrics.jsonl``."""
    import matplotlib  # lazily: only the curves need it, and it takes a second to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    train, val = read_metrics(run_dir)
    spec = choose_spec(val, curves)
    out_path = Path(out_path) if out_path else run_dir / CURVES_FILENAME
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train], lw=1)
    axes[0].set_title(spec.loss_title)
    key = spec.val_key
    if val:
        axes[1].plot([r["step"] for r in val], [r[key] for r in val], marker="o", label="model")
        for r in (val[0], val[-1]):
            axes[1].annotate(f"{r[key]:.2f}", (r["step"], r[key]), textcoords="offset points", xytext=(4, 4))
        baseline = [r[spec.baseline_key] for r in val if spec.baseline_key and r.get(spec.baseline_key) is not None]
        if baseline:
            axes[1].axhline(baseline[-1], color="gray", ls="--", label=f"{spec.baseline_label} ({baseline[-1]:.2f})")
            axes[1].legend(loc="upper right")
    axes[1].set_title(spec.val_title)
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
        model = json.loads((run_dir / RUN_MODEL_CONFIG_FILENAME).read_text(encoding="utf-8"))
        window = model.get("attention_window")
        window = ("windows " + "/".join(map(str, window))) if isinstance(window, list) else f"window {window}"
        parts.append(f"{model['num_hidden_layers']} layers x {model['hidden_size']} hidden, "
                     f"{model.get('attention_backend', '')} {window}")
        args = json.loads((run_dir / ARGS_FILENAME).read_text(encoding="utf-8"))
        masking = args.get("masking") or "static"
        if args.get("mask_prob"):
            masking += f" {args['mask_prob']:.0%}"
        parts.append(f"data {Path(args['data']).name}, {masking} masking, seed {args.get('seed')}")
    except (OSError, KeyError, TypeError, ValueError):
        pass  # a metrics file alone still gets its curves
    return " | ".join(parts)
