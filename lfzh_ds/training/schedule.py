"""The learning-rate schedule of a restored run: DeepSpeed's scheduler from the config, or knots that replace it.

A run restored from a checkpoint follows its config's schedule (DeepSpeed's scheduler, whose counter the checkpoint
holds) unless the schedule's end moved (``total_num_steps`` "auto" follows --max-steps) or a re-warm is asked for:
then the rate is piecewise linear through knots (``[[step, rate], ...]``, saved in every checkpoint's state as
``lr_knots``) from where the run was, down to 0 at the new end, never jumping up unless asked
(``ScheduleAfterRestore``: launch/pretrain.py's --rewarm-steps and --stretch-schedule). The training loop sets the
rate of each step from the knots (``rate_at``, ``set_learning_rate``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .ds_config import ResolvedConfig


@dataclass
class ScheduleAfterRestore:
    """How a restored run's learning rate goes on when its schedule's end changed (launch/pretrain.py's flags)."""

    max_steps: int
    rewarm_steps: int = 0
    stretch_schedule: bool = False


def rate_at(knots: list, step: int) -> float:
    """The learning rate of optimizer step ``step`` on the piecewise-linear schedule through ``knots``."""
    return float(np.interp(step, [k[0] for k in knots], [k[1] for k in knots]))


def continued_schedule(last_rate: float, last_step: int, total_steps: int, rewarm_steps: int = 0,
                       peak: float | None = None) -> list:
    """Knots of the schedule of a run continued after ``last_step`` (which ran at ``last_rate``) towards a new end
    ``total_steps``: linear from that rate down to 0 after ``total_steps`` (continuing a finished run never makes
    the rate jump up), or with ``rewarm_steps`` first linearly back up to ``peak`` over that many steps."""
    knots = [[last_step, last_rate]]
    if rewarm_steps:
        knots.append([last_step + rewarm_steps, peak])
    knots.append([total_steps + 1, 0.0])
    return knots


def peak_learning_rate(resolved: ResolvedConfig) -> float:
    scheduler = resolved.config.get("scheduler", {}).get("params", {})
    return float(scheduler.get("warmup_max_lr", resolved.config.get("optimizer", {}).get("params", {}).get("lr", 0)))


def set_learning_rate(engine, rate: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = rate


def schedule_change_note(saved, resolved: ResolvedConfig, how: ScheduleAfterRestore) -> str | None:
    """What a resumed run says when its schedule now ends at another step than its checkpoint's (``saved``: the
    checkpoint's ``TrainingState``); None when it ends at the same step, or the checkpoint did not record it."""
    if saved.total_num_steps is None or saved.total_num_steps == resolved.total_num_steps:
        return None
    if how.stretch_schedule:
        then = "the learning rate follows the new schedule (--stretch-schedule)"
    elif how.rewarm_steps:
        then = (f"the learning rate climbs back to its peak over {how.rewarm_steps} steps (--rewarm-steps), then "
                f"decays to 0 at step {resolved.total_num_steps}")
    else:
        then = (f"the learning rate decays on from where it was to 0 at step {resolved.total_num_steps} "
                "(--rewarm-steps N climbs back to the peak first)")
    return (f"note: the learning-rate schedule's total_num_steps changes from {saved.total_num_steps} (the "
            f"checkpoint's) to {resolved.total_num_steps} ({resolved.source} with --max-steps {how.max_steps}): "
            f"from step {saved.step + 1} on {then}")


def schedule_after_restore(engine, saved, resolved: ResolvedConfig, how: ScheduleAfterRestore):
    """The learning-rate knots of a run restored from ``saved`` (the checkpoint's ``TrainingState``; None: the
    config's schedule, via DeepSpeed's scheduler). Called right after ``engine.load_checkpoint``."""
    # a checkpoint from before the rate was recorded: the restored optimizer's rate, the old schedule's next one
    last_rate = float(engine.get_lr()[0]) if saved.learning_rate is None else saved.learning_rate
    changed = saved.total_num_steps is not None and saved.total_num_steps != resolved.total_num_steps
    if how.stretch_schedule or not (changed or how.rewarm_steps):
        scheduler = engine.lr_scheduler
        if scheduler is not None and hasattr(scheduler, "last_batch_iteration"):
            # DeepSpeed's schedulers restore only their counter and the optimizer keeps the rate it saved, which is
            # the old schedule's when total_num_steps changed: set the rate of this schedule at this point.
            scheduler.step(scheduler.last_batch_iteration)
        return None if how.stretch_schedule else saved.lr_knots
    return continued_schedule(last_rate, saved.step, resolved.total_num_steps or how.max_steps,
                              how.rewarm_steps, peak_learning_rate(resolved))


def describe_knots(knots: list, step: int) -> str:
    """The console line of a continued run's schedule from ``step`` on."""
    return (f"learning rate: {rate_at(knots, step):.3g} at step {step}, linear through "
            f"{', '.join(f'{r:.3g} at step {s}' for s, r in knots[1:])}")
