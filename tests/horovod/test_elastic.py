"""Elastic Horovod (``horovodrun --gloo`` with a host-discovery script on localhost): compressor
state in ``hvd.elastic.TorchState``; a worker joins, then one is removed, mid-training; the job
finishes without a hang and the surviving ranks agree on weights and compressor steps.  And on two
"hosts" (two local names: hierarchical routes), a host leaves and comes back."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from harness import horovodrun

pytestmark = pytest.mark.horovod

_TRAIN = textwrap.dedent('''
    import json, os, sys, time
    import torch
    import horovod.torch as hvd
    import hvd_compress
    import hvd_compress.horovod.elastic  # noqa: F401  (registers the compressor's state handler)

    hosts, out, spec, schedule = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    hvd.init()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    compression = hvd_compress.from_spec(spec)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                   named_parameters=model.named_parameters(), compression=compression)
    state = hvd.elastic.TorchState(model=model, optimizer=opt, compression=compression, step=0, sizes=[])

    def set_hosts():
        # the discovery script's answer from this step on (rank 0 stays in every world)
        if str(state.step) in schedule and hvd.rank() == 0:
            with open(hosts + ".tmp", "w") as f:
                f.write(schedule[str(state.step)])
            os.replace(hosts + ".tmp", hosts)

    @hvd.elastic.run
    def train(state):
        while state.step < 14:
            gen = torch.Generator().manual_seed(100 * hvd.rank() + state.step)
            x, y = torch.randn(16, 40, generator=gen), torch.randint(0, 10, (16,), generator=gen)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            state.sizes.append(hvd.size())
            set_hosts()
            if state.step in range(3, 12):
                time.sleep(0.4)  # give the driver time to see the new hosts
            state.step += 1
            state.commit()

    train(state)
    torch.save({"params": [p.detach() for p in model.parameters()], "sizes": state.sizes,
                "steps": [e["step"] for e in compression.state_dict()["optimizers"]],
                "stats": compression.stats(), "plan": compression.plan()}, f"{out}/final-{hvd.rank()}.pt")
''')


def _elastic(tmp_path, spec: str, hosts_at_start: str, schedule: dict[int, str], np: int, min_np: int,
             max_np: int) -> list[dict]:
    """Run the elastic job; the discovery script answers ``hosts_at_start``, then
    ``schedule[step]`` from that step on; the last world's ranks' final records."""
    import json
    hosts = tmp_path / "hosts"
    hosts.write_text(hosts_at_start)
    discover = tmp_path / "discover.sh"
    discover.write_text(f"#!/bin/sh\ncat {hosts}\n")
    discover.chmod(0o755)
    script = tmp_path / "train.py"
    script.write_text(_TRAIN)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [horovodrun(), "-np", str(np), "--min-np", str(min_np), "--max-np", str(max_np), "--gloo",
           "--network-interface", "lo", "--host-discovery-script", str(discover), sys.executable, str(script),
           str(hosts), str(out), spec, json.dumps(schedule)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HVD_COMPRESS_LINK_GBPS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"elastic job hung\n{log[-4000:]}")
    assert proc.returncode == 0, log[-4000:]
    results = [torch.load(p, weights_only=False) for p in sorted(Path(out).glob("final-*.pt"))]
    assert results, log[-4000:]
    return results


@pytest.mark.parametrize("spec", ["topk:ratio=0.05,route='compressed'", "terngrad:route='compressed'"])
def test_workers_join_and_leave_without_hang(spec, tmp_path):
    # a worker joins at step 3, and one is removed at step 8
    results = _elastic(tmp_path, spec, "localhost:2\n", {3: "localhost:3\n", 8: "localhost:2\n"}, 2, 1, 3)
    assert len(results) == 2
    sizes = results[0]["sizes"]
    assert 3 in sizes and sizes[-1] == 2 and sizes[0] == 2, sizes     # grew, then shrank
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0]["params"], r["params"]))
        assert r["steps"] == results[0]["steps"]
    assert results[0]["stats"]["bytes_sent"] < results[0]["stats"]["bytes_dense"] / 3


def test_a_host_leaves_and_comes_back_on_hierarchical_routes(tmp_path):
    """2 hosts x 2 ranks (hierarchical top-k), host "localhost" removed at step 3 (one host: flat
    routes), back at step 8: the last world plans hierarchically again and its ranks agree."""
    both = "127.0.0.1:2\nlocalhost:2\n"
    results = _elastic(tmp_path, "topk:ratio=0.05,route='compressed',hierarchy=True,min_numel=0", both,
                       {3: "127.0.0.1:2\n", 8: both}, 4, 2, 4)
    assert len(results) == 4
    sizes = results[0]["sizes"]
    assert sizes[0] == 4 and 2 in sizes and sizes[-1] == 4, sizes
    assert "2 hosts x 2 ranks" in results[0]["plan"] and "hier_" in results[0]["plan"], results[0]["plan"]
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0]["params"], r["params"]))
