"""Horovod's ``Compressor`` interface over the engine: what ``hvd.DistributedOptimizer(...,
compression=X)`` of Horovod 0.28.1 calls.

* ``compress(p.grad)`` (Horovod's backward hook, or ``synchronize()`` for gradients that never
  came) finds the parameter and its optimizer in the calling frame, gets or builds the
  :class:`~hvd_compress.engine.engine.Engine` of that optimizer, hands the gradient over and
  returns a one-element probe for Horovod to allreduce (Horovod needs a tensor; its value is
  unused).  Parameters the plan sends uncompressed are returned as they are, for Horovod's own
  (fused) allreduce: on a link where compression does not pay this is exactly uncompressed
  Horovod.  It never raises and never waits: see the engine.
* ``decompress(probe, ctx)`` returns the parameter's aggregated gradient, a fresh tensor (never
  one of the engine's buffers).  ``decompress(x, None)`` is Horovod's own sparse path
  (``nn.Embedding(sparse=True)``): the gradient passes through uncompressed.

One compressor object may serve several optimizers (a GAN's generator and discriminator): each
gets its own engine and state, numbered in the order the compressor first sees them.
Nothing here imports Horovod at module level.
"""
from __future__ import annotations

import itertools
import logging
import os
import re
import sys
import time
import warnings
import weakref
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from .engine import cost
from .engine.buckets import Member
from .engine.engine import Engine
from .engine.persist import check_saved
from .routes.base import Link

STATE_FORMAT = "hvd_compress/1"
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


class Compressor:
    """Base of every hvd_compress compressor (see the module docstring).

    Args:
        bucket_cap_mb: bucket cap in MiB of fp32 gradient (DDP's default 25; 0: one parameter
            per bucket, i.e. layer-wise).
        link: ``"auto"`` (measure once at the first step), or a declared :class:`Link`: the
            link between hosts (each host's share of the network), the only one on one host.
        intra_link: the link inside a host, for jobs of several hosts with several ranks each:
            ``"auto"`` (measured with ``link``; when ``link`` is declared: declared by
            ``HVD_COMPRESS_INTRA_LINK_GBPS``, else :data:`~hvd_compress.engine.cost.ASSUMED_INTRA`),
            or a declared :class:`Link`.
    """

    def __init__(self, *, bucket_cap_mb: float = 25.0, link: Link | str = "auto",
                 intra_link: Link | str = "auto") -> None:
        if not bucket_cap_mb >= 0:
            raise ValueError(f"bucket_cap_mb must be >= 0, got {bucket_cap_mb!r}")
        cost.declared_link(link)  # validates
        cost.declared_intra_link(intra_link)
        self.bucket_cap_mb = float(bucket_cap_mb)
        self.link = link
        self.intra_link = intra_link
        self._number = next(_CREATED)
        self._engines: list[tuple[Any, Any]] = []         # (weakref to optimizer, engine)
        self._members: dict[int, dict[int, int]] = {}     # id(engine) -> id(param) -> index
        self._loaded: list[dict] | None = None
        self._strict = True

    def method_for(self, name: str):
        """The method serving parameter ``name``: an hvd_compress method, or another Horovod
        compressor object (used as it is)."""
        raise NotImplementedError

    # -- Horovod's interface -----------------------------------------------------------------

    def compress(self, tensor: torch.Tensor):
        optimizer, param = _calling_optimizer()
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
        ordinal = len(self._engines)
        if not self._engines and horovod_version_note():   # (a log line: nothing raises in a hook)
            logging.getLogger("hvd_compress").warning("%s", horovod_version_note())
        engine = self._build(optimizer, ordinal)
        if self._loaded is not None and ordinal < len(self._loaded) and not isinstance(engine, _FailedEngine):
            try:        # (in the hook: a checkpoint that does not fit fails the backward pass)
                engine.load_state_dict(self._loaded[ordinal], self._strict)
            except ValueError as e:
                engine = _FailedEngine(f"the loaded compressor state does not fit this optimizer: {e}")
        self._engines.append((weakref.ref(optimizer), engine))
        _check_before_synchronize(optimizer, engine, type(self).__name__)
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
                if not hasattr(method, "codec_at"):   # another Horovod compressor: not ours
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
            from .engine.comm import HorovodComm
            return HorovodComm(process_set)

        engine = Engine(members, comm, average=optimizer.op == hvd.Average,
                        cap_bytes=int(self.bucket_cap_mb * 2 ** 20), link=cost.declared_link(self.link),
                        intra_link=cost.declared_intra_link(self.intra_link),
                        name=tag, external_dense=True, check_name=f"c{self._number}.{ordinal}")
        self._members[id(engine)] = ids
        return engine

    def _live_engines(self) -> list[Engine]:
        return [e for _, e in self._engines if not isinstance(e, _FailedEngine)]

    # -- what users call -----------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Since creation, over every optimizer served: ``bytes_sent`` (this rank's share of
        every collective: its payloads, or the tensor it allreduces), ``bytes_received``
        (payloads of other ranks gathered here, or what an allreduce delivers), ``bytes_dense``
        (what fp32 gradients would have cost), ``collectives``, ``steps``, ``skipped_steps``
        (steps with a non-finite gradient on some rank, rolled back)."""
        total: dict[str, int] = {}
        for engine in self._live_engines():
            engine.finalize()      # count the last step once it is over
            for key, value in engine.stats.as_dict().items():
                total[key] = total.get(key, 0) + value
        return total or {"bytes_sent": 0, "bytes_received": 0, "bytes_dense": 0, "collectives": 0,
                         "steps": 0, "skipped_steps": 0}

    @property
    def settled(self) -> bool:
        """True once every engine's plan is final: its link measured (or declared) and its
        trial over.  Benchmarks warm up until then."""
        return all(e._trial.settled(e) for e in self._live_engines()) and bool(self._live_engines())

    def plan(self) -> str:
        """Every engine's plan: buckets, members, routes, predicted bytes and times."""
        plans = [str(e.plan) for e in self._live_engines() if e.plan is not None]
        return "\n\n".join(plans) if plans else "(no plan yet: it is made at the first step)"

    def state_dict(self) -> dict:
        """This rank's compressor state, by PyTorch's conventions (``torch.save``-able): per
        optimizer (in first-use order) the parameters' buffers by name, the committed step and
        the link the plan used.  Each rank saves its own (see README, "Checkpoints")."""
        engines = [e.state_dict() for e in self._live_engines()]
        if self._loaded is not None and len(engines) < len(self._loaded):
            engines += self._loaded[len(engines):]   # loaded but not used yet: keep it
        return {"format": STATE_FORMAT, "config": self.config(), "optimizers": engines}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Restore :meth:`state_dict`, checked in full before anything changes (a bad or foreign
        checkpoint raises ``ValueError`` saying what is wrong and leaves the state as it was).

        ``strict=True`` (the default) requires the same method and settings (the bucket cap and
        link may differ: buffers are kept per parameter); ``strict=False`` converts a checkpoint
        of other settings explicitly: the buffers this compressor keeps are loaded, the rest are
        dropped with a warning.  A checkpoint saved by another rank, or by a world of another
        size, loads with a warning (error feedback residuals are each rank's own unsent
        gradient).  Engines not built yet (the stock optimizer builds them at the first
        backward) get theirs then, checked against their parameters; a mismatch there fails
        that backward pass on every rank."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a {STATE_FORMAT} compressor state (a dict with format={STATE_FORMAT!r}, "
                             "as compression.state_dict() returns)")
        engines = state.get("optimizers")
        if not isinstance(engines, list):
            raise ValueError("compressor state: 'optimizers' must be a list of engine states")
        for i, saved in enumerate(engines):
            check_saved(saved, f"optimizers[{i}]")
        saved_config = state.get("config")
        if strict and saved_config is not None and _settings(saved_config) != _settings(self.config()):
            raise ValueError(f"the checkpoint was saved by {saved_config}, this compressor is {self.config()}: "
                             "load_state_dict(..., strict=False) loads the buffers both keep and drops the rest")
        _warn_owner(engines)
        dropped = []
        built = [(e, saved) for (_, e), saved in zip(self._engines, engines) if not isinstance(e, _FailedEngine)]
        for engine, saved in built:          # check all, then load all
            engine.check_state(saved, strict)
        for (_, engine), saved in zip(self._engines, engines):
            if not isinstance(engine, _FailedEngine):
                dropped += engine.load_state_dict(saved, strict)
        if dropped:
            warnings.warn(f"hvd_compress: dropped checkpoint buffers this compressor does not keep: "
                          f"{', '.join(dropped[:8])}" + (" ..." if len(dropped) > 8 else ""))
        self._loaded, self._strict = list(engines), strict

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

    def config(self) -> str:
        """Deterministic description of the settings (compared across ranks via the plan)."""
        return repr(self)


def _settings(config: str) -> str:
    """A compressor's settings less the bucket cap, the links and the hierarchy setting, which
    a checkpoint may change (its buffers are kept per parameter)."""
    return re.sub(r", (bucket_cap_mb=[^,)]*|hierarchy=[^,)]*|(intra_)?link=(Link\([^)]*\)|'[^']*'))", "",
                  config)


def _warn_owner(engines: list[dict]) -> None:
    """Warn when a checkpoint was saved by another rank or world than this one (Horovod's
    global rank; each rank's residuals are its own unsent gradient)."""
    try:
        import horovod.torch as hvd
        rank, size = hvd.rank(), hvd.size()
    except (ImportError, ValueError, RuntimeError):     # Horovod absent or not initialized
        return
    owners = {(e.get("world"), e.get("rank")) for e in engines if e.get("rank") is not None}
    for world, saved_rank in owners:
        if world == size and saved_rank != rank:
            warnings.warn(f"hvd_compress: this compressor state was saved by rank {saved_rank} and is "
                          f"loaded on rank {rank}: its error-feedback residuals are rank {saved_rank}'s "
                          "unsent gradient; save and load one file per rank (or use "
                          "hvd_compress.checkpoint.gather_state/scatter_state)")
        elif world != size:
            warnings.warn(f"hvd_compress: this compressor state was saved by a world of {world} ranks and "
                          f"is loaded into {size}: per-parameter buffers are kept, two-phase server "
                          "residuals are dropped")


def op_name(op: Any) -> str:
    """Horovod's reduction op by name (``hvd.Min`` is the integer 3 to Horovod)."""
    import horovod.torch as hvd
    names = {getattr(hvd, n, None): n for n in ("Average", "Sum", "Adasum", "Min", "Max", "Product")}
    return names.get(op, repr(op))


#: how long the adaptor sleeps between polls of the step header (doubling from the first)
_POLL_S = (5e-5, 1e-3)


def check_timeout() -> float:
    """Seconds a configuration check may lag behind every gradient's allreduce before this rank
    concludes that another rank does not run the compressor (``HVD_COMPRESS_CHECK_TIMEOUT_S``;
    60, Horovod's own stall warning)."""
    return float(os.environ.get("HVD_COMPRESS_CHECK_TIMEOUT_S", "60"))


def _check_before_synchronize(optimizer, engine: Any, compressor: str) -> None:
    """Make ``optimizer.synchronize()`` finish ``engine``'s step before Horovod waits on its own
    handles, so the configuration check runs first: a parameter that only one rank has is
    allreduced by Horovod under its name, and waiting on that handle would never return.

    The wrapper first hands Horovod's missing gradients over (what Horovod 0.28.1's
    ``synchronize()`` does first; it then finds none missing), closes the engines' step and
    waits for their headers (:func:`_await_headers`), then lets Horovod synchronize; a shape
    mismatch Horovod reports against this rank's 1-element placeholder means another rank sent
    a full gradient (``Compression.none``), and the error says so."""
    engines = getattr(optimizer, "_hvdc_engines", None)
    if engines is not None:
        engines.append(engine)
        return
    optimizer._hvdc_engines = engines = [engine]
    horovod_synchronize = optimizer.synchronize

    def synchronize():
        if optimizer.process_set.included():
            completed = set()
            for key in optimizer._handles:
                completed.update(key) if isinstance(key, tuple) else completed.add(key)
            for p in optimizer._requires_update - completed:
                optimizer._handles[p] = optimizer._allreduce_grad_async(p)
            for p, (handle, _) in list(optimizer._handles.items()):
                if handle is None:
                    optimizer._handles[p] = optimizer._allreduce_grad_async(p)
            if _await_headers(optimizer, engines, compressor):
                for e in engines:
                    e.settle()
        try:
            return horovod_synchronize()
        except Exception as e:  # noqa: BLE001 - re-raised with the reason
            if "Mismatched" in str(e) and "shape [1]" in str(e):
                raise RuntimeError(
                    "hvd_compress: another rank sent a full gradient where this rank sent the "
                    "compressor's 1-element placeholder: every rank must pass the same compression= "
                    f"to DistributedOptimizer (this rank: {compressor}).\nHorovod said: {e}") from e
            raise

    optimizer.synchronize = synchronize


def _await_headers(optimizer, engines: list[Any], compressor: str) -> bool:
    """Close the engines' step and wait until their headers are complete (True), or until every
    Horovod handle of the step is done while an engine sends buckets of its own (False: Horovod
    synchronizes first; its handles fail if another rank sent full gradients against this
    rank's placeholders).  When every bucket is Horovod's own and the header still lags
    :func:`check_timeout` seconds behind Horovod's handles, another rank does not run the
    compressor at all: raise."""
    import horovod.torch as hvd
    headers = [h for h in (e.close() for e in engines) if h is not None]
    # Horovod's handles, in the order they were started (roughly the order they complete): each
    # poll looks at the first one still running only, so a wait costs O(1) calls per poll
    running = deque(h for h, _ in optimizer._handles.values() if not callable(h))
    pause, horovod_done = _POLL_S[0], None
    while not all(h.done() for h in headers):
        while running and hvd.poll(running[0]):
            running.popleft()
        if horovod_done is None and not running:
            horovod_done = time.monotonic()
        if horovod_done is not None:
            if any(getattr(e, "plan", None) is not None and e.plan.engine_buckets for e in engines):
                return False
            if time.monotonic() - horovod_done > check_timeout():
                raise RuntimeError(
                    "hvd_compress: every gradient's allreduce completed but another rank never joined "
                    f"this rank's configuration check in {check_timeout():g} s: every rank must pass the "
                    f"same compression= to DistributedOptimizer (this rank: {compressor}; another may "
                    "use hvd.Compression.none)")
        time.sleep(pause)
        pause = min(2 * pause, _POLL_S[1])
    return True


#: the Horovod releases whose DistributedOptimizer calls compress() as _calling_optimizer reads it
HOROVOD_TESTED = ("0.28.",)


def horovod_version_note() -> str:
    """Empty on a tested Horovod; else a sentence naming the version (checked once, warned once)."""
    import horovod
    version = getattr(horovod, "__version__", "unknown")
    if version.startswith(HOROVOD_TESTED):
        return ""
    return (f"Horovod {version} is not one hvd_compress was tested with ({', '.join(v + 'x' for v in HOROVOD_TESTED)}): "
            "it finds the parameter being compressed in DistributedOptimizer's own frames, which "
            "another release may lay out differently")


def _calling_optimizer() -> tuple[Any, torch.Tensor]:
    """(optimizer, parameter) whose gradient Horovod is compressing.

    Horovod 0.28.1 calls ``compress(p.grad)`` from ``_allreduce_grad_async`` or from a
    comprehension in ``_grouped_allreduce_grad_async``; both bind the parameter as ``p``, with
    the optimizer (holding ``_parameter_names``) as ``self`` at most one frame up.  The only
    place in the package that reads Horovod's frames; on another release (see
    :data:`HOROVOD_TESTED`) it is tried as well, after a warning, and fails with the version
    named when the layout differs.
    """
    frame = sys._getframe(2)
    param = None
    for _ in range(4):
        if frame is None:
            break
        local = frame.f_locals
        if param is None and isinstance(local.get("p"), torch.Tensor):
            param = local["p"]
        names = getattr(local.get("self"), "_parameter_names", None)
        if param is not None and isinstance(names, dict) and param in names:
            return local["self"], param
        frame = frame.f_back
    note = horovod_version_note()
    raise RuntimeError(
        "hvd_compress compressors must be called by horovod.torch.DistributedOptimizer "
        "(compression=...) or hvd_compress.DistributedOptimizer; could not find the parameter "
        "being compressed in the caller" + (f" ({note})" if note else ""))
