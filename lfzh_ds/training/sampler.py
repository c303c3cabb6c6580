"""A deterministic distributed sampler whose whole state is one integer: the number of samples consumed.

The training stream is the concatenation of per-epoch permutations of the dataset, each drawn from
``(seed, epoch)`` alone. Optimizer step ``s`` (counted from the run's data start) takes the next
``global_batch_size`` positions of that stream; process ``r`` of ``W`` takes the ``r``-th contiguous
``global_batch_size / W`` of them and splits them into micro-batches.

Consequences the checkpoints rely on:
- resuming at ``samples_consumed`` replays exactly the samples an uninterrupted run would have seen;
- the set of samples in a step does not depend on the number of processes, so a run resumed on another
  world size (with the same global batch) continues the same data stream;
- nothing depends on the machine, the number of data-loading workers or the order processes start in.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, ShardError


@dataclass(frozen=True)
class SamplePosition:
    """Where a sample sits in the stream: which epoch's permutation, and the dataset index it maps to."""

    epoch: int
    index: int


class ResumableDistributedSampler:
    def __init__(self, num_samples: int, global_batch_size: int, micro_batch_size: int, *, rank: int,
                 world_size: int, seed: int):
        if num_samples <= 0:
            raise ShardError("the training split is empty: preprocess more text or lower --val-fraction")
        if global_batch_size % (micro_batch_size * world_size):
            raise ConfigError(f"global batch {global_batch_size} is not a multiple of micro-batch {micro_batch_size} "
                              f"x {world_size} processes")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self._permutations: dict[int, np.ndarray] = {}

    @property
    def per_rank_batch_size(self) -> int:
        return self.global_batch_size // self.world_size

    @property
    def accumulation_steps(self) -> int:
        return self.per_rank_batch_size // self.micro_batch_size

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) > 2:  # the stream only moves forward
                self._permutations.pop(min(self._permutations))
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._permutations[epoch] = rng.permutation(self.num_samples)
        return self._permutations[epoch]

    def position(self, stream_offset: int) -> SamplePosition:
        epoch, offset = divmod(stream_offset, self.num_samples)
        return SamplePosition(epoch=epoch, index=int(self.permutation(epoch)[offset]))

    def global_batch(self, samples_consumed: int) -> list[SamplePosition]:
        """Every process's samples of the step that starts at ``samples_consumed``, in rank order."""
        return [self.position(samples_consumed + i) for i in range(self.global_batch_size)]

    def micro_batches(self, samples_consumed: int) -> list[list[SamplePosition]]:
        """This process's micro-batches for the step that starts at ``samples_consumed``."""
        start = samples_consumed + self.rank * self.per_rank_batch_size
        mine = [self.position(start + i) for i in range(self.per_rank_batch_size)]
        m = self.micro_batch_size
        return [mine[i:i + m] for i in range(0, len(mine), m)]

    def global_micro_batch_index(self, j: int) -> int:
        """Which micro-batch of the whole global batch this process's ``j``-th micro-batch is."""
        return self.rank * self.accumulation_steps + j

    def epoch_of(self, samples_consumed: int) -> float:
        return samples_consumed / self.num_samples
