"""Deep Gradient Compression: top-k with momentum correction, local clipping, momentum masking and warm-up (stateful)."""
from __future__ import annotations

import math
from typing import Any

import torch

from ..backends import on_device
from ..codecs.base import Codec
from ..engine.state import MEMBER
from .base import register
from .sparsifiers import TopK


@register
class DGC(TopK):
    """Deep Gradient Compression (Lin et al., ICLR 2018): top-k with sampled thresholds plus

    * **momentum correction**: the compressor keeps the momentum, ``u <- m u + g``, and
      accumulates ``v <- v + u`` (the error-feedback residual); the top entries of ``v`` are sent
      and zeroed in ``v``.  The wrapped optimizer must be SGD with ``momentum=0`` (checked):
      momentum happens here, before sparsification, which is the point of the correction.
      Parameters below ``min_numel`` send ``u`` densely, i.e. plain momentum SGD.
    * **local gradient clipping** (optional): ``g <- g * min(1, clip_norm / (sqrt(N) ||g||))``
      per tensor before it enters ``u``, the paper's threshold scaled by ``N^-1/2``.
    * **momentum factor masking**: ``u`` is zeroed where ``v`` was sent.
    * **sparsity warm-up**: over the first ``warmup_steps`` committed steps the density falls
      geometrically in four stages from ``warmup_ratio`` (DGC: 25%) to ``ratio``.

    Momentum and residual are state: checkpoint them with ``state_dict()``.
    """

    hierarchical = False
    name = "dgc"
    #: the wrapped optimizer must not apply momentum again (examples/ read this)
    owns_momentum = True
    transforms_gradients = True
    _STAGES = 4

    def __init__(self, ratio: float = 0.001, momentum: float = 0.9, *, clip_norm: float | None = None,
                 warmup_steps: int = 0, warmup_ratio: float = 0.25, sample_ratio: float = 0.01,
                 value_dtype: torch.dtype = torch.float16, scope: str = "tensor", **options: Any) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if warmup_steps < 0 or not 0 < ratio <= 1 or (warmup_steps and not ratio <= warmup_ratio <= 1):
            raise ValueError("need 0 < ratio <= 1, warmup_steps >= 0 and, with warm-up, "
                             f"ratio <= warmup_ratio <= 1 (got ratio={ratio}, "
                             f"warmup_ratio={warmup_ratio}, warmup_steps={warmup_steps})")
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm}")
        super().__init__(ratio=ratio, sample_ratio=sample_ratio, value_dtype=value_dtype,
                         scope=scope, error_feedback=True, **options)
        self.momentum = momentum
        self.clip_norm = clip_norm
        self.warmup_steps = warmup_steps
        self.warmup_ratio = warmup_ratio
        self._codecs: dict[float, Codec] = {}

    def __repr__(self) -> str:
        return (f"{super().__repr__()[:-1]}, momentum={self.momentum}, clip_norm={self.clip_norm}, "
                f"warmup_steps={self.warmup_steps}, warmup_ratio={self.warmup_ratio})")

    def density(self, step: int) -> float:
        """Fraction of entries sent at the engine's ``step``-th committed step."""
        if step >= self.warmup_steps:
            return self.codec.ratio
        stage = step * self._STAGES // self.warmup_steps
        return self.warmup_ratio * (self.codec.ratio / self.warmup_ratio) ** (stage / self._STAGES)

    def codec_at(self, step: int, world: int = 1) -> Codec:
        density = self.density(step)
        if density not in self._codecs:  # at most 5: the warm-up stages and the final ratio
            from ..codecs.topk import TopKCodec
            c = self.codec
            self._codecs[density] = TopKCodec(ratio=density, sample_ratio=c.sample_ratio,
                                              value_dtype=c.value_dtype, exact_k=c.exact_k, mode=c.mode)
        return self._codecs[density]

    def prepare(self, bucket, grads, x, state, comm):
        # u_new = m u + g, written out of place: the committed u changes only at commit.
        momentum = state.buffer("momentum", x.device)
        u_old, u_new = momentum.committed, momentum.begin(copy=False)
        bound = None if self.clip_norm is None else self.clip_norm / math.sqrt(comm.size)
        for g, m, offset in zip(grads, bucket.members, bucket.offsets):
            part = slice(offset, offset + m.numel)
            torch.mul(u_old[part], self.momentum, out=u_new[part])
            if g is not None:
                g = g.detach().reshape(-1).to(torch.float32)
                if bound is not None:
                    g = g * torch.clamp(bound / (g.norm() + 1e-12), max=1.0)
                u_new[part].add_(g)
        return u_new

    def after_encode(self, bucket, pending, state):
        # momentum factor masking: u <- 0 where v was sent (this rank's own entries).  A device
        # payload's padding (index seg.numel) goes to a spare last slot of a mask; host payloads
        # hold the sent entries only and need no dense pass.
        u_new = state.buffers["momentum"].working
        device = on_device(u_new)
        mask = torch.zeros(u_new.numel() + 1, dtype=torch.bool, device=u_new.device) if device else None
        for payload, seg in zip(pending.payloads, bucket.segments(self.scope)):
            idx = payload.parts["indices"].to(torch.int64)
            if device:
                mask.index_fill_(0, torch.where(idx < seg.numel, idx + seg.offset, u_new.numel()), True)
            else:
                u_new.index_fill_(0, idx + seg.offset, 0.0)
        if device:
            u_new.masked_fill_(mask[:-1], 0.0)

    def state_names(self) -> dict[str, str]:
        return {**super().state_names(), "momentum": MEMBER}

    def check_optimizer(self, optimizer, names):
        if not isinstance(optimizer, torch.optim.SGD):
            return (f"DGC replaces SGD's momentum (momentum correction, Lin et al. 2018) and cannot "
                    f"be combined with {type(optimizer).__mro__[1].__name__}: use "
                    "hvd_compress.TopK (error feedback without momentum) with other optimizers")
        for group in optimizer.param_groups:
            if group["momentum"]:
                return (f"DGC applies momentum itself (momentum correction, Lin et al. 2018) but the "
                        f"optimizer has momentum={group['momentum']}: build the optimizer with "
                        "momentum=0 and pass the momentum to DGC(momentum=...)")
        return None
