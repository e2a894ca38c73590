"""PowerSGD as a route (Vogels, Karimireddy, Jaggi, "PowerSGD: Practical Low-Rank Gradient
Compression for Distributed Optimization", NeurIPS 2019; PyTorch's ``powerSGD_hook`` does the
same for DDP).

Each member whose matrix view M (its first dimension by the rest, n x m) pays at rank r
(n m >= ``min_compression_rate`` (n + m) r) is sent as two thin factors; the other members of the
bucket travel dense in the first allreduce.  With error feedback M = g + e, and Q the previous
step's (warm start; the first one random from the seed every rank shares, orthonormalized):

1. P = M Q, **allreduce** (sum over workers, with the dense members);
2. P^ = orthonormal(P) (Gram-Schmidt on the columns, in the same order on every rank),
   Q = M^T P^, **allreduce**;
3. the aggregate is P^ Q^T (the sum over workers of P^ P^^T M_w); the worker's error becomes
   e = M - P^ Q^T / W, and Q / W is kept for the next step's warm start.

``structured=True`` is the structured update of Konečný et al. 2016: Q is a fresh random
orthonormal basis from the shared seed every step and only P = M Q is sent (one allreduce);
the aggregate is P Q^T.  Matrix products stay torch's (the issue: what torch does optimally
stays torch); sums over workers are Horovod's allreduce.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .base import FP32, Job, Link, Pending, Route, Speed, ring_allreduce_bytes


def matrix_shape(shape: torch.Size) -> tuple[int, int]:
    """The matrix view of a parameter: (first dimension, the rest); (1, n) for a vector."""
    if len(shape) < 2:
        return 1, int(torch.Size(shape).numel())
    return int(shape[0]), int(torch.Size(shape[1:]).numel())


def pays(shape: torch.Size, rank: int, min_rate: float) -> bool:
    """Whether the factors of rank ``rank`` are at most 1/``min_rate`` of the matrix."""
    n, m = matrix_shape(shape)
    r = min(rank, n, m)
    return n > 1 and m > 1 and n * m >= min_rate * (n + m) * r


def orthonormalize(p: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Gram-Schmidt on the columns of ``p`` in place (PyTorch's hook does the same), column by
    column in order: the same bits on every rank for the same input."""
    for i in range(p.shape[1]):
        col = p[:, i:i + 1]
        col.div_(col.norm() + eps)
        if i + 1 < p.shape[1]:
            rest = p[:, i + 1:]
            rest.sub_(col @ (col.t() @ rest))
    return p


@dataclass
class PowerSGDPending(Pending):
    """A PowerSGD bucket in flight: its members' plan (slice, matrix shape, rank, Q offset), the
    Q factors used, the warm-start state, and after phase 1 the summed P and the P factors."""
    plan: list = field(default_factory=list)
    qs: list = field(default_factory=list)
    q_state: torch.Tensor | None = None
    first: torch.Tensor | None = None
    ps: list[Any] = field(default_factory=list)


class PowerSGDRoute(Route):
    name = "powersgd"
    carries = "lowrank"
    phases = 1

    def __init__(self, rank: int = 2, min_compression_rate: float = 2.0, structured: bool = False) -> None:
        self.rank, self.min_rate, self.structured = rank, min_compression_rate, structured

    def _plan(self, job: Job) -> list[tuple]:
        """Per member: (slice, matrix shape, rank, offset of its Q in the state) or dense."""
        out, q_pos = [], 0
        for m, seg in zip(job.members, job.segments):
            part = slice(seg.offset, seg.offset + seg.numel)
            if pays(m.shape, self.rank, self.min_rate):
                n, cols = matrix_shape(m.shape)
                r = min(self.rank, n, cols)
                out.append((part, (n, cols), r, q_pos))
                q_pos += cols * r
            else:
                out.append((part, None, 0, 0))
        return out

    def _initial_q(self, job: Job, cols: int, r: int, tensor_id: int) -> torch.Tensor:
        """A random orthonormal (cols x r) basis from the seed every rank shares."""
        gen = torch.Generator().manual_seed((job.shared_seed ^ (tensor_id << 20) ^ job.step * self.structured)
                                            & 0x7FFFFFFFFFFFFFFF)
        return orthonormalize(torch.randn(cols, r, generator=gen).to(job.x.device))

    def start(self, job: Job) -> Pending:
        plan = self._plan(job)
        if job.residual is not None:    # error feedback: M = g + e (in the bucket's own input)
            job.x.add_(job.residual)
        q_numel = sum(shape[1] * r for _, shape, r, _ in plan if shape)
        q_state = None if self.structured else job.state("powersgd_q", q_numel)
        fresh = q_state is not None and job.fresh("powersgd_q")
        pieces, qs = [], []
        for (part, shape, r, q_pos), seg in zip(plan, job.segments):
            if shape is None:
                pieces.append(job.x[part])
                qs.append(None)
                continue
            n, cols = shape
            if q_state is None or fresh:
                q = self._initial_q(job, cols, r, seg.tensor_id)
                if q_state is not None:
                    q_state[q_pos:q_pos + cols * r].copy_(q.reshape(-1))
            else:
                q = q_state[q_pos:q_pos + cols * r].view(cols, r)
            qs.append(q)
            pieces.append((job.x[part].view(n, cols) @ q).reshape(-1))
        first = torch.cat(pieces)
        nbytes = first.numel() * FP32
        return PowerSGDPending(job, job.comm.allreduce(first, f"{job.tag}.p"), sent=nbytes, received=nbytes,
                               plan=plan, qs=qs, q_state=q_state)

    def advance(self, pending: PowerSGDPending) -> None:
        if self.structured:
            return
        job, plan = pending.job, pending.plan
        total = pending.handle.wait()
        pending.first = total
        pieces, ps, pos = [], [], 0
        for part, shape, r, _ in plan:
            size = (part.stop - part.start) if shape is None else shape[0] * r
            chunk = total[pos:pos + size]
            pos += size
            if shape is None:
                ps.append(None)
                continue
            p = orthonormalize(chunk.view(shape[0], r).clone())
            ps.append(p)
            pieces.append((job.x[part].view(*shape).t() @ p).reshape(-1))
        pending.ps = ps
        second = torch.cat(pieces) if pieces else torch.zeros(0, device=job.x.device)
        pending.sent += second.numel() * FP32
        pending.received += second.numel() * FP32
        pending.handle = job.comm.allreduce(second, f"{job.tag}.q")

    def finish(self, pending: PowerSGDPending) -> torch.Tensor:
        job, plan = pending.job, pending.plan
        world = job.comm.size
        out = job.out
        if self.structured:
            first, second = pending.handle.wait(), None
        else:
            first, second = pending.first, pending.handle.wait()
        pos_first = pos_second = 0
        for i, (part, shape, r, q_pos) in enumerate(plan):
            if shape is None:
                size = part.stop - part.start
                out[part].copy_(first[pos_first:pos_first + size])
                pos_first += size
                if job.residual is not None:
                    job.residual[part].zero_()      # sent exactly
                continue
            n, cols = shape
            if self.structured:
                p = first[pos_first:pos_first + n * r].view(n, r)
                q = pending.qs[i]
            else:
                p = pending.ps[i]
                q = second[pos_second:pos_second + cols * r].view(cols, r)
                pos_second += cols * r
                pending.q_state[q_pos:q_pos + cols * r].copy_((q / world).reshape(-1))
            pos_first += n * r
            torch.matmul(p, q.t(), out=out[part].view(n, cols))
            if job.residual is not None:   # e = M - (the aggregate's mean), the mean exactly sum / W
                torch.sub(job.x[part], out[part] / world, out=job.residual[part])
        return out

    def seconds(self, n: int, world: int, payload_bytes: float, segments: int, link: Link,
                speed: Speed) -> float:
        phases = 1 if self.structured else 2
        # matrix products: ~ 2 n r flops per phase and element, at ~1 GFLOP/s per core (CPU)
        flops = 2 * n * self.rank * (phases + 1)
        return phases * link.latency_s + ring_allreduce_bytes(payload_bytes, world) / link.bytes_per_s \
            + flops / 1e9 + math.ceil(segments) * 4 * speed.call_s
