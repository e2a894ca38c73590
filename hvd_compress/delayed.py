"""Delayed gradient averaging (Zhu et al., DGA, NeurIPS 2021)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from .optim_wrapper import OptimizerWrapper, named, unnamed


@dataclass
class _Slot:
    """The averaging started at iteration ``sent_at``.  In flight: ``handed`` (the engine writes
    the average there), ``local`` (what this rank applied itself; None: nothing) and ``lrs``;
    resolved: ``correction`` (``lr * (average - local)`` per parameter, None where zero)."""
    sent_at: int
    handed: list[torch.Tensor] | None = None
    local: list[torch.Tensor | None] | None = None
    lrs: list[float] | None = None
    correction: list[torch.Tensor | None] | None = None


class DelayedAveraging(OptimizerWrapper):
    """Delayed gradient averaging, DGA (Zhu, Lin, Lu, Lin, Han, NeurIPS 2021, "Delayed Gradient
    Averaging: Tolerate the Communication Latency for Federated Learning"): each rank applies
    its own gradient at once and starts its allreduce (asynchronous: Horovod's background
    thread, or any hvd_compress method given as ``compression``); ``delay`` iterations later,
    when the average has long arrived, the local gradient of that iteration is replaced by the
    average::

        x_i <- x_i - lr_t g_i(t) - lr_s (gbar(s) - g_i(s)),   s = t - delay,
        gbar(s) = (1/N) sum_j g_j(s)

    so the communication hides behind ``delay`` steps of compute, and the model follows the
    averaged gradients with a delay of at most ``delay`` steps.

    How the correction is applied.  The paper states the rule for SGD.  Here the correction
    ``c = lr_s (gbar(s) - g_i(s))`` is handed to the wrapped optimizer as part of the gradient
    of the next step this rank takes, ``g + c / lr_t``: for plain SGD that is exactly the rule
    above; with momentum the correction enters the momentum buffer like any gradient, so each
    iteration's contribution ends up being the average (the local gradient and its correction
    telescope), and the ranks' models do not drift apart through their momentum (a correction
    applied to the weights only would leave the buffers following the local gradients alone).
    For adaptive optimizers (Adam) this is an approximation.  The text of the paper was not
    available to check its own treatment of momentum: this is this implementation's choice.

    AMP and non-finite gradients.  GradScaler calls ``step()`` on every rank (see
    :mod:`hvd_compress.optim_wrapper`); a rank that found an inf applies nothing locally, still
    sends (so every rank sees the step as non-finite), and keeps its corrections for its next
    step.  An iteration whose average is not finite counts as skipped by every rank, as in
    synchronous training: its correction is ``-lr_s g_i(s)``, undoing the local update.

    A group whose learning rate is 0 at step t keeps its corrections until one is not.
    Memory: two copies of the gradients per iteration in flight (the local one and the
    engine's output), ``delay`` of them.  ``flush()`` (every rank, at the same iteration)
    waits for every outstanding average and applies the corrections to the weights directly,
    e.g. before evaluation or at the end of training.  ``state_dict()`` waits for them too and
    saves them with their due iterations, so a resumed run continues bit for bit.
    ``stats()``: ``bytes_sent`` (of completed averages), ``bytes_dense`` (what an fp32
    allreduce every iteration sends), ``steps``, ``skipped_steps`` (this rank's local updates
    skipped), ``in_flight``.
    """

    kind = "dga"

    def __init__(self, optimizer: torch.optim.Optimizer,
                 named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None, *, delay: int,
                 compression: Any = None, process_set: Any = None, comm: Any = None) -> None:
        if not isinstance(delay, int) or delay < 1:
            raise ValueError(f"delay must be an integer >= 1, got {delay!r}")
        super().__init__(optimizer, named_parameters, compression=compression, process_set=process_set,
                         comm=comm)
        self.delay = delay
        # one engine per iteration in flight (an engine carries one step at a time)
        self.engines = [self._engine(f".s{k}") for k in range(delay)]
        self.slots: list[_Slot | None] = [None] * delay
        self.carry: list[torch.Tensor | None] = [None] * len(self.params)   # corrections not yet applied

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        """Collect the correction due now, start this iteration's averaging, take the local
        step (with the corrections) unless this rank's gradients are not finite."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        finite = self._local_gradients()
        k = self.iteration % self.delay
        if self.slots[k] is not None:
            self._collect(k)
        self._send(k, finite)
        if finite:
            self._apply_carry()
            self.optimizer.step()
        self.iteration += 1
        return loss

    @torch.no_grad()
    def flush(self) -> None:
        """Wait for every outstanding average and apply all corrections to the weights now
        (``x <- x - c``).  A collective: every rank, at the same iteration."""
        for j in range(self.delay):
            k = (self.iteration + j) % self.delay       # oldest first
            if self.slots[k] is not None:
                self._collect(k)
        for i, (p, c) in enumerate(zip(self.params, self.carry)):
            if c is not None:
                p.sub_(c.to(p.dtype))
                self.carry[i] = None

    @torch.no_grad()
    def _send(self, k: int, finite: bool) -> None:
        lrs = [float(self.param_groups[g]["lr"]) for g in self.group_of]
        handed, local = [], []
        for p in self.params:
            g = p.grad
            handed.append(torch.zeros_like(p) if g is None else g.detach().clone())
            local.append(g.detach().to(torch.float32, copy=True) if finite and g is not None else None)
        for i, h in enumerate(handed):
            self.engines[k].add(i, h)
        self.slots[k] = _Slot(self.iteration, handed=handed, local=local, lrs=lrs)

    @torch.no_grad()
    def _resolve(self, k: int) -> None:
        """Wait for slot ``k``'s average and compute its corrections."""
        slot, engine = self.slots[k], self.engines[k]
        if slot.handed is None:
            return
        for i in range(len(self.params)):
            engine.result(i)                    # the average, into slot.handed[i]
        good = engine.finite_everywhere         # else: skipped by every rank, average := 0
        correction = []
        for avg, local, lr in zip(slot.handed, slot.local, slot.lrs):
            if local is None and (not good or not bool(avg.any())):
                correction.append(None)         # nothing applied here, nothing to add
            elif not good:
                correction.append(local.mul_(-lr))
            else:
                delta = avg.to(torch.float32)
                if local is not None:
                    delta = delta.sub_(local)
                correction.append(delta.mul_(lr))
        slot.handed = slot.local = slot.lrs = None
        slot.correction = correction

    def _collect(self, k: int) -> None:
        """Add slot ``k``'s corrections to the carry and free the slot."""
        self._resolve(k)
        for i, c in enumerate(self.slots[k].correction):
            if c is not None:
                self.carry[i] = c if self.carry[i] is None else self.carry[i].add_(c)
        self.slots[k] = None

    @torch.no_grad()
    def _apply_carry(self) -> None:
        """Hand the carried corrections to the wrapped optimizer as gradient ``c / lr``."""
        for i, (p, c) in enumerate(zip(self.params, self.carry)):
            lr = float(self.param_groups[self.group_of[i]]["lr"])
            if c is None or lr == 0.0:
                continue
            extra = (c / lr).to(p.dtype)
            if p.grad is None:
                p.grad = extra
            else:
                p.grad.add_(extra)
            self.carry[i] = None

    def stats(self) -> dict[str, int]:
        """See the class docstring."""
        return {**self._engine_stats(self.engines),
                "in_flight": sum(s is not None and s.handed is not None for s in self.slots)}

    def _wrapper_state(self) -> dict:
        for k, slot in enumerate(self.slots):
            if slot is not None:
                self._resolve(k)    # wait: a checkpoint holds results, not handles
        return {"delay": self.delay, "carry": named(self.names, self.carry),
                "slots": [None if s is None else {"sent_at": s.sent_at,
                                                  "correction": named(self.names, s.correction)}
                          for s in self.slots],
                "engines": [e.state_dict() for e in self.engines]}

    def _load_wrapper_state(self, state: dict) -> None:
        if state["delay"] != self.delay:
            raise ValueError(f"the state was saved with delay={state['delay']}, this optimizer has "
                             f"delay={self.delay}")
        self.carry = [None if c is None else c.to(p.device)
                      for c, p in zip(unnamed(self.names, state["carry"], "carry"), self.params)]
        self.slots = [None if s is None else _Slot(
            s["sent_at"], correction=[None if c is None else c.to(p.device) for c, p in
                                      zip(unnamed(self.names, s["correction"], "correction"), self.params)])
            for s in state["slots"]]
        for engine, saved in zip(self.engines, state["engines"]):
            engine.load_state_dict(saved)
