"""Horovod's ``Compressor`` interface over the engine: what ``hvd.DistributedOptimizer(...,
compression=X)`` of Horovod 0.28.1 calls.

* ``compress(p.grad)`` (Horovod's backward hook, or ``synchronize()`` for gradients that never
  came) finds the parameter and its optimizer (:func:`~.lookup.calling_optimizer`), gets or
  builds the :class:`~hvd_compress.engine.engine.Engine` of that optimizer, hands the gradient
  over and returns a one-element probe for Horovod to allreduce (Horovod needs a tensor; its
  value is unused).  Parameters the plan sends uncompressed are returned as they are, for
  Horovod's own (fused) allreduce: on a link where compression does not pay this is exactly
  uncompressed Horovod.  It never raises and never waits: see the engine.
* ``decompress(probe, ctx)`` returns the parameter's aggregated gradient, a fresh tensor (never
  one of the engine's buffers).  ``decompress(x, None)`` is Horovod's own sparse path
  (``nn.Embedding(sparse=True)``): the gradient passes through uncompressed.

A :class:`Compressor` holds :class:`~hvd_compress.methods.Method` objects (the algorithms; they
know nothing of Horovod) and the engines built from them.  ``hvd_compress.TernGrad(...)`` is
:func:`compressor_class` of ``hvd_compress.methods.TernGrad``: the same arguments, a Horovod
compressor holding that method.  One compressor object may serve several optimizers (a GAN's
generator and discriminator): each gets its own engine and state, numbered in the order the
compressor first sees them.  Nothing here imports Horovod at module level.
"""
from __future__ import annotations

import functools
import inspect
import itertools
import logging
import weakref
import zlib
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..engine import cost
from ..engine.buckets import Member
from ..engine.engine import Engine
from ..engine.owner import EngineSet
from ..methods.base import Method
from ..routes.base import Link
from .lookup import calling_optimizer, horovod_version_note
from .synchronize import check_before_synchronize

#: creation number of every compressor in this process: the same on every rank of one script,
#: whatever its model, so it names the configuration check (see Engine's ``check_name``)
_CREATED = itertools.count()


@dataclass
class _Ticket:
    engine: Any
    index: int


@dataclass
class _External:
    """A member Horovod's own allreduce carries (uncompressed), reported back to the engine."""
    engine: Any
    index: int


@dataclass
class _Passthrough:
    """A member some other (Horovod) compressor handles."""
    compressor: Any
    ctx: Any


class _FailedEngine:
    """Stands in for an engine that could not be built (e.g. ``op=hvd.Adasum``): the hook only
    queues an autograd final callback that raises the message once every hook of the backward
    pass has run (so ``loss.backward()`` fails, identically on every rank, and nothing was
    started that another rank could wait for); ``synchronize()`` raises it too (a gradient
    compressed outside a backward pass)."""

    def __init__(self, message: str) -> None:
        self.message = message
        self._queued = False

    def add(self, index: int, grad: torch.Tensor) -> None:
        if self._queued:
            return
        try:
            torch.autograd.Variable._execution_engine.queue_callback(self._raise)
            self._queued = True
        except RuntimeError:          # not inside a backward pass: synchronize() raises
            pass

    def _raise(self) -> None:
        self._queued = False
        raise ValueError(self.message)

    def result(self, index: int) -> torch.Tensor:
        raise ValueError(self.message)

    def close(self) -> None:
        return None

    def settle(self) -> None:
        raise ValueError(self.message)


class Compressor(EngineSet):
    """Base of every hvd_compress compressor (see the module docstring).

    Args:
        bucket_cap_mb, link, intra_link: the options of the engines it builds, as
            :class:`~hvd_compress.methods.Method` describes them (a method's compressor takes
            the method's; a map takes its own).
    """

    def __init__(self, *, bucket_cap_mb: float = 25.0, link: Link | str = "auto",
                 intra_link: Link | str = "auto") -> None:
        self.bucket_cap_mb = cost.check_engine_options(bucket_cap_mb, link, intra_link)
        self.link = link
        self.intra_link = intra_link
        super().__init__()                                # engines: (weakref to optimizer, engine)
        self._number = next(_CREATED)
        self._members: dict[int, dict[int, int]] = {}     # id(engine) -> id(param) -> index

    def method_for(self, name: str) -> Any:
        """The method serving parameter ``name``: a :class:`~hvd_compress.methods.Method`, or
        another Horovod compressor object (used as it is)."""
        raise NotImplementedError

    # -- Horovod's interface -----------------------------------------------------------------

    def compress(self, tensor: torch.Tensor):
        optimizer, param = calling_optimizer()
        engine = self.engine(optimizer)
        probe = torch.ones(1, dtype=torch.float32, device=tensor.device)
        if isinstance(engine, _FailedEngine):
            engine.add(0, tensor)       # (raises at the end of the backward pass, not here)
            return probe, _Ticket(engine, 0)
        index = self._members[id(engine)].get(id(param))
        if index is None:
            other = self.method_for(optimizer._parameter_names[param])
            compressed, ctx = other.compress(tensor)
            return compressed, _Passthrough(other, ctx)
        if not engine.add(index, tensor):   # uncompressed this step: Horovod's allreduce, as is
            return tensor, _External(engine, index)
        return probe, _Ticket(engine, index)

    def decompress(self, tensor: torch.Tensor, ctx):
        if ctx is None:
            return tensor
        if isinstance(ctx, _Passthrough):
            return ctx.compressor.decompress(tensor, ctx.ctx)
        if isinstance(ctx, _External):
            return ctx.engine.external_result(ctx.index, tensor)
        return ctx.engine.result(ctx.index)

    # -- engines ---------------------------------------------------------------------------------

    def engine(self, optimizer) -> Any:
        """The engine of ``optimizer`` (a Horovod DistributedOptimizer), built on first use."""
        for ref, engine in self._engines:
            if ref() is optimizer:
                return engine
        if not self._engines and horovod_version_note():   # (a log line: nothing raises in a hook)
            logging.getLogger("hvd_compress").warning("%s", horovod_version_note())
        engine = self._build(optimizer, len(self._engines))
        try:        # (in the hook: a checkpoint that does not fit fails the backward pass)
            self._adopt(weakref.ref(optimizer), engine)
        except ValueError as e:
            engine = self._adopt(weakref.ref(optimizer), _FailedEngine(
                f"the loaded compressor state does not fit this optimizer: {e}"))
        check_before_synchronize(optimizer, engine, type(self).__name__)
        return engine

    def _build(self, optimizer, ordinal: int) -> Any:
        import horovod.torch as hvd
        if not hasattr(optimizer, "op"):  # Horovod's Adasum optimizer is a class of its own
            return _FailedEngine(f"{type(self).__name__} cannot be combined with op=hvd.Adasum: "
                                 "Adasum combines dense gradients pairwise and has no compressed form")
        if optimizer.op not in (hvd.Average, hvd.Sum):
            return _FailedEngine(f"{type(self).__name__} supports op=hvd.Average and op=hvd.Sum "
                                 f"only (got op=hvd.{op_name(optimizer.op)}): Min, Max and Product of "
                                 "compressed gradients are not what the codecs approximate")
        members, ids = [], {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p not in optimizer._requires_update or id(p) in ids:
                    continue
                name = optimizer._parameter_names[p]
                method = self.method_for(name)
                if not isinstance(method, Method):   # another Horovod compressor: not ours
                    continue
                ids[id(p)] = len(members)
                members.append(Member(len(members), name, p.shape, p.dtype, method))
        for method in {id(m.method): m.method for m in members}.values():
            problem = method.check_optimizer(optimizer, [m.name for m in members if m.method is method])
            if problem:
                return _FailedEngine(problem)
        names = "\0".join(m.name for m in members)
        tag = f"e{zlib.crc32(names.encode()):08x}.{ordinal}"
        process_set = getattr(optimizer, "process_set", None)

        def comm():
            from .comm import HorovodComm
            return HorovodComm(process_set)

        engine = Engine(members, comm, average=optimizer.op == hvd.Average,
                        cap_bytes=int(self.bucket_cap_mb * 2 ** 20), link=cost.declared_link(self.link),
                        intra_link=cost.declared_intra_link(self.intra_link),
                        name=tag, external_dense=True, check_name=f"c{self._number}.{ordinal}")
        self._members[id(engine)] = ids
        return engine

    # -- what users call -----------------------------------------------------------------------

    _gather_hint = "hvd_compress.horovod.checkpoint.gather_state/scatter_state"

    def _rank_and_size(self) -> tuple[int, int] | None:
        try:
            import horovod.torch as hvd
            return hvd.rank(), hvd.size()
        except (ImportError, ValueError, RuntimeError):     # Horovod absent or not initialized
            return None

    def elastic_sync(self) -> None:
        """After an elastic reset: take rank 0's committed step per optimizer and re-plan at
        the next step (see :mod:`hvd_compress.elastic`).  A collective."""
        import horovod.torch as hvd
        state = self.state_dict()
        steps = hvd.broadcast_object([e["step"] for e in state["optimizers"]], root_rank=0,
                                     name="hvdc.elastic.steps")
        for engine_state, step in zip(state["optimizers"], steps):
            engine_state["step"] = step
        state["optimizers"] += [{"step": step, "params": {}} for step in steps[len(state["optimizers"]):]]
        self.load_state_dict(state)



class MethodCompressor(Compressor):
    """The Horovod compressor of one method, which serves every parameter; the method's
    attributes (``codec``, ``error_feedback``, ...) read through, its ``repr`` is the
    compressor's."""

    def __init__(self, method: Method) -> None:
        if not isinstance(method, Method):
            raise TypeError(f"MethodCompressor needs an hvd_compress method, got {method!r}")
        super().__init__(bucket_cap_mb=method.bucket_cap_mb, link=method.link, intra_link=method.intra_link)
        self.method = method

    @staticmethod
    def of(method: Method) -> "MethodCompressor":
        """The Horovod compressor of an existing method (an instance of its
        :func:`compressor_class`, as if built with the method's arguments)."""
        compressor = object.__new__(compressor_class(type(method)))
        MethodCompressor.__init__(compressor, method)
        return compressor

    def __getattr__(self, name: str) -> Any:
        method = self.__dict__.get("method")
        if method is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(method, name)

    def __repr__(self) -> str:
        return repr(self.method)

    def method_for(self, name: str) -> Method:
        return self.method


@functools.cache
def compressor_class(method_class: type[Method]) -> type[MethodCompressor]:
    """The Horovod compressor class of ``method_class``: same name, arguments and docstring;
    ``hvd_compress.TernGrad(ratio...)`` is ``MethodCompressor(methods.TernGrad(ratio...))``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        MethodCompressor.__init__(self, method_class(*args, **kwargs))

    return type(method_class.__name__, (MethodCompressor,), {
        "__init__": __init__, "__doc__": method_class.__doc__, "__module__": "hvd_compress",
        "__qualname__": method_class.__name__, "__signature__": inspect.signature(method_class),
        "method_class": method_class})


def as_compressor(compression: Any) -> Compressor:
    """What a framework adaptor or the simulator was given, as a :class:`Compressor`: one
    (returned as it is), a method, or a ``{pattern: compressor}`` map."""
    if isinstance(compression, Compressor):
        return compression
    if isinstance(compression, Method):
        return MethodCompressor.of(compression)
    if isinstance(compression, Mapping):
        from .optimizer import PerParameterCompressor
        return PerParameterCompressor(compression)
    raise TypeError(f"not an hvd_compress compressor, method or {{pattern: compressor}} map: {compression!r}")


def op_name(op: Any) -> str:
    """Horovod's reduction op by name (``hvd.Min`` is the integer 3 to Horovod)."""
    import horovod.torch as hvd
    names = {getattr(hvd, n, None): n for n in ("Average", "Sum", "Adasum", "Min", "Max", "Product")}
    return names.get(op, repr(op))


