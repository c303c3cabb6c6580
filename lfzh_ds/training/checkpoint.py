"""Training checkpoints: DeepSpeed's engine state plus what DeepSpeed does not save.

Layout of a run::

    RUN_DIR/checkpoints/latest                  the tag of the newest complete checkpoint (one line)
    RUN_DIR/checkpoints/step_3000/              DeepSpeed's files (mp_rank_00_model_states.pt, ZeRO shards)
        training_state.json                     step, samples consumed, world size, ... (readable without torch)
        config.json                             the model config, so the folder exports on its own
    RUN_DIR/checkpoints/step_3000_universal/    made on demand when a run resumes on another world size

The client state inside DeepSpeed's model-states file holds the same counters plus every process's RNG states
(python, numpy, torch, and CUDA where present). ``latest`` is written last, atomically (temporary file, fsync,
rename), after every process has finished writing its files: a crash during a save leaves ``latest`` on the
previous checkpoint, which stays usable. Only the newest ``keep`` checkpoints are kept.
"""
from __future__ import annotations

import contextlib
import io
import json
import random
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic_files import write_atomic

CHECKPOINTS_DIRNAME = "checkpoints"
LATEST_FILENAME = "latest"
STATE_FILENAME = "training_state.json"
MODEL_CONFIG_FILENAME = "config.json"
CLIENT_STATE_KEY = "lfzh_ds"
UNIVERSAL_SUFFIX = "_universal"
_TAG_PATTERN = re.compile(r"^step_(\d+)(_universal)?$")


@dataclass
class TrainingState:
    """Counters of a run, saved with every checkpoint; the sampler's position is ``samples_consumed``."""

    step: int = 0
    samples_consumed: int = 0
    tokens_seen: int = 0
    global_batch_size: int = 0
    world_size: int = 1
    seed: int = 0
    skipped_steps: int = 0
    elapsed_seconds: float = 0.0
    zero_stage: int = 0
    masking: str | None = None  # None: a checkpoint from before these were recorded
    total_num_steps: int | None = None  # the learning-rate schedule's, after "auto" was resolved
    learning_rate: float | None = None  # the rate the checkpoint's step ran at
    mask_prob: float | None = None  # dynamic masking's rate chosen at training time; None: the shards'
    # [[step, rate], ...]: the learning rate, linear between these steps, replacing the config's schedule once a
    # continued run's schedule changed end (see pretraining.continued_schedule); None: the config's schedule
    lr_knots: list | None = None
    mask_unit: str | None = None  # dynamic masking's unit: "word" (whole words) or "character"; None: recorded before
    output_vocab: str | None = None  # the training softmax's tokens: "all" or "training"; None: recorded before

    @classmethod
    def from_dict(cls, data: dict) -> "TrainingState":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


# ---------------------------------------------------------------------------------------------- tags

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


def read_training_state(tag_dir) -> TrainingState:
    path = Path(tag_dir) / STATE_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {tag_dir} is not a complete checkpoint of launch/pretrain.py")
    return TrainingState.from_dict(json.loads(path.read_text()))


# ---------------------------------------------------------------------------------------------- RNG

def capture_rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states() -> list[dict]:
    """Every process's RNG state, in rank order (collective: every rank must call it)."""
    import torch.distributed as dist

    mine = capture_rng_state()
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


# ---------------------------------------------------------------------------------------------- save

def save_checkpoint(engine, run_dir, state: TrainingState, model_config, keep: int, before_latest=None) -> str:
    """Save through DeepSpeed, then move ``latest`` once all files exist, then prune (collective).

    ``before_latest`` is called on every rank after all files are written and before ``latest`` moves (the
    window a crash-during-save test aims at).
    """
    import torch.distributed as dist

    ckpt_dir = checkpoints_dir(run_dir)
    tag = tag_for_step(state.step)
    client_state = {CLIENT_STATE_KEY: {**asdict(state), "rng": gather_rng_states(),
                                       "loss_scaler": loss_scaler_state(engine)}}
    # save_latest=False: DeepSpeed would write `latest` from rank 0 before the other ranks' ZeRO shards are done.
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    tag_dir = ckpt_dir / tag
    if engine.global_rank == 0:
        write_atomic(tag_dir / STATE_FILENAME, json.dumps(asdict(state), indent=2) + "\n")
        write_atomic(tag_dir / MODEL_CONFIG_FILENAME, model_config.to_json_string())
    dist.barrier()
    if before_latest is not None:
        before_latest(state.step)
    if engine.global_rank == 0:
        write_atomic(ckpt_dir / LATEST_FILENAME, tag + "\n")
        prune_checkpoints(ckpt_dir, keep)
    dist.barrier()
    return tag


def prune_checkpoints(ckpt_dir, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` checkpoints (and their universal copies); never ``latest``."""
    ckpt_dir = Path(ckpt_dir)
    latest = read_latest_tag(ckpt_dir)
    latest_step = step_of_tag(latest) if latest else None
    if latest_step is None or keep <= 0:
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and step_of_tag(p.name) is not None]
    steps = sorted({step_of_tag(t) for t in tags if step_of_tag(t) <= latest_step})
    kept = set(steps[-keep:]) | {latest_step}
    removed = []
    for tag in tags:
        if step_of_tag(tag) not in kept and step_of_tag(tag) <= latest_step:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
            removed.append(tag)
    return sorted(removed)


def remove_incomplete_checkpoints(ckpt_dir) -> list[str]:
    """Folders newer than ``latest`` are leftovers of a save that was interrupted; remove them."""
    ckpt_dir = Path(ckpt_dir)
    latest = read_latest_tag(ckpt_dir)
    latest_step = step_of_tag(latest) if latest else -1
    removed = []
    if not ckpt_dir.is_dir():
        return removed
    for path in ckpt_dir.iterdir():
        step = step_of_tag(path.name)
        if path.is_dir() and step is not None and step > latest_step:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return sorted(removed)


# ---------------------------------------------------------------------------------------------- resume

@dataclass
class ResumePoint:
    tag: str
    state: TrainingState

    @property
    def universal_tag(self) -> str:
        return self.tag + UNIVERSAL_SUFFIX


def find_resume_point(run_dir) -> ResumePoint | None:
    ckpt_dir = checkpoints_dir(run_dir)
    tag = read_latest_tag(ckpt_dir)
    if tag is None:
        return None
    tag_dir = ckpt_dir / tag
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"{ckpt_dir / LATEST_FILENAME} names {tag!r}, but {tag_dir} does not exist; "
                                "point `latest` at an existing step_N folder")
    return ResumePoint(tag=tag, state=read_training_state(tag_dir))


def convert_to_universal(ckpt_dir, tag: str) -> str:
    """DeepSpeed's universal checkpoint of ``tag`` (for another world size); returns its tag. Run on one process."""
    ckpt_dir = Path(ckpt_dir)
    universal_tag = tag + UNIVERSAL_SUFFIX
    out = ckpt_dir / universal_tag
    if (out / "zero").is_dir() and (out / STATE_FILENAME).is_file():
        return universal_tag
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt_dir / tag),
               "--output_folder", str(out), "--inject_missing_state", "--num_extract_workers", "1",
               "--num_merge_workers", "1"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"converting {ckpt_dir / tag} to a universal checkpoint failed "
                           f"({' '.join(command)}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    for name in (STATE_FILENAME, MODEL_CONFIG_FILENAME):
        if (ckpt_dir / tag / name).is_file():
            shutil.copy2(ckpt_dir / tag / name, out / name)
    return universal_tag


# The dynamic loss scaler's moving parts (DeepSpeed's DynamicLossScaler; fp16 only).
_LOSS_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def loss_scaler_state(engine) -> dict | None:
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is None or not getattr(scaler, "dynamic", False):
        return None
    return {name: getattr(scaler, name) for name in _LOSS_SCALER_FIELDS if hasattr(scaler, name)}


def restore_loss_scaler(engine, client_state: dict) -> None:
    """Put the saved loss scale (and hysteresis, overflow counters) back: DeepSpeed's ZeRO checkpoints carry the
    scaler, but a universal checkpoint's load starts a fresh one at the initial scale."""
    saved = client_state[CLIENT_STATE_KEY].get("loss_scaler")
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if saved and scaler is not None and getattr(scaler, "dynamic", False):
        for name, value in saved.items():
            setattr(scaler, name, value)


def client_training_state(client_state: dict | None, where: str) -> tuple[TrainingState, list[dict]]:
    if not client_state or CLIENT_STATE_KEY not in client_state:
        raise KeyError(f"{where} has no {CLIENT_STATE_KEY!r} client state: it was not written by launch/pretrain.py")
    data = client_state[CLIENT_STATE_KEY]
    return TrainingState.from_dict(data), data.get("rng", [])


# ---------------------------------------------------------------------------------------------- export

def is_training_checkpoint(path) -> bool:
    """True for a run folder of launch/pretrain.py, its checkpoints folder or one of its step_N folders."""
    path = Path(path)
    return ((path / CHECKPOINTS_DIRNAME / LATEST_FILENAME).is_file() or (path / LATEST_FILENAME).is_file()
            or any(path.glob("*model_states.pt")))


def resolve_checkpoint(path) -> tuple[Path, str]:
    """(checkpoints folder, tag) for a run folder, a checkpoints folder or one tag folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; give a run folder (with checkpoints/latest) or one "
                                "checkpoint folder such as RUN_DIR/checkpoints/step_3000")
    for ckpt_dir in (path / CHECKPOINTS_DIRNAME, path):
        tag = read_latest_tag(ckpt_dir)
        if tag is not None:
            if not (ckpt_dir / tag).is_dir():
                raise FileNotFoundError(f"{ckpt_dir / LATEST_FILENAME} names {tag!r}, which does not exist")
            return ckpt_dir, tag
    if any(path.glob("*model_states.pt")):
        return path.parent, path.name
    raise FileNotFoundError(f"{path} holds no DeepSpeed checkpoint: expected checkpoints/latest, latest, "
                            "or *model_states.pt files")


def load_model_from_run(path, dtype=torch.float32):
    """A ``LongformerZhForMaskedLM`` with the fp32 weights of a run's latest checkpoint (or of one tag folder).

    Works for every ZeRO stage: DeepSpeed's ``zero_to_fp32`` merges the optimizer's fp32 partitions.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from ..configuration import LongformerZhConfig
    from ..modeling import LongformerZhForMaskedLM

    ckpt_dir, tag = resolve_checkpoint(path)
    config_file = ckpt_dir / tag / MODEL_CONFIG_FILENAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing: the checkpoint does not say which model it holds")
    config = LongformerZhConfig.from_json_file(str(config_file))
    with contextlib.redirect_stdout(io.StringIO()):  # zero_to_fp32 narrates every step on stdout
        state_dict = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    model = LongformerZhForMaskedLM(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied and not k.endswith("position_ids")]
    if missing or unexpected:
        raise KeyError(f"{ckpt_dir / tag} does not match {config_file}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.to(dtype).eval()


def export_run(path, out_dir) -> Path:
    """Write a run's checkpoint as a ``from_pretrained`` folder: config, fp32 safetensors, tokenizer files."""
    from ..tokenization import load_tokenizer

    model = load_model_from_run(path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer().save_pretrained(out_dir)
    return out_dir
