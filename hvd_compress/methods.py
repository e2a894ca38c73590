"""The compressors users name: ``hvd.DistributedOptimizer(..., compression=hvd_compress.TernGrad())``.

Each is a :class:`Method`: a codec with the defaults of its paper, the method's hooks into the
engine (how its bucket input is prepared, what happens after encoding), the routes its payloads
can take, and, through :class:`~hvd_compress.adaptor.Compressor`, Horovod's interface.
:func:`from_spec` builds one from a command-line string.
"""
from __future__ import annotations

import ast
import dataclasses
import math
from typing import Any

import torch

from .adaptor import Compressor
from .codecs.base import Codec, RandomKey
from .engine.buckets import Bucket
from .engine.plan import AUTO, COMPRESSED
from .engine.state import BUCKET, MEMBER, BucketState
from .routes.base import Link, Pending
from .validate import checked
from .routes.gather import GatherRoute
from .routes.sparse_two_phase import SparseTwoPhaseRoute
from .routes.summable import SharedScaleRoute, SummableRoute
from .routes.two_phase import TwoPhaseRoute

_FIXED_ROUTES = {"allgather": GatherRoute(), "two_phase": TwoPhaseRoute()}
_SPARSE_ROUTES = {"allgather": GatherRoute(), "sparse_two_phase": SparseTwoPhaseRoute()}
_SUMMABLE_ROUTES = {"allreduce": SummableRoute(), "allgather": GatherRoute()}
_SHARED_SCALE_ROUTES = {"allreduce": SharedScaleRoute()}


class Method(Compressor):
    """A compression method: one codec (with error feedback or not) for every parameter.

    Args (common to every method):
        error_feedback: keep a residual per parameter, ``r <- g + r - D(C(g + r))`` (Seide et
            al. 2014; Karimireddy et al. 2019).
        min_numel: parameters with fewer elements go uncompressed (dense buckets).
        seed: 64-bit seed of the Philox streams (each rank draws its own stream from it).
        route: ``"auto"`` (cost model; dense where compression would not pay), ``"compressed"``
            (cost model among the compressed routes only), or a route name to force.
        hierarchy: on several hosts of several ranks each, ``"auto"`` lets the cost model pick
            the hierarchical form of a route (exact inside a host, compressed between hosts:
            :mod:`hvd_compress.routes.hierarchical`), ``True`` requires it where the topology
            allows, ``False`` keeps the flat routes.
        bucket_cap_mb, link, intra_link: see :class:`~hvd_compress.adaptor.Compressor`.
    """

    name = "method"
    #: "tensor": one segment per parameter (per-tensor semantics); "bucket": one per bucket
    scope = "tensor"
    #: per-bucket state buffers that hold NaN by design (eSGD's "no loss seen yet"): a
    #: checkpoint's other buffers must be finite
    nan_buffers: tuple[str, ...] = ()
    #: prepare() sends something else than the gradient (DGC's momentum): dense buckets must
    #: then go through the engine, not straight to Horovod's allreduce
    transforms_gradients = False
    #: its routes may run hierarchically (compress each host's sum): False where the method's
    #: state follows each rank's own payload (DGC's momentum masks, eSGD, LAQ, DIANA) or its
    #: route works on the members' shapes (PowerSGD)
    hierarchical = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every method's constructor checks its arguments against its type hints."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "__checked__", False):
            cls.__init__ = checked(init)

    @checked
    def __init__(self, codec: Codec | None, *, error_feedback: bool, min_numel: int = 1024,
                 seed: int = 0, route: str = AUTO, hierarchy: bool | str = AUTO,
                 bucket_cap_mb: float = 25.0, link: Link | str = "auto",
                 intra_link: Link | str = "auto") -> None:
        super().__init__(bucket_cap_mb=bucket_cap_mb, link=link, intra_link=intra_link)
        if min_numel < 0 or not 0 <= seed < 2 ** 64:
            raise ValueError(f"need min_numel >= 0 and 0 <= seed < 2**64, got {min_numel}, {seed}")
        if hierarchy not in (True, False, AUTO):
            raise ValueError(f"{self.name}: hierarchy must be True, False or 'auto', got {hierarchy!r}")
        self.hierarchy = hierarchy
        self.codec = codec
        if codec is not None and route not in (AUTO, COMPRESSED, "dense", *self.candidates()):
            raise ValueError(f"{self.name}: route must be 'auto', 'compressed', 'dense' or one of "
                             f"{sorted(self.candidates())}, got {route!r}")
        self.error_feedback = error_feedback
        self.min_numel = int(min_numel)
        self.seed = int(seed)
        self.route = route

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.codec!r}, error_feedback={self.error_feedback}, "
                f"{self._options()})")

    def _options(self) -> str:
        """The options every method shares, as its repr writes them."""
        return (f"min_numel={self.min_numel}, seed={self.seed}, route={self.route!r}, "
                f"hierarchy={self.hierarchy!r}, bucket_cap_mb={self.bucket_cap_mb}, link={self.link!r}, "
                f"intra_link={self.intra_link!r}")

    def method_for(self, name: str) -> "Method":
        return self

    # -- what the engine asks ------------------------------------------------------------------

    def codec_at(self, step: int, world: int = 1) -> Codec:
        """The codec of the engine's ``step``-th committed step in a job of ``world`` ranks
        (schedules and settings that depend on the number of workers override this)."""
        return self.codec

    def candidates(self) -> dict:
        """The compressed routes this method's payloads can take, by name."""
        if self.codec is None:
            return {}
        if self.codec.summable:
            return _SUMMABLE_ROUTES
        return _FIXED_ROUTES if self.codec.fixed_size else _SPARSE_ROUTES

    def payload_bytes(self, bucket: Bucket, codec: Codec) -> float:
        """This rank's payload bytes for the bucket per step (exact for fixed-size codecs)."""
        return sum(codec.payload_nbytes(seg.numel) for seg in bucket.segments(self.scope))

    def prepare(self, bucket: Bucket, grads: list[torch.Tensor | None], x: torch.Tensor,
                state: BucketState, comm: Any) -> torch.Tensor:
        """Fill the bucket's flat fp32 input from the members' gradients (None: absent this
        step, zeros) and return the tensor to send."""
        for g, m, offset in zip(grads, bucket.members, bucket.offsets):
            part = x[offset:offset + m.numel]
            if g is None:
                part.zero_()
            else:
                part.copy_(g.reshape(-1))
        return x

    def after_encode(self, bucket: Bucket, pending: Pending, state: BucketState) -> None:
        """Called after a compressed route started (DGC masks its momentum here)."""

    def after_decode(self, bucket: Bucket, out: torch.Tensor, state: BucketState, comm: Any) -> None:
        """Called in the flush once the bucket's compressed route finished, before the write-back,
        on every rank in bucket order: ``out`` is the decoded sum over ranks (flat fp32, the
        bucket's layout), which the method may rewrite in place (DIANA adds its shift, LAQ
        delivers its running aggregate).  State changes go through working buffers
        (``state.buffer(name, device).begin()``, or the working tensor of a buffer begun in
        :meth:`prepare`), so a step rolled back (a non-finite gradient anywhere) leaves no trace."""

    def check_optimizer(self, optimizer, names: list[str]) -> str | None:
        """A message when this method cannot serve these parameters of ``optimizer``."""
        return None

    def state_names(self) -> dict[str, str]:
        """The engine state buffers this method keeps (all a checkpoint may restore), each
        ``"member"`` (laid out like the bucket: saved per parameter, survives a new bucket
        layout) or ``"bucket"`` (saved per bucket, kept for the same layout only): the
        error-feedback residual and the two-phase owner's server residual with error feedback."""
        return {"residual": MEMBER, "server": BUCKET} if self.error_feedback else {}


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
        from .codecs.terngrad import TernGradCodec, optimal_clip
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
        from .codecs.terngrad import optimal_clip
        return dataclasses.replace(self.codec, clip=optimal_clip(world))

    def candidates(self) -> dict:
        return _SHARED_SCALE_ROUTES if self.shared_scale else _FIXED_ROUTES

    def payload_bytes(self, bucket: Bucket, codec: Codec) -> float:
        return 2 * bucket.numel if self.shared_scale else super().payload_bytes(bucket, codec)


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
        from .codecs.qsgd import QSGDCodec
        super().__init__(QSGDCodec(bits=bits, bucket_size=bucket_size, norm=norm), error_feedback=error_feedback,
                         **options)


class TopK(Method):
    """Top-k sparsification with sampled thresholds (Lin et al., DGC, ICLR 2018; Aji & Heafield,
    EMNLP 2017): send the ``ratio`` largest-magnitude entries of each tensor (``scope="bucket"``:
    of each bucket, one global threshold) as (int32 index, fp16 value); error feedback on by
    default (what is not sent accumulates).  Routes: sparse allgather, or the two-phase sparse
    allreduce whose bytes per rank stay flat as the world grows."""

    name = "topk"

    def __init__(self, ratio: float = 0.01, sample_ratio: float = 0.01, *,
                 value_dtype: torch.dtype = torch.float16, exact_k: bool | None = None,
                 mode: str = "sampled", threshold: float | None = None, scope: str = "tensor",
                 error_feedback: bool = True, **options: Any) -> None:
        from .codecs.topk import TopKCodec
        if scope not in ("tensor", "bucket"):
            raise ValueError(f"scope must be 'tensor' or 'bucket', got {scope!r}")
        self.scope = scope
        super().__init__(TopKCodec(ratio=ratio, sample_ratio=sample_ratio, value_dtype=value_dtype,
                                   exact_k=exact_k, mode=mode, threshold=threshold),
                         error_feedback=error_feedback, **options)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, scope={self.scope!r})"

    def payload_bytes(self, bucket: Bucket, codec: Codec) -> float:
        entry = 4 + torch.empty(0, dtype=codec.value_dtype).element_size()
        if codec.mode == "threshold":   # unknown in advance: assume the default 1%
            return entry * 0.01 * bucket.numel
        return entry * sum(codec.k(seg.numel) for seg in bucket.segments(self.scope))


class DGC(TopK):
    """Deep Gradient Compression (Lin et al., ICLR 2018): top-k with sampled thresholds plus

    * **momentum correction**: the compressor keeps the momentum, ``u <- m u + g``, and
      accumulates ``v <- v + u`` (the error-feedback residual); the top entries of ``v`` are sent
      and zeroed in ``v``.  The wrapped optimizer must be SGD with ``momentum=0`` (checked):
      momentum happens here, before sparsification, which is the point of the correction.
      Parameters below ``min_numel`` send ``u`` densely, i.e. plain momentum SGD.
    * **local gradient clipping** (optional): ``g <- g * min(1, clip_norm / (sqrt(N) ||g||))``
      per tensor before it enters ``u``, the paper's threshold scaled by ``N^-1/2``.
    * **momentum factor masking**: ``u`` is zeroed where ``v`` was sent.
    * **sparsity warm-up**: over the first ``warmup_steps`` committed steps the density falls
      geometrically in four stages from ``warmup_ratio`` (DGC: 25%) to ``ratio``.

    Momentum and residual are state: checkpoint them with ``state_dict()``.
    """

    hierarchical = False
    name = "dgc"
    #: the wrapped optimizer must not apply momentum again (examples/ read this)
    owns_momentum = True
    transforms_gradients = True
    _STAGES = 4

    def __init__(self, ratio: float = 0.001, momentum: float = 0.9, *, clip_norm: float | None = None,
                 warmup_steps: int = 0, warmup_ratio: float = 0.25, sample_ratio: float = 0.01,
                 value_dtype: torch.dtype = torch.float16, scope: str = "tensor", **options: Any) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if warmup_steps < 0 or not 0 < ratio <= 1 or (warmup_steps and not ratio <= warmup_ratio <= 1):
            raise ValueError("need 0 < ratio <= 1, warmup_steps >= 0 and, with warm-up, "
                             f"ratio <= warmup_ratio <= 1 (got ratio={ratio}, "
                             f"warmup_ratio={warmup_ratio}, warmup_steps={warmup_steps})")
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm}")
        super().__init__(ratio=ratio, sample_ratio=sample_ratio, value_dtype=value_dtype,
                         scope=scope, error_feedback=True, **options)
        self.momentum = momentum
        self.clip_norm = clip_norm
        self.warmup_steps = warmup_steps
        self.warmup_ratio = warmup_ratio
        self._codecs: dict[float, Codec] = {}

    def __repr__(self) -> str:
        return (f"{super().__repr__()[:-1]}, momentum={self.momentum}, clip_norm={self.clip_norm}, "
                f"warmup_steps={self.warmup_steps}, warmup_ratio={self.warmup_ratio})")

    def density(self, step: int) -> float:
        """Fraction of entries sent at the engine's ``step``-th committed step."""
        if step >= self.warmup_steps:
            return self.codec.ratio
        stage = step * self._STAGES // self.warmup_steps
        return self.warmup_ratio * (self.codec.ratio / self.warmup_ratio) ** (stage / self._STAGES)

    def codec_at(self, step: int, world: int = 1) -> Codec:
        density = self.density(step)
        if density not in self._codecs:  # at most 5: the warm-up stages and the final ratio
            from .codecs.topk import TopKCodec
            c = self.codec
            self._codecs[density] = TopKCodec(ratio=density, sample_ratio=c.sample_ratio,
                                              value_dtype=c.value_dtype, exact_k=c.exact_k, mode=c.mode)
        return self._codecs[density]

    def prepare(self, bucket, grads, x, state, comm):
        # u_new = m u + g, written out of place: the committed u changes only at commit.
        momentum = state.buffer("momentum", x.device)
        u_old, u_new = momentum.committed, momentum.begin(copy=False)
        bound = None if self.clip_norm is None else self.clip_norm / math.sqrt(comm.size)
        for g, m, offset in zip(grads, bucket.members, bucket.offsets):
            part = slice(offset, offset + m.numel)
            torch.mul(u_old[part], self.momentum, out=u_new[part])
            if g is not None:
                g = g.detach().reshape(-1).to(torch.float32)
                if bound is not None:
                    g = g * torch.clamp(bound / (g.norm() + 1e-12), max=1.0)
                u_new[part].add_(g)
        return u_new

    def after_encode(self, bucket, pending, state):
        # momentum factor masking: u <- 0 where v was sent (this rank's own entries)
        u_new = state.buffers["momentum"].working
        for payload, seg in zip(pending.payloads, bucket.segments(self.scope)):
            sent = payload.parts["indices"].to(torch.int64) + seg.offset
            u_new.index_fill_(0, sent, 0.0)

    def state_names(self) -> dict[str, str]:
        return {**super().state_names(), "momentum": MEMBER}

    def check_optimizer(self, optimizer, names):
        if not isinstance(optimizer, torch.optim.SGD):
            return (f"DGC replaces SGD's momentum (momentum correction, Lin et al. 2018) and cannot "
                    f"be combined with {type(optimizer).__mro__[1].__name__}: use "
                    "hvd_compress.TopK (error feedback without momentum) with other optimizers")
        for group in optimizer.param_groups:
            if group["momentum"]:
                return (f"DGC applies momentum itself (momentum correction, Lin et al. 2018) but the "
                        f"optimizer has momentum={group['momentum']}: build the optimizer with "
                        "momentum=0 and pass the momentum to DGC(momentum=...)")
        return None


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

        from .codecs.topk import GradDropCodec
        if not 0.0 <= drop_ratio < 1.0:
            raise ValueError(f"drop_ratio must lie in [0, 1), got {drop_ratio}")
        self.scope = "bucket"
        Method.__init__(self, GradDropCodec(ratio=float(1 - Fraction(str(float(drop_ratio)))),
                                            sample_ratio=sample_ratio, value_dtype=value_dtype,
                                            layer_norm=layer_norm),
                        error_feedback=True, **options)


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
        from .codecs.ternary import AdaCompCodec
        super().__init__(AdaCompCodec(bin_size=bin_size, conv_bin_size=conv_bin_size, fc_bin_size=fc_bin_size),
                         error_feedback=True, **options)

    #: entries a bin sends per step, for the plan's byte estimate (about 3.8 averaged over the
    #: digits CNN's training, docs/methods-sparse-adaptive.md)
    ENTRIES_PER_BIN = 4.0

    def candidates(self) -> dict:
        return {"allgather": _FIXED_ROUTES["allgather"]}

    def payload_bytes(self, bucket: Bucket, codec: Codec) -> float:
        total = 0.0
        for m in bucket.members:
            bins = codec.with_layout([m.shape]).n_bins(m.numel)
            entries = min(m.numel, self.ENTRIES_PER_BIN * bins)
            total += 4 * entries + entries / 8 + 4 * bins
        return total


class STC(Method):
    """Sparse Ternary Compression (Sattler, Wiedemann, Mueller, Samek, IEEE TNNLS 2019): the exact
    top-k (k = ceil(p n), default p = 1/400) of v = g + r per tensor, each replaced by mu sign(v_i)
    (mu the mean |v| of the k), error feedback; positions as Golomb-Rice coded gaps with the
    paper's b* = 1 + floor(log2(log(phi - 1) / log(1 - p))): about b* + 3 bits per entry (11.1 at
    p = 1/400) + 4 bytes per tensor.  Allgather only."""

    name = "stc"

    def __init__(self, ratio: float = 0.0025, sample_ratio: float = 0.01, **options: Any) -> None:
        from .codecs.ternary import STCCodec
        super().__init__(STCCodec(ratio=ratio, sample_ratio=sample_ratio), error_feedback=True,
                         **options)

    def candidates(self) -> dict:
        return {"allgather": _FIXED_ROUTES["allgather"]}

    def payload_bytes(self, bucket: Bucket, codec: Codec) -> float:
        return sum(codec.expected_nbytes(seg.numel) for seg in bucket.segments(self.scope))


class FP16(Method):
    """fp32 -> fp16 with unbiased stochastic rounding (``stochastic=False``: round to nearest,
    exactly Horovod's ``Compression.fp16``); summed by Horovod's fp16 allreduce, 2 bytes per
    element; overflow gives inf, so loss scalers back off."""

    name = "fp16"
    scope = "bucket"

    def __init__(self, stochastic: bool = True, *, error_feedback: bool = False, **options: Any) -> None:
        from .codecs.fp16 import HalfCodec, StochasticFP16Codec
        if error_feedback and not stochastic:
            raise ValueError("FP16(stochastic=False) has no error feedback")
        self.stochastic = stochastic
        super().__init__(StochasticFP16Codec() if stochastic else HalfCodec(),
                         error_feedback=error_feedback, **options)


class OneBit(Method):
    """1-bit SGD (Seide, Fu, Droppo, Li, Yu, Interspeech 2014): one sign bit per element and two
    fp32 reconstruction values per tensor (or ``bucket_size`` elements), the means of the
    non-negative and of the negative entries of v = g + e; error feedback always on (the
    method's point).  On the two-phase route the owner re-encodes the sum with its own error
    feedback: the compressed allreduce of DeepSpeed's 1-bit Adam and DoubleSqueeze (Tang et al.
    2019).  1 bit per element + 8 bytes per tensor."""

    name = "onebit"

    def __init__(self, bucket_size: int | None = None, **options: Any) -> None:
        from .codecs.sign import OneBitCodec
        super().__init__(OneBitCodec(bucket_size=bucket_size), error_feedback=True, **options)


class EFSignSGD(Method):
    """EF-signSGD (Karimireddy, Rebjock, Stich, Jaggi, ICML 2019): ``C(v) = (||v||_1 / d) sign(v)``
    per tensor (or ``bucket_size`` elements) with error feedback, v = g + e; a delta-approximate
    compressor, so error feedback converges.  1 bit per element + 4 bytes per tensor."""

    name = "efsignsgd"

    def __init__(self, bucket_size: int | None = None, **options: Any) -> None:
        from .codecs.sign import ScaledSignCodec
        super().__init__(ScaledSignCodec(bucket_size=bucket_size), error_feedback=True,
                         **options)


class SignSGD(Method):
    """signSGD with majority vote (Bernstein et al., ICML 2018 and ICLR 2019): every worker sends
    sign(g) and m = ||g||_1 / d per tensor; the aggregate is sign(sum of the signs) times the mean
    m, so a script's SGD learning rate still works (the update has the workers' mean L1 gradient
    length; see :class:`~hvd_compress.codecs.sign.MajorityVoteCodec`).  No error feedback (the
    vote is the method).  Allgather only (a vote of votes is another method).  1 bit per element
    + 4 bytes per tensor."""

    name = "signsgd"

    def __init__(self, **options: Any) -> None:
        from .codecs.sign import MajorityVoteCodec
        super().__init__(MajorityVoteCodec(), error_feedback=False, **options)

    def candidates(self) -> dict:
        return {"allgather": _FIXED_ROUTES["allgather"]}


class RandomK(Method):
    """Random-k (Konečný et al. 2016's random mask; Stich et al. 2018): each step every
    rank keeps the same ``ratio`` of each tensor's entries, chosen by a key all ranks share, so
    only the k values travel and an fp32 allreduce sums them (no indices on the wire).  Error
    feedback (default) keeps the rest; ``unbiased=True`` scales the values by n/k instead.
    4 bytes per kept entry."""

    name = "randomk"

    def __init__(self, ratio: float = 0.01, *, unbiased: bool = False, **options: Any) -> None:
        from .codecs.randk import RandomKCodec
        super().__init__(RandomKCodec(ratio=ratio, unbiased=unbiased), error_feedback=not unbiased,
                         **options)

    def candidates(self) -> dict:
        return {"allreduce": _SUMMABLE_ROUTES["allreduce"]}

    def payload_bytes(self, bucket: Bucket, codec: Codec) -> float:
        return 4 * sum(codec.k(seg.numel) for seg in bucket.segments(self.scope))


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
        from .codecs.sketch import SketchCodec
        super().__init__(SketchCodec(bits=bits, block_size=block_size, ratio=ratio), error_feedback=False,
                         **options)


class PowerSGD(Method):
    """PowerSGD (Vogels, Karimireddy, Jaggi, NeurIPS 2019): rank-``rank`` approximation of each
    weight matrix by one power iteration with warm start, P = M Q and Q = M^T orth(P) summed by
    two allreduces, error feedback always on; tensors whose matrix view would not shrink by
    ``min_compression_rate`` (PyTorch's hook's rule) travel dense in the same bucket.
    ``structured=True`` is Konečný et al.'s structured update: Q a fresh random basis from the shared
    seed each step, only P sent.  (n + m) r fp32 per n x m matrix."""

    hierarchical = False
    name = "powersgd"

    def __init__(self, rank: int = 2, min_compression_rate: float = 2.0, *, structured: bool = False,
                 **options: Any) -> None:
        from .routes.low_rank import PowerSGDRoute
        if rank < 1 or min_compression_rate < 1:
            raise ValueError(f"need rank >= 1 and min_compression_rate >= 1, got {rank}, {min_compression_rate}")
        self.rank, self.min_compression_rate, self.structured = rank, min_compression_rate, structured
        self._route = PowerSGDRoute(rank, min_compression_rate, structured)
        super().__init__(None, error_feedback=True, **options)

    def state_names(self) -> dict[str, str]:
        return {"residual": MEMBER, "powersgd_q": BUCKET}

    def __repr__(self) -> str:
        return (f"PowerSGD(rank={self.rank}, min_compression_rate={self.min_compression_rate}, "
                f"structured={self.structured}, {self._options()})")

    def candidates(self) -> dict:
        return {"powersgd": self._route}

    def payload_bytes(self, bucket: Bucket, codec: Codec | None) -> float:
        from .routes.low_rank import matrix_shape, pays
        total = 0
        for m in bucket.members:
            if pays(m.shape, self.rank, self.min_compression_rate):
                n, cols = matrix_shape(m.shape)
                total += (n + cols) * min(self.rank, n, cols) * (1 if not self.structured else n / (n + cols))
            else:
                total += m.numel
        return 4 * total


class _AggregateMethod(Method):
    """Base of the methods whose state follows the decoded aggregate (eSGD, LAQ, DIANA): their
    :meth:`prepare` sends something else than the gradient and their :meth:`after_decode` reads
    or rewrites the sum, so a bucket must take a compressed route (``route="compressed"`` or
    ``"allgather"``; ``"auto"`` and ``"dense"`` are refused).  Buckets that are dense anyway
    (members below ``min_numel``, a single rank) send the plain gradient."""

    scope = "bucket"

    hierarchical = False   # the state follows each rank's own payload

    def __init__(self, codec: Codec, *, route: str, **options: Any) -> None:
        if route in (AUTO, "dense"):
            raise ValueError(f"{self.name}: route must be 'compressed' or one of {sorted(self.candidates())} "
                             f"(its state follows the decoded aggregate, which a dense bucket bypasses), "
                             f"got {route!r}")
        super().__init__(codec, error_feedback=False, route=route, **options)

    def candidates(self) -> dict:
        return {"allgather": _FIXED_ROUTES["allgather"]}

    @staticmethod
    def compressed(bucket: Bucket, comm: Any) -> bool:
        """Whether the plan gives this bucket its compressed route (see the class docstring)."""
        return not bucket.small and comm.size > 1


class ESGD(_AggregateMethod):
    """eSGD (Tao & Li, "eSGD: Communication Efficient Distributed Deep Learning on the Edge",
    USENIX HotEdge 2018): each step every worker sends ``ratio`` of its bucket's
    coordinates (k = ceil(ratio n)), chosen by importance, with a momentum residual for the rest.

    * **Importance updating** (the paper's Algorithm 1): at the first two steps the k
      coordinates are drawn at random; afterwards, when the worker's loss fell since the last
      step (l_t < l_{t-1}) it keeps the previous selection S and raises the importance of the
      selected coordinates, H_i <- H_i + 1 for i in S; otherwise it draws k coordinates at random
      weighted by w_i = 1 + H_i (Efraimidis & Spirakis 2006: the k largest keys log2~(u_i) / w_i,
      u_i uniform in (0, 1) from the rank's Philox stream, log2~ a fixed fp32 polynomial that is
      the same bits on CPU and GPU, ties to the lower index; :mod:`hvd_compress.codecs.esgd`).
    * **Momentum residual accumulation** (Algorithm 2, beta = ``beta``): every coordinate
      accumulates a_i = beta r_i + g_i; unselected coordinates whose |a_i| exceeds the threshold
      (the mean of |g| over the bucket, summed in the numeric contract's order) replace the selected coordinates of lowest H (up to k of
      them, the largest |a_i| first; the replaced ones stay unsent); the worker sends a_i on the
      final selection and keeps r_i = a_i elsewhere (r_i = 0 where sent).  A coordinate selected
      step after step thus sends its gradient, a newly selected one its accumulated residual.

    The increment of H (one per step the coordinate was kept while the loss fell) is our reading:
    the seed describes the rule, not the amount.  Defaults: ``ratio=0.125`` (the paper's MNIST
    run that dropped 87.5% of the gradients and reached 81.5% accuracy), ``beta=0.9``.

    **The loss**: call ``compression.observe_loss(loss)`` every step before ``backward()`` (a
    tensor or a float; it is only stored, and read when the step's buckets are prepared).
    Without it eSGD cannot tell whether the loss fell: every step then redraws the selection
    weighted by H, which never grows, i.e. uniform random-k with the momentum residual (a
    one-time warning says so, from ``synchronize()``).

    Wire: the selected entries as (int32 index, fp32 value), ascending (8 bytes per entry, at
    most k per bucket), allgathered.  State (per bucket, checkpointed): H, the selection, the
    residual, the step count and the last loss.
    """

    name = "esgd"
    nan_buffers = ("esgd",)

    def __init__(self, ratio: float = 0.125, beta: float = 0.9, *, route: str = COMPRESSED, **options: Any) -> None:
        from .codecs.sparse import NonzeroCodec
        if not 0.0 < ratio <= 1.0 or not 0.0 <= beta < 1.0:
            raise ValueError(f"eSGD needs 0 < ratio <= 1 and 0 <= beta < 1, got ratio={ratio}, beta={beta}")
        self.ratio, self.beta = ratio, beta
        self._losses: dict[int | None, torch.Tensor | float] = {}
        self._warned = False
        super().__init__(NonzeroCodec(), route=route, **options)

    def state_names(self) -> dict[str, str]:
        return {"esgd": BUCKET, "importance": MEMBER, "selected": MEMBER, "memory": MEMBER}

    def __repr__(self) -> str:
        return f"ESGD(ratio={self.ratio}, beta={self.beta}, {self._options()})"

    def observe_loss(self, loss: torch.Tensor | float, rank: int | None = None) -> None:
        """This step's loss on this worker (call before ``backward()``); stored, never read here.
        ``rank`` is for simulators that run several workers through one compressor object
        (:mod:`hvd_compress.simulate` passes it); a Horovod job leaves it None."""
        self._losses[rank] = loss.detach() if isinstance(loss, torch.Tensor) else float(loss)

    def _observed(self, rank: int) -> float | None:
        loss = self._losses.get(rank, self._losses.get(None))
        return None if loss is None else float(loss)

    def k(self, n: int) -> int:
        from .codecs.topk import ceil_ratio
        return max(1, ceil_ratio(self.ratio, n)) if n else 0

    def payload_bytes(self, bucket: Bucket, codec: Codec) -> float:
        return 8 * sum(self.k(seg.numel) for seg in bucket.segments(self.scope))

    def prepare(self, bucket, grads, x, state, comm):
        x = super().prepare(bucket, grads, x, state, comm)
        if not self.compressed(bucket, comm):
            return x
        from .codecs.esgd import momentum_step
        from .codecs.sign import ScaledSignCodec
        from .codecs.rng import rank_seed
        device, n, k = x.device, x.numel(), self.k(x.numel())
        meta = state.buffer("esgd", device, 2)
        t, last = meta.committed.tolist()
        meta.begin()
        loss = self._observed(comm.rank)
        keep = t >= 2 and loss is not None and loss < last    # (last is NaN when unknown)
        importance = state.buffer("importance", device)
        h = importance.begin()
        selected = state.buffer("selected", device)
        try:                            # mean |g| with the sum in the numeric contract's order
            threshold = ScaledSignCodec().local_scales(x)
        except FloatingPointError:
            return x                    # the engine flags the non-finite gradient (and rolls back)
        memory = state.buffer("memory", device)
        a = memory.begin(copy=False)
        key = None if keep else RandomKey(rank_seed(self.seed, comm.rank), int(t) & 0xFFFFFFFF, bucket.tensor_id)
        keys, over = momentum_step(x, memory.committed, importance.committed, self.beta, threshold, key, a)
        if keep:
            mask = selected.committed.bool()
            h.add_(selected.committed)
        else:
            mask = torch.zeros(n, dtype=torch.bool, device=device)
            mask[_largest(keys, k)] = True
        candidates = (~mask) & over
        count = min(int(candidates.sum()), k)
        if count:
            cand = candidates.nonzero().view(-1)
            sel = mask.nonzero().view(-1)
            mask[sel[_largest(-h[sel], count)]] = False         # the lowest H leave ...
            mask[cand[_largest(a[cand].abs(), count)]] = True   # ... for the largest residuals
        torch.where(mask, a, torch.zeros((), device=device), out=x)
        a.masked_fill_(mask, 0.0)
        selected.begin(copy=False).copy_(mask)
        return x

    def after_decode(self, bucket, out, state, comm):
        if not self.compressed(bucket, comm):
            return
        loss = self._observed(comm.rank)
        if loss is None and not self._warned:
            import warnings
            warnings.warn("hvd_compress eSGD: no loss observed (call compression.observe_loss(loss) "
                          "before backward() every step); eSGD falls back to random-k selection with "
                          "its momentum residual", RuntimeWarning, stacklevel=2)
            self._warned = True
        meta = state.buffers["esgd"].working
        meta[0] += 1
        meta[1] = float("nan") if loss is None else loss


def _largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k largest values, ties to the lower position (a stable sort)."""
    return torch.sort(values, descending=True, stable=True).indices[:k]


class LAQ(_AggregateMethod):
    """LAQ (Sun, Chen, Giannakis, Yang, "Communication-Efficient Distributed Learning via Lazily
    Aggregated Quantized Gradients", NeurIPS 2019): worker m quantizes its gradient's innovation
    with :class:`~hvd_compress.codecs.laq.InnovationCodec` (``bits`` per element, radius
    ||g - Q_m||_inf, grid around its last quantized gradient Q_m) and uploads dQ_m only when

        ||dQ_m||^2 > (1 / M^2) sum_{d=1..D} xi_d ||S^{k-d}||^2 + 3 (||eps_m^k||^2 + ||eps_hat_m||^2)

    (eps_m^k = Q_m + dQ_m - g, the new quantization error; eps_hat_m the error of its last upload;
    M workers), or when it skipped ``t_bar`` steps in a row, or never uploaded.  Every rank keeps
    the running aggregate S = sum_m Q_m (S += the dQ of the workers that sent, decoded in rank
    order), delivers S (the engine divides by M for ``Average``) and remembers ||S||^2 of the
    last D steps: no rank stores N copies, and every rank's S is the same bits.

    The paper's rule reads ``||theta^{k+1-d} - theta^{k-d}||^2 / (alpha^2 M^2)``.  With the
    update ``theta^{k+1} = theta^k - alpha S^k`` (plain SGD on the delivered aggregate; for
    ``Average`` alpha is the optimizer's lr / M) this is ``||S^{k-d}||^2 / M^2``: the learning
    rate cancels, nothing else is needed.  With momentum or Adam the rule uses the aggregates as a
    proxy of the parameter change (our assumption).

    The rule and the quantizer act per bucket (the paper's worker vector is the whole model; with
    the default 25 MB buckets a small model is one bucket).  Defaults: ``D=10``,
    ``xi_1 = ... = xi_D = xi / D`` with ``xi=0.8`` and ``t_bar=100`` (the paper's experiments, as we
    read them) and ``bits=8``: with 4 bits the max-norm radius makes the quantization error
    ||eps||^2 (heavy-tailed gradients) larger than the innovation, the rule's 3 (||eps||^2 +
    ||eps_hat||^2) term then skips nearly every upload and SGD with momentum on stale
    aggregates diverged on the digits task (docs/methods-lazy-diff.md).  A skipped upload sends an
    empty payload: the packed block's 16-byte header.  State (checkpointed): Q_m, S, (uploaded, skipped steps, ||eps_hat||^2, the last D
    ||S||^2).
    """

    name = "laq"

    def __init__(self, bits: int = 8, D: int = 10, xi: float = 0.8, t_bar: int = 100, *,
                 route: str = COMPRESSED, **options: Any) -> None:
        from .codecs.laq import InnovationCodec
        if D < 1 or not xi >= 0 or t_bar < 0:
            raise ValueError(f"LAQ needs D >= 1, xi >= 0 and t_bar >= 0, got D={D}, xi={xi}, t_bar={t_bar}")
        self.D, self.xi, self.t_bar = int(D), float(xi), int(t_bar)
        super().__init__(InnovationCodec(bits=bits), route=route, **options)

    def state_names(self) -> dict[str, str]:
        return {"quantized": MEMBER, "laq": BUCKET, "aggregate": MEMBER}

    def __repr__(self) -> str:
        return (f"LAQ(bits={self.codec.bits}, D={self.D}, xi={self.xi}, t_bar={self.t_bar}, "
                f"{self._options()})")

    def payload_bytes(self, bucket: Bucket, codec: Codec) -> float:
        """Bytes of an upload (a skip costs only the block header)."""
        return sum(-(-seg.numel * codec.bits // 8) + 4 for seg in bucket.segments(self.scope))

    def prepare(self, bucket, grads, x, state, comm):
        x = super().prepare(bucket, grads, x, state, comm)
        if not self.compressed(bucket, comm):
            return x
        device = x.device
        quantized = state.buffer("quantized", device)
        meta = state.buffer("laq", device, 3 + self.D)
        old = meta.committed
        x.sub_(quantized.committed)                                   # v = g - Q_m
        dq = self.codec.innovation(self.codec.encode(x, check_finite=False))
        lhs = dq.square().sum()
        eps2 = (dq - x).square().sum()                                # ||Q_m + dQ - g||^2
        rhs = old[3:].sum() * (self.xi / self.D / comm.size ** 2) + 3 * (eps2 + old[2])
        uploaded, skipped, lhs, rhs, eps2 = torch.stack([old[0], old[1], lhs, rhs, eps2]).tolist()
        m = meta.begin()
        if not uploaded or skipped >= self.t_bar or not lhs <= rhs:   # (NaN: send, the engine flags it)
            torch.add(quantized.committed, dq, out=quantized.begin(copy=False))
            m[0], m[1], m[2] = 1.0, 0.0, eps2
            return x                    # the route encodes v to the same payload
        m[1] += 1
        return x.zero_()                # the empty payload

    def after_decode(self, bucket, out, state, comm):
        if not self.compressed(bucket, comm):
            return
        aggregate = state.buffer("aggregate", out.device)
        s = aggregate.begin(copy=False)
        torch.add(aggregate.committed, out, out=s)                    # S += sum of the dQ sent
        out.copy_(s)
        m = state.buffers["laq"].working
        m[4:] = m[3:-1].clone()
        m[3] = s.square().sum()


class DIANA(_AggregateMethod):
    """DIANA (Mishchenko, Gorbunov, Takáč, Richtárik, "Distributed Learning with Compressed
    Gradient Differences", 2019): worker i keeps a shift h_i and sends Delta_i = C(g_i - h_i),
    then h_i <- h_i + alpha D(Delta_i); every rank keeps H = sum_i h_i (the same bits everywhere),
    delivers H + sum_i D(Delta_i) (divided by N for ``Average``: h + mean Delta, the paper's
    g_hat with h = H / N) and updates H <- H + alpha sum_i D(Delta_i).  The shifts learn the
    gradients, so the compressed differences shrink: the variance of C vanishes at the optimum.

    ``codec``: ``"qsgd"`` (default: ``bits``, ``bucket_size`` 512-element norm buckets over the
    fused bucket) or ``"terngrad"`` (unbiased, no clipping, a scale per ``bucket_size``); spec:
    ``diana:codec='terngrad'``, ``diana:bits=8,alpha=0.1``.  ``alpha`` defaults to the largest
    the paper's theory allows, 1 / (omega + 1), for the codec's variance parameter omega
    (E||C(x) - x||^2 <= omega ||x||^2): QSGD with s = 2^(bits-1) - 1 levels on d-element buckets,
    omega = min(d / s^2, sqrt(d) / s) (Alistarh et al. 2017, Lemma 3.1): 4 bits, d = 512 gives
    omega = 3.232, alpha = 0.2363; TernGrad's ternary code s sign(x_i) Bernoulli(|x_i| / s),
    s = ||x||_inf, has E||C(x)||^2 = s ||x||_1, so omega = max s ||x||_1 / ||x||^2 - 1 =
    (sqrt(d) - 1) / 2 (d = 512: omega = 10.81, alpha = 0.0847).

    Wire: the codec's (allgather).  State (checkpointed): h_i and H.
    """

    name = "diana"

    def __init__(self, codec: str = "qsgd", alpha: float | None = None, bits: int = 4,
                 bucket_size: int = 512, *, route: str = COMPRESSED, **options: Any) -> None:
        if codec == "qsgd":
            from .codecs.qsgd import QSGDCodec
            c = QSGDCodec(bits=bits, bucket_size=bucket_size)
            self.omega = min(bucket_size / c.levels ** 2, math.sqrt(bucket_size) / c.levels)
        elif codec == "terngrad":
            from .codecs.terngrad import TernGradCodec
            c = TernGradCodec(bucket_size=bucket_size, clip=None)
            self.omega = (math.sqrt(bucket_size) - 1) / 2
        else:
            raise ValueError(f"DIANA: codec must be 'qsgd' or 'terngrad', got {codec!r}")
        if alpha is not None and not 0 < alpha <= 1:
            raise ValueError(f"DIANA: alpha must lie in (0, 1], got {alpha}")
        self.codec_name = codec
        self.alpha = 1 / (self.omega + 1) if alpha is None else float(alpha)
        super().__init__(c, route=route, **options)

    def state_names(self) -> dict[str, str]:
        return {"shift": MEMBER, "shift_sum": MEMBER}

    def __repr__(self) -> str:
        return f"DIANA(codec={self.codec!r}, alpha={self.alpha!r}, {self._options()})"

    def prepare(self, bucket, grads, x, state, comm):
        x = super().prepare(bucket, grads, x, state, comm)
        if self.compressed(bucket, comm):
            x.sub_(state.buffer("shift", x.device).committed)          # g_i - h_i
        return x

    def after_encode(self, bucket, pending, state):
        h = state.buffers["shift"].begin()
        for payload, seg in zip(pending.payloads, bucket.segments(self.scope)):
            delta = pending.job.codec_for(seg.tensor_id).decode(payload)
            h[seg.offset:seg.offset + seg.numel].add_(delta.mul_(self.alpha))   # two roundings, any device

    def after_decode(self, bucket, out, state, comm):
        total = state.buffer("shift_sum", out.device)
        torch.add(total.committed, out * self.alpha, out=total.begin(copy=False))
        out.add_(total.committed)


class Dense(Method):
    """No compression: fp32 allreduce per bucket (what ``hvd.Compression.none`` means inside
    ``hvd_compress.DistributedOptimizer``'s maps)."""

    name = "none"

    def __init__(self, *, bucket_cap_mb: float = 25.0) -> None:
        super().__init__(None, error_feedback=False, min_numel=2 ** 62, route="dense",
                         bucket_cap_mb=bucket_cap_mb)

    def codec_at(self, step: int, world: int = 1) -> None:
        return None


_METHODS: dict[str, type[Method]] = {
    "terngrad": TernGrad, "qsgd": QSGD, "topk": TopK, "dgc": DGC, "fp16": FP16,
    "onebit": OneBit, "efsignsgd": EFSignSGD, "signsgd": SignSGD, "randomk": RandomK,
    "sketch": Sketch, "powersgd": PowerSGD, "graddrop": GradDrop, "adacomp": AdaComp, "stc": STC,
    "esgd": ESGD, "laq": LAQ, "diana": DIANA,
}


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value,key=value"`` -> (lower-case name, keyword arguments).  Values are Python
    literals (anything else is kept as a string); ``value_dtype=float32`` names a torch dtype."""
    name, _, arg_text = spec.strip().partition(":")
    if ":" in arg_text:
        raise ValueError(f"spec {spec!r}: one ':' separates the name from its options, which are "
                         f"separated by ',' (e.g. {name.strip()}:{arg_text.replace(':', ',')})")
    kwargs: dict[str, Any] = {}
    for item in filter(None, (a.strip() for a in arg_text.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise ValueError(f"spec {spec!r}: expected key=value, got {item!r}")
        if key in kwargs:
            raise ValueError(f"spec {spec!r}: {key} is given twice")
        if key == "value_dtype":
            dtype = getattr(torch, value.strip(), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"spec {spec!r}: value_dtype must name a torch dtype (float16, "
                                 f"float32), got {value.strip()!r}")
            kwargs[key] = dtype
            continue
        try:
            kwargs[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key] = value.strip()
    return name.strip().lower(), kwargs


def from_spec(spec: str, **defaults: Any) -> Method:
    """Build a compressor from ``"name"`` or ``"name:key=value,key=value"``, e.g.
    ``"topk:ratio=0.001"``, ``"qsgd:bits=8,bucket_size=1024"``, ``"terngrad:clip=None"``
    (see :func:`parse_spec`); ``defaults`` are keyword arguments for what the spec does not set
    (e.g. ``link=Link.gbps(1)``, which a spec cannot spell)."""
    name, parsed = parse_spec(spec)
    kwargs = {**defaults, **parsed}
    method = _METHODS.get(name)
    if method is None:
        raise ValueError(f"unknown compressor {name!r} in spec {spec!r}; known: {', '.join(sorted(_METHODS))}")
    try:
        return method(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"spec {spec!r}: {e}") from None
