"""eSGD, LAQ and DIANA: the codecs' mathematics against plain-torch statements of the
papers' formulas, the engine (LocalWorld, 2 and 3 ranks) bit for bit against hand simulations of
each method, wire bytes, every rank's shared state identical, AMP rollback and resume."""
from __future__ import annotations

import math
import zlib

import pytest
import torch

import hvd_compress
from hvd_compress.codecs import RandomKey
from hvd_compress.codecs.esgd import keys_torch
from hvd_compress.codecs.laq import InnovationCodec, pack_codes, unpack_codes
from hvd_compress.codecs.sparse import NonzeroCodec
from hvd_compress.engine.engine import Engine, rank_seed
from hvd_compress.engine.local import LocalWorld
from hvd_compress.routes import wire
from engine_helpers import (SLOW, assert_ranks_agree, grad, members_of, resume_engines, run_engines, same_bits,
                         states_after)
from engine_helpers import check_non_finite_skips as non_finite_check

TID = zlib.crc32(b"p1\0p0")              # the compressed bucket [p1, p0] (bucket scope)
N = 5000


def flat_grad(rank: int, step: int, grad_fn=grad) -> torch.Tensor:
    members = members_of(None)
    return torch.cat([grad_fn(rank, step, members[1]).reshape(-1), grad_fn(rank, step, members[0]).reshape(-1)])


def results_of(outs, step: int) -> torch.Tensor:
    """A rank's engine result for the compressed bucket, flattened in bucket order [p1, p0]."""
    return torch.cat([outs[step][1].reshape(-1), outs[step][0].reshape(-1)])


# -- the codecs ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 4, 8])
def test_innovation_quantizer_is_the_papers_grid(bits):
    """dQ_i = -R + 2 tau R q_i with tau = 1/(2^b - 1), q_i the nearest grid point to v_i; the
    error is at most tau R; bytes ceil(n b / 8) + 4; zeros give the empty payload."""
    codec = InnovationCodec(bits=bits)
    v = torch.randn(1001, generator=torch.Generator().manual_seed(bits)) * 3
    payload = codec.encode(v)
    R = float(v.abs().max())
    tau = 1 / (2 ** bits - 1)
    grid = torch.tensor([-R + 2 * tau * R * j for j in range(2 ** bits)], dtype=torch.float64)
    nearest = grid[(v.double().unsqueeze(1) - grid).abs().argmin(1)]
    dq = codec.innovation(payload)
    torch.testing.assert_close(dq.double(), nearest, rtol=0, atol=1e-5 * R)
    assert float((dq - v).abs().max()) <= tau * R * (1 + 1e-5)
    assert payload.nbytes == -(-1001 * bits // 8) + 4
    empty = codec.encode(torch.zeros(1001))
    assert empty.nbytes == 0 and torch.equal(codec.innovation(empty), torch.zeros(1001))
    codes = torch.randint(0, 2 ** bits, (37,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(unpack_codes(pack_codes(codes, bits), 37, bits), codes.to(torch.int32))


def test_innovation_decode_accumulates_in_worker_order():
    codec = InnovationCodec()
    vs = [torch.randn(300, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    payloads = [codec.encode(vs[0]), codec.encode(torch.zeros(300)), codec.encode(vs[2])]
    out = torch.zeros(300)
    codec.decode_accumulate(payloads, out)
    assert torch.equal(out, torch.zeros(300) + codec.innovation(payloads[0]) + codec.innovation(payloads[2]))
    with pytest.raises(ValueError, match="error feedback"):
        codec.encode(vs[0], residual=torch.zeros(300))
    with pytest.raises(ValueError, match="bits"):
        InnovationCodec(bits=3)


def test_nonzero_codec_sends_exactly_the_nonzero_entries():
    x = torch.zeros(1000)
    x[[3, 10, 999]] = torch.tensor([1.5, -2.0, 0.25])
    payload = NonzeroCodec().encode(x)
    assert payload.parts["indices"].tolist() == [3, 10, 999] and payload.nbytes == 3 * 8
    out = torch.ones(1000)
    NonzeroCodec().decode_accumulate([payload, payload], out)
    assert torch.equal(out, 1 + 2 * x)
    assert NonzeroCodec().encode(torch.zeros(10)).nbytes == 0


# -- DIANA ---------------------------------------------------------------------------------------------

def test_diana_alpha_is_one_over_omega_plus_one():
    d = hvd_compress.DIANA()
    assert d.omega == pytest.approx(math.sqrt(512) / 7) and d.alpha == pytest.approx(0.23627, abs=1e-5)
    t = hvd_compress.from_spec("diana:codec='terngrad'")
    assert t.omega == pytest.approx((math.sqrt(512) - 1) / 2) and t.alpha == pytest.approx(1 / (t.omega + 1))
    assert t.codec.clip is None and hvd_compress.from_spec("diana:alpha=0.5").alpha == 0.5
    for bad in ("diana:codec='zip'", "diana:alpha=0", "diana:route='auto'", "laq:route='dense'", "esgd:ratio=0"):
        with pytest.raises(ValueError):
            hvd_compress.from_spec(bad)


def test_terngrad_omega_is_attained():
    """TernGrad's variance E||C(x)||^2 - ||x||^2 = s ||x||_1 - ||x||^2 reaches omega ||x||^2 at
    x = (1, e, ..., e), e = 1 / (sqrt(d) + 1): the bound DIANA's alpha uses is tight."""
    d = 512
    x = torch.full((d,), 1 / (math.sqrt(d) + 1), dtype=torch.float64)
    x[0] = 1
    ratio = (x.abs().max() * x.abs().sum() - x.square().sum()) / x.square().sum()
    assert float(ratio) == pytest.approx((math.sqrt(d) - 1) / 2)


@pytest.mark.parametrize("spec", ["diana", "diana:codec='terngrad',bucket_size=256"])
@pytest.mark.parametrize("world", [2, 3])
def test_diana_matches_simulation(spec, world):
    """Delta_i = C(g_i - h_i), h_i += alpha D(Delta_i); delivered (H + sum D(Delta_i)) / N with
    H = sum h_i, then H += alpha sum D(Delta_i)."""
    steps = 3
    results = run_engines(spec, world, steps=steps)
    assert_ranks_agree(results)
    method = hvd_compress.from_spec(spec)
    codec, alpha = method.codec, method.alpha
    h = [torch.zeros(N) for _ in range(world)]
    H = torch.zeros(N)
    for step in range(steps):
        payloads = []
        for r in range(world):
            p = codec.encode(flat_grad(r, step) - h[r], RandomKey(rank_seed(0, r), step, TID))
            h[r] = h[r] + alpha * codec.decode(p)
            payloads.append(p)
        total = codec.decode_accumulate(payloads, torch.zeros(N))
        want = (total + H) / world
        H = H + alpha * total
        assert torch.equal(results_of(results[0][0], step), want), step
        # H is the sum of the shifts (up to rounding): the delivered mean is h + mean Delta
        torch.testing.assert_close(H, sum(h), rtol=1e-5, atol=1e-5)
    sd = results[1][1].state_dict()
    assert torch.equal(torch.cat([sd["params"]["p1"]["shift"].reshape(-1), sd["params"]["p0"]["shift"]]), h[1])
    stats = results[0][1].stats
    block = wire.block_nbytes([codec.encode(torch.zeros(N))])
    assert stats.bytes_sent == steps * (block + 4 * 10)        # + the dense p2


# -- LAQ -----------------------------------------------------------------------------------------------

def slow_grad(rank: int, step: int, m):
    """Gradients that change little from step to step (so LAQ skips)."""
    base = grad(rank, 0, m)
    return base + 0.02 * grad(rank, step + 1, m)


def simulate_laq(world: int, steps: int, D=10, xi=0.8, t_bar=2):
    codec = InnovationCodec(bits=4)
    q = [torch.zeros(N) for _ in range(world)]
    meta = [[0.0, 0.0, 0.0] for _ in range(world)]           # uploaded, skipped, ||eps_hat||^2
    S, hist = torch.zeros(N), torch.zeros(D)
    out, sent = [], []
    for step in range(steps):
        payloads, uploads = [], []
        for r in range(world):
            v = flat_grad(r, step, slow_grad) - q[r]
            dq = codec.innovation(codec.encode(v))
            lhs, eps2 = float(dq.square().sum()), (dq - v).square().sum()
            rhs = float(hist.sum() * (xi / D / world ** 2) + 3 * (eps2 + meta[r][2]))
            if not meta[r][0] or meta[r][1] >= t_bar or lhs > rhs:
                q[r] = q[r] + dq
                meta[r] = [1.0, 0.0, float(eps2)]
                payloads.append(codec.encode(v))
                uploads.append(r)
            else:
                meta[r][1] += 1
                payloads.append(codec.encode(torch.zeros(N)))
        S = S + codec.decode_accumulate(payloads, torch.zeros(N))
        hist = torch.cat([S.square().sum().reshape(1), hist[:-1]])
        out.append(S / world)
        sent.append(uploads)
    return out, sent, S, q


@pytest.mark.parametrize("world", [2, 3])
def test_laq_matches_simulation_and_skips(world):
    """Workers upload dQ only when the paper's rule says so (or after t_bar skips); every rank
    delivers S / N from the same S; a skip costs the 16-byte block header."""
    steps = 5
    results = run_engines("laq:bits=4,t_bar=2", world, steps=steps, grad_fn=slow_grad)
    assert_ranks_agree(results)
    want, sent, S, q = simulate_laq(world, steps)
    for step in range(steps):
        assert torch.equal(results_of(results[0][0], step), want[step]), step
    skips = sum(world - len(u) for u in sent)
    assert sent[0] == list(range(world)) and 0 < skips < world * (steps - 1)   # some skip, t_bar forces
    saved = [e.state_dict() for _, e in results]
    for sd in saved:                  # the running aggregate: the same bits on every rank
        assert same_bits(sd["params"]["p0"]["aggregate"], saved[0]["params"]["p0"]["aggregate"])
    torch.testing.assert_close(S, sum(q), rtol=1e-5, atol=1e-5)   # S = sum_m Q_m up to rounding
    codec = InnovationCodec(bits=4)
    upload = wire.block_nbytes([codec.encode(torch.ones(N))])
    skip = wire.block_nbytes([codec.encode(torch.zeros(N))])
    assert skip == 16 and upload == 16 + 8 + 2504       # header, radius (padded), codes
    for rank, (_, engine) in enumerate(results):
        ups = sum(rank in u for u in sent)
        assert engine.stats.bytes_sent == ups * upload + (steps - ups) * skip + steps * 40


# -- eSGD ----------------------------------------------------------------------------------------------

LOSSES = [[5.0, 4.0, 3.0, 3.5, 2.0, 1.0], [5.0, 6.0, 4.0, 3.0, 3.5, 3.0], [1.0, 1.0, 0.5, 0.4, 0.3, 0.6]]


def run_esgd(spec: str, world: int, steps: int):
    """One method object per rank (each observes its own loss), LocalWorld engines."""
    def fn(comm):
        method = hvd_compress.from_spec(spec)
        members = members_of(method)
        engine = Engine(members, lambda: comm, average=True, cap_bytes=25 * 2 ** 20, link=SLOW, name="t")
        outs = []
        for step in range(steps):
            method.observe_loss(torch.tensor(LOSSES[comm.rank][step]))
            for m in reversed(members):
                engine.add(m.index, grad(comm.rank, step, m))
            outs.append([engine.result(m.index).clone() for m in members])
        return outs, engine
    return LocalWorld(world).run(fn)


def simulate_esgd(world: int, steps: int, ratio=0.05, beta=0.9):
    k = math.ceil(ratio * N)
    H = [[0.0] * N for _ in range(world)]
    sel = [set() for _ in range(world)]
    mem = [torch.zeros(N) for _ in range(world)]
    out = []
    for step in range(steps):
        total = torch.zeros(N)
        for r in range(world):
            g = flat_grad(r, step)
            if step >= 2 and LOSSES[r][step] < LOSSES[r][step - 1]:      # loss fell: keep, raise H
                chosen = set(sel[r])
                for i in chosen:
                    H[r][i] += 1
            else:                                                     # draw k weighted by 1 + H
                keys = keys_torch(N, RandomKey(rank_seed(0, r), step, TID), torch.tensor(H[r])).tolist()
                chosen = set(sorted(range(N), key=lambda i: (-keys[i], i))[:k])
            a = beta * mem[r] + g
            thr = float(g.abs().mean())
            cands = [i for i in range(N) if i not in chosen and abs(float(a[i])) > thr]
            m = min(len(cands), k)
            promote = sorted(cands, key=lambda i: (-abs(float(a[i])), i))[:m]
            drop = sorted(chosen, key=lambda i: (H[r][i], i))[:m]
            chosen = (chosen - set(drop)) | set(promote)
            idx = torch.tensor(sorted(chosen))
            total[idx] += a[idx]
            a[idx] = 0
            mem[r], sel[r] = a, chosen
        out.append(total / world)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_esgd_matches_simulation(world):
    """Random first selections; kept (H raised) when the loss fell, else redrawn weighted by
    1 + H; the momentum residual above mean|g| replaces the lowest-H selected entries."""
    steps = 6
    results = run_esgd("esgd:ratio=0.05", world, steps)
    assert_ranks_agree(results)
    for step, want in enumerate(simulate_esgd(world, steps)):
        assert torch.equal(results_of(results[0][0], step), want), step
    k = math.ceil(0.05 * N)
    for _, engine in results:
        sd = engine.state_dict()
        assert int(sum(sd["params"][p]["selected"].sum() for p in ("p0", "p1"))) == k
        # at most k entries of 8 bytes per step, + the header, + the dense p2
        assert engine.stats.bytes_sent <= steps * (8 * k + 16 + 40)


def test_esgd_without_a_loss_warns_once_and_draws_at_random():
    with pytest.warns(RuntimeWarning, match="observe_loss"):
        results = run_engines("esgd:ratio=0.05", 2, steps=3)
    for _, engine in results:
        importance = engine.state_dict()["params"]["p0"]["importance"]
        assert not bool(importance.any())            # H never grows: uniform random-k


# -- every method: AMP rollback, resume -----------------------------------------------------------------

@pytest.mark.parametrize("spec", ["esgd:ratio=0.05", "laq:t_bar=2", "diana"])
def test_non_finite_step_leaves_no_trace(spec, recwarn):
    non_finite_check(spec)


@pytest.mark.parametrize("spec", ["esgd:ratio=0.05", "laq", "diana"])
def test_state_dict_resume_is_bit_exact(spec, recwarn):
    full = run_engines(spec, 2, steps=4)
    saved = states_after(spec, 2, 2)
    resumed = resume_engines(spec, 2, saved, (2, 3))
    for rank in range(2):
        for step in (2, 3):
            for a, b in zip(resumed[rank][step - 2], full[rank][0][step]):
                assert torch.equal(a, b), (rank, step)


def test_simulator_gives_esgd_each_workers_loss():
    """hvd_compress.simulate runs all workers through one compressor object: eSGD must still
    see each worker's own loss (observe_loss's rank), as a real job's processes do."""
    from hvd_compress.simulate import DataParallel
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32)
    method = hvd_compress.from_spec("esgd")
    sim = DataParallel(model, torch.optim.SGD(model.parameters(), lr=0.1), method, workers=3)
    batches = [(torch.randn(4, 64), torch.randn(4, 32)) for _ in range(3)]
    losses = sim.step(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]), batches)
    assert len(set(losses)) == 3
    assert [method._observed(r) for r in range(3)] == losses
