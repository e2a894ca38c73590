"""Quantizers: TernGrad, QSGD, stochastic fp16, the sketched update (rotation + levels)."""
from __future__ import annotations

import dataclasses
from typing import Any

from ..codecs.base import Codec
from ..engine.buckets import Bucket
from .base import _FIXED_ROUTES, _SHARED_SCALE_ROUTES, Method, register


@register
class TernGrad(Method):
    """TernGrad (Wen et al., NeurIPS 2017): ``s * sign(g) * b``, ``b ~ Bernoulli(|g|/s)``,
    ``s = max|g|`` per tensor (the paper's layer-wise scaling; or per ``bucket_size`` elements)
    after clipping at ``clip * sigma``; 2 bits per element + fp32 scales on the wire.  Unbiased
    without clipping; error feedback optional.  ``clip="auto"`` (the default) clips at the
    factor minimizing the averaged gradient's per-element error ``bias^2 + variance / N`` for
    the job's N workers (:func:`hvd_compress.codecs.terngrad.optimal_clip`: 1.0 sigma at one
    worker, 1.23 at 2, 1.69 at 8, 2.15 at 32); ``clip=2.5`` is the paper's setting, ``clip=1.0``
    the one-worker optimum, ``clip=None`` no clipping (unbiased).

    ``shared_scale=True`` is the paper's scale sharing: the ranks first agree on
    ``s = max over ranks`` (a small max-allreduce per bucket), encode with it, and the codes are
    summed by an fp16 allreduce (exact up to 2048 ranks), 2 bytes per element.  Only worth it
    where an fp16 allreduce beats gathering 2-bit codes; the default gathers codes.
    """

    name = "terngrad"

    def __init__(self, clip: float | str | None = "auto", bucket_size: int | None = None, *,
                 shared_scale: bool = False, error_feedback: bool = False, **options: Any) -> None:
        from ..codecs.terngrad import TernGradCodec, optimal_clip
        if isinstance(clip, str) and clip != "auto":
            raise ValueError(f"terngrad: clip must be a positive number, None or 'auto', got {clip!r}")
        self.shared_scale = shared_scale
        self.clip = clip
        codec = TernGradCodec(bucket_size=bucket_size, clip=optimal_clip(1) if clip == "auto" else clip)
        super().__init__(codec, error_feedback=error_feedback, **options)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, clip={self.clip!r}, shared_scale={self.shared_scale})"

    def codec_at(self, step: int, world: int = 1) -> Codec:
        if self.clip != "auto":
            return self.codec
        from ..codecs.terngrad import optimal_clip
        return dataclasses.replace(self.codec, clip=optimal_clip(world))

    def candidates(self) -> dict:
        return _SHARED_SCALE_ROUTES if self.shared_scale else _FIXED_ROUTES

    def payload_bytes(self, bucket: Bucket, codec: Codec, padded: bool = False) -> float:
        return 2 * bucket.numel if self.shared_scale else super().payload_bytes(bucket, codec, padded)


@register
class QSGD(Method):
    """QSGD (Alistarh et al., NeurIPS 2017): unbiased stochastic rounding of ``|g_i| / ||g||``
    to ``2^(bits-1) - 1`` levels per bucket of ``bucket_size`` elements; ``bits`` per element +
    one fp32 norm per bucket.  Norm buckets run over the engine's fused buffer (as CGX's).

    ``norm="max"`` (the default) scales each bucket by max |g_i|, as practical implementations
    do; ``norm="l2"`` is the paper's ||g||_2, whose variance bound min(n/s^2, sqrt(n)/s) ||g||^2
    is 3.2 ||g||^2 at 4 bits and 512 elements.  Same bytes; on Gaussian buckets the max-norm
    error is ~40x smaller (:class:`~hvd_compress.codecs.qsgd.QSGDCodec`), and in the convergence
    study (docs/convergence.md) the L2 variant misses the char-level GRU by 31% of held-out loss
    where max-norm is within 0.3% of uncompressed."""

    name = "qsgd"
    scope = "bucket"

    def __init__(self, bits: int = 4, bucket_size: int = 512, norm: str = "max", *,
                 error_feedback: bool = False, **options: Any) -> None:
        from ..codecs.qsgd import QSGDCodec
        super().__init__(QSGDCodec(bits=bits, bucket_size=bucket_size, norm=norm), error_feedback=error_feedback,
                         **options)


@register
class FP16(Method):
    """fp32 -> fp16 with unbiased stochastic rounding (``stochastic=False``: round to nearest,
    exactly Horovod's ``Compression.fp16``); summed by Horovod's fp16 allreduce, 2 bytes per
    element; overflow gives inf, so loss scalers back off."""

    name = "fp16"
    scope = "bucket"

    def __init__(self, stochastic: bool = True, *, error_feedback: bool = False, **options: Any) -> None:
        from ..codecs.fp16 import HalfCodec, StochasticFP16Codec
        if error_feedback and not stochastic:
            raise ValueError("FP16(stochastic=False) has no error feedback")
        self.stochastic = stochastic
        super().__init__(StochasticFP16Codec() if stochastic else HalfCodec(),
                         error_feedback=error_feedback, **options)


@register
class Sketch(Method):
    """Sketched update (Konečný et al. 2016): a randomized Hadamard rotation (random
    signs from a key every rank shares), optional subsampling of the rotated coordinates
    (``ratio``), and stochastic ``bits``-bit quantization between each block's min and max; decode
    sums the workers in the rotated domain and rotates back once.  The rotation spreads a few
    large entries over the block, which cuts QSGD's error at the same bits on heavy-tailed
    gradients (docs/codecs-seed-methods.md).  Unbiased; no error feedback."""

    name = "sketch"
    scope = "bucket"

    def __init__(self, bits: int = 4, block_size: int = 1024, ratio: float = 1.0, **options: Any) -> None:
        from ..codecs.sketch import SketchCodec
        super().__init__(SketchCodec(bits=bits, block_size=block_size, ratio=ratio), error_feedback=False,
                         **options)
