"""The driver's one task loop: submit Ray tasks, keep a bounded number in flight, collect them as they finish.

Every stage that runs on the workers (chunks, near-dedup pairs, shards) is this loop over its own work:

    run_tasks(todo, open_window, make_task, finish)

``todo`` yields the stage's work that is not stored yet (what a rerun finds stored it counts and skips
itself); ``make_task(item)`` says which function a worker runs on it, with which arguments, and under
which key its answer comes back; ``finish(key, value)`` stores or records the answer as soon as it
arrives, in the order tasks finish. So a job killed at any moment loses only the tasks in flight: each
finished chunk result and shard is already on disk, and a rerun redoes only what is missing.

Failures: a worker that dies is retried by Ray (``ray_session.remote``: ``max_retries``); an exception
raised by a task stops the loop and the job (a ``SharedStorageError`` as its own one-line message).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple, TypeVar

from .ray_session import TaskWindow, remote

Item = TypeVar("Item")


class Task(NamedTuple):
    """One Ray task: ``fn(*args)`` on a worker; its answer comes back to ``finish`` with ``key``."""
    key: Any  # what ``finish`` needs to place the answer (kept on the driver while the task runs: keep it small)
    fn: Callable  # a module-level function (Ray exports it once per session)
    args: tuple


def run_tasks(todo: Iterable[Item], open_window: Callable[[], TaskWindow], make_task: Callable[[Item], Task],
              finish: Callable[[Any, Any], None]) -> None:
    """Submit a task for every item of ``todo``, with at most ``window.limit`` in flight, and hand each answer to
    ``finish(key, value)`` as it finishes. ``open_window`` is called at the first item (so Ray starts only when a
    stage has work for it) and ``make_task`` only once a slot is free (so a task's data is built when it is sent)."""
    window = None
    for item in todo:
        if window is None:
            window = open_window()
        while window.full():
            finish(*window.wait_one())
        task = make_task(item)
        window.submit(remote(task.fn).remote(*task.args), task.key)
    while window is not None and window.pending:
        finish(*window.wait_one())
