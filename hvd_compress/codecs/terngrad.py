"""TernGrad (Wen et al., "TernGrad: Ternary Gradients to Reduce Communication in Distributed Deep
Learning", NeurIPS 2017).

    ternarize(g)_i = s * sign(g_i) * b_i,   b_i ~ Bernoulli(|g_i| / s),   s = max_i |g_i|

per tensor (the paper's layer-wise scaling, the default) or per bucket of ``bucket_size``
elements.  E[ternarize(g)] = g and E[(ternarize(g)_i - g_i)^2] = |g_i| (s - |g_i|).

Gradient clipping (the paper's, on by default): g is first clipped to [-c sigma, c sigma], sigma
the population standard deviation of the tensor (sums in the fixed order of the numeric
contract), so s = min(max |g|, c sigma).  Clipping makes the codec biased (the clipped tails are
lost) in exchange for a smaller s and variance; with error feedback the clipped part stays in
the residual.  A tensor with sigma = 0 (constant, or one element) is not clipped.  ``clip=None``
gives the unbiased codec.

The default is c = 1, not the paper's 2.5.  Per element the error is the variance
|h_i| (s - |h_i|) of the clipped value h plus the bias (g_i - h_i)^2; in units of sigma^2:

    c      Gaussian  Laplace  Student-t(3)
    1.0    0.27      0.37     0.50
    1.5    0.38      0.43     0.59
    2.5    1.01      0.88     1.00

c = 1 minimizes it for all three (tests/codecs/test_terngrad.py measures this on the codec), a fourth of
the paper's setting for Gaussian entries.  The convergence study (docs/convergence-notes.md)
measured the consequence: at 2.5 sigma TernGrad missed the digits target at 2 and 4 workers and
the language models by 10-14%; at 1 sigma it meets digits and the GRU at 4 workers.  The paper's
setting stays one argument away (``clip=2.5``).

Averaged over N workers with independent noise the variance term shrinks as 1/N while the
clipping bias does not, so the best clip grows with N: :func:`optimal_clip` minimizes
``bias(c)^2 + var(c) / N`` for Gaussian entries (1.0 sigma at N = 1, 1.69 at 8, 2.15 at 32; the
paper's 2.5 near N = 90).  ``hvd_compress.TernGrad()`` uses it for the job's number of workers
(``clip="auto"``).

Shared scale (the paper shares s across workers): :meth:`local_scales` gives this worker's
scales, the communication layer takes their maximum over workers, and
``codec.with_scales(s).encode(...)`` encodes with them, so that every worker's codes mean
multiples of the same s.  Elements with |g_i| > s are then saturated to sign(g_i) s.

Error feedback (``encode(..., residual=r)``) is optional: without clipping the codec is
unbiased, and it is no contraction (E||C(g) - g||^2 = sum_i |g_i| (s - |g_i|) can exceed
||g||^2), so the residual is not guaranteed to stay bounded.

Wire: ``codes`` (2 bits per element, 4 per byte, element i at bits 2 (i % 4) of byte i // 4;
00 = 0, 01 = +s, 10 = -s) and ``scales`` (fp32, one per tensor or bucket).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import numpy as np
import torch

from ..backends import cpu, kernel_backend
from . import _quant as q
from .base import Codec, Payload, RandomKey, as_fp32_flat, check_segments, device_constant


def clip_error(c: float, workers: int) -> float:
    """The per-element error, in units of sigma^2, of the average of ``workers`` TernGrad
    encodings of a Gaussian tensor clipped at ``c`` sigma (s = c sigma, h = clip(g, -c, c)):

        var(c)    = E[|h| (c - |h|)] = c E|h| - E h^2
        E|h|      = 2 (phi(0) - phi(c)) + 2 c (1 - Phi(c))
        E h^2     = (2 Phi(c) - 1) - 2 c phi(c) + 2 c^2 (1 - Phi(c))
        bias(c)^2 = E[(|g| - c)_+^2] = 2 ((1 + c^2)(1 - Phi(c)) - c phi(c))
        error     = bias(c)^2 + var(c) / N

    (independent noise per worker averages the variance as 1/N; the clipping bias is the same
    on every worker and stays)."""
    phi = math.exp(-c * c / 2) / math.sqrt(2 * math.pi)
    tail = 0.5 * math.erfc(c / math.sqrt(2))                       # 1 - Phi(c)
    e_abs = 2 * (1 / math.sqrt(2 * math.pi) - phi) + 2 * c * tail
    e_sq = (1 - 2 * tail) - 2 * c * phi + 2 * c * c * tail
    bias2 = 2 * ((1 + c * c) * tail - c * phi)
    return bias2 + (c * e_abs - e_sq) / workers


@functools.lru_cache(maxsize=None)
def optimal_clip(workers: int) -> float:
    """``argmin_c clip_error(c, workers)`` (:func:`clip_error`): 1.017 sigma for one worker,
    1.23 for 2, 1.69 for 8, 2.15 for 32, 2.59 for 128.  Golden-section search on [0.25, 8]
    (the error is unimodal in c), rounded to 3 decimals so every rank uses the same bits."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    lo, hi = 0.25, 8.0
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(80):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if clip_error(a, workers) < clip_error(b, workers):
            hi = b
        else:
            lo = a
    return round((lo + hi) / 2, 3)


@dataclasses.dataclass(frozen=True)
class TernGradCodec(Codec):
    """TernGrad ternarization; ``bucket_size=None`` scales per tensor, ``clip=None`` disables
    clipping, ``shared_scales`` (see :meth:`with_scales`) replaces the locally computed scales."""

    fixed_size = True

    bucket_size: int | None = None
    clip: float | None = 1.0
    shared_scales: torch.Tensor | None = dataclasses.field(default=None, compare=False, repr=False)
    name = "terngrad"

    def __post_init__(self) -> None:
        q.check_bucket(self.bucket_size, allow_none=True)
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"clip must be a positive factor of sigma or None, got {self.clip!r}")

    def with_scales(self, scales: torch.Tensor) -> "TernGradCodec":
        """This codec encoding with the given scales (fp32, one per tensor or bucket), e.g. the
        maximum of every worker's :meth:`local_scales`."""
        return dataclasses.replace(self, shared_scales=scales)

    def n_scales(self, n: int) -> int:
        """Scales in the payload of an n-element tensor: 1 per tensor or ceil(n / bucket_size)."""
        return q.n_buckets(n, self._bucket(n)) if n else 0

    def _bucket(self, n: int) -> int:
        return self.bucket_size if self.bucket_size is not None else max(n, 1)

    def local_scales(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                     name: str = "tensor", check_finite: bool = True) -> torch.Tensor:
        """Scales of g = x (+ residual): max |g| per tensor or bucket, clipped at clip * sigma
        (``check_finite`` as in :meth:`~hvd_compress.codecs.base.Codec.encode`)."""
        flat = as_fp32_flat(x, name, check_finite)
        return self._scales(flat, q.check_residual(flat, residual, name))

    def _scales(self, g: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
        n = g.numel()
        scales = torch.empty(self.n_scales(n), dtype=torch.float32, device=g.device)
        if n == 0:
            return scales
        bucket, clip = self._bucket(n), float(self.clip or 0.0)
        kernels = kernel_backend(g.device)
        if kernels is not None:
            _cuda_scales(kernels, g, r, n, bucket, clip, scales)
        else:
            scratch = torch.empty(2 * -(-n // q.SUM_CHUNK), dtype=torch.float32)
            cpu.call("hvdc_tern_scales", q.ptr(g), q.ptr(r), n, bucket, clip, q.ptr(scales),
                     q.ptr(scratch), cpu.threads())
        return scales

    def _encode(self, x: torch.Tensor, key: RandomKey, residual: torch.Tensor | None) -> Payload:
        n = x.numel()
        if self.shared_scales is None:
            scales = self._scales(x, residual)
        else:
            scales = self.shared_scales.detach().to(x.device, torch.float32).reshape(-1).clone()
            if scales.numel() != self.n_scales(n):
                raise ValueError(f"shared scales: {self.n_scales(n)} expected, got {scales.numel()}")
        codes = torch.empty(-(-n // 4), dtype=torch.uint8, device=x.device)
        if n:
            bucket = self._bucket(n)
            kernels = kernel_backend(x.device)
            if kernels is not None:
                fn = kernels.kernel(q.SOURCE, "hvdc_tern_encode", x.device)
                kernels.launch(fn, q.grid(-(-n // 4), q.BLOCK), q.BLOCK,
                            (x, q.dptr(residual), np.int64(n), np.int64(bucket), scales,
                             *q.cuda_key(key), codes))
            else:
                cpu.call("hvdc_tern_encode", q.ptr(x), q.ptr(residual), n, bucket, q.ptr(scales),
                         key.seed, key.step, key.tensor_id, q.ptr(codes), cpu.threads())
        return Payload(n, {"codes": codes, "scales": scales})

    def _batched(self, sizes: Sequence[int]) -> bool:
        """Whether a bucket's tensors of these sizes go in one call (:func:`_quant.batchable`,
        and no shared scales)."""
        return self.shared_scales is None and q.batchable(sizes, self.bucket_size)

    def _parts(self, n: int) -> dict[str, tuple[torch.dtype, int]]:
        return {"codes": (torch.uint8, -(-n // 4)), "scales": (torch.float32, self.n_scales(n))}

    def encode_many(self, x: torch.Tensor, segments: Sequence[tuple[int, int, RandomKey]],
                    residual: torch.Tensor | None) -> list[Payload]:
        """The payloads of the segments ``x[offset:offset + numel]`` (a bucket's tensors; ``x``
        contiguous fp32, checked for inf/NaN already), each with its key and its slice of
        ``residual``: bit for bit what :meth:`encode` gives each.  On the host one C call for the bucket
        (``hvdc_tern_encode_many``) instead of two per tensor; on a device one launch per
        kernel (the ``hvdc_seg_*`` kernels with a segment table: six launches for the bucket
        instead of four to six per tensor), no host reads.  Per-bucket or shared scales,
        empty or huge tensors, and keys of different steps go one by one."""
        check_segments(x, residual, [(o, n) for o, n, _ in segments])
        keys = {(key.seed, key.step) for _, _, key in segments}
        if len(keys) != 1 or not self._batched([n for _, n, _ in segments]):
            return [self.encode(x[o:o + n], key, residual=None if residual is None else residual[o:o + n],
                                check_finite=False) for o, n, key in segments]
        (seed, step), = keys
        dev, nseg = x.device, len(segments)
        table = q.segment_table(tuple((o, n) for o, n, _ in segments), dev)
        ids = device_constant(tuple(key.tensor_id for _, _, key in segments), torch.int64, dev)
        scales = torch.empty(nseg, dtype=torch.float32, device=dev)
        codes = torch.empty(table.total(q.BLOCK4), dtype=torch.uint8, device=dev)
        clip = float(self.clip or 0.0)
        kernels = kernel_backend(dev)
        if kernels is None:
            scratch = torch.empty(2 * table.total(q.CHUNK), dtype=torch.float32)
            cpu.call("hvdc_tern_encode_many", q.ptr(x), q.ptr(residual), nseg, q.ptr(table.seg), clip, seed, step,
                     q.ptr(ids), q.ptr(scales), q.ptr(codes), q.ptr(scratch), cpu.threads())
        else:
            _cuda_scales_many(kernels, x, residual, table, clip, scales)
            kernels.launch(kernels.kernel(q.SOURCE, "hvdc_seg_tern_encode", dev), q.grid(codes.numel(), q.BLOCK),
                           q.BLOCK, (x, q.dptr(residual), table.seg, np.int32(nseg), np.int64(codes.numel()),
                                     scales, np.uint64(seed), np.uint32(step), ids, codes))
        f = table.bounds[q.BLOCK4]
        return [Payload(n, {"codes": codes[f[s]:f[s + 1]], "scales": scales[s:s + 1]})
                for s, (_, n, _) in enumerate(segments)]

    def decode_many(self, payloads: Sequence[Sequence[Payload]], out: torch.Tensor,
                    segments: Sequence[tuple]) -> torch.Tensor:
        """``out[offset:offset + numel] +=`` the payloads of each segment (offset, numel, key), workers
        in list order: what :meth:`decode_accumulate` of each gives, bit for bit, in one C call
        (``hvdc_tern_decode_many``) or one launch; every payload is checked before anything is
        written."""
        flat = q.decode_target(payloads, out, segments, self._parts)
        workers = {len(ps) for ps in payloads}
        if len(workers) != 1 or not self._batched([n for _, n, *_ in segments]):
            for (o, n, *_), ps in zip(segments, payloads):
                self.decode_accumulate(ps, flat[o:o + n])
            return out
        (nworkers,), nseg = workers, len(segments)
        table = q.segment_table(tuple((o, n) for o, n, *_ in segments), out.device)
        kernels, blocks = kernel_backend(out.device), table.total(q.BLOCK4)
        codes = q.ptr_array([p.parts["codes"] for ps in payloads for p in ps], kernels)
        scales = q.ptr_array([p.parts["scales"] for ps in payloads for p in ps], kernels)
        if kernels is not None:
            kernels.launch(kernels.kernel(q.SOURCE, "hvdc_seg_tern_decode_acc", out.device),
                           q.grid(blocks, q.BLOCK), q.BLOCK,
                           (codes, scales, np.int32(nworkers), table.seg, np.int32(nseg), np.int64(blocks), flat))
        else:
            cpu.call("hvdc_tern_decode_many", codes, scales, nworkers, nseg, q.ptr(table.seg), q.ptr(flat),
                     cpu.threads())
        return out

    def decode_accumulate(self, payloads: Sequence[Payload], out: torch.Tensor) -> torch.Tensor:
        n = payloads[0].numel if payloads else 0
        flat = q.accumulate_target(payloads, out, self._parts(n))
        if n == 0:
            return out
        kernels = kernel_backend(flat.device)
        codes = q.ptr_array([p.parts["codes"] for p in payloads], kernels)
        scales = q.ptr_array([p.parts["scales"] for p in payloads], kernels)
        if kernels is not None:
            fn = kernels.kernel(q.SOURCE, "hvdc_tern_decode_acc", flat.device)
            kernels.launch(fn, q.grid(-(-n // 4), q.BLOCK), q.BLOCK,
                        (codes, scales, np.int32(len(payloads)), np.int64(n),
                         np.int64(self._bucket(n)), flat))
        else:
            cpu.call("hvdc_tern_decode_acc", codes, scales, len(payloads), n, self._bucket(n),
                     q.ptr(flat), cpu.threads())
        return out


def _cuda_long_sum(kernels, g: torch.Tensor, r: torch.Tensor | None, n: int, total: torch.Tensor | None,
                   with_max: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sum of g (+ r) (``total`` None; also max |g + r| when ``with_max``) or of
    (g + r - total / n)^2, in the contract's order: one warp per chunk of HVDC_SUM_CHUNK, then
    the partial sums the same way until one is left.  Returns 1-element device tensors."""
    chunk, dev = q.SUM_CHUNK, g.device
    m = -(-n // chunk)
    partial = torch.empty(m, dtype=torch.float32, device=dev)
    cmax = torch.empty(m, dtype=torch.float32, device=dev) if with_max else None
    kernels.launch(kernels.kernel(q.SOURCE, "hvdc_chunk_sums", dev), q.grid(32 * m, q.BLOCK), q.BLOCK,
                (g, q.dptr(r), np.int64(n), q.dptr(total), partial, q.dptr(cmax)))
    reduce = kernels.kernel(q.SOURCE, "hvdc_reduce_chunks", dev)
    while m > 1:
        m_next = -(-m // chunk)
        p_next = torch.empty(m_next, dtype=torch.float32, device=dev)
        c_next = torch.empty(m_next, dtype=torch.float32, device=dev) if with_max else None
        kernels.launch(reduce, q.grid(32 * m_next, q.BLOCK), q.BLOCK,
                    (partial, np.int64(m), p_next, q.dptr(cmax), q.dptr(c_next)))
        partial, cmax, m = p_next, c_next, m_next
    return partial, cmax


def _cuda_scales(kernels, g: torch.Tensor, r: torch.Tensor | None, n: int, bucket: int, clip: float,
                 scales: torch.Tensor) -> None:
    dev = g.device
    total, maxabs, sq_dev = None, None, None
    if clip > 0 or bucket >= n:
        total, maxabs = _cuda_long_sum(kernels, g, r, n, None, with_max=bucket >= n)
    if clip > 0:
        sq_dev = _cuda_long_sum(kernels, g, r, n, total, with_max=False)[0]
    if bucket < n:
        maxabs = torch.empty(scales.numel(), dtype=torch.float32, device=dev)
        kernels.launch(kernels.kernel(q.SOURCE, "hvdc_bucket_absmax", dev),
                    q.grid(32 * scales.numel(), q.BLOCK), q.BLOCK,
                    (g, q.dptr(r), np.int64(n), np.int64(bucket), maxabs))
    kernels.launch(kernels.kernel(q.SOURCE, "hvdc_tern_finalize", dev), q.grid(scales.numel(), q.BLOCK),
                q.BLOCK, (q.dptr(sq_dev), np.int64(n), np.float32(clip), maxabs,
                          np.int64(scales.numel()), scales))


def _cuda_scales_many(kernels, g: torch.Tensor, r: torch.Tensor | None, table: q.SegmentTable, clip: float,
                      scales: torch.Tensor) -> None:
    """:func:`_cuda_scales` of every tensor of ``table`` (one scale each) in one launch per
    kernel: the chunk sums of the whole bucket, each tensor's to one, again for the squared
    deviations when clipping, then the scales."""
    dev, nseg, chunks = g.device, table.seg.shape[0], table.total(q.CHUNK)
    chunk_sums = kernels.kernel(q.SOURCE, "hvdc_seg_chunk_sums", dev)
    reduce = kernels.kernel(q.SOURCE, "hvdc_seg_reduce", dev)

    def sums(total: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        with_max = total is None
        partial = torch.empty(chunks, dtype=torch.float32, device=dev)
        cmax = torch.empty(chunks, dtype=torch.float32, device=dev) if with_max else None
        kernels.launch(chunk_sums, q.grid(32 * chunks, q.BLOCK), q.BLOCK,
                       (g, q.dptr(r), table.seg, np.int32(nseg), np.int64(chunks), q.dptr(total),
                        partial, q.dptr(cmax)))
        out = torch.empty(nseg, dtype=torch.float32, device=dev)
        out_max = torch.empty(nseg, dtype=torch.float32, device=dev) if with_max else None
        kernels.launch(reduce, q.grid(32 * nseg, q.BLOCK), q.BLOCK,
                       (partial, q.dptr(cmax), table.seg, np.int32(nseg), out, q.dptr(out_max)))
        return out, out_max

    total, maxabs = sums(None)
    sq_dev = sums(total)[0] if clip > 0 else None
    kernels.launch(kernels.kernel(q.SOURCE, "hvdc_seg_tern_finalize", dev), q.grid(nseg, q.BLOCK), q.BLOCK,
                   (q.dptr(sq_dev), table.seg, np.int32(nseg), np.float32(clip), maxabs, scales))
