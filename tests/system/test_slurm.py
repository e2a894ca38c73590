"""The Slurm batch files in examples/slurm/, submitted to a real one-node Slurm cluster that
ci/slurm_cluster.sh starts on this machine (Debian's slurm 22.05 + munge, no cgroups) and stops
afterwards: each job must train the digits CNN on 2 tasks with top-k compression.

Both launchers run the same seeded, deterministic training (one thread per rank, payloads
decoded in rank order), so the MPI (srun + PMIx) and Gloo (horovodrun) runs must agree exactly.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from harness import free_port_pair

pytestmark = [pytest.mark.slurm, pytest.mark.horovod, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "ci" / "slurm_cluster.sh"
BATCH = {"pmix": ROOT / "examples" / "slurm" / "digits_srun_pmix.sbatch",
         "horovodrun": ROOT / "examples" / "slurm" / "digits_horovodrun.sbatch",
         "ddp": ROOT / "examples" / "slurm" / "digits_ddp_srun.sbatch"}
EPOCHS = 4         # ~2 s of training; the job's time is mostly importing torch in each rank
MIN_ACCURACY = 0.8  # top-k 1% reaches 0.87 after 4 epochs here (0.83 after 3)
JOB_TIMEOUT = 150   # seconds; jobs take 15-40 s on a busy 2-core machine


@pytest.fixture(scope="module")
def cluster():
    """Environment for Slurm clients talking to a private cluster; stopped whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("needs root: slurmd starts job steps as the submitting user")
    if not shutil.which("slurmd") and not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and there is no apt-get to install Debian's")
    # Short path: PMIx and munge put Unix sockets under it (108-byte limit).
    cluster_dir = tempfile.mkdtemp(prefix="hvdc-slurm-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # not a job's
    env.update(HVDC_SLURM_DIR=cluster_dir, HVDC_SLURM_PORT=str(free_port_pair("127.0.0.1")),
               SLURM_CONF=f"{cluster_dir}/slurm.conf")
    try:
        start = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True,
                               text=True, timeout=240)
        assert start.returncode == 0, f"cluster did not start:\n{start.stdout}\n{start.stderr}"
        yield env
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def submit(cluster, tmp_path_factory):
    """submit(variant) -> metrics of that batch file's run; each variant runs once per module."""
    results = {}

    def run(variant: str) -> dict:
        if variant in results:
            return results[variant]
        tmp = tmp_path_factory.mktemp(variant)
        out, log = tmp / "digits.json", tmp / "job.log"
        env = dict(cluster, HVDC_PYTHON=sys.executable, HVDC_REPO=str(ROOT), HVDC_OUT=str(out))
        name = f"hvdc-test-{variant}"
        cmd = ["sbatch", "--wait", f"--job-name={name}", f"--output={log}", "--ntasks=2",
               "--time=4", str(BATCH[variant]), "--epochs", str(EPOCHS)]
        try:
            job = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=JOB_TIMEOUT)
        except subprocess.TimeoutExpired:
            subprocess.run(["scancel", f"--name={name}"], env=env, timeout=30)
            pytest.fail(f"{variant} job not done after {JOB_TIMEOUT}s\n{_tail(log)}")
        assert job.returncode == 0, f"sbatch exited {job.returncode}: {job.stderr}\n{_tail(log)}"
        # The batch file prints this last, under `set -e`: the job ran to its end (sbatch --wait
        # alone reports 0 for a job whose record is gone).
        assert f"metrics: {out}" in log.read_text(), _tail(log)
        results[variant] = json.loads(out.read_text())
        return results[variant]

    return run


def _tail(path: Path) -> str:
    return path.read_text()[-4000:] if path.exists() else f"(no {path})"


@pytest.mark.parametrize("variant", [pytest.param("pmix", marks=pytest.mark.mpi), "horovodrun", "ddp"])
def test_batch_file_trains_on_two_tasks(submit, variant):
    metrics = submit(variant)
    assert metrics["workers"] == 2 and metrics["framework"] == ("ddp" if variant == "ddp" else "horovod")
    assert metrics["compression"] == "topk:ratio=0.01"  # the batch files' default
    assert len(metrics["history"]) == EPOCHS
    assert metrics["final_test_acc"] > MIN_ACCURACY, metrics["history"]
    # Top-k 1% with fp16 values sends a small fraction of the dense gradient.
    assert metrics["bytes_per_step"] < 0.1 * metrics["dense_bytes_per_step"]


@pytest.mark.mpi
@pytest.mark.timeout(2 * JOB_TIMEOUT + 60)
def test_mpi_and_gloo_launches_agree(submit):
    pmix, gloo = submit("pmix"), submit("horovodrun")
    assert pmix["steps"] == gloo["steps"]
    assert [h["test_loss"] for h in pmix["history"]] == [h["test_loss"] for h in gloo["history"]]


@pytest.mark.timeout(2 * JOB_TIMEOUT + 60)
def test_ddp_and_horovod_launches_agree(submit):
    """The same script and compressor under srun + DDP and under horovodrun: the same engine,
    the same losses, bit for bit."""
    ddp, gloo = submit("ddp"), submit("horovodrun")
    assert ddp["steps"] == gloo["steps"]
    assert [h["test_loss"] for h in ddp["history"]] == [h["test_loss"] for h in gloo["history"]]
