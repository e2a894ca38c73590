"""LAQ, lazily aggregated quantized gradients (stateful)."""
from __future__ import annotations

from typing import Any

import torch

from ..codecs.base import Codec
from ..engine.buckets import Bucket
from ..engine.plan import COMPRESSED
from ..engine.state import BUCKET, MEMBER
from .base import _AggregateMethod, register


@register
class LAQ(_AggregateMethod):
    """LAQ (Sun, Chen, Giannakis, Yang, "Communication-Efficient Distributed Learning via Lazily
    Aggregated Quantized Gradients", NeurIPS 2019): worker m quantizes its gradient's innovation
    with :class:`~hvd_compress.codecs.laq.InnovationCodec` (``bits`` per element, radius
    ||g - Q_m||_inf, grid around its last quantized gradient Q_m) and uploads dQ_m only when

        ||dQ_m||^2 > (1 / M^2) sum_{d=1..D} xi_d ||S^{k-d}||^2 + 3 (||eps_m^k||^2 + ||eps_hat_m||^2)

    (eps_m^k = Q_m + dQ_m - g, the new quantization error; eps_hat_m the error of its last upload;
    M workers), or when it skipped ``t_bar`` steps in a row, or never uploaded.  Every rank keeps
    the running aggregate S = sum_m Q_m (S += the dQ of the workers that sent, decoded in rank
    order), delivers S (the engine divides by M for ``Average``) and remembers ||S||^2 of the
    last D steps: no rank stores N copies, and every rank's S is the same bits.

    The paper's rule reads ``||theta^{k+1-d} - theta^{k-d}||^2 / (alpha^2 M^2)``.  With the
    update ``theta^{k+1} = theta^k - alpha S^k`` (plain SGD on the delivered aggregate; for
    ``Average`` alpha is the optimizer's lr / M) this is ``||S^{k-d}||^2 / M^2``: the learning
    rate cancels, nothing else is needed.  With momentum or Adam the rule uses the aggregates as a
    proxy of the parameter change (our assumption).

    The rule and the quantizer act per bucket (the paper's worker vector is the whole model; with
    the default 25 MB buckets a small model is one bucket).  Defaults: ``D=10``,
    ``xi_1 = ... = xi_D = xi / D`` with ``xi=0.8`` and ``t_bar=100`` (the paper's experiments, as we
    read them) and ``bits=8``: with 4 bits the max-norm radius makes the quantization error
    ||eps||^2 (heavy-tailed gradients) larger than the innovation, the rule's 3 (||eps||^2 +
    ||eps_hat||^2) term then skips nearly every upload and SGD with momentum on stale
    aggregates diverged on the digits task (docs/methods-lazy-diff.md).  A skipped upload sends an
    empty payload: the packed block's 16-byte header.  State (checkpointed): Q_m, S, (uploaded, skipped steps, ||eps_hat||^2, the last D
    ||S||^2).
    """

    name = "laq"

    def __init__(self, bits: int = 8, D: int = 10, xi: float = 0.8, t_bar: int = 100, *,
                 route: str = COMPRESSED, **options: Any) -> None:
        from ..codecs.laq import InnovationCodec
        if D < 1 or not xi >= 0 or t_bar < 0:
            raise ValueError(f"LAQ needs D >= 1, xi >= 0 and t_bar >= 0, got D={D}, xi={xi}, t_bar={t_bar}")
        self.D, self.xi, self.t_bar = int(D), float(xi), int(t_bar)
        super().__init__(InnovationCodec(bits=bits), route=route, **options)

    def state_names(self) -> dict[str, str]:
        return {"quantized": MEMBER, "laq": BUCKET, "aggregate": MEMBER}

    def __repr__(self) -> str:
        return (f"LAQ(bits={self.codec.bits}, D={self.D}, xi={self.xi}, t_bar={self.t_bar}, "
                f"{self._options()})")

    def payload_bytes(self, bucket: Bucket, codec: Codec, padded: bool = False) -> float:
        """Bytes of an upload (a skip costs only the block header)."""
        return sum(-(-seg.numel * codec.bits // 8) + 4 for seg in bucket.segments(self.scope))

    def prepare(self, bucket, grads, x, state, comm):
        x = super().prepare(bucket, grads, x, state, comm)
        if not self.compressed(bucket, comm):
            return x
        device = x.device
        quantized = state.buffer("quantized", device)
        meta = state.buffer("laq", device, 3 + self.D)
        old = meta.committed
        x.sub_(quantized.committed)                                   # v = g - Q_m
        dq = self.codec.innovation(self.codec.encode(x, check_finite=False))
        lhs = dq.square().sum()
        eps2 = (dq - x).square().sum()                                # ||Q_m + dQ - g||^2
        rhs = old[3:].sum() * (self.xi / self.D / comm.size ** 2) + 3 * (eps2 + old[2])
        uploaded, skipped, lhs, rhs, eps2 = torch.stack([old[0], old[1], lhs, rhs, eps2]).tolist()
        m = meta.begin()
        if not uploaded or skipped >= self.t_bar or not lhs <= rhs:   # (NaN: send, the engine flags it)
            torch.add(quantized.committed, dq, out=quantized.begin(copy=False))
            m[0], m[1], m[2] = 1.0, 0.0, eps2
            return x                    # the route encodes v to the same payload
        m[1] += 1
        return x.zero_()                # the empty payload

    def after_decode(self, bucket, out, state, comm):
        if not self.compressed(bucket, comm):
            return
        aggregate = state.buffer("aggregate", out.device)
        s = aggregate.begin(copy=False)
        torch.add(aggregate.committed, out, out=s)                    # S += sum of the dQ sent
        out.copy_(s)
        m = state.buffers["laq"].working
        m[4:] = m[3:-1].clone()
        m[3] = s.square().sum()
