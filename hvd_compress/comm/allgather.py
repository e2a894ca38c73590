"""Payload allgather: every rank's payload to every rank, without padding to the largest.

One mechanism for every codec.  A payload's parts (e.g. int32 indices + fp16 values, or packed
codes + fp32 scales) are laid end to end as bytes and sent with one ``hvd.allgather_async``;
Horovod's allgather takes a different first dimension from each rank, so a rank with 3 kept
entries sends 3 entries' worth of bytes (and a rank with none sends zero bytes: that does not
hang, see tests).  The element count of each part travels beside it in a second, tiny allgather
issued at the same time, so splitting the result needs no extra round trip.

Collectives are named from the parameter name (``hvdc.<name>.data`` / ``.len``): every rank
issues the same names, whatever order its hooks fire in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..codecs.base import Payload


def pack(payload: Payload) -> tuple[torch.Tensor, torch.Tensor]:
    """(bytes of all parts end to end as uint8, element count of each part as int64)."""
    parts = [t.reshape(-1).view(torch.uint8) for t in payload.parts.values()]
    data = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8, device=payload.device)
    lengths = torch.tensor([[t.numel() for t in payload.parts.values()]], dtype=torch.int64)
    return data, lengths


def unpack(data: torch.Tensor, lengths: torch.Tensor, template: Payload,
           numels: list[int] | None = None) -> list[Payload]:
    """Split gathered bytes back into one payload per rank (rank order).  ``template`` gives the
    part names and dtypes (the same codec on every rank); ``numels`` the dense size of each
    rank's payload when they differ (default: the template's)."""
    names = list(template.parts)
    dtypes = [template.parts[n].dtype for n in names]
    sizes = [torch.empty(0, dtype=d).element_size() for d in dtypes]
    expected = int((lengths * torch.tensor(sizes, dtype=torch.int64)).sum())
    if expected != data.numel():
        raise RuntimeError(f"gathered {data.numel()} payload bytes but the ranks announced "
                           f"{expected}: ranks disagree on the codec's wire format")
    out, offset = [], 0
    rank_lengths_all = lengths.tolist()
    numels = numels if numels is not None else [template.numel] * len(rank_lengths_all)
    for rank_lengths, numel in zip(rank_lengths_all, numels):
        parts = {}
        for name, dtype, size, count in zip(names, dtypes, sizes, rank_lengths):
            nbytes = count * size
            # clone: the slice may start at an offset not aligned to the dtype.
            parts[name] = data[offset:offset + nbytes].clone().view(dtype)
            offset += nbytes
        out.append(Payload(numel, parts))
    return out


@dataclass
class PendingGather:
    """Handles of the two allgathers of one payload; :meth:`wait` returns all ranks' payloads."""
    data_handle: int
    lengths_handle: int
    template: Payload

    def wait(self, numels: list[int] | None = None) -> list[Payload]:
        """All ranks' payloads; ``numels`` as in :func:`unpack`."""
        import horovod.torch as hvd
        lengths = hvd.synchronize(self.lengths_handle)
        data = hvd.synchronize(self.data_handle)
        return unpack(data, lengths, self.template, numels)


def allgather_payload_async(payload: Payload, name: str, process_set=None) -> PendingGather:
    """Start gathering ``payload`` from every rank of ``process_set`` (default: all)."""
    import horovod.torch as hvd
    data, lengths = pack(payload)
    kwargs = {} if process_set is None else {"process_set": process_set}
    return PendingGather(
        data_handle=hvd.allgather_async(data, name=f"hvdc.{name}.data", **kwargs),
        lengths_handle=hvd.allgather_async(lengths, name=f"hvdc.{name}.len", **kwargs),
        template=payload,
    )
