"""Which collective carries a fixed-size (quantizer) payload: a cost model over world size and
tensor size, in the alpha-beta style (latency + bytes / bandwidth + codec work / throughput).

For P ranks, a dense tensor of n elements and a payload of S bytes (whole tensor):

* **allgather**: every rank receives the P-1 other payloads and decodes P of them, in 2 codec
  calls (encode, decode-accumulate):
  ``T_ag = alpha + (P-1) S / beta + P n / gamma + 2 c``
* **two-phase** (DeepSpeed's compressed allreduce): alltoall of S/P-byte chunks, the owner
  decodes P chunk payloads, re-encodes its chunk, allgather of the re-encoded chunks, in P + 3
  codec calls (P chunk encodes, decode, re-encode, decode):
  ``T_2p = 2 alpha + 2 (P-1)/P S / beta + (n/P (P + 1) + n) / gamma + (P + 3) c``

so two-phase moves ~2/P of the allgather's bytes and wins from P >= 3 on slow links.  ``beta``
(bytes/s of the link) and ``alpha`` default to a 1 Gbit/s Ethernet and can be set with the
HVD_COMPRESS_LINK_GBPS and HVD_COMPRESS_LINK_LATENCY_US environment variables; ``gamma`` is the
codec throughput in elements/s and ``c`` the fixed cost of one codec call (Python and kernel
launch), which decides for small tensors.
"""
from __future__ import annotations

import os

ALLGATHER = "allgather"
TWO_PHASE = "two_phase"
AUTO = "auto"
CHOICES = (AUTO, ALLGATHER, TWO_PHASE)


def link() -> tuple[float, float]:
    """(alpha seconds, beta bytes/s) of the link the model assumes."""
    gbps = float(os.environ.get("HVD_COMPRESS_LINK_GBPS", "1"))
    latency_us = float(os.environ.get("HVD_COMPRESS_LINK_LATENCY_US", "50"))
    return latency_us * 1e-6, gbps * 1e9 / 8


def predicted_seconds(route: str, world: int, numel: int, payload_bytes: int,
                      codec_elements_per_s: float = 2.5e8, call_s: float = 3e-5) -> float:
    alpha, beta = link()
    p, n, s, gamma, c = world, numel, payload_bytes, codec_elements_per_s, call_s
    if route == ALLGATHER:
        return alpha + (p - 1) * s / beta + p * n / gamma + 2 * c
    if route == TWO_PHASE:
        return 2 * alpha + 2 * (p - 1) / p * s / beta + (n / p * (p + 1) + n) / gamma + (p + 3) * c
    raise ValueError(f"unknown route {route!r}")


def choose(requested: str, world: int, numel: int, payload_bytes: int | None) -> str:
    """The route for one tensor: ``requested`` unless it is ``auto``; sparsifiers
    (``payload_bytes is None``) always use the allgather."""
    if requested not in CHOICES:
        raise ValueError(f"collective must be one of {CHOICES}, got {requested!r}")
    if payload_bytes is None or world < 2 or numel < world:
        return ALLGATHER
    if requested != AUTO:
        return requested
    return min((ALLGATHER, TWO_PHASE), key=lambda r: predicted_seconds(r, world, numel, payload_bytes))
