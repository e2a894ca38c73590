"""LAQ's quantizer of gradient innovations (Sun, Chen, Giannakis, Yang, "Communication-Efficient
Distributed Learning via Lazily Aggregated Quantized Gradients", NeurIPS 2019, eq. (4)-(5)).

A worker keeps its last quantized gradient Q_prev and quantizes the innovation v = g - Q_prev on
a uniform grid of 2^b points over [-R, R], R = ||v||_inf (deterministic rounding to the nearest
point, ties up):

    L = 2^b - 1,   step = 2R / L,   q_i = clamp(floor((v_i + R) / step + 1/2), 0, L),
    dQ_i = q_i * step - R,          Q = Q_prev + dQ,

so |dQ_i - v_i| <= step / 2 = tau R with the paper's tau = 1 / (2^b - 1).  Every operation is
one fp32 operation in this order, so the sender's ``Q_prev + dQ`` and a receiver's
``S + sum_m dQ_m`` use the same dQ bits.

An all-zero innovation (R = 0) is the empty payload: a worker that skips its upload (LAQ's lazy
rule, :class:`~hvd_compress.methods.LAQ`) encodes zeros and costs only the packed block's header
on the wire.  Decoding adds nothing for it.

Wire: ``radius`` (fp32 R, one element; none when R = 0) and ``codes`` (b bits per element, 8/b
per byte, element i at bits b (i % (8/b)) of byte i b / 8, as QSGD's): ceil(n b / 8) + 4 bytes.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from .base import Codec, Payload, RandomKey


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

    def _encode(self, x: torch.Tensor, key: RandomKey, residual: torch.Tensor | None) -> Payload:
        if residual is not None:
            raise ValueError("LAQ's quantizer has no error feedback (the innovation is its memory)")
        n = x.numel()
        radius = x.abs().amax().reshape(1) if n else torch.zeros(1, device=x.device)
        if not n or float(radius) == 0.0:
            return Payload(n, {"radius": torch.zeros(0, dtype=torch.float32, device=x.device),
                               "codes": torch.zeros(0, dtype=torch.uint8, device=x.device)})
        step = (radius + radius) / self.top
        q = torch.floor((x + radius) / step + 0.5).clamp_(0, self.top)
        return Payload(n, {"radius": radius, "codes": pack_codes(q.to(torch.int32), self.bits)})

    def innovation(self, payload: Payload) -> torch.Tensor:
        """dQ = q * step - R of one payload (zeros for the empty payload)."""
        out = torch.zeros(payload.numel, dtype=torch.float32, device=payload.device)
        return self.decode_accumulate([payload], out)

    def decode_accumulate(self, payloads: Sequence[Payload], out: torch.Tensor) -> torch.Tensor:
        """``out += dQ_w`` for each worker's payload in list order (empty payloads add nothing)."""
        flat = out.view(-1)
        for p in payloads:
            if p.numel != flat.numel():
                raise ValueError(f"payload of {p.numel} elements for an output of {flat.numel()}")
            radius = p.parts["radius"]
            if not radius.numel():
                continue
            step = (radius + radius) / self.top
            q = unpack_codes(p.parts["codes"], p.numel, self.bits).to(torch.float32)
            flat.add_(q * step - radius)
        return out
