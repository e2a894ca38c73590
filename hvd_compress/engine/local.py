"""N ranks in one process: a :class:`~hvd_compress.engine.comm.Comm` per thread, for running
the very engine, routes and codecs of a real job without Horovod (tests, and simulating a world
on one machine).

Collectives rendezvous by name: each rank deposits its tensor, the last one to arrive computes
the result for everyone, and ``wait()`` blocks until it exists.  Sums add the ranks in rank
order in fp32 (Horovod's ring adds in another order, so dense sums can differ from a real job
in the last bits; compressed routes, whose sums are the codecs' own decode-accumulate in rank
order, are bit-identical).
"""
from __future__ import annotations

import threading
from typing import Any, Callable

import torch

from .topology import Placement


class _Rendezvous:
    def __init__(self, size: int) -> None:
        self.size = size
        self.lock = threading.Condition()
        # A name is reused step after step: the n-th use by each rank is generation n.
        self.generation: dict[tuple[str, int], int] = {}
        self.pending: dict[tuple[str, int], dict[int, Any]] = {}
        self.results: dict[tuple[str, int], tuple[Any, int]] = {}   # -> (result, readers left)

    def run(self, name: str, rank: int, item: Any, combine: Callable[[list[Any]], Any]) -> "_Ticket":
        with self.lock:
            gen = self.generation.get((name, rank), 0)
            self.generation[(name, rank)] = gen + 1
            key = (name, gen)
            slot = self.pending.setdefault(key, {})
            slot[rank] = item
            if len(slot) == self.size:
                del self.pending[key]
                self.results[key] = (combine([slot[r] for r in range(self.size)]), self.size)
                self.lock.notify_all()
        return _Ticket(self, key, rank)

    def take(self, key: tuple[str, int], rank: int, timeout: float) -> Any:
        with self.lock:
            if not self.lock.wait_for(lambda: key in self.results, timeout):
                raise TimeoutError(f"rank {rank}: collective {key[0]!r} not completed in {timeout}s")
            result, left = self.results[key]
            if left == 1:
                del self.results[key]
            else:
                self.results[key] = (result, left - 1)
            return result


class _Ticket:
    def __init__(self, rv: _Rendezvous, key: tuple[str, int], rank: int) -> None:
        self.rv, self.name, self.rank = rv, key, rank

    def wait(self, timeout: float = 120.0) -> Any:
        """This rank's result: its own copy, as a collective's output is."""
        result = self.rv.take(self.name, self.rank, timeout)
        result = result(self.rank) if callable(result) else result
        if isinstance(result, tuple):
            return (result[0].clone(), list(result[1]))
        return result.clone()

    def done(self) -> bool:
        with self.rv.lock:
            return self.name in self.rv.results


class LocalComm:
    """One rank's view of a :class:`LocalWorld`."""

    def __init__(self, rv: _Rendezvous, rank: int, local_size: int = 1) -> None:
        self._rv, self.rank, self.size = rv, rank, rv.size
        self.placement = Placement(rank // local_size, rank % local_size, local_size)

    def allreduce(self, tensor: torch.Tensor, name: str, op: str = "sum"):
        def combine(ts: list[torch.Tensor]) -> torch.Tensor:
            out = ts[0].clone()
            for t in ts[1:]:
                out = torch.maximum(out, t) if op == "max" else out + t
            return out / len(ts) if op == "average" else out
        return self._rv.run(name, self.rank, tensor.detach().clone(), combine)

    def allgather(self, tensor: torch.Tensor, name: str):
        return self._rv.run(name, self.rank, tensor.detach().clone(), torch.cat)

    def alltoall(self, tensor: torch.Tensor, splits: list[int], name: str):
        def combine(items: list[tuple[torch.Tensor, list[int]]]):
            pieces = []
            for t, s in items:
                bounds = [0]
                for n in s:
                    bounds.append(bounds[-1] + n)
                pieces.append([t[bounds[c]:bounds[c + 1]] for c in range(len(s))])
            return lambda r: (torch.cat([pieces[src][r] for src in range(len(items))]),
                              [pieces[src][r].numel() for src in range(len(items))])
        return self._rv.run(name, self.rank, (tensor.detach().clone(), list(splits)), combine)


class LocalWorld:
    """``size`` ranks in this process, ``local_size`` per simulated host (ranks host by host, as
    ``horovodrun -H a:L,b:L`` places them).  :meth:`run` calls ``fn(comm)`` on one thread per rank
    and returns the results in rank order (re-raising the first rank's exception)."""

    def __init__(self, size: int, local_size: int = 1) -> None:
        if size < 1:
            raise ValueError(f"a world needs at least one rank, got {size}")
        if local_size < 1 or size % local_size:
            raise ValueError(f"local_size must divide the world size {size}, got {local_size}")
        self.size, self.local_size = size, local_size
        self._rv = _Rendezvous(size)
        self.comms = [LocalComm(self._rv, r, local_size) for r in range(size)]

    def run(self, fn: Callable[[LocalComm], Any]) -> list[Any]:
        results: list[Any] = [None] * self.size
        errors: list[BaseException | None] = [None] * self.size

        def body(rank: int) -> None:
            try:
                results[rank] = fn(self.comms[rank])
            except BaseException as e:  # noqa: BLE001 - reported below
                errors[rank] = e
        threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for e in errors:
            if e is not None:
                raise e
        return results
