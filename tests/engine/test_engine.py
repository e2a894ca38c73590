"""The engine without Horovod: N ranks as threads of one process (LocalWorld), the very routes
and codecs of a real job.  Bit-exact against hand-written simulations of each route, buckets,
the wire format, the plan, per-rank keys, non-finite gradients and transactions, state_dict,
order independence and failures that must not hang."""
from __future__ import annotations

import math
import zlib

import pytest
import torch

from engine_helpers import (SHAPES, SLOW, assert_ranks_agree, check_non_finite_skips, grad, members_of,
                            on_cuda_path, resume_engines, run_engines, run_like_the_adaptor, same_bits, simulate_two_phase,
                            spec_with, states_after)
from hvd_compress import methods
from hvd_compress.codecs import RandomKey
from hvd_compress.engine.buckets import Member, assign_buckets
from hvd_compress.engine.engine import Engine, rank_seed, splitmix64
from hvd_compress.engine.local import LocalWorld
from hvd_compress.engine.plan import DENSE, plan_bucket
from hvd_compress.routes import wire
from hvd_compress.routes.base import Link, Speed


# -- keys and buckets -----------------------------------------------------------------------------

def test_rank_seed_is_the_documented_splitmix():
    def reference(seed, rank):   # docs/design.md: splitmix64(seed + (r + 1) * 0x9E3779B97F4A7C15)
        x = (seed + (rank + 1) * 0x9E3779B97F4A7C15) % 2 ** 64
        x = (x + 0x9E3779B97F4A7C15) % 2 ** 64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2 ** 64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2 ** 64
        return x ^ (x >> 31)
    seeds = {rank_seed(s, r) for s in (0, 1, 2 ** 64 - 1) for r in range(64)}
    assert len(seeds) == 3 * 64 and all(0 <= s < 2 ** 64 for s in seeds)
    assert all(rank_seed(s, r) == reference(s, r) for s in (0, 7, 2 ** 63) for r in range(8))
    assert splitmix64(0) == 0xE220A8397B1DCDAF  # SplitMix64's first output from state 0


def test_buckets_reverse_order_cap_methods_and_small_members():
    a, b = methods.TernGrad(), methods.QSGD()
    members = [Member(i, f"m{i}", torch.Size((n,)), torch.float32, meth)
               for i, (n, meth) in enumerate([(5000, a), (10, a), (3000, b), (6000, a), (2000, a), (20, a)])]
    buckets = assign_buckets(members, cap_bytes=4 * 9000)
    layout = [[m.name for m in bk.members] for bk in buckets]
    # reverse order; small members apart; QSGD apart; a bucket closes once it reaches the cap
    assert layout == [["m5", "m1"], ["m4", "m3", "m0"], ["m2"]]
    assert [bk.numel for bk in buckets] == [30, 13000, 3000]
    layer_wise = assign_buckets(members, cap_bytes=0)
    assert [len(bk.members) for bk in layer_wise] == [1] * 6
    assert [bk.members[0].name for bk in layer_wise] == ["m5", "m4", "m3", "m2", "m1", "m0"]
    with pytest.raises(ValueError):
        assign_buckets(members, -1)


def test_segments_by_scope():
    method = methods.TernGrad()
    members = [Member(i, n, torch.Size((k,)), torch.float32, method)
               for i, (n, k) in enumerate([("x", 4000), ("y", 2000)])]
    (bucket,) = assign_buckets(members, 2 ** 30)
    per_tensor = bucket.segments("tensor")
    assert [(s.offset, s.numel, s.tensor_id) for s in per_tensor] == [
        (0, 2000, zlib.crc32(b"y")), (2000, 4000, zlib.crc32(b"x"))]
    (whole,) = bucket.segments("bucket")
    assert (whole.offset, whole.numel, whole.tensor_id) == (0, 6000, zlib.crc32(b"y\0x"))


# -- wire format ----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["terngrad", "qsgd:bits=2", "topk:ratio=0.1", "fp16"])
def test_wire_round_trip_with_empty_and_uneven_segments(spec):
    codec = methods.from_spec(spec).codec
    sizes = [[7, 0, 1001], [7, 0, 1001]]
    payloads = [[codec.encode(torch.randn(n) * (r + 1), RandomKey(r, 0, s)) for s, n in enumerate(row)]
                for r, row in enumerate(sizes)]
    blocks = [wire.pack(p, torch.device("cpu")) for p in payloads]
    assert all(b.numel() == wire.block_nbytes(p) and b.numel() % 8 == 0 for b, p in zip(blocks, payloads))
    back = wire.unpack(torch.cat(blocks), codec, sizes)
    for rank in range(2):
        for s in range(3):
            for name, t in payloads[rank][s].parts.items():
                assert torch.equal(back[rank][s].parts[name], t)
    with pytest.raises(ValueError, match="does not match"):
        wire.unpack(torch.cat(blocks), codec, [[7, 1001]] * 2)
    with pytest.raises(ValueError):
        wire.unpack(torch.cat(blocks)[:-8], codec, sizes)


# -- the plan -------------------------------------------------------------------------------------

def test_plan_leaves_buckets_dense_where_compression_would_not_pay():
    method = methods.TernGrad()
    (bucket,) = assign_buckets(members_of(method, [(25_000_000,)]), 2 ** 30)
    slow, fast = Link.gbps(1), Link.gbps(100, latency_us=20)
    speed = Speed(encode=3e8, decode=6e8)
    assert plan_bucket(bucket, 2, slow, speed, 0).route.name == "allgather"   # same bytes, less work
    assert plan_bucket(bucket, 16, slow, speed, 0).route.name == "two_phase"
    fast_plan = plan_bucket(bucket, 4, fast, speed, 0)
    assert fast_plan.route is DENSE and "would not pay" in fast_plan.why
    forced = methods.TernGrad(route="compressed")
    (bucket,) = assign_buckets(members_of(forced, [(25_000_000,)]), 2 ** 30)
    assert plan_bucket(bucket, 4, fast, speed, 0).route.name in ("allgather", "two_phase")
    topk = methods.TopK()
    (bucket,) = assign_buckets(members_of(topk, [(25_000_000,)]), 2 ** 30)
    assert plan_bucket(bucket, 2, slow, speed, 0).route.name == "allgather"
    assert plan_bucket(bucket, 64, slow, speed, 0).route.name == "sparse_two_phase"
    with pytest.raises(ValueError, match="route must be"):
        methods.TopK(route="two_phase")


def test_plan_is_printable_and_its_digest_covers_routes():
    results = run_engines("terngrad:route='compressed'", 2, steps=1)
    engine = results[0][1]
    text = str(engine.plan)
    assert "p1 .. p0 (2)" in text and "allgather" in text and "below min_numel" in text
    other = run_engines("terngrad:route='two_phase'", 2, steps=1)[0][1]
    assert other.plan.digest != engine.plan.digest


# -- routes, bit for bit against hand simulations ---------------------------------------------------

def simulate_gather(spec: str, world: int, steps: int = 2) -> list[list[torch.Tensor]]:
    """Members p1, p0 in one bucket (p2 dense): tensor scope encodes each with id crc32(name),
    bucket scope the concatenation with id crc32("p1\\0p0"); rank r keys with rank_seed(seed, r);
    rank order sums; / world."""
    method = methods.from_spec(spec)
    members = members_of(method)
    big = [members[1], members[0]]
    residual = [{m.name: torch.zeros(m.numel) for m in big} for _ in range(world)]
    out = []
    for step in range(steps):
        results = {}
        if method.scope == "tensor":
            for m in big:
                payloads = [method.codec_at(step, world).encode(grad(r, step, m), RandomKey(rank_seed(method.seed, r), step,
                                                                            zlib.crc32(m.name.encode())),
                                                residual=residual[r][m.name] if method.error_feedback else None)
                            for r in range(world)]
                results[m.name] = method.codec_at(step, world).decode_accumulate(payloads, torch.zeros(m.numel)) / world
        else:
            tid = zlib.crc32(b"p1\0p0")
            flat = [torch.cat([grad(r, step, m).reshape(-1) for m in big]) for r in range(world)]
            payloads = [method.codec_at(step, world).encode(flat[r], RandomKey(rank_seed(method.seed, r), step, tid))
                        for r in range(world)]
            total = method.codec_at(step, world).decode_accumulate(payloads, torch.zeros(5000)) / world
            results["p1"], results["p0"] = total[:2000], total[2000:]
        dense = sum(grad(r, step, members[2]) for r in range(world)) / world
        out.append([results["p0"].view(3000), results["p1"].view(40, 50), dense])
    return out


@pytest.mark.parametrize("spec", ["terngrad", "terngrad:clip=None,error_feedback=True", "qsgd:bits=4",
                                  "qsgd:bits=8,bucket_size=128", "topk:ratio=0.05",
                                  "topk:ratio=0.05,mode='exact'"])
@pytest.mark.parametrize("world", [2, 3])
def test_allgather_route_matches_simulation(spec, world):
    results = run_engines(spec_with(spec, "route='allgather'"), world)
    expected = simulate_gather(spec, world)
    assert_ranks_agree(results)
    for step, (got, want) in enumerate(zip(results[0][0], expected)):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), step
        torch.testing.assert_close(got[2], want[2])


@pytest.mark.parametrize("spec", ["terngrad", "qsgd:bits=4", "qsgd:bits=2,error_feedback=True"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_two_phase_route_matches_simulation(spec, world):
    results = run_engines(spec_with(spec, "route='two_phase'"), world)
    assert_ranks_agree(results)
    for got, want in zip(results[0][0], simulate_two_phase(spec, world)):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("world", [2, 3, 4])
def test_sparse_two_phase_route_matches_simulation(world):
    spec = "topk:ratio=0.05"
    results = run_engines(spec + ",route='sparse_two_phase'", world, steps=3)
    assert_ranks_agree(results)
    for got, want in zip(results[0][0], simulate_two_phase(spec, world, steps=3, sparse=True)):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def _one_sided(rank, step, m):
    """p1's gradient 100x larger in its first 500 entries: rank 0's entries crowd owner 0's slice."""
    g = grad(rank, step, m)
    if m.name == "p1":
        g.reshape(-1)[:500] *= 100.0
    return g


@pytest.mark.parametrize("cuda_path", [False, True])
def test_sparse_two_phase_puts_an_owners_overflow_back_into_the_residual(cuda_path):
    """At 8 ranks an owner takes at most ceil(1.5 C / 8) = 61 entries of a rank (C = 325 at 5%);
    p1's large entries (at least 0.8 k = 80) all lie in owner 0's slice, so the rest of that run
    goes back into the residual (exactly g': sent later), as the hand simulation does; host and
    device agree."""
    spec, world = "topk:ratio=0.05", 8
    codec = methods.from_spec(spec).codec_at(0, world)
    assert math.ceil(1.5 * (codec.capacity(2000) + codec.capacity(3000)) / world) < 0.8 * codec.k(2000)
    results = run_engines(spec + ",route='sparse_two_phase'", world, steps=3, grad_fn=_one_sided,
                          cuda_path=cuda_path)
    assert_ranks_agree(results)
    want = simulate_two_phase(spec, world, steps=3, sparse=True, grad_fn=_one_sided)
    for got, w in zip(results[0][0], want):
        assert torch.equal(got[0], w[0]) and torch.equal(got[1], w[1])


def test_sparse_two_phase_bytes_stay_flat_as_the_world_grows():
    received = {}
    for route in ("allgather", "sparse_two_phase"):
        for world in (2, 4, 8):
            results = run_engines(f"topk:ratio=0.01,route='{route}'", world, steps=1,
                                  shapes=[(100_000,)])
            received[route, world] = max(e.stats.bytes_received for _, e in results)
    # allgather: (P - 1) k entries; two-phase: (P - 1)/P k in each phase, so at most ~2 k
    assert received["allgather", 8] > 6 * received["allgather", 2]
    assert received["sparse_two_phase", 8] < 2.1 * received["sparse_two_phase", 2]
    assert received["sparse_two_phase", 8] < received["allgather", 8] / 3


@pytest.mark.parametrize("spec", ["fp16", "fp16:stochastic=False", "terngrad:shared_scale=True"])
def test_allreduce_routes(spec):
    results = run_engines(spec_with(spec, "route='allreduce'"), 3)
    assert_ranks_agree(results)
    method = methods.from_spec(spec)
    exact = [sum(grad(r, 0, m) for r in range(3)) / 3 for m in members_of(method)]
    got = results[0][0][0]
    for g, e in zip(got[:2], exact[:2]):   # unbiased quantizers: close to the mean, not equal
        assert 0 < (g - e).norm() < (0.5 if method.name == "fp16" else 2.0) * e.norm()
    if spec == "terngrad:shared_scale=True":
        codec = method.codec_at(0, 3)
        m = members_of(method)[0]
        scale = torch.stack([codec.local_scales(grad(r, 0, m)) for r in range(3)]).amax(0)
        assert set((got[0] * 3 / scale).round().unique().tolist()) <= {-3, -2, -1, 0, 1, 2, 3}


# -- per-rank noise ---------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["terngrad:clip=None", "qsgd:bits=4", "fp16"])
def test_noise_is_independent_per_rank(spec):
    """Identical gradients on every rank: with independent noise the MSE of the average falls
    as 1/N (with one shared stream it would not fall at all).  Through the allgather route,
    whose sums are fp32: the two-phase routes quantize the sum once more, and an fp16 allreduce
    rounds the sum to fp16, errors that do not average out."""
    g = torch.randn(20_000, generator=torch.Generator().manual_seed(5)) * 1e-3

    def mse(world):
        results = run_engines(spec_with(spec, "route='allgather'"), world, steps=4, shapes=[(20_000,)],
                              grad_fn=lambda rank, step, m: g.clone())
        return sum(float(((out[0] - g) ** 2).mean()) for out in results[0][0]) / 4
    m2, m4, m8 = mse(2), mse(4), mse(8)
    assert m4 / m2 < 0.6 and m8 / m4 < 0.6, (m2, m4, m8)


# -- non-finite gradients and transactions -----------------------------------------------------------

@pytest.mark.parametrize("spec", ["terngrad:error_feedback=True", "qsgd:error_feedback=True,route='two_phase'",
                                  "topk:ratio=0.05", "topk:ratio=0.05,route='sparse_two_phase'",
                                  "dgc:ratio=0.05", "fp16:error_feedback=True", "terngrad:shared_scale=True"])
def test_non_finite_gradient_skips_the_step_on_every_rank(spec):
    check_non_finite_skips(spec)


def test_codec_overflow_on_finite_input_is_a_skipped_step():
    """Stochastic fp16 overflows to inf on finite input: the sum is inf, the step is rolled back
    (the working residual held -inf) and later steps are clean."""
    def big(rank, step, m):
        g = grad(rank, step, m)
        if step == 0 and m.index == 0:
            g[3] = 1e6
        return g
    results = run_engines("fp16:error_feedback=True,route='allreduce'", 2, steps=2, grad_fn=big)
    for outs, engine in results:
        assert math.isinf(outs[0][0][3]) and engine.stats.skipped_steps == 1
        assert bool(torch.isfinite(outs[1][0]).all())
        sd = engine.state_dict()
        assert all(bool(torch.isfinite(t).all()) for p in sd["params"].values() for t in p.values())


# -- state ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec,resume_cap_mb", [
    ("topk:ratio=0.05", 0), ("dgc:ratio=0.05,warmup_steps=4", 0), ("terngrad:error_feedback=True", 0),
    ("qsgd:error_feedback=True", 25)])
def test_state_dict_resume_is_bit_exact(spec, resume_cap_mb):
    """Steps 2-3 after loading step 2's state_dict equal steps 2-3 of a run that never stopped.
    Per-tensor methods (top-k, DGC, TernGrad) even with another bucket cap (layer-wise here):
    their state and keys are per parameter.  QSGD encodes whole buckets (bucket-scope keys and
    norm buckets), so its bits need the same layout."""
    spec = spec_with(spec, "route='allgather'")
    full = run_engines(spec, 2, steps=4)
    saved = states_after(spec, 2, 2)
    resumed = resume_engines(spec, 2, saved, (2, 3), resume_cap_mb)
    assert saved[0]["step"] == 2
    for rank in range(2):
        for step in (2, 3):
            for a, b in zip(resumed[rank][step - 2], full[rank][0][step]):
                assert torch.equal(a, b), (rank, step)


def test_state_dict_resume_two_phase_keeps_server_residuals():
    spec = "terngrad:error_feedback=True,route='two_phase'"
    full = run_engines(spec, 3, steps=3)
    saved = states_after(spec, 3, 2)
    assert all("server" in b for b in saved[0]["buckets"].values())
    resumed = resume_engines(spec, 3, saved, (2,))
    for rank in range(3):
        assert all(torch.equal(a, b) for a, b in zip(resumed[rank][0], full[rank][0][2]))


def test_load_state_dict_rejects_foreign_state():
    members = members_of(methods.TopK())
    engine = Engine(members, lambda: None, average=True, cap_bytes=0, link=SLOW, name="t")
    with pytest.raises(ValueError, match="missing step, params"):
        engine.load_state_dict({})
    with pytest.raises(ValueError, match="does not"):
        engine.load_state_dict({"step": 0, "params": {"nope": {}}})
    with pytest.raises(ValueError, match="elements"):
        engine.load_state_dict({"step": 0, "params": {"p0": {"residual": torch.zeros(5)}}})


# -- order, absence, failures -------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["qsgd:route='two_phase'", "terngrad:shared_scale=True",
                                  "topk:ratio=0.05,route='sparse_two_phase'"])
def test_hook_order_and_absent_members_do_not_matter(spec):
    """Ranks hand members over in different orders, and rank 1 never hands over p1 in step 0
    (it is then zeros): the multi-phase routes finish and the ranks agree."""
    def order(rank, step, members):
        return list(members) if rank % 2 else list(reversed(members))

    def absent(rank, step, m):
        return None if (rank, step, m.index) == (1, 0, 1) else grad(rank, step, m)
    results = run_engines(spec, 3, steps=2, order=order, grad_fn=absent, cap_mb=0)
    assert_ranks_agree(results)


def test_failure_on_one_rank_raises_on_every_rank_without_hanging():
    class Boom(methods.TopK):
        def prepare(self, bucket, grads, x, state, comm):
            if comm.rank == 1:
                raise RuntimeError("boom on rank 1")
            return super().prepare(bucket, grads, x, state, comm)
    with pytest.raises(RuntimeError, match=r"failed on rank\(s\) \[1\]"):
        run_engines(Boom(ratio=0.05, route="compressed"), 2, steps=1)


def test_different_plans_fail_clearly():
    per_rank = [methods.TopK(ratio=0.05, route="compressed"), methods.TopK(ratio=0.01, route="compressed")]

    def fn(comm):
        members = members_of(per_rank[comm.rank])
        engine = Engine(members, lambda: comm, average=True, cap_bytes=2 ** 20, link=SLOW, name="t")
        for m in members:
            engine.add(m.index, grad(comm.rank, 0, m))
        engine.result(0)
    with pytest.raises(RuntimeError, match="ranks use different compressor settings"):
        LocalWorld(2).run(fn)


def test_bf16_gradients_round_trip_in_their_dtype():
    method = methods.TopK(ratio=0.05, route="compressed")
    members = members_of(method, dtype=torch.bfloat16)

    def fn(comm):
        engine = Engine(members, lambda: comm, average=True, cap_bytes=2 ** 20, link=SLOW, name="t")
        for m in members:
            engine.add(m.index, grad(comm.rank, 0, m).to(torch.bfloat16))
        return [engine.result(m.index) for m in members]
    out = LocalWorld(2).run(fn)[0]
    assert [t.dtype for t in out] == [torch.bfloat16] * 3 and [t.shape for t in out] == [torch.Size(s) for s in SHAPES]


def test_link_is_measured_once_and_kept_in_the_state():
    results = run_engines("terngrad", 2, steps=2, link=None)
    engine = results[0][1]
    assert engine.link_source == "measured" and engine.link.bytes_per_s > 0
    assert results[1][1].link == engine.link                      # the ranks agreed
    assert Link(**engine.state_dict()["link"]) == engine.link


@pytest.mark.emu
@pytest.mark.parametrize("spec", ["terngrad:route='allgather'", "qsgd:route='two_phase'",
                                  "topk:ratio=0.05,route='sparse_two_phase'", "fp16:route='allreduce'"])
def test_engine_over_the_cuda_code_path_is_bit_identical(spec):
    """Every rank's codecs on their CUDA code path (the SIMT emulator, kernels/*.cu compiled for
    the CPU) through the engine and routes: the same bits as the C reference."""
    reference = run_engines(spec, 2)
    method = methods.from_spec(spec)
    members = members_of(method)

    def fn(comm):
        with on_cuda_path(comm.rank):
            engine = Engine(members, lambda: comm, average=True, cap_bytes=25 * 2 ** 20, link=SLOW, name="t")
            outs = []
            for step in range(2):
                for m in reversed(members):
                    engine.add(m.index, grad(comm.rank, step, m))
                outs.append([engine.result(m.index).clone() for m in members])
            return outs
    emulated = LocalWorld(2).run(fn)
    for rank in range(2):
        for got, want in zip(emulated[rank], reference[rank][0]):
            assert all(same_bits(a, b) for a, b in zip(got, want))


def test_non_finite_uncompressed_member_rolls_back_the_compressed_ones():
    """inf in a member Horovod sends uncompressed (p2, below min_numel) on one rank: the
    compressed members' state must not move either (GradScaler skips the whole step)."""
    def poisoned(rank, step, m):
        g = grad(rank, step, m)
        if (rank, step, m.index) == (1, 1, 2):
            g[0] = float("inf")
        return g
    results = run_like_the_adaptor("topk:ratio=0.05,route='compressed'", 2, 3, grad_fn=poisoned)
    reference = run_like_the_adaptor("topk:ratio=0.05,route='compressed'", 2, 2,
                                     grad_fn=lambda r, s, m: grad(r, 2 * s, m))
    for rank, (outs, engine) in enumerate(results):
        assert math.isinf(outs[1][2][0]) and bool(torch.isfinite(outs[1][0]).all())
        engine.finalize()
        assert engine.stats.skipped_steps == 1 and engine.step == 2
        assert engine.plan.buckets[0].external and not engine.plan.buckets[1].external
        # step 2 after the skipped step 1 is step 1 of a run that never saw it
        assert all(same_bits(a, b) for a, b in zip(outs[2][:2], reference[rank][0][1][:2]))


def test_measured_trial_decides_between_compressed_and_uncompressed(monkeypatch):
    """With a measured link the engine times 3 compressed and 3 uncompressed steps and keeps the
    faster; every rank takes the same decision (from the step headers).  (The link measured
    between threads is memory-fast: a slow one is reported so that the model compresses.)"""
    from hvd_compress.engine import cost
    monkeypatch.setattr(cost, "measure_link", lambda comm, device, tag, world=None: (Link.gbps(0.3), 1e12))
    results = run_like_the_adaptor("terngrad", 2, 9, link=None)
    plans = [str(engine.plan) for _, engine in results]
    assert plans[0].splitlines()[0] == plans[1].splitlines()[0]
    assert "s/step compressed vs" in plans[0] and "kept" in plans[0]
    trial = results[0][1].state_dict()["trial"]
    assert trial["phase"] == "done" and all(len(v) >= 2 for v in trial["samples"].values())
    assert_ranks_agree(results)
