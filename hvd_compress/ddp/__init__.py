"""PyTorch DDP: this package's compressors as a communication hook over the same engine.

Two lines added to a DDP script::

    state = hvd_compress.ddp.State(hvd_compress.TernGrad(), model=ddp_model)
    ddp_model.register_comm_hook(state, hvd_compress.ddp.hook)

Any compressor of the package (or ``from_spec``, a method, a ``{pattern: compressor}`` map)
works, on gloo (CPU) and NCCL (GPU) process groups.  :func:`hook` hands each DDP bucket's
gradients to the engine, which launches its own buckets (assigned once, like DDP's Reducer
does) as soon as their gradients are in, so the compressed collectives overlap the rest of
backward; the hook of DDP's last bucket runs the engine's flush (decode, the step header that
every rank reads, commit or roll back) and completes every bucket's Future.  Importing this
module does not import Horovod.

What DDP users get is what the Horovod adaptor promises: per-rank noise, non-finite gradients
on any rank propagated to every rank (``GradScaler`` skips the step everywhere and the
compressor's state keeps no trace of it), :meth:`State.state_dict` /
:meth:`State.load_state_dict` resume bit for bit, ``stats()`` and ``plan()``, the
configuration check, and DDP's own ``no_sync()``, ``static_graph``, ``find_unused_parameters``
and bucket rebuilds (the engine's buckets do not depend on DDP's).

``LocalSGD`` and ``DelayedAveraging`` replace the gradient exchange by averaging models: they
are optimizer wrappers over Horovod and have no DDP form here (PyTorch's own
``PostLocalSGDOptimizer`` is DDP's Local SGD).
"""
from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.distributed as dist

from ..engine.buckets import Member
from ..engine.cost import declared_intra_link, declared_link
from ..engine.engine import Engine
from ..engine.owner import EngineSet
from ..horovod.compressor import as_compressor
from ..methods.base import Method
from .comm import TorchComm

__all__ = ["State", "hook", "register"]


class State(EngineSet):
    """The state of :func:`hook` for one DDP model: the compressor, its engine, the checkpoint.

    Args:
        compression: an hvd_compress compressor (``hvd_compress.TopK(ratio=0.01)``), a method, a
            ``from_spec`` result or a ``{pattern: compressor}`` map (first match wins; a
            parameter no pattern matches is sent uncompressed).
        process_group: the group DDP reduces over (None: the default group).
        model: the model (DDP-wrapped or not), to name the parameters (maps match names;
            checkpoints are keyed by them).  Without it, parameters are named ``param.<i>`` in
            the order DDP first hands them over (the same for the same model and settings).

    The engine is built at the end of the first backward pass (the first time DDP has handed
    over every parameter), so the first step does not overlap; later steps do.
    """

    def __init__(self, compression: Any, process_group: Any = None, model: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.compressor = as_compressor(compression)
        for pattern, entry in getattr(self.compressor, "mapping", {}).items():
            if not isinstance(entry, Method):
                raise TypeError(f"compression map entry {pattern!r}: {entry!r} is a Horovod compressor, "
                                "which DDP cannot run: use this package's methods (hvd_compress.FP16() for "
                                "fp16, hvd_compress.methods.Dense() for none)")
        self.process_group = process_group
        module = getattr(model, "module", model)
        self._names = {id(p): n for n, p in module.named_parameters()} if module is not None else None
        self._order = [id(p) for _, p in module.named_parameters()] if module is not None else None
        self._index: dict[int, int] = {}          # id(param) -> member index
        self._first: list[tuple[Any, list, list]] = []   # the first step's buckets, until built
        self._pending: list[tuple[Any, torch.futures.Future]] = []

    def __repr__(self) -> str:
        return f"hvd_compress.ddp.State({self.compressor!r})"

    def config(self) -> str:
        return self.compressor.config()

    def _rank_and_size(self) -> tuple[int, int] | None:
        if not dist.is_initialized():
            return None
        return dist.get_rank(self.process_group), dist.get_world_size(self.process_group)

    def observe_loss(self, loss: float | torch.Tensor) -> None:
        """This rank's loss of the step, for the methods that read it (eSGD); others ignore it."""
        methods = getattr(self.compressor, "mapping", {"*": getattr(self.compressor, "method", None)}).values()
        for method in methods:
            if hasattr(method, "observe_loss"):
                method.observe_loss(loss)

    @property
    def engine(self) -> Engine | None:
        """The engine, once the first backward pass has built it."""
        return self._engines[0][1] if self._engines else None

    def _build(self, params: list[torch.Tensor]) -> Engine:
        """The engine of these parameters (every one DDP reduces), members in the model's
        registration order (the engine's buckets take them in reverse, as backward makes them)."""
        if self._order is not None:
            rank = {pid: i for i, pid in enumerate(self._order)}
            missing = [p for p in params if id(p) not in rank]
            if missing:
                raise ValueError(f"hvd_compress.ddp.State: {len(missing)} parameter(s) DDP reduces are not "
                                 "in the model given as model= (pass the model DDP wraps)")
            params = sorted(params, key=lambda p: rank[id(p)])
            names = [self._names[id(p)] for p in params]
        else:
            params = params[::-1]        # first handed over = last registered, roughly
            names = [f"param.{i}" for i in range(len(params))]
        members = []
        for p, name in zip(params, names):
            method = self.compressor.method_for(name)
            self._index[id(p)] = len(members)
            members.append(Member(len(members), name, p.shape, p.dtype, method))
        comm = TorchComm(self.process_group)
        tag = f"ddp{zlib.crc32(chr(0).join(names).encode()):08x}"
        engine = Engine(members, lambda: comm, average=True,
                        cap_bytes=int(self.compressor.bucket_cap_mb * 2 ** 20),
                        link=declared_link(self.compressor.link),
                        intra_link=declared_intra_link(self.compressor.intra_link), name=tag)
        return self._adopt("ddp", engine)

    # -- one DDP bucket ------------------------------------------------------------------------

    def take(self, bucket: dist.GradBucket) -> torch.futures.Future:
        """What :func:`hook` does (see there)."""
        future: torch.futures.Future = torch.futures.Future()
        self._pending.append((bucket, future))
        params, grads = bucket.parameters(), bucket.gradients()
        engine = self.engine
        if engine is None:
            self._first.append((bucket, params, grads))
        elif any(id(p) not in self._index for p in params):
            self._pending.pop()
            future.set_exception(ValueError(
                "hvd_compress.ddp.State: this bucket holds parameters the state's engine does not "
                "know: one State serves one DDP model (make one per model)"))
            return future
        else:
            for p, g in zip(params, grads):
                engine.add(self._index[id(p)], g)
        if bucket.is_last():
            self._finish()
        return future

    def _finish(self) -> None:
        pending, self._pending = self._pending, []
        try:
            engine = self.engine
            if engine is None:
                first, self._first = self._first, []
                engine = self._build([p for _, params, _ in first for p in params])
                for _, params, grads in first:
                    for p, g in zip(params, grads):
                        engine.add(self._index[id(p)], g)
            for bucket, future in pending:
                for p in bucket.parameters():
                    engine.result(self._index[id(p)])     # written into the bucket's gradient views
            for bucket, future in pending:
                future.set_result(bucket.buffer())
        except Exception as e:  # noqa: BLE001 - DDP raises it from backward(), on every rank
            for _, future in pending:
                if not future.done():
                    future.set_exception(e)


def hook(state: State, bucket: dist.GradBucket) -> torch.futures.Future:
    """DDP communication hook: ``ddp_model.register_comm_hook(state, hvd_compress.ddp.hook)``.

    1. The bucket's gradients go to the engine (``Engine.add``), which starts each of its
       buckets' compressed collective as soon as that bucket is complete; nothing waits.
    2. The Future of each DDP bucket is completed by the hook of DDP's last bucket: the engine's
       flush decodes every bucket (sum over ranks / world size, DDP's average), checks the step
       header (finite everywhere, same configuration), writes the result into the bucket's
       gradients and commits or rolls back the compressor state.
    3. An error found on any rank is raised by ``loss.backward()`` on every rank.

    Example::

        >>> state = hvd_compress.ddp.State(hvd_compress.TopK(ratio=0.01), model=ddp_model)
        >>> ddp_model.register_comm_hook(state, hvd_compress.ddp.hook)
    """
    return state.take(bucket)


# DDP's register_comm_hook checks these annotations as objects, not strings
hook.__annotations__ = {"state": State, "bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]}


def register(ddp_model: torch.nn.parallel.DistributedDataParallel, compression: Any) -> State:
    """``State(compression, ddp_model.process_group, ddp_model)`` registered as the model's hook;
    returns the state (for ``state_dict()``, ``stats()``, ``plan()``)."""
    state = State(compression, getattr(ddp_model, "process_group", None), ddp_model)
    ddp_model.register_comm_hook(state, hook)
    return state
