"""The backward hooks read nothing back from the device.

On a GPU, a host read of a device tensor in a backward hook (``bool()``, ``item()``,
``tolist()``...) stalls the CPU until the GPU has drained, serializing backward, compression and
communication.  Every compressor's CUDA code path runs here through the engine and its routes
(on the SIMT emulator: kernels/*.cu compiled for the CPU, the same Python that sizes and launches
them), two ranks, and a guard counts the host reads of tensors made while the hooks
(:meth:`Engine.add`) run, in the steps after the plan is final.  Ranks run their hooks in turn
(the other ranks wait), so every read is attributed to the rank in its hooks; the flush, where
reading is allowed, runs after.

The reads that stay are listed per case, each site with its reason (:data:`REASONS`): a case
must read exactly at its listed sites, so a new read fails and a fixed one must leave the list.
On a GPU (``ci/gpu_check.sh``) the same jobs run under ``torch.cuda.set_sync_debug_mode``, and the
cases without listed reads must not synchronize at all.
"""
from __future__ import annotations

import collections
import contextlib
import threading
import traceback
import warnings

import pytest
import torch
from torch.overrides import TorchFunctionMode

from engine_helpers import SLOW, grad, members_of, on_cuda_path
from hvd_compress import methods
from hvd_compress.engine.engine import Engine
from hvd_compress.engine.local import LocalWorld
from hvd_compress.engine.plan import routes_for
from hvd_compress.engine.topology import Topology

#: Tensor methods that copy a value to the host
HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.numpy,
              torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__}
SHAPES = [(3000,), (40, 50), (10,)]
STEPS, WATCHED_FROM = 4, 2        # the first steps plan (and re-plan with the topology): not watched

#: every site (module:function, the innermost of the package) that still reads, and why
REASONS = {
    "codecs/topk.py:select_many": "STC's exact top-k reads its level counts: the chosen level and "
                                  "the trim of more than k candidates size the payload",
    "codecs/ternary.py:_encode": "AdaComp's and STC's payload sizes follow the data (the count of "
                                 "selected entries, the Golomb-coded length)",
    "codecs/base.py:as_fp32_flat": "STC's and eSGD's mean |g| (local_scales) checks its input on "
                                   "the host",
    "codecs/base.py:overflow_check": "local_scales raises on an overflowing sum (STC, eSGD)",
    "methods/esgd.py:prepare": "eSGD's selection follows the loss and its counters (read per step)",
    "methods/laq.py:prepare": "LAQ's lazy rule decides on the host whether a bucket is uploaded: "
                              "the decision is the method, and it sizes the payload",
    "codecs/laq.py:_encode": "LAQ sends an empty payload for a zero radius (a size that follows the data)",
}

EXPECTED = {
    "adacomp:allgather": {"codecs/ternary.py:_encode"},
    "stc:allgather": {"codecs/topk.py:select_many", "codecs/ternary.py:_encode",
                      "codecs/base.py:as_fp32_flat", "codecs/base.py:overflow_check"},
    "esgd:allgather": {"methods/esgd.py:prepare", "codecs/base.py:as_fp32_flat", "codecs/base.py:overflow_check"},
    "laq:allgather": {"methods/laq.py:prepare", "codecs/laq.py:_encode"},
}


def _flat_cases() -> list[str]:
    """Every registered compressor with every flat route it can take at two ranks."""
    return [f"{name}:{route}" for name in sorted(methods.REGISTRY)
            for route in routes_for(methods.from_spec(name), Topology.flat(2))[0]]


CASES = _flat_cases() + ["terngrad:hier_allgather", "qsgd:hier_two_phase"]


class HostReads(TorchFunctionMode):
    """Counts host reads of tensors by site (the innermost frame in the package, the
    simulator's comm excluded: it stands in for the network)."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            frames = [f for f in traceback.extract_stack()[:-1]
                      if "/hvd_compress/" in f.filename and not f.filename.endswith("engine/local.py")]
            if frames:
                self.sites[f"{frames[-1].filename.split('/hvd_compress/')[-1]}:{frames[-1].name}"] += 1
        return func(*args, **(kwargs or {}))


def hooks_in_turn(case: str, kernels) -> tuple[set[str], int]:
    """Run ``case`` (name:route) on ``kernels``' device; returns the sites read in the watched
    hooks and the number of CUDA synchronizations there (GPU only)."""
    name, route = case.split(":")
    hierarchical = route.startswith("hier_")
    size, local = (4, 2) if hierarchical else (2, 1)
    method = methods.from_spec(f"{name}:route='{route[5:]}',hierarchy=True" if hierarchical else
                               f"{name}:route='{route}'")
    members = members_of(method, SHAPES)
    turns = [threading.Event() for _ in range(size)]
    everyone = threading.Barrier(size, timeout=120)
    reads, syncs = HostReads(), []

    def fn(comm):
        with on_cuda_path(comm.rank, kernels.emulated):
            engine = Engine(members, lambda: comm, average=True, cap_bytes=25 * 2 ** 20, link=SLOW, name="t")
            for step in range(STEPS):
                grads = [kernels.put(grad(comm.rank, step, m)) for m in reversed(members)]
                if not turns[comm.rank].wait(timeout=120):
                    raise TimeoutError(f"rank {comm.rank} never got its turn")
                watched = step >= WATCHED_FROM
                with _cuda_syncs(syncs) if watched and not kernels.emulated else contextlib.nullcontext(), \
                        reads if watched else contextlib.nullcontext():
                    for m, g in zip(reversed(members), grads):
                        engine.add(m.index, g)
                turns[comm.rank].clear()
                turns[(comm.rank + 1) % size].set()
                everyone.wait()        # every rank's hooks are over: the flushes may read
                for m in members:
                    engine.result(m.index)
                everyone.wait()
            return engine.plan
    turns[0].set()
    plans = LocalWorld(size, local_size=local).run(fn)
    chosen = {b.route.name for b in plans[0].buckets if not b.bucket.small}
    assert chosen == {route}, (case, chosen)
    return set(reads.sites), len(syncs)


@contextlib.contextmanager
def _cuda_syncs(out: list):
    """Record the synchronizing CUDA calls made inside (``set_sync_debug_mode("warn")``)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    out.extend(w for w in caught if "synchroniz" in str(w.message))


@pytest.mark.parametrize("case", CASES)
def test_hooks_read_nothing_back_from_the_device(case, kernels):
    sites, syncs = hooks_in_turn(case, kernels)
    assert sites == EXPECTED.get(case, set()), f"{case}: host reads in the hooks at {sorted(sites)}"
    if not kernels.emulated and case not in EXPECTED:
        assert syncs == 0, f"{case}: {syncs} CUDA synchronizations in the hooks"


def test_every_read_that_stays_has_its_reason():
    assert set().union(*EXPECTED.values()) == set(REASONS)
    assert set(EXPECTED) <= set(CASES)
