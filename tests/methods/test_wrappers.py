"""LocalSGD and DelayedAveraging: the update rules against plain-torch
simulations (bit for bit where the simulation computes in the wrappers' order, and against the
paper's formula in float64), LocalWorld at 2 and 3 ranks, real horovodrun jobs at 2 and 3
ranks, wire bytes, AMP with one rank overflowing, unused and sparse parameters, and resume."""
from __future__ import annotations

import io

import pytest
import torch

import hvd_compress
from hvd_compress.engine.local import LocalWorld
from hvd_compress.routes.base import Link
from hvd_compress.routes.wire import block_nbytes

IN, OUT, BATCH = 16, 8, 6
#: a declared link: reproducible plans, no measurement
LINK = Link.gbps(1)
LRS = [0.05, 0.05, 0.1, 0.1, 0.0, 0.1, 0.08, 0.08, 0.06, 0.06]    # one step with lr 0
NONZERO = [0.05, 0.05, 0.1, 0.1, 0.1, 0.1, 0.08, 0.08, 0.06, 0.06]
NEVER = (-1, -1)


class Net(torch.nn.Module):
    """A linear model and an extra parameter some ranks use at some steps (or none ever)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(IN, OUT)
        self.extra = torch.nn.Parameter(torch.empty(5))
        self.never = torch.nn.Parameter(torch.empty(3))    # never used: its grad stays None
        g = torch.Generator().manual_seed(0)     # (not the global generator: ranks are threads)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _uses_extra(rank: int, t: int) -> bool:
    return (rank + t) % 3 == 0


def _loss(model: Net, rank: int, t: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + t)
    x, y = torch.randn(BATCH, IN, generator=g), torch.randn(BATCH, OUT, generator=g) * (rank + 1)
    loss = ((model.lin(x.to(model.lin.weight.dtype)) - y.to(model.lin.weight.dtype)) ** 2).mean()
    if _uses_extra(rank, t):
        loss = loss + (model.extra * (rank + 1)).square().sum()
    return loss


def _train(comm, wrap, steps: int, *, momentum: float = 0.9, inject=NEVER, scaler: bool = False,
           flush: bool = True, lrs: list[float] = LRS, unscale_first: bool = False):
    """One rank's training with wrapper ``wrap(optimizer, named_parameters, comm)`` (comm None:
    Horovod); ``inject``: (rank, step) whose gradient gets an inf; ``unscale_first``: call
    ``scaler.unscale_`` before ``scaler.step`` (as for clipping).  Returns the parameters after
    each step and the stats."""
    if comm is None:
        import horovod.torch as hvd
        rank = hvd.rank()
    else:
        rank = comm.rank
    model = Net()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=LRS[0], momentum=momentum), model.named_parameters(), comm)
    amp = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8) if scaler else None
    history = []
    for t in range(steps):
        for group in opt.param_groups:
            group["lr"] = lrs[t]
        opt.zero_grad()
        loss = _loss(model, rank, t)
        (amp.scale(loss) if amp else loss).backward()
        if (rank, t) == inject:
            model.lin.weight.grad[0, 0] = float("inf")
        if amp:
            if unscale_first:
                amp.unscale_(opt)
            amp.step(opt)
            amp.update()
        else:
            opt.step()
        history.append(_params(model))
    if flush and isinstance(opt, hvd_compress.DelayedAveraging):
        opt.flush()
        history.append(_params(model))
    return history, opt.stats()


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _local(world: int, wrap, steps: int, **kwargs):
    return LocalWorld(world).run(lambda comm: _train(comm, wrap, steps, **kwargs))


def _local_sgd(**kw):
    return lambda opt, named, comm: hvd_compress.LocalSGD(opt, named, comm=comm, **kw)


def _dga(**kw):
    return lambda opt, named, comm: hvd_compress.DelayedAveraging(opt, named, comm=comm, **kw)


# -- plain-torch statements of the update rules --------------------------------------------------

def _replicas(world: int, momentum: float, dtype=torch.float32):
    models = [Net().to(dtype) for _ in range(world)]
    opts = [torch.optim.SGD(m.parameters(), lr=LRS[0], momentum=momentum) for m in models]
    return models, opts


def _mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Sum in rank order, then divide (LocalWorld's average)."""
    total = tensors[0].clone()
    for t in tensors[1:]:
        total = total + t
    return total / len(tensors)


def _sim_local_sgd(world: int, steps: int, period: int, warmup: int, delta: bool, momentum: float = 0.9,
                   skip=NEVER):
    """x_i <- step_i(x_i); after iteration t with t <= warmup or (t - warmup) % period == 0:
    x_i <- mean_j x_j (or a + mean_j (x_j - a), a <- x)."""
    models, opts = _replicas(world, momentum)
    anchor = [p.detach().clone() for p in models[0].parameters()]
    history = []
    for t in range(steps):
        for r, (m, opt) in enumerate(zip(models, opts)):
            opt.param_groups[0]["lr"] = LRS[t]
            opt.zero_grad()
            _loss(m, r, t).backward()
            if (r, t) != skip:
                opt.step()
        if t + 1 <= warmup or (t + 1 - warmup) % period == 0:
            with torch.no_grad():
                for j, ps in enumerate(zip(*(m.parameters() for m in models))):
                    new = anchor[j] + _mean([p - anchor[j] for p in ps]) if delta else _mean(list(ps))
                    for p in ps:
                        p.copy_(new)
                    anchor[j] = new.clone()
        history.append([_params(m) for m in models])
    return history


def _sim_dga(world: int, steps: int, delay: int, momentum: float = 0.9, skip=NEVER):
    """Each rank steps with g_i(t) + c / lr_t, c = lr_s (gbar(s) - g_i(s)), s = t - delay; a
    rank that skipped s applied nothing (local term 0); a step some rank skipped has gbar := 0;
    corrections wait while a rank skips or its lr is 0; flush: x -= pending corrections."""
    models, opts = _replicas(world, momentum)
    names = [n for n, _ in models[0].named_parameters()]
    sent = {}                                  # t -> (averages, locals per rank, lr)
    carry = [dict() for _ in range(world)]
    history = []

    def corrections(s: int, r: int):
        avgs, locals_, lr, good = sent.pop(s) if r == world - 1 else sent[s]
        for n in names:
            local = locals_[r][n]
            avg = avgs[n]
            if local is None and (not good or not bool(avg.any())):
                continue
            c = -lr * local if not good else (avg * lr if local is None else (avg - local) * lr)
            carry[r][n] = c if n not in carry[r] else carry[r][n] + c

    for t in range(steps):
        grads, locals_ = [], []
        for r, (m, opt) in enumerate(zip(models, opts)):
            opt.param_groups[0]["lr"] = LRS[t]
            opt.zero_grad()
            _loss(m, r, t).backward()
            if (r, t) == skip:
                m.lin.weight.grad[0, 0] = float("inf")
            grads.append({n: p.grad for n, p in m.named_parameters()})
            locals_.append({n: None if p.grad is None or (r, t) == skip else p.grad.clone()
                            for n, p in m.named_parameters()})
        shapes = dict(models[0].named_parameters())
        avgs = {n: _mean([g[n] if g[n] is not None else torch.zeros_like(shapes[n]) for g in grads])
                for n in names}
        sent[t] = (avgs, locals_, LRS[t], skip[1] != t)
        for r, (m, opt) in enumerate(zip(models, opts)):
            if t >= delay:
                corrections(t - delay, r)
            if (r, t) == skip:
                continue
            for n, p in m.named_parameters():
                if n in carry[r] and LRS[t] != 0:
                    extra = carry[r].pop(n) / LRS[t]
                    p.grad = extra if p.grad is None else p.grad.add_(extra)
            opt.step()
        history.append([_params(m) for m in models])
    for s in range(max(0, steps - delay), steps):
        for r in range(world):
            corrections(s, r)
    with torch.no_grad():
        for r, m in enumerate(models):
            for n, p in m.named_parameters():
                if n in carry[r]:
                    p.sub_(carry[r][n])
    history.append([_params(m) for m in models])
    return history


def _assert_equal(got, expected, exact: bool = True) -> None:
    """got: per rank (history, stats); expected: per step, per rank, params."""
    for rank, (history, _) in enumerate(got):
        assert len(history) == len(expected)
        for t, params in enumerate(history):
            for n, value in params.items():
                if exact:
                    assert torch.equal(value, expected[t][rank][n]), (rank, t, n)
                else:
                    torch.testing.assert_close(value, expected[t][rank][n], rtol=1e-5, atol=1e-6)


# -- arguments -----------------------------------------------------------------------------------

def test_clear_errors() -> None:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    named = list(model.named_parameters())
    with pytest.raises(ValueError, match="period"):
        hvd_compress.LocalSGD(opt, named, period=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        hvd_compress.LocalSGD(opt, named, period=2, warmup_steps=-1)
    with pytest.raises(ValueError, match="delay"):
        hvd_compress.DelayedAveraging(opt, named, delay=0)
    with pytest.raises(ValueError, match="named_parameters"):
        hvd_compress.DelayedAveraging(opt, delay=1)
    with pytest.raises(ValueError, match="no name"):
        hvd_compress.LocalSGD(opt, named[:1], period=2)
    with pytest.raises(ValueError, match="delta=True"):
        hvd_compress.LocalSGD(opt, named, period=2, compression=hvd_compress.QSGD())
    with pytest.raises(ValueError, match="hvd_compress method"):
        hvd_compress.DelayedAveraging(opt, named, delay=1, compression="qsgd")
    with pytest.raises(ValueError, match="momentum"):
        hvd_compress.DelayedAveraging(opt, named, delay=1, compression=hvd_compress.DGC())
    wrapped = hvd_compress.LocalSGD(opt, named, period=2)
    with pytest.raises(ValueError, match="replaces hvd.DistributedOptimizer"):
        hvd_compress.DelayedAveraging(wrapped, named, delay=1)
    with pytest.raises(ValueError, match="not a DelayedAveraging state"):
        hvd_compress.DelayedAveraging(opt, named, delay=1).load_state_dict(wrapped.state_dict())
    # an LR scheduler and GradScaler take the wrapper; its param_groups are the optimizer's
    assert torch.optim.lr_scheduler.StepLR(wrapped, 1).get_last_lr() == [0.1]
    assert wrapped.param_groups is opt.param_groups


def test_sparse_gradients_are_refused() -> None:
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = hvd_compress.DelayedAveraging(torch.optim.SGD(emb.parameters(), lr=0.1), emb.named_parameters(),
                                        delay=1, comm=LocalWorld(1).comms[0])
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()


# -- the mathematics -----------------------------------------------------------------------------

@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("delta", [False, True])
def test_local_sgd_is_the_simulation_bit_for_bit(world, delta):
    got = _local(world, _local_sgd(period=3, warmup_steps=2, delta=delta), 10)
    _assert_equal(got, _sim_local_sgd(world, 10, period=3, warmup=2, delta=delta))
    # synced after iterations 1, 2, 5, 8: every rank holds the same model there, not in between
    for t, same in ((1, True), (2, False), (4, True), (5, False), (7, True), (9, False)):
        assert all(torch.equal(got[0][0][t]["lin.weight"], g[0][t]["lin.weight"]) for g in got) == same, t
    stats = got[0][1]
    numel = sum(p.numel() for p in Net().parameters())
    assert stats["syncs"] == 4 and stats["steps"] == 10 and stats["skipped_steps"] == 0
    assert stats["bytes_sent"] == 4 * numel * 4 and stats["bytes_dense"] == 4 * numel * 10


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("delay", [1, 2])
def test_delayed_averaging_is_the_simulation_bit_for_bit(world, delay):
    got = _local(world, _dga(delay=delay), 10)
    _assert_equal(got, _sim_dga(world, 10, delay))
    numel = sum(p.numel() for p in Net().parameters())
    assert got[0][1]["bytes_sent"] == got[0][1]["bytes_dense"] == 4 * numel * 10
    assert got[0][1]["in_flight"] == 0     # flushed


def test_delayed_averaging_is_the_papers_rule_for_sgd():
    """Plain SGD: x_i(t+1) = x_i(t) - lr_t g_i(t) - lr_s (gbar(s) - g_i(s)), s = t - D, in float64;
    after the flush every rank holds x(0) - sum_t lr_t gbar(t) (up to rounding)."""
    world, delay, steps = 3, 2, 9
    got = _local(world, _dga(delay=delay), steps, momentum=0.0, lrs=NONZERO)
    models, _ = _replicas(world, 0.0, torch.float64)
    grads = {}
    for t in range(steps):
        for r, m in enumerate(models):
            m.zero_grad()
            _loss(m, r, t).backward()
            grads[t, r] = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                           for n, p in m.named_parameters()}
        for r, m in enumerate(models):
            with torch.no_grad():
                for n, p in m.named_parameters():
                    p -= NONZERO[t] * grads[t, r][n]
                    if t >= delay:
                        s = t - delay
                        avg = sum(grads[s, j][n] for j in range(world)) / world
                        p -= NONZERO[s] * (avg - grads[s, r][n])
        for r, m in enumerate(models):
            for n, p in m.named_parameters():
                torch.testing.assert_close(got[r][0][t][n], p.detach().float(), rtol=1e-5, atol=1e-6)
    final = got[0][0][-1]
    for r in range(world):
        for n in final:
            torch.testing.assert_close(got[r][0][-1][n], final[n], rtol=1e-6, atol=1e-6)
    assert torch.equal(final["never"], Net().never)       # no gradient anywhere: untouched


# -- AMP: one rank overflows ---------------------------------------------------------------------

@pytest.mark.parametrize("world", [2, 3])
def test_amp_overflow_on_one_rank(world):
    """GradScaler with rank 1's gradient inf at step 3: that rank skips its local update, every
    rank keeps the same schedule (no hang), the average is not poisoned: LocalSGD syncs rank
    1's unchanged model; DGA treats step 3 as skipped everywhere (its local updates undone).
    (At 3 ranks the gradients are unscaled before scaler.step(), as when clipping.)"""
    got = _local(world, _local_sgd(period=2), 8, scaler=True, inject=(1, 3))
    _assert_equal(got, _sim_local_sgd(world, 8, period=2, warmup=0, delta=False, skip=(1, 3)))
    assert [s["skipped_steps"] for _, s in got] == [0, 1] + [0] * (world - 2)
    assert all(s["syncs"] == 4 for _, s in got)
    got = _local(world, _dga(delay=2), 8, scaler=True, inject=(1, 3), unscale_first=world == 3)
    _assert_equal(got, _sim_dga(world, 8, 2, skip=(1, 3)))
    assert all(torch.isfinite(p).all() for history, _ in got for p in history[-1].values())
    assert [s["skipped_steps"] for _, s in got] == [0, 1] + [0] * (world - 2)


def test_local_sgd_non_finite_model_raises_on_every_rank_and_changes_nothing():
    def fn(comm):
        model = Net()
        opt = hvd_compress.LocalSGD(torch.optim.SGD(model.parameters(), lr=0.0), model.named_parameters(),
                                    period=1, comm=comm)
        _loss(model, comm.rank, 0).backward()
        if comm.rank == 0:
            with torch.no_grad():
                model.lin.bias[0] = float("nan")     # diverged without a GradScaler
        before = _params(model)
        with pytest.raises(FloatingPointError, match="not finite"):
            opt.step()
        return before, _params(model), opt.iteration
    for before, after, iteration in LocalWorld(2).run(fn):
        assert iteration == 1
        for n in before:
            torch.testing.assert_close(after[n], before[n], rtol=0, atol=0, equal_nan=True)


# -- compression ---------------------------------------------------------------------------------

def test_compressed_local_sgd_and_delayed_averaging_bytes():
    """QSGD's packed payloads once per sync (LocalSGD's change) or per step (DGA's gradients),
    exactly; the ranks agree after every sync."""
    qsgd = dict(bits=4, bucket_size=64, min_numel=0, route="allgather", link=LINK, bucket_cap_mb=0)
    codec = hvd_compress.QSGD(**qsgd).codec    # one bucket per parameter, packed by the wire format
    payload = sum(block_nbytes([codec.payload_template(p.numel())]) for p in Net().parameters())
    got = _local(2, _local_sgd(period=2, delta=True, compression=hvd_compress.QSGD(**qsgd)), 6)
    for t in (1, 3, 5):
        assert all(torch.equal(got[0][0][t][n], got[1][0][t][n]) for n in got[0][0][t])
    # the first sync averages the same changes as the dense run's, quantized: close to it
    dense = _sim_local_sgd(2, 6, period=2, warmup=0, delta=True)
    start = Net().lin.weight.detach()
    error = (got[0][0][1]["lin.weight"] - dense[1][0]["lin.weight"]).norm()
    assert error < 0.7 * (dense[1][0]["lin.weight"] - start).norm()     # (4 bits: 0.45)
    assert got[0][1]["bytes_sent"] == 3 * payload and got[0][1]["syncs"] == 3
    got = _local(3, _dga(delay=2, compression=hvd_compress.QSGD(**qsgd)), 6, momentum=0.0)
    assert got[0][1]["bytes_sent"] == 6 * payload
    for n in got[0][0][-1]:    # after the flush the ranks agree (up to rounding)
        torch.testing.assert_close(got[0][0][-1][n], got[2][0][-1][n], rtol=1e-5, atol=1e-6)


# -- resume ----------------------------------------------------------------------------------------

def _resumed(comm, wrap, steps: int, cut: int):
    """Train ``cut`` steps, save (torch.save), rebuild everything, load, train the rest."""
    model = Net()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=LRS[0], momentum=0.9), model.named_parameters(), comm)
    for t in range(steps):
        if t == cut:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
            buf.seek(0)
            saved = torch.load(buf)
            model = Net()
            model.load_state_dict(saved["model"])
            opt = wrap(torch.optim.SGD(model.parameters(), lr=LRS[0], momentum=0.9), model.named_parameters(), comm)
            opt.load_state_dict(saved["opt"])
        for group in opt.param_groups:
            group["lr"] = LRS[t]
        opt.zero_grad()
        _loss(model, comm.rank, t).backward()
        opt.step()
    if isinstance(opt, hvd_compress.DelayedAveraging):
        opt.flush()
    return _params(model), opt.stats()


@pytest.mark.parametrize("wrap", [
    _local_sgd(period=3, delta=True, compression=hvd_compress.TopK(ratio=0.2, min_numel=0, route="allgather",
                                                                    link=LINK)),
    _dga(delay=3, compression=hvd_compress.TopK(ratio=0.2, min_numel=0, route="allgather", link=LINK))],
    ids=["localsgd-topk", "dga-topk"])
def test_state_dict_resume_is_bit_exact(wrap):
    """Saved mid-period (LocalSGD: anchor, iteration, TopK's residuals) and with corrections in
    flight (DGA): the resumed run is the uninterrupted one, bit for bit."""
    steps = 8
    straight = _local(2, wrap, steps)
    resumed = LocalWorld(2).run(lambda comm: _resumed(comm, wrap, steps, cut=4))
    for (history, stats), (params, stats2) in zip(straight, resumed):
        for n in params:
            assert torch.equal(history[-1][n], params[n]), n
        assert stats["steps"] == stats2["steps"] == steps


# -- real Horovod jobs -------------------------------------------------------------------------------

def _horovod_runs():
    runs = {"localsgd": _train(None, _local_sgd(period=2, warmup_steps=1), 6),
            "localsgd-amp": _train(None, _local_sgd(period=2), 6, scaler=True, inject=(1, 2)),
            "dga": _train(None, _dga(delay=2), 6),
            "dga-amp": _train(None, _dga(delay=2), 6, scaler=True, inject=(1, 2))}
    return {k: v[0] for k, v in runs.items()}


@pytest.mark.horovod
@pytest.mark.parametrize("np", [2, 3])
def test_real_jobs_match_local_world(np):
    """horovodrun: the same trajectories as LocalWorld (bit for bit at 2 ranks, whose sums are
    order-free; Horovod's ring order at 3 ranks: up to rounding); the AMP overflow neither hangs
    nor poisons."""
    from harness import run_job
    results = run_job(_horovod_runs, np=np, timeout=180)
    expected = {"localsgd": _local(np, _local_sgd(period=2, warmup_steps=1), 6),
                "localsgd-amp": _local(np, _local_sgd(period=2), 6, scaler=True, inject=(1, 2)),
                "dga": _local(np, _dga(delay=2), 6),
                "dga-amp": _local(np, _dga(delay=2), 6, scaler=True, inject=(1, 2))}
    for key, local in expected.items():
        got = [(r[key], None) for r in results]
        _assert_equal(got, [[local[r][0][t] for r in range(np)] for t in range(len(local[0][0]))],
                      exact=np == 2)
