"""Run a function on N real Horovod ranks (``horovodrun`` in a subprocess) and collect each
rank's return value.

Why a subprocess rather than ``horovod.runner.run`` in-process: a hung collective must fail the
test, not CI.  The launcher runs in its own process group and is killed whole when the timeout
expires; a rank that raises makes ``horovodrun`` end the other ranks (Gloo and MPI both do), and
its traceback is reported in the test failure.
"""
from __future__ import annotations

import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any, Callable

import cloudpickle

#: how each launcher's ranks start: Horovod, or torch.distributed (gloo) under torchrun
_INIT = {
    "horovodrun": "import horovod.torch as hvd\nhvd.init()\nrank = hvd.rank()\nfinish = lambda: None",
    # At exit a DDP model still alive in a reference cycle is freed after the process group is
    # destroyed, and its gloo threads then abort the process now and then ("terminate called
    # without an active exception", with PyTorch's own allreduce_hook too): free it first, meet,
    # destroy, and leave without the interpreter's teardown once the result is written.
    "torchrun": "import gc, os, torch.distributed as dist\ndist.init_process_group('gloo')\n"
                "rank = dist.get_rank()\n"
                "finish = lambda: (gc.collect(), dist.barrier(), dist.destroy_process_group(), os._exit(0))",
}

_WORKER = textwrap.dedent("""
    import pickle, sys, traceback
    job, out = sys.argv[1], sys.argv[2]
    {init}
    try:
        with open(job, "rb") as f:
            fn, args, kwargs = pickle.load(f)
        result = fn(*args, **kwargs)
        with open(f"{{out}}/rank{{rank}}.pkl", "wb") as f:
            pickle.dump(result, f)
    except BaseException:
        with open(f"{{out}}/rank{{rank}}.err", "w") as f:
            f.write(traceback.format_exc())
        raise
    finish()
""")


#: the tests' directory: modules from here are shipped to the ranks by value
TESTS = Path(__file__).resolve().parent


class JobFailed(RuntimeError):
    """A Horovod job exited non-zero, timed out, or a rank raised."""


def horovodrun() -> str:
    exe = shutil.which("horovodrun", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        raise RuntimeError("horovodrun not found: run ci/install.sh")
    return exe


#: two "hosts" on this machine: horovodrun takes differently spelled local names for different
#: hosts (local ranks, cross ranks) and starts both without ssh; ranks talk over loopback
TWO_LOCAL_HOSTS = "127.0.0.1:{n},localhost:{n}"


def run_job(fn: Callable[..., Any], np: int = 2, *, controller: str = "gloo", timeout: float = 120,
            args: tuple = (), kwargs: dict | None = None, env: dict | None = None,
            hosts: str | None = None, launcher: str = "horovodrun") -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``np`` ranks after ``hvd.init()`` (``launcher="torchrun"``:
    after ``torch.distributed.init_process_group("gloo")``); return results by rank.
    ``hosts``: horovodrun's ``-H`` (default ``localhost:np``)."""
    if controller not in ("gloo", "mpi"):
        raise ValueError(f"controller must be 'gloo' or 'mpi', got {controller!r}")
    if launcher not in _INIT:
        raise ValueError(f"launcher must be one of {sorted(_INIT)}, got {launcher!r}")
    _ship_test_modules()
    with tempfile.TemporaryDirectory(prefix="hvdjob-") as tmp:
        job = Path(tmp, "job.pkl")
        job.write_bytes(cloudpickle.dumps((fn, args, kwargs or {})))
        worker = Path(tmp, "worker.py")
        worker.write_text(_WORKER.format(init=_INIT[launcher]))
        if launcher == "torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(np),
                   "--master_port", str(free_port_pair("127.0.0.1")), "--max_restarts", "0"]
        else:
            cmd = [horovodrun(), "-np", str(np), "-H", hosts or f"localhost:{np}", f"--{controller}"]
        run_env = dict(os.environ, **(env or {}))
        run_env.setdefault("OMP_NUM_THREADS", "1")
        if controller == "mpi":
            # Debian's OpenMPI refuses root (as in containers and CI) unless told; allow more
            # ranks than cores on small machines.
            run_env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                           OMPI_MCA_rmaps_base_oversubscribe="1")
        cmd += ([] if launcher == "torchrun" else [sys.executable]) + [str(worker), str(job), tmp]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=run_env, start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
            raise JobFailed(f"{launcher} job ({np} ranks) timed out after {timeout}s\n{log[-4000:]}")
        errors = sorted(Path(tmp).glob("rank*.err"))
        if errors:
            detail = "\n".join(f"--- {e.stem} ---\n{e.read_text()}" for e in errors)
            raise JobFailed(f"rank(s) raised:\n{detail}")
        if proc.returncode != 0:
            raise JobFailed(f"{launcher} exited {proc.returncode}\n{log[-4000:]}")
        results = []
        for rank in range(np):
            path = Path(tmp, f"rank{rank}.pkl")
            if not path.exists():
                raise JobFailed(f"rank {rank} returned nothing\n{log[-4000:]}")
            results.append(pickle.loads(path.read_bytes()))
        return results


def _ship_test_modules() -> None:
    """Test modules (the test's own, and shared ones such as jobs.py) are not importable in the
    ranks: pickle their functions by value."""
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and name != "__main__" and Path(path).resolve().is_relative_to(TESTS):
            cloudpickle.register_pickle_by_value(module)


def free_port_pair(address: str = "") -> int:
    """A port p with p and p + 1 free on ``address`` (all addresses by default): the test
    clusters' slurmctld and slurmd, away from a cluster started by hand with default ports."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((address, 0))
            port = s.getsockname()[1]
        with socket.socket() as s1, socket.socket() as s2:
            try:
                s1.bind((address, port))
                s2.bind((address, port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")
