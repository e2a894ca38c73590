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
#: allreduce sizes (fp32 elements) timed to fit latency and bandwidth
_PROBE_SIZES = (1 << 10, 1 << 20)
_REPEATS = 3
#: elements encoded / decoded to time a codec
_CODEC_ELEMENTS = 1 << 22


def declared_link(link: Link | str | None) -> Link | None:
    """The link the user declared (argument first, then environment), or None for "measure"."""
    if isinstance(link, Link):
        return link
    if link not in (None, "auto"):
        raise ValueError(f"link must be a hvd_compress.Link or 'auto', got {link!r}")
    gbps = os.environ.get("HVD_COMPRESS_LINK_GBPS")
    if gbps is None:
        return None
    return Link.gbps(float(gbps), float(os.environ.get("HVD_COMPRESS_LINK_LATENCY_US", "50")))


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


def measure_link(comm: Any, device: torch.device, tag: str) -> tuple[Link, float]:
    """Fit latency and bandwidth to timed allreduces (blocking: call it outside hooks); also
    returns the slowest rank's memory copy bandwidth (bytes/s), which no link can beat."""
    times = []
    for i, n in enumerate(_PROBE_SIZES):
        x = torch.ones(n, dtype=torch.float32, device=device)
        times.append(_timed(lambda: _sync(comm.allreduce(x, f"{tag}.cal{i}").wait())))
    src = torch.ones(_PROBE_SIZES[1], dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times.append(_timed(lambda: _sync(dst.copy_(src))))
    t_small, t_large, t_copy = _agree(comm, times, f"{tag}.cal.agree")
    moved = ring_allreduce_bytes(FP32 * (_PROBE_SIZES[1] - _PROBE_SIZES[0]), comm.size)
    bandwidth = moved / (t_large - t_small) if t_large > t_small else float("inf")
    latency = t_small - ring_allreduce_bytes(FP32 * _PROBE_SIZES[0], comm.size) / bandwidth
    return Link(latency, bandwidth), 2 * FP32 * _PROBE_SIZES[1] / max(t_copy, 1e-12)


def measure_link_checked(comm: Any, device: torch.device, tag: str) -> tuple[Link, str]:
    """:func:`measure_link`, sanity-checked: an estimate faster than the machine copies memory,
    or with a latency <= 0, is measured once more, then replaced by :data:`ASSUMED`.  Returns
    the link and where it came from (for the plan and the log); the same on every rank (every
    number was agreed)."""
    seen = []
    for attempt in range(2):
        link, copy_bytes_per_s = measure_link(comm, device, f"{tag}.{attempt}" if attempt else tag)
        if 0 < link.latency_s and link.bytes_per_s < copy_bytes_per_s:
            return link, "measured" + (f", again after an implausible {seen[0]}" if seen else "")
        seen.append(f"{_describe(link)} (memory copies at {copy_bytes_per_s * 8 / 1e9:.3g} Gbit/s)")
    return ASSUMED, f"assumed: measured {' then '.join(seen)}, implausible twice"


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
