"""What the command-line scripts share: a user's mistake (``lfzh_ds.errors.UserError``: a missing file, a bad value,
a corrupt shard) ends in one line naming it and exit status 2, not a traceback; any other exception is a bug in the
toolkit and keeps its traceback (exit status 1). ``main()`` functions raise as usual for callers in Python.

The console scripts of ``pyproject.toml`` point at the functions below, which wrap each ``main`` the way
``python launch/x.py`` does under ``__main__``, so both ways of running a command keep that promise.
"""
from __future__ import annotations

import importlib
import sys

from lfzh_ds.errors import UserError


def run_main(main, prog: str) -> int:
    try:
        return main() or 0
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        return 2


def exit_run(status: int):
    """End a training script (pretrain, finetune) with ``status``. After a failure once torch.distributed is loaded,
    every process of the run leaves the same way (``lfzh_ds.training.distributed.leave``), so that the ``deepspeed``
    launcher's status is this one; a failure before that has no process to wait for: a plain exit."""
    if status and "torch.distributed" in sys.modules:
        from lfzh_ds.training.distributed import leave

        leave(status)
    sys.exit(status)


def _script(module: str, prog: str) -> int:
    # The command's module is imported when the command runs, so each loads only what it needs
    # (lfzh-preprocess neither torch nor DeepSpeed).
    return run_main(importlib.import_module(f"launch.{module}").main, prog)


def preprocess() -> int:
    return _script("preprocess", "lfzh-preprocess")


def convert() -> int:
    return _script("convert", "lfzh-convert")


def export() -> int:
    return _script("export", "lfzh-export")


def evaluate() -> int:
    return _script("evaluate", "lfzh-evaluate")


def finetune() -> int:
    exit_run(_script("finetune", "lfzh-finetune"))


def pretrain() -> int:
    # launch/pretrain.py reports its own failures (it knows the run's exit statuses: 2, 3, 4); one process, or one per
    # device under `deepspeed --no_python lfzh-pretrain ...`.
    from launch.pretrain import main

    exit_run(main())
