"""Ray for the preprocessing driver: starting or joining it, the remote functions, and a window of tasks in flight.

Ray is started (or joined) only when there is work for it, so an output that is already complete is
verified without it.
"""
from __future__ import annotations

import functools
import logging
import os
import socket

import ray

from lfzh_ds.errors import InputError, UserError

from .config import PipelineConfig


class RayUnavailable(UserError):
    """No Ray cluster answers at ``--ray-address``: the address is wrong or the cluster is down."""


class SharedStorageError(InputError):
    """A worker cannot read an input or write to the output folder at the driver's path."""


class RaySession:
    """Ray is started (or joined) by ``ensure``, and shut down (or left) by ``close`` only if we started
    (or joined) it. ``local``: we started a local Ray with ``num_workers`` CPUs."""

    def __init__(self, config: PipelineConfig):
        self.config, self.ready, self.owned, self.local = config, False, False, False

    def ensure(self) -> None:
        if self.ready:
            return
        self.ready = True
        if ray.is_initialized():
            return
        runtime_env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
        address = self.config.ray_address
        if address:
            try:  # Ray itself retries an address where nothing answers for many minutes
                if address != "auto":
                    host, _, port = address.split("://")[-1].rpartition(":")
                    socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
                ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
            except (OSError, ValueError) as err:  # ConnectionError is an OSError
                raise RayUnavailable(f"--ray-address {address}: no Ray cluster answers there "
                                     f"({type(err).__name__}: {err}); check the address, or start one with "
                                     f"`ray start --head`") from None
        else:
            ray.init(address="local", num_cpus=self.config.num_workers or os.cpu_count(), include_dashboard=False,
                     runtime_env=runtime_env, logging_level=logging.WARNING)
            self.local = True
        self.owned = True

    def shared_storage(self) -> bool:
        """``config.shared_storage``, or if that is None whether every live Ray node runs on this machine
        (a local Ray, or a cluster of one machine): then the workers see what the driver sees."""
        if self.config.shared_storage is not None:
            return self.config.shared_storage
        here = ray.util.get_node_ip_address()
        return all(node["NodeManagerAddress"] == here for node in ray.nodes() if node["Alive"])

    def max_in_flight(self) -> int:
        """Tasks submitted at once. Twice the CPUs, so a worker never waits for the driver's next
        submission, unless ``num_workers`` caps a Ray that we did not start locally with that many CPUs
        (a cluster joined by ``ray_address`` or an existing connection): then exactly that many."""
        if self.config.num_workers and not self.local:
            return self.config.num_workers
        return 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))

    def close(self) -> None:
        if self.owned:
            ray.shutdown()
            self.owned = False


@functools.cache  # one remote function per process: Ray exports it once per session, not once per job
def remote(fn):
    return ray.remote(num_cpus=1, max_retries=5)(fn)


class TaskWindow:
    """Submit tasks with at most ``limit`` in flight; hand back results as they finish. The most tasks
    in flight at one time is kept in ``result.max_in_flight``."""

    def __init__(self, limit: int, result):
        self.limit, self.pending, self.result = limit, {}, result

    def submit(self, ref, key):
        self.pending[ref] = key
        self.result.max_in_flight = max(self.result.max_in_flight, len(self.pending))

    def full(self) -> bool:
        return len(self.pending) >= self.limit

    def wait_one(self):
        (ref,), _ = ray.wait(list(self.pending), num_returns=1)
        key = self.pending.pop(ref)
        try:
            return key, ray.get(ref)
        except ray.exceptions.RayTaskError as err:  # a worker's clear one-line error, without Ray's traceback
            if isinstance(err.cause, SharedStorageError):
                raise SharedStorageError(str(err.cause)) from None
            raise
