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
