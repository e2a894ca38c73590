"""Local SGD: local steps, models averaged every ``period`` steps (Stich, ICLR 2019; Lin et al., ICLR 2020)."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from .optim_wrapper import OptimizerWrapper, named, unnamed


class LocalSGD(OptimizerWrapper):
    """Local SGD (Stich, ICLR 2019) and post-local SGD (Lin, Stich, Patel, Jaggi, ICLR 2020):
    each rank steps its own optimizer on its own gradients (nothing is allreduced), and every
    ``period`` iterations the models are averaged::

        x_i <- step_i(x_i)                              every iteration, rank i alone
        x_i <- (1/N) sum_j x_j                          after iterations t with sync(t)
        sync(t) = t <= warmup_steps or (t - warmup_steps) % period == 0     (t = 1, 2, ...)

    ``warmup_steps`` > 0 is post-local SGD: synchronous training (period 1) first.  With an
    optimizer linear in the gradient (SGD, momentum) averaging the models after every step is
    synchronous SGD up to rounding.  ``delta=True`` averages the change since the last sync
    instead, through ``compression`` if given (any hvd_compress method, e.g.
    ``hvd_compress.QSGD()``; its error feedback then carries what one sync's compression
    missed into the next)::

        x_i <- a + (1/N) sum_j C(x_j - a),   a <- x_i   (a: the model at the last sync)

    which without compression is the same average up to rounding.  Optimizer state (momentum,
    Adam's moments) stays local, as in Lin et al.; buffers (BatchNorm statistics) are not
    averaged (Horovod's optimizer does not average them either).

    The schedule counts ``step()`` calls, the same on every rank: with GradScaler, a rank that
    found an inf skips its local update but still takes part in the sync (see
    :mod:`hvd_compress.optim_wrapper`).  A sync where some rank's model (or change) is not
    finite raises ``FloatingPointError`` on every rank and changes nothing.

    Use in place of ``hvd.DistributedOptimizer``; broadcast the initial model as usual.
    ``stats()`` gives ``bytes_sent`` (this rank's share of every sync), ``bytes_dense`` (what
    an fp32 gradient allreduce every iteration would have sent), ``steps``, ``syncs`` and
    ``skipped_steps``; ``state_dict()`` saves the iteration, the anchor ``a`` and the
    compressor's state (error-feedback residuals) with the wrapped optimizer's.
    """

    kind = "localsgd"

    def __init__(self, optimizer: torch.optim.Optimizer,
                 named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None, *, period: int,
                 warmup_steps: int = 0, delta: bool = False, compression: Any = None,
                 process_set: Any = None, comm: Any = None) -> None:
        if not isinstance(period, int) or period < 1:
            raise ValueError(f"period must be an integer >= 1, got {period!r}")
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if compression is not None and not delta:
            raise ValueError("compression= compresses the change since the last sync: pass delta=True "
                             "(compressing the parameters themselves would lose the model)")
        super().__init__(optimizer, named_parameters, compression=compression, process_set=process_set,
                         comm=comm)
        self.period, self.warmup_steps, self.delta = period, warmup_steps, delta
        self.engine = self._engine()
        self.anchor: list[torch.Tensor] | None = None    # the model at the last sync (delta=True)

    def sync_due(self, iteration: int) -> bool:
        """Whether the models are averaged after ``iteration`` (1-based)."""
        return iteration <= self.warmup_steps or (iteration - self.warmup_steps) % self.period == 0

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        """The local step (skipped on this rank if its gradients are not finite), then the sync
        when due (a collective: every rank)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.delta and self.anchor is None:    # at the first step: after the initial broadcast
            self.anchor = [p.detach().clone() for p in self.params]
        if self._local_gradients():
            self.optimizer.step()
        self.iteration += 1
        if self.sync_due(self.iteration):
            self._sync()
        return loss

    @torch.no_grad()
    def _sync(self) -> None:
        if self.delta:
            sent = [p - a for p, a in zip(self.params, self.anchor)]
        else:
            sent = [p.detach().clone() for p in self.params]
        for i, x in enumerate(sent):
            self.engine.add(i, x)
        for i in range(len(sent)):
            self.engine.result(i)           # the average, written into sent[i]
        if not self.engine.finite_everywhere:
            raise FloatingPointError(
                f"{type(self).__name__}: a rank's {'change since the last sync' if self.delta else 'model'} "
                f"is not finite at iteration {self.iteration}; the sync was not applied (with AMP, "
                "step through GradScaler, whose skipped steps leave the model finite)")
        for i, (p, x) in enumerate(zip(self.params, sent)):
            if self.delta:
                p.copy_(self.anchor[i] + x)
                self.anchor[i].copy_(p)
            else:
                p.copy_(x)

    def stats(self) -> dict[str, int]:
        """See the class docstring."""
        return {**self._engine_stats([self.engine]), "syncs": self.engine.stats.steps}

    def _wrapper_state(self) -> dict:
        return {"anchor": named(self.names, self.anchor or []), "engine": self.engine.state_dict()}

    def _load_wrapper_state(self, state: dict) -> None:
        anchor = unnamed(self.names, state["anchor"], "anchor")
        if self.delta and state["anchor"]:
            if any(a is None for a in anchor):
                raise ValueError("the saved anchor lacks some parameters")
            self.anchor = [a.to(p.device) for a, p in zip(anchor, self.params)]
        self.engine.load_state_dict(state["engine"])
