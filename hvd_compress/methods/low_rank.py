"""Low rank: PowerSGD."""
from __future__ import annotations

from typing import Any

from ..codecs.base import Codec
from ..engine.buckets import Bucket
from ..engine.state import BUCKET, MEMBER
from .base import Method, register


@register
class PowerSGD(Method):
    """PowerSGD (Vogels, Karimireddy, Jaggi, NeurIPS 2019): rank-``rank`` approximation of each
    weight matrix by one power iteration with warm start, P = M Q and Q = M^T orth(P) summed by
    two allreduces, error feedback always on; tensors whose matrix view would not shrink by
    ``min_compression_rate`` (PyTorch's hook's rule) travel dense in the same bucket.
    ``structured=True`` is Konečný et al.'s structured update: Q a fresh random basis from the shared
    seed each step, only P sent.  (n + m) r fp32 per n x m matrix."""

    hierarchical = False
    name = "powersgd"

    def __init__(self, rank: int = 2, min_compression_rate: float = 2.0, *, structured: bool = False,
                 **options: Any) -> None:
        from ..routes.low_rank import PowerSGDRoute
        if rank < 1 or min_compression_rate < 1:
            raise ValueError(f"need rank >= 1 and min_compression_rate >= 1, got {rank}, {min_compression_rate}")
        self.rank, self.min_compression_rate, self.structured = rank, min_compression_rate, structured
        self._route = PowerSGDRoute(rank, min_compression_rate, structured)
        super().__init__(None, error_feedback=True, **options)

    def state_names(self) -> dict[str, str]:
        return {"residual": MEMBER, "powersgd_q": BUCKET}

    def __repr__(self) -> str:
        return (f"PowerSGD(rank={self.rank}, min_compression_rate={self.min_compression_rate}, "
                f"structured={self.structured}, {self._options()})")

    def candidates(self) -> dict:
        return {"powersgd": self._route}

    def payload_bytes(self, bucket: Bucket, codec: Codec | None, padded: bool = False) -> float:
        from ..routes.low_rank import matrix_shape, pays
        total = 0
        for m in bucket.members:
            if pays(m.shape, self.rank, self.min_compression_rate):
                n, cols = matrix_shape(m.shape)
                total += (n + cols) * min(self.rank, n, cols) * (1 if not self.structured else n / (n + cols))
            else:
                total += m.numel
        return 4 * total
