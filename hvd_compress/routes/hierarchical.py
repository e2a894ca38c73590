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
3. **intra-node allgather**, exact: of the decoded shards (4 bytes per element); or, when the
   inner route is the allgather, of the H payloads each rank gathered for its shard (H
   payloads' bytes instead of fp32: 16x less for TernGrad at two hosts), which every rank then
   decodes in host order -- the same operations in the same order as the shard's owner would
   do, so the same bits, at the cost of decoding H payloads of the whole bucket.

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

from dataclasses import dataclass, replace
from typing import Any

import torch

from . import wire
from .base import FP32, Job, Link, Pending, Route, Segment, Speed, chunk_bounds, derived_id, segment_codec

_SHARD_PHASE = 3


@dataclass
class HierarchicalPending(Pending):
    """A hierarchical bucket in flight: its groups, shard bounds, the inner route's step, the
    stage reached (advance calls so far) and the decoded shard."""
    host: Any = None
    peers: Any = None
    bounds: list[int] | None = None
    inner: Pending | None = None
    stage: int = 0
    shard: torch.Tensor | None = None


class HierarchicalRoute(Route):
    """The hierarchical form of the flat route ``inner`` (see the module docstring)."""

    def __init__(self, inner: Route) -> None:
        self.inner = inner
        self.name = f"hier_{inner.name}"
        self.carries = inner.carries
        # the flush's rounds: the host sum and the inner start; the inner route's own phases;
        # the inner finish and the start of the intra-host allgather (waited in finish())
        self.phases = inner.phases + 2
        #: the host gathers the inner payloads (decoded by every rank), not decoded shards
        self.gathers_payloads = inner.name == "allgather"

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
        pending.stage += 1
        if pending.stage == 1:
            self._exchange(pending)
        elif pending.stage < self.phases:
            self.inner.advance(pending.inner)
        else:
            inner, host = pending.inner, pending.host
            if self.gathers_payloads:      # this shard's H payloads, as the inner allgather brought them
                pending.shard = inner.handle.wait()
                inner.received = pending.shard.numel() - inner.sent
                width = 1
            else:
                pending.shard = self.inner.finish(inner)
                width = FP32
            pending.sent += inner.sent + (host.size - 1) * pending.shard.numel() * width
            pending.received += inner.received
            pending.handle = host.allgather(pending.shard, f"{pending.job.tag}.ag")

    def _exchange(self, pending: HierarchicalPending) -> None:
        """Wait the reduce-scatter, add the host's pieces, start the inner route among peers."""
        job, host = pending.job, pending.host
        j = host.rank
        received, splits = pending.handle.wait()
        pending.received += received.numel() * FP32 - splits[j] * FP32
        shard_sum = received[:splits[0]]     # (the collective's own output: summed in place)
        pos = splits[0]
        for n in splits[1:]:                 # the host's sum, in local-index order
            shard_sum.add_(received[pos:pos + n])
            pos += n
        lo, hi = pending.bounds[j], pending.bounds[j + 1]
        shard_id = derived_id(job.tensor_id, _SHARD_PHASE, j)
        peers = pending.peers
        inner = Job(shard_sum, shard_id, job.codec, [Segment(0, hi - lo, shard_id)],
                    None if job.residual is None else job.residual[lo:hi], peers, f"{job.tag}.x",
                    job.step, lambda r: job.seed_of(peers.group[r]), job.server, state=job.state, fresh=job.fresh,
                    members=[], shared_seed=job.shared_seed, out=job.out[lo:hi])
        pending.inner = self.inner.start(inner)

    def finish(self, pending: HierarchicalPending) -> torch.Tensor:
        gathered = pending.handle.wait()
        width = 1 if self.gathers_payloads else FP32
        pending.received += (gathered.numel() - pending.shard.numel()) * width
        if not self.gathers_payloads:
            return gathered
        job, bounds, hosts = pending.job, pending.bounds, pending.peers.size
        numels = [bounds[c + 1] - bounds[c] for c in range(pending.host.size)]
        blocks = wire.unpack(gathered, job.codec, [[n] for n in numels for _ in range(hosts)])
        out = job.out.zero_()
        flat = replace(job, members=[])
        for c, n in enumerate(numels):
            shard_id = derived_id(job.tensor_id, _SHARD_PHASE, c)
            codec = segment_codec(flat, Segment(0, n, shard_id))
            codec.decode_accumulate([b[0] for b in blocks[c * hosts:(c + 1) * hosts]], out[bounds[c]:bounds[c + 1]])
        return out

    def seconds(self, n: int, world: int, payload_bytes: float, segments: int, link: Link,
                speed: Speed) -> float:
        raise TypeError("a hierarchical route's time depends on the topology: use network_seconds()")

    def network_seconds(self, n: int, hosts: int, local: int, payload_bytes: float, inter: Link,
                        intra: Link, speed: Speed) -> float:
        """Reduce-scatter inside the host (intra link, per rank), the host sum of the shard, the
        inner route among ``hosts`` on a shard of n / L elements whose payload is
        ``payload_bytes`` / L, each rank with 1/L of the host's inter-node link, and the allgather
        inside the host: of decoded shards, or of the payloads plus their decoding (the other
        L - 1 shards' H payloads)."""
        shard = n / local
        scatter_s = intra.latency_s + (local - 1) / local * FP32 * n / intra.bytes_per_s
        per_rank = Link(inter.latency_s, inter.bytes_per_s / local)
        inner_s = self.inner.seconds(int(shard), hosts, payload_bytes / local, 1, per_rank, speed)
        if self.gathers_payloads:
            gather_s = (intra.latency_s + (local - 1) * hosts * payload_bytes / local / intra.bytes_per_s
                        + (local - 1) * hosts * shard / speed.decode)
        else:
            gather_s = scatter_s
        return scatter_s + inner_s + gather_s + local * shard / speed.decode   # (+ the host sum)
