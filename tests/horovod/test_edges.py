"""Misuse at the edges fails clearly, on every rank, at the point of misuse (real Horovod jobs):
ranks whose models or compressors differ, fp16 gradients that overflow only when written back,
ops and optimizers a method cannot serve, and checkpoints that do not fit."""
from __future__ import annotations

import pytest
import torch

from harness import JobFailed, run_job

pytestmark = pytest.mark.horovod

LINK = {"HVD_COMPRESS_LINK_GBPS": "1"}


def _model_differs(case: str, spec: str):
    """Rank 1's model differs from rank 0's (an extra parameter, another shape, another name),
    or rank 1 uses Horovod's Compression.none against rank 0's compressor."""
    import horovod.torch as hvd
    import hvd_compress
    shapes = {"fc.weight": (10, 300), "fc.bias": (10,)}
    if hvd.rank() == 1:
        if case == "extra":
            shapes["extra.weight"] = (2000,)
        elif case == "shape":
            shapes["fc.weight"] = (10, 301)
        elif case == "name":
            shapes["head.weight"] = shapes.pop("fc.weight")
    params = {n: torch.nn.Parameter(torch.ones(s)) for n, s in shapes.items()}
    compression = hvd.Compression.none if case == "none" and hvd.rank() == 1 else hvd_compress.from_spec(spec)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(params.values(), lr=0.1), named_parameters=list(params.items()),
                                   compression=compression)
    for _ in range(3):         # (a rank that finished would shut Horovod down: keep going)
        opt.zero_grad()
        sum(p.sum() for p in params.values()).backward()
        opt.step()


@pytest.mark.parametrize("case,message", [
    ("extra", r"rank 1: has parameters rank 0 has not: extra\.weight"),
    ("shape", r"rank 1: another shape: fc\.weight \[10, 301\] \(rank 0: \[10, 300\]\)"),
    ("name", r"rank 1: has parameters rank 0 has not: head\.weight; lacks rank 0's parameters: fc\.weight"),
    ("none", r"every rank must pass the same compression=")])
@pytest.mark.parametrize("spec", ["topk:ratio=0.01", "terngrad:route='dense'"])
def test_ranks_whose_models_differ_fail_clearly_without_hanging(case, message, spec):
    """Before: the header was named after the parameters' names, so ranks with different models
    never met in it and the job hung.  Every rank must raise (the compressing ones with the
    message; with Compression.none, rank 1 is plain Horovod and raises Horovod's own error)."""
    with pytest.raises(JobFailed) as failure:
        run_job(_model_differs, np=2, args=(case, spec), timeout=60,
                env={**LINK, "HVD_COMPRESS_CHECK_TIMEOUT_S": "5"})
    text = str(failure.value)
    import re
    assert re.search(message, text), text
    if case != "none":
        assert len(re.findall(message, text)) >= 2, "every rank names the difference"


def test_a_third_rank_that_agrees_is_not_named():
    """3 ranks, rank 1 with an extra parameter: every rank raises, naming rank 1 only."""
    import re
    with pytest.raises(JobFailed) as failure:
        run_job(_model_differs, np=3, args=("extra", "topk:ratio=0.01"), timeout=90, env=LINK)
    text = str(failure.value)
    assert len(re.findall(r"rank 1: has parameters rank 0 has not: extra\.weight", text)) >= 2, text
    assert "rank 2:" not in text and "[[0, 2], [1]]" in text, text


def _fp16_sum_overflow(spec: str):
    """fp16 parameters, op=Sum: every rank's gradient is finite in fp16 and so is the fp32 sum,
    but the sum written back in fp16 overflows on the entries above 65504."""
    import horovod.torch as hvd
    import hvd_compress
    w = torch.nn.Parameter(torch.zeros(2048, dtype=torch.float16))
    compression = hvd_compress.from_spec(spec)
    opt = hvd.DistributedOptimizer(torch.optim.SGD([w], lr=0.0), named_parameters=[("w", w)],
                                   compression=compression, op=hvd.Sum)
    seen = []
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        grad = (torch.rand(2048, generator=g) * 36000).half() if step == 0 else torch.ones(2048).half()
        opt.zero_grad()
        (w * grad).sum().backward()
        opt.synchronize()
        seen.append((int((~torch.isfinite(w.grad)).sum()), compression.stats()["skipped_steps"]))
        with opt.skip_synchronize():
            opt.step()
    residual = compression.state_dict()["optimizers"][0]["params"].get("w", {}).get("residual")
    return seen, None if residual is None else residual.float().abs().max().item()


@pytest.mark.parametrize("spec", ["topk:ratio=1.0,route='allgather'", "qsgd:bits=8,route='allgather',error_feedback=True"])
def test_fp16_overflow_in_the_written_gradient_rolls_the_step_back(spec):
    """Before: the fp32 sum was finite, the fp16 gradient inf on the entries past 65504,
    skipped_steps stayed 0 and the residual was committed."""
    for seen, residual in run_job(_fp16_sum_overflow, np=2, args=(spec,), timeout=60, env=LINK):
        (inf0, skipped0), (inf1, skipped1) = seen
        assert inf0 > 0 and skipped0 == 1, seen          # the overflowed step: skipped on every rank
        assert inf1 == 0 and skipped1 == 1, seen         # the next step is finite and committed
        assert residual is not None and residual < 2, residual   # only step 1's (ones) residual


def _checkpoints():
    """Each bad checkpoint is refused at load with a message, and leaves the state as it was."""
    import warnings
    import horovod.torch as hvd
    import hvd_compress

    def trained(compression, steps=2):
        w = torch.nn.Parameter(torch.zeros(3000))
        opt = hvd.DistributedOptimizer(torch.optim.SGD([w], lr=0.1), named_parameters=[("w", w)],
                                       compression=compression)
        for step in range(steps):
            opt.zero_grad()
            (w * torch.randn(3000, generator=torch.Generator().manual_seed(10 * hvd.rank() + step))).sum().backward()
            opt.step()
        return compression, opt

    topk, _ = trained(hvd_compress.TopK(ratio=0.01))
    good = topk.state_dict()
    outcome = {}

    def refused(name, target, state, **kwargs):
        before = target.state_dict()
        try:
            target.load_state_dict(state, **kwargs)
            outcome[name] = "loaded"
        except ValueError as e:
            outcome[name] = str(e)
        after = target.state_dict()
        for b, a in zip(before["optimizers"], after["optimizers"]):   # nothing half-loaded
            assert b["step"] == a["step"]
            assert all(torch.equal(b["params"][n][k], a["params"][n][k]) for n in b["params"] for k in b["params"][n])

    nan = {**good, "optimizers": [{**good["optimizers"][0], "params": {"w": {"residual": torch.full((3000,), float("nan"))}}}]}
    short = {**good, "optimizers": [{**good["optimizers"][0], "params": {"w": {"residual": torch.zeros(2999)}}}]}
    refused("nan", topk, nan)
    refused("short", topk, short)
    refused("empty", topk, {**good, "optimizers": [{}]})
    refused("partial", topk, {"format": good["format"]})
    refused("foreign", topk, {"model": 1})
    tern, _ = trained(hvd_compress.TernGrad())
    refused("topk_into_terngrad", tern, good)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tern.load_state_dict(good, strict=False)       # explicit conversion: the residual is dropped
        outcome["converted"] = [str(w.message) for w in caught]
    trained(tern, steps=1)
    outcome["terngrad_buffers"] = sorted(tern.state_dict()["optimizers"][0]["params"].get("w", {}))
    rank0 = hvd.broadcast_object(good, root_rank=0)    # rank 0's file loaded on every rank
    fresh, _ = trained(hvd_compress.TopK(ratio=0.01), steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh.load_state_dict(rank0)
        outcome["rank0_everywhere"] = [str(w.message) for w in caught]
    unbuilt = hvd_compress.TopK(ratio=0.01)     # the stock optimizer builds its engine at the first backward
    unbuilt.load_state_dict(short)
    try:
        trained(unbuilt, steps=1)
        outcome["unbuilt"] = "trained"
    except ValueError as e:
        outcome["unbuilt"] = str(e)
    hvd.allreduce(torch.zeros(1), name="test.done")     # (a rank that left would shut Horovod down)
    return outcome


def test_bad_checkpoints_are_refused_at_load_and_lose_nothing():
    """Before: NaN residuals and wrong element counts loaded (failing later in backward, or
    silently killing error feedback), a TopK state turned on TernGrad's error feedback,
    optimizers=[{}] was accepted, a partial state gave KeyError, rank 0's file on every rank
    loaded without a word."""
    for rank, out in enumerate(run_job(_checkpoints, np=2, timeout=90, env=LINK)):
        assert "non-finite" in out["nan"] and "residual" in out["nan"], out["nan"]
        assert "2999 elements, the parameter 3000" in out["short"], out["short"]
        assert "missing step, params" in out["empty"], out["empty"]
        assert "'optimizers' must be a list" in out["partial"], out["partial"]
        assert "not a hvd_compress/1 compressor state" in out["foreign"], out["foreign"]
        assert "strict=False" in out["topk_into_terngrad"] and "TopK" in out["topk_into_terngrad"]
        assert any("dropped checkpoint buffers" in m and "residual" in m for m in out["converted"])
        assert out["terngrad_buffers"] == [], "TernGrad() keeps no residual, even after loading one"
        assert "does not fit this optimizer" in out["unbuilt"] and "2999 elements" in out["unbuilt"], out["unbuilt"]
        if rank == 1:
            assert any("saved by rank 0 and is loaded on rank 1" in m for m in out["rank0_everywhere"])
        else:
            assert not any("saved by rank" in m for m in out["rank0_everywhere"])


def _default_logging(spec: str):
    """A stock script (no logging set up): what reaches stderr on this rank."""
    import io
    import sys
    import horovod.torch as hvd
    import hvd_compress
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(), compression=hvd_compress.from_spec(spec))
    captured, sys.stderr = io.StringIO(), io.StringIO()
    try:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(8, 256)).sum().backward()
            opt.step()
    finally:
        captured, sys.stderr = sys.stderr, sys.__stderr__
    return captured.getvalue()


def test_switched_off_compression_shows_in_the_log_without_calling_plan():
    """On a link where TernGrad does not pay (declared 100 Gbit/s here; measured fast links do
    the same), rank 0 warns once, with why; the other ranks stay quiet."""
    logs = run_job(_default_logging, np=2, args=("terngrad",), timeout=60, env={"HVD_COMPRESS_LINK_GBPS": "100"})
    assert logs[0].count("sends most of the gradient uncompressed") == 1, logs[0]
    assert "compression would not pay" in logs[0] and "100 Gbit/s" in logs[0]
    assert logs[1] == ""
    quiet = run_job(_default_logging, np=2, args=("terngrad",), timeout=60, env=LINK)   # 1 Gbit/s: compressed
    assert quiet == ["", ""]


def _misuse_in_backward(case: str):
    import horovod.torch as hvd
    import hvd_compress
    w = torch.nn.Parameter(torch.zeros(3001))
    kwargs = {"op": hvd.Min} if case == "min" else {}
    compression = hvd_compress.DGC() if case == "momentum" else hvd_compress.TopK()
    opt = hvd.DistributedOptimizer(torch.optim.SGD([w], lr=0.1, momentum=0.9 if case == "momentum" else 0),
                                   named_parameters=[("w", w)], compression=compression, **kwargs)
    stage = "backward"
    try:
        w.sum().backward()
        stage = "synchronize"
        opt.synchronize()
        out = "no error"
    except ValueError as e:
        out = f"{stage}: {e}"
    hvd.allreduce(torch.zeros(1), name="test.done")     # (a rank that left would shut Horovod down)
    return out


@pytest.mark.parametrize("case,message", [("min", "op=hvd.Min"), ("momentum", "DGC applies momentum itself")])
def test_misuse_known_from_the_optimizer_fails_in_the_first_backward_on_every_rank(case, message):
    """Before: the stock optimizer's misuse surfaced in synchronize() (op=3, not Min)."""
    for out in run_job(_misuse_in_backward, np=2, args=(case,), timeout=60, env=LINK):
        assert out.startswith("backward: ") and message in out, out


def test_another_horovod_release_is_named(monkeypatch):
    """The parameter lookup reads Horovod 0.28's frames: on another release the compressor says
    which release it is (a log line when the first engine is built; in the error if the lookup
    fails), instead of failing without a reason."""
    import horovod
    import hvd_compress
    from hvd_compress.horovod import lookup
    assert lookup.horovod_version_note() == ""          # the installed, tested release
    monkeypatch.setattr(horovod, "__version__", "0.29.0", raising=False)
    assert "Horovod 0.29.0 is not one hvd_compress was tested with" in lookup.horovod_version_note()
    with pytest.raises(RuntimeError, match="could not find the parameter.*Horovod 0.29.0"):
        hvd_compress.TernGrad().compress(torch.zeros(3))
