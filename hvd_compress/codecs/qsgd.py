"""QSGD (Alistarh et al., "QSGD: Communication-Efficient SGD via Gradient Quantization and
Encoding", NeurIPS 2017), stochastic quantization per bucket.

For each bucket v of ``bucket_size`` elements (default 512) and s = 2^(b-1) - 1 levels
(b = ``bits`` in {2, 4, 8}):

    r_i = |v_i| / ||v||_2 * s,   l_i = floor(r_i) + Bernoulli(r_i - floor(r_i)),
    Q(v)_i = ||v||_2 * sign(v_i) * l_i / s.

E[Q(v)] = v and E||Q(v) - v||^2 <= min(n / s^2, sqrt(n) / s) ||v||^2 (the paper's Lemma 3.1,
n the bucket length).  ||v||_2 is the square root of the sum of squares in the order of the
numeric contract (hvdc_warp_sum over the bucket; one warp per bucket on the GPU); decoding
evaluates sign * l * (norm / s).  r_i is capped at s (|v_i| can exceed the rounded norm by an ulp).

Error feedback (``encode(..., residual=r)``) is optional and off by default: QSGD is unbiased,
and error feedback's guarantees assume a contraction (E||C(v) - v||^2 <= (1 - delta) ||v||^2),
which QSGD is not when min(n / s^2, sqrt(n) / s) >= 1 (e.g. 4 bits, 512-element buckets): the
residual can then grow without bound.

``norm="max"`` replaces ||v||_2 by ||v||_inf = max_i |v_i| (what practice uses: CGX scales each
bucket by its range, and common QSGD implementations default to the infinity norm): r_i = |v_i| / ||v||_inf * s <= s, still
unbiased, and the variance sum_i (m/s)^2 p_i (1 - p_i) <= n m^2 / (4 s^2) with m = ||v||_inf;
since m <= ||v||_2 and, for a Gaussian bucket, m^2 ~ 2 ln(n) ||v||^2 / n, the bound falls from
~sqrt(n)/s ||v||^2 (22.6/7 = 3.2 ||v||^2 at 4 bits, n = 512) to ~ln(n) / (2 s^2) ||v||^2
(0.06 ||v||^2): the levels span the bucket's values rather than a norm most of them never reach.
Same wire format (the fp32 per bucket is then the max).

Wire: ``codes`` (b bits per element: sign bit, the MSB, then the level; 8/b per byte, element i
at bits b (i % (8/b)) of byte i b / 8) and ``norms`` (fp32, one per bucket).  A bucket of zeros
has norm 0 and codes 0.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch

from ..backends import cpu, kernel_backend
from . import _quant as q
from .base import Codec, Payload, RandomKey, overflow_check


@dataclasses.dataclass(frozen=True)
class QSGDCodec(Codec):
    """QSGD with ``bits`` in {2, 4, 8} per element and one fp32 norm (``"l2"`` or ``"max"``) per
    bucket."""

    fixed_size = True

    bits: int = 4
    bucket_size: int = 512
    norm: str = "l2"
    name = "qsgd"

    def __post_init__(self) -> None:
        if self.bits not in (2, 4, 8):
            raise ValueError(f"bits must be 2, 4 or 8, got {self.bits!r}")
        if self.norm not in ("l2", "max"):
            raise ValueError(f"norm must be 'l2' or 'max', got {self.norm!r}")
        q.check_bucket(self.bucket_size, allow_none=False)

    @property
    def levels(self) -> int:
        """s = 2^(bits-1) - 1 quantization levels above zero."""
        return 2 ** (self.bits - 1) - 1

    def _sizes(self, n: int) -> tuple[int, int]:
        return -(-n * self.bits // 8), q.n_buckets(n, self.bucket_size)

    def _encode(self, x: torch.Tensor, key: RandomKey, residual: torch.Tensor | None) -> Payload:
        n = x.numel()
        n_codes, n_norms = self._sizes(n)
        codes = torch.empty(n_codes, dtype=torch.uint8, device=x.device)
        norms = torch.empty(n_norms, dtype=torch.float32, device=x.device)
        kernels = kernel_backend(x.device)
        if kernels is not None and n:
            fn = kernels.kernel(q.SOURCE, "hvdc_qsgd_encode", x.device)
            kernels.launch(fn, q.grid(32 * n_norms, q.BLOCK), q.BLOCK,
                        (x, q.dptr(residual), np.int64(n), np.int64(self.bucket_size),
                         np.int32(self.bits), np.int32(self.norm == "max"), *q.cuda_key(key), codes, norms))
        elif n:
            cpu.call("hvdc_qsgd_encode", q.ptr(x), q.ptr(residual), n, self.bucket_size, self.bits,
                     int(self.norm == "max"), key.seed, key.step, key.tensor_id, q.ptr(codes), q.ptr(norms), cpu.threads())
        # fp32 sum of squares overflows for |v| > ~1.8e19: refuse rather than send zeros
        finite = overflow_check(norms, kernels is not None, lambda: "QSGD: a bucket's sum of squares "
                                f"overflows fp32 (max |g| = {float(x.abs().max()):.3g})") if n_norms else None
        return Payload(n, {"codes": codes, "norms": norms}, finite)

    def decode_accumulate(self, payloads: Sequence[Payload], out: torch.Tensor) -> torch.Tensor:
        n = payloads[0].numel if payloads else 0
        n_codes, n_norms = self._sizes(n)
        flat = q.accumulate_target(payloads, out, {"codes": (torch.uint8, n_codes),
                                                   "norms": (torch.float32, n_norms)})
        if n == 0:
            return out
        kernels = kernel_backend(flat.device)
        codes = q.ptr_array([p.parts["codes"] for p in payloads], kernels)
        norms = q.ptr_array([p.parts["norms"] for p in payloads], kernels)
        if kernels is not None:
            fn = kernels.kernel(q.SOURCE, "hvdc_qsgd_decode_acc", flat.device)
            kernels.launch(fn, q.grid(-(-n // 4), q.BLOCK), q.BLOCK,
                        (codes, norms, np.int32(len(payloads)), np.int64(n), np.int64(self.bucket_size),
                         np.int32(self.bits), flat))
        else:
            cpu.call("hvdc_qsgd_decode_acc", codes, norms, len(payloads), n, self.bucket_size, self.bits,
                     q.ptr(flat), cpu.threads())
        return out
