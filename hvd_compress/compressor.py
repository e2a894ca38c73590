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
from typing import Any

import torch
from horovod.torch.compression import Compressor as _HorovodCompressor

from .codecs.base import Codec, RandomKey
from .comm.allgather import PendingGather, allgather_payload_async

_UINT32 = (1 << 32) - 1


@dataclass
class _ParamState:
    """Per-parameter state: the Philox tensor id, the step counter and the EF residual."""
    tensor_id: int
    step: int = 0
    residual: torch.Tensor | None = None


@dataclass
class _Caller:
    name: str
    process_set: Any
    op: Any


@dataclass
class _DenseCtx:
    """Sent uncompressed through Horovod's allreduce."""


@dataclass
class _SumCtx:
    """Summable payload (one part) allreduced by Horovod."""
    shape: torch.Size
    dtype: torch.dtype


@dataclass
class _GatherCtx:
    pending: PendingGather
    shape: torch.Size
    dtype: torch.dtype
    size: int
    stats: dict = field(default_factory=dict)


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
            opt = local["self"]
            return _Caller(names[param], opt.process_set, opt.op)
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
    """

    def __init__(self, codec: Codec, *, error_feedback: bool, min_numel: int = 1024, seed: int = 0) -> None:
        self.codec = codec
        self.error_feedback = error_feedback
        self.min_numel = int(min_numel)
        self.seed = int(seed)
        self._state: dict[str, _ParamState] = {}
        self._checked = False
        self._bytes = {"bytes_sent": 0, "bytes_received": 0, "bytes_dense": 0}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.codec!r}, error_feedback={self.error_feedback}, "
                f"min_numel={self.min_numel}, seed={self.seed})")

    # -- Horovod's interface --------------------------------------------------------------------

    def compress(self, tensor: torch.Tensor):
        caller = _calling_optimizer(tensor)
        self._reject_unsupported(tensor, caller)
        if not self._checked:
            self._check_same_config(caller)
        self._bytes["bytes_dense"] += tensor.numel() * 4
        if tensor.numel() < self.min_numel:
            self._count_dense(tensor, caller)
            return tensor, _DenseCtx()
        state = self._state.get(caller.name)
        if state is None:
            state = self._state[caller.name] = _ParamState(zlib.crc32(caller.name.encode()) & _UINT32)
        if self.error_feedback and state.residual is None:
            state.residual = torch.zeros(tensor.numel(), dtype=torch.float32, device=tensor.device)
        key = RandomKey(self.seed, state.step & _UINT32, state.tensor_id)
        state.step += 1
        payload = self.codec.encode(tensor, key, residual=state.residual, name=caller.name)
        if getattr(self.codec, "summable", False):
            (part,) = payload.parts.values()
            self._count_dense(part, caller)
            return part, _SumCtx(tensor.shape, tensor.dtype)
        size = caller.process_set.size()
        pending = allgather_payload_async(payload, caller.name, caller.process_set)
        self._bytes["bytes_sent"] += payload.nbytes
        probe = torch.ones(1, dtype=torch.float32, device=tensor.device)
        return probe, _GatherCtx(pending, tensor.shape, tensor.dtype, size)

    def decompress(self, tensor: torch.Tensor, ctx):
        if isinstance(ctx, _DenseCtx):
            return tensor
        if isinstance(ctx, _SumCtx):
            return tensor.to(ctx.dtype).view(ctx.shape)
        payloads = ctx.pending.wait()
        mine = ctx.pending.template.nbytes
        self._bytes["bytes_received"] += sum(p.nbytes for p in payloads) - mine
        out = torch.zeros(payloads[0].numel, dtype=torch.float32, device=tensor.device)
        self.codec.decode_accumulate(payloads, out)
        # probe output = 1 under Average (Horovod divides by size), size under Sum.
        out.mul_(tensor.to(torch.float32) / ctx.size)
        return out.view(ctx.shape).to(ctx.dtype)

    # -- accounting and checks --------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Bytes since creation, from the payloads themselves: ``bytes_sent`` (this rank's
        payloads, plus uncompressed small tensors), ``bytes_received`` (other ranks' payloads
        gathered here, plus what an allreduce of the uncompressed tensors delivers) and
        ``bytes_dense`` (what fp32 gradients would have cost to send)."""
        return dict(self._bytes)

    def _count_dense(self, tensor: torch.Tensor, caller: _Caller) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        self._bytes["bytes_sent"] += nbytes
        self._bytes["bytes_received"] += nbytes

    def _reject_unsupported(self, tensor: torch.Tensor, caller: _Caller) -> None:
        import horovod.torch as hvd
        if caller.op == hvd.Adasum:
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
