"""Sign codecs: one bit per element (plus a few fp32 scales per bucket).

* :class:`OneBitCodec`: 1-bit SGD (Seide, Fu, Droppo, Li, Yu, "1-Bit Stochastic Gradient Descent
  and its Application to Data-Parallel Distributed Training of Speech DNNs", Interspeech 2014).
  Per bucket B of v = g + r:

      C(v)_i = [v_i < 0],   D(C(v))_i = mean_neg if v_i < 0 else mean_pos,
      mean_pos = (sum_{i in B, v_i >= 0} v_i) / #{v_i >= 0},   mean_neg likewise for v_i < 0

  (the reconstruction values minimise the squared error of a 1-bit code; an empty side has mean
  0).  Error feedback (the paper's "error feedback/quantization-error accumulation") is the
  method's point: pass ``residual`` to :meth:`~hvd_compress.codecs.base.Codec.encode`.

* :class:`ScaledSignCodec`: EF-signSGD (Karimireddy, Rebjock, Stich, Jaggi, "Error Feedback Fixes
  SignSGD and other Gradient Compression Schemes", ICML 2019), per bucket of d elements:

      C(v) = (||v||_1 / d) sign(v),   sign(0) = +1

  (||v||_1 / d is the scale s minimising ||s sign(v) - v||_2; C is a delta-approximate
  compressor with delta = ||v||_1^2 / (d ||v||_2^2), so error feedback converges).

* :class:`SignCodec`: signSGD with majority vote (Bernstein, Wang, Azizzadenesheli, Anandkumar,
  "signSGD: Compressed Optimisation for Non-Convex Problems", ICML 2018): the bits alone;
  :meth:`SignCodec.decode_accumulate` adds +1 or -1 per worker (sign(0) = +1), and
  :func:`majority_vote` of that sum is the aggregate sign (ties give 0).  No error feedback.

Wire (all three): ``bits``, element i at bit i % 8 of byte i // 8 (LSB first), 1 = negative
(v_i < 0; +0.0 and -0.0 count as non-negative): ceil(n / 8) bytes; then 1-bit SGD's ``means``
(fp32 [mean_pos, mean_neg] per bucket, 8 bytes) or the scaled sign's ``scales`` (fp32, 4 bytes
per bucket).  Buckets: ``bucket_size`` elements (a multiple of 32), default None = the whole
tensor.  Bucket sums are in the numeric contract's order (``kernels/signs.h``: chunks of
HVDC_SUM_CHUNK from the bucket's start, hvdc_warp_sum each, then the partials the same way),
divided by the counts in fp32; the C reference (``csrc/signs.c``) and the CUDA kernels
(``kernels/signs.cu``) give identical bits.

For the caller: every codec here takes a per-rank key (none is used: the codecs are
deterministic), payloads are not summable by an allreduce (fixed-size, gather them), and only
:class:`SignCodec` needs a transform after the sum (:func:`majority_vote`, and the scaling of its
docstring).
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
from typing import ClassVar, Sequence

import numpy as np
import torch

from ..backends import cpu, kernel_backend
from . import _quant as q
from .base import Codec, Payload, RandomKey, as_fp32_flat, check_segments, device_constant, overflow_check

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
cpu.register("hvdc_sign_stats", _P, _P, _I64, _I64, _INT, _P, _P, _P, _INT)
cpu.register("hvdc_sign_encode", _P, _P, _I64, _I64, _INT, _P, _P, _INT)
cpu.register("hvdc_sign_decode_acc", _P, _P, _INT, _I64, _I64, _INT, _P, _INT)
cpu.register("hvdc_sign_encode_many", _P, _P, _I64, _P, _INT, _P, _P, _P, _P, _INT)
cpu.register("hvdc_sign_decode_many", _P, _P, _INT, _I64, _P, _INT, _P, _INT)

#: the CUDA source of the sign kernels
SOURCE = "signs.cu"
#: kernels/signs.h: HVDC_SIGN_ONEBIT, HVDC_SIGN_SCALED, HVDC_SIGN_PLAIN
_ONEBIT, _SCALED, _PLAIN = 0, 1, 2


class _SignCodec(Codec):
    """The sign codecs' shared machinery: ``_kind`` picks the formulas of ``kernels/signs.h``."""

    fixed_size = True
    _kind: ClassVar[int]
    #: fp32 scales per bucket on the wire, and their part's name
    _nscales: ClassVar[int]
    _scales_part: ClassVar[str] = ""
    #: False where encode rejects a residual (the vote codecs)
    _error_feedback: ClassVar[bool] = True
    bucket_size: int | None = None

    def _check_bucket(self) -> None:
        b = self.bucket_size
        if b is not None and (not isinstance(b, int) or b <= 0 or b % 32):
            raise ValueError(f"bucket_size must be None or a positive multiple of 32, got {b!r}")

    def _bucket(self, n: int) -> int:
        return self.bucket_size if self.bucket_size is not None else max(n, 1)

    def n_buckets(self, n: int) -> int:
        """Buckets of an n-element tensor: 1 per tensor, or ceil(n / bucket_size) (0 for n = 0)."""
        return q.n_buckets(n, self._bucket(n)) if n else 0

    def _parts(self, n: int) -> dict[str, tuple[torch.dtype, int]]:
        parts = {"bits": (torch.uint8, -(-n // 8))}
        if self._nscales:
            parts[self._scales_part] = (torch.float32, self._nscales * self.n_buckets(n))
        return parts

    def local_scales(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                     name: str = "tensor") -> torch.Tensor:
        """The wire scales of v = x (+ residual), per bucket, without encoding."""
        flat = as_fp32_flat(x, name)
        return self._scales(flat, q.check_residual(flat, residual, name))

    def _scales(self, v: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
        """The wire scales; raises ``FloatingPointError`` if one overflows (a host read)."""
        scales = self._raw_scales(v, r)
        overflow_check(scales, False, lambda: self._overflow(v))
        return scales

    def _overflow(self, v: torch.Tensor) -> str:
        return f"{self.name}: a bucket's sum overflows fp32 (max |g| = {float(v.abs().max()):.3g})"

    def _raw_scales(self, v: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
        n = v.numel()
        scales = torch.empty(self._nscales * self.n_buckets(n), dtype=torch.float32, device=v.device)
        if n == 0:
            return scales
        bucket, nb = self._bucket(n), self.n_buckets(n)
        nchunks = -(-min(bucket, n) // q.SUM_CHUNK)
        kernels = kernel_backend(v.device)
        if kernels is not None:
            _cuda_scales(kernels, v, r, n, bucket, self._kind, nb, nchunks, scales)
        else:
            sums = torch.empty(2 * nb * nchunks, dtype=torch.float32)
            counts = torch.empty(nb * nchunks, dtype=torch.int64) if self._kind == _ONEBIT else None
            cpu.call("hvdc_sign_stats", q.ptr(v), q.ptr(r), n, bucket, self._kind, q.ptr(sums),
                     q.ptr(counts), q.ptr(scales), cpu.threads())
        return scales

    def _encode(self, x: torch.Tensor, key: RandomKey, residual: torch.Tensor | None) -> Payload:
        n = x.numel()
        parts = self._parts(n)
        bits = torch.empty(parts["bits"][1], dtype=torch.uint8, device=x.device)
        kernels = kernel_backend(x.device)
        finite = None
        if self._nscales:      # (on a device the overflow flag travels with the payload)
            scales = self._raw_scales(x, residual)
            finite = overflow_check(scales, kernels is not None, lambda: self._overflow(x))
        else:
            scales = None
        if n:
            bucket = self._bucket(n)
            if kernels is not None:
                kernels.launch(kernels.kernel(SOURCE, "hvdc_sign_encode", x.device), q.grid(n, q.BLOCK),
                               q.BLOCK, (x, q.dptr(residual), np.int64(n), np.int64(bucket),
                                         np.int32(self._kind), q.dptr(scales), bits))
            else:
                cpu.call("hvdc_sign_encode", q.ptr(x), q.ptr(residual), n, bucket, self._kind,
                         q.ptr(scales), q.ptr(bits), cpu.threads())
        payload = {"bits": bits}
        if scales is not None:
            payload[self._scales_part] = scales
        return Payload(n, payload, finite)

    def decode_accumulate(self, payloads: Sequence[Payload], out: torch.Tensor) -> torch.Tensor:
        """``out += D(payload_0) + D(payload_1) + ...``, one fp32 addition per worker and element,
        in list order."""
        n = payloads[0].numel if payloads else 0
        flat = q.accumulate_target(payloads, out, self._parts(n))
        if n == 0:
            return out
        kernels = kernel_backend(flat.device)
        bits = q.ptr_array([p.parts["bits"] for p in payloads], kernels)
        scales = (q.ptr_array([p.parts[self._scales_part] for p in payloads], kernels)
                  if self._nscales else None)
        if kernels is not None:
            kernels.launch(kernels.kernel(SOURCE, "hvdc_sign_decode_acc", flat.device),
                           q.grid(n, q.BLOCK), q.BLOCK,
                           (bits, q.dptr(scales), np.int32(len(payloads)), np.int64(n),
                            np.int64(self._bucket(n)), np.int32(self._kind), flat))
        else:
            cpu.call("hvdc_sign_decode_acc", bits, scales, len(payloads), n, self._bucket(n),
                     self._kind, q.ptr(flat), cpu.threads())
        return out

    def _batched(self, payloads: Sequence[Sequence[Payload]] | None, segments: Sequence[tuple]) -> bool:
        """Whether a bucket's segments go in one call (:func:`_quant.batchable`; for a decode,
        every segment with as many payloads)."""
        return (q.batchable([n for _, n, *_ in segments], self.bucket_size)
                and (payloads is None or len({len(ps) for ps in payloads}) == 1))

    def encode_many(self, x: torch.Tensor, segments: Sequence[tuple[int, int, RandomKey]],
                    residual: torch.Tensor | None) -> list[Payload]:
        """The payloads of the segments ``x[offset:offset + numel]`` (a bucket's tensors; ``x``
        contiguous fp32, checked for inf/NaN already), each with its slice of ``residual``: bit
        for bit what :meth:`encode` gives each (the keys are not used: the sign codecs are
        deterministic).  One C call for the bucket on the host (``hvdc_sign_encode_many``), one
        launch per kernel on a device (``hvdc_seg_sign_*``: three for the bucket, one without
        scales, where each tensor took up to four), no host reads.  A scale that overflows
        raises on the host before any residual changes, and clears its payload's ``finite``
        flag on a device, as :meth:`encode` does."""
        check_segments(x, residual, segments)
        if not self._batched(None, segments) or (residual is not None and not self._error_feedback):
            return [self.encode(x[o:o + n], key, residual=None if residual is None else residual[o:o + n],
                                check_finite=False) for o, n, key in segments]
        dev, nseg, ns = x.device, len(segments), self._nscales
        table = q.segment_table(tuple((o, n) for o, n, _ in segments), dev)
        bits = torch.empty(table.total(q.BYTE8), dtype=torch.uint8, device=dev)
        scales = torch.empty(ns * nseg, dtype=torch.float32, device=dev)
        chunks = table.total(q.CHUNK)
        sums = torch.empty(2 * chunks, dtype=torch.float32, device=dev) if ns else None
        counts = torch.empty(chunks, dtype=torch.int64, device=dev) if self._kind == _ONEBIT else None
        kernels = kernel_backend(dev)
        if kernels is None:
            cpu.call("hvdc_sign_encode_many", q.ptr(x), q.ptr(residual), nseg, q.ptr(table.seg), self._kind,
                     q.ptr(sums), q.ptr(counts), q.ptr(scales), q.ptr(bits), cpu.threads())
            flags = [None] * nseg
            if ns:
                overflow_check(scales, False, lambda: self._overflow(x))
        else:
            if ns:
                kernels.launch(kernels.kernel(SOURCE, "hvdc_seg_sign_stats", dev), q.grid(32 * chunks, q.BLOCK),
                               q.BLOCK, (x, q.dptr(residual), table.seg, np.int32(nseg), np.int64(chunks),
                                         np.int32(self._kind), sums, q.dptr(counts)))
                kernels.launch(kernels.kernel(SOURCE, "hvdc_seg_sign_finalize", dev), q.grid(32 * nseg, q.BLOCK),
                               q.BLOCK, (sums, q.dptr(counts), table.seg, np.int32(nseg), np.int32(self._kind),
                                         scales))
            slots = table.total(q.SLOT32)
            kernels.launch(kernels.kernel(SOURCE, "hvdc_seg_sign_encode", dev), q.grid(slots, q.BLOCK), q.BLOCK,
                           (x, q.dptr(residual), table.seg, np.int32(nseg), np.int64(slots), np.int32(self._kind),
                            q.dptr(scales if ns else None), bits))
            flags = list(torch.isfinite(scales.view(nseg, ns)).all(1)) if ns else [None] * nseg
        f = table.bounds[q.BYTE8]
        return [Payload(n, {"bits": bits[f[s]:f[s + 1]], **({self._scales_part: scales[ns * s:ns * (s + 1)]}
                                                            if ns else {})}, flags[s])
                for s, (_, n, _) in enumerate(segments)]

    def decode_many(self, payloads: Sequence[Sequence[Payload]], out: torch.Tensor,
                    segments: Sequence[tuple]) -> torch.Tensor:
        """``out[offset:offset + numel] +=`` the payloads of each segment (offset, numel, key), workers
        in list order: what :meth:`decode_accumulate` of each gives, bit for bit, in one C call
        (``hvdc_sign_decode_many``) or one launch; every payload is checked before anything is
        written."""
        flat = q.decode_target(payloads, out, segments, self._parts)
        if not self._batched(payloads, segments):
            for (o, n, *_), ps in zip(segments, payloads):
                self.decode_accumulate(ps, flat[o:o + n])
            return out
        nworkers, nseg = len(payloads[0]), len(segments)
        table = q.segment_table(tuple((o, n) for o, n, *_ in segments), out.device)
        kernels = kernel_backend(out.device)
        bits = q.ptr_array([p.parts["bits"] for ps in payloads for p in ps], kernels)
        scales = (q.ptr_array([p.parts[self._scales_part] for ps in payloads for p in ps], kernels)
                  if self._nscales else None)
        if kernels is not None:
            slots = table.total(q.SLOT32)
            kernels.launch(kernels.kernel(SOURCE, "hvdc_seg_sign_decode_acc", out.device), q.grid(slots, q.BLOCK),
                           q.BLOCK, (bits, q.dptr(scales), np.int32(nworkers), table.seg, np.int32(nseg),
                                     np.int64(slots), np.int32(self._kind), flat))
        else:
            cpu.call("hvdc_sign_decode_many", bits, scales, nworkers, nseg, q.ptr(table.seg), self._kind,
                     q.ptr(flat), cpu.threads())
        return out


@dataclasses.dataclass(frozen=True)
class OneBitCodec(_SignCodec):
    """1-bit SGD (Seide et al. 2014): a sign bit per element and (mean of the entries >= 0,
    mean of the entries < 0) per bucket; use it with error feedback (``residual``).

    Args:
        bucket_size: elements per bucket (a multiple of 32), None (default) for the whole tensor.

    Wire: ``bits`` ceil(n / 8) bytes + ``means`` 8 bytes per bucket.
    """

    bucket_size: int | None = None
    name = "onebit"
    _kind = _ONEBIT
    _nscales = 2
    _scales_part = "means"

    def __post_init__(self) -> None:
        self._check_bucket()


@dataclasses.dataclass(frozen=True)
class ScaledSignCodec(_SignCodec):
    """EF-signSGD's compressor (Karimireddy et al. 2019): (||v||_1 / d) sign(v) per bucket of d
    elements, sign(0) = +1; use it with error feedback (``residual``).

    Args:
        bucket_size: elements per bucket (a multiple of 32), None (default) for the whole tensor.

    Wire: ``bits`` ceil(n / 8) bytes + ``scales`` 4 bytes per bucket.
    """

    bucket_size: int | None = None
    name = "efsignsgd"
    _kind = _SCALED
    _nscales = 1
    _scales_part = "scales"

    def __post_init__(self) -> None:
        self._check_bucket()


@dataclasses.dataclass(frozen=True)
class SignCodec(_SignCodec):
    """signSGD with majority vote (Bernstein et al. 2018): the sign bits alone, ceil(n / 8)
    bytes; no error feedback.  :meth:`decode_accumulate` adds +1 / -1 per worker, so after the
    sum over workers ``majority_vote(total)`` is the aggregate direction.

    **Scaling for a drop-in SGD learning rate.**  signSGD's update lr * sign(vote) has magnitude
    lr per coordinate whatever the gradient's size, so a learning rate tuned for SGD (update
    lr * g) is off by the gradient's typical magnitude (often 1e-3 or less).  The method should
    apply

        update = lr * m * majority_vote(sum_w sign(g_w)),   m = mean_w ||g_w||_1 / d

    with each worker's m_w = :meth:`magnitude` (1 fp32 per tensor, one small allreduce, in the
    contract's order).  Why this scale: ||g||_1 / d is the s that minimises ||s sign(g) - g||_2
    (the scale EF-signSGD sends, :class:`ScaledSignCodec`), so where the workers agree the step
    is the best sign approximation of the average worker gradient, and it keeps the L1 length of
    the update equal to the workers' mean L1 gradient length (a coordinate where the vote ties
    moves by 0).  It adds 4 bytes per tensor and no state, and the vote itself stays scale-free
    (a worker cannot outvote the others with a large gradient: the robustness of the paper).
    """

    name = "signsgd"
    _kind = _PLAIN
    _nscales = 0
    _error_feedback = False

    def _encode(self, x: torch.Tensor, key: RandomKey, residual: torch.Tensor | None) -> Payload:
        if residual is not None:
            raise ValueError("SignCodec has no error feedback (EF-signSGD is ScaledSignCodec)")
        return super()._encode(x, key, None)

    def magnitude(self, x: torch.Tensor, name: str = "tensor") -> torch.Tensor:
        """||x||_1 / numel as a 1-element fp32 tensor (0 elements for an empty x): the worker's
        m_w of the scaling above (the whole-tensor scale of :class:`ScaledSignCodec`)."""
        return ScaledSignCodec().local_scales(x, name=name)


@dataclasses.dataclass(frozen=True)
class MajorityVoteCodec(ScaledSignCodec):
    """signSGD with majority vote (Bernstein, Zhao, Azizzadenesheli, Anandkumar, "signSGD with
    Majority Vote is Communication Efficient and Fault Tolerant", ICLR 2019), scaled as
    :class:`SignCodec` proposes: each worker sends the wire of :class:`ScaledSignCodec` (sign
    bits and m_w = ||g_w||_1 / d per tensor or bucket), and the aggregate of W payloads is

        majority_vote(sum_w sign(g_w)) * sum_w m_w

    (sum semantics: divided by W under Horovod's Average it is the vote times the mean m).  A
    script's SGD learning rate therefore still works (the update has the workers' mean L1
    gradient length) while the vote stays scale-free.  No error feedback."""

    name = "signsgd"
    _error_feedback = False

    def _encode(self, x: torch.Tensor, key: RandomKey, residual: torch.Tensor | None) -> Payload:
        if residual is not None:
            raise ValueError("signSGD with majority vote has no error feedback (EF-signSGD does)")
        return super()._encode(x, key, None)

    def decode_accumulate(self, payloads: Sequence[Payload], out: torch.Tensor) -> torch.Tensor:
        if not payloads:
            raise ValueError("decode_accumulate needs at least one payload")
        n = payloads[0].numel
        votes = SignCodec().decode_accumulate(_bits_only(payloads), torch.zeros(n, dtype=torch.float32,
                                                                                device=out.device))
        scale = _sum_in_order([p.parts["scales"] for p in payloads])
        per_element = scale.repeat_interleave(self._bucket(n))[:n] if scale.numel() > 1 else scale
        out.view(-1).add_(majority_vote(votes) * per_element)
        return out

    def decode_many(self, payloads: Sequence[Sequence[Payload]], out: torch.Tensor,
                    segments: Sequence[tuple]) -> torch.Tensor:
        """:meth:`decode_accumulate` of each segment, bit for bit: the votes of the whole bucket in
        one :meth:`SignCodec.decode_many`, then every tensor's vote times its summed scale in
        one pass (segments that tile a range; others one by one)."""
        flat = q.decode_target(payloads, out, segments, self._parts)
        if not q.tiled(segments) or not self._batched(payloads, segments):
            for (o, n, *_), ps in zip(segments, payloads):
                self.decode_accumulate(ps, flat[o:o + n])
            return out
        lo, hi = segments[0][0], segments[-1][0] + segments[-1][1]
        votes = SignCodec().decode_many([_bits_only(ps) for ps in payloads],
                                        torch.zeros(hi - lo, dtype=torch.float32, device=out.device),
                                        [(o - lo, n) for o, n, *_ in segments])
        scale = _sum_in_order([torch.cat([ps[w].parts["scales"] for ps in payloads])
                               for w in range(len(payloads[0]))])
        lengths = device_constant(tuple(n for _, n, *_ in segments), torch.int64, out.device)
        flat[lo:hi].add_(majority_vote(votes) * scale.repeat_interleave(lengths, output_size=hi - lo))
        return out


def _bits_only(payloads: Sequence[Payload]) -> list[Payload]:
    return [Payload(p.numel, {"bits": p.parts["bits"]}) for p in payloads]


def _sum_in_order(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """((t_0 + t_1) + t_2) + ...: the workers' scales summed in list order on every device."""
    return functools.reduce(torch.add, tensors)


def majority_vote(total: torch.Tensor) -> torch.Tensor:
    """sign(total) (+1, -1, or 0 for a tie), ``total`` the sum of the workers' decoded
    :class:`SignCodec` payloads (integers, exact in fp32 up to 2^24 workers)."""
    return torch.sign(total)


def _cuda_scales(kernels, v: torch.Tensor, r: torch.Tensor | None, n: int, bucket: int, kind: int,
                 nb: int, nchunks: int, scales: torch.Tensor) -> None:
    """Per-segment partial sums (one warp each), reduced per bucket in chunks of
    HVDC_SUM_CHUNK until one is left, then the wire scales."""
    dev = v.device
    m = nchunks
    sums = torch.empty(2 * nb * m, dtype=torch.float32, device=dev)
    counts = torch.empty(nb * m, dtype=torch.int64, device=dev) if kind == _ONEBIT else None
    kernels.launch(kernels.kernel(SOURCE, "hvdc_sign_stats", dev), q.grid(32 * nb * m, q.BLOCK), q.BLOCK,
                   (v, q.dptr(r), np.int64(n), np.int64(bucket), np.int64(m), np.int32(kind), sums,
                    q.dptr(counts)))
    reduce = kernels.kernel(SOURCE, "hvdc_sign_reduce", dev)
    while m > 1:
        mo = -(-m // q.SUM_CHUNK)
        s_next = torch.empty(2 * nb * mo, dtype=torch.float32, device=dev)
        c_next = torch.empty(nb * mo, dtype=torch.int64, device=dev) if counts is not None else None
        kernels.launch(reduce, q.grid(32 * nb * mo, q.BLOCK), q.BLOCK,
                       (sums, q.dptr(counts), np.int64(nb), np.int64(m), s_next, q.dptr(c_next)))
        sums, counts, m = s_next, c_next, mo
    kernels.launch(kernels.kernel(SOURCE, "hvdc_sign_finalize", dev), q.grid(nb, q.BLOCK), q.BLOCK,
                   (sums, q.dptr(counts), np.int64(n), np.int64(bucket), np.int32(kind), scales))
