"""PyTorch DDP with this package's compressors (``hvd_compress.ddp``): real ``torchrun`` jobs
of 2 and 3 gloo ranks, a stock DDP training loop with the two hook lines added."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from harness import JobFailed, run_job
from hvd_compress.methods import REGISTRY

pytestmark = pytest.mark.ddp

LINK = {"HVD_COMPRESS_LINK_GBPS": "1"}
#: every registered method, with the route its state needs (eSGD, LAQ, DIANA: compressed only)
EVERY = [f"{name}:route='compressed'" if name in ("esgd", "laq", "diana") else name for name in sorted(REGISTRY)]


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 96), torch.nn.ReLU(),
                               torch.nn.Linear(96, 10)).to(dtype)


def _batch(rank: int, step: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(16, 64, generator=gen).to(dtype), torch.randint(0, 10, (16,), generator=gen)


def _weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _train(specs: list[str], steps: int = 4, **ddp_kwargs):
    """Each spec in turn: a fresh model wrapped by DDP with the hook, ``steps`` SGD steps on this
    rank's batches; per spec the weights, the losses, stats() and the plan."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import hvd_compress
    import hvd_compress.ddp
    out = {}
    for spec in specs:
        model = _model()
        ddp = DDP(model, bucket_cap_mb=0.02, **ddp_kwargs)
        state = hvd_compress.ddp.State(hvd_compress.from_spec(spec), model=ddp)
        ddp.register_comm_hook(state, hvd_compress.ddp.hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        losses = []
        for step in range(steps):
            x, y = _batch(dist.get_rank(), step)
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(ddp(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        out[spec] = (_weights(model), losses, state.stats(), state.plan())
    return out


def _assert_ranks_agree(results, spec):
    for rank, result in enumerate(results[1:], 1):
        assert all(torch.equal(a, b) for a, b in zip(result[spec][0], results[0][spec][0])), (spec, rank)


@pytest.mark.parametrize("np_", [2, 3])
def test_every_compressor_trains_and_ranks_agree(np_):
    specs = EVERY
    results = run_job(_train, np=np_, args=(specs,), launcher="torchrun", timeout=240, env=LINK)
    for spec in specs:
        _assert_ranks_agree(results, spec)
        weights, losses, stats, plan = results[0][spec]
        assert all(torch.isfinite(w).all() for w in weights) and all(l == l for l in losses), spec
        assert stats["steps"] == 4 and stats["skipped_steps"] == 0, (spec, stats)
        assert "hvd_compress plan" in plan
        moved = [not torch.equal(a, b) for a, b in zip(weights, _weights(_model()))]
        assert all(moved), spec


def test_compressed_steps_are_the_simulation_bit_for_bit():
    """The hook runs the engine the simulator runs: with every bucket compressed the weights
    after 4 steps are the simulator's, bit for bit, at 2 and 3 ranks."""
    specs = ["terngrad:min_numel=0,route='compressed',error_feedback=True",
             "topk:ratio=0.05,min_numel=0,route='compressed'", "qsgd:min_numel=0,route='two_phase'"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)     # as each rank runs (torchrun's OMP_NUM_THREADS=1)
    try:
        _compare_with_simulation(specs)
    finally:
        torch.set_num_threads(threads)


def _compare_with_simulation(specs: list[str]) -> None:
    from hvd_compress import methods
    from hvd_compress.routes.base import Link
    from hvd_compress.simulate import DataParallel
    for np_ in (2, 3):
        real = run_job(_train, np=np_, args=(specs,), launcher="torchrun", timeout=240, env=LINK)
        for spec in specs:
            model = _model()
            sim = DataParallel(model, torch.optim.SGD(model.parameters(), lr=0.05), methods.from_spec(spec), np_,
                               link=Link.gbps(1))
            for step in range(4):
                sim.step(lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]),
                         [_batch(r, step) for r in range(np_)])
            assert all(torch.equal(a, b) for a, b in zip(real[0][spec][0], _weights(model))), (np_, spec)
            assert real[0][spec][2]["bytes_sent"] == sim.stats()["bytes_sent"], spec


def test_ddp_options_unused_parameters_static_graph_and_no_sync():
    """find_unused_parameters (a layer only odd ranks use), static_graph, gradient accumulation
    under no_sync(): the ranks agree and the engine counts only the synchronized steps."""
    results = run_job(_options, np=3, launcher="torchrun", timeout=240, env=LINK)
    for key in results[0]:
        for rank, result in enumerate(results[1:], 1):
            assert all(torch.equal(a, b) for a, b in zip(result[key][0], results[0][key][0])), (key, rank)
        assert results[0][key][1]["steps"] == 3 and results[0][key][1]["skipped_steps"] == 0, key


def _options():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import hvd_compress
    import hvd_compress.ddp

    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head, self.extra = _model(), torch.nn.Linear(10, 10), torch.nn.Linear(10, 10)

        def forward(self, x):
            h = self.head(self.body(x))
            return self.extra(h) if dist.get_rank() % 2 else h
    out = {}
    for key, kwargs in [("unused", {"find_unused_parameters": True}), ("static", {"static_graph": True})]:
        torch.manual_seed(0)
        model = Branchy() if key == "unused" else _model()
        ddp = DDP(model, bucket_cap_mb=0.02, **kwargs)
        state = hvd_compress.ddp.register(ddp, hvd_compress.TopK(ratio=0.05, route="compressed"))
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        for step in range(3):
            opt.zero_grad()
            x, y = _batch(dist.get_rank(), step)
            torch.nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
        out[key] = (_weights(model), state.stats())
    model = _model()                     # two micro-batches per step, the first under no_sync()
    ddp = DDP(model, bucket_cap_mb=0.02)
    state = hvd_compress.ddp.register(ddp, hvd_compress.TernGrad(route="compressed"))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    for step in range(3):
        opt.zero_grad()
        with ddp.no_sync():
            x, y = _batch(dist.get_rank(), 2 * step)
            torch.nn.functional.cross_entropy(ddp(x), y).backward()
        x, y = _batch(dist.get_rank(), 2 * step + 1)
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    out["no_sync"] = (_weights(model), state.stats())
    return out


def _amp(spec: str):
    """GradScaler with DDP: rank 1 injects an inf into one gradient at step 2."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import hvd_compress
    import hvd_compress.ddp
    model = _model()
    ddp = DDP(model, bucket_cap_mb=0.02)
    state = hvd_compress.ddp.register(ddp, hvd_compress.from_spec(spec))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    inject = {"on": False}
    model[0].weight.register_hook(lambda g: g * float("inf") if inject["on"] else g)
    scales, weights, snapshots = [], [], []
    for step in range(5):
        inject["on"] = step == 2 and dist.get_rank() == 1
        x, y = _batch(dist.get_rank(), step)
        opt.zero_grad()
        scaler.scale(torch.nn.functional.cross_entropy(ddp(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        weights.append(model[0].weight.detach().clone())
        snapshots.append(state.state_dict())
    return scales, weights, state.stats(), snapshots


@pytest.mark.parametrize("spec,np_", [("terngrad:error_feedback=True,route='compressed'", 2),
                                      ("dgc:ratio=0.05,route='compressed'", 2),
                                      ("terngrad:error_feedback=True,route='compressed'", 3)])
def test_amp_overflow_on_one_rank_skips_the_step_on_every_rank(spec, np_):
    results = run_job(_amp, np=np_, args=(spec,), launcher="torchrun", timeout=180, env=LINK)
    scales0, w0, stats0, snaps0 = results[0]
    assert scales0[2] == scales0[1] / 2 and torch.equal(w0[2], w0[1]) and not torch.equal(w0[3], w0[2])
    for scales, w, stats, snaps in results:
        assert scales == scales0 and all(torch.equal(a, b) for a, b in zip(w, w0))
        assert stats["skipped_steps"] == 1
        before, after = snaps[1]["optimizers"][0], snaps[2]["optimizers"][0]     # step 2 left no trace
        assert before["step"] == after["step"]
        for name, buffers in before["params"].items():
            assert all(torch.equal(t, after["params"][name][k]) for k, t in buffers.items())


def _same_gradient():
    """Every rank the same batch: one TernGrad step's averaged gradient of the first layer."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import hvd_compress
    import hvd_compress.ddp
    model = _model()
    ddp = DDP(model, bucket_cap_mb=0.02)
    hvd_compress.ddp.register(ddp, hvd_compress.TernGrad(route="allgather", min_numel=0))   # (two-phase re-rounds the sum)
    x, y = _batch(0, 0)
    torch.nn.functional.cross_entropy(ddp(x), y).backward()
    return model[0].weight.grad.clone()


def test_noise_is_independent_per_rank():
    """The same gradient on every rank: each rank rounds it with its own Philox stream, so the
    average of the ternary codes takes values between the levels (with one stream for all, every
    rank would send the same codes and the average would stay on {-s, 0, s})."""
    grads = run_job(_same_gradient, np=2, launcher="torchrun", timeout=120, env=LINK)
    g = grads[0]
    assert torch.equal(g, grads[1])
    s = g.abs().max()
    between = (g.abs() > 0) & ((g.abs() - s).abs() > 1e-6 * s)
    assert bool(between.any()) and torch.allclose(g.abs()[between], s / 2)


def _resume(spec: str, steps: range, ckpt: str | None):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import hvd_compress
    import hvd_compress.ddp
    model = _model()
    ddp = DDP(model, bucket_cap_mb=0.02)
    state = hvd_compress.ddp.register(ddp, hvd_compress.from_spec(spec))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    path = f"{ckpt}/rank{dist.get_rank()}.pt" if ckpt else None
    if path and steps.start > 0:
        saved = torch.load(path, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        state.load_state_dict(saved["compression"])
    for step in steps:
        x, y = _batch(dist.get_rank(), step)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    if path and steps.start == 0:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "compression": state.state_dict()}, path)
    return _weights(model)


@pytest.mark.parametrize("spec", ["terngrad:error_feedback=True,route='compressed'",
                                  "topk:ratio=0.05,route='compressed'", "powersgd:rank=2"])
def test_resume_from_a_checkpoint_is_bit_exact(spec, tmp_path):
    full = run_job(_resume, np=2, args=(spec, range(6), None), launcher="torchrun", timeout=180, env=LINK)
    run_job(_resume, np=2, args=(spec, range(3), str(tmp_path)), launcher="torchrun", timeout=180, env=LINK)
    resumed = run_job(_resume, np=2, args=(spec, range(3, 6), str(tmp_path)), launcher="torchrun", timeout=180,
                      env=LINK)
    for rank in range(2):
        assert all(torch.equal(a, b) for a, b in zip(resumed[rank], full[rank])), rank


def _mixed(case: str):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import hvd_compress
    import hvd_compress.ddp
    if case == "bf16":
        model = _model(torch.bfloat16)
        ddp = DDP(model, bucket_cap_mb=0.02)
        hvd_compress.ddp.register(ddp, hvd_compress.TernGrad(route="compressed"))
        x, y = _batch(dist.get_rank(), 0, torch.bfloat16)
        torch.nn.functional.cross_entropy(ddp(x).float(), y).backward()
        return [p.grad.clone() for p in model.parameters()]
    model = _model()
    ddp = DDP(model, bucket_cap_mb=0.02)
    spec = "topk:ratio=0.01" if case == "settings" and dist.get_rank() == 1 else "topk:ratio=0.02"
    hvd_compress.ddp.register(ddp, hvd_compress.from_spec(spec + ",route='compressed'"))
    x, y = _batch(dist.get_rank(), 0)
    torch.nn.functional.cross_entropy(ddp(x), y).backward()
    return None


def test_bf16_gradients_and_the_configuration_check():
    grads = run_job(_mixed, np=2, args=("bf16",), launcher="torchrun", timeout=120, env=LINK)
    assert all(g.dtype == torch.bfloat16 and torch.equal(g, h) for g, h in zip(grads[0], grads[1]))
    with pytest.raises(JobFailed, match="differ|different") as failure:
        run_job(_mixed, np=2, args=("settings",), launcher="torchrun", timeout=120, env=LINK)
    assert "ratio" in str(failure.value)


def test_misuse_gets_clear_errors_and_importing_ddp_leaves_horovod_alone():
    import hvd_compress
    import hvd_compress.ddp
    with pytest.raises(TypeError, match="Horovod compressor, which DDP cannot run"):
        hvd_compress.ddp.State({"*": object.__new__(type("Foreign", (), {"compress": 0, "decompress": 0}))})
    with pytest.raises(TypeError, match="not an hvd_compress compressor"):
        hvd_compress.ddp.State("topk")
    code = "import sys, hvd_compress.ddp, hvd_compress; hvd_compress.TopK(); print('horovod' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def _shared_state():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import hvd_compress
    import hvd_compress.ddp
    state = hvd_compress.ddp.State(hvd_compress.TernGrad(route="compressed"))
    first, second = DDP(_model(), bucket_cap_mb=0.02), DDP(_model(), bucket_cap_mb=0.02)
    for ddp in (first, second):
        ddp.register_comm_hook(state, hvd_compress.ddp.hook)
    x, y = _batch(dist.get_rank(), 0)
    torch.nn.functional.cross_entropy(first(x), y).backward()
    try:
        torch.nn.functional.cross_entropy(second(x), y).backward()
    except Exception as e:  # noqa: BLE001 - the message is the result
        return str(e)
    return "no error"


def test_one_state_for_two_models_is_a_clear_error():
    messages = run_job(_shared_state, np=2, launcher="torchrun", timeout=120, env=LINK)
    assert all("one State serves one DDP model" in m for m in messages), messages
