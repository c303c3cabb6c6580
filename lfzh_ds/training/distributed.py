"""The processes of a run: rank and world size, starting torch.distributed, CPU threads, a lost peer, the few
collectives the training code uses outside DeepSpeed (rank 0 prints, barrier, gather), and how the processes of a
launched run leave when it fails (``leave``).

The ``deepspeed`` launcher sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` for each process; ``init_distributed`` sets
them for a plain one-process ``python`` run, so after it ``rank_and_world`` is right everywhere.
"""
from __future__ import annotations

import math
import os
import socket
import sys
import time
from datetime import timedelta

import deepspeed
import deepspeed.ops
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes), as the launcher (or ``init_distributed``) set them."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def say(message: str) -> None:
    """Print on rank 0 only (every process runs the same code)."""
    if rank_and_world()[0] == 0:
        print(message, flush=True)


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if _initialized():
        dist.barrier()


def gather_objects(obj) -> list:
    """Every process's ``obj``, in rank order (collective; ``[obj]`` without torch.distributed)."""
    if not _initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rank_batches(order: list, batch_size: int, rank: int, world: int) -> list[list]:
    """This process's share of ``order`` (dealt out round-robin) in batches, padded with empty batches so that every
    process runs the same number of forwards: ZeRO-3 gathers parameters collectively in each forward. An empty
    batch stands for a forward on any input whose result is not counted."""
    mine = order[rank::world]
    forwards = math.ceil(math.ceil(len(order) / world) / batch_size)
    batches = [mine[j:j + batch_size] for j in range(0, len(mine), batch_size)]
    return batches + [[]] * (forwards - len(batches))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> int | None:
    """Start torch.distributed the way the ``deepspeed`` launcher expects; also works without the launcher.
    Returns the CPU threads this process was given (``share_cpu_threads``), or None where it was left alone.

    On the CPU accelerator, DeepSpeed JIT-compiles a shared-memory all-reduce (~30 s on a fresh machine) that only
    its inference path uses; training's collectives go through gloo, so the build is switched off here.
    """
    if "RANK" not in os.environ:  # a plain `python launch/pretrain.py`: one process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    accelerator = get_accelerator()
    threads = None
    if accelerator.device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        threads = share_cpu_threads()
    else:  # each process on its own GPU before the first collective (NCCL refuses two ranks on one device)
        accelerator.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    return threads


def local_device() -> torch.device:
    """This process's accelerator device (the CPU on the CPU accelerator)."""
    return torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", "0"))))


# How a collective fails when a peer process dies: gloo's and torch.distributed's wording (a plain RuntimeError for
# gloo; DistError and its subclasses elsewhere).
_LOST_PEER_MARKERS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Socket closed",
                      "NCCL communicator was aborted")


def lost_a_peer(err: BaseException) -> bool:
    """True when ``err`` is a collective that failed because another process of the run stopped."""
    distributed_error = getattr(dist, "DistError", ())
    return isinstance(err, distributed_error) or (
        isinstance(err, RuntimeError) and any(marker in str(err) for marker in _LOST_PEER_MARKERS))


def lost_peer_message(err: BaseException, output_dir) -> str:
    """What a process says when ``lost_a_peer(err)`` (without the command's ``error:`` prefix)."""
    reason = str(err).strip().splitlines()[-1].rpartition("] ")[2].partition(". ")[0][:200] or type(err).__name__
    return (f"rank {rank_and_world()[0]} lost contact with another process of the run ({reason}): a process or node "
            f"stopped (see its log). Stopping; once all nodes are back, start the same command with --resume on "
            f"every node to continue from the last checkpoint in {output_dir}")


# ---------------------------------------------------------------------------------------------- leaving a run

# The exit statuses of launch/pretrain.py and launch/finetune.py (1 stays Python's, for an unexpected traceback).
EXIT_DONE, EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_LOST_PEER = 0, 2, 3, 4
LEAVE_TIMEOUT_S = 60  # how long a failed process waits at the exit for the others to stop the same way
PRE_INIT_WAIT_S = 10  # before torch.distributed is up: how long the other processes give rank 0 to say why and leave
_LEAVE_KEY = "lfzh_ds/leave"


def _all_arrive(store, key: str, world: int) -> None:
    """A barrier on the run's rendezvous store (no gloo or NCCL communicator involved), bounded by
    ``LEAVE_TIMEOUT_S``: returns once every process has called it with ``key``; raises on timeout or when the
    store is gone."""
    if store.add(key, 1) == world:
        store.set(f"{key}/all", "1")
    store.wait([f"{key}/all"], timedelta(seconds=LEAVE_TIMEOUT_S))


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass


def leave(status: int):
    """End this process of a launched run that failed with ``status`` (2, 3 or 4), the same way on every process,
    so that the launcher's status is ``status`` every time. Never returns. The scripts' ``__main__`` call it after
    ``main()`` has printed the error and returned the status; ``main()`` itself returns the status, for callers in
    Python (the tests run it in-process).

    The ``deepspeed`` launcher ends all its processes as soon as one exits and takes the first non-zero status it
    sees. A plain ``sys.exit`` runs the interpreter's teardown, where the C++ threads of gloo, the rendezvous store
    and DeepSpeed can abort a process ("terminate called without an active exception", status -6: the launcher's
    250 instead of 3 in 1 of 6 runs of a NaN stop). So:

    * a failure every process reached (2 after torch.distributed started, 3: each raised the same error): all meet
      on the rendezvous store, let go of their communicators (``destroy_process_group``, which NCCL may need to do
      together), meet again, and leave with ``os._exit(status)`` once stdout and stderr are flushed: no teardown,
      and no process is left behind to notice the others go. A process that does not come within
      ``LEAVE_TIMEOUT_S`` is not waited for.
    * 2 before torch.distributed started: rank 0 (which said why) leaves at once; the others wait up to
      ``PRE_INIT_WAIT_S`` for the launcher to end them, so that rank 0's message and status come first.
    * 4 (a peer is gone): nothing to meet; flush and ``os._exit(4)`` at once.
    """
    rank, world = rank_and_world()
    try:
        if status != EXIT_LOST_PEER and world > 1:
            if _initialized():
                store = dist.distributed_c10d._get_default_store()  # kept: it outlives the process group
                _all_arrive(store, f"{_LEAVE_KEY}/stopped", world)
                dist.destroy_process_group()
                _all_arrive(store, f"{_LEAVE_KEY}/released", world)
            elif rank != 0:
                _flush()
                time.sleep(PRE_INIT_WAIT_S)
    except Exception:  # a peer gone meanwhile, a timeout: leave all the same, with the same status
        pass
    finally:
        _flush()
        os._exit(status)


def share_cpu_threads() -> int | None:
    """Split this machine's cores between the launcher's local processes (unless OMP_NUM_THREADS is set):
    N processes with all-core OpenMP pools each made CPU steps up to 10x slower here."""
    if "OMP_NUM_THREADS" in os.environ:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // int(os.environ.get("LOCAL_SIZE", "1")))
    torch.set_num_threads(threads)
    return threads
