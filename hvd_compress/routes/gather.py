"""Allgather route: every rank's packed payload to every rank in one variable-size allgather
(sizes in-band, :mod:`.wire`), then each segment decode-accumulated over ranks in rank order.
Any codec; the only route for sparse payloads on small worlds.  Per rank and step it receives
(P - 1) payloads: it stops paying as P grows (see the two-phase routes)."""
from __future__ import annotations

import torch

from . import wire
from .base import Job, Link, Pending, Route, Speed, codec_seconds, decode_segments, encode_segments


class GatherRoute(Route):
    name = "allgather"

    def start(self, job: Job) -> Pending:
        payloads = encode_segments(job)
        block = wire.pack(payloads, job.x.device)
        return Pending(job, job.comm.allgather(block, f"{job.tag}.ag"), sent=block.numel(),
                       payloads=payloads)

    def finish(self, pending: Pending) -> torch.Tensor:
        job = pending.job
        data = pending.handle.wait()
        pending.received = data.numel() - pending.sent
        numels = [seg.numel for seg in job.segments]
        blocks = wire.unpack(data, job.codec, [numels] * job.comm.size)
        return decode_segments(job, blocks, job.out.zero_())

    def seconds(self, n: int, world: int, payload_bytes: float, segments: int, link: Link,
                speed: Speed) -> float:
        return (link.latency_s + (world - 1) * payload_bytes / link.bytes_per_s
                + codec_seconds(n, world, 2 * segments, speed))
