"""Smoke test of the bandwidth-limited benchmark machinery (ci/bandwidth_bench.sh): a private
network namespace, tbf at 100 Mbit/s on its loopback, 2 Horovod ranks (Gloo) of a tiny model for
2 steps, uncompressed and top-k 1%.  Checks that results come back, that top-k moves fewer
bytes, and that the namespace is gone afterwards, also when the run has to be killed."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.horovod]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "ci" / "bandwidth_bench.sh"
TIMEOUT = 240
#: forced: the tiny model's tensors are too small for compression to pay by the default plan
TOPK = "topk:ratio=0.01,route='compressed'"


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _can_make_namespaces() -> str | None:
    """None if this machine can run the benchmark, else why not."""
    if os.geteuid() != 0:
        return "needs root (ip netns, tc)"
    for tool in ("ip", "tc", "timeout"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    name = f"hvdbw-probe-{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, timeout=10)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
    return None


def test_bandwidth_bench_smoke(tmp_path):
    reason = _can_make_namespaces()
    if reason:
        pytest.skip(reason)
    env = dict(os.environ, BW_NP="2", BW_RATES="100mbit", BW_SPECS=f"none {TOPK}",
               BW_MODEL="--model mlp --width 64 --depth 2 --in-features 64", BW_STEPS_100MBIT="2",
               BW_WARMUP_100MBIT="1", BW_MINTIME_100MBIT="0", BW_CALIBRATE="0.3", BW_TIMEOUT="120",
               BW_OUT=str(tmp_path), BW_MARKDOWN=str(tmp_path / "bandwidth.md"))
    proc = subprocess.Popen(["bash", str(SCRIPT)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    prefix = f"hvdbw-{proc.pid}-"
    try:
        log, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        # SIGTERM first so the script's trap removes its namespace, then make sure.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            log, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
        pytest.fail(f"ci/bandwidth_bench.sh did not finish in {TIMEOUT}s\n{log[-4000:]}")
    finally:
        leftover = {ns for ns in _namespaces() if ns.startswith(prefix)}
        for ns in leftover:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
    assert not leftover, f"namespace(s) left behind: {leftover}"
    assert proc.returncode == 0, log[-4000:]

    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines() if line]
    failed = [r for r in records if r["bench"] == "failed"]
    assert not failed, f"{failed}\n{log[-4000:]}"
    link = next(r for r in records if r["bench"] == "link")
    assert 50e6 < link["goodput_1_stream_bits"] < 110e6, link  # the tbf is in the path
    runs = {r["compression"]: r for r in records if r["bench"] == "bandwidth"}
    assert set(runs) == {"none", TOPK}, log[-4000:]
    for r in runs.values():
        assert r["rate"] == "100mbit" and r["workers"] == 2 and r["steps"] == 2
        assert r["step_s"] > 0 and r["compute_s"] > 0 and r["link_bytes_per_step"] > 0
    dense, topk = runs["none"], runs[TOPK]
    assert dense["bytes_sent_per_rank"] == [dense["dense_bytes"]] * 2
    assert max(topk["bytes_sent_per_rank"]) < dense["dense_bytes"] / 4
    assert topk["link_bytes_per_step"] < dense["link_bytes_per_step"]
    report = (tmp_path / "bandwidth.md").read_text()
    assert "### 2 ranks, 100mbit" in report and f"`{TOPK}`" in report
