"""The random stream of the codecs: Philox4x32-10 keyed by :class:`RandomKey`.

Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC11)
is a counter-based generator: a bijection of a 128-bit counter c = (c0, c1, c2, c3), keyed by
k = (k0, k1), made of 10 rounds

    (c0, c1, c2, c3) <- (hi(M1 c2) ^ c1 ^ k0,  lo(M1 c2),  hi(M0 c0) ^ c3 ^ k1,  lo(M0 c0))

with M0 = 0xD2511F53, M1 = 0xCD9E8D57 and the key bumped by (0x9E3779B9, 0xBB67AE85) between
rounds (hi/lo: upper/lower 32 bits of the 64-bit product).  It is the generator of cuRAND and
PyTorch, passes BigCrush, and needs no state: any draw is computed directly from its counter.

The stream of one tensor at one step (``kernels/hvdc_common.h``, ``hvdc_stream_block``): element
i takes word i mod 4 of Philox((i div 4 as 64 bits, step, tensor_id), seed), so draws are a pure
function of (seed, step, tensor_id, i), the same on CPU and GPU and for any thread layout.
"""
from __future__ import annotations

import ctypes

import numpy as np
import torch

from ..backends import cpu, kernel_backend
from .base import RandomKey

#: Threads per CUDA block of ``hvdc_stream_u32`` (each thread makes 4 words per Philox call).
_BLOCK = 256


def philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """Philox4x32-10 of one 128-bit ``counter`` (4 words) under ``key`` (2 words), computed by
    the C reference (``hvdc_philox4x32_10``); the function the Random123 known-answer vectors
    check."""
    words = (*counter, *key)
    if len(counter) != 4 or len(key) != 2 or not all(0 <= w < 2 ** 32 for w in words):
        raise ValueError("philox4x32_10 needs 4 counter words and 2 key words in [0, 2**32)")
    ctr = (ctypes.c_uint32 * 4)(*counter)
    out = (ctypes.c_uint32 * 4)()
    cpu.call("hvdc_philox_kat", ctypes.cast(ctr, ctypes.c_void_p), key[0], key[1],
             ctypes.cast(out, ctypes.c_void_p))
    return tuple(out)


def random_u32(n: int, key: RandomKey = RandomKey(), device: torch.device | str = "cpu") -> torch.Tensor:
    """The first ``n`` words of the stream of ``key``, as an int32 tensor holding the raw 32-bit
    patterns (``.view(torch.uint32)`` or ``& 0xFFFFFFFF`` recovers the unsigned values).

    On the CPU the C reference fills it (``hvdc_stream_u32``, OpenMP); on a CUDA device (or the
    CPU inside ``backends.emulate()``) the kernel of ``kernels/rng.cu``, on torch's current
    stream.  Both give identical bits.  Word i
    does not depend on ``n`` (a longer stream extends a shorter one).
    """
    if n < 0:
        raise ValueError(f"random_u32: n={n} must be >= 0")
    device = torch.device(device)
    out = torch.empty(n, dtype=torch.int32, device=device)
    kernels = kernel_backend(device)
    if kernels is not None:
        fn = kernels.kernel("rng.cu", "hvdc_stream_u32", device)
        grid = kernels.grid_size((n + 3) // 4, _BLOCK, device)
        kernels.launch(fn, grid, _BLOCK, (out, np.int64(n), np.uint64(key.seed),
                                          np.uint32(key.step), np.uint32(key.tensor_id)))
    elif device.type == "cpu":
        cpu.call("hvdc_stream_u32", cpu.ptr(out, torch.int32), n, key.seed, key.step,
                 key.tensor_id, cpu.threads())
    else:
        raise ValueError(f"random_u32: unsupported device {device}")
    return out


_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """SplitMix64's finalizer (Steele, Lea, Flood 2014): a bijection of 64-bit integers."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def rank_seed(seed: int, rank: int) -> int:
    """The Philox key of ``rank``: independent streams per rank, reproducible per (seed, world)."""
    return splitmix64((seed + (rank + 1) * 0x9E3779B97F4A7C15) & _MASK64)
