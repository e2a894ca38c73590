"""The example scripts run under horovodrun (and, with --framework ddp, under torchrun) with a
compressor and learn (short runs), and the comparison driver renders its table and plot from
their JSON."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import free_port_pair, horovodrun

pytestmark = pytest.mark.horovod
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _train(script: str, spec: str, tmp_path: Path, *args: str, ddp: bool = False) -> dict:
    out = tmp_path / f"{script}{'-ddp' if ddp else ''}.json"
    launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port_pair("127.0.0.1"))] if ddp else
              [horovodrun(), "-np", "2", "-H", "localhost:2", "--gloo", sys.executable])
    cmd = [*launch, str(EXAMPLES / script), "--compression", spec, "--no-progress", "--out", str(out), *args,
           *(["--framework", "ddp"] if ddp else [])]
    subprocess.run(cmd, check=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
                   stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def test_charlm_learns_with_qsgd(tmp_path):
    result = _train("train_charlm.py", "qsgd:bits=4", tmp_path, "--epochs", "2", "--steps-per-epoch", "15")
    assert result["workers"] == 2 and result["steps"] == 30
    uniform = math.log(103)  # nats/char of a uniform guess over the text's 103 characters
    losses = [h["test_loss"] for h in result["history"]]
    assert losses[-1] < 0.85 * uniform
    assert result["bytes_per_step"] < result["dense_bytes_per_step"] / 5


def test_the_same_script_under_torchrun_and_ddp(tmp_path):
    """--framework ddp: the char-LM learns with top-k through hvd_compress.ddp.hook, and the
    digits run is the horovodrun run's, loss for loss (the same engine under both frameworks)."""
    result = _train("train_charlm.py", "topk:ratio=0.01", tmp_path, "--epochs", "2", "--steps-per-epoch", "15",
                    ddp=True)
    assert result["framework"] == "ddp" and result["workers"] == 2 and result["steps"] == 30
    assert result["history"][-1]["test_loss"] < 0.85 * math.log(103)
    assert result["bytes_per_step"] < result["dense_bytes_per_step"] / 10
    ddp = _train("train_digits.py", "topk:ratio=0.01", tmp_path, "--epochs", "2", ddp=True)
    hvd = _train("train_digits.py", "topk:ratio=0.01", tmp_path, "--epochs", "2")
    assert [h["test_loss"] for h in ddp["history"]] == [h["test_loss"] for h in hvd["history"]]


def test_compare_table_and_plot(tmp_path):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import compare
    finally:
        sys.path.remove(str(EXAMPLES))
    results = [compare.run("digits", spec, 2, tmp_path, epochs=2, progress=False)
               for spec in ("none", "topk:ratio=0.01")]
    text = compare.table(results)
    assert "topk:ratio=0.01" in text and "1.0x" in text
    compare.plot(results, tmp_path / "digits.png")
    assert (tmp_path / "digits.png").stat().st_size > 10_000
    assert results[1]["bytes_per_step"] < results[0]["bytes_per_step"] / 10


def test_logs_get_one_progress_line_per_epoch(tmp_path):
    """Under horovodrun the output is a pipe: no per-step bar redraws, only rank 0's epoch lines
    (and the summary), whatever the number of steps."""
    out = tmp_path / "digits.json"
    cmd = [horovodrun(), "-np", "2", "-H", "localhost:2", "--gloo", sys.executable,
           str(EXAMPLES / "train_digits.py"), "--compression", "terngrad", "--epochs", "3", "--out", str(out)]
    log = subprocess.run(cmd, check=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True).stdout
    lines = [line for line in log.splitlines() if line.startswith("[")]    # what the ranks printed
    assert len(lines) <= 3 + 2, log
    assert sum("epoch" in line for line in lines) == 3 and all(line.startswith("[0]") for line in lines), log
    assert "\r" not in log and "step/s" not in log and "it/s" not in log, log
