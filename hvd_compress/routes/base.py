"""What every route shares: the job a bucket hands to its route, the pending collective a route
returns, the link and codec speeds its cost formula reads, and segment encoding.

A route is a small stateless object chosen once per bucket at plan time:

* ``start(job)`` runs in Horovod's backward hook: encode, start phase 1, never wait;
* ``advance(pending)`` runs in the flush (``synchronize()``) ``phases`` times, each time for
  every bucket in bucket order on every rank: wait one phase and start the next (multi-phase
  routes only); every bucket's next phase is on the wire before any bucket waits for it;
* ``finish(pending)`` runs in the flush, in bucket order: wait, and decode the sum over ranks
  into the job's ``out`` buffer (fp32, the bucket's size, reused from step to step: no fresh
  memory to fault in), or return a tensor the collective produced.

``seconds(...)`` predicts the time of one step of the route for the plan (see docs/design.md).
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..codecs.base import Codec, Payload, RandomKey

#: bytes of an fp32 gradient element
FP32 = 4


@dataclass(frozen=True)
class Link:
    """The network as the cost model sees it: per-collective latency and per-rank bandwidth."""
    latency_s: float = 50e-6
    bytes_per_s: float = 1e9 / 8

    @classmethod
    def gbps(cls, gbps: float, latency_us: float = 50.0) -> "Link":
        if not gbps > 0 or latency_us < 0:
            raise ValueError(f"link needs gbps > 0 and latency_us >= 0, got {gbps}, {latency_us}")
        return cls(latency_us * 1e-6, gbps * 1e9 / 8)

    def __str__(self) -> str:
        return f"{self.bytes_per_s * 8 / 1e9:.3g} Gbit/s, {self.latency_s * 1e6:.0f} us"


@dataclass(frozen=True)
class Segment:
    """A stretch of a bucket's flat buffer that is encoded as one tensor."""
    offset: int
    numel: int
    tensor_id: int


@dataclass(frozen=True)
class Speed:
    """A codec's throughput on this machine: elements per second encoded (error feedback
    included) and decoded-and-accumulated (per payload), plus the fixed cost of one call."""
    encode: float = 2.5e8
    decode: float = 5e8
    call_s: float = 3e-5


@dataclass
class Job:
    """One bucket's step, as its route sees it."""
    x: torch.Tensor                      # flat fp32 input of the bucket (after the method's prepare)
    tensor_id: int                       # the bucket's Philox tensor id (chunked routes)
    codec: Codec
    segments: list[Segment]              # in order
    residual: torch.Tensor | None        # working error-feedback residual (flat), or None
    comm: Any                            # engine.comm.Comm
    tag: str                             # prefix of this bucket's collective names
    step: int
    seed_of: Callable[[int], int]        # Philox seed of a rank (rank of comm)
    server: Callable[[int], torch.Tensor | None]  # working server residual of n elements, or None
    state: Callable[[str, int], torch.Tensor] = None  # a named working state buffer of n elements
    fresh: Callable[[str], bool] = None  # whether that buffer still holds its initial zeros
    members: list = field(default_factory=list)  # engine.buckets.Member of the bucket, in order
    shared_seed: int = 0                 # Philox seed every rank shares (shared masks, rotations)
    average: bool = False                # the engine wants the mean; a route may deliver it (dense)
    out: torch.Tensor | None = None      # the bucket's reused fp32 output buffer (see Route.finish)
    topology: Any = None                 # engine.topology.Topology of comm's ranks (hierarchical routes)

    def key(self, tensor_id: int, rank: int | None = None) -> RandomKey:
        return RandomKey(self.seed_of(self.comm.rank if rank is None else rank), self.step & 0xFFFFFFFF,
                         tensor_id)

    def codec_for(self, tensor_id: int) -> Codec:
        """The codec for the tensor ``tensor_id``: codecs whose selection or rotation must be
        the same on every rank (random-k, the sketch) get the shared key (seed shared, this step,
        this tensor)."""
        if hasattr(self.codec, "with_shared_key"):
            return self.codec.with_shared_key(RandomKey(self.shared_seed, self.step & 0xFFFFFFFF, tensor_id))
        return self.codec


@dataclass
class Pending:
    """A bucket's collective(s) in flight; multi-phase routes subclass it with what their later
    phases need (typed fields, not a dict)."""
    job: Job
    handle: Any
    sent: int                            # bytes this rank put on the wire
    payloads: list[Payload] = field(default_factory=list)   # this rank's phase-1 payloads
    received: int = 0
    averaged: bool = False               # finish() returns the mean over ranks, not the sum


class Route:
    """Base of the routes; see the module docstring."""

    name = "route"
    #: payload kinds it can carry: "fixed" (quantizers), "sparse" (top-k), "summable", "any"
    carries = "any"
    #: how many times the flush calls :meth:`advance`
    phases = 0

    def start(self, job: Job) -> Pending:
        raise NotImplementedError

    def advance(self, pending: Pending) -> None:
        """Wait the phase in flight and start the next (called :attr:`phases` times)."""

    def finish(self, pending: Pending) -> torch.Tensor:
        """The sum (or, with ``pending.averaged``, the mean) over ranks as flat fp32."""
        raise NotImplementedError

    def seconds(self, n: int, world: int, payload_bytes: float, segments: int, link: Link,
                speed: Speed) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


def segment_codec(job: Job, seg: Any) -> Codec:
    """The codec of one segment of the bucket: :meth:`Job.codec_for` its tensor id and, for a
    codec whose encoding follows the members' layout (``with_layout``: AdaComp's bin size by
    shape, Gradient Dropping's per-tensor normalization), the shapes of the members the segment
    holds (one 1-D shape when the members do not tile it)."""
    codec = job.codec_for(seg.tensor_id)
    if not hasattr(codec, "with_layout"):
        return codec
    shapes, offset = [], 0
    for m in job.members:
        if seg.offset <= offset and offset + m.numel <= seg.offset + seg.numel:
            shapes.append(m.shape)
        offset += m.numel
    if sum(torch.Size(s).numel() for s in shapes) != seg.numel:
        shapes = [torch.Size([seg.numel])]
    return codec.with_layout(shapes)


def encode_segments(job: Job, x: torch.Tensor | None = None) -> list[Payload]:
    """Encode each segment of ``x`` (default: the job's input) with its key and working residual:
    in one call where the codec has ``encode_many``."""
    x = job.x if x is None else x
    codec = _batch_codec(job, "encode_many")
    if codec is not None:
        return codec.encode_many(x, _keyed(job), job.residual)
    out = []
    for seg in job.segments:
        part = slice(seg.offset, seg.offset + seg.numel)
        residual = None if job.residual is None else job.residual[part]
        out.append(segment_codec(job, seg).encode(x[part], job.key(seg.tensor_id), residual=residual,
                                                  check_finite=False))
    return out


def _batch_codec(job: Job, method: str) -> Codec | None:
    """The codec that handles all the job's segments in one call (``method``), or None: several
    segments, a codec with that method and no per-segment layout.  A shared-key codec comes
    keyed for the bucket and keys each segment with its tensor id (what :meth:`Job.codec_for`
    gives it)."""
    codec = job.codec_for(job.tensor_id)
    if len(job.segments) > 1 and hasattr(codec, method) and not hasattr(codec, "with_layout"):
        return codec
    return None


def _keyed(job: Job) -> list[tuple[int, int, RandomKey]]:
    """The segments as the batched calls take them: (offset, numel, this rank's key)."""
    return [(seg.offset, seg.numel, job.key(seg.tensor_id)) for seg in job.segments]


def decode_segments(job: Job, blocks: list[list[Payload]], out: torch.Tensor) -> torch.Tensor:
    """``out`` (the bucket, zeroed) += every rank's payload of each segment (``blocks[rank][s]``),
    ranks in order: in one call where the codec has ``decode_many``."""
    per_segment = [[rank_blocks[s] for rank_blocks in blocks] for s in range(len(job.segments))]
    codec = _batch_codec(job, "decode_many")
    if codec is not None:
        return codec.decode_many(per_segment, out, _keyed(job))
    for seg, payloads in zip(job.segments, per_segment):
        segment_codec(job, seg).decode_accumulate(payloads, out[seg.offset:seg.offset + seg.numel])
    return out


def codec_seconds(n: float, payloads_decoded: float, calls: float, speed: Speed) -> float:
    """Encode n elements, decode ``payloads_decoded`` x n elements, in ``calls`` codec calls."""
    return n / speed.encode + payloads_decoded * n / speed.decode + calls * speed.call_s


def ring_allreduce_bytes(nbytes: float, world: int) -> float:
    """Bytes each rank receives in a ring allreduce of ``nbytes``."""
    return 2 * (world - 1) / world * nbytes


def chunk_bounds(numel: int, parts: int) -> list[int]:
    """Boundaries b_0 = 0 < ... < b_P = numel of P chunks whose sizes differ by at most one."""
    return [c * numel // parts for c in range(parts + 1)]


def derived_id(tensor_id: int, phase: int, chunk: int) -> int:
    """A distinct Philox tensor id per (tensor, phase, chunk), so chunks draw independent bits."""
    return zlib.crc32(struct.pack("<III", tensor_id, phase, chunk))
