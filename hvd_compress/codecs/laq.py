"""LAQ's quantizer of gradient innovations (Sun, Chen, Giannakis, Yang, "Communication-Efficient
Distributed Learning via Lazily Aggregated Quantized Gradients", NeurIPS 2019, eq. (4)-(5)).

A worker keeps its last quantized gradient Q_prev and quantizes the innovation v = g - Q_prev on
a uniform grid of 2^b points over [-R, R], R = ||v||_inf (deterministic rounding to the nearest
point, ties up):

    L = 2^b - 1,   step = 2R / L,   q_i = clamp(floor((v_i + R) / step + 1/2), 0, L),
    dQ_i = q_i * step - R,          Q = Q_prev + dQ,

so |dQ_i - v_i| <= step / 2 = tau R with the paper's tau = 1 / (2^b - 1).  Every operation is
one fp32 operation in this order, so the sender's ``Q_prev + dQ`` and a receiver's
``S + sum_m dQ_m`` use the same dQ bits.  R is a maximum (order-free).  The formulas live in
``kernels/laq.h``, shared by the CUDA kernels (``kernels/laq.cu``) and the C reference
(``csrc/laq.c``): payloads and decoded sums are the same bits on CPU and GPU.

An all-zero innovation (R = 0) is the empty payload: a worker that skips its upload (LAQ's lazy
rule, :class:`~hvd_compress.methods.LAQ`) encodes zeros and costs only the packed block's header
on the wire.  Decoding adds nothing for it.

Wire: ``radius`` (fp32 R, one element; none when R = 0) and ``codes`` (b bits per element, 8/b
per byte, element i at bits b (i % (8/b)) of byte i b / 8, as QSGD's): ceil(n b / 8) + 4 bytes.
"""
from __future__ import annotations

import ctypes
import dataclasses
from typing import Sequence

import numpy as np
import torch

from ..backends import cpu, kernel_backend
from . import _quant as q
from .base import Codec, Payload, RandomKey

_P, _I64, _INT, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
cpu.register("hvdc_laq_absmax", _P, _I64, _P, _INT)
cpu.register("hvdc_laq_encode", _P, _I64, _F32, _INT, _P, _INT)
cpu.register("hvdc_laq_decode_acc", _P, _P, _INT, _I64, _INT, _P, _INT)

#: the CUDA source of the LAQ kernels
SOURCE = "laq.cu"


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers in [0, 2^bits) (any int dtype, 1-D) packed 8/bits per byte, LSB first."""
    per = 8 // bits
    n = codes.numel()
    padded = torch.zeros(-(-n // per) * per, dtype=torch.int32, device=codes.device)
    padded[:n] = codes
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=codes.device)
    return (padded.view(-1, per) << shifts).sum(1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """The first ``n`` codes of :func:`pack_codes`'s bytes, as int32."""
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=packed.device)
    return ((packed.to(torch.int32).unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)[:n]


@dataclasses.dataclass(frozen=True)
class InnovationCodec(Codec):
    """LAQ's deterministic b-bit quantizer of ``v = g - Q_prev`` with radius ||v||_inf (see the
    module docstring); ``bits`` in {2, 4, 8}."""

    bits: int = 4
    name = "laq"

    def __post_init__(self) -> None:
        if self.bits not in (2, 4, 8):
            raise ValueError(f"bits must be 2, 4 or 8, got {self.bits!r}")

    @property
    def top(self) -> int:
        """L = 2^b - 1, the largest code."""
        return (1 << self.bits) - 1

    def n_code_bytes(self, n: int) -> int:
        """ceil(n b / 8): the code bytes of an upload of n elements."""
        return -(-n * self.bits // 8)

    def radius(self, x: torch.Tensor) -> torch.Tensor:
        """R = max_i |x_i| of a contiguous fp32 vector, as a 1-element fp32 tensor (0 for an empty
        one; a NaN wins)."""
        n = x.numel()
        if not n:
            return torch.zeros(1, dtype=torch.float32, device=x.device)
        kernels = kernel_backend(x.device)
        if kernels is None:
            radius = torch.empty(1, dtype=torch.float32)
            cpu.call("hvdc_laq_absmax", q.ptr(x), n, q.ptr(radius), cpu.threads())
            return radius
        bits = torch.zeros(1, dtype=torch.int32, device=x.device)
        kernels.launch(kernels.kernel(SOURCE, "hvdc_laq_absmax", x.device),
                       kernels.grid_size(n, q.BLOCK, x.device), q.BLOCK, (x, np.int64(n), bits))
        return bits.view(torch.float32)

    def _encode(self, x: torch.Tensor, key: RandomKey, residual: torch.Tensor | None) -> Payload:
        if residual is not None:
            raise ValueError("LAQ's quantizer has no error feedback (the innovation is its memory)")
        n = x.numel()
        radius = self.radius(x)
        r = float(radius)
        if not n or r == 0.0:
            return Payload(n, {"radius": torch.zeros(0, dtype=torch.float32, device=x.device),
                               "codes": torch.zeros(0, dtype=torch.uint8, device=x.device)})
        codes = torch.empty(self.n_code_bytes(n), dtype=torch.uint8, device=x.device)
        kernels = kernel_backend(x.device)
        if kernels is not None:
            kernels.launch(kernels.kernel(SOURCE, "hvdc_laq_encode", x.device),
                           kernels.grid_size(codes.numel(), q.BLOCK, x.device), q.BLOCK,
                           (x, np.int64(n), radius, np.int32(self.bits), codes))
        else:
            cpu.call("hvdc_laq_encode", q.ptr(x), n, r, self.bits, q.ptr(codes), cpu.threads())
        return Payload(n, {"radius": radius, "codes": codes})

    def innovation(self, payload: Payload) -> torch.Tensor:
        """dQ = q * step - R of one payload (zeros for the empty payload)."""
        out = torch.zeros(payload.numel, dtype=torch.float32, device=payload.device)
        return self.decode_accumulate([payload], out)

    def _sent(self, payloads: Sequence[Payload], out: torch.Tensor) -> list[Payload]:
        """The payloads that carry an upload, after checking every payload against ``out``."""
        if not payloads:
            raise ValueError("decode_accumulate needs at least one payload")
        n = out.numel()
        if out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError("out must be a contiguous fp32 tensor")
        sent = []
        for w, p in enumerate(payloads):
            if p.numel != n or sorted(p.parts) != ["codes", "radius"]:
                raise ValueError(f"payload {w}: expected {n} elements with parts radius, codes, got "
                                 f"{p.numel} elements with parts {list(p.parts)} for an output of {n}")
            radius, codes = p.parts["radius"], p.parts["codes"]
            length = min(radius.numel(), 1) * self.n_code_bytes(n)
            if (radius.dtype != torch.float32 or codes.dtype != torch.uint8 or radius.numel() > 1
                    or codes.numel() != length or radius.device != out.device
                    or codes.device != out.device or not codes.is_contiguous()):
                raise ValueError(f"payload {w}: expected an fp32 radius and {length} code bytes on "
                                 f"{out.device}, got {radius.numel()} {radius.dtype} and {codes.numel()} "
                                 f"{codes.dtype} on {codes.device}")
            if radius.numel():
                sent.append(p)
        return sent

    def decode_accumulate(self, payloads: Sequence[Payload], out: torch.Tensor) -> torch.Tensor:
        """``out += dQ_w`` for each worker's payload in list order (empty payloads add nothing)."""
        sent = self._sent(payloads, out)
        n = out.numel()
        if not sent or not n:
            return out
        flat = out.view(-1)
        kernels = kernel_backend(flat.device)
        codes = q.ptr_array([p.parts["codes"] for p in sent], kernels)
        radii = q.ptr_array([p.parts["radius"] for p in sent], kernels)
        if kernels is not None:
            kernels.launch(kernels.kernel(SOURCE, "hvdc_laq_decode_acc", flat.device),
                           kernels.grid_size(n, q.BLOCK, flat.device), q.BLOCK,
                           (codes, radii, np.int32(len(sent)), np.int64(n), np.int32(self.bits), flat))
        else:
            cpu.call("hvdc_laq_decode_acc", codes, radii, len(sent), n, self.bits, q.ptr(flat),
                     cpu.threads())
        return out
