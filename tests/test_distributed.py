"""The multi-process harness (tests/distributed.py): results per rank, a rank's exception re-raised with its rank,
an unmatched collective failing at the group's timeout instead of hanging. (diffusers' device index on CPU ranks,
which the harness patches, is exercised by every test of tests/test_context_parallel.py.)"""

import time

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed

pytestmark = pytest.mark.slow  # spawns process groups (multi-process): left out of the fast set (-m "not slow")


def _rank_and_sum(rank, world_size, offset):
    t = torch.tensor([float(rank + offset)])
    dist.all_reduce(t)
    return rank, dist.get_world_size(), t.item()


def _raise_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("bad input on this rank")
    return rank


def _unmatched_collective(rank, world_size):
    if rank == 1:
        dist.all_reduce(torch.ones(1))  # rank 0 never joins: the group's timeout must end it
    return rank


def test_every_rank_returns_its_result():
    assert run_distributed(_rank_and_sum, world_size=2, args=(10,)) == [(0, 2, 21.0), (1, 2, 21.0)]


def test_a_rank_exception_is_raised_in_the_parent_with_its_rank():
    with pytest.raises(ValueError, match="bad input on this rank") as info:
        run_distributed(_raise_on_rank_one, world_size=2)
    assert any("rank 1 of 2" in note for note in info.value.__notes__)


def test_an_unmatched_collective_fails_at_the_timeout_instead_of_hanging():
    start = time.monotonic()
    with pytest.raises(Exception) as info:
        run_distributed(_unmatched_collective, world_size=2, timeout_s=3)
    assert any("rank 1 of 2" in note for note in info.value.__notes__)
    assert time.monotonic() - start < 60


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="world_size"):
        run_distributed(_rank_and_sum, world_size=0)
    with pytest.raises(ValueError, match="timeout_s"):
        run_distributed(_rank_and_sum, timeout_s=0)
