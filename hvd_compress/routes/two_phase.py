"""Two-phase compressed allreduce (DeepSpeed's compressed allreduce, for any codec; the sparse
variant is :mod:`.sparse_two_phase`).

The bucket's flat buffer is cut into P chunks (sizes differ by at most one element):

1. each rank encodes chunk c (worker error feedback on that slice of its residual; Philox id
   ``derived_id(bucket id, 1, c)``, the rank's own seed) and an **alltoall** sends chunk c's
   payload to rank c;
2. in the flush, rank c decode-accumulates the P payloads of its chunk in rank order,
   re-encodes the sum (server error feedback on its own residual when the method uses error
   feedback; id ``derived_id(bucket id, 2, c)``, rank c's seed), and the re-encoded chunks are
   **allgathered** and decoded into place.

Each rank receives about 2 (P - 1)/P payload sizes instead of the allgather's P - 1.  Scales
(TernGrad) and norms (QSGD) are per chunk here, whatever the method's scope.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import wire
from .base import (Job, Link, Pending, Route, Speed, chunk_bounds, codec_seconds, derived_id)


@dataclass
class TwoPhasePending(Pending):
    """A two-phase bucket in flight: the chunks' bounds, and this rank's phase-2 block size."""
    bounds: list[int] = field(default_factory=list)
    own_phase2: int = 0


class TwoPhaseRoute(Route):
    name = "two_phase"
    carries = "fixed"
    phases = 1

    def start(self, job: Job) -> Pending:
        bounds = chunk_bounds(job.x.numel(), job.comm.size)
        payloads, blocks = [], []
        for c in range(job.comm.size):
            part = slice(bounds[c], bounds[c + 1])
            residual = None if job.residual is None else job.residual[part]
            chunk_id = derived_id(job.tensor_id, 1, c)
            payloads.append(job.codec_for(chunk_id).encode(job.x[part], job.key(chunk_id),
                                                           residual=residual, check_finite=False))
            blocks.append(wire.pack(payloads[-1:], job.x.device))
        splits = [b.numel() for b in blocks]
        handle = job.comm.alltoall(torch.cat(blocks), splits, f"{job.tag}.p1")
        return TwoPhasePending(job, handle, sent=sum(splits) - splits[job.comm.rank], payloads=payloads,
                               bounds=bounds)

    def advance(self, pending: TwoPhasePending) -> None:
        job, bounds = pending.job, pending.bounds
        rank, size = job.comm.rank, job.comm.size
        received, splits = pending.handle.wait()
        pending.received += received.numel() - splits[rank]
        mine = bounds[rank + 1] - bounds[rank]
        chunk_sum = torch.zeros(mine, dtype=torch.float32, device=job.x.device)
        owner_payloads = [blocks[0] for blocks in wire.unpack(received, job.codec, [[mine]] * size)]
        job.codec_for(derived_id(job.tensor_id, 1, rank)).decode_accumulate(owner_payloads, chunk_sum)
        again_id = derived_id(job.tensor_id, 2, rank)
        again = job.codec_for(again_id).encode(chunk_sum, job.key(again_id), residual=job.server(mine),
                                               check_finite=False)
        block = wire.pack([again], job.x.device)
        pending.sent += block.numel()
        pending.own_phase2 = block.numel()
        pending.handle = job.comm.allgather(block, f"{job.tag}.p2")

    def finish(self, pending: TwoPhasePending) -> torch.Tensor:
        job, bounds = pending.job, pending.bounds
        data = pending.handle.wait()
        pending.received += data.numel() - pending.own_phase2
        size = job.comm.size
        chunks = wire.unpack(data, job.codec, [[bounds[c + 1] - bounds[c]] for c in range(size)])
        out = job.out.zero_()
        for c in range(size):
            job.codec_for(derived_id(job.tensor_id, 2, c)).decode_accumulate(chunks[c], out[bounds[c]:bounds[c + 1]])
        return out

    def seconds(self, n: int, world: int, payload_bytes: float, segments: int, link: Link,
                speed: Speed) -> float:
        # P chunk encodes, P chunk decodes at the owner, one re-encode, P chunk decodes.
        return (2 * link.latency_s + 2 * (world - 1) / world * payload_bytes / link.bytes_per_s
                + codec_seconds(n * (world + 1) / world, 2, 2 * world + 3, speed))
