"""The resumable distributed sampler: deterministic, resumable from one integer, independent of world size."""
from collections import Counter

import pytest

from lfzh_ds.training.sampler import ResumableDistributedSampler


def sampler(rank=0, world=2, n=10, batch=4, micro=1, seed=7):
    return ResumableDistributedSampler(n, batch, micro, rank=rank, world_size=world, seed=seed)


def flat(micro_batches):
    return [(p.epoch, p.index) for mb in micro_batches for p in mb]


def test_each_epoch_is_a_permutation_of_the_dataset():
    s = sampler(n=10, batch=4)
    stream = [s.position(i) for i in range(30)]
    for epoch in range(3):
        chunk = stream[epoch * 10:(epoch + 1) * 10]
        assert sorted(p.index for p in chunk) == list(range(10))
        assert {p.epoch for p in chunk} == {epoch}
    assert [p.index for p in stream[:10]] != [p.index for p in stream[10:20]]  # reshuffled per epoch


def test_processes_split_each_global_batch_without_overlap():
    world, batch = 2, 8
    parts = [flat(sampler(rank=r, world=world, batch=batch, micro=2).micro_batches(16)) for r in range(world)]
    assert parts[0] + parts[1] == [(p.epoch, p.index) for p in sampler(batch=batch).global_batch(16)]
    assert not set(parts[0]) & set(parts[1])


def test_resuming_at_a_sample_count_replays_the_same_stream():
    a, b = sampler(seed=3), sampler(seed=3)
    uninterrupted = [flat(a.micro_batches(step * 4)) for step in range(6)]
    resumed = [flat(b.micro_batches(step * 4)) for step in range(3, 6)]
    assert uninterrupted[3:] == resumed


def test_a_steps_samples_do_not_depend_on_the_number_of_processes():
    batch = 8
    two = flat(sampler(rank=0, world=2, batch=batch, micro=2).micro_batches(24)) + \
        flat(sampler(rank=1, world=2, batch=batch, micro=2).micro_batches(24))
    one = flat(sampler(rank=0, world=1, batch=batch, micro=4).micro_batches(24))
    assert two == one


def test_micro_batches_match_the_accumulation_steps():
    s = sampler(world=2, batch=12, micro=3)
    assert s.accumulation_steps == 2
    assert [len(mb) for mb in s.micro_batches(0)] == [3, 3]


def test_another_seed_gives_another_order():
    assert flat(sampler(seed=1).micro_batches(0)) != flat(sampler(seed=2).micro_batches(0))


def test_every_sample_is_seen_once_per_epoch_across_processes():
    n, world, batch = 12, 2, 4
    seen = Counter()
    for step in range(n // batch):
        for r in range(world):
            seen.update(i for _, i in flat(sampler(rank=r, world=world, n=n, batch=batch).micro_batches(step * batch)))
    assert seen == Counter(range(n))


def test_batch_that_does_not_divide_is_refused():
    with pytest.raises(ValueError, match="not a multiple"):
        sampler(world=2, batch=6, micro=2)


def test_micro_batch_numbers_are_those_of_a_one_process_run_of_the_same_step():
    """Dropout seeds come from (seed, step, global_micro_batch_index): for a run resumed on another number of
    processes to draw the same masks, micro-batch j of rank r must be numbered as the one-process run numbers the
    micro-batch holding the same samples."""
    single = sampler(rank=0, world=1, batch=12, micro=2).micro_batches(36)
    for world in (2, 3, 6):
        numbers = []
        for rank in range(world):
            s = sampler(rank=rank, world=world, batch=12, micro=2)
            for j, micro_batch in enumerate(s.micro_batches(36)):
                numbers.append(s.global_micro_batch_index(j))
                assert micro_batch == single[numbers[-1]], (world, rank, j)
        assert sorted(numbers) == list(range(6))
