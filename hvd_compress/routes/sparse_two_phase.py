"""Two-phase sparse allreduce: per-rank bytes that stay flat as the world grows (the idea of
Ok-Topk, PPoPP 2022, and of DeepSpeed's compressed allreduce, for top-k payloads).

Each rank owns a contiguous slice of the bucket's index space (P slices, sizes differing by at
most one).

1. Each rank selects its top-k entries as usual (with its error feedback), splits them by owning
   slice (indices ascend, so each owner's entries are one run) and an **alltoall** sends every
   owner its entries (indices relative to the slice).  An owner gets at most
   ``cap = ceil(1.5 C / P)`` entries from each rank (C: the segments' payload capacities, so
   1.5x a fair share of the most a rank can select); a run longer than that sends its first
   ``cap`` entries and puts the others back into the rank's residual (r_i <- r_i + D(v_i),
   which restores r_i = g'_i, exactly but at a saturated fp16 value: they are sent in a later
   step; without error feedback they are dropped).  So the chunks have a fixed size on a device
   (padded with index = slice length, no host read of the split points: a rank sends up to
   1.5 x 1.3 k entries in phase 1 there, against about k on the host) and hold just the
   entries on the host, the same entries on both.
2. In the flush, each owner scatter-adds the entries it received in rank order into its dense
   slice, **re-sparsifies** that sum with the same codec (ratio of the slice) and its own server
   error feedback (Philox id ``derived_id(bucket id, 2, owner)``, the owner's seed), and the
   owners' entries are **allgathered** and scatter-added into place.

A rank receives about (P - 1)/P of its own k entries in phase 1 and about k entries in phase 2,
instead of the allgather's (P - 1) k: two-phase pays from about 3-4 ranks.  What each owner
drops in re-sparsifying stays in its server residual and is sent in later steps.
"""
from __future__ import annotations

import math
from fractions import Fraction
from functools import lru_cache

import torch

from ..backends import on_device
from ..codecs.base import Payload
from . import wire
from .base import (Job, Link, Pending, Route, Speed, chunk_bounds, codec_seconds, encode_segments,
                   segment_codec)
from .two_phase import TwoPhasePending, TwoPhaseRoute


class SparseTwoPhaseRoute(Route):
    name = "sparse_two_phase"
    carries = "sparse"
    phases = 1

    #: an owner's chunk holds up to this times a fair share of a rank's payload capacity
    CHUNK_SLACK = Fraction(3, 2)

    def start(self, job: Job) -> Pending:
        payloads = encode_segments(job)
        size, device, n = job.comm.size, job.x.device, job.x.numel()
        # a device payload's padding (index seg.numel) maps past the bucket: after the last owner
        index = torch.cat([_bucket_index(p.parts["indices"], seg.offset, seg.numel, n)
                           for p, seg in zip(payloads, job.segments)])
        values = torch.cat([p.parts["values"] for p in payloads])
        order = None
        if on_device(index):                # padding between segments: sort it to the end
            index, order = torch.sort(index, stable=True)
            values = values[order]
        bounds = chunk_bounds(n, size)
        total = sum(segment_codec(job, seg).capacity(seg.numel) for seg in job.segments)
        # never more than the entries there are (a shape: the exact and threshold modes' count)
        cap = max(1, min(math.ceil(self.CHUNK_SLACK * total / size), index.numel()))
        edges = _edges(tuple(bounds), device)
        owner = torch.searchsorted(edges, index, right=True) - 1       # padding: owner `size`
        mine = owner < size
        owner = torch.clamp_max(owner, size - 1)
        first = torch.searchsorted(index, edges[:-1])                  # where each run starts
        position = torch.arange(index.numel(), device=device) - first.index_select(0, owner)
        keep = mine & (position < cap)
        slot = torch.where(keep, owner * cap + position, size * cap)   # the last slot: discarded
        lengths = [bounds[c + 1] - bounds[c] for c in range(size)]
        chunk_idx = _padding(tuple(lengths), cap, device).clone()
        chunk_idx.index_put_((slot,), (index - edges.index_select(0, owner)).to(torch.int32))
        chunk_val = torch.zeros(size * cap + 1, dtype=values.dtype, device=device)
        chunk_val.index_put_((slot,), values)
        if job.residual is not None:        # the overflow goes back: r_i + D(v_i) = g'_i
            # -0.0 adds nothing to any value (not even to -0.0): kept entries and padding
            job.residual.index_add_(0, torch.clamp_max(index, n - 1),
                                    torch.where(mine & ~keep, values.to(torch.float32), -0.0))
        pending_payloads = _sent(payloads, job.segments, keep, order)
        if order is None:                   # host: each chunk holds just its entries
            runs = torch.diff(torch.cat([first, first.new_full((1,), index.numel())])).tolist()
            counts = [min(r, cap) for r in runs]
        else:
            counts = [cap] * size
        blocks = [wire.pack([Payload(lengths[c], {"indices": chunk_idx[c * cap:c * cap + counts[c]],
                                                  "values": chunk_val[c * cap:c * cap + counts[c]]})],
                            device)
                  for c in range(size)]
        splits = [b.numel() for b in blocks]
        handle = job.comm.alltoall(torch.cat(blocks), splits, f"{job.tag}.p1")
        return TwoPhasePending(job, handle, sent=sum(splits) - splits[job.comm.rank],
                               payloads=pending_payloads, bounds=bounds)

    # Phase 2 and the final decode are the quantized two-phase route's, with the top-k codec:
    # the owner's decode_accumulate is a scatter-add in rank order, its re-encode a top-k with
    # error feedback.
    advance = TwoPhaseRoute.advance
    finish = TwoPhaseRoute.finish

    def seconds(self, n: int, world: int, payload_bytes: float, segments: int, link: Link,
                speed: Speed) -> float:
        # phase 2 re-sparsifies each slice at the same ratio: about the same bytes again
        return (2 * link.latency_s + 2 * (world - 1) / world * payload_bytes / link.bytes_per_s
                + codec_seconds(n * (world + 1) / world, 2, 2 * segments + 2 * world + 1, speed))


def _bucket_index(indices: torch.Tensor, offset: int, numel: int, total: int) -> torch.Tensor:
    """A segment's payload indices in the bucket's index space; padding (index ``numel``) becomes
    ``total``, beyond every owner's slice."""
    idx = indices.to(torch.int64)
    return torch.where(idx < numel, idx + offset, total)


@lru_cache(maxsize=64)
def _edges(bounds: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The owners' slice boundaries on the device, copied once per layout."""
    return torch.tensor(bounds, dtype=torch.int64, device=device)


@lru_cache(maxsize=64)
def _padding(lengths: tuple[int, ...], cap: int, device: torch.device) -> torch.Tensor:
    """Chunk indices before the entries go in: ``cap`` paddings (the slice length) per owner,
    and one discarded slot; built once per layout (no host-to-device copy per step)."""
    pad = torch.tensor(lengths, dtype=torch.int32).repeat_interleave(cap)
    return torch.cat([pad, pad.new_zeros(1)]).to(device)


def _sent(payloads: list[Payload], segments, keep: torch.Tensor,
          order: torch.Tensor | None) -> list[Payload]:
    """The segments' payloads as sent (for ``after_encode``: DGC masks its momentum where an
    entry was sent): entries put back for a later step removed on the host, turned into
    padding on a device (``keep`` is in sorted order there, ``order`` the sort)."""
    if order is not None:
        keep = torch.empty_like(keep).index_put_((order,), keep)
    out, start = [], 0
    for p, seg in zip(payloads, segments):
        idx, val = p.parts["indices"], p.parts["values"]
        mask = keep[start:start + idx.numel()]
        start += idx.numel()
        if order is None:
            out.append(Payload(p.numel, {"indices": idx[mask], "values": val[mask]}, p.finite))
        else:
            out.append(Payload(p.numel, {"indices": torch.where(mask, idx, seg.numel),
                                         "values": torch.where(mask, val, 0)}, p.finite))
    return out
