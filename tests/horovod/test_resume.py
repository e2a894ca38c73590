"""Checkpoint and resume across real ``horovodrun`` jobs: a run stopped at step k and resumed
from its checkpoint ends with weights equal, bit for bit, to a run that never stopped (2 ranks;
TernGrad, QSGD, top-k, DGC; per-rank files and the gather-to-rank-0 recipe)."""
from __future__ import annotations

import pytest
import torch

from harness import run_job
from jobs import STEPS, STOP, _train

pytestmark = pytest.mark.horovod

LINK = {"HVD_COMPRESS_LINK_GBPS": "1"}


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
