"""Two-phase compressed allreduce for fixed-size (quantizer) payloads.

The scheme of DeepSpeed's 1-bit Adam, for any codec:

1. split the dense tensor into P contiguous chunks (sizes differ by at most one element); encode
   chunk c as a tensor of its own (worker error feedback on that slice of the residual, Philox
   tensor id derived from (tensor id, phase 1, c)); **alltoall**: chunk c's payload goes to rank c;
2. rank c decode-accumulates the P payloads of its chunk in rank order, re-encodes the sum with
   its own *server* error-feedback residual (tensor id from (tensor id, phase 2, c)), and the
   re-encoded chunks are **allgathered** and decoded into place.

Each rank receives about 2 (P-1)/P payload sizes instead of the allgather's P-1 (see
:mod:`.cost`).  The result is the sum over ranks (not averaged), like the allgather path.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import torch

from ..codecs.base import Codec, Payload, RandomKey
from .allgather import allgather_payload_async, pack, unpack


def chunk_bounds(numel: int, parts: int) -> list[int]:
    """Boundaries b_0 = 0 < ... < b_P = numel of P chunks whose sizes differ by at most one."""
    return [c * numel // parts for c in range(parts + 1)]


def derived_id(tensor_id: int, phase: int, chunk: int) -> int:
    """A distinct Philox tensor id per (tensor, phase, chunk), so chunks draw independent bits."""
    return zlib.crc32(struct.pack("<III", tensor_id, phase, chunk))


@dataclass
class TwoPhaseState:
    """The server-side error-feedback residual of the chunk this rank owns."""
    residual: torch.Tensor | None = None


@dataclass
class PendingTwoPhase:
    codec: Codec
    handle: int
    key: RandomKey
    numel: int
    rank: int
    size: int
    name: str
    state: TwoPhaseState | None
    process_set: object

    def wait(self) -> tuple[torch.Tensor, int]:
        """(dense sum over ranks as fp32, payload bytes this rank received)."""
        import horovod.torch as hvd
        received, splits = hvd.synchronize(self.handle)
        bounds = chunk_bounds(self.numel, self.size)
        mine = bounds[self.rank + 1] - bounds[self.rank]
        template = self.codec.payload_template(mine)
        lengths = torch.tensor([[t.numel() for t in template.parts.values()]] * self.size, dtype=torch.int64)
        chunk_sum = self.codec.decode_accumulate(unpack(received, lengths, template),
                                                 torch.zeros(mine, device=received.device))
        residual = None
        if self.state is not None:
            if self.state.residual is None or self.state.residual.numel() != mine:
                self.state.residual = torch.zeros(mine, device=received.device)
            residual = self.state.residual
        key = RandomKey(self.key.seed, self.key.step, derived_id(self.key.tensor_id, 2, self.rank))
        reencoded = self.codec.encode(chunk_sum, key, residual=residual, name=self.name)
        gathered = allgather_payload_async(reencoded, f"{self.name}.phase2", self.process_set).wait()
        out = torch.zeros(self.numel, device=received.device)
        for c, payload in enumerate(gathered):
            self.codec.decode_accumulate([payload], out[bounds[c]:bounds[c + 1]])
        nbytes = received.numel() + sum(p.nbytes for p in gathered) - reencoded.nbytes
        return out, nbytes


def two_phase_allreduce_async(codec: Codec, x: torch.Tensor, key: RandomKey, residual: torch.Tensor | None,
                              state: TwoPhaseState | None, name: str, rank: int, size: int,
                              process_set=None) -> tuple[PendingTwoPhase, int]:
    """Encode the chunks of the flat fp32 tensor ``x`` and start the alltoall; returns the
    pending reduction and the bytes this rank sends in phase 1."""
    import horovod.torch as hvd
    bounds = chunk_bounds(x.numel(), size)
    data, splits = [], []
    for c in range(size):
        part = slice(bounds[c], bounds[c + 1])
        chunk_key = RandomKey(key.seed, key.step, derived_id(key.tensor_id, 1, c))
        payload = codec.encode(x[part], chunk_key, residual=None if residual is None else residual[part],
                               name=name)
        packed, _ = pack(payload)
        data.append(packed)
        splits.append(packed.numel())
    kwargs = {} if process_set is None else {"process_set": process_set}
    handle = hvd.alltoall_async(torch.cat(data), splits=torch.tensor(splits, dtype=torch.int32),
                                name=f"hvdc.{name}.phase1", **kwargs)
    pending = PendingTwoPhase(codec, handle, key, x.numel(), rank, size, name, state, process_set)
    return pending, sum(splits) - splits[rank]
