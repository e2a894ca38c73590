"""Sketched update: random rotation, optional subsampling, stochastic b-bit quantization (Konečný,
McMahan, Yu, Richtárik, Suresh, Bacon, "Federated Learning: Strategies for Improving
Communication Efficiency", 2016, section 3; the rotation as in Suresh, Yu, Kumar, McMahan,
"Distributed Mean Estimation with Limited Communication", ICML 2017).

The tensor is cut into blocks of B = min(block_size, 2^ceil(log2 n)) coordinates, the last one
padded with zeros.  Per block v (B coordinates):

    y = H D v                          D = diag(+-1) (shared key), H the Walsh-Hadamard matrix
                                       (unnormalized, H H = B I), by the fast transform
    z_q = y[sel_q], q < kB             kB = B, or with ``ratio`` < 1 the kB coordinates sel of a
                                       shared random permutation (kernels/feistel.h)
    lo = min z, hi = max z, step = (hi - lo) / (2^b - 1)
    l_q = floor(t) + Bernoulli(t - floor(t)),  t = (z_q - lo) / step     (per-rank key)
    D(C(v)) = D H y^ / kB,   y^[sel_q] = lo + l_q step (hi for l_q = 2^b - 1), 0 elsewhere

E[lo + l_q step] = z_q and P[coordinate kept] = kB / B, so E[D(C(v))] = D H (kB/B) y / kB = v:
unbiased; no error feedback.  The rotation spreads a vector's energy evenly over the block, so
the paper's uniform levels between the block's min and max waste few levels on outliers.
Levels: 2^b of them, lo and hi included and exact (b = 1 gives Konečný et al.'s {h_min,
h_max}).

Because H D is linear and the same on every rank (shared key), :meth:`SketchCodec.decode_accumulate`
sums the workers' dequantized coordinates in the rotated domain (in list order) and rotates back
once: out += D H (sum_w y^_w) / kB; its bits differ from adding separately rotated workers.

Numerics (``kernels/sketch.h``): the FWHT is m = log2 B butterfly stages h = 1, 2, ..., B/2 in
that order, each pair (a, b) -> (a + b, a - b) (no FMA); min and max are order-free (zeros are
made +0.0 first); D is the top bit of each padded coordinate's Philox word of the shared key;
the stochastic levels use the per-rank key's word of code position blk * kB + q.  The C
reference (``csrc/sketch.c``) and the CUDA kernels (``kernels/sketch.cu``, one thread block per
Hadamard block in shared memory) give identical bits.

Wire: ``codes``, b bits per kept coordinate (8/b per byte, QSGD's packing, each block's codes
starting on a byte: kB is rounded up to a multiple of 8 when there are several blocks), then
``ranges``, fp32 (lo, hi) per block: ceil(nblocks kB b / 8) + 8 nblocks bytes.  With the
default block of 1024 that is b + 1/16 bits per element, the same as QSGD's b bits with its
512-element buckets.

For the caller: the rotation and subsampling use the shared key (:meth:`with_shared_key`, the
same on every rank), the stochastic levels the per-rank key of ``encode`` (the two must differ);
payloads are fixed-size, not summable (gather them); decode needs the shared key.

Error against QSGD at the same wire bits (b + 1/16 per element), relative squared error
||D(C(v)) - v||^2 / ||v||^2 of one encoding of 2^18 elements (tests/codecs/test_sketch.py::
test_error_against_qsgd; bits 2 and 8 in docs/codecs-seed-methods.md):

    4 bits   vector              QSGD (512)   sketch (1024)   sketch without rotation
             Gaussian            1.59         0.032           0.032
             Student-t, 2 dof    0.79         0.022           0.63
             Gaussian + 0.1% of +-100 outliers
                                 0.52         0.013           1.09

Without rotation, min/max levels are as good as rotated ones on a Gaussian but an outlier
stretches its block's range; the rotation spreads it over the block (a 29-85x lower error).
QSGD's levels are fractions of the bucket's norm, coarse for every vector at these bits.
"""
from __future__ import annotations

import ctypes
import dataclasses
from typing import Sequence

import numpy as np
import torch

from ..backends import cpu, kernel_backend
from . import _quant as q
from .base import Payload, RandomKey, overflow_check
from .randk import SharedKeyCodec, random_indices
from .topk import ceil_ratio

_P, _I64, _U64, _U32, _INT = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32,
                              ctypes.c_int)
cpu.register("hvdc_sketch_encode", _P, _I64, _I64, _I64, _P, _INT, _INT, _U64, _U32, _U32, _U64, _U32,
             _U32, _P, _P, _INT)
cpu.register("hvdc_sketch_decode_acc", _P, _P, _INT, _I64, _I64, _I64, _P, _INT, _INT, _U64, _U32, _U32,
             _P, _INT)

#: the CUDA source of the sketch kernels
SOURCE = "sketch.cu"
#: HVDC_SKETCH_MAX_BLOCK of kernels/sketch.h
MAX_BLOCK = 4096
#: the sign draws (element stream) stay below the Feistel's Philox blocks (2^32 and up)
_MAX_COORDS = 1 << 34


@dataclasses.dataclass(frozen=True)
class SketchCodec(SharedKeyCodec):
    """Randomized Hadamard rotation + optional subsampling + stochastic b-bit quantization.

    Args:
        bits: bits per kept coordinate, 1, 2, 4 or 8.
        block_size: Hadamard block, a power of two in [8, 4096] (smaller tensors use the next
            power of two >= n).
        ratio: fraction of the rotated coordinates kept per block, kB = ceil(ratio * B) rounded
            up to a multiple of 8 (blocks of fewer than 8 keep all); 1 keeps all.
        rotate: False skips H D (min/max quantization of the raw coordinates, for comparison).
        shared_key: the key of the rotation and subsampling, the same on every rank.
    """

    fixed_size = True

    bits: int = 4
    block_size: int = 1024
    ratio: float = 1.0
    rotate: bool = True
    shared_key: RandomKey | None = None
    name = "sketch"

    def __post_init__(self) -> None:
        if self.bits not in (1, 2, 4, 8):
            raise ValueError(f"bits must be 1, 2, 4 or 8, got {self.bits!r}")
        b = self.block_size
        if not isinstance(b, int) or b < 8 or b > MAX_BLOCK or b & (b - 1):
            raise ValueError(f"block_size must be a power of two in [8, {MAX_BLOCK}], got {b!r}")
        if not isinstance(self.ratio, (int, float)) or not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio must lie in (0, 1], got {self.ratio!r}")

    def layout(self, n: int) -> tuple[int, int, int]:
        """(B, number of blocks, kept coordinates per block kB) of an n-element tensor."""
        if n == 0:
            return 1, 0, 1
        block = min(self.block_size, 1 << (n - 1).bit_length())
        if block < 8:
            return block, 1, block
        kept = min(block, 8 * -(-ceil_ratio(self.ratio, block) // 8))
        return block, -(-n // block), kept

    def _parts(self, n: int) -> dict[str, tuple[torch.dtype, int]]:
        _, nblocks, kept = self.layout(n)
        return {"codes": (torch.uint8, -(-nblocks * kept * self.bits // 8)),
                "ranges": (torch.float32, 2 * nblocks)}

    def payload_template(self, numel: int) -> Payload:
        return Payload(numel, {name: torch.zeros(length, dtype=dtype)
                               for name, (dtype, length) in self._parts(numel).items()})

    def _selection(self, block: int, kept: int, device: torch.device) -> torch.Tensor | None:
        return random_indices(block, kept, self._shared(), device) if kept < block else None

    def _encode(self, x: torch.Tensor, key: RandomKey, residual: torch.Tensor | None) -> Payload:
        shared = self._shared()
        if residual is not None:
            raise ValueError("SketchCodec is unbiased and has no error feedback")
        if key == shared:
            raise ValueError("SketchCodec: the per-rank key of encode must differ from the shared "
                             "key (its draws would correlate the rounding with the rotation)")
        n = x.numel()
        block, nblocks, kept = self.layout(n)
        if nblocks * block >= _MAX_COORDS:
            raise ValueError(f"SketchCodec: {n} elements is too many, split the tensor")
        parts = self._parts(n)
        codes = torch.empty(parts["codes"][1], dtype=torch.uint8, device=x.device)
        ranges = torch.empty(parts["ranges"][1], dtype=torch.float32, device=x.device)
        if n == 0:
            return Payload(0, {"codes": codes, "ranges": ranges})
        sel = self._selection(block, kept, x.device)
        kernels = kernel_backend(x.device)
        if kernels is not None:
            threads = _threads(block)
            kernels.launch(kernels.kernel(SOURCE, "hvdc_sketch_encode", x.device),
                           kernels.grid_size(nblocks * threads, threads, x.device), threads,
                           (x, np.int64(n), np.int64(block), np.int64(kept), q.dptr(sel),
                            np.int32(self.bits), np.int32(self.rotate), *q.cuda_key(shared),
                            *q.cuda_key(key), codes, ranges))
        else:
            cpu.call("hvdc_sketch_encode", q.ptr(x), n, block, kept, q.ptr(sel), self.bits,
                     int(self.rotate), shared.seed, shared.step, shared.tensor_id, key.seed, key.step,
                     key.tensor_id, q.ptr(codes), q.ptr(ranges), cpu.threads())
        lo, hi = ranges[0::2], ranges[1::2]
        finite = overflow_check(hi - lo, kernels is not None, lambda: "SketchCodec: a rotated block "
                                f"overflows fp32 (max |g| = {float(x.abs().max()):.3g})")
        return Payload(n, {"codes": codes, "ranges": ranges}, finite)

    def decode_accumulate(self, payloads: Sequence[Payload], out: torch.Tensor) -> torch.Tensor:
        """``out += D H (y^_0 + y^_1 + ...) / kB`` per block: the workers' dequantized coordinates
        summed in list order in the rotated domain, rotated back once.  Needs the shared key the
        payloads were encoded with."""
        n = payloads[0].numel if payloads else 0
        shared = self._shared()
        flat = q.accumulate_target(payloads, out, self._parts(n))
        if n == 0:
            return out
        block, nblocks, kept = self.layout(n)
        sel = self._selection(block, kept, flat.device)
        kernels = kernel_backend(flat.device)
        codes = q.ptr_array([p.parts["codes"] for p in payloads], kernels)
        ranges = q.ptr_array([p.parts["ranges"] for p in payloads], kernels)
        if kernels is not None:
            threads = _threads(block)
            kernels.launch(kernels.kernel(SOURCE, "hvdc_sketch_decode_acc", flat.device),
                           kernels.grid_size(nblocks * threads, threads, flat.device), threads,
                           (codes, ranges, np.int32(len(payloads)), np.int64(n), np.int64(block),
                            np.int64(kept), q.dptr(sel), np.int32(self.bits), np.int32(self.rotate),
                            *q.cuda_key(shared), flat))
        else:
            cpu.call("hvdc_sketch_decode_acc", codes, ranges, len(payloads), n, block, kept, q.ptr(sel),
                     self.bits, int(self.rotate), shared.seed, shared.step, shared.tensor_id,
                     q.ptr(flat), cpu.threads())
        return out


def _threads(block: int) -> int:
    """Threads of the CUDA block that transforms one Hadamard block: 4 coordinates each, whole
    warps, at most 256 (SKETCH_THREADS of kernels/sketch.cu)."""
    return min(256, max(32, block // 4))
