"""N data-parallel workers in one process: what a compressor does to training at 16 or 64
workers, without a cluster.

The workers are threads running the very engine, routes and codecs a Horovod job runs (the
same buckets, plan, Philox keys per rank, summation orders), over :class:`LocalWorld`'s
collectives.  Since every worker holds the same weights after every step, one model replica
serves them all: each step computes every worker's gradient on its own batch, one after the
other, lets the N engines exchange them, and applies the (identical) aggregate once.

Bit-identical to a real ``horovodrun`` job of the same script on the compressed routes (tested
at 2 and 3 workers) **when both plan for the same link**: the route of each bucket (allgather or
two-phase, which quantizes twice) is chosen by the cost model for a link, and a real job with
``link="auto"`` plans for the link and codec speeds it measures at its first step, which a
simulation cannot know.  So the simulator plans for the compressor's declared link (its
``link=`` or ``HVD_COMPRESS_LINK_GBPS``), 1 Gbit/s when none is declared: declare the link in
the real job too (or name the route, ``route="allgather"``) to get the same run.  Uncompressed
buckets are summed in rank order here and in Horovod's ring order there, which can differ in
the last bits from 3 workers on.

Example (the digits CNN at 16 workers, TernGrad)::

    import hvd_compress
    from hvd_compress.simulate import DataParallel

    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05 * 16, momentum=0.9)
    sim = DataParallel(model, optimizer, hvd_compress.TernGrad(route="compressed"), workers=16)
    for batches in loader:                      # a list of 16 batches per step
        losses = sim.step(lambda m, b: F.cross_entropy(m(b[0]), b[1]), batches)
    print(sim.compression.stats())

See examples/simulate.py for a complete script.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .engine.buckets import Member
from .engine.engine import Engine
from .engine.local import LocalWorld
from .horovod.compressor import as_compressor
from .methods.base import Method
from .engine.cost import ASSUMED_INTRA, declared_intra_link, declared_link
from .routes.base import Link

#: the link a simulation plans for when the compressor declares none
DEFAULT_LINK = Link.gbps(1.0)


class DataParallel:
    """``workers`` simulated data-parallel workers sharing one model replica.

    Args:
        model: the model (its parameters are the workers' common weights).
        optimizer: a torch optimizer over the model's parameters, as the script would wrap with
            ``hvd.DistributedOptimizer`` (its state is the same on every worker).
        compression: an hvd_compress compressor or method (or a ``{pattern: compressor}`` map
            as :class:`~hvd_compress.horovod.optimizer.PerParameterCompressor` takes).
        workers: number of simulated ranks.
        local_size: ranks per simulated host (hosts of consecutive ranks, as ``horovodrun -H
            a:L,b:L`` places them): ``workers=4, local_size=2`` is the world of a 2-host job of 2
            ranks each, hierarchical routes included.
        named_parameters: defaults to ``model.named_parameters()``.
        average: Horovod's ``op=Average`` (else Sum).
        link: the link the plan is made for (between hosts); default: the compressor's declared
            link, else :data:`DEFAULT_LINK` (a measured in-process link would mean nothing).
            ``intra_link``: inside a host, likewise (default: the compressor's declared one, else
            :data:`~hvd_compress.engine.cost.ASSUMED_INTRA`).  Use
            ``route="compressed"`` on the compressor to study compression's effect on training
            whatever its speed.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, compression: Any,
                 workers: int, *, named_parameters=None, average: bool = True,
                 link: Link | None = None, local_size: int = 1, intra_link: Link | None = None) -> None:
        compression = as_compressor(compression)
        if link is None:
            link = declared_link(getattr(compression, "link", "auto")) or DEFAULT_LINK
        self.link = link
        if intra_link is None:
            intra_link = declared_intra_link(getattr(compression, "intra_link", "auto")) or ASSUMED_INTRA
        self.model, self.optimizer, self.compression = model, optimizer, compression
        self.workers = workers
        names = {p: n for n, p in (named_parameters or model.named_parameters())}
        self._params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        members = []
        for p in self._params:
            method = compression.method_for(names[p])
            if not isinstance(method, Method):
                raise TypeError(f"{names[p]}: the simulator runs hvd_compress methods only, got {method!r}")
            members.append(Member(len(members), names[p], p.shape, p.dtype, method))
        self.world = LocalWorld(workers, local_size)
        self.engines = [Engine(members, (lambda c: lambda: c)(comm), average=average,
                               cap_bytes=int(compression.bucket_cap_mb * 2 ** 20), link=link,
                               intra_link=intra_link, name="sim", external_dense=True)
                        for comm in self.world.comms]
        self._average = average
        # methods that read the step's loss (eSGD): each simulated worker reports its own
        self._observers = [m for m in {id(m.method): m.method for m in members}.values()
                           if hasattr(m, "observe_loss")]

    def step(self, loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor], batches: Sequence[Any]) -> list[float]:
        """One synchronous step: worker r's gradient of ``loss_fn(model, batches[r])``, the
        compressed exchange, one optimizer step with the aggregate.  Returns the workers' losses."""
        if len(batches) != self.workers:
            raise ValueError(f"need one batch per worker ({self.workers}), got {len(batches)}")
        grads, losses = [], []
        for batch in batches:
            self.optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(self.model, batch)
            loss.backward()
            losses.append(float(loss.detach()))
            for method in self._observers:
                method.observe_loss(losses[-1], rank=len(losses) - 1)
            grads.append([p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params])

        def exchange(comm) -> list[torch.Tensor]:
            engine = self.engines[comm.rank]
            mine = grads[comm.rank]
            external = {}
            for i in reversed(range(len(mine))):   # backward's order, roughly, as the hooks fire
                if not engine.add(i, mine[i]):
                    op = "average" if self._average else "sum"
                    external[i] = comm.allreduce(mine[i], f"horovod.{i}", op=op)
            return [engine.external_result(i, external[i].wait()) if i in external else engine.result(i)
                    for i in range(len(mine))]
        aggregates = self.world.run(exchange)
        for p, g in zip(self._params, aggregates[0]):
            p.grad = g
        self.optimizer.step()
        return losses

    def stats(self) -> dict[str, int]:
        """Worker 0's byte and step counts (``compression.stats()`` of a real job's rank 0)."""
        self.engines[0].finalize()
        return self.engines[0].stats.as_dict()

    def plan(self) -> str:
        return str(self.engines[0].plan)
