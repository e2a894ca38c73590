"""Horovod ``Compressor`` objects that carry codec payloads through the stock
``hvd.DistributedOptimizer(..., compression=X)`` of Horovod 0.28.1.

How a step goes (see docs/design.md, "Horovod integration"):

1. Horovod's backward hook calls ``compress(p.grad)``.  We find the parameter's name in the
   calling optimizer, encode the gradient with this parameter's error-feedback residual and
   Philox key (seed, step, crc32(name)), and start an asynchronous allgather of the payload
   named after the parameter.  Horovod is handed back a one-element *scale probe* to allreduce.
2. ``synchronize()`` calls ``decompress(probe_out, ctx)``: we wait for the gathered payloads,
   decode-and-accumulate them in rank order, and multiply by ``probe_out / size``, which is
   ``1/size`` under ``op=Average`` (with any ``gradient_predivide_factor``) and ``1`` under
   ``op=Sum``: Horovod's own reduction semantics, without our needing to know ``op``.

Tensors below ``min_numel`` elements (biases, norms) are returned as they are and go through
Horovod's ordinary allreduce.  Codecs whose payload Horovod can sum (stochastic fp16) go through
its allreduce too.
"""
from __future__ import annotations

import sys
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from horovod.torch.compression import Compressor as _HorovodCompressor

from .codecs.base import Codec, RandomKey, as_fp32_flat
from .comm import cost
from .comm.allgather import allgather_payload_async
from .comm.two_phase import TwoPhaseState, two_phase_allreduce_async

_UINT32 = (1 << 32) - 1


@dataclass
class _ParamState:
    """Per-parameter state: the Philox tensor id, the step counter, the EF residual and, for
    methods that keep one (DGC), a momentum buffer."""
    tensor_id: int
    step: int = 0
    residual: torch.Tensor | None = None
    momentum: torch.Tensor | None = None
    server: TwoPhaseState = field(default_factory=TwoPhaseState)


@dataclass
class _Caller:
    name: str
    param: torch.Tensor
    optimizer: Any

    @property
    def process_set(self):
        return getattr(self.optimizer, "process_set", None)


@dataclass
class _DenseCtx:
    """Sent uncompressed through Horovod's allreduce."""


@dataclass
class _SumCtx:
    """Summable payload (one part) allreduced by Horovod."""
    shape: torch.Size
    dtype: torch.dtype


@dataclass
class _PendingCtx:
    """A compressed collective in flight: ``finish()`` returns (dense sum over ranks as fp32,
    payload bytes received)."""
    finish: Callable[[], tuple[torch.Tensor, int]]
    shape: torch.Size
    dtype: torch.dtype
    size: int


def _hvd_size() -> int:
    import horovod.torch as hvd
    return hvd.size()


def _hvd_rank() -> int:
    import horovod.torch as hvd
    return hvd.rank()


def _calling_optimizer(tensor: torch.Tensor) -> _Caller:
    """Name, process set and op of the parameter whose gradient Horovod is compressing.

    Horovod 0.28.1 calls ``compress(p.grad)`` from ``_allreduce_grad_async`` or from a
    comprehension in ``_grouped_allreduce_grad_async``; both frames bind the parameter as ``p``
    and the optimizer (with ``_parameter_names``) as ``self`` one frame up at most.
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
            return _Caller(names[param], param, local["self"])
        frame = frame.f_back
    raise RuntimeError(
        "hvd_compress compressors must be called by horovod.torch.DistributedOptimizer "
        "(compression=...) built with named_parameters=; could not find the parameter being "
        "compressed in the caller")


class Compressor(_HorovodCompressor):
    """A Horovod ``Compressor`` around a :class:`~hvd_compress.codecs.base.Codec`.

    Args:
        codec: the tensor transform.
        error_feedback: keep a residual per parameter, ``r <- g + r - D(C(g + r))``
            (Seide et al. 2014; Karimireddy et al. 2019).
        min_numel: tensors with fewer elements go uncompressed (their bytes are negligible and
            compression would only add latency).
        seed: 64-bit seed of the Philox stream; must be equal on all ranks (checked).
        collective: for fixed-size payloads, ``"allgather"``, ``"two_phase"`` (alltoall, reduce,
            re-encode, allgather) or ``"auto"`` (the cost model of :mod:`hvd_compress.comm.cost`);
            sparsifiers always use the allgather.
    """

    def __init__(self, codec: Codec, *, error_feedback: bool, min_numel: int = 1024, seed: int = 0,
                 collective: str = cost.AUTO) -> None:
        if collective not in cost.CHOICES:
            raise ValueError(f"collective must be one of {cost.CHOICES}, got {collective!r}")
        self.collective = collective
        self.codec = codec
        self.error_feedback = error_feedback
        self.min_numel = int(min_numel)
        self.seed = int(seed)
        self._state: dict[str, _ParamState] = {}
        self._checked = False
        self._bytes = {"bytes_sent": 0, "bytes_received": 0, "bytes_dense": 0}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.codec!r}, error_feedback={self.error_feedback}, "
                f"min_numel={self.min_numel}, seed={self.seed}, collective={self.collective!r})")

    # -- Horovod's interface --------------------------------------------------------------------

    def compress(self, tensor: torch.Tensor):
        caller = _calling_optimizer(tensor)
        self._reject_unsupported(tensor, caller)
        if not self._checked:
            self._check_same_config(caller)
        self._bytes["bytes_dense"] += tensor.numel() * 4
        state = self._state.get(caller.name)
        if state is None:
            state = self._state[caller.name] = _ParamState(zlib.crc32(caller.name.encode()) & _UINT32)
        grad = self._prepare(tensor, state, caller)
        if tensor.numel() < self.min_numel:
            grad = grad.view(tensor.shape).to(tensor.dtype)
            self._count_dense(grad)
            return grad, _DenseCtx()
        if self.error_feedback and state.residual is None:
            state.residual = torch.zeros(tensor.numel(), dtype=torch.float32, device=tensor.device)
        key = RandomKey(self.seed, state.step & _UINT32, state.tensor_id)
        codec = self._codec_at(state.step)
        state.step += 1
        ps = caller.process_set
        size = ps.size() if ps is not None else _hvd_size()
        route = cost.choose(self.collective, size, tensor.numel(), codec.payload_nbytes(tensor.numel()))
        if route == cost.TWO_PHASE and not codec.summable:
            rank = ps.rank() if ps is not None else _hvd_rank()
            pending, sent = two_phase_allreduce_async(
                codec, as_fp32_flat(grad, caller.name), key, state.residual, state.server,
                caller.name, rank, size, ps)
            self._bytes["bytes_sent"] += sent
            return self._probe(tensor), _PendingCtx(pending.wait, tensor.shape, tensor.dtype, size)
        payload = codec.encode(grad, key, residual=state.residual, name=caller.name)
        self._after_encode(payload, state)
        if codec.summable:
            (part,) = payload.parts.values()
            self._count_dense(part)
            return part, _SumCtx(tensor.shape, tensor.dtype)
        gather = allgather_payload_async(payload, caller.name, ps)
        self._bytes["bytes_sent"] += payload.nbytes

        def finish() -> tuple[torch.Tensor, int]:
            payloads = gather.wait()
            out = torch.zeros(payload.numel, dtype=torch.float32, device=tensor.device)
            return codec.decode_accumulate(payloads, out), sum(p.nbytes for p in payloads) - payload.nbytes

        return self._probe(tensor), _PendingCtx(finish, tensor.shape, tensor.dtype, size)

    @staticmethod
    def _probe(tensor: torch.Tensor) -> torch.Tensor:
        # Allreduced by Horovod: 1 under Average (whatever the predivide factor), size under Sum.
        return torch.ones(1, dtype=torch.float32, device=tensor.device)

    # -- hooks for methods that transform the gradient around the codec (DGC) ------------------

    def _prepare(self, tensor: torch.Tensor, state: _ParamState, caller: _Caller) -> torch.Tensor:
        """The tensor to encode (or, below ``min_numel``, to allreduce as it is)."""
        return tensor

    def _codec_at(self, step: int) -> Codec:
        """The codec for this parameter's ``step``-th compression (schedules override this)."""
        return self.codec

    def _after_encode(self, payload, state: _ParamState) -> None:
        """Called with each payload before it is sent."""

    def decompress(self, tensor: torch.Tensor, ctx):
        if isinstance(ctx, _DenseCtx):
            return tensor
        if isinstance(ctx, _SumCtx):
            return tensor.to(ctx.dtype).view(ctx.shape)
        out, received = ctx.finish()
        self._bytes["bytes_received"] += received
        # size / probe is exactly size under Average and exactly 1 under Sum: dividing by it
        # gives the bits of "sum / size", where multiplying by probe / size would be 1 ulp off.
        out.div_(ctx.size / tensor.to(torch.float32))
        return out.view(ctx.shape).to(ctx.dtype)

    # -- accounting and checks --------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Bytes since creation, from the payloads themselves: ``bytes_sent`` (this rank's
        payloads, plus uncompressed small tensors), ``bytes_received`` (other ranks' payloads
        gathered here, plus what an allreduce of the uncompressed tensors delivers) and
        ``bytes_dense`` (what fp32 gradients would have cost to send)."""
        return dict(self._bytes)

    def _count_dense(self, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        self._bytes["bytes_sent"] += nbytes
        self._bytes["bytes_received"] += nbytes

    def _reject_unsupported(self, tensor: torch.Tensor, caller: _Caller) -> None:
        import horovod.torch as hvd
        # The Adasum optimizer is its own class (it compresses parameter deltas, has no .op).
        if getattr(caller.optimizer, "op", hvd.Adasum) == hvd.Adasum:
            raise ValueError(f"{type(self).__name__} cannot be combined with op=hvd.Adasum: Adasum "
                             "combines dense gradients pairwise and has no compressed form")
        if tensor.is_sparse:
            raise ValueError(f"{caller.name}: sparse gradients are not supported by "
                             f"{type(self).__name__}; pass sparse_as_dense=True to DistributedOptimizer")

    def _check_same_config(self, caller: _Caller) -> None:
        """Fail with a clear message, not a hang or silent garbage, when ranks were started with
        different compressor settings."""
        import horovod.torch as hvd
        digest = zlib.crc32(repr(self).encode())
        kwargs = {} if caller.process_set is None else {"process_set": caller.process_set}
        digests = hvd.allgather(torch.tensor([[digest]], dtype=torch.int64),
                                name="hvdc.config_check", **kwargs).view(-1).tolist()
        if len(set(digests)) != 1:
            groups: dict[int, list[int]] = {}
            for rank, d in enumerate(digests):
                groups.setdefault(d, []).append(rank)
            raise RuntimeError(f"hvd_compress: ranks use different compressor settings "
                               f"(ranks grouped by setting: {sorted(groups.values())}); this rank "
                               f"has {self!r}. Every rank must pass the same compression=.")
        self._checked = True
