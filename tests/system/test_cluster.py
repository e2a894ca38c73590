"""A two-host cluster on this machine (ci/cluster.sh: network namespaces behind a switch, 1 Gbit/s
links, an sshd per host, a two-node Slurm), used the way a real cluster is: stock `horovodrun -H`
(Gloo), `mpirun -H` (Open MPI over ssh) and `sbatch -N 2` of the batch files in examples/slurm/.

One `up` for the module (about 5 s once openssh-server and Slurm are installed), torn down
whatever happens; test_down_removes_everything runs last and checks that nothing is left.  Needs
root and `ip netns`; skipped otherwise, and when a cluster is already up (the test would take it
down).  Every job is a real multi-process Horovod run: ~2 minutes in all on 2 cores.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from harness import free_port_pair
from jobs import _simulate

pytestmark = [pytest.mark.cluster, pytest.mark.horovod, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "ci" / "cluster.sh"
STATE = Path(os.environ.get("HVDC_CLUSTER_DIR", "/tmp/hvdc-cluster"))
BIN = Path(sys.executable).parent           # the venv's: horovodrun and python with Horovod
BATCH = {"pmix": ROOT / "examples" / "slurm" / "digits_srun_pmix.sbatch",
         "horovodrun": ROOT / "examples" / "slurm" / "digits_horovodrun.sbatch",
         "ddp": ROOT / "examples" / "slurm" / "digits_ddp_srun.sbatch"}
PAYLOAD_MB = 8
JOB_TIMEOUT = 150          # seconds for one launch; jobs take 5-35 s on a busy 2-core machine
EPOCHS = 6                 # 4 ranks see a quarter of the data each per epoch: 66 steps
MIN_ACCURACY = 0.8         # top-k 1% on 4 ranks: 0.81 after 4 epochs here

# What every rank reports: who it is for Horovod, where it runs, an allreduce of rank + 1; then
# optionally an allreduce of PAYLOAD_MB, and two TernGrad steps through hvd_compress.
JOB = r'''
import json, os, socket
import torch
import horovod.torch as hvd

hvd.init()
out = {"rank": hvd.rank(), "size": hvd.size(), "local_rank": hvd.local_rank(),
       "local_size": hvd.local_size(), "cross_rank": hvd.cross_rank(),
       "cross_size": hvd.cross_size(), "netns": os.readlink("/proc/self/ns/net"),
       "hostname": socket.gethostname()}
out["sum"] = hvd.allreduce(torch.full((4,), float(hvd.rank() + 1)), op=hvd.Sum).tolist()
mb = float(os.environ.get("JOB_PAYLOAD_MB", "0"))
if mb:
    ones = torch.ones(int(mb * 2**20) // 4)
    out["payload_ok"] = bool((hvd.allreduce(ones, op=hvd.Sum) == hvd.size()).all())
if os.environ.get("JOB_TERNGRAD"):
    import hvd_compress
    torch.manual_seed(1234 + hvd.rank())        # different data (and initial weights) per rank
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(),
                                   compression=hvd_compress.TernGrad())
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.randn(32, 16)),
                                          torch.randint(0, 2, (32,))).backward()
        opt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    every = hvd.allgather(flat.unsqueeze(0))
    out["param_spread"] = float((every - every[0]).abs().max())
    out["param_moved"] = float((flat - start).abs().max())
if os.environ.get("JOB_HIER_SPEC"):                 # the hierarchical tests' training (tests/jobs.py)
    import jobs
    params, stats, plan, _ = jobs._hier_job(os.environ["JOB_HIER_SPEC"])
    torch.save({"params": params, "stats": stats, "plan": plan},
               f"{os.environ['JOB_HIER_OUT']}/rank{hvd.rank()}.pt")
print("RESULT " + json.dumps(out), flush=True)
'''

# Bytes from one host to another over TCP, timed at the receiver: `recv ADDR PORT` prints
# Gbit/s, `send ADDR PORT MB`.
PIPE = r'''
import socket, sys, time
mode, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "recv":
    srv = socket.create_server((addr, port))
    print("listening", flush=True)
    conn, _ = srv.accept()
    n, t0 = 0, None
    while True:
        b = conn.recv(1 << 20)
        if not b:
            break
        t0 = t0 or time.perf_counter()
        n += len(b)
    print(n * 8 / (time.perf_counter() - t0) / 1e9, flush=True)
else:
    conn = socket.create_connection((addr, port))
    block = b"x" * (1 << 20)
    for _ in range(int(sys.argv[4])):
        conn.sendall(block)
    conn.close()
'''


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # not a job's
    env["PATH"] = f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def run(cmd, timeout: float, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run cmd in its own session; on timeout its whole process group is killed (horovodrun and
    mpirun leave ssh sessions behind otherwise)."""
    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env or _env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd[0]} not done after {timeout}s:\n{out[-3000:]}\n{err[-3000:]}")
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check:
        assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{out[-3000:]}\n{err[-3000:]}"
    return result


def cluster_sh(*args, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return run(["bash", SCRIPT, *args], timeout=timeout, **kw)


def _namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _ssh_config() -> Path:
    import pwd
    return Path(pwd.getpwuid(0).pw_dir) / ".ssh" / "config"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The lines `up` printed (HOSTS, IFACE, SLURM_CONF) plus the job script; down afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces, tc and sshd")
    if not shutil.which("ip") or subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                timeout=10).returncode != 0:
        pytest.skip("needs `ip netns` (iproute2 and network namespaces)")
    if not shutil.which("apt-get") and not (shutil.which("sshd") and shutil.which("slurmd")):
        pytest.skip("needs openssh-server and Slurm, or apt-get to install Debian's")
    if any(re.fullmatch(r"hvdc-(n\d+|sw)", ns) for ns in _namespaces()) or STATE.exists():
        pytest.skip("a cluster is up already (bash ci/cluster.sh status); the test would take it down")
    if not (BIN / "horovodrun").exists():
        pytest.skip(f"no horovodrun next to {sys.executable} (bash ci/install.sh)")
    job = tmp_path_factory.mktemp("cluster") / "job.py"   # under /tmp: every host sees it
    job.write_text(JOB)
    (job.parent / "pipe.py").write_text(PIPE)
    try:
        up = cluster_sh("up", "--nodes", 2, "--slots", 2, "--inter", "1gbit", "--slurm",
                        timeout=300, env=_env(HVDC_CLUSTER_SLURM_PORT=str(free_port_pair())))
        lines = up.stdout.strip().splitlines()
        info = dict(line.split("=", 1) for line in lines if "=" in line)
        info.update(job=str(job), pipe=str(job.parent / "pipe.py"), up_stdout=up.stdout,
                    tmp=job.parent)
        yield info
    finally:
        cluster_sh("down", timeout=120, check=False)


def bytes_between_hosts() -> int:
    return int(cluster_sh("bytes", timeout=30).stdout.strip())


def payload_across_hosts(launch) -> tuple[list[dict], int]:
    """The ranks' reports of ``launch()`` (a job with JOB_PAYLOAD_MB), checked as 2 x 2 with the
    payload summed right, and the bytes that crossed between hosts meanwhile."""
    before = bytes_between_hosts()
    out = launch()
    moved = bytes_between_hosts() - before
    ranks = results(out)
    check_two_by_two(ranks, out)
    assert all(r["payload_ok"] for r in ranks)
    return ranks, moved


def ns_name_of(netns_link: str) -> str:
    """'net:[4026532242]' -> the name of the namespace with that inode ('hvdc-n0')."""
    ino = int(re.fullmatch(r"net:\[(\d+)\]", netns_link).group(1))
    for ns in _namespaces():
        if os.stat(f"/run/netns/{ns}").st_ino == ino:
            return ns
    return netns_link


def results(output: str) -> list[dict]:
    found = [json.loads(m) for m in re.findall(r"RESULT (\{.*\})", output)]
    return sorted(found, key=lambda r: r["rank"])


def check_two_by_two(ranks: list[dict], output: str) -> None:
    """4 ranks, 2 on each host: 0-1 on hvdc-n0, 2-3 on hvdc-n1, in those hosts' namespaces."""
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3], output[-3000:]
    for r in ranks:
        host = r["rank"] // 2
        assert (r["size"], r["local_size"], r["cross_size"]) == (4, 2, 2), r
        assert (r["local_rank"], r["cross_rank"]) == (r["rank"] % 2, host), r
        assert ns_name_of(r["netns"]) == f"hvdc-n{host}", r
        assert r["hostname"] == f"hvdc-n{host}", r
        assert r["sum"] == [10.0] * 4, r          # 1 + 2 + 3 + 4


def horovodrun(cluster, np: int, hosts: str, **job_env) -> str:
    cmd = [BIN / "horovodrun", "--gloo", "-np", np, "-H", hosts,
           "--network-interface", cluster["IFACE"], sys.executable, cluster["job"]]
    return run(cmd, timeout=JOB_TIMEOUT, env=_env(**job_env)).stdout


# ---- 1. the cluster is up ----------------------------------------------------------------------

def test_up_prints_hosts_and_iface(cluster):
    lines = cluster["up_stdout"].strip().splitlines()
    assert lines[-2].startswith("HOSTS=") and lines[-1] == "IFACE=hvdc0", cluster["up_stdout"]
    hosts = cluster["HOSTS"].split(",")
    assert len(hosts) == 2 and all(h.endswith(":2") for h in hosts), hosts
    assert hosts[0].startswith("10.77.0.1:") or "HVDC_CLUSTER_NET" in os.environ
    assert {"hvdc-n0", "hvdc-n1", "hvdc-sw"} <= set(_namespaces())
    for i, host in enumerate(hosts):
        addr = host.split(":")[0]
        out = run(["ssh", addr, "hostname; ip netns identify"], timeout=30).stdout.split()
        assert out == [f"hvdc-n{i}", f"hvdc-n{i}"], out
    # Each host resolves every host's name (its own /etc/hosts).
    addr1 = hosts[1].split(":")[0]
    out = run(["ssh", addr1, "getent hosts hvdc-n0"], timeout=30).stdout.split()
    assert out[:2] == [hosts[0].split(":")[0], "hvdc-n0"], out


def test_links_limited_between_hosts_not_within(cluster):
    """64 MB through a 1 Gbit/s link arrive at about 1 Gbit/s; within a host (lo) faster."""
    addr = [h.split(":")[0] for h in cluster["HOSTS"].split(",")]

    def rate(dst: int, src: int, port: int) -> float:
        cmd = ["bash", SCRIPT, "exec", dst, sys.executable, cluster["pipe"], "recv", addr[dst], port]
        recv = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, text=True)
        try:
            assert recv.stdout.readline().strip() == "listening"
            run(["bash", SCRIPT, "exec", src, sys.executable, cluster["pipe"], "send", addr[dst],
                 port, 64], timeout=60)
            out, _ = recv.communicate(timeout=30)
        finally:
            recv.kill()
        return float(out.strip())

    before = bytes_between_hosts()
    inter = rate(1, 0, 5201)
    sent = bytes_between_hosts() - before
    intra = rate(0, 0, 5202)
    print(f"host0 -> host1: {inter:.3f} Gbit/s; within host0: {intra:.3f} Gbit/s")
    assert 0.5 < inter < 1.02, inter             # TCP goodput at a 1 Gbit/s line rate: ~0.95
    assert intra > 1.2, intra                     # lo: not limited (4+ Gbit/s idle, Python)
    assert 64 * 2**20 <= sent < 72 * 2**20, sent  # the payload, headers, ACKs


# ---- 2-3. horovodrun across hosts; bytes ---------------------------------------------------------

def test_horovodrun_two_hosts_and_bytes(cluster):
    _, moved = payload_across_hosts(lambda: horovodrun(cluster, 4, cluster["HOSTS"], JOB_PAYLOAD_MB=str(PAYLOAD_MB)))
    # Gloo's ring allreduce puts 2 (P - 1) / P of the payload on each of the 2 links that cross
    # between the hosts: 3 x 8 MB here, plus ssh and rendezvous traffic (~0.2 MB).
    print(f"{PAYLOAD_MB} MB allreduce over 2 hosts x 2 ranks: {moved} bytes between hosts")
    assert moved >= PAYLOAD_MB * 2**20, moved
    assert moved < 8 * PAYLOAD_MB * 2**20, moved


def test_horovodrun_one_host_sends_nothing_between_hosts(cluster):
    host0 = cluster["HOSTS"].split(",")[0]
    before = bytes_between_hosts()
    out = horovodrun(cluster, 2, host0, JOB_PAYLOAD_MB=str(PAYLOAD_MB))
    moved = bytes_between_hosts() - before
    ranks = results(out)
    assert [(r["rank"], r["local_rank"], r["local_size"], r["cross_size"]) for r in ranks] == \
        [(0, 0, 2, 1), (1, 1, 2, 1)], out[-3000:]
    assert {ns_name_of(r["netns"]) for r in ranks} == {"hvdc-n0"}
    assert all(r["payload_ok"] and r["sum"] == [3.0] * 4 for r in ranks)
    # Only the launcher's ssh sessions and the rendezvous: ~50 kB, nothing of the payload.
    print(f"{PAYLOAD_MB} MB allreduce within one host: {moved} bytes between hosts")
    assert moved < 2**20, moved


@pytest.mark.parametrize("hierarchy", [True, False])
def test_two_host_job_is_bit_identical_to_its_simulation(cluster, tmp_path, hierarchy):
    """TernGrad across the two hosts (tc-limited link, ssh-launched ranks), hierarchical and flat,
    gives the weights of the simulator's 2 x 2 world, bit for bit, on every rank."""
    import torch
    spec = f"terngrad:min_numel=0,route='compressed',hierarchy={hierarchy}"
    horovodrun(cluster, 4, cluster["HOSTS"], JOB_HIER_SPEC=spec, JOB_HIER_OUT=str(tmp_path),
               PYTHONPATH=str(ROOT / "tests"), HVD_COMPRESS_LINK_GBPS="1")
    real = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(4)]
    assert "2 hosts x 2 ranks" in real[0]["plan"] and ("hier_" in real[0]["plan"]) == hierarchy, real[0]["plan"]
    torch.set_num_threads(1)
    sim = _simulate(spec, 4, 2)
    for r in real:
        assert all(torch.equal(a, b.detach()) for a, b in zip(r["params"], sim.model.parameters()))
    assert real[0]["stats"]["bytes_sent"] == sim.stats()["bytes_sent"]


def test_terngrad_through_distributed_optimizer(cluster):
    out = horovodrun(cluster, 4, cluster["HOSTS"], JOB_TERNGRAD="1")
    ranks = results(out)
    check_two_by_two(ranks, out)
    assert all(r["param_moved"] > 0 for r in ranks), ranks
    assert all(r["param_spread"] == 0.0 for r in ranks), ranks   # every rank has the same model


# ---- 4. mpirun -------------------------------------------------------------------------------------

def test_mpirun_two_hosts(cluster):
    if not shutil.which("mpirun"):
        pytest.skip("no mpirun (Open MPI)")
    build = run([BIN / "horovodrun", "--check-build"], timeout=60).stdout
    if not re.search(r"\[X\] MPI", build):
        pytest.skip("Horovod here is built without MPI")
    iface = cluster["IFACE"]
    _, moved = payload_across_hosts(lambda: run(
        ["mpirun", "--allow-run-as-root", "-np", 4, "-H", cluster["HOSTS"],
         "--mca", "btl_tcp_if_include", iface, "--mca", "oob_tcp_if_include", iface,
         "-x", "OMP_NUM_THREADS", "-x", "JOB_PAYLOAD_MB", sys.executable, cluster["job"]],
        timeout=JOB_TIMEOUT, env=_env(JOB_PAYLOAD_MB=str(PAYLOAD_MB))).stdout)
    print(f"mpirun: {PAYLOAD_MB} MB allreduce over 2 hosts x 2 ranks: {moved} bytes between hosts")
    assert moved >= PAYLOAD_MB * 2**20, moved


# ---- 5. two-node Slurm -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def submit(cluster):
    """submit(variant) -> metrics of `sbatch -N 2 --ntasks-per-node=2` of that batch file."""
    if "SLURM_CONF" not in cluster:
        pytest.skip("the cluster came up without Slurm")
    done = {}

    def run_batch(variant: str) -> dict:
        if variant in done:
            return done[variant]
        out, log = cluster["tmp"] / f"{variant}.json", cluster["tmp"] / f"{variant}.log"
        env = _env(SLURM_CONF=cluster["SLURM_CONF"], HVDC_PYTHON=sys.executable,
                   HVDC_REPO=str(ROOT), HVDC_OUT=str(out),
                   GLOO_SOCKET_IFNAME=cluster["IFACE"])   # (DDP's gloo: the hosts' interface)
        name = f"hvdc-cluster-test-{variant}"
        cmd = ["sbatch", "--wait", f"--job-name={name}", f"--output={log}", "-N", 2,
               "--ntasks-per-node=2", "--time=4", BATCH[variant], "--epochs", EPOCHS]
        try:
            job = run(cmd, timeout=JOB_TIMEOUT, env=env, check=False)
        finally:
            subprocess.run(["scancel", f"--name={name}"], env=env, timeout=30)
        text = log.read_text() if log.exists() else f"(no {log})"
        assert job.returncode == 0, f"sbatch exited {job.returncode}: {job.stderr}\n{text[-4000:]}"
        assert f"metrics: {out}" in text, text[-4000:]   # the batch file ran to its end
        done[variant] = json.loads(out.read_text())
        return done[variant]

    return run_batch


@pytest.mark.slurm
@pytest.mark.parametrize("variant", ["horovodrun", "ddp", pytest.param("pmix", marks=pytest.mark.mpi)])
def test_batch_file_trains_on_two_nodes(cluster, submit, variant):
    if variant == "pmix":
        mpis = run(["srun", "--mpi=list"], timeout=30,
                   env=_env(SLURM_CONF=cluster["SLURM_CONF"]), check=False)
        if "pmix" not in mpis.stdout + mpis.stderr:
            pytest.skip("this Slurm has no mpi/pmix plugin")
    metrics = submit(variant)
    assert metrics["workers"] == 4                   # 2 nodes x 2 tasks
    assert metrics["framework"] == ("ddp" if variant == "ddp" else "horovod")
    assert metrics["compression"] == "topk:ratio=0.01"
    assert len(metrics["history"]) == EPOCHS
    assert metrics["final_test_acc"] > MIN_ACCURACY, metrics["history"]
    assert metrics["bytes_per_step"] < 0.1 * metrics["dense_bytes_per_step"]


# ---- 6. down ---------------------------------------------------------------------------------

def test_down_removes_everything(cluster):
    """Runs last (it takes the module's cluster down); a second down succeeds."""
    pids = []
    for f in [STATE / "pids", STATE / "slurm" / "pids"]:
        if f.exists():
            pids += [int(line.split()[-1]) for line in f.read_text().split("\n") if line.strip()]
    assert len(pids) >= 2 + 2, pids                  # 2 sshd; munged, slurmctld, 2 slurmd
    in_ns = [int(p) for ns in ("hvdc-n0", "hvdc-n1")
             for p in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                                     timeout=10).stdout.split()]
    cluster_sh("down", timeout=120)
    assert not [ns for ns in _namespaces() if re.fullmatch(r"hvdc-(n\d+|sw)", ns)]
    assert not list(Path("/etc/netns").glob("hvdc-*")) if Path("/etc/netns").is_dir() else True
    cfg = _ssh_config()
    assert not cfg.exists() or ">>> hvdc-cluster" not in cfg.read_text()
    assert not STATE.exists()
    assert subprocess.run(["ip", "link", "show", cluster["IFACE"]], capture_output=True,
                          timeout=10).returncode != 0
    alive = [p for p in pids + in_ns if Path(f"/proc/{p}").exists()]
    assert not alive, [Path(f"/proc/{p}/cmdline").read_text() for p in alive]
    cluster_sh("down", timeout=60)
