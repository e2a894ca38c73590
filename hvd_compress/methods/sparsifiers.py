"""Sparsifiers: top-k, Gradient Dropping, AdaComp, STC, random-k."""
from __future__ import annotations

from typing import Any

import torch

from ..codecs.base import Codec
from ..engine.buckets import Bucket
from .base import _FIXED_ROUTES, _SUMMABLE_ROUTES, Method, register


@register
class TopK(Method):
    """Top-k sparsification with sampled thresholds (Lin et al., DGC, ICLR 2018; Aji & Heafield,
    EMNLP 2017): send the ``ratio`` largest-magnitude entries of each tensor (``scope="bucket"``:
    of each bucket, one global threshold) as (int32 index, fp16 value); error feedback on by
    default (what is not sent accumulates).  Routes: sparse allgather, or the two-phase sparse
    allreduce whose bytes per rank stay flat as the world grows."""

    name = "topk"
    pads_on_device = True

    def __init__(self, ratio: float = 0.01, sample_ratio: float = 0.01, *,
                 value_dtype: torch.dtype = torch.float16, exact_k: bool | None = None,
                 mode: str = "sampled", threshold: float | None = None, scope: str = "tensor",
                 error_feedback: bool = True, **options: Any) -> None:
        from ..codecs.topk import TopKCodec
        if scope not in ("tensor", "bucket"):
            raise ValueError(f"scope must be 'tensor' or 'bucket', got {scope!r}")
        self.scope = scope
        super().__init__(TopKCodec(ratio=ratio, sample_ratio=sample_ratio, value_dtype=value_dtype,
                                   exact_k=exact_k, mode=mode, threshold=threshold),
                         error_feedback=error_feedback, **options)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, scope={self.scope!r})"

    def payload_bytes(self, bucket: Bucket, codec: Codec, padded: bool = False) -> float:
        entry = 4 + torch.empty(0, dtype=codec.value_dtype).element_size()
        if codec.mode == "threshold":   # unknown in advance: assume the default 1%
            return entry * 0.01 * bucket.numel
        size = codec.capacity if padded else codec.k     # (a device payload: floor(1.3 k) entries)
        return entry * sum(size(seg.numel) for seg in bucket.segments(self.scope))


@register
class GradDrop(TopK):
    """Gradient Dropping (Aji & Heafield, EMNLP 2017): drop the ``drop_ratio`` smallest entries
    (default 99%: keep 1%) of a whole bucket by **one** threshold, estimated from a 0.1% sample,
    after **layer normalization**: each tensor's g' = g + r is divided by its max |g'| for the
    selection (so layers with small gradients still send their relatively large entries), the
    values travel un-normalized (no factors on the wire); error feedback keeps the rest.  The
    top-k codec's sampled machinery does the selection
    (:class:`~hvd_compress.codecs.topk.GradDropCodec`).  6 bytes per sent entry (fp16 values).
    Routes: sparse allgather or the sparse two-phase allreduce (whose owners re-sparsify their
    slice as one tensor)."""

    name = "graddrop"

    def __init__(self, drop_ratio: float = 0.99, sample_ratio: float = 0.001, *, layer_norm: bool = True,
                 value_dtype: torch.dtype = torch.float16, **options: Any) -> None:
        from fractions import Fraction

        from ..codecs.topk import GradDropCodec
        if not 0.0 <= drop_ratio < 1.0:
            raise ValueError(f"drop_ratio must lie in [0, 1), got {drop_ratio}")
        self.scope = "bucket"
        Method.__init__(self, GradDropCodec(ratio=float(1 - Fraction(str(float(drop_ratio)))),
                                            sample_ratio=sample_ratio, value_dtype=value_dtype,
                                            layer_norm=layer_norm),
                        error_feedback=True, **options)


@register
class AdaComp(Method):
    """AdaComp (Chen et al., AAAI 2018): per bin of L elements (50 for convolution weights, 500
    otherwise, the paper's L_T), with H = r + g, send the entries with |H + g| >= max_bin |H| as a
    sign bit each plus one fp32 scale per bin (the mean |H| of the bin's sent entries); the rest
    and the quantization error stay in the residual (error feedback is the method: always on).
    The compression rate adapts to the gradients by itself (no ratio to set).  Wire per tensor:
    4 bytes + 1 bit per sent entry + 4 bytes per bin.  Allgather only (see
    docs/methods-sparse-adaptive.md)."""

    name = "adacomp"

    def __init__(self, bin_size: int | None = None, conv_bin_size: int = 50, fc_bin_size: int = 500, **options: Any) -> None:
        from ..codecs.ternary import AdaCompCodec
        super().__init__(AdaCompCodec(bin_size=bin_size, conv_bin_size=conv_bin_size, fc_bin_size=fc_bin_size),
                         error_feedback=True, **options)

    #: entries a bin sends per step, for the plan's byte estimate (about 3.8 averaged over the
    #: digits CNN's training, docs/methods-sparse-adaptive.md)
    ENTRIES_PER_BIN = 4.0

    def candidates(self) -> dict:
        return {"allgather": _FIXED_ROUTES["allgather"]}

    def payload_bytes(self, bucket: Bucket, codec: Codec, padded: bool = False) -> float:
        total = 0.0
        for m in bucket.members:
            bins = codec.with_layout([m.shape]).n_bins(m.numel)
            entries = min(m.numel, self.ENTRIES_PER_BIN * bins)
            total += 4 * entries + entries / 8 + 4 * bins
        return total


@register
class STC(Method):
    """Sparse Ternary Compression (Sattler, Wiedemann, Mueller, Samek, IEEE TNNLS 2019): the exact
    top-k (k = ceil(p n), default p = 1/400) of v = g + r per tensor, each replaced by mu sign(v_i)
    (mu the mean |v| of the k), error feedback; positions as Golomb-Rice coded gaps with the
    paper's b* = 1 + floor(log2(log(phi - 1) / log(1 - p))): about b* + 3 bits per entry (11.1 at
    p = 1/400) + 4 bytes per tensor.  Allgather only."""

    name = "stc"

    def __init__(self, ratio: float = 0.0025, sample_ratio: float = 0.01, **options: Any) -> None:
        from ..codecs.ternary import STCCodec
        super().__init__(STCCodec(ratio=ratio, sample_ratio=sample_ratio), error_feedback=True,
                         **options)

    def candidates(self) -> dict:
        return {"allgather": _FIXED_ROUTES["allgather"]}

    def payload_bytes(self, bucket: Bucket, codec: Codec, padded: bool = False) -> float:
        return sum(codec.expected_nbytes(seg.numel) for seg in bucket.segments(self.scope))


@register
class RandomK(Method):
    """Random-k (Konečný et al. 2016's random mask; Stich et al. 2018): each step every
    rank keeps the same ``ratio`` of each tensor's entries, chosen by a key all ranks share, so
    only the k values travel and an fp32 allreduce sums them (no indices on the wire).  Error
    feedback (default) keeps the rest; ``unbiased=True`` scales the values by n/k instead.
    4 bytes per kept entry."""

    name = "randomk"

    def __init__(self, ratio: float = 0.01, *, unbiased: bool = False, **options: Any) -> None:
        from ..codecs.randk import RandomKCodec
        super().__init__(RandomKCodec(ratio=ratio, unbiased=unbiased), error_feedback=not unbiased,
                         **options)

    def candidates(self) -> dict:
        return {"allreduce": _SUMMABLE_ROUTES["allreduce"]}

    def payload_bytes(self, bucket: Bucket, codec: Codec, padded: bool = False) -> float:
        return 4 * sum(codec.k(seg.numel) for seg in bucket.segments(self.scope))
