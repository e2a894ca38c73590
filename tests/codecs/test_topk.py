"""Top-k sparsifier (hvd_compress/codecs/topk.py): the selection rules against an independent
NumPy reference of the documented algorithm, error feedback, wire format, decode order, edge
cases, golden vectors; and, on a GPU, CUDA == CPU bit for bit."""
from __future__ import annotations

import contextlib
import math
from itertools import accumulate

import numpy as np
import pytest
import torch

import gen_golden_topk as golden
from hvd_compress.codecs import topk
from hvd_compress.codecs.base import Payload, RandomKey
from hvd_compress.codecs.rng import random_u32
from hvd_compress.codecs.topk import TopKCodec, ceil_ratio, sample_plan

N = 300_000          # > 33 * 64 / 0.01: the threshold sample is strided (stride 33)
KEY = RandomKey(seed=1234, step=7, tensor_id=3)


def make(kind: str, n: int = N, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(n, generator=gen)
    if kind == "heavy":
        return torch.randn(n, generator=gen) / torch.randn(n, generator=gen)
    if kind == "ties":
        return torch.randint(-3, 4, (n,), generator=gen).float()
    if kind == "equal":
        return torch.full((n,), 0.5)
    if kind == "mostly_zeros":                    # fewer nonzeros than 0.8 k
        x = torch.zeros(n)
        x[torch.randperm(n, generator=gen)[: n // 400]] = torch.randn(n // 400, generator=gen)
        return x
    raise ValueError(kind)


def philox_word0(key: RandomKey) -> int:
    return int(random_u32(1, key)[0]) & 0xFFFFFFFF


def reference(codec: TopKCodec, g: torch.Tensor, r: torch.Tensor | None, key: RandomKey):
    """The documented algorithm in NumPy: (indices, fp32 values before the wire cast, g')."""
    gp = (g + r if r is not None else g).numpy().astype(np.float32)
    n, a = gp.size, np.abs(gp)
    k = codec.k(n)
    if codec.mode == "threshold":
        levels = [np.float32(codec.threshold)]
    else:
        stride, m = sample_plan(n, codec.ratio, codec.sample_ratio)
        start = philox_word0(key) * stride >> 32
        sample = a[start::stride][:m]
        t = ceil_ratio(codec.ratio, m)
        thr = np.sort(sample)[::-1][(min(m, math.ceil(1.25 * t - 1e-9)) if codec.exact_k else t) - 1]
        levels = [max(np.float32(thr) * np.float32(0.8 ** l), np.float32(2.0 ** -149))
                  for l in range(8)] + ([np.float32(0)] if codec.exact_k else [])
    lo = k if codec.exact_k else math.ceil(0.8 * k - 1e-9)
    hi = k if codec.exact_k else math.floor(1.3 * k + 1e-9)
    counts = [int((a >= t).sum()) for t in levels]
    level = next((l for l, c in enumerate(counts) if c >= lo), len(levels) - 1)
    sel = np.flatnonzero(a >= levels[level])
    if codec.mode == "threshold" or sel.size <= hi:
        return sel, gp[sel], gp
    if codec.exact_k:
        order = np.lexsort((sel, -a[sel]))          # by |g'| descending, then index ascending
        sel = np.sort(sel[order[:k]])
        return sel, gp[sel], gp
    # sampled, too many at the chosen level: the lowest level above it with <= hi entries (the
    # upward levels thr * 1.25^u, or +inf), then the band below it in index order up to k
    above = [max(np.float32(thr) * np.float32(1.25 ** u), np.float32(2.0 ** -149))
             for u in range(8, 0, -1)][::-1]        # thr 1.25, ..., thr 1.25^8
    if level > 0:
        upper = levels[level - 1]
    else:
        upper = next((t for t in above if (a >= t).sum() <= hi), np.float32(np.inf))
    lower = levels[level] if level > 0 else max([t for t in [levels[0]] + above if t < upper])
    sure = np.flatnonzero(a >= upper)
    band = np.flatnonzero((a >= lower) & (a < upper))
    sel = np.sort(np.concatenate([sure, band[:max(k - sure.size, 0)]]))
    return sel, gp[sel], gp


def wire(values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    v = torch.from_numpy(values)
    return v.clamp(-65504, 65504).half() if dtype == torch.float16 else v


def assert_payload_matches_reference(codec, g, r0, key):
    r = r0.clone() if r0 is not None else None
    p = codec.encode(g, key, residual=r)
    sel, vals, gp = reference(codec, g, r0, key)
    assert list(p.parts) == ["indices", "values"]
    np.testing.assert_array_equal(p.parts["indices"].numpy(), sel)
    expected = wire(vals, codec.value_dtype)
    assert p.parts["values"].dtype == codec.value_dtype
    assert torch.equal(p.parts["values"].view(torch.int16 if expected.dtype == torch.float16
                                                else torch.int32),
                       expected.view(torch.int16 if expected.dtype == torch.float16 else torch.int32))
    if r is not None:       # r = g' off the selection, g' - D(C(g')) on it
        rest = gp.copy()
        rest[sel] = vals - expected.float().numpy()
        np.testing.assert_array_equal(r.numpy(), rest)
    return p


# ---- selection rules ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["normal", "heavy", "ties", "equal", "mostly_zeros"])
@pytest.mark.parametrize("kwargs", [dict(), dict(exact_k=True), dict(mode="exact"),
                                    dict(value_dtype=torch.float32, ratio=0.003)])
def test_matches_reference_and_count_bounds(kind, kwargs):
    codec = TopKCodec(**kwargs)
    g = make(kind)
    r0 = torch.zeros(N) if kind in ("equal", "mostly_zeros") else make("normal", seed=1) * 0.01
    p = assert_payload_matches_reference(codec, g, r0, KEY)
    count, k = p.parts["indices"].numel(), codec.k(N)
    nonzero = int(((g + r0) != 0).sum())
    if codec.exact_k:
        assert count == k
    elif nonzero >= k:
        assert math.ceil(0.8 * k) <= count <= math.floor(1.3 * k)
    else:
        assert count == nonzero
    assert p.nbytes == count * (2 if codec.value_dtype == torch.float16 else 4) + 4 * count


@pytest.mark.parametrize("kind", ["normal", "heavy", "ties", "equal", "mostly_zeros"])
def test_exact_is_the_top_k_by_magnitude_lower_index_first(kind):
    g = make(kind, n=20_011)
    p = TopKCodec(ratio=0.01, mode="exact", value_dtype=torch.float32).encode(g, KEY)
    idx = p.parts["indices"].long()
    k = math.ceil(0.01 * g.numel())
    assert idx.numel() == k and bool((idx[1:] > idx[:-1]).all())
    chosen = torch.zeros(g.numel(), dtype=torch.bool)
    chosen[idx] = True
    a = g.abs()
    assert a[chosen].min() >= a[~chosen].max()
    boundary = a[chosen].min()                     # among ties at the boundary: lower index first
    tied_out = torch.nonzero(~chosen & (a == boundary))
    if tied_out.numel():
        assert int(idx[a[idx] == boundary].max()) < int(tied_out.min())


def test_variable_count_is_a_threshold_set():
    g = make("heavy", seed=5)
    p = TopKCodec(ratio=0.02).encode(g, KEY)
    chosen = torch.zeros(N, dtype=torch.bool)
    chosen[p.parts["indices"].long()] = True
    assert g.abs()[chosen].min() >= g.abs()[~chosen].max()


def plant_sample(top: float, others: float, n_others: int, codec: TopKCodec) -> torch.Tensor:
    """Noise, with the threshold sample's top t positions at `top` and n_others unsampled
    positions at `others`: the sampled threshold is `top` and selects too few."""
    stride, m = sample_plan(N, codec.ratio, codec.sample_ratio)
    start = philox_word0(KEY) * stride >> 32
    g = make("normal", seed=3) * 0.1
    sampled = start + stride * torch.arange(m)
    g[sampled[: ceil_ratio(codec.ratio, m)]] = top
    unsampled = torch.ones(N, dtype=torch.bool)
    unsampled[sampled] = False
    g[torch.nonzero(unsampled).flatten()[:: 37][:n_others]] = others
    return g


@pytest.mark.parametrize("others, level", [(8.5, 1), (3.0, 6)])
def test_threshold_lowered_by_0_8_until_enough(others, level):
    codec = TopKCodec()
    g = plant_sample(10.0, others, 2600, codec)
    p = assert_payload_matches_reference(codec, g, None, KEY)
    assert p.parts["indices"].numel() == 2600 + ceil_ratio(0.01, sample_plan(N, 0.01, 0.01)[1])
    assert float(g.abs()[p.parts["indices"].long()].min()) == others
    assert 10.0 * 0.8 ** level <= others < 10.0 * 0.8 ** (level - 1)


def test_an_overshooting_round_fills_its_band_in_index_order():
    """thr selects too few, thr * 0.8 far more than hi: everything >= thr is sent, then the
    lowest-index entries of [0.8 thr, thr) until k are sent; the rest stays in the residual."""
    codec = TopKCodec()
    g = plant_sample(10.0, 8.5, 6000, codec)
    p = assert_payload_matches_reference(codec, g, torch.zeros(N), KEY)
    r = torch.zeros(N)
    assert torch.equal(codec.encode(g, KEY, residual=r).parts["indices"], p.parts["indices"])
    idx, k = p.parts["indices"].long(), codec.k(N)
    tops = torch.nonzero(g == 10.0).flatten()
    band = torch.nonzero(g == 8.5).flatten()
    assert idx.numel() == k and set(tops.tolist()) <= set(idx.tolist())
    assert torch.equal(idx[g[idx] == 8.5], band[:k - tops.numel()])
    assert bool((r[band[k - tops.numel():]] == 8.5).all())


def test_threshold_mode_sends_every_element_above_tau():
    g, r = make("normal"), torch.zeros(N)
    p = assert_payload_matches_reference(TopKCodec(mode="threshold", threshold=2.5), g, r, KEY)
    assert p.parts["indices"].numel() == int((g.abs() >= 2.5).sum())
    assert TopKCodec(mode="threshold", threshold=1e9).encode(g, KEY).parts["indices"].numel() == 0


@pytest.mark.parametrize("threads", ["1", "3"])
def test_independent_of_threads_and_candidate_buffers(monkeypatch, threads):
    g, r0 = make("heavy", seed=9), make("normal", seed=2)
    codec = TopKCodec(ratio=0.02)
    r1 = r0.clone()
    p1 = codec.encode(g, KEY, residual=r1)
    monkeypatch.setenv("HVD_COMPRESS_CPU_THREADS", threads)
    monkeypatch.setattr(topk, "_CPU_BUFFER", 0)       # every chunk rescanned in the compact pass
    r2 = r0.clone()
    p2 = codec.encode(g, KEY, residual=r2)
    for name in p1.parts:
        assert torch.equal(p1.parts[name], p2.parts[name])
    assert torch.equal(r1, r2)


def bucket(scale: int) -> tuple[torch.Tensor, list[tuple[int, int, RandomKey]]]:
    """A bucket of awkward tensors (sizes / scale): normal, all equal, heavy-tailed with a spike,
    integer ties, one element, mostly zeros; and its segments (offset, numel, key)."""
    parts = [make("normal", 40_000 // scale, seed=1), make("equal", 5000 // scale),
             make("heavy", 70_001 // scale, seed=2), make("ties", 9000 // scale, seed=3),
             torch.tensor([3.0]), make("mostly_zeros", 30_000 // scale, seed=4)]
    parts[2][:300 // scale] *= 1e3
    offsets = [0, *accumulate(p.numel() for p in parts)]
    return torch.cat(parts), [(offsets[j], p.numel(), RandomKey(5, 6, 10 + j)) for j, p in enumerate(parts)]


@pytest.mark.parametrize("threads", ["1", "3"])
@pytest.mark.parametrize("kwargs", [dict(), dict(value_dtype=torch.float32, ratio=0.003)])
@pytest.mark.parametrize("ef", [True, False])
def test_encode_many_is_each_encode_bit_for_bit(monkeypatch, threads, kwargs, ef):
    """A bucket's tensors in two C calls (the host's one call per bucket) give each tensor's own
    payload and residual, including tensors whose count at thr is out of range (ties, a spike)
    and tiny ones."""
    monkeypatch.setenv("HVD_COMPRESS_CPU_THREADS", threads)
    calls = []
    real_call = topk.cpu.call
    monkeypatch.setattr(topk.cpu, "call", lambda name, *args: (calls.append(name), real_call(name, *args)))
    x, segments = bucket(scale=1)
    codec = TopKCodec(**kwargs)
    r_many = make("normal", x.numel(), seed=9) * 0.1 if ef else None
    r_each = r_many.clone() if ef else None
    many = codec.encode_many(x, segments, r_many)
    assert calls == ["hvdc_topk_select_many", "hvdc_topk_compact_many"]
    each = [codec.encode(x[o:o + n], key, residual=None if r_each is None else r_each[o:o + n])
            for o, n, key in segments]
    for a, b in zip(many, each):
        assert a.numel == b.numel and all(torch.equal(a.parts[q], b.parts[q]) for q in a.parts)
    assert not ef or torch.equal(r_many, r_each)
    with pytest.raises(ValueError, match="outside"):
        codec.encode_many(x, segments + [(x.numel() - 1, 2, RandomKey(5, 6, 0))], r_many)


def test_decode_many_is_each_decode_bit_for_bit():
    """A bucket's segments decoded in one C call: the per-segment decode's sums (workers in list
    order), padding skipped; a bad index anywhere raises before anything is written."""
    codec = TopKCodec(ratio=0.05)
    sizes = [4000, 1, 9000, 3000]
    offsets = [0, 4000, 4001, 13_001]
    payloads = [[codec.encode(make("heavy", n, seed=10 * w + j), RandomKey(w, 1, j)) for w in range(3)]
                for j, n in enumerate(sizes)]
    payloads[2][1] = Payload(9000, {"indices": torch.cat([payloads[2][1].parts["indices"],
                                                          torch.full((5,), 9000, dtype=torch.int32)]),
                                    "values": torch.cat([payloads[2][1].parts["values"],
                                                         torch.zeros(5, dtype=torch.float16)])})
    out, ref = make("normal", 16_001, seed=3), make("normal", 16_001, seed=3)
    codec.decode_many(payloads, out, list(zip(offsets, sizes)))
    for (o, n), ps in zip(zip(offsets, sizes), payloads):
        codec.decode_accumulate(ps, ref[o:o + n])
    assert torch.equal(out, ref)
    payloads[3][2] = payload(3000, [5, 3000, 7], [1.0, 0.0, 2.0])
    before = out.clone()
    with pytest.raises(IndexError, match="worker 2.*index 7"):
        codec.decode_many(payloads, out, list(zip(offsets, sizes)))
    assert torch.equal(out, before)


def test_sample_plan():
    for n in (1, 5, 6400, 6401, 211_200, 211_201, 10_000_000):
        stride, m = sample_plan(n, 0.01, 0.01)
        want = min(n, max(math.ceil(0.01 * n), 6400))
        assert stride % 32 == 1 and m == n // stride >= want
        assert (stride == 1) == (n < 33 * want)
        assert (stride - 1) + (m - 1) * stride < n          # the largest start still fits
    assert ceil_ratio(0.07, 100) == 7 and TopKCodec(ratio=0.07).k(100) == 7
    assert TopKCodec(ratio=0.001).k(10) == 1 and TopKCodec().k(0) == 0


# ---- error feedback, wire format, decode -------------------------------------------------------

@pytest.mark.parametrize("value_dtype", [torch.float32, torch.float16])
def test_error_feedback_invariant(value_dtype):
    """g + r_old == D(C(g')) + r_new exactly (fp16: g' - fp16(g') is exact in fp32)."""
    codec = TopKCodec(value_dtype=value_dtype)
    g, r = make("normal"), make("heavy", seed=4) * 0.01
    r_old = r.clone()
    for step in range(3):
        p = codec.encode(g, RandomKey(1, step), residual=r)
        assert torch.equal(codec.decode(p) + r, g + r_old)
        r_old = r.clone()
    if value_dtype == torch.float32:
        assert bool((r[p.parts["indices"].long()] == 0).all())


def test_fp16_saturates_and_error_feedback_keeps_the_excess():
    g, r = torch.tensor([1e6, -7e4, 1.0, 0.5]), torch.zeros(4)
    p = TopKCodec(ratio=0.5).encode(g, KEY, residual=r)
    assert p.parts["indices"].tolist() == [0, 1]
    assert p.parts["values"].tolist() == [65504.0, -65504.0]
    assert r.tolist() == [1e6 - 65504, -7e4 + 65504, 1.0, 0.5]


def test_fp16_conversion_is_round_to_nearest_even():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20_000, generator=gen) * 10.0 ** torch.randint(-9, 5, (20_000,), generator=gen),
                   torch.arange(-2048, 2048) * 2.0 ** -24 + 2.0 ** -25,     # subnormal ties
                   torch.tensor([65519.0, 65520.0, -65536.0, 2049.0, 2051.0])])
    p = TopKCodec(ratio=1.0, exact_k=True).encode(x, KEY)         # every element sent
    expected = x.clamp(-65504, 65504).half()
    assert torch.equal(p.parts["values"].view(torch.int16), expected.view(torch.int16))
    assert torch.equal(TopKCodec().decode(p)[p.parts["indices"].long()], expected.float())


def payload(n, idx, vals):
    return Payload(n, {"indices": torch.tensor(idx, dtype=torch.int32),
                       "values": torch.tensor(vals, dtype=torch.float32)})


def test_decode_accumulate_adds_workers_in_list_order():
    big, one = payload(3, [1], [1e8]), payload(3, [0, 1], [2.0, 1.0])
    neg = payload(3, [1, 2], [-1e8, 5.0])
    codec = TopKCodec()
    # fp32: (1e8 + -1e8) + 1 = 1, but (1 + 1e8) + -1e8 = 0
    assert codec.decode_accumulate([big, neg, one], torch.zeros(3)).tolist() == [2.0, 1.0, 5.0]
    assert codec.decode_accumulate([one, big, neg], torch.zeros(3)).tolist() == [2.0, 0.0, 5.0]
    # random payloads: bit-identical to torch index_add_ worker by worker
    gs = [make("normal", seed=s) for s in range(4)]
    payloads = [TopKCodec(ratio=0.05).encode(g, RandomKey(s)) for s, g in enumerate(gs)]
    out, ref = make("heavy", seed=8), make("heavy", seed=8)
    codec.decode_accumulate(payloads, out)
    for p in payloads:
        ref.index_add_(0, p.parts["indices"].long(), p.parts["values"].float())
    assert torch.equal(out, ref)


@pytest.mark.parametrize("idx, why", [([0, 4], "index 4"), ([-1, 2], "index -1"),
                                      ([2, 1], "index 1"), ([1, 1], "index 1"),
                                      ([3, 1], "index 1")])     # an entry after the padding
def test_decode_rejects_bad_indices_before_writing(idx, why):
    out = torch.zeros(3)
    with pytest.raises(IndexError, match=f"worker 1.*{why}"):
        TopKCodec().decode_accumulate([payload(3, [0], [1.0]), payload(3, idx, [1.0, 1.0])], out)
    assert out.tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="worker 0"):
        TopKCodec().decode_accumulate([payload(4, [0], [1.0])], out)


def test_padding_is_ignored_by_decoding():
    """A device payload's unused tail (index n, value 0) adds nothing, not even to a -0.0."""
    out = torch.tensor([-0.0, 1.0, 2.0])
    TopKCodec().decode_accumulate([payload(3, [1, 3, 3], [5.0, 0.0, 0.0]), payload(3, [3], [0.0])], out)
    assert out.tolist() == [0.0, 6.0, 2.0] and math.copysign(1.0, float(out[0])) == -1.0


# ---- edge cases --------------------------------------------------------------------------------

def test_zero_gradient_sends_nothing_unless_exact_k():
    g = torch.zeros(1000)
    p = TopKCodec().encode(g, KEY, residual=torch.zeros(1000))
    assert p.parts["indices"].numel() == 0 and p.nbytes == 0 and p.numel == 1000
    assert torch.equal(TopKCodec().decode(p), g)
    p = TopKCodec(exact_k=True).encode(g, KEY)
    assert p.parts["indices"].tolist() == list(range(10))
    assert p.parts["values"].tolist() == [0.0] * 10


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 1027, 4099])
def test_small_sizes(n):
    g = make("normal", n=n, seed=n)
    for kwargs in (dict(), dict(exact_k=True, ratio=0.3)):
        codec = TopKCodec(**kwargs)
        assert_payload_matches_reference(codec, g, torch.ones(n) * 0.125, KEY)
    assert TopKCodec().encode(g[:1], KEY).parts["indices"].tolist() == [0]


def test_empty_tensor():
    r = torch.zeros(0)
    p = TopKCodec().encode(torch.zeros(0, 3), KEY, residual=r)
    assert p.numel == 0 and p.nbytes == 0 and p.parts["values"].dtype == torch.float16
    assert TopKCodec().decode(p).numel() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_input_dtypes_encode_their_fp32_values(dtype):
    g = make("normal", n=5000).to(dtype)
    a = TopKCodec(exact_k=True).encode(g, KEY)
    b = TopKCodec(exact_k=True).encode(g.float(), KEY)
    assert all(torch.equal(a.parts[k], b.parts[k]) for k in a.parts)


def test_non_contiguous_input():
    g = make("normal", n=200 * 300).view(200, 300)
    a = TopKCodec().encode(g.t(), KEY)
    b = TopKCodec().encode(g.t().contiguous(), KEY)
    assert all(torch.equal(a.parts[k], b.parts[k]) for k in a.parts)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_raises_naming_the_tensor(bad):
    g = make("normal", n=100)
    g[17] = bad
    with pytest.raises(FloatingPointError, match="layer3.weight"):
        TopKCodec().encode(g, KEY, name="layer3.weight")


def test_deterministic_for_a_fixed_key():
    g, r0 = make("heavy"), make("normal", seed=1)
    runs = []
    for _ in range(2):
        r = r0.clone()
        runs.append((TopKCodec().encode(g, KEY, residual=r), r))
    assert all(torch.equal(runs[0][0].parts[k], runs[1][0].parts[k]) for k in runs[0][0].parts)
    assert torch.equal(runs[0][1], runs[1][1])


def test_invalid_arguments():
    for kwargs in (dict(ratio=0), dict(ratio=1.5), dict(sample_ratio=0), dict(mode="random"),
                   dict(value_dtype=torch.bfloat16), dict(mode="threshold"),
                   dict(mode="threshold", threshold=-1.0), dict(threshold=1.0),
                   dict(mode="exact", exact_k=False)):
        with pytest.raises(ValueError):
            TopKCodec(**kwargs)


# ---- golden vectors ----------------------------------------------------------------------------

def sent(p: Payload, device: bool) -> Payload:
    """A payload on the host without its padding, which must be a device payload's whole tail
    (index n, value 0) and appear on a device only."""
    idx, val = p.parts["indices"].cpu(), p.parts["values"].cpu()
    c = TopKCodec().unpadded(p).parts["indices"].numel()
    assert torch.equal(idx[c:], torch.full_like(idx[c:], p.numel)) and not val[c:].any()
    assert device or c == idx.numel(), "host payloads hold the sent entries only"
    return Payload(p.numel, {"indices": idx[:c], "values": val[:c]})


@pytest.fixture(scope="module")
def golden_arrays():
    with np.load(golden.PATH) as data:
        return {k: torch.from_numpy(data[k]) for k in data.files}


def check_golden(arrays, kernels=None):
    """The golden file reproduced by the C reference (``kernels`` None) or by the CUDA path on
    ``kernels`` (a conftest.KernelTarget)."""
    put = kernels.put if kernels is not None else (lambda t: t.clone())
    with kernels or contextlib.nullcontext():
        for name in golden.CASES:
            g = put(arrays[f"{name}/g"])
            r = put(arrays[f"{name}/r"]) if f"{name}/r" in arrays else None
            p = sent(golden.run_case(name, g, r), kernels is not None)
            assert torch.equal(p.parts["indices"], arrays[f"{name}/indices"]), name
            assert np.array_equal(golden.values_array(p.parts["values"]),
                                  arrays[f"{name}/values"].numpy()), name
            if r is not None:
                assert torch.equal(r.cpu(), arrays[f"{name}/residual"]), name
        out = golden.run_decode(put(arrays["sampled_fp16_ef/g"]), put(arrays["sampled_fp16_ef/r"]))
    assert torch.equal(out.cpu(), arrays["decode/out"])


def test_golden_cpu(golden_arrays):
    check_golden(golden_arrays)


# ---- CUDA == CPU (on a GPU, and on the emulator) ----------------------------------------------

def test_golden_cuda(golden_arrays, kernels):
    check_golden(golden_arrays, kernels)


@pytest.mark.parametrize("kind", ["normal", "heavy", "ties", "equal", "mostly_zeros"])
@pytest.mark.parametrize("kwargs", [dict(), dict(exact_k=True), dict(value_dtype=torch.float32),
                                    dict(mode="threshold", threshold=1.0), dict(ratio=0.001)])
@pytest.mark.parametrize("n", [1, 4099, N, 3_000_001])
def test_cuda_matches_cpu(kind, kwargs, n, kernels):
    codec = TopKCodec(**kwargs)
    g = make(kind, n=n, seed=n)
    r_cpu = make("normal", n=n, seed=n + 1) * 0.1
    r_gpu = kernels.put(r_cpu)
    key = RandomKey(seed=n, step=2, tensor_id=1)
    out_cpu = make("heavy", n=n, seed=3)
    out_gpu = kernels.put(out_cpu)
    p_cpu = codec.encode(g, key, residual=r_cpu)
    codec.decode_accumulate([p_cpu, p_cpu], out_cpu)
    with kernels:
        p_gpu = codec.encode(kernels.put(g), key, residual=r_gpu)
        codec.decode_accumulate([p_gpu, p_gpu], out_gpu)
    padded = codec.mode == "sampled" and not codec.exact_k
    assert p_gpu.parts["indices"].numel() == (codec.capacity(n) if padded else p_cpu.parts["indices"].numel())
    for part in p_cpu.parts:
        assert torch.equal(p_cpu.parts[part], sent(p_gpu, True).parts[part]), part
    assert torch.equal(r_cpu, r_gpu.cpu())
    assert torch.equal(out_cpu, out_gpu.cpu())


@pytest.mark.parametrize("kwargs", [dict(), dict(value_dtype=torch.float32, ratio=0.003)])
def test_encode_many_on_the_device_is_the_hosts_bit_for_bit(kwargs, kernels):
    """A bucket's tensors in one launch per kernel (segment tables, the choice per tensor on the
    device): each tensor's entries, values and residual as the host's, padded to capacity."""
    x, segments = bucket(scale=4)
    codec = TopKCodec(**kwargs)
    r_cpu = make("normal", x.numel(), seed=9) * 0.1
    r_gpu = kernels.put(r_cpu)
    host = codec.encode_many(x, segments, r_cpu)
    with kernels:
        device = codec.encode_many(kernels.put(x), segments, r_gpu)
    for (_, n, _), a, b in zip(segments, host, device):
        assert b.parts["indices"].numel() == codec.capacity(n)
        b = sent(b, True)
        assert all(torch.equal(a.parts[q], b.parts[q]) for q in a.parts)
    assert torch.equal(r_cpu, r_gpu.cpu())


def test_decode_many_on_the_device_is_the_hosts_bit_for_bit(kernels):
    """A bucket's padded device payloads decoded with one check for all: the host's sums; a bad
    index in a later segment raises, naming its worker, before anything is written."""
    x, segments = bucket(scale=4)
    codec = TopKCodec()
    workers = [codec.encode_many(x * (w + 1), segments, None) for w in range(2)]
    per_segment = [[workers[w][s] for w in range(2)] for s in range(len(segments))]
    layout = [(o, n) for o, n, _ in segments]
    host = codec.decode_many(per_segment, torch.zeros(x.numel()), layout)
    with kernels:
        dev_workers = [codec.encode_many(kernels.put(x * (w + 1)), segments, None) for w in range(2)]
        dev = [[dev_workers[w][s] for w in range(2)] for s in range(len(segments))]
        out = kernels.put(torch.zeros(x.numel()))
        codec.decode_many(dev, out, layout)
        assert torch.equal(out.cpu(), host)
        dev[-1][1] = Payload(segments[-1][1], {"indices": kernels.put(torch.tensor([3, 2], dtype=torch.int32)),
                                               "values": kernels.put(torch.ones(2, dtype=torch.float16))})
        before = out.clone()
        with pytest.raises(IndexError, match="worker 1"):
            codec.decode_many(dev, out, layout)
        assert torch.equal(out.cpu(), before.cpu())


def test_cuda_decode_rejects_bad_indices(kernels):
    p = payload(3, [0, 4], [1.0, 1.0])
    p.parts = {k: kernels.put(v) for k, v in p.parts.items()}
    out = kernels.put(torch.zeros(3))
    with kernels, pytest.raises(IndexError, match="worker 0"):
        TopKCodec().decode_accumulate([p], out)
    assert out.tolist() == [0.0, 0.0, 0.0]
