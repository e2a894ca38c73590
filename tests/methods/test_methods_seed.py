"""Sign, random-k, sketch and low-rank methods through the engine (LocalWorld): 1-bit SGD,
EF-signSGD, signSGD with majority vote, random-k with a shared mask, the sketched update and
PowerSGD, bit for bit against hand-written simulations of each route, with their wire sizes. The
codecs' own mathematics are tested in test_sign.py, test_randk.py and test_sketch.py."""
from __future__ import annotations

import zlib

import pytest
import torch

from hvd_compress import methods
from hvd_compress.codecs import Payload, RandomKey
from hvd_compress.engine.engine import rank_seed, splitmix64
from hvd_compress.routes import wire
from hvd_compress.routes.low_rank import orthonormalize
from engine_helpers import (assert_ranks_agree, grad, members_of, resume_engines, run_engines, simulate_two_phase,
                         spec_with, states_after)

BIG = [(1, (40, 50)), (0, (3000,))]      # the compressed bucket [p1, p0] of test_engine's SHAPES


def keyed(codec, seed: int, step: int, tensor_id: int):
    return codec.with_shared_key(RandomKey(splitmix64(seed), step, tensor_id)) \
        if hasattr(codec, "with_shared_key") else codec


def simulate_gather(spec: str, world: int, steps: int = 2):
    """[p1, p0] through the allgather route: per segment (tensor scope: each member, id
    crc32(name); bucket scope: the concatenation, id crc32("p1\\0p0")), each rank encodes with its
    own key (and residual), the ranks' payloads are decoded together in rank order; / world."""
    method = methods.from_spec(spec)
    codec, seed = method.codec_at(0, world), method.seed
    if method.scope == "tensor":
        segments = [(f"p{i}", zlib.crc32(f"p{i}".encode()), torch.Size(s).numel()) for i, s in BIG]
    else:
        segments = [("bucket", zlib.crc32(b"p1\0p0"), 5000)]
    residual = {(r, name): torch.zeros(n) for r in range(world) for name, _, n in segments}
    out = []
    for step in range(steps):
        flat = [torch.cat([grad(r, step, m).reshape(-1) for m in (members_of(None)[1], members_of(None)[0])])
                for r in range(world)]
        total, pos = torch.zeros(5000), 0
        for name, tid, n in segments:
            c = keyed(codec, seed, step, tid)
            payloads = [c.encode(flat[r][pos:pos + n], RandomKey(rank_seed(seed, r), step, tid),
                                 residual=residual[r, name] if method.error_feedback else None)
                        for r in range(world)]
            c.decode_accumulate(payloads, total[pos:pos + n])
            pos += n
        total /= world
        out.append([total[2000:], total[:2000].view(40, 50)])
    return out


@pytest.mark.parametrize("spec", ["onebit", "efsignsgd", "signsgd", "sketch", "sketch:bits=2,ratio=0.5"])
@pytest.mark.parametrize("world", [2, 3])
def test_gather_methods_match_simulation(spec, world):
    results = run_engines(spec_with(spec, "route='allgather'"), world)
    assert_ranks_agree(results)
    for got, want in zip(results[0][0], simulate_gather(spec, world)):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("world", [2, 3])
def test_onebit_two_phase_with_server_error_feedback(world):
    """DoubleSqueeze / DeepSpeed's compressed allreduce: worker and server error feedback."""
    results = run_engines("onebit:route='two_phase'", world, steps=3)
    for got, want in zip(results[0][0], simulate_two_phase("onebit", world, steps=3)):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("spec", ["randomk:ratio=0.05", "randomk:ratio=0.05,unbiased=True"])
@pytest.mark.parametrize("world", [2, 3])
def test_randomk_sums_values_under_a_shared_mask(spec, world):
    """Every rank keeps the same k positions (shared key), the values are summed in fp32 (rank
    order here), decoded once: no index on the wire."""
    method = methods.from_spec(spec)
    results = run_engines(spec_with(spec, "route='allreduce'"), world, steps=2)
    assert_ranks_agree(results)
    codec, ef = method.codec_at(0, world), method.error_feedback
    residual = {(r, i): torch.zeros(torch.Size(s).numel()) for r in range(world) for i, s in BIG}
    for step in range(2):
        for i, shape in BIG:
            n, tid = torch.Size(shape).numel(), zlib.crc32(f"p{i}".encode())
            c = keyed(codec, method.seed, step, tid)
            values = [c.encode(grad(r, step, members_of(None)[i]).reshape(-1), RandomKey(rank_seed(0, r), step, tid),
                               residual=residual[r, i] if ef else None).parts["values"] for r in range(world)]
            total = values[0].clone()
            for v in values[1:]:
                total = total + v
            want = c.decode_accumulate([Payload(n, {"values": total})], torch.zeros(n)) / world
            assert torch.equal(results[0][0][step][i].reshape(-1), want)
            assert int((want != 0).sum()) <= c.k(n)
    stats = results[0][1].stats
    assert stats.bytes_sent == 2 * (4 * (codec.k(3000) + codec.k(2000)) + 4 * 10)   # + the dense p2


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("world", [2, 3])
def test_powersgd_matches_simulation(structured, world):
    """P = M Q summed, orthonormalized, Q = M^T P summed, aggregate P Q^T, error feedback
    e = M - P Q^T / W, warm start Q / W; the vector p0 travels dense in the first allreduce."""
    spec = f"powersgd:rank=2,structured={structured}"
    results = run_engines(spec_with(spec, "route='powersgd'"), world, steps=3)
    assert_ranks_agree(results)
    from hvd_compress.routes.low_rank import PowerSGDRoute
    route = PowerSGDRoute(2, 2.0, structured)
    shared = splitmix64(0)
    error = [torch.zeros(40, 50) for _ in range(world)]
    q_mem = None
    for step in range(3):
        m = [grad(r, step, members_of(None)[1]) + error[r] for r in range(world)]
        tid = zlib.crc32(b"p1")
        if structured or q_mem is None:
            gen = torch.Generator().manual_seed((shared ^ (tid << 20) ^ step * structured) & 0x7FFFFFFFFFFFFFFF)
            q = orthonormalize(torch.randn(50, 2, generator=gen))
        else:
            q = q_mem
        p = m[0] @ q
        for w in range(1, world):
            p = p + m[w] @ q
        if structured:
            approx = p @ q.t()
        else:
            p = orthonormalize(p.clone())
            q_sum = m[0].t() @ p
            for w in range(1, world):
                q_sum = q_sum + m[w].t() @ p
            approx = p @ q_sum.t()
            q_mem = q_sum / world
        for w in range(world):
            error[w] = m[w] - approx / world
        assert torch.equal(results[0][0][step][1], approx / world), step
        dense = sum(grad(r, step, members_of(None)[0]) for r in range(world)) / world
        torch.testing.assert_close(results[0][0][step][0], dense)
    assert route.name == "powersgd"


def test_powersgd_state_resumes_bit_exact():
    spec = "powersgd:route='powersgd'"
    full = run_engines(spec, 2, steps=4)
    saved = states_after(spec, 2, 2)
    assert any("powersgd_q" in b for b in saved[0]["buckets"].values())
    resumed = resume_engines(spec, 2, saved, (2, 3))
    for step in (2, 3):
        assert all(torch.equal(a, b) for a, b in zip(resumed[0][step - 2], full[0][0][step]))


def test_wire_sizes_follow_the_formats():
    """Bytes per step from the payloads: 1 bit per element + 8 (1-bit SGD) or 4 (scaled signs)
    bytes per tensor, in packed blocks (header + 8-byte alignment); PowerSGD n r + m r fp32 per
    n x m matrix."""
    for spec, per_tensor in (("onebit", 8), ("efsignsgd", 4), ("signsgd", 4)):
        engine = run_engines(spec_with(spec, "route='allgather'"), 2, steps=1)[0][1]
        payloads = [Payload(n, {"bits": torch.zeros(-(-n // 8), dtype=torch.uint8),
                                "means" if spec == "onebit" else "scales": torch.zeros(per_tensor // 4)})
                    for n in (2000, 3000)]
        assert engine.stats.bytes_sent == wire.block_nbytes(payloads) + 4 * 10
    engine = run_engines("powersgd:route='powersgd'", 2, steps=1)[0][1]
    # P of p1 (40 x 2) with the dense p0 (3000), then Q (50 x 2); p2 (10) through the dense route
    assert engine.stats.bytes_sent == 4 * (40 * 2 + 3000 + 50 * 2) + 4 * 10


def test_from_spec_builds_the_seed_methods():
    for spec in ("onebit", "efsignsgd", "signsgd", "randomk:ratio=0.001", "sketch:bits=2",
                 "powersgd:rank=4", "powersgd:structured=True"):
        assert methods.from_spec(spec).name == spec.split(":")[0]
    with pytest.raises(ValueError, match="route must be"):
        methods.from_spec("signsgd:route='two_phase'")
    with pytest.raises(ValueError):
        methods.from_spec("powersgd:rank=0")
