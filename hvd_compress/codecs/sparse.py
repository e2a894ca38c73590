"""Sparse payloads of given entries: the nonzero entries of the input as (int32 index, fp32
value), ascending indices.  For methods that choose the entries themselves before encoding
(eSGD's importance selection, :class:`~hvd_compress.methods.ESGD`): the codec sends what the
method left nonzero, nothing else.

Wire: ``indices`` (int32, ascending) and ``values`` (fp32): 8 bytes per entry.  Decoding adds
each worker's values at its indices, workers in list order (indices are distinct within a
payload, so the order of the additions is fixed).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from .base import Codec, Payload, RandomKey


@dataclasses.dataclass(frozen=True)
class NonzeroCodec(Codec):
    """Sends the nonzero entries of its input as (int32 index, fp32 value)."""

    name = "nonzero"

    def _encode(self, x: torch.Tensor, key: RandomKey, residual: torch.Tensor | None) -> Payload:
        if residual is not None:
            raise ValueError("NonzeroCodec sends what it is given: the caller keeps any residual")
        if x.numel() >= 2 ** 31:
            raise ValueError(f"NonzeroCodec: {x.numel()} elements do not fit int32 indices")
        idx = torch.nonzero(x).reshape(-1)
        return Payload(x.numel(), {"indices": idx.to(torch.int32), "values": x[idx]})

    def decode_accumulate(self, payloads: Sequence[Payload], out: torch.Tensor) -> torch.Tensor:
        flat = out.view(-1)
        for p in payloads:
            idx = p.parts["indices"].to(torch.int64)
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= flat.numel()):
                raise IndexError(f"sparse payload index outside [0, {flat.numel()})")
            flat.index_add_(0, idx, p.parts["values"])
        return out
