"""Where the plan's link and codec speeds come from: declared, or measured once.

Declared: ``link=Link.gbps(1, latency_us=50)`` on the compressor, or the environment variables
``HVD_COMPRESS_LINK_GBPS`` / ``HVD_COMPRESS_LINK_LATENCY_US`` (the same on every rank).
Measured (the default, ``link="auto"``): the first step is planned for :data:`ASSUMED` (1 Gbit/s
Ethernet); its flush then times fp32 allreduces of two sizes (4 kB and 4 MB, the fastest of three
each) and each method's encode and decode-accumulate on this machine, takes the **maximum over
ranks** of every time (so every rank gets the same numbers and the same plan) and fits

    T_allreduce(n) = alpha + 2 (P - 1)/P * 4 n / beta

to the two sizes.  The result is kept in the compressor's state (a resumed run plans the same).
"""
from __future__ import annotations

import os
import time
from typing import Any

import torch

from ..routes.base import FP32, Link, Speed, ring_allreduce_bytes

#: what the plan assumes before anything is measured
ASSUMED = Link.gbps(1.0, 50.0)
#: the link inside a host when the link between hosts is declared and this one is not: shared
#: memory or NVLink class (a host's own loopback measures 10-40 Gbit/s on CPUs)
ASSUMED_INTRA = Link.gbps(20.0, 10.0)
#: allreduce sizes (fp32 elements) timed to fit latency and bandwidth
_PROBE_SIZES = (1 << 10, 1 << 20)
_REPEATS = 3
#: elements encoded / decoded to time a codec
_CODEC_ELEMENTS = 1 << 22


def declared_link(link: Link | str | None, env: str = "HVD_COMPRESS_LINK") -> Link | None:
    """The link the user declared (argument first, then the environment: ``{env}_GBPS``,
    ``{env}_LATENCY_US``), or None for "measure"."""
    if isinstance(link, Link):
        return link
    if link not in (None, "auto"):
        raise ValueError(f"{env[13:].lower()} must be a hvd_compress.Link or 'auto', got {link!r}")
    gbps = os.environ.get(f"{env}_GBPS")
    if gbps is None:
        return None
    return Link.gbps(float(gbps), float(os.environ.get(f"{env}_LATENCY_US", "50")))


def declared_intra_link(link: Link | str | None) -> Link | None:
    """The link inside a host the user declared (``intra_link=``, ``HVD_COMPRESS_INTRA_LINK_GBPS``,
    ``HVD_COMPRESS_INTRA_LINK_LATENCY_US``), or None."""
    return declared_link(link, "HVD_COMPRESS_INTRA_LINK")


def _timed(fn, repeats: int = _REPEATS) -> float:
    """The fastest of ``repeats`` calls after a warm-up (the least disturbed by other work)."""
    fn()  # warm-up (first use allocates, compiles kernels, negotiates)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _agree(comm: Any, values: list[float], name: str) -> list[float]:
    """The element-wise maximum of ``values`` over ranks (fp64 on the CPU: exact, tiny)."""
    local = torch.tensor(values, dtype=torch.float64)
    return comm.allreduce(local, name, op="max").wait().tolist()


def measure_link(comm: Any, device: torch.device, tag: str, world: Any = None) -> tuple[Link, float]:
    """Fit latency and bandwidth to timed allreduces on ``comm`` (blocking: call it outside
    hooks; a :class:`~hvd_compress.engine.topology.GroupComm`'s allreduce is a gather inside the
    group); also returns the slowest rank's memory copy bandwidth (bytes/s), which no link can
    beat.  Times are agreed (maximum) over ``world`` (default: ``comm``)."""
    times = []
    for i, n in enumerate(_PROBE_SIZES):
        x = torch.ones(n, dtype=torch.float32, device=device)
        times.append(_timed(lambda: _sync(comm.allreduce(x, f"{tag}.cal{i}").wait())))
    src = torch.ones(_PROBE_SIZES[1], dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times.append(_timed(lambda: _sync(dst.copy_(src))))
    t_small, t_large, t_copy = _agree(world or comm, times, f"{tag}.cal.agree")
    moved = _moved(comm, FP32 * (_PROBE_SIZES[1] - _PROBE_SIZES[0]))
    bandwidth = moved / (t_large - t_small) if t_large > t_small else float("inf")
    latency = t_small - _moved(comm, FP32 * _PROBE_SIZES[0]) / bandwidth
    return Link(latency, bandwidth), 2 * FP32 * _PROBE_SIZES[1] / max(t_copy, 1e-12)


def _moved(comm: Any, nbytes: float) -> float:
    """Bytes each rank receives in ``comm``'s allreduce of ``nbytes``: a ring's, or a group's
    gather (every member's copy)."""
    from .topology import GroupComm
    return (comm.size - 1) * nbytes if isinstance(comm, GroupComm) else ring_allreduce_bytes(nbytes, comm.size)


def measure_link_checked(comm: Any, device: torch.device, tag: str, world: Any = None,
                         fallback: Link = ASSUMED) -> tuple[Link, str]:
    """:func:`measure_link`, sanity-checked: an estimate faster than the machine copies memory,
    or with a latency <= 0, is measured once more, then replaced by ``fallback``.  Returns
    the link and where it came from (for the plan and the log); the same on every rank (every
    number was agreed)."""
    seen = []
    for attempt in range(2):
        link, copy_bytes_per_s = measure_link(comm, device, f"{tag}.{attempt}" if attempt else tag, world)
        if 0 < link.latency_s and link.bytes_per_s < copy_bytes_per_s:
            return link, "measured" + (f", again after an implausible {seen[0]}" if seen else "")
        seen.append(f"{_describe(link)} (memory copies at {copy_bytes_per_s * 8 / 1e9:.3g} Gbit/s)")
    return fallback, f"assumed: measured {' then '.join(seen)}, implausible twice"


def measure_links(comm: Any, topology: Any, device: torch.device, tag: str) -> tuple[Link, Link | None, str]:
    """The link between hosts and the link inside a host (None when the topology is not
    hierarchical: then the one link of :func:`measure_link_checked`), and where they came from.

    Between hosts: every rank's peers (same local index, other hosts) exchange at once, as the
    hierarchical routes' inner phase does, so each rank's measured share is 1/L of its host's
    link; the link reported (and declared with ``link=``) is the host's: L times that share.
    Inside a host: the host's ranks exchange among themselves, every host at once."""
    from .topology import GroupComm
    if not topology.hierarchical:
        link, source = measure_link_checked(comm, device, tag)
        return link, None, source
    peers = GroupComm(comm, topology.peer_group(comm.rank))
    host = GroupComm(comm, topology.host_group(comm.rank))
    share, inter_source = measure_link_checked(peers, device, f"{tag}.inter", world=comm)
    intra, intra_source = measure_link_checked(host, device, f"{tag}.intra", world=comm,
                                               fallback=ASSUMED_INTRA)
    inter = share if inter_source.startswith("assumed") else \
        Link(share.latency_s, share.bytes_per_s * topology.local_size)
    return inter, intra, f"{inter_source}; inside hosts {intra_source}"


def _describe(link: Link) -> str:
    gbps = link.bytes_per_s * 8 / 1e9
    return f"{gbps:.3g} Gbit/s, {link.latency_s * 1e6:.0f} us"


def measure_speed(comm: Any, codec, error_feedback: bool, device: torch.device, tag: str) -> Speed:
    """Encode (with error feedback when the method uses it) and decode-accumulate of ``size``
    payloads, timed on this rank, maximum over ranks."""
    from ..codecs.base import RandomKey
    if hasattr(codec, "with_shared_key"):          # random-k, sketch: a mask every rank shares
        codec = codec.with_shared_key(RandomKey(seed=2 ** 64 - 1))   # (unlike the per-rank key)
    x = torch.randn(_CODEC_ELEMENTS, generator=torch.Generator().manual_seed(0)).to(device)
    residual = torch.zeros_like(x) if error_feedback else None
    payload = codec.encode(x, RandomKey(), residual=residual)
    out = torch.zeros_like(x)
    t_enc = _timed(lambda: _sync(codec.encode(x, RandomKey(), residual=residual)))
    t_dec = _timed(lambda: _sync(codec.decode_accumulate([payload] * comm.size, out)))
    t_enc, t_dec = _agree(comm, [t_enc, t_dec], f"{tag}.agree")
    n = x.numel()
    return Speed(encode=n / max(t_enc, 1e-9), decode=n * comm.size / max(t_dec, 1e-9), call_s=Speed().call_s)


def _sync(result: Any) -> Any:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result


def check_engine_options(bucket_cap_mb: float, link: Any, intra_link: Any) -> float:
    """Validate the options every engine takes (a method's or a compressor map's): the bucket cap
    (returned as a float) and the two links."""
    if not bucket_cap_mb >= 0:
        raise ValueError(f"bucket_cap_mb must be >= 0, got {bucket_cap_mb!r}")
    declared_link(link)
    declared_intra_link(intra_link)
    return float(bucket_cap_mb)
