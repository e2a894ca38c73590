"""The collectives the routes need, behind one small interface.

Every collective is named (every rank may start them in any order) and nothing blocks until
:meth:`Handle.wait`.  Implementations: :class:`~hvd_compress.horovod.comm.HorovodComm`
(Horovod's asynchronous collectives on a process set) and
:class:`~hvd_compress.engine.local.LocalWorld`'s ranks (the simulator); the routes run
unchanged over any implementation with the same semantics.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from .topology import Placement


class Handle(Protocol):
    def wait(self) -> Any:
        """The collective's result (blocks until it is complete)."""

    def done(self) -> bool:
        """Whether :meth:`wait` would return (or raise) at once."""

    # Optional: ``issue()`` starts what the collective still has to start (the data of a
    # collective whose sizes are exchanged first, ``ddp.comm``); the flush calls it on every
    # rank in bucket order before it waits for any bucket.  Handles without it start at once.


class Comm(Protocol):
    rank: int
    size: int
    #: where this rank runs (host, local rank, ranks on the host): see engine.topology
    placement: Placement

    def allreduce(self, tensor: torch.Tensor, name: str, op: str = "sum") -> Handle:
        """Out-of-place sum (``op="sum"``), mean (``"average"``) or maximum (``"max"``) over ranks."""

    def allgather(self, tensor: torch.Tensor, name: str) -> Handle:
        """Concatenation of every rank's 1-D tensor along dim 0, in rank order (lengths may differ)."""

    def alltoall(self, tensor: torch.Tensor, splits: list[int], name: str) -> Handle:
        """Rank r sends ``tensor[sum(splits[:c]):...+splits[c]]`` to rank c; ``wait()`` gives
        (received tensor, received splits)."""
