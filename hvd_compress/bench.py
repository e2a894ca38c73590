"""Codec throughput, side by side with plain-torch implementations of the same methods.

    python -m hvd_compress.bench                       # CPU, 10M elements
    python -m hvd_compress.bench --device cuda         # GPU, 100M elements (needs CuPy)
    python -m hvd_compress.bench --json out.json       # also write the rows

For each codec it times, on the same tensor in the same run:

* ``encode+EF``: encode with error feedback (``residual`` read and rewritten; plain encode for
  the methods without error feedback: signSGD, the sketch, noted "no EF"), and
* ``decode``: decode-and-accumulate one payload into a dense fp32 tensor,

and the plain-torch way (what GRACE and DGC's reference code do: ``torch.bernoulli``,
``torch.topk``, ``torch.randperm``, masks and ``nonzero``) of the same method with the same error
feedback.  Throughput
is GB/s of fp32 *input* (4 bytes per element / time).  It also measures the copy bandwidth
(``copy_`` into a buffer in use: read + write, with the same threads: ``OMP_NUM_THREADS=1`` and one torch thread for
one core) and reports each call's effective bandwidth (bytes it must move / time) as a fraction
of it.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from .codecs import RandomKey
from .codecs.base import Codec
from .codecs.terngrad import TernGradCodec


# ---- plain-torch reference implementations (the baselines; allocation-happy on purpose) ----

def torch_terngrad(g: torch.Tensor, r: torch.Tensor, clip: float = TernGradCodec.clip) -> torch.Tensor:
    """TernGrad (Wen et al. 2017) with ``clip``-sigma clipping (TernGradCodec's default) and error
    feedback, int8 codes."""
    v = g + r
    c = clip * v.std()
    v_clipped = v.clamp(-c, c)
    s = v_clipped.abs().max()
    codes = (torch.bernoulli(v_clipped.abs() / s) * v_clipped.sign()).to(torch.int8)
    r.copy_(v - codes.float() * s)
    return codes


def torch_qsgd(g: torch.Tensor, r: torch.Tensor, levels: int = 7, bucket: int = 512) -> torch.Tensor:
    """QSGD (Alistarh et al. 2017), per-bucket L2 norm, int8 sign*level codes, error feedback."""
    v = g + r
    n = v.numel()
    padded = torch.nn.functional.pad(v, (0, (-n) % bucket)).view(-1, bucket)
    norms = padded.norm(dim=1, keepdim=True)
    scaled = padded.abs() / norms.clamp_min(1e-30) * levels
    level = torch.floor(scaled + torch.rand_like(scaled))
    codes = (level * padded.sign()).to(torch.int8)
    r.copy_(v - (codes.float() * norms / levels).view(-1)[:n])
    return codes


def torch_topk(g: torch.Tensor, r: torch.Tensor, ratio: float = 0.01) -> torch.Tensor:
    """Exact top-k by magnitude (Dryden et al. 2016) with torch.topk, error feedback."""
    v = g + r
    k = max(1, math.ceil(ratio * v.numel()))
    _, idx = torch.topk(v.abs(), k, sorted=False)
    values = v[idx]
    r.copy_(v)
    r[idx] = 0
    return values


def torch_dgc(g: torch.Tensor, r: torch.Tensor, ratio: float = 0.01, sample: float = 0.01) -> torch.Tensor:
    """DGC's sampled threshold (Lin et al. 2018): top-k of a strided sample sets the threshold,
    then a mask and ``nonzero`` select; error feedback."""
    v = g + r
    stride = max(1, int(1 / sample))
    samples = v.abs()[torch.randint(stride, (1,)).item()::stride]
    k_s = max(1, math.ceil(ratio * samples.numel()))
    thr = torch.topk(samples, k_s, sorted=False)[0].min()
    idx = (v.abs() >= thr).nonzero().view(-1)
    values = v[idx]
    r.copy_(v)
    r[idx] = 0
    return values


def torch_fp16(g: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Unbiased stochastic rounding to fp16 in plain torch (round to the nearer fp16, then move to
    the other neighbour with probability proportional to the distance), error feedback."""
    v = g + r
    near = v.half()
    # The other neighbour: one fp16 step away from zero if |v| > |near|, else towards zero.
    away = v.abs() > near.float().abs()
    other = (near.view(torch.int16) + torch.where(away, 1, -1).to(torch.int16)).view(torch.float16)
    gap = other.float() - near.float()
    p = torch.where(gap != 0, (v - near.float()) / gap, torch.zeros_like(v))
    h = torch.where(torch.rand_like(v) < p, other, near)
    r.copy_(v - h.float())
    return h


def _pack_signs(negative: torch.Tensor) -> torch.Tensor:
    """Sign bits, 8 per byte (LSB first), with torch ops."""
    bits = torch.nn.functional.pad(negative.to(torch.uint8), (0, -negative.numel() % 8)).view(-1, 8)
    return (bits << torch.arange(8, dtype=torch.uint8, device=bits.device)).sum(1, dtype=torch.uint8)


def torch_onebit(g: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """1-bit SGD (Seide et al. 2014): sign bits, the means of each side, error feedback."""
    v = g + r
    negative = v < 0
    mean_pos, mean_neg = v[~negative].mean(), v[negative].mean()
    r.copy_(v - torch.where(negative, mean_neg, mean_pos))
    return _pack_signs(negative)


def torch_scaled_sign(g: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """EF-signSGD (Karimireddy et al. 2019): (||v||_1 / d) sign(v), error feedback."""
    v = g + r
    scale = v.abs().mean()
    negative = v < 0
    r.copy_(v - torch.where(negative, -scale, scale))
    return _pack_signs(negative)


def torch_signsgd(g: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """signSGD (Bernstein et al. 2018): the sign bits (no error feedback; r unused)."""
    return _pack_signs(g < 0)


def torch_randomk(g: torch.Tensor, r: torch.Tensor, ratio: float = 0.01) -> torch.Tensor:
    """Random-k as GRACE writes it: ``torch.randperm(n)[:k]``, error feedback."""
    v = g + r
    idx = torch.randperm(v.numel(), device=v.device)[: max(1, math.ceil(ratio * v.numel()))]
    values = v[idx]
    r.copy_(v)
    r[idx] = 0
    return values


def torch_sketch(g: torch.Tensor, r: torch.Tensor, bits: int = 4, block: int = 1024) -> torch.Tensor:
    """Konečný et al.'s sketch: random signs, FWHT by reshapes (one pass per stage), stochastic
    levels between each block's min and max, one uint8 per level (no error feedback; r unused)."""
    n = g.numel()
    x = torch.nn.functional.pad(g, (0, -n % block)).view(-1, block)
    x = x * (torch.randint(0, 2, x.shape, device=x.device, dtype=torch.int8) * 2 - 1)
    h = 1
    while h < block:
        pairs = x.view(x.shape[0], -1, 2, h)
        x = torch.stack((pairs[:, :, 0] + pairs[:, :, 1], pairs[:, :, 0] - pairs[:, :, 1]), dim=2)
        h *= 2
    x = x.view(-1, block)
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    step = (hi - lo).clamp_min(1e-30) / (2 ** bits - 1)
    return torch.floor((x - lo) / step + torch.rand_like(x)).to(torch.uint8)


# ---- timing ----

@dataclass
class Row:
    device: str
    method: str
    impl: str
    numel: int
    encode_ms: float
    decode_ms: float | None
    encode_gbps: float
    payload_bytes: int
    note: str = ""


def _timer(device: torch.device, fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``fn`` in ms (CUDA events on the GPU), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    times.sort()
    return times[len(times) // 2]


#: the shared key of the codecs that need one (random-k, the sketch); encode keys differ from it
def torch_adacomp(g: torch.Tensor, r: torch.Tensor, bin_size: int = 500) -> torch.Tensor:
    """AdaComp (Chen et al. 2018): per bin H = r + g, send |H + g| >= max |H| (H != 0) as
    int32 index with the sign in the low bit, one mean |H| scale per bin; error feedback."""
    h = g + r
    n = h.numel()
    pad = (-n) % bin_size
    hb = torch.nn.functional.pad(h, (0, pad)).view(-1, bin_size)
    gb = torch.nn.functional.pad(g, (0, pad)).view(-1, bin_size)
    sel = (hb != 0) & ((hb + gb).abs() >= hb.abs().amax(1, keepdim=True))
    scale = (hb.abs() * sel).sum(1) / sel.sum(1).clamp_min(1)
    decoded = (torch.sign(hb) * scale[:, None] * sel).view(-1)[:n]
    r.copy_(h - decoded)
    idx = torch.nonzero(sel.view(-1)[:n]).view(-1)
    return torch.cat([((idx << 1) | (h[idx] < 0)).int(), scale.view(torch.int32)])


def torch_graddrop(g: torch.Tensor, r: torch.Tensor, ratio: float = 0.01, layers: int = 8) -> torch.Tensor:
    """Gradient Dropping (Aji & Heafield 2017): g' = g + r normalized by each layer's max |g'|
    (``layers`` equal parts here), one threshold from a 0.1% random sample, error feedback."""
    v = g + r
    y = torch.cat([part / part.abs().max() for part in v.chunk(layers)])
    a = y.abs()
    sample = a[torch.randint(0, a.numel(), (max(1, a.numel() // 1000),), device=a.device)]
    thr = torch.topk(sample, max(1, math.ceil(ratio * sample.numel())), sorted=False)[0].min()
    idx = torch.nonzero(a >= thr).view(-1)
    values = v[idx].half()
    r.copy_(v)
    r[idx] -= values.float()
    return torch.cat([idx.int().view(torch.int16), values])


def torch_stc(g: torch.Tensor, r: torch.Tensor, ratio: float = 0.0025) -> torch.Tensor:
    """STC (Sattler et al. 2019): exact top-k, mu sign(v), error feedback; positions as
    Golomb-Rice code lengths only (the bit packing itself has no plain-torch form: the row
    times selection and ternarization, a lower bound)."""
    v = g + r
    k = max(1, math.ceil(ratio * v.numel()))
    idx = torch.sort(torch.topk(v.abs(), k, sorted=False)[1]).values
    mu = v[idx].abs().mean()
    r.copy_(v)
    r[idx] -= torch.where(v[idx] < 0, -mu, mu)
    gaps = torch.diff(idx, prepend=idx.new_full((1,), -1)) - 1
    return torch.cat([(gaps >> 8).int(), _pack_signs(v[idx] < 0).int()])


def torch_laq(g: torch.Tensor, r: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """LAQ's innovation quantizer (Sun et al. 2019) as torch ops: R = max |v|, codes
    floor((v + R) / step + 1/2) clamped to [0, 2^b - 1], packed (no error feedback; r unused)."""
    from .codecs.laq import pack_codes
    top = (1 << bits) - 1
    radius = g.abs().amax().reshape(1)
    step = (radius + radius) / top
    q = torch.floor((g + radius) / step + 0.5).clamp_(0, top)
    return torch.cat([radius.view(torch.uint8), pack_codes(q.to(torch.int32), bits)])


def torch_esgd_step(g: torch.Tensor, r: torch.Tensor, h: torch.Tensor, key: RandomKey,
                    beta: float = 0.9) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """eSGD's element-wise step as torch ops (Tao & Li 2018): a = beta r + g, |a| > mean |g|, and
    Efraimidis-Spirakis keys log(u) / (1 + H) with torch.log."""
    from .codecs.esgd import uniform
    a = torch.mul(r, beta).add_(g)
    keys = torch.log(uniform(g.numel(), key, g.device)) / (1.0 + h)
    return a, keys, a.abs() > g.abs().mean()


def _esgd_rows(device: torch.device, g: torch.Tensor, repeat: int) -> list["Row"]:
    """eSGD's element-wise step (keys, residual, threshold flags; the top-k sort of the keys is a
    torch sort either way, so it is left out of both timings): our kernel vs torch ops."""
    from .codecs.esgd import momentum_step
    from .codecs.sign import ScaledSignCodec
    numel, gb = g.numel(), 4 * g.numel() / 1e9
    r, h, a = torch.zeros_like(g), torch.zeros_like(g), torch.empty_like(g)
    step = iter(range(1 << 30))
    ours = _timer(device, lambda: momentum_step(g, r, h, 0.9, ScaledSignCodec().local_scales(g),
                                                RandomKey(1, next(step), 0), a), repeat)
    base = _timer(device, lambda: torch_esgd_step(g, r, h, RandomKey(1, next(step), 0)), repeat)
    k = 8 * max(1, math.ceil(0.125 * numel))
    note = "element-wise step only"
    return [Row(device.type, "esgd-step-12.5%", "hvd_compress", numel, ours, None, gb / (ours / 1000), k, note),
            Row(device.type, "esgd-step-12.5%", "plain torch", numel, base, None, gb / (base / 1000), k, note)]


_SHARED = RandomKey(2, 0, 0)


def _codecs() -> dict[str, tuple[Callable[[], Codec], Callable, bool]]:
    """method -> (our codec factory, plain-torch baseline, error feedback).  Imported lazily so
    the benchmark still runs when a codec module is missing from an older install."""
    from .codecs.qsgd import QSGDCodec
    from .codecs.topk import TopKCodec
    from .codecs.fp16 import StochasticFP16Codec
    from .codecs.laq import InnovationCodec
    from .codecs.randk import RandomKCodec
    from .codecs.sign import OneBitCodec, ScaledSignCodec, SignCodec
    from .codecs.sketch import SketchCodec
    from .codecs.ternary import AdaCompCodec, STCCodec
    from .codecs.topk import GradDropCodec
    layers = [torch.Size([-(-_BENCH_NUMEL[0] // 8)])] * 8
    return {
        "terngrad": (lambda: TernGradCodec(), torch_terngrad, True),
        "qsgd-4bit": (lambda: QSGDCodec(bits=4, bucket_size=512), torch_qsgd, True),
        "fp16-stochastic": (lambda: StochasticFP16Codec(), torch_fp16, True),
        "topk-1%-sampled": (lambda: TopKCodec(ratio=0.01), torch_dgc, True),
        "topk-1%-exact": (lambda: TopKCodec(ratio=0.01, mode="exact"), torch_topk, True),
        "onebit": (lambda: OneBitCodec(), torch_onebit, True),
        "ef-signsgd": (lambda: ScaledSignCodec(), torch_scaled_sign, True),
        "signsgd": (lambda: SignCodec(), torch_signsgd, False),
        "randomk-1%": (lambda: RandomKCodec(ratio=0.01).with_shared_key(_SHARED), torch_randomk, True),
        "sketch-4bit": (lambda: SketchCodec(bits=4).with_shared_key(_SHARED), torch_sketch, False),
        "adacomp-500": (lambda: AdaCompCodec(bin_size=500), torch_adacomp, True),
        "graddrop-1%": (lambda: GradDropCodec().with_layout(layers[:7] + [torch.Size(
            [_BENCH_NUMEL[0] - 7 * layers[0][0]])]), torch_graddrop, True),
        "stc-0.25%": (lambda: STCCodec(), torch_stc, True),
        "laq-8bit": (lambda: InnovationCodec(bits=8), torch_laq, False),
    }


#: the size being benchmarked (Gradient Dropping's layout of 8 equal layers depends on it)
_BENCH_NUMEL = [10_000_000]


def bench_device(device: torch.device, numel: int, repeat: int, methods: list[str] | None) -> list[Row]:
    _BENCH_NUMEL[0] = numel
    gen = torch.Generator(device="cpu").manual_seed(0)
    g = torch.randn(numel, generator=gen).to(device)
    rows: list[Row] = []
    gb = 4 * numel / 1e9
    # the memory a codec can hope for: what a copy into a buffer in use moves (read + write) per
    # second, same threads (clone() would time fresh pages being faulted in, not the copy)
    spare = torch.empty_like(g)
    copy_ms = _timer(device, lambda: spare.copy_(g), repeat)
    copy_gbps = 2 * gb / (copy_ms / 1000)
    for method, (factory, baseline, ef) in _codecs().items():
        if methods and method not in methods:
            continue
        codec = factory()
        r = torch.zeros_like(g) if ef else None
        step = iter(range(1 << 30))
        encode_ms = _timer(device, lambda: codec.encode(g, RandomKey(1, next(step), 0), residual=r), repeat)
        payload = codec.encode(g, RandomKey(1, 0, 0), residual=r)
        out = torch.zeros_like(g)
        decode_ms = _timer(device, lambda: codec.decode_accumulate([payload], out), repeat)
        # Bytes each call must move at least: encode+EF reads g and r and writes r and the
        # payload (encode alone: reads g, writes the payload); decode-accumulate reads the
        # payload and out and writes out.  Against the copy's bandwidth.
        enc_bw = ((12 if ef else 4) * numel + payload.nbytes) / encode_ms / 1e6
        dec_bw = (8 * numel + payload.nbytes) / decode_ms / 1e6
        note = (f"moves {enc_bw:.1f} / {dec_bw:.1f} GB/s = {100 * enc_bw / copy_gbps:.0f}% / "
                f"{100 * dec_bw / copy_gbps:.0f}% of copy{'' if ef else ', no EF'}")
        rows.append(Row(device.type, method, "hvd_compress", numel, encode_ms, decode_ms,
                        gb / (encode_ms / 1000), payload.nbytes, note))
        r = torch.zeros_like(g)
        base_ms = _timer(device, lambda: baseline(g, r), repeat)
        base_payload = baseline(g, r)
        rows.append(Row(device.type, method, "plain torch", numel, base_ms, None,
                        gb / (base_ms / 1000), base_payload.numel() * base_payload.element_size()))
    if not methods or "esgd-step-12.5%" in methods:
        rows += _esgd_rows(device, g, repeat)
    k = max(1, math.ceil(0.01 * numel))
    topk_ms = _timer(device, lambda: torch.topk(g.abs(), k, sorted=False), repeat)
    rows.append(Row(device.type, "torch.topk(|g|, 1%)", "plain torch", numel, topk_ms, None,
                    gb / (topk_ms / 1000), 0, "selection only"))
    rows.append(Row(device.type, "copy", "plain torch", numel, copy_ms, None,
                    gb / (copy_ms / 1000), 0, f"copy moves {copy_gbps:.1f} GB/s"))
    return rows


def format_rows(rows: list[Row]) -> str:
    """Table with the speed-up of hvd_compress over the plain-torch baseline of each method."""
    base = {(r.device, r.method): r for r in rows if r.impl == "plain torch"}
    header = ("device", "method", "impl", "encode+EF ms", "decode ms", "GB/s in", "payload MB", "speed-up")
    lines = [header]
    for r in rows:
        speedup = ""
        if r.impl == "hvd_compress" and (r.device, r.method) in base:
            speedup = f"{base[(r.device, r.method)].encode_ms / r.encode_ms:.1f}x {r.note}".strip()
        lines.append((r.device, r.method, r.impl, f"{r.encode_ms:.2f}",
                      "" if r.decode_ms is None else f"{r.decode_ms:.2f}", f"{r.encode_gbps:.2f}",
                      f"{r.payload_bytes / 1e6:.2f}" if r.payload_bytes else "", speedup or r.note))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in lines]
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="hvd_compress codec benchmark")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="cpu")
    parser.add_argument("--numel", type=int, help="elements (default 10M on CPU, 100M on GPU)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--methods", nargs="*", help="subset of methods to run")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    rows: list[Row] = []
    for name in devices:
        if name == "cuda":
            from .backends import cuda
            if not cuda.available():
                raise SystemExit("--device cuda needs a CUDA device and CuPy")
        numel = args.numel or (100_000_000 if name == "cuda" else 10_000_000)
        print(f"[bench] {name}: {numel:,} fp32 elements, threads={torch.get_num_threads()}", flush=True)
        rows += bench_device(torch.device(name), numel, args.repeat, args.methods)
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
