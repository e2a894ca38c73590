"""The base of every method, the route tables, the registry of the names users write.

A method is a codec with the defaults of its paper, its hooks into the engine (how a bucket's
input is prepared, what happens after encoding and decoding), the routes its payloads can take
and the state buffers it keeps (``state_names``), plus the options every method shares
(``min_numel``, ``seed``, ``route``, ``hierarchy``, ``bucket_cap_mb``, ``link``, ``intra_link``),
declared once in :class:`Method`.  :func:`register` adds a method class to :data:`REGISTRY`
under its ``name``: ``from_spec`` and the package's exports read it.
"""
from __future__ import annotations

from typing import Any

import torch

from ..codecs.base import Codec
from ..engine import cost
from ..engine.buckets import Bucket
from ..engine.plan import AUTO, COMPRESSED
from ..engine.state import BUCKET, MEMBER, BucketState
from ..routes.base import Link, Pending
from ..routes.gather import GatherRoute
from ..routes.sparse_two_phase import SparseTwoPhaseRoute
from ..routes.summable import SharedScaleRoute, SummableRoute
from ..routes.two_phase import TwoPhaseRoute
from ..validate import checked


_FIXED_ROUTES = {"allgather": GatherRoute(), "two_phase": TwoPhaseRoute()}
_SPARSE_ROUTES = {"allgather": GatherRoute(), "sparse_two_phase": SparseTwoPhaseRoute()}
_SUMMABLE_ROUTES = {"allreduce": SummableRoute(), "allgather": GatherRoute()}
_SHARED_SCALE_ROUTES = {"allreduce": SharedScaleRoute()}


#: spec name -> method class, filled by :func:`register`
REGISTRY: dict[str, type["Method"]] = {}


def register(cls: type) -> type:
    """Class decorator: make ``cls`` known by its ``name`` (``from_spec``, package exports)."""
    if cls.name in REGISTRY:
        raise ValueError(f"two methods named {cls.name!r}: {REGISTRY[cls.name]} and {cls}")
    REGISTRY[cls.name] = cls
    return cls


class Method:
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
        bucket_cap_mb: bucket cap in MiB of fp32 gradient (DDP's default 25; 0: one parameter
            per bucket, i.e. layer-wise).
        link: ``"auto"`` (measure once at the first step), or a declared :class:`Link`: the
            link between hosts (each host's share of the network), the only one on one host.
        intra_link: the link inside a host, for jobs of several hosts with several ranks each:
            ``"auto"`` (measured with ``link``; when ``link`` is declared: declared by
            ``HVD_COMPRESS_INTRA_LINK_GBPS``, else :data:`~hvd_compress.engine.cost.ASSUMED_INTRA`),
            or a declared :class:`Link`.

    A method knows nothing of the framework: :mod:`hvd_compress.horovod` serves it to Horovod
    (``hvd_compress.TernGrad()`` is the Horovod compressor of this package's
    ``methods.TernGrad``).
    """

    name = "method"
    #: "tensor": one segment per parameter (per-tensor semantics); "bucket": one per bucket
    scope = "tensor"
    #: per-bucket state buffers that hold NaN by design (eSGD's "no loss seen yet"): a
    #: checkpoint's other buffers must be finite
    nan_buffers: tuple[str, ...] = ()
    #: whether :meth:`payload_bytes` depends on ``padded`` (payloads of a fixed capacity on a
    #: device): the engine re-plans once it knows where the gradients live
    pads_on_device = False
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
        self.bucket_cap_mb = cost.check_engine_options(bucket_cap_mb, link, intra_link)
        self.link = link
        self.intra_link = intra_link
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

    def config(self) -> str:
        """Deterministic description of the settings (compared across ranks via the plan)."""
        return repr(self)

    def _options(self) -> str:
        """The options every method shares, as its repr writes them."""
        return (f"min_numel={self.min_numel}, seed={self.seed}, route={self.route!r}, "
                f"hierarchy={self.hierarchy!r}, bucket_cap_mb={self.bucket_cap_mb}, link={self.link!r}, "
                f"intra_link={self.intra_link!r}")

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

    def payload_bytes(self, bucket: Bucket, codec: Codec, padded: bool = False) -> float:
        """This rank's payload bytes for the bucket per step (exact for fixed-size codecs);
        ``padded``: as a device sends them, at a fixed capacity where the size follows the data."""
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


class Dense(Method):
    """No compression: fp32 allreduce per bucket (what ``hvd.Compression.none`` means inside
    ``hvd_compress.DistributedOptimizer``'s maps)."""

    name = "none"

    def __init__(self, *, bucket_cap_mb: float = 25.0) -> None:
        super().__init__(None, error_feedback=False, min_numel=2 ** 62, route="dense",
                         bucket_cap_mb=bucket_cap_mb)

    def codec_at(self, step: int, world: int = 1) -> None:
        return None
