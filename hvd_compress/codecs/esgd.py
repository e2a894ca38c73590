"""eSGD's element-wise step (Tao & Li, "eSGD: Communication Efficient Distributed Deep Learning on
the Edge", HotEdge 2018; the method is :class:`~hvd_compress.methods.ESGD`): the momentum
residual, its threshold test and the weighted selection keys, as one kernel (``kernels/esgd.cu``)
with a bit-identical C reference (``csrc/esgd.c``); the formulas are in ``kernels/esgd.h``.

Per element i of a bucket, with the worker's gradient g, residual r, importance H:

    a_i = r_i * beta + g_i,          over_i = |a_i| > threshold,
    key_i = log2~(u_i) / (1 + H_i),  u_i = (2 (w_i >> 9) + 1) 2^-24,

w_i the i-th word of the Philox stream of the worker's key (:func:`~hvd_compress.codecs.rng.random_u32`).
**The draw.**  The k largest keys are eSGD's weighted selection: -ln(u_i) / w_i ~ Exp(w_i) for
w_i = 1 + H_i, so the largest key is element i with probability w_i / sum_j w_j and the k largest
are k successive draws without replacement, each proportional to w among the elements not yet
drawn (Efraimidis & Spirakis, "Weighted random sampling with a reservoir", IPL 2006).  log2~ is
a fixed polynomial evaluation in IEEE fp32 (+ - * / on the exponent and mantissa of u; no libm),
so the keys, hence the selection, are the same bits on the CPU and the GPU; it departs from log2
by less than 2^-21 relatively and u has 2^23 levels (tests/codecs/test_esgd.py: chi-square of the draws
against the weights).  The selection of the k largest keys (a sort, not element-wise) stays a torch
stable sort, ties to the lower index, exact on any device.
"""
from __future__ import annotations

import ctypes

import numpy as np
import torch

from ..backends import cpu, kernel_backend
from . import _quant as q
from .base import RandomKey
from .rng import random_u32

_P, _I64, _U64, _U32, _INT, _F32 = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32,
                                    ctypes.c_int, ctypes.c_float)
cpu.register("hvdc_esgd_step", _P, _P, _P, _I64, _F32, _F32, _U64, _U32, _U32, _P, _P, _P, _INT)

#: the CUDA source of the eSGD kernel
SOURCE = "esgd.cu"


def momentum_step(g: torch.Tensor, r: torch.Tensor, importance: torch.Tensor, beta: float,
                  threshold: torch.Tensor, key: RandomKey | None,
                  a: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``a <- r * beta + g`` (fp32, two roundings); returns (the selection keys, or None without
    ``key``; the bool flags |a_i| > threshold).  ``g``, ``r``, ``importance``, ``a``: contiguous
    fp32 vectors of one length on one device; ``threshold``: one fp32 element there."""
    n, device = g.numel(), g.device
    for name, t in (("r", r), ("importance", importance), ("a", a)):
        if t.dtype != torch.float32 or t.numel() != n or t.device != device or not t.is_contiguous():
            raise ValueError(f"eSGD step: {name} must be a contiguous fp32 tensor of {n} elements on {device}")
    keys = torch.empty(n, dtype=torch.float32, device=device) if key is not None else None
    over = torch.empty(n, dtype=torch.uint8, device=device)
    if n:
        seed, step, tid = (key.seed, key.step, key.tensor_id) if key is not None else (0, 0, 0)
        kernels = kernel_backend(device)
        if kernels is not None:
            kernels.launch(kernels.kernel(SOURCE, "hvdc_esgd_step", device),
                           kernels.grid_size(-(-n // 4), q.BLOCK, device), q.BLOCK,
                           (g, r, importance, np.int64(n), np.float32(beta), threshold.reshape(1),
                            np.uint64(seed), np.uint32(step), np.uint32(tid), a, q.dptr(keys), over))
        else:
            cpu.call("hvdc_esgd_step", q.ptr(g), q.ptr(r), q.ptr(importance), n, beta, float(threshold),
                     seed, step, tid, q.ptr(a), q.ptr(keys), q.ptr(over), cpu.threads())
    return keys, over.view(torch.bool)


def uniform(n: int, key: RandomKey, device: torch.device | str = "cpu") -> torch.Tensor:
    """u_i = (2 (w_i >> 9) + 1) 2^-24 in (0, 1) in plain torch, from the first n words w_i of the
    stream of ``key`` (24 significant bits: exact in fp32)."""
    words = random_u32(n, key, device).to(torch.int64) & 0xFFFFFFFF
    return ((words >> 9) * 2 + 1).to(torch.float32) * 2.0 ** -24


def log2_torch(u: torch.Tensor) -> torch.Tensor:
    """log2~ of ``kernels/esgd.h`` in plain torch fp32 ops (the same operations, in order)."""
    bits = u.view(torch.int32)
    e = (bits >> 23) - 127
    m = ((bits & 0x007FFFFF) | 0x3F800000).view(torch.float32)
    big = m > 1.41421356
    m = torch.where(big, m * 0.5, m)
    e = e + big.to(torch.int32)
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    p = s2 * 0.111111111 + 0.142857143
    p = p * s2 + 0.2
    p = p * s2 + 0.333333333
    p = p * s2 + 1.0
    return e.to(torch.float32) + ((s + s) * p) * 1.44269504


def keys_torch(n: int, key: RandomKey, importance: torch.Tensor) -> torch.Tensor:
    """The selection keys in plain torch: log2~(u) / (1 + H)."""
    return log2_torch(uniform(n, key, importance.device)) / (1.0 + importance)
