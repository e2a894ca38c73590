"""Two-phase sparse allreduce: per-rank bytes that stay flat as the world grows (the idea of
Ok-Topk, PPoPP 2022, and of DeepSpeed's compressed allreduce, for top-k payloads).

Each rank owns a contiguous slice of the bucket's index space (P slices, sizes differing by at
most one).

1. Each rank selects its top-k entries as usual (with its error feedback), splits them by owning
   slice (indices ascend, so each owner's entries are one run) and an **alltoall** sends every
   owner its entries (indices relative to the slice).
2. In the flush, each owner scatter-adds the entries it received in rank order into its dense
   slice, **re-sparsifies** that sum with the same codec (ratio of the slice) and its own server
   error feedback (Philox id ``derived_id(bucket id, 2, owner)``, the owner's seed), and the
   owners' entries are **allgathered** and scatter-added into place.

A rank receives about (P - 1)/P of its own k entries in phase 1 and about k entries in phase 2,
instead of the allgather's (P - 1) k: two-phase pays from about 3-4 ranks.  What each owner
drops in re-sparsifying stays in its server residual and is sent in later steps.
"""
from __future__ import annotations

import torch

from ..backends import on_device
from ..codecs.base import Payload
from . import wire
from .base import Job, Link, Pending, Route, Speed, chunk_bounds, codec_seconds, encode_segments
from .two_phase import TwoPhasePending, TwoPhaseRoute


class SparseTwoPhaseRoute(Route):
    name = "sparse_two_phase"
    carries = "sparse"
    phases = 1

    def start(self, job: Job) -> Pending:
        payloads = encode_segments(job)
        # a device payload's padding (index seg.numel) maps past the bucket: after the last cut
        index = torch.cat([_bucket_index(p.parts["indices"], seg.offset, seg.numel, job.x.numel())
                           for p, seg in zip(payloads, job.segments)])
        values = torch.cat([p.parts["values"] for p in payloads])
        if on_device(index):                # padding between segments: sort it to the end
            index, order = torch.sort(index, stable=True)
            values = values[order]
        size, device = job.comm.size, job.x.device
        bounds = chunk_bounds(job.x.numel(), size)
        cuts = torch.searchsorted(index, torch.tensor(bounds, dtype=torch.int64, device=device)).tolist()
        blocks = []
        for c in range(size):
            run = slice(cuts[c], cuts[c + 1])
            local = (index[run] - bounds[c]).to(torch.int32)
            blocks.append(wire.pack([Payload(bounds[c + 1] - bounds[c],
                                             {"indices": local, "values": values[run]})], device))
        splits = [b.numel() for b in blocks]
        handle = job.comm.alltoall(torch.cat(blocks), splits, f"{job.tag}.p1")
        return TwoPhasePending(job, handle, sent=sum(splits) - splits[job.comm.rank], payloads=payloads,
                               bounds=bounds)

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
