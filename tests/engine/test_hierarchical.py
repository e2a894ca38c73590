"""Topology and the hierarchical routes: hosts from the ranks' placements, group collectives as
world alltoalls, exact intra-host phases around a compressed inter-host exchange, the plan's two
links, and real two-host ``horovodrun`` jobs (two local names for this machine: horovodrun gives
them different local and cross ranks) bit-identical to the simulator's ``local_size=2`` world."""
from __future__ import annotations

import pytest
import torch

from hvd_compress import methods
from harness import TWO_LOCAL_HOSTS, run_job
from jobs import STEPS, STOP, _amp, _hier_job, _rank_dependent_graph, _simulate, _train, _two_optimizers
from hvd_compress.engine.buckets import Member, assign_buckets
from hvd_compress.engine.local import LocalWorld
from hvd_compress.engine.plan import crossing_bytes, plan_bucket
from hvd_compress.engine.topology import GroupComm, Placement, Topology
from hvd_compress.routes.base import Link, Speed

LINK = {"HVD_COMPRESS_LINK_GBPS": "1"}
TWO_BY_TWO = Topology(((0, 1), (2, 3)))


def test_topology_from_placements():
    host_major = [Placement(r // 2, r % 2, 2) for r in range(4)]
    assert Topology.of(host_major) == TWO_BY_TWO and TWO_BY_TWO.hierarchical
    assert TWO_BY_TWO.peer_group(3) == (1, 3) and TWO_BY_TWO.host_group(2) == (2, 3)
    cyclic = [Placement(r % 2, r // 2, 2) for r in range(4)]          # ranks dealt round-robin
    assert Topology.of(cyclic).hosts == ((0, 2), (1, 3))
    uneven = [Placement(0, 0, 3), Placement(0, 1, 3), Placement(0, 2, 3), Placement(1, 0, 1)]
    topo = Topology.of(uneven)
    assert topo.hosts == ((0, 1, 2), (3,)) and not topo.hierarchical and topo.describe() == "2 hosts of 1/3 ranks"
    assert not Topology.of([Placement(0, 0, 4)] * 4).hierarchical     # contradictory: flat
    assert Topology.of([Placement(0, r, 4) for r in range(4)]).describe() == "1 host x 4 ranks"


@pytest.mark.parametrize("hosts", [((0, 1), (2, 3)), ((1, 3), (0, 2))])   # the second: peers out of rank order
def test_group_collectives_are_world_alltoalls(hosts):
    topo = Topology(hosts)

    def body(comm):
        host = GroupComm(comm, topo.host_group(comm.rank))
        peers = GroupComm(comm, topo.peer_group(comm.rank))
        mine = torch.tensor([float(comm.rank), 10.0 + comm.rank])
        gathered = peers.allgather(mine, "ag").wait()
        summed = host.allreduce(mine, "ar").wait()
        biggest = peers.allreduce(mine, "mx", op="max").wait()
        parts, sizes = host.alltoall(torch.arange(3.0) + 100 * comm.rank, [1, 2], "a2a").wait()
        return gathered, summed, biggest, parts, sizes
    for rank, (gathered, summed, biggest, parts, sizes) in enumerate(LocalWorld(4).run(body)):
        group = topo.peer_group(rank)
        assert gathered.tolist() == [v for r in group for v in (float(r), 10.0 + r)]
        host = topo.host_group(rank)
        assert summed.tolist() == [float(sum(host)), 20.0 + sum(host)]
        assert biggest.tolist() == [float(max(group)), 10.0 + max(group)]
        index = host.index(rank)
        want = [torch.arange(3.0)[[0] if index == 0 else [1, 2]] + 100 * r for r in host]
        assert parts.tolist() == torch.cat(want).tolist() and sizes == [len(w) for w in want]


def _bucket(method, numel=40_000):
    members = [Member(0, "w", torch.Size([numel]), torch.float32, method)]
    return assign_buckets(members, 25 << 20)[0]


def test_plan_picks_hierarchy_where_it_pays_and_says_why_not():
    slow, fast = Link.gbps(1), Link.gbps(100, 5)
    bucket = _bucket(methods.TernGrad(route="compressed"))
    plan = plan_bucket(bucket, 4, slow, Speed(), 0, topology=TWO_BY_TWO, intra=fast)
    assert plan.route.name.startswith("hier_") and plan.workers == 2
    flat = plan_bucket(_bucket(methods.TernGrad(route="compressed", hierarchy=False)), 4, slow, Speed(), 0,
                       topology=TWO_BY_TWO, intra=fast)
    assert not flat.route.name.startswith("hier_") and flat.workers == 4
    assert plan.crossing_bytes <= 0.55 * flat.crossing_bytes
    one_host = Topology(((0, 1, 2, 3),))
    forced = plan_bucket(_bucket(methods.TernGrad(route="compressed", hierarchy=True)), 4, slow, Speed(), 0,
                         topology=one_host, intra=fast)
    assert not forced.route.name.startswith("hier_") and "no hierarchy on 1 host x 4 ranks" in forced.why
    dgc = plan_bucket(_bucket(methods.DGC(route="compressed", hierarchy=True)), 4, slow, Speed(), 0,
                      topology=TWO_BY_TWO, intra=fast)
    assert "not hierarchical" in dgc.why
    assert crossing_bytes(flat.route, flat.payload_bytes, bucket.numel, one_host) == 0


def test_hierarchical_sum_is_the_exact_sum_for_a_lossless_codec():
    """Top-k keeping every entry in fp32 is lossless: the hierarchical route must deliver the
    world's sum (up to fp32 summation order)."""
    def body(comm):
        from hvd_compress.engine.engine import Engine
        method = methods.TopK(ratio=1.0, value_dtype=torch.float32, route="compressed", hierarchy=True,
                                   min_numel=0)
        engine = Engine([Member(0, "w", torch.Size([1001]), torch.float32, method)], lambda: comm,
                        average=False, cap_bytes=25 << 20, link=Link.gbps(1), name="t")
        outs = []
        for step in range(2):       # step 0 learns the topology, step 1 is hierarchical
            g = torch.randn(1001, generator=torch.Generator().manual_seed(10 * comm.rank + step))
            engine.add(0, g)
            outs.append((engine.result(0).clone(), engine.plan.buckets[0].route.name))
        return outs
    results = LocalWorld(4, local_size=2).run(body)
    for step in range(2):
        want = sum(torch.randn(1001, generator=torch.Generator().manual_seed(10 * r + step)) for r in range(4))
        for outs in results:
            got, route = outs[step]
            assert route == ("hier_allgather" if step else "allgather")
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_error_feedback_keeps_everything_across_a_change_of_topology():
    """A rank's residual outside its shard is sent once, exactly: after a flat step (step 0) the
    hierarchical steps lose nothing: sum of what was delivered + what the residuals hold = sum of
    the inputs, on every step."""
    def body(comm):
        from hvd_compress.engine.engine import Engine
        method = methods.TopK(ratio=0.05, value_dtype=torch.float32, route="compressed", min_numel=0)
        engine = Engine([Member(0, "w", torch.Size([4000]), torch.float32, method)], lambda: comm,
                        average=False, cap_bytes=25 << 20, link=Link.gbps(1), name="t")
        delivered, inputs = torch.zeros(4000), torch.zeros(4000)
        for step in range(4):
            g = torch.randn(4000, generator=torch.Generator().manual_seed(10 * comm.rank + step))
            engine.add(0, g.clone())
            delivered += engine.result(0)
            inputs += g
        engine.finalize()
        residual = engine.states[0].buffers["residual"].committed
        return delivered, inputs, residual, engine.plan.buckets[0].route.name
    results = LocalWorld(4, local_size=2).run(body)
    assert {r[3] for r in results} == {"hier_allgather"}
    total_inputs = sum(r[1] for r in results)
    held = sum(r[2] for r in results)
    torch.testing.assert_close(results[0][0] + held, total_inputs, rtol=1e-4, atol=1e-4)


@pytest.mark.horovod
@pytest.mark.parametrize("spec", ["terngrad:min_numel=0,route='compressed'",
                                  "topk:ratio=0.05,min_numel=0,route='compressed',hierarchy=True",
                                  "qsgd:min_numel=0,route='compressed',hierarchy=True,error_feedback=True"])
def test_two_host_job_is_bit_identical_to_its_simulation(spec):
    real = run_job(_hier_job, np=4, args=(spec,), timeout=180, env=LINK, hosts=TWO_LOCAL_HOSTS.format(n=2))
    assert [r[3] for r in real] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert "2 hosts x 2 ranks" in real[0][2] and "hier_" in real[0][2]
    torch.set_num_threads(1)
    sim = _simulate(spec, 4, 2)
    for rank in range(4):
        assert all(torch.equal(a, b) for a, b in zip(real[rank][0], real[0][0])), rank
    assert all(torch.equal(a, b.detach()) for a, b in zip(real[0][0], sim.model.parameters()))
    assert real[0][1]["bytes_sent"] == sim.stats()["bytes_sent"]


@pytest.mark.horovod
def test_amp_overflow_on_one_host_skips_the_step_on_every_rank():
    """GradScaler's contract on the hierarchical route: an inf on rank 1 (host 0) at step 2 makes
    all four ranks back off and skip, and leaves no trace in the state."""
    spec = "terngrad:error_feedback=True,route='compressed',hierarchy=True"
    results = run_job(_amp, np=4, args=(spec, False), timeout=180, env=LINK, hosts=TWO_LOCAL_HOSTS.format(n=2))
    scales0, w0, stats0 = results[0]
    assert scales0[2] == scales0[1] / 2 and torch.equal(w0[2], w0[1]) and not torch.equal(w0[3], w0[2])
    for scales, w, stats in results:
        assert scales == scales0 and all(torch.equal(a, b) for a, b in zip(w, w0))
        assert stats["skipped_steps"] == 1


@pytest.mark.horovod
def test_resume_on_two_hosts_is_bit_exact(tmp_path):
    spec = "topk:ratio=0.05,route='compressed',hierarchy=True,min_numel=0"
    hosts = TWO_LOCAL_HOSTS.format(n=2)
    full = run_job(_train, np=4, args=(spec, range(STEPS), None, "files"), timeout=180, env=LINK, hosts=hosts)
    run_job(_train, np=4, args=(spec, range(STOP), str(tmp_path), "files"), timeout=180, env=LINK, hosts=hosts)
    resumed = run_job(_train, np=4, args=(spec, range(STOP, STEPS), str(tmp_path), "files"), timeout=180,
                      env=LINK, hosts=hosts)
    for rank in range(4):
        assert all(torch.equal(a, b) for a, b in zip(resumed[rank][0], full[rank][0])), rank


@pytest.mark.horovod
def test_rank_dependent_graphs_and_a_shared_compressor_on_two_hosts():
    """Horovod's own situations on the hierarchical routes (2 x 2): losses that reach different
    layers on odd ranks (their gradients come in synchronize(), hooks in another order), and one
    compressor serving a GAN's two optimizers; every rank ends with the same weights."""
    hosts = TWO_LOCAL_HOSTS.format(n=2)
    spec = "topk:ratio=0.1,min_numel=64,route='compressed',hierarchy=True,bucket_cap_mb=0"
    results = run_job(_rank_dependent_graph, np=4, args=(spec,), timeout=180, env=LINK, hosts=hosts)
    for params in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], params))
    shared = run_job(_two_optimizers, np=4, args=((3000,), (2000,)), timeout=180, env=LINK, hosts=hosts)
    for d_weight, g_weight, state in shared:
        assert len(state["optimizers"]) == 2
        assert torch.equal(d_weight, shared[0][0]) and torch.equal(g_weight, shared[0][1])
