"""Plumbing shared by the quantizing codecs (TernGrad, QSGD, stochastic fp16): C signatures,
CUDA launch helpers, argument checks.  The numerics live in ``kernels/quant.h``."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
import torch

from ..backends import cpu
from .base import Payload, RandomKey, check_segments

_P, _I64, _U64, _U32, _INT, _F32 = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32,
                                    ctypes.c_int, ctypes.c_float)
cpu.register("hvdc_tern_scales", _P, _P, _I64, _I64, _F32, _P, _P, _INT)
cpu.register("hvdc_tern_encode", _P, _P, _I64, _I64, _P, _U64, _U32, _U32, _P, _INT)
cpu.register("hvdc_tern_decode_acc", _P, _P, _INT, _I64, _I64, _P, _INT)
cpu.register("hvdc_tern_encode_many", _P, _P, _I64, _P, _F32, _U64, _U32, _P, _P, _P, _P, _INT)
cpu.register("hvdc_tern_decode_many", _P, _P, _INT, _I64, _P, _P, _INT)
cpu.register("hvdc_qsgd_encode", _P, _P, _I64, _I64, _INT, _INT, _U64, _U32, _U32, _P, _P, _INT)
cpu.register("hvdc_qsgd_decode_acc", _P, _P, _INT, _I64, _I64, _INT, _P, _INT)
cpu.register("hvdc_fp16sr_encode", _P, _P, _I64, _U64, _U32, _U32, _P, _INT)
cpu.register("hvdc_fp16_decode_acc", _P, _INT, _I64, _P, _INT)

#: the CUDA source of every quantizer kernel (kernels/quantizers.cu)
SOURCE = "quantizers.cu"
#: HVDC_SUM_CHUNK of kernels/hvdc_common.h: long sums go by chunks of this many elements
SUM_CHUNK = 8192
#: threads per block of the element-wise kernels (one thread per 4 elements) and of the
#: warp-per-segment kernels (8 warps)
BLOCK = 256


def check_bucket(bucket_size: int | None, allow_none: bool) -> int | None:
    """A bucket holds whole Philox blocks and whole code bytes: a positive multiple of 4."""
    if bucket_size is None and allow_none:
        return None
    if not isinstance(bucket_size, int) or bucket_size <= 0 or bucket_size % 4:
        raise ValueError(f"bucket_size must be a positive multiple of 4, got {bucket_size!r}")
    return bucket_size


def n_buckets(n: int, bucket: int) -> int:
    return -(-n // bucket)


def ptr(t: torch.Tensor | None) -> ctypes.c_void_p | None:
    """C pointer of a contiguous CPU tensor, NULL for None."""
    return None if t is None else cpu.ptr(t)


def ptr_array(tensors: Sequence[torch.Tensor], kernels=None):
    """Addresses of per-worker buffers: a ctypes array for the C library (``kernels`` None), else
    the kernel backend's pointer array (an int64 tensor of device addresses)."""
    if kernels is None:
        return (ctypes.c_void_p * len(tensors))(*(cpu.ptr(t).value for t in tensors))
    return kernels.ptr_array(tensors)


def dptr(t: torch.Tensor | None):
    """A tensor for a kernel argument, or a null pointer for an optional one."""
    return np.uint64(0) if t is None else t


def cuda_key(key: RandomKey) -> tuple:
    return np.uint64(key.seed), np.uint32(key.step), np.uint32(key.tensor_id)


def grid(items: int, per_block: int) -> int:
    return max(1, -(-items // per_block))


def accumulate_target(payloads: Sequence[Payload], out: torch.Tensor,
                      expected: dict[str, tuple[torch.dtype, int]]) -> torch.Tensor:
    """Check ``out`` (contiguous fp32, the payloads' dense size, their device) and that every
    payload has exactly the parts ``expected`` (name -> dtype, length): the kernels trust them.
    Returns the flat view of ``out``."""
    if not payloads:
        raise ValueError("decode_accumulate needs at least one payload")
    n = payloads[0].numel
    if out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != n:
        raise ValueError(f"out must be a contiguous fp32 tensor of {n} elements")
    for w, p in enumerate(payloads):
        if p.numel != n or list(p.parts) != list(expected):
            raise ValueError(f"payload {w}: expected {n} elements with parts {list(expected)}, got "
                             f"{p.numel} elements with parts {list(p.parts)}")
        for name, (dtype, length) in expected.items():
            t = p.parts[name]
            if (t.dtype != dtype or t.numel() != length or t.device != out.device
                    or not t.is_contiguous()):
                raise ValueError(f"payload {w}: part {name!r} must be {length} contiguous {dtype} on "
                                 f"{out.device}, got {t.numel()} {t.dtype} on {t.device}")
    return out.view(-1)


def check_residual(flat: torch.Tensor, residual: torch.Tensor | None, name: str) -> torch.Tensor | None:
    """The checks ``Codec.encode`` applies to a residual, for entry points beside ``encode``."""
    if residual is None:
        return None
    if residual.dtype != torch.float32 or residual.numel() != flat.numel() \
            or residual.device != flat.device or not residual.is_contiguous():
        raise ValueError(f"{name}: residual must be a contiguous fp32 tensor of {flat.numel()} "
                         f"elements on {flat.device}")
    return residual.view(-1)


#: columns of a segment table (kernels/hvdc_common.h): offset, n, first chunk of SUM_CHUNK
#: elements, first 4-element block (= first 2-bit code byte), first byte of 1-bit codes, first
#: thread of its warp-aligned range (ceil(n / 32) warps per tensor), first of the codec's items
OFFSET, N, CHUNK, BLOCK4, BYTE8, SLOT32, ITEM = range(7)
#: per column: elements per unit, and the column's count per unit
_UNITS = {CHUNK: (SUM_CHUNK, 1), BLOCK4: (4, 1), BYTE8: (8, 1), SLOT32: (32, 32)}


@dataclass(frozen=True)
class SegmentTable:
    """The table of a bucket layout (int64 [nseg, 7], the columns above) for the calls that take
    all its tensors at once (``hvdc_*_many``, the ``hvdc_seg_*`` kernels), built once per layout
    and device; ``bounds[col]``: each tensor's first in that column, then the total."""
    seg: torch.Tensor
    bounds: dict[int, tuple[int, ...]]

    def total(self, col: int) -> int:
        return self.bounds[col][-1]


@lru_cache(maxsize=256)
def segment_table(layout: tuple[tuple[int, int], ...], device: torch.device,
                  items: tuple[int, ...] | None = None) -> SegmentTable:
    """The table of the tensors ``layout`` (offset, n), ``items`` the codec's own count per tensor
    (random-k's k; default none)."""
    bounds = {col: [0] for col in (*_UNITS, ITEM)}
    rows = []
    for j, (offset, n) in enumerate(layout):
        rows.append([offset, n, *(bounds[col][-1] for col in (*_UNITS, ITEM))])
        for col, (unit, count) in _UNITS.items():
            bounds[col].append(bounds[col][-1] + count * -(-n // unit))
        bounds[ITEM].append(bounds[ITEM][-1] + (items[j] if items else 0))
    return SegmentTable(torch.tensor(rows, dtype=torch.int64, device=device),
                        {col: tuple(b) for col, b in bounds.items()})


def batchable(sizes: Sequence[int], bucket_size: int | None) -> bool:
    """Whether tensors of these sizes go through the batched calls of a per-tensor-scaled codec:
    several, one scale per tensor (no ``bucket_size``), none empty, none whose long sums need a
    second reduction level (over SUM_CHUNK^2 = 2^26 elements: the kernels reduce once)."""
    return len(sizes) > 1 and bucket_size is None and all(0 < n <= SUM_CHUNK ** 2 for n in sizes)


def tiled(layout: Sequence[tuple]) -> bool:
    """Whether the segments (offset, numel, ...) follow each other without gaps."""
    return all(a[0] + a[1] == b[0] for a, b in zip(layout, layout[1:]))


def decode_target(payloads: Sequence[Sequence[Payload]], out: torch.Tensor, segments: Sequence[tuple],
                  parts: Callable[[int], dict[str, tuple[torch.dtype, int]]]) -> torch.Tensor:
    """The batched decodes' checks, all before anything is written: ``out`` contiguous fp32, the
    segments (offset, numel, ...) inside it and apart, one payload list per segment and every
    payload with the ``parts(numel)`` of its segment (:func:`accumulate_target`).  Returns the
    flat view of ``out``."""
    check_segments(out, None, segments, "out")
    if len(payloads) != len(segments):
        raise ValueError(f"{len(payloads)} payload lists for {len(segments)} segments")
    flat = out.view(-1)
    for (o, n, *_), ps in zip(segments, payloads):
        accumulate_target(ps, flat[o:o + n], parts(n))
    return flat
