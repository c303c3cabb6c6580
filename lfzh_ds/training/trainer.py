"""The one training loop, used by pretraining (``training.pretraining``) and fine-tuning (``lfzh_ds.finetuning``).

As in nanoGPT and torchtitan there is one loop and the objective supplies what differs: the step's micro-batches
(and with them the data position), the loss of a micro-batch, the evaluation and when it runs. The loop does the
rest the same way for both: the learning rate, dropout seeded per (seed, step, micro-batch), backward and optimizer
step through DeepSpeed, one ``metrics.jsonl`` line and TensorBoard events per step, the console line, the NaN guard,
checkpoints (``checkpoint.CheckpointManager``: keep-N, resumable exactly) and the curves PNG at the end (the
objective's ``curves``).
"""
from __future__ import annotations

import math
import os
import signal
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from .checkpoint import CheckpointManager, TrainingState
from .curves import OBJECTIVE_CURVES, CurveSpec, plot_curves
from .distributed import barrier, rank_and_world, say
from .metrics import MetricsLogger, Throughput
from .schedule import rate_at, set_learning_rate


class TrainingDiverged(RuntimeError):
    """The loss stayed non-finite for too many consecutive steps."""


class FaultInjection:
    """Test hook, read from the ``LFZH_FAULT`` environment variable; nothing happens when it is unset.

    ``kill_at_step=N``: rank 0 SIGKILLs itself when step N starts (a crash in the middle of a run);
    ``kill_in_save=N``: rank 0 SIGKILLs itself after every file of step N's checkpoint is written but before
    ``latest`` moves (a crash during a save); ``nan_from_step=N``: the loss is multiplied by NaN from step N on;
    ``inf_grad_at_step=N`` (or ``N+M+...``): in those steps rank 0's gradients become infinite (the loss's gradient
    is multiplied by inf in the backward pass; the loss itself stays finite), an fp16 overflow;
    ``hold_at_step=N``: every process but rank 0 stops (sleeps) when step N starts, a node that hangs: rank 0 waits
    in step N's first collective, so a test can kill that node at a known point, however fast the steps are.
    """

    def __init__(self, spec: str | None, rank: int):
        self.rank = rank
        self.kill_at_step = self.kill_in_save = self.nan_from_step = self.hold_at_step = None
        self.inf_grad_at_step: set[int] = set()
        for item in filter(None, (spec or "").split(",")):
            name, _, value = item.partition("=")
            if name == "inf_grad_at_step":
                self.inf_grad_at_step = {int(v) for v in value.split("+")}
                continue
            if name not in ("kill_at_step", "kill_in_save", "nan_from_step", "hold_at_step"):
                raise ValueError(f"LFZH_FAULT: unknown fault {name!r}")
            setattr(self, name, int(value))

    @classmethod
    def from_env(cls) -> "FaultInjection":
        return cls(os.environ.get("LFZH_FAULT"), rank_and_world()[0])

    def _kill(self):
        if self.rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    def at_step_start(self, step: int) -> None:
        if self.kill_at_step == step:
            self._kill()
        if self.hold_at_step == step and self.rank != 0:
            while True:
                time.sleep(60)

    def before_latest(self, step: int) -> None:
        if self.kill_in_save == step:
            self._kill()

    def poison(self, loss, step: int):
        if self.nan_from_step is not None and step >= self.nan_from_step:
            return loss * float("nan")
        if step in self.inf_grad_at_step and self.rank == 0:
            loss.register_hook(lambda grad: grad * float("inf"))
        return loss


class Objective:
    """What one kind of training supplies to ``train``; subclasses fill in the hooks.

    ``name`` labels the progress bar. ``model_config`` goes into every checkpoint (its ``config.json``). ``curves``
    says what the run's curves PNG draws (None: the curves of the objective whose number the validation lines hold).

    What a resume must keep is the objective's to declare, before any compute (so these two are class methods):
    ``kept_settings`` lists the run's settings (``checkpoint.KeptSetting``) and ``recorded_settings`` reads them out
    of a checkpoint's state; ``CheckpointManager.keep_settings`` compares them, by one rule for every objective.
    """

    name = "train"
    model_config = None
    curves: CurveSpec | None = None

    @classmethod
    def kept_settings(cls, settings, *context) -> list:
        """The settings a resumed run must share with its checkpoint, with their values now."""
        return []

    @classmethod
    def recorded_settings(cls, state: TrainingState) -> dict:
        """The kept settings as a checkpoint's state recorded them (a name missing: not recorded)."""
        return {}

    def micro_batches(self, state: TrainingState):
        """This process's micro-batches of the optimizer step after ``state`` (whose counters say where the data
        stands), as ``(index of the micro-batch in the whole global batch, batch on the device)``."""
        raise NotImplementedError

    def loss(self, engine, batch: dict):
        return engine(**batch).loss

    def counts(self, batch: dict) -> tuple[int, int, int]:
        """(non-padding tokens, positions, training FLOPs) of a micro-batch; FLOPs 0 where not counted."""
        mask = batch["attention_mask"]
        return int(mask.sum()), mask.numel(), 0

    def extend_record(self, record: dict, flops: float) -> None:
        """Add the objective's own numbers to a step's metrics line (``flops``: all processes, this step)."""

    def console_line(self, record: dict, max_steps: int) -> str:
        return f"step {record['step']}/{max_steps} | loss {record['loss']:.4f} | lr {record['lr']:.3g}"

    def evaluates_at(self, step: int, last: bool) -> bool:
        return False

    def evaluate(self, engine, state: TrainingState, final: bool) -> dict | None:
        """Evaluate (collective); returns the ``val`` metrics line, or None."""
        return None

    def evaluate_at_start(self, engine, state: TrainingState) -> dict | None:
        """The evaluation before the first step of a run that is not resumed (None: none)."""
        return None

    def state_dict(self) -> dict | None:
        """What the objective carries across a resume (saved in every checkpoint's ``training_state.json``)."""
        return None

    def load_state_dict(self, data: dict | None) -> None:
        pass


def dropout_seed(seed: int, step: int, micro_batch_index: int) -> int:
    """Dropout masks depend on (seed, step, which micro-batch of the global batch) only: a resumed run, on any
    number of processes, draws the same masks as the uninterrupted one."""
    return int(np.random.SeedSequence([seed, step, micro_batch_index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def loss_scale_of(engine) -> float:
    for name in ("cur_scale", "loss_scale"):
        value = getattr(engine.optimizer, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return 1.0


def train(engine, objective: Objective, checkpoints: CheckpointManager, state: TrainingState, *, max_steps: int,
          global_batch_size: int, save_interval: int, log_interval: int, max_nonfinite_steps: int,
          fault: FaultInjection | None = None) -> TrainingState:
    """Optimizer steps from ``state.step + 1`` to ``max_steps``; returns the final state. Every process calls it."""
    rank, world_size = rank_and_world()
    main = rank == 0
    fault = fault or FaultInjection(None, rank)
    run_dir = checkpoints.run_dir
    metrics = MetricsLogger(run_dir, enabled=main, monitor=engine.monitor, append=checkpoints.resumed)
    objective.load_state_dict(state.objective)

    def evaluate(record: dict | None) -> None:
        if record is not None:
            metrics.log_val(record)

    if not checkpoints.resumed and state.step < max_steps:
        evaluate(objective.evaluate_at_start(engine, state))
    progress = tqdm(total=max_steps, initial=state.step, desc=objective.name, unit="step", disable=None,
                    dynamic_ncols=True) if main else None
    throughput = Throughput()
    throughput.reset(state.tokens_seen)
    run_started = time.time() - state.elapsed_seconds
    nonfinite_run = 0
    engine.train()
    while state.step < max_steps:
        step = state.step + 1
        fault.at_step_start(step)
        if state.lr_knots:
            set_learning_rate(engine, rate_at(state.lr_knots, step))
        lr = float(engine.get_lr()[0])  # the rate this step's update uses (the scheduler moves after it)
        loss_sum = torch.zeros((), dtype=torch.float64)
        tokens = positions = flops = micro_batches = 0
        for index, batch in objective.micro_batches(state):
            torch.manual_seed(dropout_seed(state.seed, step, index))
            loss = fault.poison(objective.loss(engine, batch), step)
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().double().cpu()
            t, p, f = objective.counts(batch)
            tokens, positions, flops, micro_batches = tokens + t, positions + p, flops + f, micro_batches + 1
        totals = torch.tensor([float(loss_sum), tokens, positions, flops, micro_batches], dtype=torch.float64,
                              device=engine.device)
        dist.all_reduce(totals)
        step_loss = float(totals[0]) / float(totals[4])
        state.step, state.learning_rate = step, lr
        state.samples_consumed += global_batch_size
        state.tokens_seen += int(totals[1])
        state.skipped_steps = int(engine.skipped_steps)
        state.elapsed_seconds = time.time() - run_started
        record = {"step": step, "loss": step_loss, "lr": lr, "loss_scale": loss_scale_of(engine),
                  "skipped_steps": state.skipped_steps, "tokens": state.tokens_seen,
                  "samples": state.samples_consumed, "tokens_per_second": throughput.update(state.tokens_seen),
                  "wall_time": time.time(), "elapsed_seconds": state.elapsed_seconds,
                  "padding_efficiency": float(totals[1] / totals[2])}  # throughput: all processes, this step
        objective.extend_record(record, float(totals[3]) / throughput.seconds)
        metrics.log_train(record)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.3f}", refresh=False)
        if main and log_interval > 0 and step % log_interval == 0:
            line = objective.console_line(record, max_steps)
            progress.write(line) if progress is not None and not progress.disable else print(line, flush=True)

        nonfinite_run = 0 if math.isfinite(step_loss) else nonfinite_run + 1
        if nonfinite_run >= max_nonfinite_steps:
            if progress is not None:
                progress.close()
            where = (f"the last good checkpoint is {checkpoints.dir / checkpoints.last_tag}" if checkpoints.last_tag
                     else "no checkpoint was saved before it")
            raise TrainingDiverged(
                f"the loss was not finite for {nonfinite_run} consecutive steps (steps {step - nonfinite_run + 1}-"
                f"{step}); stopping. {where[0].upper() + where[1:]}. Resume from it with --resume and a lower "
                "learning rate, or check the data.")
        last_step = step == max_steps
        if objective.evaluates_at(step, last_step):
            evaluate(objective.evaluate(engine, state, final=last_step))
        if (save_interval > 0 and step % save_interval == 0) or last_step:
            if nonfinite_run:
                say(f"not saving a checkpoint at step {step}: the loss is not finite")
            else:
                state.objective = objective.state_dict()
                checkpoints.save(engine, state, objective.model_config)
        throughput.reset(state.tokens_seen)

    if progress is not None:
        progress.close()
    if main and metrics.path.is_file() and metrics.path.stat().st_size:
        say(f"curves: {plot_curves(run_dir, curves=objective.curves or OBJECTIVE_CURVES)}")
    barrier()
    return state
