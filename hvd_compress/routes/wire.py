"""Wire format of packed payloads: several segments' payloads in one uint8 block, with their
sizes in-band so that a variable-size allgather needs no second collective.

One rank's block::

    int32 header: [block bytes, segment count, element count of part j of segment s ...]
    then, segment by segment, part by part: the part's bytes, each starting on an 8-byte
    boundary (zero padding), the block length a multiple of 8.

An allgather concatenates the ranks' blocks; :func:`unpack` walks them by their own lengths.
The alignment lets the receiver view every part in place (``Tensor.view(dtype)`` needs the
offset to be a multiple of the element size).
"""
from __future__ import annotations

from functools import lru_cache

import torch

from ..codecs.base import Codec, Payload

_ALIGN = 8


def _pad(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


@lru_cache(maxsize=None)
def _parts_of(codec: Codec) -> tuple[tuple[str, torch.dtype], ...]:
    """(name, dtype) of the parts of the codec's payloads, from an empty payload."""
    empty = codec.payload_template(0) if codec.fixed_size else codec.encode(torch.zeros(0))
    return tuple((name, t.dtype) for name, t in empty.parts.items())


def parts_of(codec: Codec) -> tuple[tuple[str, torch.dtype], ...]:
    return _parts_of(codec)


def block_nbytes(payloads: list[Payload]) -> int:
    """Bytes of the block :func:`pack` makes of these payloads."""
    n_parts = sum(len(p.parts) for p in payloads)
    return _pad(4 * (2 + n_parts)) + sum(_pad(t.numel() * t.element_size())
                                         for p in payloads for t in p.parts.values())


def pack(payloads: list[Payload], device: torch.device) -> torch.Tensor:
    """One uint8 block holding every payload (see the module docstring)."""
    counts = [t.numel() for p in payloads for t in p.parts.values()]
    total = block_nbytes(payloads)
    block = torch.zeros(total, dtype=torch.uint8, device=device)
    header = torch.tensor([total, len(payloads), *counts], dtype=torch.int32)
    block[:4 * header.numel()].copy_(header.view(torch.uint8))
    offset = _pad(4 * header.numel())
    for p in payloads:
        for t in p.parts.values():
            nbytes = t.numel() * t.element_size()
            block[offset:offset + nbytes].copy_(t.reshape(-1).view(torch.uint8))
            offset += _pad(nbytes)
    return block


def unpack(data: torch.Tensor, codec: Codec, numels: list[list[int]]) -> list[list[Payload]]:
    """Split concatenated blocks (rank order) back into payloads: ``out[r][s]`` is rank r's
    payload of segment s, whose dense size is ``numels[r][s]``.  Parts are views of ``data``.
    Raises ValueError when a block does not match (ranks disagree on the wire format)."""
    parts = _parts_of(codec)
    sizes = [torch.empty(0, dtype=d).element_size() for _, d in parts]
    out, offset = [], 0
    for rank, rank_numels in enumerate(numels):
        if offset + 8 > data.numel():
            raise ValueError(f"payload block of rank {rank} missing: {data.numel()} bytes received")
        total, n_seg = _ints(data, offset, 2)
        n_head = 2 + n_seg * len(parts)
        if n_seg != len(rank_numels) or total % _ALIGN or offset + total > data.numel():
            raise ValueError(f"rank {rank}'s payload block does not match this rank's plan "
                             f"({n_seg} segments in {total} bytes, {len(rank_numels)} expected)")
        counts = _ints(data, offset + 8, n_head - 2)
        pos = offset + _pad(4 * n_head)
        payloads = []
        for s, numel in enumerate(rank_numels):
            seg = {}
            for j, ((name, dtype), size) in enumerate(zip(parts, sizes)):
                nbytes = counts[s * len(parts) + j] * size
                seg[name] = data[pos:pos + nbytes].view(dtype)
                pos += _pad(nbytes)
            payloads.append(Payload(numel, seg))
        if pos != offset + total:
            raise ValueError(f"rank {rank}'s payload block is {total} bytes, its parts {pos - offset}")
        out.append(payloads)
        offset += total
    if offset != data.numel():
        raise ValueError(f"{data.numel() - offset} bytes left over after {len(numels)} payload blocks")
    return out


def _ints(data: torch.Tensor, start: int, count: int) -> list[int]:
    """``count`` int32 at byte ``start`` of ``data``, on the host (a small read on the GPU)."""
    return data[start:start + 4 * count].view(torch.int32).tolist()
