"""Checkpoint and resume across real ``horovodrun`` jobs: a run stopped at step k and resumed
from its checkpoint ends with weights equal, bit for bit, to a run that never stopped (2 ranks;
TernGrad, QSGD, top-k, DGC; per-rank files and the gather-to-rank-0 recipe)."""
from __future__ import annotations

import pytest
import torch

from harness import run_job

pytestmark = pytest.mark.horovod

LINK = {"HVD_COMPRESS_LINK_GBPS": "1"}
STEPS, STOP = 6, 3


def _train(spec: str, steps: range, ckpt: str | None, mode: str):
    """Train ``steps`` of a small MLP; load the checkpoint first when steps start after 0, save
    one at the end when ``ckpt`` is given and the run stops early."""
    import horovod.torch as hvd
    import hvd_compress
    from hvd_compress.horovod.checkpoint import gather_state, scatter_state
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    compression = hvd_compress.from_spec(spec)
    momentum = 0.0 if getattr(compression, "owns_momentum", False) else 0.9
    make = hvd_compress.DistributedOptimizer if mode == "wrapper" else hvd.DistributedOptimizer
    opt = make(torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum),
               named_parameters=model.named_parameters(), compression=compression)
    rank = hvd.rank()
    if steps.start:
        if mode == "gather":    # one file, written by rank 0
            saved = torch.load(f"{ckpt}/all.pt", weights_only=False) if rank == 0 else None
            # (named: broadcast_object names itself after the object's type, None on other ranks)
            model.load_state_dict(hvd.broadcast_object(saved and saved["model"], 0, name="model"))
            opt.load_state_dict(hvd.broadcast_object(saved and saved["opt"], 0, name="opt"))
            scatter_state(compression, saved and saved["compression"])
        else:                   # a file per rank
            saved = torch.load(f"{ckpt}/rank{rank}.pt", weights_only=False)
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
            if mode != "wrapper":       # the wrapper's optimizer state holds the compressor's
                compression.load_state_dict(saved["compression"])
    for step in steps:
        gen = torch.Generator().manual_seed(100 * rank + step)
        x, y = torch.randn(16, 40, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    if ckpt and steps.stop < STEPS:
        if mode == "gather":
            states = gather_state(compression)
            if rank == 0:
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "compression": states},
                           f"{ckpt}/all.pt")
        else:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                        "compression": compression.state_dict()}, f"{ckpt}/rank{rank}.pt")
    return [p.detach().clone() for p in model.parameters()], compression.stats()


@pytest.mark.parametrize("spec,mode", [
    ("terngrad:error_feedback=True,route='compressed'", "files"), ("qsgd:route='two_phase'", "gather"),
    ("topk:ratio=0.05,route='compressed'", "files"), ("dgc:ratio=0.05,warmup_steps=4,route='compressed'", "wrapper")])
def test_resume_from_a_checkpoint_is_bit_exact(spec, mode, tmp_path):
    full = run_job(_train, np=2, args=(spec, range(STEPS), None, mode), timeout=120, env=LINK)
    first = run_job(_train, np=2, args=(spec, range(STOP), str(tmp_path), mode), timeout=120, env=LINK)
    resumed = run_job(_train, np=2, args=(spec, range(STOP, STEPS), str(tmp_path), mode), timeout=120, env=LINK)
    for rank in range(2):
        assert all(torch.equal(a, b) for a, b in zip(resumed[rank][0], full[rank][0])), rank
        assert resumed[rank][1]["bytes_sent"] < resumed[rank][1]["bytes_dense"] / 3   # compressed
    assert not all(torch.equal(a, b) for a, b in zip(first[0][0], full[0][0]))       # it moved on
