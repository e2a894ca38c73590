"""Unbiased stochastic rounding fp32 -> fp16 (e.g. Gupta et al., "Deep Learning with Limited
Numerical Precision", ICML 2015): x, between its neighbouring fp16 values lo <= x < hi, becomes
hi with probability (x - lo) / (hi - lo), so E[fp16(x)] = x.  Exact fp16 values (and zeros, with
their sign) are unchanged; fp16 subnormals are used.

The draw is compared as an integer with the dropped mantissa bits: exactly unbiased for
|x| >= 2^-33; below, the round-up probability is truncated to a multiple of 2^-32.
**Overflow gives inf**, as Horovod's fp16 does, so that a loss scaler sees it and backs off:
above 65504 (the largest finite fp16) the next value up is inf, so 65504 < |x| < 65536 becomes
inf with probability (|x| - 65504) / 32 and larger |x| (inf included) is inf; NaN stays NaN.

Wire: ``values``, the fp16 numbers themselves (2 bytes per element), summable by an fp16
allreduce as they are.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch

from ..backends import cpu, kernel_backend
from . import _quant as q
from .base import Codec, Payload, RandomKey


@dataclasses.dataclass(frozen=True)
class StochasticFP16Codec(Codec):
    """fp32 -> fp16 with unbiased stochastic rounding (overflow to inf)."""

    fixed_size = True
    summable = True

    name = "fp16sr"

    def _encode(self, x: torch.Tensor, key: RandomKey, residual: torch.Tensor | None) -> Payload:
        n = x.numel()
        values = torch.empty(n, dtype=torch.float16, device=x.device)
        kernels = kernel_backend(x.device)
        if kernels is not None and n:
            fn = kernels.kernel(q.SOURCE, "hvdc_fp16sr_encode", x.device)
            kernels.launch(fn, q.grid(-(-n // 4), q.BLOCK), q.BLOCK,
                        (x, q.dptr(residual), np.int64(n),
                         *q.cuda_key(key), values))
        elif n:
            cpu.call("hvdc_fp16sr_encode", q.ptr(x), q.ptr(residual), n, key.seed, key.step,
                     key.tensor_id, q.ptr(values), cpu.threads())
        return Payload(n, {"values": values})

    def decode_accumulate(self, payloads: Sequence[Payload], out: torch.Tensor) -> torch.Tensor:
        n = payloads[0].numel if payloads else 0
        flat = q.accumulate_target(payloads, out, {"values": (torch.float16, n)})
        if n == 0:
            return out
        kernels = kernel_backend(flat.device)
        values = q.ptr_array([p.parts["values"] for p in payloads], kernels)
        if kernels is not None:
            fn = kernels.kernel(q.SOURCE, "hvdc_fp16_decode_acc", flat.device)
            kernels.launch(fn, q.grid(-(-n // 4), q.BLOCK), q.BLOCK,
                        (values, np.int32(len(payloads)), np.int64(n), flat))
        else:
            cpu.call("hvdc_fp16_decode_acc", values, len(payloads), n, q.ptr(flat), cpu.threads())
        return out


@dataclasses.dataclass(frozen=True)
class HalfCodec(Codec):
    """fp32 -> fp16 with round to nearest even, exactly Horovod's ``Compression.fp16`` (torch's
    own cast, identical on CPU and GPU: overflow gives inf).  Summable; no error feedback."""

    fixed_size = True
    summable = True

    name = "fp16rn"

    def _encode(self, x: torch.Tensor, key: RandomKey, residual: torch.Tensor | None) -> Payload:
        if residual is not None:
            raise ValueError("HalfCodec has no error feedback")
        return Payload(x.numel(), {"values": x.to(torch.float16)})

    def decode_accumulate(self, payloads: Sequence[Payload], out: torch.Tensor) -> torch.Tensor:
        n = payloads[0].numel if payloads else 0
        flat = q.accumulate_target(payloads, out, {"values": (torch.float16, n)})
        for p in payloads:
            flat.add_(p.parts["values"].to(torch.float32))
        return out
