"""hvd_compress inside real Horovod 0.28.1 jobs (``horovodrun``, Gloo unless noted): the stock
``hvd.DistributedOptimizer(compression=...)`` and ``hvd_compress.DistributedOptimizer``.

The aggregated gradients equal, bit for bit, the same engines run in one process (LocalWorld,
itself checked against hand simulations in test_engine.py); Horovod's semantics (op, predivide,
groups, backward passes, process sets) hold; and the situations Horovod's own test suite tries
(rank-dependent graphs, unused parameters, sparse embeddings, shared compressor objects, AMP,
resume) neither hang nor crash."""
from __future__ import annotations

import pytest
import torch

from harness import JobFailed, run_job
from jobs import _amp, _rank_dependent_graph, _two_optimizers

pytestmark = pytest.mark.horovod

#: a declared link for reproducible plans (the measured one would depend on the machine's load)
LINK = {"HVD_COMPRESS_LINK_GBPS": "1"}
SHAPES = {"weight": (3001,), "w2": (40, 50), "bias": (10,)}   # two compressed, one below min_numel


def _grad(rank: int, step: int, name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + 10 * step + sorted(SHAPES).index(name))
    return torch.randn(SHAPES[name], generator=g) * (1 + rank)


def _params() -> dict[str, torch.nn.Parameter]:
    return {name: torch.nn.Parameter(torch.zeros(shape)) for name, shape in SHAPES.items()}


def _train(spec: str, steps: int = 2, op: str = "Average", predivide: float = 1.0, passes: int = 1,
           groups=None, wrapper: bool = False, timings: bool = False):
    """Each rank sets known gradients (loss = sum of param * G) and runs synchronize(); returns
    the aggregated gradients per step and the compressor's stats and plan (with ``timings``:
    its timings and the last step's timeline instead of the plan)."""
    import horovod.torch as hvd
    import hvd_compress
    params = _params()
    compression = hvd_compress.from_spec(spec)
    make = hvd_compress.DistributedOptimizer if wrapper else hvd.DistributedOptimizer
    opt = make(torch.optim.SGD(params.values(), lr=0.0), named_parameters=list(params.items()),
               compression=compression, op=getattr(hvd, op), gradient_predivide_factor=predivide,
               backward_passes_per_step=passes, groups=groups)
    out = []
    for step in range(steps):
        opt.zero_grad()
        for _ in range(passes):
            loss = sum((p * _grad(hvd.rank(), step, name) / passes).sum() for name, p in params.items())
            loss.backward()
        opt.synchronize()
        out.append({name: p.grad.clone() for name, p in params.items()})
        with opt.skip_synchronize():
            opt.step()
    if timings:
        return out, compression.stats(), (compression.timings(), compression.timeline())
    return out, compression.stats(), compression.plan()


def _local(spec: str, world: int, steps: int = 2, average: bool = True):
    """The same engines in one process (LocalWorld), members in the optimizer's order."""
    from hvd_compress import methods
    from hvd_compress.engine.buckets import Member
    from hvd_compress.engine.engine import Engine
    from hvd_compress.engine.local import LocalWorld
    from hvd_compress.routes.base import Link
    method = methods.from_spec(spec)
    members = [Member(i, name, torch.Size(shape), torch.float32, method)
               for i, (name, shape) in enumerate(SHAPES.items())]

    def fn(comm):
        engine = Engine(members, lambda: comm, average=average, cap_bytes=25 * 2 ** 20,
                        link=Link.gbps(1), name="local")
        outs = []
        for step in range(steps):
            for m in members:
                engine.add(m.index, _grad(comm.rank, step, m.name))
            outs.append({m.name: engine.result(m.index).clone() for m in members})
        return outs
    return LocalWorld(world).run(fn)


COMPRESSED = ["terngrad:route='compressed'", "qsgd:bits=4,route='two_phase'",
              "topk:ratio=0.05,route='compressed'", "topk:ratio=0.05,route='sparse_two_phase'",
              "dgc:ratio=0.05,route='compressed'", "fp16:route='allgather'"]


@pytest.mark.parametrize("spec", COMPRESSED)
@pytest.mark.parametrize("np", [2, 3, 4])
def test_stock_optimizer_matches_local_world_bit_for_bit(spec, np):
    results = run_job(_train, np=np, args=(spec,), timeout=180, env=LINK)
    expected = _local(spec, np)
    for rank, (steps, stats, plan) in enumerate(results):
        for step, grads in enumerate(steps):
            for name in ("weight", "w2"):
                assert torch.equal(grads[name], expected[rank][step][name]), (rank, step, name)
            torch.testing.assert_close(grads["bias"], expected[rank][step]["bias"])
        assert stats["steps"] == 2 and stats["skipped_steps"] == 0
        assert "below min_numel" in plan


SEED_METHODS = ["onebit:route='compressed'", "efsignsgd:route='compressed'", "signsgd:route='compressed'",
                "randomk:ratio=0.05,route='compressed'", "sketch:route='compressed'",
                "powersgd:route='compressed',min_numel=16"]


@pytest.mark.parametrize("spec", SEED_METHODS)
@pytest.mark.parametrize("np", [2, 3])
def test_seed_methods_in_real_jobs(spec, np):
    """Issue 10's methods through the stock optimizer: equal to LocalWorld's engines, bit for bit
    where the sums are the codecs' own (and for 2 ranks, whose allreduce sums in either order
    alike); allreduce routes at 3 ranks sum in Horovod's ring order: equal up to rounding."""
    results = run_job(_train, np=np, args=(spec,), timeout=180, env=LINK)
    expected = _local(spec, np)
    summed_by_horovod = spec.startswith(("randomk", "powersgd")) and np > 2
    for rank, (steps, stats, _) in enumerate(results):
        for step, grads in enumerate(steps):
            for name in ("weight", "w2"):
                if summed_by_horovod:
                    torch.testing.assert_close(grads[name], expected[rank][step][name], rtol=1e-5, atol=1e-6)
                else:
                    assert torch.equal(grads[name], expected[rank][step][name]), (rank, step, name)
        # (PowerSGD sends the 3001-element vector dense: only the 40 x 50 matrix shrinks)
        assert stats["bytes_sent"] < stats["bytes_dense"] / (1.5 if spec.startswith("powersgd") else 2)


ADAPTIVE = ["adacomp:route='compressed'", "graddrop:route='compressed'", "stc:route='compressed'",
            "graddrop:route='sparse_two_phase'"]


def _each(fn, specs, *args):
    """``fn(spec, *args)`` for every spec in one job (one Horovod start-up for all)."""
    return [fn(spec, *args) for spec in specs]


@pytest.mark.parametrize("np", [2, 3])
def test_adaptive_sparsifiers_in_real_jobs(np):
    """Issue 11's AdaComp, Gradient Dropping and STC through the stock optimizer (one job per world
    size): equal to LocalWorld's engines bit for bit (their sums are the codecs' own), and a
    fraction of the dense bytes."""
    results = run_job(_each, np=np, args=(_train, ADAPTIVE), timeout=240, env=LINK)
    for i, spec in enumerate(ADAPTIVE):
        expected = _local(spec, np)
        for rank, per_spec in enumerate(results):
            steps, stats, _ = per_spec[i]
            for step, grads in enumerate(steps):
                for name in ("weight", "w2"):
                    assert torch.equal(grads[name], expected[rank][step][name]), (spec, rank, step, name)
            assert stats["steps"] == 2 and stats["bytes_sent"] < stats["bytes_dense"] / 2, spec


def test_adaptive_sparsifiers_amp_overflow_skips_the_step_on_every_rank():
    """An inf on rank 1 at step 2 under GradScaler: both ranks back off and skip that step, their
    residuals untouched (the weights stay identical across ranks throughout)."""
    specs = ["adacomp:route='compressed'", "graddrop:route='compressed'", "stc:route='compressed'"]
    results = run_job(_each, np=2, args=(_amp, specs, False), timeout=240, env=LINK)
    for i, spec in enumerate(specs):
        (scales0, w0, stats0), (scales1, w1, stats1) = results[0][i], results[1][i]
        assert scales0 == scales1 and scales0[2] == scales0[1] / 2, spec
        assert torch.equal(w0[2], w0[1]) and torch.equal(w1[2], w1[1]), spec
        assert not torch.equal(w0[3], w0[2]), spec
        assert all(torch.equal(a, b) for a, b in zip(w0, w1)), spec
        assert stats0["skipped_steps"] == stats1["skipped_steps"] == 1, spec


#: the methods whose state follows the decoded aggregate (after_decode)
AGGREGATE_METHODS = ["esgd:ratio=0.05", "laq", "diana", "diana:codec='terngrad'"]


@pytest.mark.parametrize("np", [2, 3])
def test_aggregate_methods_in_real_jobs(np):
    """eSGD, LAQ and DIANA through the stock optimizer (one job, one compressor after the other;
    eSGD without observe_loss()): equal to LocalWorld's engines bit for bit, their shift or
    aggregate the same on every rank."""
    import warnings
    results = run_job(_each, np=np, args=(_train, AGGREGATE_METHODS, 3), timeout=240, env=LINK)
    for i, spec in enumerate(AGGREGATE_METHODS):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = _local(spec, np, steps=3)
        for rank in range(np):
            steps, stats, _ = results[rank][i]
            for step, grads in enumerate(steps):
                for name in ("weight", "w2"):
                    assert torch.equal(grads[name], expected[rank][step][name]), (spec, rank, step, name)
            assert stats["bytes_sent"] < stats["bytes_dense"] / 2


def test_sum_predivide_passes_groups_and_the_wrapper():
    spec = "topk:ratio=0.05,route='compressed'"
    summed = run_job(_train, np=3, args=(spec,), kwargs={"op": "Sum"}, timeout=120, env=LINK)
    expected = _local(spec, 3, average=False)
    assert all(torch.equal(summed[r][0][s]["weight"], expected[r][s]["weight"]) for r in range(3) for s in range(2))
    averaged = _local(spec, 3)
    for kwargs in ({"predivide": 4.0}, {"passes": 2, "groups": 1}, {"wrapper": True}):
        results = run_job(_train, np=3, args=(spec,), kwargs=kwargs, timeout=120, env=LINK)
        for rank, (steps, _, _) in enumerate(results):
            # two passes of g/2 add up to g up to rounding; the rest is exact
            check = torch.testing.assert_close if "passes" in kwargs else \
                lambda a, b: torch.equal(a, b) or pytest.fail(str(kwargs))
            check(steps[0]["weight"], averaged[rank][0]["weight"])


@pytest.mark.parametrize("spec", ["topk:ratio=0.05,route='compressed'", "terngrad:route='compressed'",
                                  "qsgd:route='compressed'"])
def test_stats_are_the_payload_bytes(spec):
    import hvd_compress
    (steps, stats, _), _ = run_job(_train, np=2, args=(spec,), timeout=120, env=LINK)
    codec = hvd_compress.from_spec(spec).codec
    dense = 2 * 5011 * 4
    assert stats["bytes_dense"] == dense
    small = 2 * 10 * 4                       # the bias, through the dense allreduce
    if spec.startswith("topk"):              # 0.8k..1.3k entries of 6 bytes per tensor, + headers
        k = codec.k(3001) + codec.k(2000)
        assert 2 * 0.8 * k * 6 <= stats["bytes_sent"] - small <= 2 * (1.3 * k * 6 + 64)
    else:
        from hvd_compress.routes import wire
        segments = [3001, 2000] if spec.startswith("terngrad") else [5000]
        payloads = [codec.encode(torch.randn(n)) for n in segments]
        assert stats["bytes_sent"] == 2 * (wire.block_nbytes(payloads) + 10 * 4)
    # per step: the compressed bucket's allgather and the step header (the bias goes through
    # Horovod's own allreduce, as uncompressed)
    assert stats["collectives"] == 2 * 2


def test_timings_and_timeline_in_a_real_job():
    """compression.timings() has every part, encoding and decoding took time, and the last
    step's timeline runs from the first hook to the end of the flush with every compressed
    bucket encoded and decoded once (in a hook, while waiting for the header, or in the flush)."""
    (_, _, (timings, events)), _ = run_job(_train, np=2, args=("terngrad:route='compressed'",),
                                           kwargs={"timings": True}, timeout=120, env=LINK)
    assert set(timings) == {"hook", "encode", "wait", "decode"} and all(v >= 0 for v in timings.values())
    assert timings["encode"] > 0 and timings["decode"] > 0
    names = [what for _, what, _ in events]
    assert names[0] == "begin" and names[-1] == "end" and names.count("flush") == 1
    assert [t for t, _, _ in events] == sorted(t for t, _, _ in events)
    encoded = [where for _, what, where in events if what == "encoded"]
    decoded = [where for _, what, where in events if what == "decoded"]
    assert encoded and sorted(encoded) == sorted(decoded) and len(set(decoded)) == len(decoded)


def _noise(spec: str):
    """Identical gradients on every rank: the error of the aggregate (per step, 4 steps)."""
    import horovod.torch as hvd
    import hvd_compress
    g = torch.randn(20_000, generator=torch.Generator().manual_seed(5)) * 1e-3
    w = torch.nn.Parameter(torch.zeros(20_000))
    opt = hvd.DistributedOptimizer(torch.optim.SGD([w], lr=0.0), named_parameters=[("w", w)],
                                   compression=hvd_compress.from_spec(spec))
    errors = []
    for _ in range(4):
        opt.zero_grad()
        (w * g).sum().backward()
        opt.synchronize()
        errors.append(float(((w.grad - g) ** 2).mean()))
    return sum(errors) / 4


@pytest.mark.parametrize("spec", ["terngrad:clip=None", "qsgd:bits=4", "fp16"])
def test_noise_falls_as_one_over_n_in_real_jobs(spec):
    """Each rank draws its own random stream: at 4 ranks the MSE of the average is about half
    the 2-rank MSE (with the shared stream of before, the ratio was ~1)."""
    spec += ("," if ":" in spec else ":") + "route='allgather'"
    mse2 = run_job(_noise, np=2, args=(spec,), timeout=120, env=LINK)[0]
    mse4 = run_job(_noise, np=4, args=(spec,), timeout=180, env=LINK)[0]
    assert mse4 / mse2 < 0.65, (mse2, mse4)


@pytest.mark.parametrize("spec", ["terngrad", "qsgd", "topk:ratio=0.05", "dgc:ratio=0.05", "fp16",
                                  "terngrad:shared_scale=True", "qsgd:route='two_phase',error_feedback=True",
                                  "onebit", "efsignsgd", "signsgd", "randomk:ratio=0.05", "sketch",
                                  "powersgd:min_numel=16"])
def test_amp_overflow_on_one_rank_skips_that_step_on_every_rank(spec):
    spec += ("," if ":" in spec else ":") + "route='compressed'" if "route" not in spec else ""
    results = run_job(_amp, np=2, args=(spec, spec.startswith("dgc")), timeout=120, env=LINK)
    (scales0, w0, stats0), (scales1, w1, stats1) = results
    assert scales0 == scales1 and scales0[2] == scales0[1] / 2      # both backed off at step 2
    assert torch.equal(w0[2], w0[1]) and torch.equal(w1[2], w1[1])  # ... and skipped it
    assert not torch.equal(w0[3], w0[2])                            # training continued
    assert all(torch.equal(a, b) for a, b in zip(w0, w1))           # ranks identical throughout
    assert stats0["skipped_steps"] == stats1["skipped_steps"] == 1


def _dgc_state_is_not_grad():
    """clip_grad_norm_, unscaling and zeroing p.grad after synchronize() leave DGC's momentum and
    residual alone."""
    import horovod.torch as hvd
    import hvd_compress
    w = torch.nn.Parameter(torch.zeros(3001))
    small = torch.nn.Parameter(torch.zeros(10))   # below min_numel: momentum sent dense
    comp = hvd_compress.DGC(ratio=0.05, momentum=0.5, route="compressed")
    opt = hvd_compress.DistributedOptimizer(torch.optim.SGD([w, small], lr=0.0),
                                            named_parameters=[("w", w), ("small", small)],
                                            compression=comp)
    for step in range(2):
        for p in (w, small):    # zero_grad(set_to_none=False): grads kept and zeroed in place
            if p.grad is not None:
                p.grad.zero_()
        ((w + 0) * _grad(hvd.rank(), step, "weight")).sum().backward()
        (small * torch.ones(10)).sum().backward()
        opt.synchronize()
        before = comp.state_dict()
        torch.nn.utils.clip_grad_norm_([w, small], 1e-6)
        w.grad.mul_(0.0)
        small.grad.zero_()
        after = comp.state_dict()
    return before, after


def test_dgc_state_is_never_a_gradient():
    for before, after in run_job(_dgc_state_is_not_grad, np=2, timeout=120, env=LINK):
        p0, p1 = before["optimizers"][0]["params"], after["optimizers"][0]["params"]
        assert set(p0) == {"w", "small"} and set(p0["w"]) == {"momentum", "residual"}
        for name in p0:
            for key in p0[name]:
                assert torch.equal(p0[name][key], p1[name][key])
        assert bool(p1["small"]["momentum"].ne(0).all())           # 1 + 0.5: plain momentum


def _misuse(case: str):
    import horovod.torch as hvd
    import hvd_compress
    w = torch.nn.Parameter(torch.zeros(3001))
    if case == "adam_dgc":
        hvd_compress.DistributedOptimizer(torch.optim.Adam([w]), named_parameters=[("w", w)],
                                          compression=hvd_compress.DGC())
    if case in ("duplicate", "unnamed"):     # Horovod's own checks, before any hook
        other = torch.nn.Parameter(torch.zeros(10))
        names = [("w", w), ("w", other)] if case == "duplicate" else [("w", w)]
        hvd_compress.DistributedOptimizer(torch.optim.SGD([w, other], lr=0.1), named_parameters=names,
                                          compression=hvd_compress.TopK())
    kwargs = {"op": hvd.Adasum} if case == "adasum" else {"op": hvd.Min} if case == "min" else {}
    comp = hvd_compress.TopK(ratio=0.01 if hvd.rank() == 0 or case != "settings" else 0.02)
    opt = hvd.DistributedOptimizer(torch.optim.SGD([w], lr=0.0, momentum=0.9 if case == "momentum" else 0),
                                   named_parameters=[("w", w)],
                                   compression=hvd_compress.DGC() if case == "momentum" else comp, **kwargs)
    w.sum().backward()
    opt.synchronize()


@pytest.mark.parametrize("case,message", [
    ("settings", "ranks use different compressor settings"), ("adasum", "Adasum"),
    ("min", "op=hvd.Average and op=hvd.Sum only"), ("momentum", "DGC applies momentum itself"),
    ("adam_dgc", "cannot be combined with Adam"), ("duplicate", "must be unique"),
    ("unnamed", "were not named")])
def test_misuse_fails_clearly_on_every_rank(case, message):
    with pytest.raises(JobFailed, match=message):
        run_job(_misuse, np=2, args=(case,), timeout=60, env=LINK)


def test_bad_specs():
    import hvd_compress
    with pytest.raises(ValueError, match="unknown compressor"):
        hvd_compress.from_spec("zip")
    with pytest.raises(ValueError, match="key=value"):
        hvd_compress.from_spec("topk:0.01")
    with pytest.raises(ValueError, match="unexpected keyword"):
        hvd_compress.from_spec("qsgd:levels=3")
    with pytest.raises(ValueError, match="route must be"):
        hvd_compress.from_spec("qsgd:route='ring'")
    with pytest.raises(RuntimeError, match="must be called by horovod.torch.DistributedOptimizer"):
        hvd_compress.TopK().compress(torch.randn(5000))
    hvd_compress.DGC(ratio=0.5)                       # any ratio without warm-up
    with pytest.raises(ValueError, match="warmup_ratio"):
        hvd_compress.DGC(ratio=0.5, warmup_steps=10)


@pytest.mark.parametrize("spec", ["qsgd:min_numel=64,bucket_cap_mb=0", "qsgd:min_numel=64,route='two_phase',bucket_cap_mb=0",
                                  "terngrad:shared_scale=True,min_numel=64,bucket_cap_mb=0",
                                  "topk:ratio=0.1,min_numel=64,route='sparse_two_phase',bucket_cap_mb=0"])
@pytest.mark.parametrize("np", [2, 3])
def test_rank_dependent_graphs_neither_hang_nor_diverge(spec, np):
    results = run_job(_rank_dependent_graph, np=np, args=(spec,), timeout=120)
    for params in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], params))


@pytest.mark.parametrize("shapes", [((3000,), (3000,)), ((3000,), (2000,))])
def test_one_compressor_serves_two_optimizers(shapes):
    for d_weight, g_weight, state in run_job(_two_optimizers, np=2, args=shapes, timeout=120, env=LINK):
        assert len(state["optimizers"]) == 2
        # the discriminator's rank-mean gradient is 0.5 (ranks send 0 and 1): its state is its own
        assert torch.all(d_weight.abs() <= 0.5 * 3 + 1e-6)
        assert not torch.equal(state["optimizers"][0]["params"]["weight"]["residual"],
                               state["optimizers"][1]["params"]["weight"]["residual"])


def _map_with_rank_dependent_order():
    """A per-layer map whose two compressors see their first gradient in a different order on
    each rank (the false "different settings" of before)."""
    import horovod.torch as hvd
    import hvd_compress
    a = torch.nn.Parameter(torch.zeros(3001))
    b = torch.nn.Parameter(torch.zeros(3001))
    opt = hvd_compress.DistributedOptimizer(
        torch.optim.SGD([a, b], lr=0.0), named_parameters=[("a", a), ("b", b)],
        compression={"a": hvd_compress.TopK(ratio=0.05, route="compressed"), "b": hvd_compress.QSGD(route="compressed"),
                     "*": hvd.Compression.none})
    first, second = (a, b) if hvd.rank() == 0 else (b, a)
    (first * _grad(hvd.rank(), 0, "weight")).sum().backward()
    (second * _grad(hvd.rank(), 1, "weight")).sum().backward()
    opt.synchronize()
    return opt.compression_plan(), opt.compression_stats()


def test_per_parameter_map_in_one_engine():
    for plan, stats in run_job(_map_with_rank_dependent_order, np=2, timeout=120, env=LINK):
        assert "topk" in plan and "qsgd" in plan and stats["steps"] == 1


def _situations():
    """Horovod's own test situations in one job: an unused parameter, requires_grad toggled
    between steps, a sparse embedding (Horovod's own sparse path), bf16 parameters, and
    parameters without names."""
    import horovod.torch as hvd
    import hvd_compress

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(500, 16, sparse=True)
            self.fc = torch.nn.Linear(16, 128)
            self.unused = torch.nn.Linear(64, 64)

        def forward(self, idx):
            return self.fc(self.emb(idx)).sum()
    torch.manual_seed(0)
    model = Net()
    comp = hvd_compress.TopK(ratio=0.1, min_numel=100, route="compressed")
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(), compression=comp)
    for step in range(3):
        model.fc.weight.requires_grad_(step != 1)
        opt.zero_grad()
        model(torch.tensor([hvd.rank(), 7, step])).backward()
        opt.step()
    bf = torch.nn.Linear(64, 64).to(torch.bfloat16)
    opt_bf = hvd.DistributedOptimizer(torch.optim.SGD(bf.parameters(), lr=0.1),
                                      compression=hvd_compress.QSGD(min_numel=10, route="compressed"))
    for step in range(2):
        opt_bf.zero_grad()
        bf(torch.ones(2, 64, dtype=torch.bfloat16) * (hvd.rank() + 1)).float().sum().backward()
        opt_bf.step()
    return [p.detach().clone() for p in model.parameters()] + [p.detach().float().clone() for p in bf.parameters()]


def test_horovod_test_suite_situations():
    results = run_job(_situations, np=2, timeout=120, env=LINK)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def _process_set():
    import horovod.torch as hvd
    import hvd_compress
    subset = hvd.ProcessSet([0, 1])
    hvd.add_process_set(subset)
    w = torch.nn.Parameter(torch.zeros(3001))
    if hvd.rank() in (0, 1):
        opt = hvd.DistributedOptimizer(torch.optim.SGD([w], lr=0.0), named_parameters=[("w", w)],
                                       compression=hvd_compress.TopK(ratio=0.05, route="compressed"),
                                       process_set=subset)
        (w * _grad(hvd.rank(), 0, "weight")).sum().backward()
        opt.synchronize()
    hvd.allreduce(torch.zeros(1), name="done")   # rank 2 stays until the others are done
    return w.grad.clone() if hvd.rank() in (0, 1) else None


def test_process_set_of_two_ranks_among_three():
    results = run_job(_process_set, np=3, timeout=120, env={**LINK, "HOROVOD_DYNAMIC_PROCESS_SETS": "1"})
    assert results[2] is None and torch.equal(results[0], results[1])


def _empty_on_rank1():
    import horovod.torch as hvd
    import hvd_compress
    w = torch.nn.Parameter(torch.zeros(3001))
    # A fixed threshold no entry of rank 1's gradient reaches: rank 1 sends an empty payload.
    comp = hvd_compress.TopK(mode="threshold", threshold=1.0, route="compressed")
    opt = hvd.DistributedOptimizer(torch.optim.SGD([w], lr=0.0), named_parameters=[("w", w)],
                                   compression=comp)
    g = torch.zeros(3001)
    if hvd.rank() == 0:
        g[[5, 17]] = torch.tensor([4.0, -2.0])
    else:
        g[:] = 0.5
    (w * g).sum().backward()
    opt.synchronize()
    return w.grad.clone()


def test_empty_sparse_payload_does_not_hang():
    for grad in run_job(_empty_on_rank1, np=2, timeout=60, env=LINK):
        expected = torch.zeros(3001)
        expected[[5, 17]] = torch.tensor([2.0, -1.0])
        assert torch.equal(grad, expected)


def test_mpi_controller():
    spec = "terngrad:route='compressed'"
    results = run_job(_train, np=2, controller="mpi", args=(spec,), timeout=120, env=LINK)
    expected = _local(spec, 2)
    assert torch.equal(results[0][0][0]["weight"], expected[0][0]["weight"])
