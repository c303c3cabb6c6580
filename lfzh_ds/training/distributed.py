"""The processes of a run: rank and world size, starting torch.distributed, CPU threads, a lost peer, and the few
collectives the training code uses outside DeepSpeed (rank 0 prints, barrier, gather).

The ``deepspeed`` launcher sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` for each process; ``init_distributed`` sets
them for a plain one-process ``python`` run, so after it ``rank_and_world`` is right everywhere.
"""
from __future__ import annotations

import math
import os
import socket

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


def share_cpu_threads() -> int | None:
    """Split this machine's cores between the launcher's local processes (unless OMP_NUM_THREADS is set):
    N processes with all-core OpenMP pools each made CPU steps up to 10x slower here."""
    if "OMP_NUM_THREADS" in os.environ:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // int(os.environ.get("LOCAL_SIZE", "1")))
    torch.set_num_threads(threads)
    return threads
