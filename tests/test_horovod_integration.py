"""hvd_compress compressors inside the stock ``hvd.DistributedOptimizer`` of Horovod 0.28.1, on
real multi-process jobs: the aggregated gradient equals a single-process simulation of the same
N workers bit for bit, Horovod's op/predivide/groups/backward-passes semantics hold, bytes are
accounted from payloads, and misuse fails with a clear error instead of a hang."""
from __future__ import annotations

import zlib

import pytest
import torch

from harness import JobFailed, run_job

pytestmark = pytest.mark.horovod

SPECS = ["topk:ratio=0.05", "topk:ratio=0.05,mode='exact'", "terngrad", "terngrad:clip=None",
         "qsgd:bits=4", "qsgd:bits=8,bucket_size=128", "fp16"]
NUMEL = 3000  # above the default min_numel, not a multiple of 4 or of the bucket


def _rank_grad(rank: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(NUMEL, generator=g) * (1 + rank)


def _train_steps(spec: str, steps: int = 2, op: str = "Average", predivide: float = 1.0,
                 passes: int = 1, groups=None):
    """Each rank sets a known gradient on a linear 'model' and runs the optimizer's
    synchronize(); returns the aggregated gradients and the compressor's stats."""
    import horovod.torch as hvd
    import hvd_compress
    weight = torch.nn.Parameter(torch.zeros(NUMEL))
    bias = torch.nn.Parameter(torch.zeros(10))  # below min_numel: goes uncompressed
    compression = hvd_compress.from_spec(spec)
    opt = hvd.DistributedOptimizer(torch.optim.SGD([weight, bias], lr=0.0),
                                   named_parameters=[("weight", weight), ("bias", bias)],
                                   compression=compression, op=getattr(hvd, op),
                                   gradient_predivide_factor=predivide,
                                   backward_passes_per_step=passes, groups=groups)
    out = []
    for step in range(steps):
        opt.zero_grad()
        for _ in range(passes):
            # A backward whose gradient is exactly _rank_grad / passes per pass.
            loss = (weight * _rank_grad(hvd.rank(), step) / passes).sum() + bias.sum() * (hvd.rank() + 1)
            loss.backward()
        opt.synchronize()
        out.append((weight.grad.clone(), bias.grad.clone()))
        with opt.skip_synchronize():
            opt.step()
    return out, compression.stats()


def _simulate(spec: str, size: int, steps: int = 2, op: str = "Average") -> list[torch.Tensor]:
    """The same N workers in one process: encode each rank's gradient with its own residual and
    key, decode-accumulate in rank order, scale as Horovod's op would."""
    import hvd_compress
    from hvd_compress.codecs import RandomKey
    workers = [hvd_compress.from_spec(spec) for _ in range(size)]
    tensor_id = zlib.crc32(b"weight")
    residuals = [torch.zeros(NUMEL) if w.error_feedback else None for w in workers]
    expected = []
    for step in range(steps):
        payloads = [w.codec.encode(_rank_grad(rank, step), RandomKey(w.seed, step, tensor_id),
                                   residual=residuals[rank], name="weight")
                    for rank, w in enumerate(workers)]
        if getattr(workers[0].codec, "summable", False):
            (name,) = payloads[0].parts
            total = payloads[0].parts[name].clone()
            for p in payloads[1:]:
                total += p.parts[name]
            dense = total.float()
        else:
            dense = workers[0].codec.decode_accumulate(payloads, torch.zeros(NUMEL))
        expected.append(dense / size if op == "Average" else dense)
    return expected


@pytest.mark.parametrize("spec", SPECS)
def test_matches_single_process_simulation_bit_for_bit(spec):
    results = run_job(_train_steps, np=2, args=(spec,), timeout=120)
    expected = _simulate(spec, size=2)
    for rank, (steps, _) in enumerate(results):
        for step, (weight_grad, bias_grad) in enumerate(steps):
            if getattr(__import__("hvd_compress").from_spec(spec).codec, "summable", False):
                # fp16 sums happen inside Horovod's allreduce (its own order and precision).
                torch.testing.assert_close(weight_grad, expected[step], rtol=2e-3, atol=2e-3)
            else:
                assert torch.equal(weight_grad, expected[step]), (rank, step)
            assert torch.equal(bias_grad, torch.full((10,), 1.5))  # mean of 1 and 2
    # every rank holds the same aggregated gradient
    assert all(torch.equal(a[0], b[0]) for a, b in zip(results[0][0], results[1][0]))


def test_three_ranks_and_sum_with_predivide():
    spec = "topk:ratio=0.05"
    results = run_job(_train_steps, np=3, args=(spec,), kwargs={"op": "Sum"}, timeout=120)
    expected = _simulate(spec, size=3, op="Sum")
    for steps, _ in results:
        for step, (weight_grad, bias_grad) in enumerate(steps):
            assert torch.equal(weight_grad, expected[step])
            assert torch.equal(bias_grad, torch.full((10,), 6.0))
    averaged = run_job(_train_steps, np=3, args=(spec,), kwargs={"predivide": 4.0}, timeout=120)
    expected = _simulate(spec, size=3)
    for steps, _ in averaged:
        torch.testing.assert_close(steps[0][0], expected[0], rtol=1e-6, atol=1e-7)


def test_backward_passes_and_groups():
    spec = "topk:ratio=0.05"
    results = run_job(_train_steps, np=2, args=(spec,), kwargs={"passes": 2, "groups": 1}, timeout=120)
    expected = _simulate(spec, size=2)
    for steps, _ in results:
        # two passes of g/2 accumulate to g up to rounding of the two halves
        torch.testing.assert_close(steps[0][0], expected[0], rtol=1e-5, atol=1e-6)


def test_mpi_controller():
    pytest.importorskip("horovod")
    results = run_job(_train_steps, np=2, controller="mpi", args=("terngrad",), timeout=120)
    expected = _simulate("terngrad", size=2)
    assert torch.equal(results[0][0][0][0], expected[0])


@pytest.mark.parametrize("spec", ["topk:ratio=0.05", "terngrad", "qsgd:bits=4"])
def test_stats_match_payload_format(spec):
    results = run_job(_train_steps, np=2, args=(spec,), timeout=120)
    import hvd_compress
    from hvd_compress.codecs import RandomKey
    codec = hvd_compress.from_spec(spec).codec
    for rank, (_, stats) in enumerate(results):
        dense = 2 * (NUMEL + 10) * 4
        assert stats["bytes_dense"] == dense
        if spec.startswith("topk"):
            # variable count: at least 0.8k and at most 1.3k entries of 6 bytes, per step
            k = 0.05 * NUMEL
            assert 2 * 0.8 * k * 6 <= stats["bytes_sent"] - 2 * 40 <= 2 * 1.3 * k * 6
        else:
            payload = codec.encode(torch.randn(NUMEL), RandomKey())
            assert stats["bytes_sent"] == 2 * (payload.nbytes + 40)
        assert stats["bytes_received"] > 0


def _empty_on_rank1():
    import horovod.torch as hvd
    import hvd_compress
    w = torch.nn.Parameter(torch.zeros(NUMEL))
    # A fixed threshold no entry of rank 1's gradient reaches: rank 1 sends an empty payload.
    comp = hvd_compress.TopK(mode="threshold", threshold=1.0)
    opt = hvd.DistributedOptimizer(torch.optim.SGD([w], lr=0.0), named_parameters=[("w", w)],
                                   compression=comp)
    g = torch.zeros(NUMEL)
    if hvd.rank() == 0:
        g[[5, 17]] = torch.tensor([4.0, -2.0])
    else:
        g[:] = 0.5
    (w * g).sum().backward()
    opt.synchronize()
    return w.grad.clone()


def test_empty_sparse_payload_does_not_hang():
    for grad in run_job(_empty_on_rank1, np=2, timeout=60):
        expected = torch.zeros(NUMEL)
        expected[[5, 17]] = torch.tensor([2.0, -1.0])
        assert torch.equal(grad, expected)


def _different_settings():
    import horovod.torch as hvd
    import hvd_compress
    w = torch.nn.Parameter(torch.zeros(NUMEL))
    comp = hvd_compress.TopK(ratio=0.01 if hvd.rank() == 0 else 0.02)
    opt = hvd.DistributedOptimizer(torch.optim.SGD([w], lr=0.0), named_parameters=[("w", w)],
                                   compression=comp)
    w.sum().backward()
    opt.synchronize()


def test_different_settings_fail_clearly():
    with pytest.raises(JobFailed, match="ranks use different compressor settings"):
        run_job(_different_settings, np=2, timeout=60)


def test_bad_specs_and_misuse():
    import hvd_compress
    with pytest.raises(ValueError, match="unknown compressor"):
        hvd_compress.from_spec("zip")
    with pytest.raises(ValueError, match="key=value"):
        hvd_compress.from_spec("topk:0.01")
    with pytest.raises(ValueError, match="unexpected keyword"):
        hvd_compress.from_spec("qsgd:levels=3")
    with pytest.raises(RuntimeError, match="must be called by horovod.torch.DistributedOptimizer"):
        hvd_compress.TopK().compress(torch.randn(5000))


def _adasum():
    import horovod.torch as hvd
    import hvd_compress
    w = torch.nn.Parameter(torch.zeros(NUMEL))
    opt = hvd.DistributedOptimizer(torch.optim.SGD([w], lr=0.0), named_parameters=[("w", w)],
                                   compression=hvd_compress.TopK(), op=hvd.Adasum)
    w.sum().backward()
    opt.synchronize()


def test_adasum_is_rejected():
    with pytest.raises(JobFailed, match="Adasum"):
        run_job(_adasum, np=2, timeout=60)


def _dgc_steps(optimizer_momentum: float):
    import horovod.torch as hvd
    import hvd_compress
    w = torch.nn.Parameter(torch.zeros(NUMEL))
    comp = hvd_compress.DGC(ratio=0.01, momentum=0.5)
    opt = hvd.DistributedOptimizer(torch.optim.SGD([w], lr=0.0, momentum=optimizer_momentum),
                                   named_parameters=[("w", w)], compression=comp)
    grads, momenta = [], []
    for step in range(3):
        opt.zero_grad()
        (w * _rank_grad(hvd.rank(), step)).sum().backward()
        opt.synchronize()
        grads.append(w.grad.clone())
        momenta.append(comp._state["w"].momentum.clone())
        with opt.skip_synchronize():
            opt.step()
    return grads, momenta, comp._state["w"].residual.clone()


def test_dgc_momentum_correction_and_masking():
    results = run_job(_dgc_steps, np=2, args=(0.0,), timeout=120)
    for rank, (grads, momenta, residual) in enumerate(results):
        # u_t = 0.5 u_{t-1} + g_t, zeroed where sent; what was sent is nonzero in the aggregate
        u = torch.zeros(NUMEL)
        for step in range(3):
            u = 0.5 * u + _rank_grad(rank, step)
            sent = momenta[step] == 0
            assert 0.8 * 30 <= int(sent.sum()) <= 1.3 * 30 + 1  # k = 1% of 3000
            u[sent] = 0
            torch.testing.assert_close(momenta[step], u)
        assert torch.equal(results[0][0][-1], results[1][0][-1])


def test_dgc_refuses_optimizer_momentum():
    with pytest.raises(JobFailed, match="DGC applies momentum itself"):
        run_job(_dgc_steps, np=2, args=(0.9,), timeout=60)


def test_dgc_warmup_schedule():
    import hvd_compress
    dgc = hvd_compress.DGC(ratio=0.001, warmup_steps=100)
    densities = [dgc.density(t) for t in (0, 25, 50, 75, 99, 100, 10_000)]
    assert densities[0] == 0.25 and densities[-2] == densities[-1] == 0.001
    # four stages (0, 25, 50, 75 of 100 steps), strictly decreasing, geometric
    assert all(a > b for a, b in zip(densities[:4], densities[1:4])) and densities[4] == densities[3]
    torch.testing.assert_close(torch.tensor(densities[1] / densities[0]),
                               torch.tensor((0.001 / 0.25) ** 0.25))


def _per_parameter_map():
    import horovod.torch as hvd
    import hvd_compress
    weight = torch.nn.Parameter(torch.zeros(NUMEL))
    other = torch.nn.Parameter(torch.zeros(NUMEL))
    bias = torch.nn.Parameter(torch.zeros(NUMEL))  # large, but mapped to no compression
    sparse = hvd_compress.from_spec("topk:ratio=0.05")
    opt = hvd_compress.DistributedOptimizer(
        torch.optim.SGD([weight, other, bias], lr=0.0),
        named_parameters=[("weight", weight), ("layer.other", other), ("layer.bias", bias)],
        compression={"*.bias": hvd.Compression.none, "weight": sparse})
    g = _rank_grad(hvd.rank(), 0)
    ((weight + other + bias) * g).sum().backward()
    opt.synchronize()
    return weight.grad.clone(), other.grad.clone(), bias.grad.clone(), opt.compression_stats()


def test_wrapper_per_parameter_map_agrees_with_stock_path():
    results = run_job(_per_parameter_map, np=2, timeout=120)
    expected = _simulate("topk:ratio=0.05", size=2, steps=1)[0]
    mean = (_rank_grad(0, 0) + _rank_grad(1, 0)) / 2
    for weight_grad, other_grad, bias_grad, stats in results:
        assert torch.equal(weight_grad, expected)            # same bits as the stock path
        torch.testing.assert_close(other_grad, mean)          # unmatched: uncompressed
        torch.testing.assert_close(bias_grad, mean)           # mapped to none
        assert stats["bytes_dense"] == NUMEL * 4              # only 'weight' went through hvd_compress


def _two_phase_steps(spec: str, steps: int = 2):
    import horovod.torch as hvd
    import hvd_compress
    from hvd_compress.methods import _METHODS
    name, _, _ = spec.partition(":")
    comp = hvd_compress.from_spec(spec)
    comp.collective = "two_phase"
    w = torch.nn.Parameter(torch.zeros(NUMEL))
    opt = hvd.DistributedOptimizer(torch.optim.SGD([w], lr=0.0), named_parameters=[("weight", w)],
                                   compression=comp)
    out = []
    for step in range(steps):
        opt.zero_grad()
        (w * _rank_grad(hvd.rank(), step)).sum().backward()
        opt.synchronize()
        out.append(w.grad.clone())
    return out, comp.stats()


def _simulate_two_phase(spec: str, size: int, steps: int = 2) -> list[torch.Tensor]:
    import hvd_compress
    from hvd_compress.codecs import RandomKey
    from hvd_compress.comm.two_phase import chunk_bounds, derived_id
    codec = hvd_compress.from_spec(spec).codec
    error_feedback = hvd_compress.from_spec(spec).error_feedback
    tid = zlib.crc32(b"weight")
    bounds = chunk_bounds(NUMEL, size)
    chunk = [slice(bounds[c], bounds[c + 1]) for c in range(size)]
    worker_r = [torch.zeros(NUMEL) if error_feedback else None for _ in range(size)]
    server_r = [torch.zeros(bounds[c + 1] - bounds[c]) for c in range(size)]
    expected = []
    for step in range(steps):
        sent = [[codec.encode(_rank_grad(rank, step)[chunk[c]], RandomKey(0, step, derived_id(tid, 1, c)),
                              residual=None if worker_r[rank] is None else worker_r[rank][chunk[c]])
                 for c in range(size)] for rank in range(size)]
        out = torch.zeros(NUMEL)
        for c in range(size):
            total = codec.decode_accumulate([sent[rank][c] for rank in range(size)],
                                            torch.zeros(bounds[c + 1] - bounds[c]))
            again = codec.encode(total, RandomKey(0, step, derived_id(tid, 2, c)), residual=server_r[c])
            codec.decode_accumulate([again], out[chunk[c]])
        expected.append(out / size)
    return expected


@pytest.mark.parametrize("spec", ["terngrad", "qsgd:bits=4", "qsgd:bits=2,error_feedback=True"])
def test_two_phase_matches_simulation(spec):
    results = run_job(_two_phase_steps, np=3, args=(spec,), timeout=120)
    expected = _simulate_two_phase(spec, size=3)
    for grads, stats in results:
        for step, grad in enumerate(grads):
            assert torch.equal(grad, expected[step]), step
        assert 0 < stats["bytes_sent"] < stats["bytes_dense"] / 4


def test_cost_model_prefers_two_phase_for_large_worlds():
    from hvd_compress.comm import cost
    n = 10_000_000
    payload = n // 4
    assert cost.choose("auto", 2, n, payload) == cost.ALLGATHER
    assert cost.choose("auto", 8, n, payload) == cost.TWO_PHASE
    assert cost.choose("auto", 8, 2000, 500) == cost.ALLGATHER      # latency-bound
    assert cost.choose("auto", 8, n, None) == cost.ALLGATHER        # sparsifier
    assert cost.choose("two_phase", 2, n, payload) == cost.TWO_PHASE
    with pytest.raises(ValueError):
        cost.choose("ring", 2, n, payload)
