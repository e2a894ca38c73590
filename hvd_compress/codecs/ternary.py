"""Sparse ternary codecs: a few entries per tensor, each sent as a sign and decoded as +-s.

* :class:`AdaCompCodec`: AdaComp (Chen, Choi, Brand, Agrawal, Zhang, Gopalakrishnan, "AdaComp:
  Adaptive Residual Gradient Compression for Data-Parallel Distributed Training", AAAI 2018).
  The tensor is cut into bins of L elements; with g the gradient and r the residual,

      H = r + g,   gmax_b = max_{i in bin b} |H_i|,
      send i  iff  H_i != 0  and  |H_i + g_i| >= gmax_b          (|H + g| = |r + 2 g|),
      D_i = sign(H_i) s_b,   s_b = mean of |H_i| over the bin's sent entries,
      r <- H - D  (everything not sent, and the quantization error of what was sent).

  The threshold adapts by itself: a bin sends its largest residues, plus those whose latest
  gradient pushes them past the bin's maximum (``H + g``: the residue "one step ahead").
  ``H_i != 0`` keeps an all-zero bin (gmax = 0) from sending its zeros.  Bin size: L = 50 for
  convolution weights (members with 3 or more dimensions) and 500 for everything else (fully
  connected layers, embeddings, biases), the paper's L_T; ``bin_size`` fixes one L for all.
  Scale: one fp32 per bin, the least-squares value of the bin's sent entries (see
  docs/methods-sparse-adaptive.md for why per bin and what it costs).

* :class:`STCCodec`: Sparse Ternary Compression (Sattler, Wiedemann, Mueller, Samek, "Robust and
  Communication-Efficient Federated Learning from Non-IID Data", IEEE TNNLS 2019): with
  v = g + r and k = max(1, ceil(p n)),

      T = the exact top-k of |v| (ties to the lower index),   mu = (1/k) sum_{i in T} |v_i|,
      D_i = mu sign(v_i) on T, 0 elsewhere,   r <- v - D.

  Positions are sent as the gaps between them, Golomb-Rice coded with the paper's optimal
  parameter b* = 1 + floor(log2(log(phi - 1) / log(1 - p))) (phi the golden ratio; b* = 8 at
  the default p = 1/400), each code word followed by the entry's sign bit (``kernels/ternary.h``).
  An entry costs b* + 1 / (1 - (1 - p)^(2^b*)) + 1 bits on average (11.1 at p = 1/400).

Wire formats (both variable-size, gathered with the allgather route):

* AdaComp: ``indices`` int32 ascending (k), ``signs`` ceil(k / 8) bytes (bit j of byte j / 8,
  LSB first, 1 = negative), ``scales`` fp32 per bin: 4 k + ceil(k / 8) + 4 ceil(n / L) bytes.
* STC: ``bits`` the Golomb-Rice stream, ceil(total bits / 8) bytes; ``mu`` one fp32.

Both decode by summing +-s into the dense fp32 output, workers in list order.  The selection,
ternarization and error-feedback loops are C (``csrc/ternary.c``) and CUDA (``kernels/ternary.cu``)
with identical bits; STC's exact top-k is the top-k codec's (``codecs/topk.py``).  STC's stream is
written on the GPU by one thread per byte from an exclusive scan of the code lengths; it is
*read* on the host (C), since a Golomb stream's word boundaries are only known sequentially: a
CUDA decode copies the small stream to the host and the indices back.
"""
from __future__ import annotations

import ctypes
import dataclasses
import math
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

from ..backends import cpu, kernel_backend
from . import _quant as q
from .base import Codec, Payload, RandomKey
from .sign import ScaledSignCodec
from .topk import TopKCodec, _ops as _topk_ops, ceil_ratio

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
cpu.register("hvdc_adacomp_select", _P, _P, _INT, _I64, _I64, _I64, _P, _P, _P, _INT)
cpu.register("hvdc_adacomp_compact", _P, _P, _I64, _I64, _I64, _P, _P, _P, _P, _INT)
cpu.register("hvdc_ternary_finalize", _P, _P, _I64, _P, _I64, _P, _P, _INT)
cpu.register("hvdc_ternary_scatter_add", _P, _P, _I64, _P, _I64, _P)
cpu.register("hvdc_stc_encode", _P, _P, _I64, _INT, _P, _I64)
cpu.register("hvdc_stc_decode", _P, _I64, _I64, _INT, _I64, _P, _P)

#: the CUDA source of the ternary kernels
SOURCE = "ternary.cu"
_MAX_INDEX = 2 ** 31 - 1
#: the golden ratio
PHI = (1 + math.sqrt(5)) / 2


def _set_restype() -> None:
    """The two STC entry points return an int64 (every other export returns void)."""
    lib = cpu.lib()
    lib.hvdc_stc_encode.restype = ctypes.c_int64
    lib.hvdc_stc_decode.restype = ctypes.c_int64


def _call_i64(name: str, *args) -> int:
    _set_restype()
    return int(getattr(cpu.lib(), name)(*args))


def _finalize(idx: torch.Tensor, val: torch.Tensor, scales: torch.Tensor, bin_size: int,
              residual: torch.Tensor | None) -> torch.Tensor:
    """Sign bits of the k entries; with a residual, r[idx] <- val - (+-scales[idx / bin])."""
    k = idx.numel()
    signs = torch.empty(-(-k // 8), dtype=torch.uint8, device=idx.device)
    if not k:
        return signs
    kernels = kernel_backend(idx.device)
    if kernels is not None:
        kernels.launch(kernels.kernel(SOURCE, "hvdc_ternary_finalize", idx.device),
                       kernels.grid_size(signs.numel(), q.BLOCK, idx.device), q.BLOCK,
                       (idx, val, np.int64(k), scales, np.int64(bin_size), signs,
                        val if residual is None else residual, np.int32(residual is not None)))
    else:
        cpu.call("hvdc_ternary_finalize", q.ptr(idx), q.ptr(val), k, q.ptr(scales), bin_size,
                 q.ptr(signs), q.ptr(residual), int(residual is not None))
    return signs


def _scatter_add(idx: torch.Tensor, signs: torch.Tensor, scales: torch.Tensor, bin_size: int,
                 out: torch.Tensor) -> None:
    """out[idx_j] += (+-scales[idx_j / bin]) for one worker (indices distinct, checked)."""
    k = idx.numel()
    if not k:
        return
    kernels = kernel_backend(out.device)
    if kernels is not None:
        kernels.launch(kernels.kernel(SOURCE, "hvdc_ternary_scatter_add", out.device),
                       kernels.grid_size(k, q.BLOCK, out.device), q.BLOCK,
                       (idx, signs, np.int64(k), scales, np.int64(bin_size), out))
    else:
        cpu.call("hvdc_ternary_scatter_add", q.ptr(idx), q.ptr(signs), k, q.ptr(scales), bin_size,
                 q.ptr(out))


def _check_out(payloads: Sequence[Payload], out: torch.Tensor) -> tuple[int, torch.Tensor]:
    if not payloads:
        raise ValueError("decode_accumulate needs at least one payload")
    n = payloads[0].numel
    if out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != n:
        raise ValueError(f"out must be a contiguous fp32 tensor of {n} elements")
    return n, out.view(-1)


def _check_parts(w: int, p: Payload, n: int, device: torch.device,
                 expected: dict[str, tuple[torch.dtype, int | None]]) -> None:
    if p.numel != n or list(p.parts) != list(expected):
        raise ValueError(f"payload {w}: expected {n} elements with parts {list(expected)}, got "
                         f"{p.numel} elements with parts {list(p.parts)}")
    for name, (dtype, length) in expected.items():
        t = p.parts[name]
        if t.dtype != dtype or t.device != device or (length is not None and t.numel() != length):
            raise ValueError(f"payload {w}: part {name!r} must be {length} {dtype} on {device}, "
                             f"got {t.numel()} {t.dtype} on {t.device}")


@dataclasses.dataclass(frozen=True)
class AdaCompCodec(Codec):
    """AdaComp (Chen et al., AAAI 2018): per bin of L elements, the entries with H != 0 and
    |H + g| >= max_bin |H| (H = r + g) as sign bits with one fp32 scale per bin; the rest, and
    the quantization error, stays in the residual (see the module docstring).

    Args:
        bin_size: L for every tensor; None (default): L by the tensor's shape (set by the
            engine through :meth:`with_layout`): ``conv_bin_size`` for 3-D and larger
            (convolution) weights, ``fc_bin_size`` otherwise.
        conv_bin_size, fc_bin_size: the paper's L_T, 50 and 500.
    """

    bin_size: int | None = None
    conv_bin_size: int = 50
    fc_bin_size: int = 500
    #: shapes of the members in the segment (with_layout); () = one 1-D tensor
    layout: tuple = dataclasses.field(default=(), repr=False, compare=False)
    name = "adacomp"

    def __post_init__(self) -> None:
        for field in ("bin_size", "conv_bin_size", "fc_bin_size"):
            v = getattr(self, field)
            if field == "bin_size" and v is None:
                continue
            if not isinstance(v, int) or not 0 < v <= 2 ** 24:
                raise ValueError(f"{field} must be an integer in [1, 2**24], got {v!r}")

    def with_layout(self, shapes: Sequence[torch.Size]) -> "AdaCompCodec":
        """This codec for a segment holding tensors of these shapes (the bin size follows them)."""
        return dataclasses.replace(self, layout=tuple(torch.Size(s) for s in shapes))

    def bin_for(self) -> int:
        """L of this segment: ``bin_size``, else by shape (conv: 3 or more dimensions)."""
        if self.bin_size is not None:
            return self.bin_size
        conv = any(len(s) >= 3 for s in self.layout)
        return self.conv_bin_size if conv else self.fc_bin_size

    def n_bins(self, n: int) -> int:
        return -(-n // self.bin_for())

    def _encode(self, x: torch.Tensor, key: RandomKey, residual: torch.Tensor | None) -> Payload:
        n = x.numel()
        if n > _MAX_INDEX:
            raise ValueError(f"AdaComp indices are int32: {n} elements is too many, split the tensor")
        bin_size, nb, dev = self.bin_for(), self.n_bins(n), x.device
        gmax = torch.empty(nb, dtype=torch.float32, device=dev)
        counts = torch.empty(nb, dtype=torch.int64, device=dev)
        scales = torch.empty(nb, dtype=torch.float32, device=dev)
        kernels = kernel_backend(dev)
        h = x if residual is None else residual
        if nb:
            if kernels is not None:
                kernels.launch(kernels.kernel(SOURCE, "hvdc_adacomp_select", dev), kernels.grid_size(nb, q.BLOCK, dev),
                               q.BLOCK, (x, h, np.int32(residual is not None), np.int64(n), np.int64(bin_size),
                                         np.int64(nb), gmax, counts, scales))
            else:
                cpu.call("hvdc_adacomp_select", q.ptr(x), q.ptr(residual), int(residual is not None), n,
                         bin_size, nb, q.ptr(gmax), q.ptr(counts), q.ptr(scales), cpu.threads())
        offsets = torch.cumsum(counts, 0) - counts
        k = int(counts.sum()) if nb else 0                      # the host sync of the encode
        idx = torch.empty(k, dtype=torch.int32, device=dev)
        val = torch.empty(k, dtype=torch.float32, device=dev)
        if k:
            if kernels is not None:
                kernels.launch(kernels.kernel(SOURCE, "hvdc_adacomp_compact", dev), kernels.grid_size(nb, q.BLOCK, dev),
                               q.BLOCK, (x, h, np.int64(n), np.int64(bin_size), np.int64(nb), gmax, offsets,
                                         idx, val))
            else:
                cpu.call("hvdc_adacomp_compact", q.ptr(x), q.ptr(h), n, bin_size, nb, q.ptr(gmax),
                         q.ptr(offsets), q.ptr(idx), q.ptr(val), cpu.threads())
        signs = _finalize(idx, val, scales, bin_size, residual)
        return Payload(n, {"indices": idx, "signs": signs, "scales": scales})

    def decode_accumulate(self, payloads: Sequence[Payload], out: torch.Tensor) -> torch.Tensor:
        """``out[i] += +-scales[i / L]`` for every sent entry of worker 0, then 1, ...; indices
        must be strictly ascending in [0, n) (IndexError before ``out`` is touched)."""
        n, flat = _check_out(payloads, out)
        nb = self.n_bins(n)
        for w, p in enumerate(payloads):
            k = p.parts["indices"].numel() if "indices" in p.parts else 0
            _check_parts(w, p, n, out.device, {"indices": (torch.int32, None), "signs": (torch.uint8, -(-k // 8)),
                                               "scales": (torch.float32, nb)})
        _topk_ops(out.device).check([p.parts["indices"].contiguous() for p in payloads], n)
        for p in payloads:
            _scatter_add(p.parts["indices"].contiguous(), p.parts["signs"].contiguous(),
                         p.parts["scales"].contiguous(), self.bin_for(), flat)
        return out


def rice_parameter(p: float) -> int:
    """STC's optimal Golomb parameter b* = 1 + floor(log2(log(phi - 1) / log(1 - p))) for
    density p (Sattler et al. 2019), at least 0 (dense payloads: p >= 0.38 gives b* = 0)."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"density must lie in (0, 1], got {p}")
    if p >= 1.0:
        return 0
    return max(0, 1 + math.floor(math.log2(math.log(PHI - 1) / math.log1p(-p))))


def expected_bits_per_entry(p: float) -> float:
    """Average bits of an STC entry at density p with gaps geometric(p): b* + 1 for the
    remainder and the unary stop bit, (1-p)^(2^b*) / (1 - (1-p)^(2^b*)) unary ones, 1 sign bit."""
    b = rice_parameter(p)
    theta = (1.0 - p) ** (2 ** b)
    return b + 1 + theta / (1 - theta) + 1


@lru_cache(maxsize=None)
def _selector(ratio: float, sample_ratio: float) -> TopKCodec:
    """The exact top-k of the top-k codec (sampled candidates, exact result) at this density."""
    return TopKCodec(ratio=ratio, sample_ratio=sample_ratio, value_dtype=torch.float32, mode="exact")


@dataclasses.dataclass(frozen=True)
class STCCodec(Codec):
    """Sparse Ternary Compression (Sattler et al., TNNLS 2019): exact top-k, values replaced by
    mu sign(v), mu the mean |v| of the k kept entries; positions as Golomb-Rice coded gaps with
    parameter b*(p); error feedback (``residual``) keeps everything else and mu's error.

    Args:
        ratio: the sparsity p, k = max(1, ceil(p n)) entries per tensor (default 1/400: the
            paper's p = 0.0025 of its main experiments).
        sample_ratio: the threshold sample of the top-k machinery that bounds the candidates
            (the result is the exact top-k whatever the sample).

    Wire: ``bits`` (the stream), ``mu`` (one fp32).
    """

    ratio: float = 0.0025
    sample_ratio: float = 0.01
    name = "stc"

    def __post_init__(self) -> None:
        if not isinstance(self.ratio, (int, float)) or not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio must lie in (0, 1], got {self.ratio!r}")
        if not isinstance(self.sample_ratio, (int, float)) or not 0.0 < self.sample_ratio <= 1.0:
            raise ValueError(f"sample_ratio must lie in (0, 1], got {self.sample_ratio!r}")

    @property
    def rice_bits(self) -> int:
        return rice_parameter(self.ratio)

    def k(self, n: int) -> int:
        """Entries sent: k = max(1, ceil(p n)) for n > 0 (0 for n = 0)."""
        return max(1, ceil_ratio(self.ratio, n)) if n else 0

    def expected_nbytes(self, n: int) -> float:
        """Predicted wire bytes of an n-element payload (gaps geometric with density k/n)."""
        k = self.k(n)
        return k * expected_bits_per_entry(self.ratio) / 8 + 4 if n else 4

    def _encode(self, x: torch.Tensor, key: RandomKey, residual: torch.Tensor | None) -> Payload:
        n, dev = x.numel(), x.device
        if n > _MAX_INDEX:
            raise ValueError(f"STC indices are int32: {n} elements is too many, split the tensor")
        if n == 0:
            return Payload(0, {"bits": torch.empty(0, dtype=torch.uint8, device=dev),
                               "mu": torch.zeros(1, dtype=torch.float32, device=dev)})
        top = _selector(self.ratio, self.sample_ratio)
        idx, val = top._select(_topk_ops(dev), x, key, residual)      # residual <- g + r
        mu = ScaledSignCodec().local_scales(val).reshape(1)          # sum |v| / k, contract order
        _finalize(idx, val, mu, n, residual)
        i64 = idx.to(torch.int64)
        gaps = torch.diff(i64, prepend=i64.new_full((1,), -1)) - 1
        lengths = (gaps >> self.rice_bits) + (self.rice_bits + 2)
        offsets = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])
        total = int(offsets[-1])                                      # host sync: the size
        bits = torch.empty(-(-total // 8), dtype=torch.uint8, device=dev)
        kernels = kernel_backend(dev)
        if kernels is not None:
            kernels.launch(kernels.kernel(SOURCE, "hvdc_stc_pack", dev), kernels.grid_size(bits.numel(), q.BLOCK, dev),
                           q.BLOCK, (idx, val, offsets, np.int64(idx.numel()), np.int32(self.rice_bits),
                                     np.int64(bits.numel()), bits))
        else:
            _call_i64("hvdc_stc_encode", q.ptr(idx), q.ptr(val), idx.numel(), self.rice_bits,
                      q.ptr(bits), bits.numel())
        return Payload(n, {"bits": bits, "mu": mu})

    def positions(self, payload: Payload) -> tuple[torch.Tensor, torch.Tensor]:
        """(int32 indices, packed sign bits) of a payload, read from its stream on the host;
        raises ValueError when the stream does not hold k valid code words."""
        n, k = payload.numel, self.k(payload.numel)
        bits = payload.parts["bits"].detach().cpu().contiguous()
        idx = torch.empty(k, dtype=torch.int32)
        signs = torch.empty(-(-k // 8), dtype=torch.uint8)
        if k:
            bad = _call_i64("hvdc_stc_decode", q.ptr(bits), bits.numel(), k, self.rice_bits, n,
                            q.ptr(idx), q.ptr(signs))
            if bad:
                raise ValueError(f"STC payload: code word {bad - 1} of {k} runs past the "
                                 f"{bits.numel()}-byte stream or past index {n}")
        return idx, signs

    def decode_accumulate(self, payloads: Sequence[Payload], out: torch.Tensor) -> torch.Tensor:
        """``out[i] += +-mu_w`` at worker w's k positions, for w = 0, 1, ... in list order; every
        stream is read (and checked) before ``out`` is touched."""
        n, flat = _check_out(payloads, out)
        for w, p in enumerate(payloads):
            _check_parts(w, p, n, out.device, {"bits": (torch.uint8, None), "mu": (torch.float32, 1)})
        decoded = [self.positions(p) for p in payloads]
        for (idx, signs), p in zip(decoded, payloads):
            _scatter_add(idx.to(out.device), signs.to(out.device), p.parts["mu"].contiguous(), max(n, 1), flat)
        return out
