"""The hot path: the engine's timings and timeline, buckets decoded in the hooks as soon as their
collective completes, and non-finite handling on the device path (flags that stay on the
device, codec overflow carried in the payload) giving the host path's bits."""
from __future__ import annotations

import math
import threading

import pytest
import torch

from engine_helpers import SLOW, grad, members_of, run_engines, same_bits
from hvd_compress import methods
from hvd_compress.codecs.randk import RandomKCodec
from hvd_compress.codecs.sign import MajorityVoteCodec, OneBitCodec, ScaledSignCodec
from hvd_compress.codecs.terngrad import TernGradCodec
from hvd_compress.codecs.topk import TopKCodec
from hvd_compress.engine.engine import Engine, Timings
from hvd_compress.engine.local import LocalWorld


def test_timings_count_each_part_once_and_the_timeline_is_ordered():
    results = run_engines("terngrad:route='allgather'", 2, steps=3, cap_mb=0.005)
    engine = results[0][1]
    seconds = engine.timings.seconds
    assert set(seconds) == set(Timings.PARTS) and all(v >= 0 for v in seconds.values())
    assert seconds["encode"] > 0 and seconds["decode"] > 0
    events = engine.timings.events
    names = [e[1] for e in events]
    assert names[0] == "begin" and names[-1] == "end" and names.count("flush") == 1
    assert [t for t, _, _ in events] == sorted(t for t, _, _ in events)
    buckets = {b for _, what, b in events if what == "encoded"}
    assert buckets == {b for _, what, b in events if what == "decoded"} == {0, 1, 2}


def test_a_bucket_is_decoded_in_the_hooks_once_its_collective_completes():
    """Rank 0 hands over bucket 0, then rank 1 does (the allgather completes), then rank 0 hands
    over the next bucket: in that hook it decodes bucket 0, before any flush.  The results are
    the bits of a run that decodes everything in the flush."""
    spec = "terngrad:route='allgather'"
    method = methods.from_spec(spec)
    members = members_of(method)
    order = list(reversed(members))                 # p2 (small), p1, p0: one member per bucket
    turn = [threading.Event(), threading.Event()]
    turn[0].set()

    def fn(comm):
        engine = Engine(members, lambda: comm, average=True, cap_bytes=0, link=SLOW, name="t")
        first, rest = order[:2], order[2:]
        for part in (first, rest):
            assert turn[comm.rank].wait(60)
            turn[comm.rank].clear()
            for m in part:
                engine.add(m.index, grad(comm.rank, 0, m))
            turn[1 - comm.rank].set()
        outs = [engine.result(m.index).clone() for m in members]
        return outs, list(engine.timings.events)
    results = LocalWorld(2).run(fn)
    events = results[0][1]
    flush = next(i for i, e in enumerate(events) if e[1] == "flush")
    early = [e[2] for e in events[:flush] if e[1] == "decoded"]
    assert early, events
    reference = run_engines(spec, 2, steps=1, cap_mb=0)
    for rank in range(2):
        for a, b in zip(results[rank][0], reference[rank][0][0]):
            assert same_bits(a, b)


def _poisoned(rank, step, m):
    g = grad(rank, step, m)
    if (rank, step, m.index) == (1, 1, 0):
        g[7] = float("inf")
    return g


def _huge(rank, step, m):
    """Finite, but its sum of squares overflows fp32 (QSGD's norm, the sign codecs' sums)."""
    g = grad(rank, step, m)
    if (rank, step, m.index) == (0, 1, 1):
        g.fill_(3e37)
    return g


@pytest.mark.emu
@pytest.mark.parametrize("spec,grad_fn", [
    ("terngrad:error_feedback=True,route='allgather'", _poisoned),
    ("qsgd:error_feedback=True,route='two_phase'", _poisoned),
    ("qsgd:norm='l2',error_feedback=True,route='allgather'", _huge),
    ("efsignsgd:route='allgather'", _huge),
    ("sketch:route='allgather'", _huge)])
def test_non_finite_on_the_device_path_gives_the_host_bits(spec, grad_fn):
    """The device path flags members without a host read (device flags; a codec overflow in the
    payload's flag instead of an exception): the same outputs (NaN for the flagged members on
    every rank), the same skipped step and the same state as the host path."""
    host = run_engines(spec, 2, steps=3, grad_fn=grad_fn)
    device = run_engines(spec, 2, steps=3, grad_fn=grad_fn, cuda_path=True)
    for rank in range(2):
        (h_outs, h_engine), (d_outs, d_engine) = host[rank], device[rank]
        assert any(math.isnan(float(t.reshape(-1)[0])) or not bool(torch.isfinite(t).all()) for t in h_outs[1])
        for step in range(3):
            for a, b in zip(h_outs[step], d_outs[step]):
                assert same_bits(a, b), (rank, step)
        h_engine.finalize()
        d_engine.finalize()
        assert h_engine.stats.skipped_steps == d_engine.stats.skipped_steps == 1


@pytest.mark.emu
@pytest.mark.parametrize("spec,grad_fn", [
    ("topk:route='allgather'", grad), ("topk:route='sparse_two_phase'", grad),
    ("dgc:route='allgather'", grad), ("dgc:route='sparse_two_phase'", grad),
    ("graddrop:route='allgather'", _poisoned)])
def test_fixed_capacity_top_k_gives_the_host_bits(spec, grad_fn):
    """The top-k family's device payloads have a fixed capacity (padding after the sent entries,
    no host read of the count); decoding, DGC's momentum masking and the sparse two-phase split
    skip the padding, so every step's outputs match the host path's bit for bit."""
    host = run_engines(spec, 2, steps=3, grad_fn=grad_fn)
    device = run_engines(spec, 2, steps=3, grad_fn=grad_fn, cuda_path=True)
    for rank in range(2):
        for step in range(3):
            for a, b in zip(host[rank][0][step], device[rank][0][step]):
                assert same_bits(a, b), (rank, step)


@pytest.mark.parametrize("spec,codec_cls", [("terngrad:route='allgather'", TernGradCodec),
                                            ("topk:route='allgather'", TopKCodec),
                                            ("onebit:route='allgather'", OneBitCodec),
                                            ("efsignsgd:route='allgather'", ScaledSignCodec),
                                            ("signsgd:route='allgather'", MajorityVoteCodec),
                                            ("randomk:route='allreduce'", RandomKCodec)])
def test_a_bucket_is_one_codec_call(monkeypatch, spec, codec_cls):
    """After the first step (which sizes the payloads once), the engine hands a bucket's tensors
    to the codec at once: one ``encode_many`` and one ``decode_many`` per bucket and rank, no
    per-tensor encode or decode (their results: the engine tests' simulations, which encode
    tensor by tensor)."""
    calls: dict[int, list[str]] = {}
    for name in ("encode_many", "decode_many", "_encode", "decode_accumulate"):
        real = getattr(codec_cls, name)
        monkeypatch.setattr(codec_cls, name, lambda self, *a, _real=real, _name=name, **k:
                            (calls.setdefault(threading.get_ident(), []).append(_name), _real(self, *a, **k))[1])
    results = run_engines(spec, 2, steps=2, after_step=lambda rank, step, engine:
                          calls.pop(threading.get_ident(), None) if step == 0 else None)
    compressed = [b for b in results[0][1].buckets if not b.small]
    assert compressed and sum(len(b.members) for b in compressed) > len(compressed)
    assert sorted(sum(calls.values(), [])) == sorted(["encode_many", "decode_many"] * 2 * len(compressed))
