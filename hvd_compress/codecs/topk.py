"""Top-k sparsification with sampled thresholds and fused error feedback.

Three selection rules share one machinery (count levels, order-preserving compaction):

* ``mode="sampled"`` (default): Deep Gradient Compression (Lin et al., ICLR 2018) and Gradient
  Dropping (Aji & Heafield, EMNLP 2017).  With g' = g + r (error feedback) and
  k = max(1, ceil(ratio * n)):

  1. sample |g'| with stride s from a random start (below), m = floor(n / s) samples;
  2. thr = the t-th largest sample, t = ceil(ratio * m) (with ``exact_k``, t = min(m,
     ceil(1.25 ceil(ratio * m))): see below);
  3. levels thr_l = thr * fl32(0.8^l), l = 0..7 (DGC's "thr *= 0.8, select again" rounds);
     take the first level with count >= lo = ceil(0.8 k) (the last level if none);
  4. if its count is at most hi = floor(1.3 k): send every |g'_i| >= that level;
  5. otherwise (one round overshot, or thr itself selects more than hi): levels above thr,
     thr * 1.25^u (u = 1..8), are counted too; with t_a the lowest level whose count C_a <= hi
     (the one above the chosen level; +inf if none fits), send every |g'_i| >= t_a and then the
     entries of the band t_{a+1} <= |g'_i| < t_a in ascending index order until max(C_a, k)
     are sent.  Every sent entry is within a factor 1.25 of every unsent one's magnitude,
     except when even thr * 1.25^8 selects more than hi (a sample far below the k-th largest,
     such as a sample of zeros on a sparse gradient): then the first k entries >= thr * 1.25^8
     in index order are sent.  What is not sent stays in the residual;
  6. compact the selected (index, g'_i) in ascending index order.

  So the count lies in [0.8k, 1.3k] unless even thr * 0.8^7 selects fewer than 0.8k (then all
  of those are sent).  The choice is a function of the level counts only (:func:`_choose`,
  device ops), so **on a device nothing is read on the host**: the count pass counts all
  sixteen levels, the choice and the scans stay on the device, and the payload has a fixed
  capacity of hi entries, the unused tail padded with index n and value 0 (sent, ignored by
  decoding).  On the CPU the count pass counts thr only (keeping its candidates), all sixteen
  only when that count is out of [lo, hi], and the payload holds exactly the sent entries: the
  same entries, bit for bit.  The GPU reads the tensor twice (count, compact), the CPU once in
  the common case.  Zeros are never sent (levels are clamped to >= 2^-149): an all-zero
  gradient gives an empty payload (all padding on a device).

* ``mode="exact"``: exact top-k by magnitude (Dryden et al., MLHPC 2016): the levels are the
  eight below thr plus a last level 0 (every element), thr is aimed at ~1.25 k candidates
  (t = min(m, ceil(1.25 ceil(ratio * m))) in step 2), the first level with count >= k is
  compacted and, with more than k candidates, the exact top-k of them by |g'| is kept, ties to
  the lower index: identical to a full sort whatever thr is (the candidates always hold every
  |g'| >= the k-th largest).  With fewer than k nonzeros the lowest-index zeros fill up.
  ``exact_k=True`` in the sampled mode is this mode.  The candidate count sizes the payload, so
  this mode reads it on the host (on a device too).

* ``mode="threshold"``: fixed threshold (Strom, Interspeech 2015): send every |g'| >= tau,
  tau = fl32(``threshold``); the count is whatever it is (0 allowed, read on the host).

Threshold sample: want = min(n, max(ceil(sample_ratio * n), ceil(64 / ratio))) samples (at
least 64 expected above the threshold, so its rank is off by ~1/8 at most typically); stride
s = 32 q + 1 with q = floor((n - want) / (32 want)) (DGC's "multiple of 32, plus 1": never in
step with power-of-two tensor shapes; s = 1 samples everything), m = floor(n / s) >= want;
start = floor(u * s / 2^32), u = word 0 of the RandomKey's Philox stream, so positions
start + j s, j < m, all lie in [0, n) (``kernels/topk.h``).

Error feedback (on by default in ``hvd_compress.methods.TopK``):
g' = g + r;  payload = C(g');  r <- g' - D(C(g')), i.e. r = g' except at the sent entries, where
r = 0 for fp32 values and r = g' - fp16(g') for fp16 values (fp16: round to nearest even,
saturated at +-65504).  g' - fp16(g') is exact in fp32, so g + r_old = D(C(g')) + r_new holds
exactly, except at a saturated fp16 entry (|g'| > 65504), whose r = fl32(g' -+ 65504) is rounded.

Wire format: ``indices`` int32, strictly ascending in [0, n), then (device payloads of the
sampled mode) padding entries of index n; ``values`` fp16 or fp32: 6 or 8 bytes per entry.
:meth:`TopKCodec.decode_accumulate` adds workers in list order, skipping padding; the CPU path
(``csrc/topk.c``) and the CUDA path (``kernels/topk.cu``) give identical bits.
"""
from __future__ import annotations

import ctypes
import dataclasses
import math
from fractions import Fraction
from functools import lru_cache, partial
from itertools import accumulate
from typing import Sequence

import numpy as np
import torch

from ..backends import cpu, cuda, kernel_backend
from .base import Codec, Payload, RandomKey, check_segments, device_constant

_P, _I64, _U64, _U32, _INT = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32,
                              ctypes.c_int)
cpu.register("hvdc_topk_sample", _P, _P, _INT, _P, _I64, _I64, _U64, _U32, _U32, _INT)
cpu.register("hvdc_topk_count", _P, _P, _INT, _I64, _P, _INT, _P, _INT, _P, _P, _I64, _P, _INT)
cpu.register("hvdc_topk_compact", _P, _I64, _P, _P, _I64, _P, _P, _INT, _P, _P, _P, _I64, _P, _P, _P, _INT)
cpu.register("hvdc_topk_finalize", _P, _P, _I64, _I64, _P, _INT, _P, _INT, _INT)
cpu.register("hvdc_topk_check", _P, _I64, _I64, _INT, _P)
cpu.register("hvdc_topk_scatter_add", _P, _P, _INT, _I64, _I64, _P, _INT)
cpu.register("hvdc_topk_normalize", _P, _I64, _P, _P, _INT)
cpu.register("hvdc_topk_decode_many", _INT, _P, _P, _P, _P, _P, _P, _P, _P, _P, _INT)
cpu.register("hvdc_topk_select_many", _P, _P, _INT, _INT, _P, _U64, _U32, _P, _P, _P, _P, _P, _P, _P,
             _P, _P, _P, _P, _INT)
cpu.register("hvdc_topk_compact_many", _P, _P, _INT, _INT, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P,
             _P, _P, _INT, _INT)

#: levels above the sampled threshold: thr * 1.25^u, u = _UP .. 1 (1.25^u is exact in fp32)
_UP = 8
#: the threshold levels, highest first: thr * 1.25^u (u = 8..1), then thr * fl32(0.8^l) (l < 8),
#: each one fp32 product.  The exact and threshold modes use the lower eight only.
_LEVEL_FACTORS = tuple(1.25 ** u for u in range(_UP, 0, -1)) + tuple(0.8 ** l for l in range(8))
#: smallest positive fp32 (subnormal): the floor of every variable-mode level, so 0 is never sent.
_SMALLEST = 2.0 ** -149
#: the threshold sample has at least this many elements expected above the threshold.
_SAMPLE_TOP = 64
#: CPU candidate buffers hold up to this many times k elements (at thr) in all.
_CPU_BUFFER = 2
_MAX_INDEX = 2 ** 31 - 1


@lru_cache(maxsize=4096)
def ceil_ratio(ratio: float, n: int) -> int:
    """ceil(ratio * n), reading ``ratio`` as the decimal it prints as (0.07 * 100 -> 7, not the
    8 that binary 0.07000000000000000666 would give)."""
    return math.ceil(Fraction(str(float(ratio))) * n)


@lru_cache(maxsize=4096)
def sample_plan(n: int, ratio: float, sample_ratio: float) -> tuple[int, int]:
    """(stride, number of samples) of the threshold sample of an n-element tensor (module doc)."""
    want = min(n, max(ceil_ratio(sample_ratio, n), math.ceil(_SAMPLE_TOP / Fraction(str(ratio)))))
    stride = 32 * ((n - want) // (32 * want)) + 1
    return stride, n // stride


def kth_largest(a: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest element of a 1-D tensor (0-dim tensor, no host sync): torch.topk from
    the nearer end, which is much faster than torch.kthvalue on the CPU.  Values are exact."""
    if 2 * k <= a.numel():
        return torch.topk(a, k, sorted=False).values.min()
    return torch.topk(a, a.numel() - k + 1, largest=False, sorted=False).values.max()


def top_k_by_magnitude(idx: torch.Tensor, val: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k entries of largest |val|, ties to the lower index, kept in their (ascending) order.
    With T the k-th largest |val|: every |val| > T, then the first k - #{|val| > T} with |val| == T.
    Torch ops only, all exact (comparisons, integer cumsum), so CPU and GPU agree."""
    a = val.abs()
    t = kth_largest(a, k)
    above, tied = a > t, a == t
    keep = above | (tied & (torch.cumsum(tied, 0) <= k - above.sum()))
    return idx[keep], val[keep]


class TopKCodec(Codec):
    """Top-k / DGC / threshold sparsifier (see the module docstring for the exact rules).

    Args:
        ratio: fraction of elements to send, k = max(1, ceil(ratio * n)) (modes sampled, exact).
        sample_ratio: fraction of elements in the threshold sample (at least 64 / ratio of them).
        value_dtype: torch.float16 (6 bytes per element on the wire) or torch.float32 (8 bytes).
        exact_k: send exactly k elements (default False; True for mode="exact").
        mode: "sampled" (DGC), "exact" (Dryden et al.), "threshold" (Strom).
        threshold: tau of mode="threshold" (> 0).
    """

    name = "topk"

    def __init__(self, ratio: float = 0.01, sample_ratio: float = 0.01,
                 value_dtype: torch.dtype = torch.float16, exact_k: bool | None = None,
                 mode: str = "sampled", threshold: float | None = None) -> None:
        if mode not in ("sampled", "exact", "threshold"):
            raise ValueError(f"mode must be 'sampled', 'exact' or 'threshold', got {mode!r}")
        if not 0.0 < ratio <= 1.0 or not 0.0 < sample_ratio <= 1.0:
            raise ValueError(f"ratio={ratio} and sample_ratio={sample_ratio} must lie in (0, 1]")
        if value_dtype not in (torch.float16, torch.float32):
            raise ValueError(f"value_dtype must be torch.float16 or torch.float32, got {value_dtype}")
        if mode == "threshold":
            if threshold is None or not 0.0 < threshold < math.inf or exact_k:
                raise ValueError("mode='threshold' needs a finite threshold > 0 and no exact_k")
        elif threshold is not None:
            raise ValueError(f"threshold is only for mode='threshold', not {mode!r}")
        if mode == "exact" and exact_k is False:
            raise ValueError("mode='exact' always sends exactly k elements")
        self.ratio = float(ratio)
        self.sample_ratio = float(sample_ratio)
        self.value_dtype = value_dtype
        self.mode = mode
        self.exact_k = mode == "exact" or bool(exact_k)
        self.threshold = threshold

    def k(self, n: int) -> int:
        """Target count k = max(1, ceil(ratio * n)) for n > 0 (0 for n = 0)."""
        return max(1, ceil_ratio(self.ratio, n)) if n else 0

    def _encode(self, x: torch.Tensor, key: RandomKey, residual: torch.Tensor | None) -> Payload:
        n = x.numel()
        if n > _MAX_INDEX:
            raise ValueError(f"top-k indices are int32: {n} elements is too many, split the tensor")
        ops = _ops(x.device)
        if n == 0:
            idx, val = torch.empty(0, dtype=torch.int32, device=x.device), x
        else:
            idx, val = self._select(ops, x, key, residual)
        values = torch.empty(idx.numel(), dtype=self.value_dtype, device=x.device)
        if idx.numel():
            ops.finalize(idx, val, values, residual, n)
        return Payload(n, {"indices": idx, "values": values})

    def unpadded(self, payload: Payload) -> Payload:
        idx = payload.parts["indices"]
        c = int((idx < payload.numel).sum())
        return Payload(payload.numel, {"indices": idx[:c], "values": payload.parts["values"][:c]})

    def count_range(self, n: int) -> tuple[int, int]:
        """[lo, hi] of the count the level rule aims at: [ceil(0.8 k), floor(1.3 k)], or [k, k]
        when exactly k are sent."""
        k = self.k(n)
        return (k, k) if self.exact_k else (-(-4 * k // 5), 13 * k // 10)

    def sample_row(self, n: int) -> tuple[int, int, int, int]:
        """(k, stride, m, t) of an n-element tensor: its target count, its threshold sample's
        stride and size, and the sample rank of thr (none for a fixed threshold)."""
        k = self.k(n)
        if self.mode == "threshold" or not n:
            return k, 1, 0, 0
        stride, m = sample_plan(n, self.ratio, self.sample_ratio)
        t = ceil_ratio(self.ratio, m)
        return k, stride, m, min(m, -(-5 * t // 4)) if self.exact_k else t

    def capacity(self, n: int) -> int:
        """The most entries an n-element payload holds: floor(1.3 k) in the sampled mode (a
        device payload's fixed size), k when exactly k are sent, n for a fixed threshold."""
        return n if self.mode == "threshold" else self.count_range(n)[1]

    def _select(self, ops: "type[_CpuOps] | _CudaOps", x: torch.Tensor, key: RandomKey,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Selected (indices, fp32 g' values), ascending; updates residual to g + r.  On a device
        the sampled mode's are padded to :meth:`capacity` with index n (value 0)."""
        if not ops.host:
            idx, val, _ = ops.select_many(self, x, [(0, x.numel(), key)], residual)
            return idx, val
        n, (k, stride, m, t) = x.numel(), self.sample_row(x.numel())
        src = residual if residual is not None else x
        if self.mode == "threshold":
            levels = device_constant((self.threshold,), torch.float32, x.device)
        else:
            thr = kth_largest(ops.sample(x, residual, stride, m, key), t)
            factors = _LEVEL_FACTORS[_UP:] if self.exact_k else _LEVEL_FACTORS
            levels = torch.clamp_min(thr * device_constant(factors, torch.float32, x.device), _SMALLEST)
            if self.exact_k:
                levels = torch.cat([levels, levels.new_zeros(1)])
        if self.mode == "sampled" and not self.exact_k:
            return self._select_bounded(ops, x, src, residual, levels, k)
        # exact and threshold modes: the count sizes the payload (read on the host)
        lo = self.count_range(n)[0]
        counts, scratch = ops.count(x, residual, levels[:1], k)
        totals = counts.sum(1).tolist()
        if totals[0] < lo and levels.numel() > 1:               # DGC's further rounds
            more, scratch = ops.count(src, None, levels[1:], 0)
            counts = torch.cat([counts, more])
            totals += more.sum(1).tolist()
        level = next((l for l, c in enumerate(totals) if c >= lo), len(totals) - 1)
        thr = levels[level:level + 1]
        idx, val = ops.compact(src, (thr, thr), (_scan(counts[level]), None), 0,
                               totals[level], scratch)
        if self.mode != "threshold" and totals[level] > k:
            idx, val = top_k_by_magnitude(idx, val, k)
        return idx, val

    def _select_bounded(self, ops: type[_CpuOps], x: torch.Tensor, src: torch.Tensor,
                        residual: torch.Tensor | None, levels: torch.Tensor,
                        k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampled mode on the host: the count at thr first (with its candidate buffer), all
        sixteen levels and :func:`_choose` only when that count is out of [lo, hi]."""
        lo, hi = self.count_range(x.numel())
        counts, scratch = ops.count(x, residual, levels[_UP:_UP + 1], k)
        total = int(counts.sum())
        if lo <= total <= hi:                                   # the common case: one pass
            thr = levels[_UP:_UP + 1]
            return ops.compact(src, (thr, thr), (_scan(counts[0]), None), 0, total, scratch)
        counts, scratch = ops.count(src, None, levels, 0)
        ext = torch.cat([counts.new_zeros(1, counts.shape[1]), counts])      # row 0: level +inf
        a, c, budget = (int(v) for v in _choose(ext.sum(1)[None], _i64([lo]), _i64([hi]), _i64([k])))
        pair = torch.tensor([a, min(a + 1, ext.shape[0] - 1)])
        rows = ext.index_select(0, pair)
        thresholds = torch.cat([device_constant((math.inf,), torch.float32, x.device), levels]).index_select(0, pair)
        return ops.compact(src, (thresholds[:1], thresholds[1:]), (_scan(rows[0]), _scan(rows[1] - rows[0])),
                           budget, c, scratch)

    def encode_many(self, x: torch.Tensor, segments: Sequence[tuple[int, int, RandomKey]],
                    residual: torch.Tensor | None) -> list[Payload]:
        """The payloads of the segments ``x[offset:offset + numel]``, each with its key and its
        slice of ``residual``, bit for bit what :meth:`encode` gives for each (``x``: a bucket's
        contiguous fp32 input, already checked).  On the host the sampled mode encodes all of
        them in two C calls (``hvdc_topk_select_many``, ``hvdc_topk_compact_many``: one tensor
        per thread, quickselect for the thresholds) instead of four per tensor plus a
        ``torch.topk``; on a device in one launch per kernel for the bucket (segment tables),
        without host reads; the other modes encode them one by one."""
        check_segments(x, residual, [(o, n) for o, n, _ in segments])
        keys = {(key.seed, key.step) for _, _, key in segments}
        ops = _ops(x.device)
        batched = (type(self) is TopKCodec and self.mode == "sampled" and not self.exact_k
                   and len(segments) > 1 and len(keys) == 1
                   and all(0 < numel <= _MAX_INDEX for _, numel, _ in segments))
        if not batched:
            return [self.encode(x[o:o + n], key, residual=None if residual is None else residual[o:o + n],
                                check_finite=False) for o, n, key in segments]
        if not ops.host:                    # one launch per step of the pipeline for the bucket
            idx, val, plan = ops.select_many(self, x, segments, residual)
            values = torch.empty(idx.numel(), dtype=self.value_dtype, device=x.device)
            ops.finalize_many(idx, val, values, residual, plan)
            return [Payload(n, {"indices": idx[b:b + c], "values": values[b:b + c]})
                    for (_, n, _), b, c in zip(segments, plan.bases, plan.caps)]
        (seed, step), = keys
        plan = _many_plan(tuple((o, n) for o, n, _ in segments), self.ratio, self.sample_ratio)
        ids = _i64([key.tensor_id for _, _, key in segments])
        nseg = len(segments)
        samples = torch.empty(plan.samples, dtype=torch.float32)
        buf_idx = torch.empty(plan.buffer, dtype=torch.int32)
        buf_val = torch.empty(plan.buffer, dtype=torch.float32)
        fill = torch.empty(nseg, dtype=torch.int64)
        level = torch.empty(nseg, dtype=torch.float32)
        thr = torch.empty(2 * nseg, dtype=torch.float32)
        sel = torch.empty(2 * nseg, dtype=torch.int64)
        has_r = residual is not None
        cpu.call("hvdc_topk_select_many", cpu.ptr(x, torch.float32), _opt(residual), int(has_r), nseg,
                 cpu.ptr(plan.seg), seed, step, cpu.ptr(ids),
                 cpu.ptr(device_constant(_LEVEL_FACTORS, torch.float32, x.device)),
                 cpu.ptr(samples), cpu.ptr(plan.sample_off), cpu.ptr(buf_idx), cpu.ptr(buf_val),
                 cpu.ptr(plan.buf_off), cpu.ptr(fill), cpu.ptr(level), cpu.ptr(thr), cpu.ptr(sel),
                 cpu.threads())
        out_off = [0]
        for c in sel[0::2].tolist():
            out_off.append(out_off[-1] + c)
        offsets = _i64(out_off)             # held here: the C call gets its address only
        idx = torch.empty(out_off[-1], dtype=torch.int32)
        cand = torch.empty(out_off[-1], dtype=torch.float32)
        values = torch.empty(out_off[-1], dtype=self.value_dtype)
        cpu.call("hvdc_topk_compact_many", cpu.ptr(residual if has_r else x, torch.float32),
                 _opt(residual), int(has_r), nseg, cpu.ptr(plan.seg), cpu.ptr(level), cpu.ptr(thr),
                 cpu.ptr(sel), cpu.ptr(buf_idx), cpu.ptr(buf_val), cpu.ptr(plan.buf_off), cpu.ptr(fill),
                 cpu.ptr(offsets), cpu.ptr(idx), cpu.ptr(cand),
                 cpu.ptr(values), int(self.value_dtype == torch.float16), cpu.threads())
        return [Payload(n, {"indices": idx[out_off[j]:out_off[j + 1]], "values": values[out_off[j]:out_off[j + 1]]})
                for j, (_, n, _) in enumerate(segments)]

    def decode_accumulate(self, payloads: Sequence[Payload], out: torch.Tensor) -> torch.Tensor:
        """out[idx_w] += D(values_w) for w = 0, 1, ... in list order (one fp32 addition per
        element per worker, the same order on CPU and GPU).  Indices must be strictly ascending
        in [0, out.numel()); a bad payload raises IndexError before ``out`` is touched."""
        if out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError("top-k decode needs a contiguous fp32 output tensor")
        flat, n = out.view(-1), out.numel()
        _validate(payloads, n, out.device)
        ops = _ops(out.device)
        ops.check([p.parts["indices"].contiguous() for p in payloads], n, padded=True)
        for p in payloads:
            if p.parts["indices"].numel():
                ops.scatter_add(p.parts["indices"].contiguous(), p.parts["values"].contiguous(), n, flat)
        return out


    def decode_many(self, payloads: Sequence[Sequence[Payload]], out: torch.Tensor,
                    segments: Sequence[tuple]) -> torch.Tensor:
        """``out[offset:offset + numel] +=`` the payloads of each segment (offset, numel, key), workers
        in list order: what :meth:`decode_accumulate` of each segment gives, bit for bit.  On
        the host in one C call (``hvdc_topk_decode_many``), every payload checked before
        anything is written; on a device every payload checked with one host read (the flush's
        only one for the bucket), then scattered."""
        if out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError("top-k decode needs a contiguous fp32 output tensor")
        check_segments(out, None, segments, "out")
        if len(payloads) != len(segments):
            raise ValueError(f"{len(payloads)} payload lists for {len(segments)} segments")
        flat, ops = out.view(-1), _ops(out.device)
        for (_, n, *_), ps in zip(segments, payloads):
            _validate(ps, n, out.device)
        if not ops.host:
            entries = [(w, n, p.parts["indices"].contiguous(), p.parts["values"].contiguous(), o)
                       for (o, n, *_), ps in zip(segments, payloads) for w, p in enumerate(ps)]
            ops.check([e[2] for e in entries], [e[1] for e in entries], padded=True,
                      workers=[e[0] for e in entries])
            for _, n, idx, val, o in entries:
                if idx.numel():
                    ops.scatter_add(idx, val, n, flat[o:o + n])
            return out
        held, firsts = [], [0]
        for ps in payloads:
            held += [(p.parts["indices"].contiguous(), p.parts["values"].contiguous()) for p in ps]
            firsts.append(len(held))
        tables = [_i64(firsts), _i64([n for _, n, *_ in segments]), _i64([o for o, *_ in segments]),
                  _i64([i.data_ptr() for i, _ in held]), _i64([v.data_ptr() for _, v in held]),
                  _i64([i.numel() for i, _ in held]), _i64([v.dtype == torch.float16 for _, v in held])]
        bad = torch.empty(2, dtype=torch.int64)
        cpu.call("hvdc_topk_decode_many", len(segments), *(cpu.ptr(t) for t in tables),
                 cpu.ptr(flat, torch.float32), cpu.ptr(bad), cpu.threads())
        p, j = bad.tolist()
        if p >= 0:
            s = next(s for s in range(len(segments)) if firsts[s + 1] > p)
            raise _bad_index_error(p - firsts[s], held[p][0], segments[s][1], j)
        return out


def _validate(payloads: Sequence[Payload], n: int, device: torch.device) -> None:
    """ValueError naming the worker unless every payload is a top-k payload of n elements on
    ``device`` (int32 indices, fp16 or fp32 values of the same length)."""
    for w, p in enumerate(payloads):
        idx, val = p.parts.get("indices"), p.parts.get("values")
        if p.numel != n or idx is None or val is None or idx.dtype != torch.int32 \
                or val.dtype not in (torch.float16, torch.float32) \
                or idx.numel() != val.numel() or idx.device != device or val.device != device:
            raise ValueError(f"worker {w}: not a top-k payload of {n} elements on {device}")


class GradDropCodec(TopKCodec):
    """Gradient Dropping (Aji & Heafield, "Sparse Communication for Distributed Gradient
    Descent", EMNLP 2017): drop all but the ``ratio`` largest entries of a whole bucket by one
    threshold, after **layer normalization**.  With g' = g + r (error feedback) and, for each
    tensor t of the segment (:meth:`with_layout`), m_t = max_{i in t} |g'_i|:

        y_i = g'_i / m_t   (0 for an all-zero tensor),
        thr = the sampled top-``ratio`` threshold of |y| over the whole segment,
        send (i, g'_i) for the selected i: **un-normalized** values, so no factor travels.

    So a tensor whose gradients are small as a whole still sends its relatively large entries
    (the paper's point: one global threshold would starve layers with small gradients).  The
    selection is this module's sampled machinery run on y (``sample_ratio`` 0.1%, the paper's
    sample, but at least 64 / ratio samples; DGC's 0.8^l levels and the 1.3 k cap); the values
    and the error feedback are g''s, exactly as :class:`TopKCodec` sends them.  y is computed by
    ``hvdc_topk_normalize`` (C and CUDA, one launch per tensor; m_t is a torch max, exact).
    ``layer_norm=False`` selects on |g'| itself (plain global top-k of the bucket).

    Wire: :class:`TopKCodec`'s (int32 indices, fp16 or fp32 values).
    """

    name = "graddrop"

    def __init__(self, ratio: float = 0.01, sample_ratio: float = 0.001,
                 value_dtype: torch.dtype = torch.float16, layer_norm: bool = True) -> None:
        super().__init__(ratio=ratio, sample_ratio=sample_ratio, value_dtype=value_dtype)
        self.layer_norm = bool(layer_norm)
        self._layout: tuple[int, ...] = ()

    def with_layout(self, shapes: Sequence[torch.Size]) -> "GradDropCodec":
        """This codec for a segment holding tensors of these shapes, end to end."""
        codec = GradDropCodec(self.ratio, self.sample_ratio, self.value_dtype, self.layer_norm)
        codec._layout = tuple(torch.Size(s).numel() for s in shapes)
        return codec

    def _encode(self, x: torch.Tensor, key: RandomKey, residual: torch.Tensor | None) -> Payload:
        n = x.numel()
        if n > _MAX_INDEX:
            raise ValueError(f"top-k indices are int32: {n} elements is too many, split the tensor")
        if n == 0 or not self.layer_norm:
            return super()._encode(x, key, residual)
        ops = _ops(x.device)
        if residual is not None:
            residual.add_(x)                    # g' = g + r: one fp32 addition, CPU == GPU
        src = x if residual is None else residual
        sizes = self._layout if sum(self._layout) == n else (n,)
        y = torch.empty_like(src)
        offset = 0
        for size in sizes:
            part = slice(offset, offset + size)
            if size:
                ops.normalize(src[part], src[part].abs().amax().reshape(1), y[part])
            offset += size
        idx, _ = self._select(ops, y, key, None)
        val = src[torch.clamp_max(idx, n - 1).to(torch.int64)]         # padding (index n) reads 0's slot
        values = torch.empty(idx.numel(), dtype=self.value_dtype, device=x.device)
        if idx.numel():
            ops.finalize(idx, val, values, residual, n)
        return Payload(n, {"indices": idx, "values": values})


def _bad_index_error(w: int, idx: torch.Tensor, n: int, j: int | None = None) -> IndexError:
    where = f" at position {j} (index {int(idx[j])})" if j is not None else ""
    return IndexError(f"top-k payload of worker {w}: indices must be strictly ascending in "
                      f"[0, {n}){where}")


class _CpuOps:
    """The steps of :meth:`TopKCodec._select` on the C library (``csrc/topk.c``); parts are
    ``cpu.threads()`` contiguous chunks.  The count pass also fills per-chunk buffers with the
    candidates at its lowest level (``scratch``, up to ``_CPU_BUFFER * buffer_k`` in all), which
    the compact pass filters instead of rereading the tensor."""

    #: counts are host data: reading them costs nothing, and payloads are sized to their count
    host = True

    @staticmethod
    def sample(x, r, stride, m, key):
        out = torch.empty(m, dtype=torch.float32)
        cpu.call("hvdc_topk_sample", cpu.ptr(x, torch.float32), _opt(r), int(r is not None),
                 cpu.ptr(out), stride, m, key.seed, key.step, key.tensor_id, cpu.threads())
        return out

    @staticmethod
    def count(x, r, levels, buffer_k):
        parts = cpu.threads()
        counts = torch.empty(levels.numel(), parts, dtype=torch.int64)
        cap = -(-_CPU_BUFFER * buffer_k // parts)
        buf_idx = torch.empty(parts * cap, dtype=torch.int32)
        buf_val = torch.empty(parts * cap, dtype=torch.float32)
        fill = torch.empty(parts, dtype=torch.int64)
        cpu.call("hvdc_topk_count", cpu.ptr(x, torch.float32), _opt(r), int(r is not None),
                 x.numel(), cpu.ptr(levels, torch.float32), levels.numel(), cpu.ptr(counts),
                 parts, cpu.ptr(buf_idx), cpu.ptr(buf_val), cap, cpu.ptr(fill), cpu.threads())
        return counts, (levels[-1:], buf_idx, buf_val, cap, fill)

    @staticmethod
    def compact(src, thresholds, offsets, budget, capacity, scratch):
        buf_thr, buf_idx, buf_val, cap, fill = scratch
        (t_hi, t_lo), (off_hi, off_band) = thresholds, offsets
        idx = torch.empty(capacity, dtype=torch.int32)
        val = torch.empty(capacity, dtype=torch.float32)
        cpu.call("hvdc_topk_compact", cpu.ptr(src, torch.float32), src.numel(),
                 cpu.ptr(t_hi, torch.float32), cpu.ptr(t_lo, torch.float32), budget,
                 cpu.ptr(off_hi, torch.int64),
                 None if off_band is None else cpu.ptr(off_band, torch.int64), off_hi.numel(),
                 cpu.ptr(buf_thr), cpu.ptr(buf_idx), cpu.ptr(buf_val), cap, cpu.ptr(fill),
                 cpu.ptr(idx), cpu.ptr(val), cpu.threads())
        return idx, val

    @staticmethod
    def finalize(idx, val, values, r, n):
        cpu.call("hvdc_topk_finalize", cpu.ptr(idx, torch.int32), cpu.ptr(val, torch.float32),
                 idx.numel(), n, cpu.ptr(values), int(values.dtype == torch.float16), _opt(r),
                 int(r is not None), cpu.threads())

    @staticmethod
    def check(indices, n, padded=False):
        bad = ctypes.c_int64()
        for w, idx in enumerate(indices):
            cpu.call("hvdc_topk_check", cpu.ptr(idx, torch.int32), idx.numel(), n, int(padded),
                     ctypes.byref(bad))
            if bad.value >= 0:
                raise _bad_index_error(w, idx, n, bad.value)

    @staticmethod
    def normalize(src, divisor, out):
        cpu.call("hvdc_topk_normalize", cpu.ptr(src, torch.float32), src.numel(), cpu.ptr(divisor),
                 cpu.ptr(out), cpu.threads())

    @staticmethod
    def scatter_add(idx, values, n, out):
        cpu.call("hvdc_topk_scatter_add", cpu.ptr(idx, torch.int32), cpu.ptr(values),
                 int(values.dtype == torch.float16), idx.numel(), n, cpu.ptr(out, torch.float32),
                 cpu.threads())


def _opt(t: torch.Tensor | None):
    return cpu.ptr(t, torch.float32) if t is not None else None


class _CudaOps:
    """The same steps as CUDA kernels (``kernels/topk.cu``), launched by ``kernels`` (the CUDA
    loader, or the emulator: ``backends.kernel_backend``).  Every launch serves all tensors of
    a bucket (:class:`_DevicePlan`: a segment table, tiles of ``_TILE`` elements that never
    straddle two tensors, one block each); a lone tensor is a bucket of one."""

    _TILE = 256 * 16        # TOPK_THREADS * TOPK_ITEMS of kernels/topk.cu
    _THREADS = 256
    #: nothing may be read on the host: the sampled mode's payloads have a fixed capacity
    host = False

    def __init__(self, kernels) -> None:
        self.kernels = kernels

    def _run(self, name, device, grid, args):
        self.kernels.launch(self.kernels.kernel("topk.cu", name, device), grid, self._THREADS, args)

    def _grid(self, count, device):
        return self.kernels.grid_size(count, self._THREADS, device)

    def select_many(self, codec: TopKCodec, x: torch.Tensor, segments, residual):
        """(indices, fp32 g', plan) of the segments (offset, numel, key) of ``x``, their entries
        at ``plan.bases``; residual <- g + r.  The sampled mode: ``plan.caps`` entries each,
        padded, no host read.  The exact and threshold modes (one segment): the count is read."""
        dev, (_, _, key) = x.device, segments[0]
        plan = _device_plan(tuple((o, n) for o, n, _ in segments), codec.ratio,
                            codec.sample_ratio, codec.mode, codec.exact_k, dev)
        bounded = codec.mode == "sampled" and not codec.exact_k
        if not bounded and len(segments) != 1:
            raise ValueError("the exact and threshold modes encode one tensor at a time")
        has_r, r = residual is not None, x if residual is None else residual
        if codec.mode == "threshold":
            levels = device_constant((codec.threshold,), torch.float32, dev).reshape(1, 1)
        else:
            samples = torch.empty(plan.samples, dtype=torch.float32, device=dev)
            ids = device_constant(tuple(k.tensor_id for _, _, k in segments), torch.int64, dev)
            self._run("hvdc_topk_sample", dev, self._grid(plan.samples, dev),
                      (x, r, np.int32(has_r), plan.seg, ids, plan.sample_seg, plan.sample_off,
                       np.int64(plan.samples), np.uint64(key.seed), np.uint32(key.step), samples))
            factors = _LEVEL_FACTORS[_UP:] if codec.exact_k else _LEVEL_FACTORS
            factors_t = device_constant(factors, torch.float32, dev)
            levels = torch.clamp_min(_segment_kth(samples, plan)[:, None] * factors_t,
                                     _SMALLEST)
            if codec.exact_k:
                levels = torch.cat([levels, levels.new_zeros(levels.shape[0], 1)], 1)
        levels = levels.contiguous()
        nlevels = levels.shape[1]
        counts = torch.empty(nlevels, plan.tiles, dtype=torch.int32, device=dev)
        self._run("hvdc_topk_count", dev, plan.tiles,
                  (x, r, np.int32(has_r), plan.tile_seg, plan.tile_lo, plan.tile_hi, levels,
                   np.int32(nlevels), counts))
        src = r
        if bounded:
            ext = torch.cat([counts.new_zeros(1, plan.tiles), counts]).to(torch.int64)  # +inf first
            totals = torch.zeros(len(segments), nlevels + 1, dtype=torch.int64, device=dev)
            totals.index_add_(0, plan.tile_seg_long, ext.T)
            a, c, budget = _choose(totals, plan.lo, plan.hi, plan.k)
            a_tiles = a.index_select(0, plan.tile_seg_long)
            rows = ext.gather(0, torch.stack([a_tiles, torch.clamp_max(a_tiles + 1, nlevels)]))
            pair = torch.stack([a, torch.clamp_max(a + 1, nlevels)], 1)
            thresholds = torch.cat([torch.full_like(levels[:, :1], math.inf), levels], 1).gather(1, pair)
            off_hi = plan.tile_base + _segment_scan(rows[0], plan)
            off_band = _segment_scan(rows[1] - rows[0], plan)
            idx, val = plan.padding.clone(), torch.zeros(plan.entries, dtype=torch.float32, device=dev)
        else:                               # exact / threshold: the count sizes the payload
            n = segments[0][1]
            totals = counts.sum(1).tolist()
            lo = codec.count_range(n)[0]
            level = next((l for l, c in enumerate(totals) if c >= lo), nlevels - 1)
            thresholds = levels[:, level].repeat(2)
            budget = torch.zeros(1, dtype=torch.int64, device=dev)
            off_hi = _scan(counts[level].to(torch.int64))
            off_band = torch.zeros_like(off_hi)
            idx = torch.full((totals[level],), n, dtype=torch.int32, device=dev)
            val = torch.zeros(totals[level], dtype=torch.float32, device=dev)
        if idx.numel():
            self._run("hvdc_topk_compact", dev, plan.tiles,
                      (src, plan.tile_seg, plan.tile_lo, plan.tile_hi, plan.seg, thresholds.contiguous(),
                       budget.contiguous(), off_hi, off_band, idx, val))
        if not bounded and codec.mode != "threshold" and idx.numel() > codec.k(segments[0][1]):
            idx, val = top_k_by_magnitude(idx, val, codec.k(segments[0][1]))
        return idx, val, plan

    def finalize_many(self, idx, val, values, r, plan):
        self._finalize(idx, val, values, r, plan.seg, plan.entry_seg)

    def finalize(self, idx, val, values, r, n):
        self._finalize(idx, val, values, r, _lone(n, idx.device), None)

    def _finalize(self, idx, val, values, r, seg, entry_seg):
        """Wire values and residual of the entries; ``entry_seg`` None: all of tensor 0."""
        self._run("hvdc_topk_finalize", idx.device, self._grid(idx.numel(), idx.device),
                  (idx, val, np.int64(idx.numel()), np.uint64(0) if entry_seg is None else entry_seg,
                   seg, values, np.int32(values.dtype == torch.float16), val if r is None else r,
                   np.int32(r is not None)))

    def check(self, indices, n, padded=False, workers=None):
        """IndexError naming the first bad payload's worker (``workers[i]``, default i); ``n``:
        the dense size, one for all or one per payload.  One host read for all of them."""
        if not indices:
            return
        ns = n if isinstance(n, list) else [n] * len(indices)
        bad = torch.zeros(len(indices), dtype=torch.int32, device=indices[0].device)
        for i, idx in enumerate(indices):
            if idx.numel():
                self._run("hvdc_topk_check", idx.device, self._grid(idx.numel(), idx.device),
                          (idx, np.int64(idx.numel()), np.int64(ns[i]), np.int32(padded), bad[i:i + 1]))
        for i, flag in enumerate(bad.tolist()):              # one host read per decode
            if flag:
                raise _bad_index_error(i if workers is None else workers[i], indices[i], ns[i])

    def normalize(self, src, divisor, out):
        self._run("hvdc_topk_normalize", src.device, self._grid(src.numel(), src.device),
                  (src, np.int64(src.numel()), divisor, out))

    def scatter_add(self, idx, values, n, out):
        self._run("hvdc_topk_scatter_add", idx.device, self._grid(idx.numel(), idx.device),
                  (idx, values, np.int32(values.dtype == torch.float16), np.int64(idx.numel()),
                   np.int64(n), out))


@dataclasses.dataclass(frozen=True)
class _DevicePlan:
    """The device tables of one bucket layout (built once, cached): :class:`_CudaOps`."""
    seg: torch.Tensor           # int64 [nseg, 6]: offset, n, k, stride, m, t (kernels/topk.cu)
    sample_seg: torch.Tensor    # int32 [samples]: the tensor of each sample
    sample_off: torch.Tensor    # int64 [nseg]
    pick: torch.Tensor          # int64 [nseg]: position of each tensor's t-th largest sample
    samples: int
    tile_seg: torch.Tensor      # int32 [tiles]
    tile_seg_long: torch.Tensor
    tile_lo: torch.Tensor       # int64 [tiles]: first element (bucket index)
    tile_hi: torch.Tensor       # int64 [tiles]: one past the last
    tile_first: torch.Tensor    # int64 [tiles]: the first tile of the tile's tensor
    tile_base: torch.Tensor     # int64 [tiles]: the tile's tensor's first output entry
    tiles: int
    lo: torch.Tensor            # int64 [nseg]: ceil(0.8 k)
    hi: torch.Tensor            # int64 [nseg]: the capacity
    k: torch.Tensor
    caps: tuple[int, ...]       # the sampled mode's fixed capacities (0 in the other modes)
    bases: tuple[int, ...]
    entries: int
    entry_seg: torch.Tensor     # int32 [entries]
    padding: torch.Tensor       # int32 [entries]: each tensor's n (the padding index)


@lru_cache(maxsize=256)
def _device_plan(layout: tuple[tuple[int, int], ...], ratio: float, sample_ratio: float,
                 mode: str, exact_k: bool, device: torch.device) -> _DevicePlan:
    codec = TopKCodec(ratio=ratio, sample_ratio=sample_ratio, exact_k=exact_k, mode=mode,
                      threshold=1.0 if mode == "threshold" else None)
    rows = [[offset, n, *codec.sample_row(n)] for offset, n in layout]
    tile_seg, tile_lo, tile_hi, tile_first = [], [], [], []
    for j, (offset, n) in enumerate(layout):
        first = len(tile_lo)
        for lo in range(offset, offset + n, _CudaOps._TILE):
            tile_seg.append(j)
            tile_lo.append(lo)
            tile_hi.append(min(lo + _CudaOps._TILE, offset + n))
            tile_first.append(first)
    bounded = mode == "sampled" and not exact_k
    caps = tuple(codec.capacity(n) if bounded else 0 for _, n in layout)
    bases = (0, *accumulate(caps))
    samples = [0, *accumulate(r[4] for r in rows)]
    ints = partial(torch.tensor, dtype=torch.int64)
    seg_of, tile_seg_t, cap_t = torch.arange(len(layout)), ints(tile_seg), ints(list(caps))
    tables = dict(
        seg=ints(rows), sample_seg=torch.repeat_interleave(seg_of, ints([r[4] for r in rows])).to(torch.int32),
        sample_off=ints(samples[:-1]), pick=ints([b + max(r[5], 1) - 1 for b, r in zip(samples, rows)]),
        tile_seg=tile_seg_t.to(torch.int32), tile_seg_long=tile_seg_t, tile_lo=ints(tile_lo),
        tile_hi=ints(tile_hi), tile_first=ints(tile_first),
        tile_base=ints(list(bases[:-1])).index_select(0, tile_seg_t),
        lo=ints([codec.count_range(n)[0] for _, n in layout]), hi=cap_t, k=ints([r[2] for r in rows]),
        entry_seg=torch.repeat_interleave(seg_of, cap_t).to(torch.int32),
        padding=torch.repeat_interleave(ints([n for _, n in layout]), cap_t).to(torch.int32))
    return _DevicePlan(**{name: t.to(device) for name, t in tables.items()}, samples=samples[-1],
                       tiles=len(tile_lo), caps=caps, bases=bases[:-1], entries=bases[-1])


@lru_cache(maxsize=256)
def _lone(n: int, device: torch.device) -> torch.Tensor:
    """The segment table of a lone n-element tensor (only offset 0 and n are read)."""
    return torch.tensor([[0, n, 0, 1, 0, 0]], dtype=torch.int64, device=device)


def _segment_kth(samples: torch.Tensor, plan: _DevicePlan) -> torch.Tensor:
    """Each tensor's t-th largest sample (fp32 [nseg], exact): the samples sorted descending,
    then stably by tensor, so tensor j's lie at sample_off[j].. in descending order."""
    values, order = torch.sort(samples, descending=True, stable=True)
    _, by_tensor = torch.sort(plan.sample_seg.index_select(0, order), stable=True)
    return values.index_select(0, by_tensor).index_select(0, plan.pick)


def _segment_scan(row: torch.Tensor, plan: _DevicePlan) -> torch.Tensor:
    """Exclusive prefix sums of per-tile counts within each tensor."""
    scan = _scan(row)
    return scan - scan.index_select(0, plan.tile_first)


@dataclasses.dataclass(frozen=True)
class _ManyPlan:
    """The C tables of :meth:`TopKCodec.encode_many` for one bucket layout."""
    seg: torch.Tensor           # int64 [nseg, 6]: offset, n, k, stride, m, t
    sample_off: torch.Tensor    # int64: where each tensor's sample starts
    buf_off: torch.Tensor       # int64 [nseg + 1]: each tensor's candidate buffer
    samples: int
    buffer: int


@lru_cache(maxsize=256)
def _many_plan(segments: tuple[tuple[int, int], ...], ratio: float, sample_ratio: float) -> _ManyPlan:
    codec = TopKCodec(ratio=ratio, sample_ratio=sample_ratio)
    rows = [[offset, n, *codec.sample_row(n)] for offset, n in segments]
    sample_off = [0, *accumulate(r[4] for r in rows)]
    buf_off = [0, *accumulate(_CPU_BUFFER * r[2] for r in rows)]
    return _ManyPlan(_i64(rows), _i64(sample_off[:-1]), _i64(buf_off), sample_off[-1], buf_off[-1])


def _i64(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def _scan(row: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix sums (int64) of a row of per-part counts: where each part writes."""
    return torch.cumsum(row, 0) - row


def _choose(totals: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
            k: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The sampled mode's selection from its level counts, in device ops (no host read), for
    every tensor of a bucket at once.

    ``totals[s, j]``: #{|g'| >= t_j} of tensor s for t_0 = +inf > t_1 = thr 1.25^8 > ... >
    t_9 = thr > ... > t_16 = thr 0.8^7 (non-decreasing in j); ``lo``, ``hi``, ``k`` per tensor.
    DGC's rule picks j, the first level from thr down whose count reaches lo (the last if
    none).  If C_j <= hi, every |g'| >= t_j is sent (a = j, c = C_j).  Otherwise a is the lowest
    level above j with C_a <= hi (j - 1 below thr; above thr, the first upward level that
    fits): every |g'| >= t_a is sent, and the band t_{a+1} <= |g'| < t_a fills up to
    c = max(C_a, k) entries in index order.  Returns (a, c, band budget c - C_a), int64 per
    tensor."""
    j_thr = _UP + 1
    position = torch.arange(totals.shape[1], device=totals.device)
    reaches = (totals >= lo[:, None]) & (position >= j_thr)
    j = torch.where(reaches.any(1), torch.argmax(reaches.to(torch.int32), 1), totals.shape[1] - 1)
    c_j = totals.gather(1, j[:, None])[:, 0]
    fits = c_j <= hi
    a = torch.where(fits, j, (totals <= hi[:, None]).sum(1) - 1)   # counts <= hi: a prefix
    c_a = totals.gather(1, a[:, None])[:, 0]
    c = torch.where(fits, c_j, torch.maximum(c_a, k))
    return a, c, c - c_a


def _ops(device: torch.device) -> type[_CpuOps] | _CudaOps:
    kernels = kernel_backend(device)
    if kernels is None and device.type == "cpu":
        return _CpuOps
    if kernels is not None and (device.type != "cuda" or cuda.available()):
        return _CudaOps(kernels)
    raise RuntimeError(f"top-k codec: no backend for {device} (CUDA needs CuPy)")
