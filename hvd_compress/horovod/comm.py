"""The engine's :class:`~hvd_compress.engine.comm.Comm` over Horovod's asynchronous collectives."""
from __future__ import annotations

from typing import Any

import torch

from ..engine.comm import Handle
from ..engine.topology import Placement


class _HorovodHandle:
    def __init__(self, handle: int, transform=None) -> None:
        self._handle = handle
        self._transform = transform

    def wait(self) -> Any:
        import horovod.torch as hvd
        out = hvd.synchronize(self._handle)
        return out if self._transform is None else self._transform(out)

    def done(self) -> bool:
        import horovod.torch as hvd
        return hvd.poll(self._handle)


class HorovodComm:
    """Horovod's collectives on ``process_set`` (None: the global set)."""

    def __init__(self, process_set=None) -> None:
        import horovod.torch as hvd
        self._hvd = hvd
        self.process_set = process_set if process_set is not None else hvd.global_process_set
        self.rank = self.process_set.rank()
        self.size = self.process_set.size()
        # Horovod's own view: the host's index among hosts (homogeneous jobs) and the position
        # on it, from the launcher's host list (-H, the MPI hostfile, Slurm's node list)
        self.placement = Placement(hvd.cross_rank(), hvd.local_rank(), hvd.local_size())

    def allreduce(self, tensor: torch.Tensor, name: str, op: str = "sum") -> Handle:
        hvd_op = {"sum": self._hvd.Sum, "average": self._hvd.Average, "max": self._hvd.Max}[op]
        return _HorovodHandle(self._hvd.allreduce_async(tensor, name=name, op=hvd_op,
                                                        process_set=self.process_set))

    def allgather(self, tensor: torch.Tensor, name: str) -> Handle:
        return _HorovodHandle(self._hvd.allgather_async(tensor, name=name,
                                                        process_set=self.process_set))

    def alltoall(self, tensor: torch.Tensor, splits: list[int], name: str) -> Handle:
        handle = self._hvd.alltoall_async(tensor, splits=torch.tensor(splits, dtype=torch.int32),
                                          name=name, process_set=self.process_set)
        return _HorovodHandle(handle, lambda out: (out[0], [int(s) for s in out[1].tolist()]))
