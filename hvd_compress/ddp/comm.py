"""The engine's :class:`~hvd_compress.engine.comm.Comm` over ``torch.distributed``.

``torch.distributed`` matches collectives by the order a process group issues them, not by
name: the engine issues them in the same order on every rank (buckets launch in DDP's bucket
order, which DDP keeps the same on every rank; the flush runs in bucket order), so the names
are not needed.  Collectives whose sizes differ by rank (an allgather of sparse payloads, an
alltoall) take two steps: the sizes are exchanged asynchronously when the collective starts,
and the data collective is issued when :meth:`_Staged.issue` (or ``wait``) is called, which the
flush does in the same order on every rank (issuing every bucket's before waiting for any).
Nothing here blocks before ``issue()`` or ``wait()``.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..engine.topology import Placement


class _Done:
    """A collective issued with ``async_op=True``; ``then`` makes the result from the output."""

    def __init__(self, work: Any, then: Callable[[], Any]) -> None:
        self._work, self._then = work, then

    def wait(self) -> Any:
        self._work.wait()
        return self._then()

    def done(self) -> bool:
        return self._work.is_completed()


class _Staged:
    """Sizes exchanged first (``sizes``, in flight); ``then(sizes)`` issues the data collective
    and returns its handle, at :meth:`issue` or ``wait()`` only (so every rank issues it at the
    same point)."""

    def __init__(self, sizes: _Done, then: Callable[[list[int]], _Done]) -> None:
        self._sizes, self._then = sizes, then
        self._data: _Done | None = None

    def issue(self) -> None:
        """Issue the data collective now (waiting for the sizes only), so that the flush puts
        every bucket's data on the wire before it waits for the first."""
        if self._data is None:
            self._data = self._then(self._sizes.wait())

    def wait(self) -> Any:
        self.issue()
        return self._data.wait()

    def done(self) -> bool:
        return self._data is not None and self._data.done()


def placement(rank: int) -> Placement:
    """Where this rank runs, from what the launcher says: torchrun's ``GROUP_RANK``,
    ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, or Slurm's ``SLURM_NODEID``, ``SLURM_LOCALID`` and
    tasks per node; a launcher that says nothing gives one host per rank (the flat routes)."""
    env = os.environ
    if "LOCAL_RANK" in env and "LOCAL_WORLD_SIZE" in env:
        return Placement(int(env.get("GROUP_RANK", rank)), int(env["LOCAL_RANK"]), int(env["LOCAL_WORLD_SIZE"]))
    if "SLURM_LOCALID" in env and "SLURM_NODEID" in env and "SLURM_NTASKS_PER_NODE" in env:
        per_node = int(env["SLURM_NTASKS_PER_NODE"].split("(")[0].split(",")[0])
        return Placement(int(env["SLURM_NODEID"]), int(env["SLURM_LOCALID"]), per_node)
    return Placement(rank, 0, 1)


class TorchComm:
    """``torch.distributed``'s collectives on ``group`` (None: the default group), gloo or NCCL."""

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.placement = placement(dist.get_rank())

    def allreduce(self, tensor: torch.Tensor, name: str, op: str = "sum") -> _Done:
        out = tensor.detach().clone()
        reduce_op = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
        work = dist.all_reduce(out, op=reduce_op, group=self.group, async_op=True)
        return _Done(work, (lambda: out.div_(self.size)) if op == "average" else (lambda: out))

    def allgather(self, tensor: torch.Tensor, name: str) -> _Staged:
        tensor = tensor.detach().contiguous()
        rows = self._exchange_sizes(tensor.shape[0] if tensor.dim() else 1)

        def gather(sizes: list[int]) -> _Done:
            longest, row = max(sizes), tensor.reshape(tensor.shape[0] if tensor.dim() else 1, -1)
            padded = row if row.shape[0] == longest else torch.cat(
                [row, row.new_zeros(longest - row.shape[0], row.shape[1])])
            out = padded.new_empty((self.size * longest, row.shape[1]))
            work = dist.all_gather_into_tensor(out, padded.contiguous(), group=self.group, async_op=True)
            tail = tuple(tensor.shape[1:])

            def concatenated() -> torch.Tensor:
                parts = [out[r * longest:r * longest + n] for r, n in enumerate(sizes)]
                return torch.cat(parts).reshape(-1, *tail)
            return _Done(work, concatenated)
        return _Staged(rows, gather)

    def alltoall(self, tensor: torch.Tensor, splits: list[int], name: str) -> _Staged:
        tensor = tensor.detach().contiguous()
        mine = torch.tensor(splits, dtype=torch.int64, device=tensor.device)
        theirs = torch.empty_like(mine)
        sizes = _Done(dist.all_to_all_single(theirs, mine, group=self.group, async_op=True),
                      lambda: [int(n) for n in theirs.tolist()])

        def exchange(received: list[int]) -> _Done:
            out = tensor.new_empty(sum(received))
            work = dist.all_to_all_single(out, tensor, output_split_sizes=received,
                                          input_split_sizes=list(splits), group=self.group, async_op=True)
            return _Done(work, lambda: (out, received))
        return _Staged(sizes, exchange)

    def _exchange_sizes(self, n: int) -> _Done:
        device = _device(self.group)
        mine = torch.tensor([n], dtype=torch.int64, device=device)
        every = torch.empty(self.size, dtype=torch.int64, device=device)
        work = dist.all_gather_into_tensor(every, mine, group=self.group, async_op=True)
        return _Done(work, lambda: [int(s) for s in every.tolist()])


def _device(group: Any) -> torch.device:
    """Where small control tensors live: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
