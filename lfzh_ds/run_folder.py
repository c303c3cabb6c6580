"""What a run folder of ``launch/pretrain.py`` looks like, and reading a model's weights out of it without an engine.

    RUN_DIR/checkpoints/latest                  the tag of the newest complete checkpoint (one line)
    RUN_DIR/checkpoints/step_3000/              DeepSpeed's files (mp_rank_00_model_states.pt, ZeRO shards)
        training_state.json                     step, samples consumed, world size, ... (readable without torch)
        config.json                             the model config, so the folder loads and exports on its own
    RUN_DIR/checkpoints/step_3000_universal/    made on demand when a run resumes on another world size
    RUN_DIR/metrics.jsonl                       one JSON line per optimizer step and per evaluation
    RUN_DIR/curves.png                          loss, the validation number and learning rate against steps
    RUN_DIR/tensorboard/                        TensorBoard events (when the DeepSpeed config enables them)
    RUN_DIR/model_config.json, ds_config.json, args.json     pretraining: the model, the resolved DeepSpeed config
                                                and the settings the run was started with
    RUN_DIR/best/, predictions_SPLIT.jsonl, metrics_SPLIT.json, summary.json     fine-tuning: the best-on-dev
                                                model (a from_pretrained folder) and its scores

Every file name of a run folder is written here once; the code that writes or reads a file imports its name.

This module is below the model (``modeling`` asks it whether a folder is a checkpoint and for its weights) and
below training (``training.checkpoint`` writes what is described here), so it imports neither.
"""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from .errors import MissingFileError

CHECKPOINTS_DIRNAME = "checkpoints"
LATEST_FILENAME = "latest"
MODEL_CONFIG_FILENAME = "config.json"  # in every checkpoint folder (and every from_pretrained folder)
STATE_FILENAME = "training_state.json"  # in every checkpoint folder
METRICS_FILENAME = "metrics.jsonl"
CURVES_FILENAME = "curves.png"
TENSORBOARD_DIRNAME = "tensorboard"
RUN_MODEL_CONFIG_FILENAME = "model_config.json"  # pretraining's run folder: the model it trains
DS_CONFIG_FILENAME = "ds_config.json"  # pretraining's run folder: the DeepSpeed config as resolved for the run
ARGS_FILENAME = "args.json"  # pretraining's run folder: its settings (launch/pretrain.py's flags, resolved)
BEST_CHECKPOINT_DIRNAME = "best"  # fine-tuning: the best-on-dev model
SUMMARY_FILENAME = "summary.json"  # fine-tuning (and the baseline): what the run did and scored
UNIVERSAL_SUFFIX = "_universal"
_TAG_PATTERN = re.compile(r"^step_(\d+)(_universal)?$")
WHAT_TO_GIVE = ("a model folder (config.json + weights), a run folder of launch/pretrain.py, or one of its "
                "checkpoints/step_N folders")


def predictions_filename(split: str) -> str:
    return f"predictions_{split}.jsonl"


def split_metrics_filename(split: str) -> str:
    return f"metrics_{split}.json"


def checkpoints_dir(run_dir) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIRNAME


def tag_for_step(step: int) -> str:
    return f"step_{step}"


def step_of_tag(tag: str) -> int | None:
    match = _TAG_PATTERN.match(tag)
    return int(match.group(1)) if match else None


def read_latest_tag(ckpt_dir) -> str | None:
    latest = Path(ckpt_dir) / LATEST_FILENAME
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag or None


def is_training_checkpoint(path) -> bool:
    """True for a run folder of launch/pretrain.py, its checkpoints folder or one of its step_N folders (which hold
    a config.json too, but DeepSpeed's files instead of a weights file)."""
    try:
        path = Path(path)
    except TypeError:
        return False
    return ((path / CHECKPOINTS_DIRNAME / LATEST_FILENAME).is_file() or (path / LATEST_FILENAME).is_file()
            or any(path.glob("*model_states.pt")))


def resolve_checkpoint(path) -> tuple[Path, str]:
    """(checkpoints folder, tag) for a run folder, a checkpoints folder or one tag folder."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path} does not exist; give a run folder (with checkpoints/latest) or one "
                               "checkpoint folder such as RUN_DIR/checkpoints/step_3000")
    for ckpt_dir in (path / CHECKPOINTS_DIRNAME, path):
        tag = read_latest_tag(ckpt_dir)
        if tag is not None:
            if not (ckpt_dir / tag).is_dir():
                raise MissingFileError(f"{ckpt_dir / LATEST_FILENAME} names {tag!r}, which does not exist")
            return ckpt_dir, tag
    if any(path.glob("*model_states.pt")):
        return path.parent, path.name
    raise MissingFileError(f"{path} holds no DeepSpeed checkpoint: expected checkpoints/latest, latest, "
                           "or *model_states.pt files")


def checkpoint_weights(path) -> tuple[Path, dict]:
    """(the checkpoint's config.json, its fp32 weights as a state dict of ``LongformerZhForMaskedLM``) for a run
    folder (its latest checkpoint), a checkpoints folder or one step_N folder, whatever the ZeRO stage: DeepSpeed's
    ``zero_to_fp32`` merges the optimizer's fp32 partitions."""
    # deepspeed is imported here, not at module level: it takes seconds, and only this function needs it
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt_dir, tag = resolve_checkpoint(path)
    config_file = ckpt_dir / tag / MODEL_CONFIG_FILENAME
    if not config_file.is_file():
        raise MissingFileError(f"{config_file} is missing: the checkpoint does not say which model it holds")
    with contextlib.redirect_stdout(io.StringIO()):  # zero_to_fp32 narrates every step on stdout
        state_dict = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    return config_file, state_dict
