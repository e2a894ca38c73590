"""Dense route: the bucket's fp32 gradients summed by one allreduce, as uncompressed Horovod
would (but one collective per bucket).  Used for members below ``min_numel`` and wherever the
plan finds that compression would not pay.  inf/NaN propagate through the sum by themselves."""
from __future__ import annotations

import torch

from .base import FP32, Job, Link, Pending, Route, Speed, ring_allreduce_bytes


class DenseRoute(Route):
    name = "dense"

    def start(self, job: Job) -> Pending:
        x = job.x
        if job.residual is not None:
            # A bucket that was compressed before (e.g. until the link was measured) sends what
            # its residual still holds once, exactly; the residual is then zero.
            x = x + job.residual
            job.residual.zero_()
        nbytes = x.numel() * FP32
        op = "average" if job.average else "sum"   # uncompressed: Horovod's own averaging
        return Pending(job, job.comm.allreduce(x, f"{job.tag}.dense", op=op), sent=nbytes,
                       received=nbytes, averaged=job.average)

    def finish(self, pending: Pending) -> torch.Tensor:
        return pending.handle.wait()

    def seconds(self, n: int, world: int, payload_bytes: float, segments: int, link: Link,
                speed: Speed) -> float:
        return link.latency_s + ring_allreduce_bytes(FP32 * n, world) / link.bytes_per_s
