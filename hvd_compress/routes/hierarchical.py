"""Hierarchical routes: exact inside a host, compressed between hosts (the shape of ZeRO++'s
qgZ, Zhang et al. 2023, and CGX, Markov et al. 2022, for any codec and any flat route).

With H hosts of L ranks each, a bucket of n elements is cut into L shards (sizes differing by
at most one); the rank at local index j owns shard j:

1. **intra-node reduce-scatter**, exact: every rank sends shard c of its bucket to the rank
   at local index c of its host (one alltoall; the host's ranks only); rank j adds the L
   pieces of shard j in local-index order, giving its host's sum ``S_h[j]`` in fp32;
2. **inter-node exchange of the compressed node sums**: rank j runs an ordinary flat route
   (allgather, two-phase, allreduce: the *inner* route, chosen by the cost model) on ``S_h[j]``
   with its H peers -- the ranks at local index j on the other hosts.  Error feedback is per
   rank and shard (the rank's residual over its shard), keys are per rank and shard
   (``derived_id(bucket id, 3, j)``), and the codec is the method's codec for H workers (one
   quantization per host: TernGrad's clip for H, QSGD's variance summed over H terms, not
   H x L);
3. **intra-node allgather** of the decoded shards, exact.

Per host and step, the inter-node link carries L shards of n/L elements exchanged among H
hosts: the bytes of one rank's flat exchange among H ranks, ``L`` times fewer than every rank
sending its own payload across, and every host's L ranks drive the link at once.

Error feedback residuals stay laid out like the bucket (saved per parameter); a rank uses its
shard's part of it, and sends the rest exactly once (folded into its input of phase 1) when it
holds any, as after a change from a flat route or of topology: nothing the residual held is
lost.  All collectives are the whole world's alltoalls with splits zero outside the group
(:class:`~hvd_compress.engine.topology.GroupComm`): no process sets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .base import FP32, Job, Link, Pending, Route, Segment, Speed, chunk_bounds, derived_id

_SHARD_PHASE = 3


@dataclass
class HierarchicalPending(Pending):
    """A hierarchical bucket in flight: its groups, shard bounds and the inner route's step."""
    host: Any = None
    peers: Any = None
    bounds: list[int] | None = None
    inner: Pending | None = None


class HierarchicalRoute(Route):
    """The hierarchical form of the flat route ``inner`` (see the module docstring)."""

    def __init__(self, inner: Route) -> None:
        self.inner = inner
        self.name = f"hier_{inner.name}"
        self.carries = inner.carries

    def start(self, job: Job) -> HierarchicalPending:
        from ..engine.topology import GroupComm
        host = GroupComm(job.comm, job.topology.host_group(job.comm.rank))
        peers = GroupComm(job.comm, job.topology.peer_group(job.comm.rank))
        bounds = chunk_bounds(job.x.numel(), host.size)
        mine = slice(bounds[host.rank], bounds[host.rank + 1])
        x = job.x
        if job.residual is not None:
            # what the residual holds outside this rank's shard goes into the node sum once,
            # exactly; the shard's part is the codec's error feedback in phase 2
            for outside in (slice(0, mine.start), slice(mine.stop, x.numel())):
                x[outside].add_(job.residual[outside])
                job.residual[outside].zero_()
        splits = [bounds[c + 1] - bounds[c] for c in range(host.size)]
        handle = host.alltoall(x, splits, f"{job.tag}.rs")
        own = splits[host.rank] * FP32
        return HierarchicalPending(job, handle, sent=FP32 * x.numel() - own, host=host, peers=peers,
                                   bounds=bounds)

    def advance(self, pending: HierarchicalPending) -> None:
        job, host = pending.job, pending.host
        j = host.rank
        received, splits = pending.handle.wait()
        pending.received += received.numel() * FP32 - splits[j] * FP32
        shard_sum = received[:splits[0]].clone()
        pos = splits[0]
        for n in splits[1:]:                 # the host's sum, in local-index order
            shard_sum.add_(received[pos:pos + n])
            pos += n
        lo, hi = pending.bounds[j], pending.bounds[j + 1]
        shard_id = derived_id(job.tensor_id, _SHARD_PHASE, j)
        peers = pending.peers
        inner = Job(shard_sum, shard_id, job.codec, [Segment(0, hi - lo, shard_id)],
                    None if job.residual is None else job.residual[lo:hi], peers, f"{job.tag}.x",
                    job.step, lambda r: job.seed_of(peers.group[r]), job.server, state=job.state,
                    members=[], shared_seed=job.shared_seed, out=job.out[lo:hi])
        pending.inner = self.inner.start(inner)
        self.inner.advance(pending.inner)

    def finish(self, pending: HierarchicalPending) -> torch.Tensor:
        inner = pending.inner
        shard = self.inner.finish(inner)
        pending.sent += inner.sent
        pending.received += inner.received
        host = pending.host
        gathered = host.allgather(shard, f"{pending.job.tag}.ag").wait()
        pending.sent += (host.size - 1) * shard.numel() * FP32
        pending.received += gathered.numel() * FP32 - shard.numel() * FP32
        return gathered

    def seconds(self, n: int, world: int, payload_bytes: float, segments: int, link: Link,
                speed: Speed) -> float:
        raise TypeError("a hierarchical route's time depends on the topology: use network_seconds()")

    def network_seconds(self, n: int, hosts: int, local: int, payload_bytes: float, inter: Link,
                        intra: Link, speed: Speed) -> float:
        """Reduce-scatter and allgather inside the host (intra link, per rank), the host sum of
        the shard, and the inner route among ``hosts`` on a shard of n / L elements whose
        payload is ``payload_bytes`` / L, each rank with 1/L of the host's inter-node link."""
        shard = n / local
        intra_s = 2 * (intra.latency_s + (local - 1) / local * FP32 * n / intra.bytes_per_s)
        per_rank = Link(inter.latency_s, inter.bytes_per_s / local)
        inner_s = self.inner.seconds(int(shard), hosts, payload_bytes / local, 1, per_rank, speed)
        return intra_s + inner_s + local * shard / speed.decode   # the host sum: L adds of a shard
