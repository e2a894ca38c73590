"""Where the ranks are: hosts, local ranks, and collectives inside a group of ranks.

Every rank knows its own placement from the framework (Horovod: ``hvd.cross_rank()``,
``hvd.local_rank()``, ``hvd.local_size()``); the engine's step header carries it, so after one
step every rank holds every rank's placement and derives the same :class:`Topology`.

The hierarchical routes (:mod:`hvd_compress.routes.hierarchical`) talk inside two partitions of
the ranks: the ranks of one host, and the ranks with the same position on every host (its
*peers*).  :class:`GroupComm` runs a group's collectives as collectives of the whole world in
which every rank sends only inside its own group (per-destination splits of an ``alltoall``,
zero outside the group): every rank of the world takes part in each under one name, so no
process set is needed and the user's ``hvd.init()`` stays as it is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Placement:
    """One rank's place: its host's key (Horovod's cross rank: the host's index in a homogeneous
    job), its local rank and the number of ranks on its host."""
    host: int
    local_rank: int
    local_size: int


@dataclass(frozen=True)
class Topology:
    """The ranks of each host, every host in the same order on every rank (hosts by key, ranks
    ascending).  ``hierarchical`` when there are at least two hosts with the same number (at least
    two) of ranks each: the shape the hierarchical routes need."""
    hosts: tuple[tuple[int, ...], ...]

    @classmethod
    def flat(cls, size: int) -> "Topology":
        """What is known before the placements are exchanged: one rank per host."""
        return cls(tuple((r,) for r in range(size)))

    @classmethod
    def of(cls, placements: list[Placement]) -> "Topology":
        """The hosts the placements describe.  Horovod's cross rank is the host's index only when
        every host has the same number of ranks; other jobs are grouped by their first rank
        (``rank - local_rank``: hosts of consecutive ranks, as launchers place them).  Placements
        that contradict themselves (a host whose local ranks are not 0..L-1) give :meth:`flat`."""
        homogeneous = len({p.local_size for p in placements}) == 1
        by_host: dict[int, list[int]] = {}
        for rank, p in enumerate(placements):
            by_host.setdefault(p.host if homogeneous else rank - p.local_rank, []).append(rank)
        for ranks in by_host.values():
            if sorted(placements[r].local_rank for r in ranks) != list(range(placements[ranks[0]].local_size)):
                return cls.flat(len(placements))
        return cls(tuple(tuple(by_host[h]) for h in sorted(by_host)))

    @property
    def size(self) -> int:
        return sum(len(h) for h in self.hosts)

    @property
    def n_hosts(self) -> int:
        return len(self.hosts)

    @property
    def local_size(self) -> int:
        """Ranks per host (the largest host's count when hosts differ)."""
        return max(len(h) for h in self.hosts)

    @property
    def hierarchical(self) -> bool:
        return self.n_hosts >= 2 and self.local_size >= 2 and len({len(h) for h in self.hosts}) == 1

    def host_group(self, rank: int) -> tuple[int, ...]:
        """The ranks on ``rank``'s host (its local index is its position here)."""
        return next(h for h in self.hosts if rank in h)

    def peer_group(self, rank: int) -> tuple[int, ...]:
        """The ranks with ``rank``'s local index, one per host, in host order."""
        index = self.host_group(rank).index(rank)
        return tuple(h[index] for h in self.hosts)

    def describe(self) -> str:
        if self.hierarchical:
            return f"{self.n_hosts} hosts x {self.local_size} ranks"
        sizes = sorted({len(h) for h in self.hosts})
        if self.n_hosts == 1:
            return f"1 host x {self.size} ranks"
        if sizes == [1]:
            return f"{self.n_hosts} hosts x 1 rank"
        return f"{self.n_hosts} hosts of {'/'.join(map(str, sizes))} ranks"


class _Mapped:
    """A handle whose result passes through ``fn``."""

    def __init__(self, handle: Any, fn: Callable[[Any], Any]) -> None:
        self._handle, self._fn = handle, fn

    def wait(self) -> Any:
        return self._fn(self._handle.wait())

    def done(self) -> bool:
        return self._handle.done()


class GroupComm:
    """This rank's ``group`` (ranks of ``comm``, ascending or in host order; this rank among
    them) as a :class:`~hvd_compress.engine.comm.Comm` whose collectives are ``comm``'s alltoalls
    with splits zero outside the group.  Every rank of ``comm`` must start the same collectives
    (same names, same order of waits) on its own group of the same partition."""

    def __init__(self, comm: Any, group: tuple[int, ...]) -> None:
        self._comm, self.group = comm, group
        self.rank, self.size = group.index(comm.rank), len(group)

    def alltoall(self, tensor: torch.Tensor, splits: list[int], name: str) -> _Mapped:
        full = [0] * self._comm.size
        for member, n in zip(self.group, splits):
            full[member] = n
        order = sorted(range(self.size), key=lambda i: self.group[i])
        if order != list(range(self.size)):            # the world sends in its rank order
            starts = [sum(splits[:i]) for i in range(self.size)]
            tensor = torch.cat([tensor[starts[i]:starts[i] + splits[i]] for i in order])

        def regroup(out: tuple[torch.Tensor, list[int]]) -> tuple[torch.Tensor, list[int]]:
            data, received = out
            sizes = [received[m] for m in self.group]
            if order == list(range(self.size)):        # ascending group: already in group order
                return data, sizes
            starts, pos = {}, 0
            for i in order:                            # data arrives in the world's rank order
                starts[i], pos = pos, pos + sizes[i]
            return torch.cat([data[starts[i]:starts[i] + sizes[i]] for i in range(self.size)]), sizes
        return _Mapped(self._comm.alltoall(tensor, full, name), regroup)

    def allgather(self, tensor: torch.Tensor, name: str) -> _Mapped:
        """Every member's 1-D tensor, concatenated in group order (each sends its tensor to
        every member: the group's bytes, and no more, on the wire)."""
        flat = tensor.reshape(-1)
        return _Mapped(self.alltoall(flat.repeat(self.size), [flat.numel()] * self.size, name),
                       lambda out: out[0])

    def allreduce(self, tensor: torch.Tensor, name: str, op: str = "sum") -> _Mapped:
        """Sum (in group order), mean or maximum over the group."""
        def reduce(data: torch.Tensor) -> torch.Tensor:
            parts = data.view(self.size, *tensor.shape)
            out = parts[0].clone()
            for p in parts[1:]:
                out = torch.maximum(out, p) if op == "max" else out.add_(p)
            return out / self.size if op == "average" else out
        return _Mapped(self.allgather(tensor, name), reduce)
