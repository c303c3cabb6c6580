"""Training checkpoints, and every step of resuming a run: the one place where resume lives.

``CheckpointManager`` owns a run's checkpoints: saving (``latest`` moved last, keep-N), finding the point to resume
from, removing an interrupted save, converting to DeepSpeed's universal format for another world size, loading
the engine state, putting back what DeepSpeed does not save (counters, data position, every process's RNG states,
the dynamic loss scale), its learning-rate schedule, and dropping the ``metrics.jsonl`` lines the interrupted run
wrote past the checkpoint. Pretraining and fine-tuning both use it through ``training.trainer``.

The settings a resumed run must keep (pretraining's seed and masking, fine-tuning's options) are declared by each
objective (``Objective.kept_settings``, ``Objective.recorded_settings``) and compared here, for both, by one rule
with one message (``keep_settings``).

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
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from ..atomic_files import write_atomic
from ..errors import MissingFileError, ModelFolderError
from ..run_folder import (
    LATEST_FILENAME,
    METRICS_FILENAME,
    MODEL_CONFIG_FILENAME,
    STATE_FILENAME,
    UNIVERSAL_SUFFIX,
    checkpoints_dir,
    read_latest_tag,
    step_of_tag,
    tag_for_step,
)
from .distributed import barrier, gather_objects, rank_and_world, say
from .ds_config import ConfigError, ResolvedConfig
from .metrics import truncate_after
from .schedule import ScheduleAfterRestore, describe_knots, schedule_after_restore

CLIENT_STATE_KEY = "lfzh_ds"
# What the client state holds beside the training state's own fields.
_CLIENT_STATE_EXTRAS = ("rng", "loss_scaler")


@dataclass
class TrainingState:
    """Counters of a run, saved with every checkpoint; the sampler's position is ``samples_consumed``.

    ``settings`` holds what the objective declares a resume must keep (``Objective.kept_settings``) beyond these
    counters: pretraining's masking, mask_prob, mask_unit and output_vocab. They are saved at the top level of
    ``training_state.json`` and of the client state, beside the counters (where checkpoints have always had them), and
    every key of a saved state that is not a counter is read back into ``settings``: a checkpoint of any version
    loads. (Fine-tuning's settings travel in ``objective``, its own state, as they always have.)
    """

    step: int = 0
    samples_consumed: int = 0
    tokens_seen: int = 0
    global_batch_size: int = 0
    world_size: int = 1
    seed: int = 0
    skipped_steps: int = 0
    elapsed_seconds: float = 0.0
    zero_stage: int = 0
    total_num_steps: int | None = None  # the learning-rate schedule's, after "auto" was resolved
    learning_rate: float | None = None  # the rate the checkpoint's step ran at
    # [[step, rate], ...]: the learning rate, linear between these steps, replacing the config's schedule once a
    # continued run's schedule changed end (see schedule.schedule_after_restore); None: the config's schedule
    lr_knots: list | None = None
    objective: dict | None = None  # what the objective carries across a resume (fine-tuning: settings, best, history)
    settings: dict = field(default_factory=dict)  # the objective's kept settings (see above)

    @property
    def masking(self) -> str | None:
        """Pretraining's masking as recorded (None: a checkpoint from before it was), under its former field name."""
        return self.settings.get("masking")

    def to_dict(self) -> dict:
        data = asdict(self)
        settings = data.pop("settings")
        clash = sorted(set(settings) & set(data) | set(settings) & set(_CLIENT_STATE_EXTRAS))
        if clash:
            raise ValueError(f"kept settings {clash} have the names of training state fields")
        objective = data.pop("objective")
        return {**data, **settings, "objective": objective}

    @classmethod
    def from_dict(cls, data: dict) -> "TrainingState":
        names = {f.name for f in fields(cls)} - {"settings"}
        known = {k: data[k] for k in names if k in data}
        settings = {k: v for k, v in data.items() if k not in names and k not in _CLIENT_STATE_EXTRAS}
        return cls(**known, settings=settings)


def read_training_state(tag_dir) -> TrainingState:
    path = Path(tag_dir) / STATE_FILENAME
    if not path.is_file():
        raise MissingFileError(f"{path} is missing: {tag_dir} is not a complete checkpoint of launch/pretrain.py")
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
    return gather_objects(capture_rng_state())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- save

def save_checkpoint(engine, run_dir, state: TrainingState, model_config, keep: int, before_latest=None) -> str:
    """Save through DeepSpeed, then move ``latest`` once all files exist, then prune (collective).

    ``before_latest`` is called on every rank after all files are written and before ``latest`` moves (the
    window a crash-during-save test aims at).
    """
    ckpt_dir = checkpoints_dir(run_dir)
    tag = tag_for_step(state.step)
    client_state = {CLIENT_STATE_KEY: {**state.to_dict(), "rng": gather_rng_states(),
                                       "loss_scaler": loss_scaler_state(engine)}}
    # save_latest=False: DeepSpeed would write `latest` from rank 0 before the other ranks' ZeRO shards are done.
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    tag_dir = ckpt_dir / tag
    if engine.global_rank == 0:
        write_atomic(tag_dir / STATE_FILENAME, json.dumps(state.to_dict(), indent=2) + "\n")
        write_atomic(tag_dir / MODEL_CONFIG_FILENAME, model_config.to_json_string())
    barrier()
    if before_latest is not None:
        before_latest(state.step)
    if engine.global_rank == 0:
        write_atomic(ckpt_dir / LATEST_FILENAME, tag + "\n")
        prune_checkpoints(ckpt_dir, keep)
    barrier()
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
        raise MissingFileError(f"{ckpt_dir / LATEST_FILENAME} names {tag!r}, but {tag_dir} does not exist; "
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


class MissingClientStateError(ModelFolderError, KeyError):
    """A DeepSpeed checkpoint without our client state (not written by launch/pretrain.py or finetune.py); a
    ``KeyError`` too, as the missing key it is, for callers that caught that before."""

    __str__ = ModelFolderError.__str__  # the message as given, not KeyError's quoted repr


def client_training_state(client_state: dict | None, where: str) -> tuple[TrainingState, list[dict]]:
    if not client_state or CLIENT_STATE_KEY not in client_state:
        raise MissingClientStateError(f"{where} has no {CLIENT_STATE_KEY!r} client state: it was not written by launch/pretrain.py")
    data = client_state[CLIENT_STATE_KEY]
    return TrainingState.from_dict(data), data.get("rng", [])


# ---------------------------------------------------------------------------------------------- kept settings

@dataclass(frozen=True)
class KeptSetting:
    """A setting a resumed run continues with from its checkpoint, as its objective declares it.

    ``value`` is the one given now; None (a flag left out) takes the checkpoint's. ``flag`` is how the user gives it
    (``--seed``; the message then names it, else ``name``). A recorded None means the checkpoint predates the setting
    (the given value goes on), unless ``none_means`` says what a recorded None stands for ("the shards' rate"), which
    is then a value like any other.
    """

    name: str
    value: object = None
    flag: str | None = None
    none_means: str | None = None

    @property
    def label(self) -> str:
        return self.flag or self.name

    def shown(self, value) -> str:
        return self.none_means if value is None and self.none_means else str(value)


_NOT_RECORDED = object()


def keep_settings(declared, recorded: dict, *, what: str, where) -> dict:
    """The values a resumed run goes on with, by one rule for every objective: the checkpoint's value of each
    declared setting (``recorded``: the objective's reading of its checkpoint), the given one where the checkpoint
    predates the setting; a given value that differs from the recorded one is refused (``what``: "run",
    "fine-tuning"; ``where``: the checkpoint's state file)."""
    values = {}
    for setting in declared:
        saved = recorded.get(setting.name, _NOT_RECORDED)
        if saved is None and setting.none_means is None:
            saved = _NOT_RECORDED
        if saved is _NOT_RECORDED:
            values[setting.name] = setting.value
            continue
        if setting.value is not None and setting.value != saved:
            raise ConfigError(resume_refusal(setting, saved, what, where))
        values[setting.name] = saved
    return values


def resume_refusal(setting: KeptSetting, saved, what: str, where) -> str:
    """The one message of a kept setting given another value on resume. The recorded value is named beside the setting
    (``--seed 7``, or the value alone for a setting without a flag), or after the file where None has a meaning of its
    own (the shards' rate)."""
    recorded = setting.shown(saved)
    named = "" if setting.none_means else (f"{setting.flag} {recorded}" if setting.flag else recorded) + " of the "
    after = f": {recorded}" if setting.none_means else ""
    if setting.flag:
        remedy = f"Drop {setting.flag}" + (f" (or pass {saved})" if saved is not None and not setting.none_means else "")
    else:
        remedy = "Pass the same options"
    return (f"{setting.label} {setting.shown(setting.value)} differs from the {named}{what} being resumed "
            f"({where}{after}): a resumed run continues with its own settings. {remedy}, or start a new run in "
            "another --output-dir")


# ---------------------------------------------------------------------------------------------- the manager

# What a resumed run takes from its checkpoint; every other field of TrainingState describes the run as started now.
_RESUMED_FIELDS = ("step", "samples_consumed", "tokens_seen", "skipped_steps", "elapsed_seconds", "learning_rate",
                   "objective")


class CheckpointManager:
    """A run's checkpoints in RUN_DIR/checkpoints, from the first check (before any compute) to the last save.

    In order: ``CheckpointManager(run_dir, keep=, resume=)`` finds the resume point (or refuses a run folder that
    holds checkpoints without --resume); ``continue_from`` names another run's checkpoint for a new phase;
    ``load_universal_if_needed`` marks the config when the world size changed; after torch.distributed is up,
    ``prepare`` removes an interrupted save and converts to the universal format; once the engine exists,
    ``restore`` loads it and returns the counters, data position and schedule to continue with; ``save`` writes a
    checkpoint. ``last_tag`` is the newest complete checkpoint of this run.
    """

    def __init__(self, run_dir, *, keep: int, resume: bool, before_latest=None):
        self.run_dir = Path(run_dir)
        self.dir = checkpoints_dir(run_dir)
        self.keep = keep
        self.before_latest = before_latest
        self.point = find_resume_point(run_dir) if resume else None
        if resume and self.point is None:
            say(f"--resume: no checkpoint in {self.dir} yet, starting a new run")
        if not resume and read_latest_tag(self.dir):
            raise ConfigError(f"{self.run_dir} already holds checkpoints (latest: {read_latest_tag(self.dir)}); pass "
                              "--resume to continue that run or choose another --output-dir")
        self.source = None  # (checkpoints folder, tag, TrainingState) of another run to continue from
        self.last_tag = self.point.tag if self.point else None

    @property
    def resumed(self) -> bool:
        return self.point is not None

    def keep_settings(self, declared, recorded_of, what: str) -> dict:
        """The values of the ``declared`` settings (``KeptSetting``) to run with: on resume the checkpoint's
        (``recorded_of(saved TrainingState)``: the objective's reading of it), refusing a different given value
        (``keep_settings``); in a new run the given ones."""
        if self.point is None:
            return {setting.name: setting.value for setting in declared}
        return keep_settings(declared, recorded_of(self.point.state), what=what,
                             where=self.dir / self.point.tag / STATE_FILENAME)

    def continue_from(self, ckpt_dir, tag: str, state: TrainingState) -> None:
        """A new phase of another run: its weights, optimizer state and schedule position (ignored when resuming
        this run's own checkpoint, which holds everything)."""
        if self.point is None:
            self.source = (Path(ckpt_dir), tag, state)

    def _universal(self, world_size: int) -> bool:
        saved = self.point.state if self.point else self.source[2] if self.source else None
        return saved is not None and saved.world_size != world_size

    def load_universal_if_needed(self, resolved: ResolvedConfig) -> None:
        """A checkpoint of another world size loads through DeepSpeed's universal format."""
        if self._universal(resolved.world_size):
            resolved.config.setdefault("checkpoint", {})["load_universal"] = True

    def prepare(self, world_size: int) -> None:
        """After torch.distributed is up (collective): drop an interrupted save, convert for another world size."""
        main = rank_and_world()[0] == 0
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.point is not None:
                for tag in remove_incomplete_checkpoints(self.dir):
                    say(f"removed {tag}: a checkpoint whose save was interrupted")
        if self._universal(world_size):
            ckpt_dir, tag, saved = (self.dir, self.point.tag, self.point.state) if self.point else self.source
            what = "resuming" if self.point else "continuing"
            where = tag if self.point else ckpt_dir / tag
            say(f"{what} a {saved.world_size}-process checkpoint on {world_size} processes: converting {where} to "
                "DeepSpeed's universal format")
            if main:
                convert_to_universal(ckpt_dir, tag)
        barrier()

    def _load(self, engine, ckpt_dir: Path, tag: str, universal: bool) -> tuple[str, dict]:
        load_path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag + UNIVERSAL_SUFFIX if universal else tag)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load {ckpt_dir / tag}")
        if universal:
            restore_loss_scaler(engine, client_state)
        return load_path, client_state

    def restore(self, engine, state: TrainingState, resolved: ResolvedConfig,
                schedule: ScheduleAfterRestore | None = None) -> TrainingState:
        """The state to train on from: ``state`` (a new run) or the checkpoint's counters, data position, RNG
        states and schedule on top of ``state``'s settings. Seeds every process's RNG for a new run."""
        rank, world_size = rank_and_world()
        schedule = schedule or ScheduleAfterRestore(max_steps=resolved.total_num_steps or 0)
        seed_everything(state.seed * 1000 + rank + 1)  # dropout differs across processes, reproducibly
        universal = self._universal(world_size)
        if self.point is not None:
            load_path, client_state = self._load(engine, self.dir, self.point.tag, universal)
            saved, rng_states = client_training_state(client_state, load_path)
            if len(rng_states) == world_size:
                restore_rng_state(rng_states[rank])
            else:
                seed_everything(state.seed * 1000 + rank + 1 + saved.step)
            if saved.global_batch_size != resolved.global_batch_size:
                say(f"note: the global batch changes from {saved.global_batch_size} to {resolved.global_batch_size} "
                    "sequences; the data stream continues at the same sample")
            state = replace(state, **{name: getattr(saved, name) for name in _RESUMED_FIELDS},
                            lr_knots=schedule_after_restore(engine, saved, resolved, schedule))
            say(f"resumed from {load_path} at step {state.step} ({state.samples_consumed:,} samples consumed)")
            if rank == 0:
                dropped = truncate_after(self.run_dir / METRICS_FILENAME, state.step)
                if dropped:
                    say(f"dropped {dropped} metrics lines past step {state.step} (written by the interrupted run)")
        elif self.source is not None:
            # A new phase of a run (ModernBERT's context extension, or new data): the weights, optimizer state and
            # schedule position of another run's checkpoint, a new data stream from its beginning.
            ckpt_dir, tag, saved = self.source
            self._load(engine, ckpt_dir, tag, universal)
            state.lr_knots = schedule_after_restore(engine, saved, resolved, schedule)
            state.step, state.tokens_seen, state.elapsed_seconds = saved.step, saved.tokens_seen, saved.elapsed_seconds
            if state.lr_knots is not None:
                say(describe_knots(state.lr_knots, state.step + 1))
        return state

    def save(self, engine, state: TrainingState, model_config) -> str:
        """Checkpoint ``state`` (collective); ``latest`` moves to it and older ones beyond ``keep`` go."""
        self.last_tag = save_checkpoint(engine, self.run_dir, state, model_config, self.keep,
                                        before_latest=self.before_latest)
        say(f"saved checkpoint {self.dir / self.last_tag}")
        return self.last_tag
