"""DIANA, compressed gradient differences (stateful)."""
from __future__ import annotations

import math
from typing import Any

import torch

from ..engine.plan import COMPRESSED
from ..engine.state import MEMBER
from .base import _AggregateMethod, register


@register
class DIANA(_AggregateMethod):
    """DIANA (Mishchenko, Gorbunov, Takáč, Richtárik, "Distributed Learning with Compressed
    Gradient Differences", 2019): worker i keeps a shift h_i and sends Delta_i = C(g_i - h_i),
    then h_i <- h_i + alpha D(Delta_i); every rank keeps H = sum_i h_i (the same bits everywhere),
    delivers H + sum_i D(Delta_i) (divided by N for ``Average``: h + mean Delta, the paper's
    g_hat with h = H / N) and updates H <- H + alpha sum_i D(Delta_i).  The shifts learn the
    gradients, so the compressed differences shrink: the variance of C vanishes at the optimum.

    ``codec``: ``"qsgd"`` (default: ``bits``, ``bucket_size`` 512-element norm buckets over the
    fused bucket) or ``"terngrad"`` (unbiased, no clipping, a scale per ``bucket_size``); spec:
    ``diana:codec='terngrad'``, ``diana:bits=8,alpha=0.1``.  ``alpha`` defaults to the largest
    the paper's theory allows, 1 / (omega + 1), for the codec's variance parameter omega
    (E||C(x) - x||^2 <= omega ||x||^2): QSGD with s = 2^(bits-1) - 1 levels on d-element buckets,
    omega = min(d / s^2, sqrt(d) / s) (Alistarh et al. 2017, Lemma 3.1): 4 bits, d = 512 gives
    omega = 3.232, alpha = 0.2363; TernGrad's ternary code s sign(x_i) Bernoulli(|x_i| / s),
    s = ||x||_inf, has E||C(x)||^2 = s ||x||_1, so omega = max s ||x||_1 / ||x||^2 - 1 =
    (sqrt(d) - 1) / 2 (d = 512: omega = 10.81, alpha = 0.0847).

    Wire: the codec's (allgather).  State (checkpointed): h_i and H.
    """

    name = "diana"

    def __init__(self, codec: str = "qsgd", alpha: float | None = None, bits: int = 4,
                 bucket_size: int = 512, *, route: str = COMPRESSED, **options: Any) -> None:
        if codec == "qsgd":
            from ..codecs.qsgd import QSGDCodec
            c = QSGDCodec(bits=bits, bucket_size=bucket_size)
            self.omega = min(bucket_size / c.levels ** 2, math.sqrt(bucket_size) / c.levels)
        elif codec == "terngrad":
            from ..codecs.terngrad import TernGradCodec
            c = TernGradCodec(bucket_size=bucket_size, clip=None)
            self.omega = (math.sqrt(bucket_size) - 1) / 2
        else:
            raise ValueError(f"DIANA: codec must be 'qsgd' or 'terngrad', got {codec!r}")
        if alpha is not None and not 0 < alpha <= 1:
            raise ValueError(f"DIANA: alpha must lie in (0, 1], got {alpha}")
        self.codec_name = codec
        self.alpha = 1 / (self.omega + 1) if alpha is None else float(alpha)
        super().__init__(c, route=route, **options)

    def state_names(self) -> dict[str, str]:
        return {"shift": MEMBER, "shift_sum": MEMBER}

    def __repr__(self) -> str:
        return f"DIANA(codec={self.codec!r}, alpha={self.alpha!r}, {self._options()})"

    def prepare(self, bucket, grads, x, state, comm):
        x = super().prepare(bucket, grads, x, state, comm)
        if self.compressed(bucket, comm):
            x.sub_(state.buffer("shift", x.device).committed)          # g_i - h_i
        return x

    def after_encode(self, bucket, pending, state):
        h = state.buffers["shift"].begin()
        for payload, seg in zip(pending.payloads, bucket.segments(self.scope)):
            delta = pending.job.codec_for(seg.tensor_id).decode(payload)
            h[seg.offset:seg.offset + seg.numel].add_(delta.mul_(self.alpha))   # two roundings, any device

    def after_decode(self, bucket, out, state, comm):
        total = state.buffer("shift_sum", out.device)
        torch.add(total.committed, out * self.alpha, out=total.begin(copy=False))
        out.add_(total.committed)
