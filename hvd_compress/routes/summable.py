"""Allreduce routes for payloads an allreduce can sum element-wise.

* :class:`SummableRoute`: the codec's single part, whose element-wise sum over workers is the
  payload of the sum (stochastic fp16, Horovod-style fp16: summed by an fp16 allreduce, which
  overflows to inf as Horovod's fp16 does; random-k's shared-mask values: fp32), is allreduced
  once per bucket and decoded once per segment.
* :class:`SharedScaleRoute`: TernGrad with the paper's shared scale (Wen et al. 2017): phase 1
  takes the maximum of every worker's scales (one small allreduce per bucket), phase 2 encodes
  with the shared scales and sums the codes -1/0/+1 as fp16 integers (exact up to 2048 ranks);
  decode multiplies by the scales.  Phase 2 starts in the flush, never inside a hook.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..codecs.base import Payload
from .base import (Job, Link, Pending, Route, Speed, codec_seconds, decode_segments, encode_segments,
                   ring_allreduce_bytes)

_FP16 = 2


class SummableRoute(Route):
    name = "allreduce"
    carries = "summable"

    def start(self, job: Job) -> Pending:
        payloads = encode_segments(job)
        values = torch.cat([next(iter(p.parts.values())).reshape(-1) for p in payloads])
        nbytes = values.numel() * values.element_size()
        return Pending(job, job.comm.allreduce(values, f"{job.tag}.sum"), sent=nbytes, received=nbytes,
                       payloads=payloads)

    def finish(self, pending: Pending) -> torch.Tensor:
        job, total = pending.job, pending.handle.wait()
        summed, pos = [], 0
        for seg, mine in zip(job.segments, pending.payloads):
            (name, part), = mine.parts.items()
            summed.append(Payload(seg.numel, {name: total[pos:pos + part.numel()]}))
            pos += part.numel()
        return decode_segments(job, [summed], job.out.zero_())

    def seconds(self, n: int, world: int, payload_bytes: float, segments: int, link: Link,
                speed: Speed) -> float:
        return (link.latency_s + ring_allreduce_bytes(payload_bytes, world) / link.bytes_per_s
                + codec_seconds(n, 1, segments, speed))


@dataclass
class SharedScalePending(Pending):
    """A shared-scale bucket in flight: scales per segment, then the per-element scale."""
    counts: list[int] = field(default_factory=list)
    scale: torch.Tensor | None = None


class SharedScaleRoute(Route):
    name = "allreduce"
    carries = "shared_scale"
    phases = 1

    def start(self, job: Job) -> Pending:
        scales = [job.codec.local_scales(job.x[_span(s)], _part(job.residual, s), check_finite=False)
                  for s in job.segments]   # (the engine checked the bucket once)
        local = torch.cat(scales)
        handle = job.comm.allreduce(local, f"{job.tag}.scale", op="max")
        return SharedScalePending(job, handle, sent=local.numel() * 4, received=local.numel() * 4,
                                  counts=[t.numel() for t in scales])

    def advance(self, pending: SharedScalePending) -> None:
        job = pending.job
        shared = pending.handle.wait()
        codes, per_element, payloads, pos = [], [], [], 0
        for seg, count in zip(job.segments, pending.counts):
            scales = shared[pos:pos + count]
            pos += count
            payload = job.codec.with_scales(scales).encode(job.x[_span(seg)], job.key(seg.tensor_id),
                                                           residual=_part(job.residual, seg),
                                                           check_finite=False)
            payloads.append(payload)
            unit = dict(payload.parts, scales=torch.ones_like(payload.parts["scales"]))
            codes.append(job.codec.decode(Payload(seg.numel, unit)).half())
            bucket = job.codec.bucket_size
            per_element.append(scales.expand(seg.numel) if bucket is None
                               else scales.repeat_interleave(bucket)[:seg.numel])
        ternary = torch.cat(codes)
        pending.payloads = payloads
        pending.scale = torch.cat(per_element)
        pending.handle = job.comm.allreduce(ternary, f"{job.tag}.codes")
        pending.sent += ternary.numel() * _FP16
        pending.received += ternary.numel() * _FP16

    def finish(self, pending: SharedScalePending) -> torch.Tensor:
        return torch.mul(pending.handle.wait(), pending.scale, out=pending.job.out)

    def seconds(self, n: int, world: int, payload_bytes: float, segments: int, link: Link,
                speed: Speed) -> float:
        return (2 * link.latency_s + ring_allreduce_bytes(_FP16 * n, world) / link.bytes_per_s
                + codec_seconds(n, 2, 3 * segments, speed))


def _span(seg) -> slice:
    return slice(seg.offset, seg.offset + seg.numel)


def _part(t: torch.Tensor | None, seg) -> torch.Tensor | None:
    return None if t is None else t[_span(seg)]
