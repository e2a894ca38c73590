"""What :class:`~hvd_compress.local_sgd.LocalSGD` and
:class:`~hvd_compress.delayed.DelayedAveraging` share: an optimizer that wraps the user's
(in place of ``hvd.DistributedOptimizer``) and averages through the engine.

* **Delegation.** The wrapper *is* a ``torch.optim.Optimizer`` (LR schedulers and GradScaler
  accept it) whose ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's; its
  ``state_dict()`` is the wrapped optimizer's plus the wrapper's own state under :data:`KEY`.
* **Members.** Every parameter of the wrapped optimizer, in its order, named through
  ``named_parameters`` (needed: names key the saved state and tag the collectives, the same on
  every rank).  Averages go through :class:`~hvd_compress.engine.engine.Engine` (a dense fp32
  allreduce, or any hvd_compress method given as ``compression=``), so bytes, error feedback,
  transactional state and non-finite detection are the engine's.
* **AMP.**  Gradients are not allreduced every step, so GradScaler's ``found_inf`` is this
  rank's alone: a stock optimizer would be stepped on some ranks and not on others, and any
  schedule counted in ``step()`` would disagree across ranks (the next collective mismatches: a
  hang).  The wrappers declare ``_step_supports_amp_scaling``: GradScaler then calls ``step()``
  on every rank every iteration, setting ``grad_scale`` (gradients still scaled) and
  ``found_inf``; the wrapper unscales, skips the *local* update where this rank found an inf,
  and keeps its schedule, which counts iterations, the same on every rank.
"""
from __future__ import annotations

import zlib
from typing import Any, Callable, Iterable

import torch

from .engine import cost
from .engine.buckets import Member
from .engine.engine import Engine

#: the wrapper's entry in ``state_dict()``
KEY = "hvd_compress_wrapper"


class OptimizerWrapper(torch.optim.Optimizer):
    """Base of the averaging wrappers (see the module docstring).

    Args:
        optimizer: the local optimizer (not Horovod's DistributedOptimizer: the wrapper
            replaces it).
        named_parameters: ``model.named_parameters()`` (every parameter of ``optimizer`` needs a
            name).
        compression: an hvd_compress method (``hvd_compress.QSGD()``, ...) for what is averaged,
            or None for a dense fp32 allreduce.
        process_set: Horovod process set (None: every rank).
        comm: a :class:`~hvd_compress.engine.comm.Comm` to use instead of Horovod (e.g. a
            :class:`~hvd_compress.engine.local.LocalWorld` rank, to simulate a world in one
            process).
    """

    #: GradScaler calls step() on every rank, with grad_scale and found_inf set (module docstring)
    _step_supports_amp_scaling = True
    kind = "wrapper"

    def __init__(self, optimizer: torch.optim.Optimizer,
                 named_parameters: Iterable[tuple[str, torch.Tensor]] | None, *,
                 compression: Any = None, process_set: Any = None, comm: Any = None) -> None:
        from .horovod.compressor import MethodCompressor
        from .methods import Dense, Method
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{type(self).__name__} wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if hasattr(optimizer, "synchronize") or isinstance(optimizer, OptimizerWrapper):
            raise ValueError(f"{type(self).__name__} replaces hvd.DistributedOptimizer (it averages by "
                             "itself): wrap the plain local optimizer")
        if named_parameters is None:
            raise ValueError(f"{type(self).__name__} needs named_parameters=model.named_parameters(): "
                             "names key the saved state and the collectives")
        if isinstance(compression, MethodCompressor):
            compression = compression.method
        if compression is not None and not isinstance(compression, Method):
            raise ValueError(f"compression must be an hvd_compress method (e.g. hvd_compress.QSGD()) or "
                             f"None, got {compression!r}")
        if getattr(compression, "owns_momentum", False):
            raise ValueError(f"{type(compression).__name__} applies momentum to what it sends (a "
                             "gradient method); use TopK or another method without momentum here")
        names = {}
        for name, p in named_parameters:
            names.setdefault(p, name)
        self.optimizer = optimizer
        self.params: list[torch.Tensor] = []
        self.group_of: list[int] = []            # param -> index of its param group
        for g, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if p not in names:
                    raise ValueError(f"a parameter of shape {tuple(p.shape)} has no name in "
                                     "named_parameters (pass the model's named_parameters())")
                self.params.append(p)
                self.group_of.append(g)
        self.names = [names[p] for p in self.params]
        if len(set(self.names)) != len(self.names):
            raise ValueError("two parameters of the optimizer share a name")
        self.method = compression if compression is not None else Dense()
        self.members = [Member(i, n, p.shape, p.dtype, self.method)
                        for i, (n, p) in enumerate(zip(self.names, self.params))]
        self._comm_factory: Callable[[], Any] = (lambda: comm) if comm is not None else \
            (lambda: _horovod_comm(process_set))
        self._tag = f"{self.kind}.{zlib.crc32(chr(0).join(self.names).encode()):08x}"
        self.iteration = 0        # step() calls: the same count on every rank
        self.skipped = 0          # local updates this rank skipped (non-finite gradients)

    # -- delegation to the wrapped optimizer ------------------------------------------------------

    # the wrapped optimizer's own attributes, read and written through (schedulers and GradScaler
    # use them)
    param_groups = property(lambda self: self.optimizer.param_groups,
                            lambda self, value: setattr(self.optimizer, "param_groups", value))
    state = property(lambda self: self.optimizer.state,
                     lambda self, value: setattr(self.optimizer, "state", value))
    defaults = property(lambda self: self.optimizer.defaults,
                        lambda self, value: setattr(self.optimizer, "defaults", value))

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        raise ValueError(f"{type(self).__name__}: add every parameter group to the optimizer before "
                         "wrapping it (its members are fixed)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r}, compression={self.method!r})"

    def state_dict(self) -> dict:
        """The wrapped optimizer's state dict plus this wrapper's state under :data:`KEY`."""
        state = self.optimizer.state_dict()
        state[KEY] = {"kind": type(self).__name__, "iteration": self.iteration, "skipped": self.skipped,
                      **self._wrapper_state()}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        mine = state_dict.pop(KEY, None)
        if mine is None or mine.get("kind") != type(self).__name__:
            raise ValueError(f"not a {type(self).__name__} state dict (no {KEY!r} entry of that kind)")
        self.optimizer.load_state_dict(state_dict)
        self.iteration, self.skipped = int(mine["iteration"]), int(mine["skipped"])
        self._load_wrapper_state(mine)

    def _wrapper_state(self) -> dict:
        raise NotImplementedError

    def _load_wrapper_state(self, state: dict) -> None:
        raise NotImplementedError

    # -- for the subclasses -----------------------------------------------------------------------

    def _engine(self, suffix: str = "") -> Engine:
        """An engine over every member (a dense method needs no link: its plan is fixed)."""
        from .methods import Dense
        link = cost.ASSUMED if isinstance(self.method, Dense) else cost.declared_link(self.method.link)
        return Engine(self.members, self._comm_factory, average=True,
                      cap_bytes=int(self.method.bucket_cap_mb * 2 ** 20), link=link,
                      name=self._tag + suffix)

    def _local_gradients(self) -> bool:
        """Check the gradients and apply GradScaler's contract: unscale them when it left them
        scaled; True when this rank's update may be applied (no inf/NaN found)."""
        for name, p in zip(self.names, self.params):
            if p.grad is not None and p.grad.is_sparse:
                raise ValueError(f"{type(self).__name__}: {name} has a sparse gradient; sparse "
                                 "gradients are not supported (use nn.Embedding(sparse=False))")
        scale = getattr(self, "grad_scale", None)
        if scale is not None:
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, scale.double().reciprocal().float().to(grads[0].device))
        found = getattr(self, "found_inf", None)
        if found is not None and bool(found.item()):
            self.skipped += 1
            return False
        return True

    def _engine_stats(self, engines: list[Engine]) -> dict[str, int]:
        """Bytes and collectives of ``engines``; ``bytes_dense`` is what Horovod's fp32 gradient
        allreduce would have sent over the same iterations."""
        total = {"bytes_sent": 0, "bytes_received": 0, "collectives": 0}
        for engine in engines:
            engine.finalize()
            for key in total:
                total[key] += getattr(engine.stats, key)
        total["bytes_dense"] = 4 * sum(m.numel for m in self.members) * self.iteration
        total["steps"] = self.iteration
        total["skipped_steps"] = self.skipped
        return total


def _horovod_comm(process_set: Any) -> Any:
    from .horovod.comm import HorovodComm
    return HorovodComm(process_set)


def named(names: list[str], tensors: list[torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of the tensors that exist (for saved states)."""
    return {n: t.clone() for n, t in zip(names, tensors) if t is not None}


def unnamed(names: list[str], saved: dict[str, torch.Tensor], what: str) -> list[torch.Tensor | None]:
    """The inverse of :func:`named`, checking the names."""
    unknown = set(saved) - set(names)
    if unknown:
        raise ValueError(f"saved {what} has parameters this optimizer does not: {sorted(unknown)[:5]}")
    return [saved[n].clone() if n in saved else None for n in names]
