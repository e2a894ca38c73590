"""The multi-process harness itself: real Horovod jobs over Gloo (2 and 3 ranks) and MPI, every
rank's result checked, and failures or hangs ending the job instead of stalling CI."""
import time

import pytest
import torch

from harness import JobFailed, run_job

pytestmark = pytest.mark.horovod


def _collectives():
    import horovod.torch as hvd
    r, n = hvd.rank(), hvd.size()
    summed = hvd.allreduce(torch.full((5,), float(r + 1)), op=hvd.Sum, name="sum")
    # Variable first dimension per rank (what the sparse path relies on), uint8 payload.
    gathered = hvd.allgather(torch.full((r + 1,), r, dtype=torch.uint8), name="gather")
    return r, n, summed.tolist(), gathered.tolist()


@pytest.mark.parametrize("np_,controller", [(2, "gloo"), (3, "gloo"),
                                            pytest.param(2, "mpi", marks=pytest.mark.mpi)])
def test_collectives_on_every_rank(np_, controller):
    results = run_job(_collectives, np=np_, controller=controller, timeout=120)
    total = float(sum(range(1, np_ + 1)))
    expected_gather = [r for r in range(np_) for _ in range(r + 1)]
    assert [res[0] for res in results] == list(range(np_))
    for rank, size, summed, gathered in results:
        assert size == np_
        assert summed == [total] * 5
        assert gathered == expected_gather


def _rank1_raises():
    import horovod.torch as hvd
    if hvd.rank() == 1:
        raise ValueError("deliberate failure on rank 1")
    # Rank 0 would wait forever in this collective if the launcher did not end the job.
    hvd.allreduce(torch.ones(3), name="never_completes")
    return "unreachable"


@pytest.mark.parametrize("controller", ["gloo", pytest.param("mpi", marks=pytest.mark.mpi)])
def test_failing_rank_ends_the_job(controller):
    start = time.monotonic()
    with pytest.raises(JobFailed, match="deliberate failure on rank 1"):
        run_job(_rank1_raises, np=2, controller=controller, timeout=90)
    assert time.monotonic() - start < 90


def _rank0_hangs():
    import horovod.torch as hvd
    if hvd.rank() == 0:
        time.sleep(3600)
    return hvd.rank()


def test_hang_is_killed_by_timeout():
    start = time.monotonic()
    with pytest.raises(JobFailed, match="timed out"):
        run_job(_rank0_hangs, np=2, timeout=15)
    assert time.monotonic() - start < 60
