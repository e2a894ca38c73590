"""AdaComp, Gradient Dropping and STC through the engine (LocalWorld), bit for bit against hand
simulations of the allgather route (and of the sparse two-phase route for Gradient Dropping),
their wire bytes, state_dict resume and AMP safety.  The codecs' mathematics: test_sparse_adaptive.py."""
from __future__ import annotations

import zlib

import pytest
import torch

from hvd_compress import methods
import engine_helpers as te
from hvd_compress.codecs import Payload, RandomKey
from hvd_compress.engine.engine import rank_seed
from hvd_compress.routes import wire
from hvd_compress.routes.base import chunk_bounds, derived_id
from engine_helpers import assert_ranks_agree, grad, members_of, run_engines, spec_with

#: p0 a vector, p1 a convolution weight (AdaComp: bins of 50), p2 below min_numel (dense)
SHAPES = [(3000,), (8, 5, 5, 10), (10,)]
SPECS = ["adacomp", "graddrop", "stc", "stc:ratio=0.01", "adacomp:bin_size=128"]


def with_layout(codec, shapes):
    return codec.with_layout([torch.Size(s) for s in shapes]) if hasattr(codec, "with_layout") else codec


def simulate_gather(spec: str, world: int, steps: int = 2):
    """The bucket [p1, p0]: tensor scope (AdaComp, STC) encodes each member with id crc32(name)
    and its own shape; bucket scope (Gradient Dropping) the concatenation with id
    crc32("p1\\0p0") and both shapes; rank r keys with rank_seed(seed, r) and keeps its own
    residual; payloads are decoded in rank order; / world.  Returns the results and rank 0's
    payloads per step."""
    method = methods.from_spec(spec)
    members = members_of(method, SHAPES)
    big = [members[1], members[0]]
    if method.scope == "tensor":
        segments = [(m.name, zlib.crc32(m.name.encode()), [m.shape]) for m in big]
    else:
        segments = [("bucket", zlib.crc32(b"p1\0p0"), [m.shape for m in big])]
    residual = {(r, name): torch.zeros(sum(torch.Size(s).numel() for s in shapes))
                for r in range(world) for name, _, shapes in segments}
    out, sent = [], []
    for step in range(steps):
        flat = [torch.cat([grad(r, step, m).reshape(-1) for m in big]) for r in range(world)]
        total, pos, mine = torch.zeros(5000), 0, []
        for name, tid, shapes in segments:
            n = sum(torch.Size(s).numel() for s in shapes)
            codec = with_layout(method.codec, shapes)
            payloads = [codec.encode(flat[r][pos:pos + n], RandomKey(rank_seed(method.seed, r), step, tid),
                                     residual=residual[r, name]) for r in range(world)]
            codec.decode_accumulate(payloads, total[pos:pos + n])
            mine.append(payloads[0])
            pos += n
        total /= world
        out.append([total[2000:], total[:2000].view(8, 5, 5, 10)])
        sent.append(mine)
    return out, sent


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("world", [2, 3])
def test_allgather_matches_simulation_and_bytes_are_the_payloads(spec, world):
    results = run_engines(spec_with(spec, "route='allgather'"), world, shapes=SHAPES)
    assert_ranks_agree(results)
    expected, sent = simulate_gather(spec, world)
    for got, want in zip(results[0][0], expected):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # rank 0's bytes: its packed blocks (header + 8-byte aligned parts) + the dense p2 (10 fp32)
    engine = results[0][1]
    assert engine.stats.bytes_sent == sum(wire.block_nbytes(p) + 4 * 10 for p in sent)


def test_adacomp_bins_follow_the_member_shapes_in_the_engine():
    """p1 is a convolution weight: 2000 / 50 = 40 scales; p0 a vector: 3000 / 500 = 6."""
    _, sent = simulate_gather("adacomp", 2, steps=1)
    assert [p.parts["scales"].numel() for p in sent[0]] == [40, 6]


@pytest.mark.parametrize("world", [2, 3])
def test_graddrop_sparse_two_phase_matches_simulation(world):
    """Workers select over the whole bucket (layer-normalized), split their entries by owner
    slice; each owner sums its slice in rank order and re-sparsifies it as one tensor with its
    server residual; the owners' entries are gathered."""
    spec = "graddrop:route='sparse_two_phase'"
    results = run_engines(spec, world, steps=3, shapes=SHAPES)
    assert_ranks_agree(results)
    method = methods.from_spec(spec)
    codec, seed = method.codec, method.seed
    big = [members_of(method, SHAPES)[1], members_of(method, SHAPES)[0]]
    n, tid = 5000, zlib.crc32(b"p1\0p0")
    bounds = chunk_bounds(n, world)
    worker_r = [torch.zeros(n) for _ in range(world)]
    server_r = [torch.zeros(bounds[c + 1] - bounds[c]) for c in range(world)]
    for step in range(3):
        chunk_payloads = [[None] * world for _ in range(world)]
        for r in range(world):
            x = torch.cat([grad(r, step, m).reshape(-1) for m in big])
            p = with_layout(codec, [m.shape for m in big]).encode(x, RandomKey(rank_seed(seed, r), step, tid),
                                                                  residual=worker_r[r])
            idx = p.parts["indices"].long()
            for c in range(world):
                keep = (idx >= bounds[c]) & (idx < bounds[c + 1])
                chunk_payloads[c][r] = Payload(bounds[c + 1] - bounds[c], {
                    "indices": (idx[keep] - bounds[c]).int(), "values": p.parts["values"][keep]})
        total = torch.zeros(n)
        for c in range(world):
            chunk = codec.decode_accumulate(chunk_payloads[c], torch.zeros(bounds[c + 1] - bounds[c]))
            again = codec.encode(chunk, RandomKey(rank_seed(seed, c), step, derived_id(tid, 2, c)),
                                 residual=server_r[c])
            codec.decode_accumulate([again], total[bounds[c]:bounds[c + 1]])
        total /= world
        got = results[0][0][step]
        assert torch.equal(got[0], total[2000:]) and torch.equal(got[1].reshape(-1), total[:2000])


@pytest.mark.parametrize("spec", ["adacomp", "graddrop", "stc"])
def test_state_dict_resume_is_bit_exact(spec):
    spec = spec_with(spec, "route='allgather'")
    full = te.run_engines(spec, 2, steps=4)
    saved = te.states_after(spec, 2, 2)
    assert all("residual" in entry for entry in saved[0]["params"].values() if entry)
    resumed = te.resume_engines(spec, 2, saved, (2, 3))
    for rank in range(2):
        for step in (2, 3):
            assert all(torch.equal(a, b) for a, b in zip(resumed[rank][step - 2], full[rank][0][step]))


@pytest.mark.parametrize("spec", ["adacomp", "graddrop", "stc", "graddrop:route='sparse_two_phase'"])
def test_non_finite_gradient_leaves_no_trace(spec):
    """An inf on one rank: that member is NaN on every rank, the step is rolled back everywhere
    (the state is the previous step's), and the next step equals a run that never saw it."""
    te.check_non_finite_skips(spec)


def test_specs_routes_and_arguments():
    assert sorted(methods.AdaComp().candidates()) == ["allgather"]
    assert sorted(methods.STC().candidates()) == ["allgather"]
    assert sorted(methods.GradDrop().candidates()) == ["allgather", "sparse_two_phase"]
    for spec in ("adacomp", "stc", "graddrop"):
        method = methods.from_spec(spec)
        assert method.name == spec and method.error_feedback
    g = methods.from_spec("graddrop:drop_ratio=0.999")
    assert g.codec.ratio == 0.001 and g.codec.sample_ratio == 0.001 and g.scope == "bucket"
    assert methods.STC().codec.ratio == 0.0025
    for bad in ("stc:route='two_phase'", "adacomp:route='sparse_two_phase'", "graddrop:drop_ratio=1.0",
                "adacomp:bin_size=0", "stc:ratio=2"):
        with pytest.raises(ValueError):
            methods.from_spec(bad)


def test_plan_byte_estimates_are_near_the_real_payloads():
    """STC's estimate is the expected Golomb size, Gradient Dropping's top-k's 6 bytes per kept
    entry (the estimates leave out the block headers): close to what the engine sent.  (AdaComp
    sends what the gradients make it send: its estimate assumes 4 entries per bin, as measured
    in training, docs/methods-sparse-adaptive.md; on these i.i.d. Gaussian gradients a bin sends
    far more, so it is not checked here.)"""
    shapes = [(200_000,), (64, 32, 3, 3), (10,)]
    for spec, tolerance in (("stc", 1.1), ("graddrop", 1.35)):
        results = run_engines(spec_with(spec, "route='allgather'"), 2, steps=2, shapes=shapes)
        engine = results[0][1]
        bplan = next(b for b in engine.plan.buckets if b.route.name == "allgather")
        real = (engine.stats.bytes_sent - 2 * 4 * 10) / 2
        assert real / tolerance <= bplan.payload_bytes <= real * tolerance, (spec, real, bplan.payload_bytes)
