"""Sign methods: 1-bit SGD, EF-signSGD, signSGD with majority vote."""
from __future__ import annotations

from typing import Any

from .base import _FIXED_ROUTES, Method, register


@register
class OneBit(Method):
    """1-bit SGD (Seide, Fu, Droppo, Li, Yu, Interspeech 2014): one sign bit per element and two
    fp32 reconstruction values per tensor (or ``bucket_size`` elements), the means of the
    non-negative and of the negative entries of v = g + e; error feedback always on (the
    method's point).  On the two-phase route the owner re-encodes the sum with its own error
    feedback: the compressed allreduce of DeepSpeed's 1-bit Adam and DoubleSqueeze (Tang et al.
    2019).  1 bit per element + 8 bytes per tensor."""

    name = "onebit"

    def __init__(self, bucket_size: int | None = None, **options: Any) -> None:
        from ..codecs.sign import OneBitCodec
        super().__init__(OneBitCodec(bucket_size=bucket_size), error_feedback=True, **options)


@register
class EFSignSGD(Method):
    """EF-signSGD (Karimireddy, Rebjock, Stich, Jaggi, ICML 2019): ``C(v) = (||v||_1 / d) sign(v)``
    per tensor (or ``bucket_size`` elements) with error feedback, v = g + e; a delta-approximate
    compressor, so error feedback converges.  1 bit per element + 4 bytes per tensor."""

    name = "efsignsgd"

    def __init__(self, bucket_size: int | None = None, **options: Any) -> None:
        from ..codecs.sign import ScaledSignCodec
        super().__init__(ScaledSignCodec(bucket_size=bucket_size), error_feedback=True,
                         **options)


@register
class SignSGD(Method):
    """signSGD with majority vote (Bernstein et al., ICML 2018 and ICLR 2019): every worker sends
    sign(g) and m = ||g||_1 / d per tensor; the aggregate is sign(sum of the signs) times the mean
    m, so a script's SGD learning rate still works (the update has the workers' mean L1 gradient
    length; see :class:`~hvd_compress.codecs.sign.MajorityVoteCodec`).  No error feedback (the
    vote is the method).  Allgather only (a vote of votes is another method).  1 bit per element
    + 4 bytes per tensor."""

    name = "signsgd"

    def __init__(self, **options: Any) -> None:
        from ..codecs.sign import MajorityVoteCodec
        super().__init__(MajorityVoteCodec(), error_feedback=False, **options)

    def candidates(self) -> dict:
        return {"allgather": _FIXED_ROUTES["allgather"]}
