"""Training checkpoints: DeepSpeed's engine state plus what DeepSpeed does not save.

The layout of a run folder is described (and read without an engine) in ``lfzh_ds.run_folder``.

The client state inside DeepSpeed's model-states file holds the same counters plus every process's RNG states
(python, numpy, torch, and CUDA where present). ``latest`` is written last, atomically (temporary file, fsync,
rename), after every process has finished writing its files: a crash during a save leaves ``latest`` on the
previous checkpoint, which stays usable. Only the newest ``keep`` checkpoints are kept.
"""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic_files import write_atomic
from ..run_folder import (CHECKPOINTS_DIRNAME, LATEST_FILENAME, MODEL_CONFIG_FILENAME, UNIVERSAL_SUFFIX,
                          checkpoints_dir, read_latest_tag, resolve_checkpoint, step_of_tag, tag_for_step)

STATE_FILENAME = "training_state.json"
CLIENT_STATE_KEY = "lfzh_ds"


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
