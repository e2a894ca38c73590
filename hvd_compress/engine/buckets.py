"""Members and buckets: which gradients travel together, decided once.

A *member* is one parameter an optimizer allreduces.  Buckets are assigned as DDP's Reducer
assigns them: members in reverse registration order (about the order backward produces their
gradients) fill a bucket until it holds ``cap_bytes`` of fp32; members of different methods, and
members below their method's ``min_numel`` (sent dense), never share a bucket; a member larger
than the cap gets a bucket of its own.  As in DDP, the first bucket of each kind closes at
:data:`FIRST_BUCKET_BYTES` already: it is launched (encoded and on the wire) while backward is
still filling the rest, instead of after a full cap's worth of gradients and encoding.
``cap_bytes=0`` gives one member per bucket (layer-wise).  The assignment depends only on the
members, so every rank computes the same.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import torch

from ..routes.base import Segment


@dataclass(frozen=True)
class Member:
    """One parameter: its position in registration order, name, shape and gradient dtype, and
    the method (compressor configuration) that serves it."""
    index: int
    name: str
    shape: torch.Size
    dtype: torch.dtype
    method: Any = field(compare=False)

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def small(self) -> bool:
        """Below the method's ``min_numel``: sent uncompressed."""
        return self.numel < self.method.min_numel


@dataclass
class Bucket:
    """Members laid end to end (in the order listed) in one flat fp32 buffer."""
    index: int
    members: list[Member]
    method: Any

    def __post_init__(self) -> None:
        self.offsets = []
        offset = 0
        for m in self.members:
            self.offsets.append(offset)
            offset += m.numel
        self.numel = offset
        names = "\0".join(m.name for m in self.members)
        #: Philox tensor id of bucket-scope encodings and the tag of its collectives
        self.tensor_id = zlib.crc32(names.encode())

    @property
    def small(self) -> bool:
        return self.members[0].small

    def segments(self, scope: str) -> list[Segment]:
        """One segment per member (``scope="tensor"``) or one for the whole bucket."""
        if scope == "bucket":   # (for one member: crc32 of its name, as tensor scope)
            return [Segment(0, self.numel, self.tensor_id)]
        if scope != "tensor":
            raise ValueError(f"scope must be 'tensor' or 'bucket', got {scope!r}")
        return [Segment(o, m.numel, member_tensor_id(m.name)) for o, m in zip(self.offsets, self.members)]

    def describe(self) -> str:
        if len(self.members) == 1:
            return self.members[0].name
        return f"{self.members[0].name} .. {self.members[-1].name} ({len(self.members)})"


def member_tensor_id(name: str) -> int:
    """Philox tensor id of a member encoded on its own: crc32 of its name."""
    return zlib.crc32(name.encode())


#: the cap of the first bucket of each kind (DDP's ``dist._DEFAULT_FIRST_BUCKET_BYTES``)
FIRST_BUCKET_BYTES = 1 << 20


def assign_buckets(members: list[Member], cap_bytes: int) -> list[Bucket]:
    """Buckets in launch order (the first holds the last-registered members)."""
    if cap_bytes < 0:
        raise ValueError(f"bucket cap must be >= 0 bytes, got {cap_bytes}")
    open_: dict[tuple, list[Member]] = {}
    closed: list[list[Member]] = []
    started: set[tuple] = set()      # kinds whose first bucket is closed
    for m in reversed(members):
        key = (id(m.method), m.small)
        group = open_.setdefault(key, [])
        group.append(m)
        cap = cap_bytes if key in started else min(cap_bytes, FIRST_BUCKET_BYTES)
        if 4 * sum(x.numel for x in group) >= cap:
            closed.append(open_.pop(key))
            started.add(key)
    closed.extend(g for g in open_.values() if g)
    # Launch order: by the position (in reverse registration order) of each bucket's first member.
    position = {m.index: i for i, m in enumerate(reversed(members))}
    closed.sort(key=lambda g: position[g[0].index])
    return [Bucket(i, g, g[0].method) for i, g in enumerate(closed)]
