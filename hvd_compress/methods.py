"""The compressors users name: ``hvd.DistributedOptimizer(..., compression=hvd_compress.TernGrad())``.

Each is a :class:`Method`: a codec with the defaults of its paper, the method's hooks into the
engine (how its bucket input is prepared, what happens after encoding), the routes its payloads
can take, and, through :class:`~hvd_compress.adaptor.Compressor`, Horovod's interface.
:func:`from_spec` builds one from a command-line string.
"""
from __future__ import annotations

import ast
import math
from typing import Any

import torch

from .adaptor import Compressor
from .codecs.base import Codec
from .engine.buckets import Bucket
from .engine.plan import AUTO, COMPRESSED
from .engine.state import BucketState
from .routes.base import Link, Pending
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
        bucket_cap_mb, link: see :class:`~hvd_compress.adaptor.Compressor`.
    """

    name = "method"
    #: "tensor": one segment per parameter (per-tensor semantics); "bucket": one per bucket
    scope = "tensor"
    #: prepare() sends something else than the gradient (DGC's momentum): dense buckets must
    #: then go through the engine, not straight to Horovod's allreduce
    transforms_gradients = False

    def __init__(self, codec: Codec | None, *, error_feedback: bool, min_numel: int = 1024,
                 seed: int = 0, route: str = AUTO, bucket_cap_mb: float = 25.0,
                 link: Link | str = "auto") -> None:
        super().__init__(bucket_cap_mb=bucket_cap_mb, link=link)
        if min_numel < 0 or not 0 <= seed < 2 ** 64:
            raise ValueError(f"need min_numel >= 0 and 0 <= seed < 2**64, got {min_numel}, {seed}")
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
                f"min_numel={self.min_numel}, seed={self.seed}, route={self.route!r}, "
                f"bucket_cap_mb={self.bucket_cap_mb}, link={self.link!r})")

    def method_for(self, name: str) -> "Method":
        return self

    # -- what the engine asks ------------------------------------------------------------------

    def codec_at(self, step: int) -> Codec:
        """The codec of the engine's ``step``-th committed step (schedules override this)."""
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

    def check_optimizer(self, optimizer, names: list[str]) -> str | None:
        """A message when this method cannot serve these parameters of ``optimizer``."""
        return None


class TernGrad(Method):
    """TernGrad (Wen et al., NeurIPS 2017): ``s * sign(g) * b``, ``b ~ Bernoulli(|g|/s)``,
    ``s = max|g|`` per tensor (the paper's layer-wise scaling; or per ``bucket_size`` elements)
    after clipping at ``clip * sigma``; 2 bits per element + fp32 scales on the wire.  Unbiased
    without clipping; error feedback optional.

    ``shared_scale=True`` is the paper's scale sharing: the ranks first agree on
    ``s = max over ranks`` (a small max-allreduce per bucket), encode with it, and the codes are
    summed by an fp16 allreduce (exact up to 2048 ranks), 2 bytes per element.  Only worth it
    where an fp16 allreduce beats gathering 2-bit codes; the default gathers codes.
    """

    name = "terngrad"

    def __init__(self, clip: float | None = 2.5, bucket_size: int | None = None, *,
                 shared_scale: bool = False, error_feedback: bool = False, min_numel: int = 1024,
                 seed: int = 0, route: str = AUTO, bucket_cap_mb: float = 25.0,
                 link: Link | str = "auto") -> None:
        from .codecs.terngrad import TernGradCodec
        self.shared_scale = shared_scale
        super().__init__(TernGradCodec(bucket_size=bucket_size, clip=clip), error_feedback=error_feedback,
                         min_numel=min_numel, seed=seed, route=route, bucket_cap_mb=bucket_cap_mb, link=link)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, shared_scale={self.shared_scale})"

    def candidates(self) -> dict:
        return _SHARED_SCALE_ROUTES if self.shared_scale else _FIXED_ROUTES

    def payload_bytes(self, bucket: Bucket, codec: Codec) -> float:
        return 2 * bucket.numel if self.shared_scale else super().payload_bytes(bucket, codec)


class QSGD(Method):
    """QSGD (Alistarh et al., NeurIPS 2017): unbiased stochastic rounding of ``|g_i| / ||g||``
    to ``2^(bits-1) - 1`` levels per bucket of ``bucket_size`` elements; ``bits`` per element +
    one fp32 norm per bucket.  Norm buckets run over the engine's fused buffer (as CGX's).
    ``norm="max"`` scales by max |g_i| instead of ||g||_2 (as practical implementations do):
    same bytes, far less variance (see :class:`~hvd_compress.codecs.qsgd.QSGDCodec`)."""

    name = "qsgd"
    scope = "bucket"

    def __init__(self, bits: int = 4, bucket_size: int = 512, norm: str = "l2", *,
                 error_feedback: bool = False, min_numel: int = 1024, seed: int = 0, route: str = AUTO,
                 bucket_cap_mb: float = 25.0, link: Link | str = "auto") -> None:
        from .codecs.qsgd import QSGDCodec
        super().__init__(QSGDCodec(bits=bits, bucket_size=bucket_size, norm=norm), error_feedback=error_feedback,
                         min_numel=min_numel, seed=seed, route=route, bucket_cap_mb=bucket_cap_mb, link=link)


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
                 error_feedback: bool = True, min_numel: int = 1024, seed: int = 0,
                 route: str = AUTO, bucket_cap_mb: float = 25.0, link: Link | str = "auto") -> None:
        from .codecs.topk import TopKCodec
        if scope not in ("tensor", "bucket"):
            raise ValueError(f"scope must be 'tensor' or 'bucket', got {scope!r}")
        self.scope = scope
        super().__init__(TopKCodec(ratio=ratio, sample_ratio=sample_ratio, value_dtype=value_dtype,
                                   exact_k=exact_k, mode=mode, threshold=threshold),
                         error_feedback=error_feedback, min_numel=min_numel, seed=seed, route=route,
                         bucket_cap_mb=bucket_cap_mb, link=link)

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

    name = "dgc"
    #: the wrapped optimizer must not apply momentum again (examples/ read this)
    owns_momentum = True
    transforms_gradients = True
    _STAGES = 4

    def __init__(self, ratio: float = 0.001, momentum: float = 0.9, *, clip_norm: float | None = None,
                 warmup_steps: int = 0, warmup_ratio: float = 0.25, sample_ratio: float = 0.01,
                 value_dtype: torch.dtype = torch.float16, scope: str = "tensor", min_numel: int = 1024,
                 seed: int = 0, route: str = AUTO, bucket_cap_mb: float = 25.0,
                 link: Link | str = "auto") -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if warmup_steps < 0 or not 0 < ratio <= 1 or (warmup_steps and not ratio <= warmup_ratio <= 1):
            raise ValueError("need 0 < ratio <= 1, warmup_steps >= 0 and, with warm-up, "
                             f"ratio <= warmup_ratio <= 1 (got ratio={ratio}, "
                             f"warmup_ratio={warmup_ratio}, warmup_steps={warmup_steps})")
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm}")
        super().__init__(ratio=ratio, sample_ratio=sample_ratio, value_dtype=value_dtype,
                         scope=scope, error_feedback=True, min_numel=min_numel, seed=seed,
                         route=route, bucket_cap_mb=bucket_cap_mb, link=link)
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

    def codec_at(self, step: int) -> Codec:
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
                 value_dtype: torch.dtype = torch.float16, min_numel: int = 1024, seed: int = 0,
                 route: str = AUTO, bucket_cap_mb: float = 25.0, link: Link | str = "auto") -> None:
        from fractions import Fraction

        from .codecs.topk import GradDropCodec
        if not 0.0 <= drop_ratio < 1.0:
            raise ValueError(f"drop_ratio must lie in [0, 1), got {drop_ratio}")
        self.scope = "bucket"
        Method.__init__(self, GradDropCodec(ratio=float(1 - Fraction(str(float(drop_ratio)))),
                                            sample_ratio=sample_ratio, value_dtype=value_dtype,
                                            layer_norm=layer_norm),
                        error_feedback=True, min_numel=min_numel, seed=seed, route=route,
                        bucket_cap_mb=bucket_cap_mb, link=link)


class AdaComp(Method):
    """AdaComp (Chen et al., AAAI 2018): per bin of L elements (50 for convolution weights, 500
    otherwise, the paper's L_T), with H = r + g, send the entries with |H + g| >= max_bin |H| as a
    sign bit each plus one fp32 scale per bin (the mean |H| of the bin's sent entries); the rest
    and the quantization error stay in the residual (error feedback is the method: always on).
    The compression rate adapts to the gradients by itself (no ratio to set).  Wire per tensor:
    4 bytes + 1 bit per sent entry + 4 bytes per bin.  Allgather only (see
    docs/methods-sparse-adaptive.md)."""

    name = "adacomp"

    def __init__(self, bin_size: int | None = None, conv_bin_size: int = 50, fc_bin_size: int = 500, *,
                 min_numel: int = 1024, seed: int = 0, route: str = AUTO, bucket_cap_mb: float = 25.0,
                 link: Link | str = "auto") -> None:
        from .codecs.ternary import AdaCompCodec
        super().__init__(AdaCompCodec(bin_size=bin_size, conv_bin_size=conv_bin_size, fc_bin_size=fc_bin_size),
                         error_feedback=True, min_numel=min_numel, seed=seed, route=route,
                         bucket_cap_mb=bucket_cap_mb, link=link)

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

    def __init__(self, ratio: float = 0.0025, sample_ratio: float = 0.01, *, min_numel: int = 1024,
                 seed: int = 0, route: str = AUTO, bucket_cap_mb: float = 25.0,
                 link: Link | str = "auto") -> None:
        from .codecs.ternary import STCCodec
        super().__init__(STCCodec(ratio=ratio, sample_ratio=sample_ratio), error_feedback=True,
                         min_numel=min_numel, seed=seed, route=route, bucket_cap_mb=bucket_cap_mb, link=link)

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

    def __init__(self, stochastic: bool = True, *, error_feedback: bool = False, min_numel: int = 1024,
                 seed: int = 0, route: str = AUTO, bucket_cap_mb: float = 25.0,
                 link: Link | str = "auto") -> None:
        from .codecs.fp16 import HalfCodec, StochasticFP16Codec
        if error_feedback and not stochastic:
            raise ValueError("FP16(stochastic=False) has no error feedback")
        self.stochastic = stochastic
        super().__init__(StochasticFP16Codec() if stochastic else HalfCodec(),
                         error_feedback=error_feedback, min_numel=min_numel, seed=seed, route=route,
                         bucket_cap_mb=bucket_cap_mb, link=link)


class OneBit(Method):
    """1-bit SGD (Seide, Fu, Droppo, Li, Yu, Interspeech 2014): one sign bit per element and two
    fp32 reconstruction values per tensor (or ``bucket_size`` elements), the means of the
    non-negative and of the negative entries of v = g + e; error feedback always on (the
    method's point).  On the two-phase route the owner re-encodes the sum with its own error
    feedback: the compressed allreduce of DeepSpeed's 1-bit Adam and DoubleSqueeze (Tang et al.
    2019, seed 002).  1 bit per element + 8 bytes per tensor."""

    name = "onebit"

    def __init__(self, bucket_size: int | None = None, *, min_numel: int = 1024, seed: int = 0,
                 route: str = AUTO, bucket_cap_mb: float = 25.0, link: Link | str = "auto") -> None:
        from .codecs.sign import OneBitCodec
        super().__init__(OneBitCodec(bucket_size=bucket_size), error_feedback=True, min_numel=min_numel,
                         seed=seed, route=route, bucket_cap_mb=bucket_cap_mb, link=link)


class EFSignSGD(Method):
    """EF-signSGD (Karimireddy, Rebjock, Stich, Jaggi, ICML 2019): ``C(v) = (||v||_1 / d) sign(v)``
    per tensor (or ``bucket_size`` elements) with error feedback, v = g + e; a delta-approximate
    compressor, so error feedback converges.  1 bit per element + 4 bytes per tensor."""

    name = "efsignsgd"

    def __init__(self, bucket_size: int | None = None, *, min_numel: int = 1024, seed: int = 0,
                 route: str = AUTO, bucket_cap_mb: float = 25.0, link: Link | str = "auto") -> None:
        from .codecs.sign import ScaledSignCodec
        super().__init__(ScaledSignCodec(bucket_size=bucket_size), error_feedback=True,
                         min_numel=min_numel, seed=seed, route=route, bucket_cap_mb=bucket_cap_mb, link=link)


class SignSGD(Method):
    """signSGD with majority vote (Bernstein et al., ICML 2018 and ICLR 2019): every worker sends
    sign(g) and m = ||g||_1 / d per tensor; the aggregate is sign(sum of the signs) times the mean
    m, so a script's SGD learning rate still works (the update has the workers' mean L1 gradient
    length; see :class:`~hvd_compress.codecs.sign.MajorityVoteCodec`).  No error feedback (the
    vote is the method).  Allgather only (a vote of votes is another method).  1 bit per element
    + 4 bytes per tensor."""

    name = "signsgd"

    def __init__(self, *, min_numel: int = 1024, seed: int = 0, route: str = AUTO,
                 bucket_cap_mb: float = 25.0, link: Link | str = "auto") -> None:
        from .codecs.sign import MajorityVoteCodec
        super().__init__(MajorityVoteCodec(), error_feedback=False, min_numel=min_numel, seed=seed,
                         route=route, bucket_cap_mb=bucket_cap_mb, link=link)

    def candidates(self) -> dict:
        return {"allgather": _FIXED_ROUTES["allgather"]}


class RandomK(Method):
    """Random-k (Konečný et al. 2016's random mask, seed 004; Stich et al. 2018): each step every
    rank keeps the same ``ratio`` of each tensor's entries, chosen by a key all ranks share, so
    only the k values travel and an fp32 allreduce sums them (no indices on the wire).  Error
    feedback (default) keeps the rest; ``unbiased=True`` scales the values by n/k instead.
    4 bytes per kept entry."""

    name = "randomk"

    def __init__(self, ratio: float = 0.01, *, unbiased: bool = False, min_numel: int = 1024,
                 seed: int = 0, route: str = AUTO, bucket_cap_mb: float = 25.0,
                 link: Link | str = "auto") -> None:
        from .codecs.randk import RandomKCodec
        super().__init__(RandomKCodec(ratio=ratio, unbiased=unbiased), error_feedback=not unbiased,
                         min_numel=min_numel, seed=seed, route=route, bucket_cap_mb=bucket_cap_mb, link=link)

    def candidates(self) -> dict:
        return {"allreduce": _SUMMABLE_ROUTES["allreduce"]}

    def payload_bytes(self, bucket: Bucket, codec: Codec) -> float:
        return 4 * sum(codec.k(seg.numel) for seg in bucket.segments(self.scope))


class Sketch(Method):
    """Sketched update (Konečný et al. 2016, seed 004): a randomized Hadamard rotation (random
    signs from a key every rank shares), optional subsampling of the rotated coordinates
    (``ratio``), and stochastic ``bits``-bit quantization between each block's min and max; decode
    sums the workers in the rotated domain and rotates back once.  The rotation spreads a few
    large entries over the block, which cuts QSGD's error at the same bits on heavy-tailed
    gradients (docs/codecs-seed-methods.md).  Unbiased; no error feedback."""

    name = "sketch"
    scope = "bucket"

    def __init__(self, bits: int = 4, block_size: int = 1024, ratio: float = 1.0, *,
                 min_numel: int = 1024, seed: int = 0, route: str = AUTO, bucket_cap_mb: float = 25.0,
                 link: Link | str = "auto") -> None:
        from .codecs.sketch import SketchCodec
        super().__init__(SketchCodec(bits=bits, block_size=block_size, ratio=ratio), error_feedback=False,
                         min_numel=min_numel, seed=seed, route=route, bucket_cap_mb=bucket_cap_mb, link=link)


class PowerSGD(Method):
    """PowerSGD (Vogels, Karimireddy, Jaggi, NeurIPS 2019): rank-``rank`` approximation of each
    weight matrix by one power iteration with warm start, P = M Q and Q = M^T orth(P) summed by
    two allreduces, error feedback always on; tensors whose matrix view would not shrink by
    ``min_compression_rate`` (PyTorch's hook's rule) travel dense in the same bucket.
    ``structured=True`` is seed 004's structured update: Q a fresh random basis from the shared
    seed each step, only P sent.  (n + m) r fp32 per n x m matrix."""

    name = "powersgd"

    def __init__(self, rank: int = 2, min_compression_rate: float = 2.0, *, structured: bool = False,
                 min_numel: int = 1024, seed: int = 0, route: str = AUTO, bucket_cap_mb: float = 25.0,
                 link: Link | str = "auto") -> None:
        from .routes.low_rank import PowerSGDRoute
        if rank < 1 or min_compression_rate < 1:
            raise ValueError(f"need rank >= 1 and min_compression_rate >= 1, got {rank}, {min_compression_rate}")
        self.rank, self.min_compression_rate, self.structured = rank, min_compression_rate, structured
        self._route = PowerSGDRoute(rank, min_compression_rate, structured)
        super().__init__(None, error_feedback=True, min_numel=min_numel, seed=seed, route=route,
                         bucket_cap_mb=bucket_cap_mb, link=link)

    def __repr__(self) -> str:
        return (f"PowerSGD(rank={self.rank}, min_compression_rate={self.min_compression_rate}, "
                f"structured={self.structured}, min_numel={self.min_numel}, seed={self.seed}, "
                f"route={self.route!r}, bucket_cap_mb={self.bucket_cap_mb}, link={self.link!r})")

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


class Dense(Method):
    """No compression: fp32 allreduce per bucket (what ``hvd.Compression.none`` means inside
    ``hvd_compress.DistributedOptimizer``'s maps)."""

    name = "none"

    def __init__(self, *, bucket_cap_mb: float = 25.0) -> None:
        super().__init__(None, error_feedback=False, min_numel=2 ** 62, route="dense",
                         bucket_cap_mb=bucket_cap_mb)

    def codec_at(self, step: int) -> None:
        return None


_METHODS: dict[str, type[Method]] = {
    "terngrad": TernGrad, "qsgd": QSGD, "topk": TopK, "dgc": DGC, "fp16": FP16,
    "onebit": OneBit, "efsignsgd": EFSignSGD, "signsgd": SignSGD, "randomk": RandomK,
    "sketch": Sketch, "powersgd": PowerSGD, "graddrop": GradDrop, "adacomp": AdaComp, "stc": STC,
}


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value,key=value"`` -> (lower-case name, keyword arguments).  Values are Python
    literals (anything else is kept as a string); ``value_dtype=float32`` names a torch dtype."""
    name, _, arg_text = spec.strip().partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, (a.strip() for a in arg_text.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"spec {spec!r}: expected key=value, got {item!r}")
        key = key.strip()
        if key == "value_dtype":
            kwargs[key] = getattr(torch, value.strip())
            continue
        try:
            kwargs[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key] = value.strip()
    return name.strip().lower(), kwargs


def from_spec(spec: str) -> Method:
    """Build a compressor from ``"name"`` or ``"name:key=value,key=value"``, e.g.
    ``"topk:ratio=0.001"``, ``"qsgd:bits=8,bucket_size=1024"``, ``"terngrad:clip=None"``
    (see :func:`parse_spec`)."""
    name, kwargs = parse_spec(spec)
    method = _METHODS.get(name)
    if method is None:
        raise ValueError(f"unknown compressor {name!r} in spec {spec!r}; known: {', '.join(sorted(_METHODS))}")
    try:
        return method(**kwargs)
    except TypeError as e:
        raise ValueError(f"spec {spec!r}: {e}") from None
