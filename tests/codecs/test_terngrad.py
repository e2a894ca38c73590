"""TernGrad (Wen et al., NeurIPS 2017): the paper's properties on the CPU path, clipping, shared
scales, the wire format; CUDA == CPU and golden vectors through the shared contract."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import hvd_compress
from hvd_compress.codecs.base import RandomKey
from hvd_compress.codecs.terngrad import TernGradCodec

import batch_contract as batch
from quant_contract import KEY, CodecContract, chi2_check, contract_sum, payload_equal, repeat_draws

# (recorded in the golden file with the paper's clip; the default's clip goes through the same
# kernels, and test_emulator.py holds CUDA == C for it)
CASES = {"layer": TernGradCodec(clip=2.5), "noclip": TernGradCodec(clip=None),
         "bucket64": TernGradCodec(bucket_size=64, clip=2.5)}


class TestTernGrad(CodecContract):
    cases = CASES
    golden_file = "terngrad_golden.npz"

    def wire_bytes(self, codec: TernGradCodec, n: int) -> int:
        return -(-n // 4) + 4 * codec.n_scales(n)


def test_wire_sizes() -> None:
    x = torch.randn(1000)
    assert TernGradCodec().encode(x).nbytes == 250 + 4
    assert TernGradCodec(bucket_size=64).encode(x).nbytes == 250 + 16 * 4
    assert TernGradCodec().encode(torch.randn(1)).nbytes == 1 + 4
    assert TernGradCodec().encode(torch.randn(0)).nbytes == 0


def test_wire_format() -> None:
    """2-bit codes, element i at bits 2 (i % 4) of byte i // 4: 00 = 0, 01 = +s, 10 = -s."""
    torch.manual_seed(0)
    codec = TernGradCodec(bucket_size=64, clip=None)
    x = torch.randn(1001)
    p = codec.encode(x, KEY)
    b = p.parts["codes"].numpy()
    codes = ((b[:, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3).reshape(-1)
    assert not (codes == 3).any() and not codes[1001:].any()          # padding bits are 0
    codes = codes[:1001]
    s = p.parts["scales"].numpy().repeat(64)[:1001]
    expected = np.where(codes == 1, s, np.where(codes == 2, -s, 0)).astype(np.float32)
    assert np.array_equal(codec.decode(p).numpy(), expected)
    assert np.array_equal(np.sign(expected[codes > 0]), np.sign(x.numpy()[codes > 0]))


@pytest.mark.parametrize("bucket", [None, 100])
def test_unbiased_and_variance(bucket: int | None) -> None:
    """E[ternarize(g)] = g and E[(ternarize(g)_i - g_i)^2] = |g_i| (s - |g_i|), s = max |g| (per
    tensor or bucket; no clipping).  The variance check: T = sum of squared errors over all
    draws and elements has mean K sum_i sigma_i^2 and variance K sum_i p(1-p)((s-a)^2 - a^2)^2
    (a = |g_i|, p = a / s): accepted within 6 standard deviations."""
    torch.manual_seed(1)
    draws, g = 1000, torch.randn(1000)
    codec = TernGradCodec(bucket_size=bucket, clip=None)
    d = repeat_draws(codec, g, draws)
    a = g.abs().double()
    s = a.max() if bucket is None else a.view(-1, bucket).amax(1).repeat_interleave(bucket)
    var = a * (s - a)
    chi2_check(d, g, var)
    p = a / s
    total = float(((d.double() - g.double()) ** 2).sum())
    sd = float((draws * p * (1 - p) * ((s - a) ** 2 - a ** 2) ** 2).sum()) ** 0.5
    assert abs(total - draws * float(var.sum())) < 6 * sd


def test_scale_is_max_abs() -> None:
    torch.manual_seed(2)
    g = torch.randn(1000)
    assert TernGradCodec(clip=None).local_scales(g).item() == g.abs().max().item()
    assert torch.equal(TernGradCodec(bucket_size=100, clip=None).local_scales(g),
                       g.abs().view(10, 100).amax(1))


@pytest.mark.parametrize("clip", [1.0, 2.5])
@pytest.mark.parametrize("bucket", [None, 512])
def test_clipping_threshold_in_contract_order(bucket: int | None, clip: float) -> None:
    """s = min(max |g|, clip sigma), sigma^2 = sum (g - mean)^2 / n with both sums in the
    contract's order (3 chunks of 8192 here), bit for bit; clipped elements always encode as
    sign(g) s (probability 1)."""
    torch.manual_seed(3)
    n = 3 * 8192 + 5
    g = torch.randn(n) * torch.rand(n) ** 4                       # heavy tails: clipping bites
    x = g.numpy()
    mean = contract_sum(x) / np.float32(n)
    d = x - mean
    t = np.float32(clip) * np.sqrt(contract_sum(d * d) / np.float32(n))
    codec = TernGradCodec(bucket_size=bucket, clip=clip)
    a = np.abs(x)
    maxabs = a.max() if bucket is None else np.pad(a, (0, -n % 512)).reshape(-1, 512).max(1)
    expected = np.minimum(maxabs, t).astype(np.float32).reshape(-1)
    assert np.array_equal(codec.local_scales(g).numpy(), expected)
    assert (np.abs(x) > t).sum() > 10
    clipped = torch.from_numpy(np.abs(x) >= t)
    decoded = codec.decode(codec.encode(g, KEY))
    assert torch.equal(decoded[clipped], torch.sign(g[clipped]) * float(t))


def test_default_clip_minimizes_the_error() -> None:
    """The default c = 1 (the paper: 2.5) minimizes E||C(g) - g||^2 = variance + bias^2 over c
    for Gaussian, Laplace and Student-t(3) entries, measured on the codec (16 keys each), and
    gives about a fourth of the paper's error on Gaussian entries."""
    assert TernGradCodec().clip == 1.0
    gen = torch.Generator().manual_seed(6)
    entries = {"gauss": torch.randn(1 << 15, generator=gen),
               "laplace": torch.distributions.Laplace(0.0, 1.0).sample((1 << 15,)),
               "t3": torch.distributions.StudentT(3.0).sample((1 << 15,))}
    for name, g in entries.items():
        error = {}
        for c in (0.5, 0.75, 1.0, 1.25, 1.5, 2.5):
            codec = TernGradCodec(clip=c)
            error[c] = sum(float(((codec.decode(codec.encode(g, RandomKey(seed=k, step=0, tensor_id=0))) - g) ** 2)
                                 .sum()) for k in range(16)) / (16 * float(g.var() * g.numel()))
        assert min(error, key=error.get) in (1.0, 1.25) and error[1.0] < error[0.75], (name, error)
        if name == "gauss":
            assert 0.24 < error[1.0] < 0.30 and 0.95 < error[2.5] < 1.07, error


def test_constant_tensor_is_not_clipped_to_zero() -> None:
    """sigma = 0 (a constant tensor, a single element): clipping at 0 would erase it."""
    for x in (torch.full((100,), -0.3), torch.tensor([2.0])):
        assert torch.equal(TernGradCodec().decode(TernGradCodec().encode(x, KEY)), x)


def test_shared_scales() -> None:
    """Codes of every worker against one scale, e.g. the max of the workers' local scales:
    still unbiased (variance |g| (s' - |g|)); elements beyond the shared scale saturate."""
    torch.manual_seed(4)
    g, draws = torch.randn(512), 1000
    codec = TernGradCodec(bucket_size=128, clip=None)
    local = codec.local_scales(g)
    shared = codec.with_scales(local * 2)
    p = shared.encode(g, KEY)
    assert torch.equal(p.parts["scales"], local * 2)
    rows = repeat_draws(codec.with_scales(local.repeat(draws) * 2), g, draws)
    s = (local * 2).double().repeat_interleave(128)
    chi2_check(rows, g, g.abs().double() * (s - g.abs().double()))
    small = codec.with_scales(torch.full((4,), 0.5))
    big = g.abs() > 0.5
    assert torch.equal(small.decode(small.encode(g, KEY))[big], torch.sign(g[big]) * 0.5)
    with pytest.raises(ValueError):
        codec.with_scales(torch.ones(3)).encode(g)


def test_local_scales_include_the_residual() -> None:
    torch.manual_seed(5)
    g, r = torch.randn(3000), torch.randn(3000)
    for codec in CASES.values():
        assert torch.equal(codec.local_scales(g, r), codec.encode(g + r, KEY).parts["scales"])


@pytest.mark.parametrize("kwargs", [{"bucket_size": 6}, {"bucket_size": 0}, {"clip": 0.0},
                                    {"clip": -1.0}])
def test_bad_options(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        TernGradCodec(**kwargs)


def test_auto_clip_fits_the_number_of_workers() -> None:
    """TernGrad()'s clip minimizes bias^2 + variance/N of the N workers' average (the clipping
    bias stays, the variance averages out): measured on the codec with N independent keys, it
    matches the closed form on Gaussian entries and beats both fixed clips there; on heavier
    tails (Laplace, Student-t(3)) it beats the one-worker optimum (1 sigma) at every N and
    stays within 1.25x of the better of 1 and 2.5 sigma."""
    from hvd_compress.codecs.terngrad import clip_error, optimal_clip
    assert [optimal_clip(n) for n in (1, 2, 8, 32)] == [1.017, 1.229, 1.686, 2.151]
    assert hvd_compress.TernGrad().codec_at(0, 8).clip == optimal_clip(8)
    assert hvd_compress.TernGrad(clip=2.5).codec_at(0, 8).clip == 2.5
    gen = torch.Generator().manual_seed(6)
    entries = {"gauss": torch.randn(1 << 14, generator=gen),
               "laplace": torch.distributions.Laplace(0.0, 1.0).sample((1 << 14,)),
               "t3": torch.distributions.StudentT(3.0).sample((1 << 14,))}
    for name, g in entries.items():
        for n in (2, 8, 32):
            error = {}
            for c in ("auto", 1.0, 2.5):
                codec = TernGradCodec(clip=optimal_clip(n) if c == "auto" else c)
                total = 0.0
                for k in range(4):
                    avg = sum(codec.decode(codec.encode(g, RandomKey(seed=1000 * k + r, step=0, tensor_id=0)))
                              for r in range(n)) / n
                    total += float(((avg - g) ** 2).sum())
                error[c] = total / (4 * float((g ** 2).sum()))
            if name == "gauss":
                assert abs(error["auto"] / clip_error(optimal_clip(n), n) - 1) < 0.05, (n, error)
                assert error["auto"] < min(error[1.0], error[2.5]), (n, error)
            else:
                assert error["auto"] < error[1.0] and error["auto"] < 1.25 * min(error[1.0], error[2.5]), (name, n, error)


# ---- a bucket's tensors in one call (encode_many / decode_many) ---------------------------------

@pytest.mark.parametrize("threads", ["1", "3"])
@pytest.mark.parametrize("clip", [1.23, None])
@pytest.mark.parametrize("ef", [True, False])
def test_encode_many_is_each_encode_bit_for_bit(monkeypatch, threads, clip, ef) -> None:
    monkeypatch.setenv("HVD_COMPRESS_CPU_THREADS", threads)
    batch.check_encode_many(monkeypatch, TernGradCodec(clip=clip), ef, "hvdc_tern_encode_many")


def test_decode_many_is_each_decode_bit_for_bit() -> None:
    batch.check_decode_many(TernGradCodec(), TernGradCodec())


def test_encode_many_falls_back_where_one_call_does_not_apply() -> None:
    """Per-bucket scales, shared scales and keys of different steps are encoded one by one: still
    each tensor's own encode."""
    x, segments = batch.awkward_bucket()
    by_step = [(o, n, RandomKey(7, j, 1)) for j, (o, n, _) in enumerate(segments)]
    for codec, segs in [(TernGradCodec(bucket_size=64), segments), (TernGradCodec(), by_step)]:
        assert all(payload_equal(a, b) for a, b in zip(codec.encode_many(x, segs, None),
                                                       batch.each(codec, x, segs, None)))
    assert TernGradCodec().with_scales(torch.ones(1))._batched([4, 4]) is False


@pytest.mark.parametrize("clip", [1.23, None])
def test_encode_many_on_the_device_is_the_hosts_bit_for_bit(clip, kernels) -> None:
    batch.check_many_on_device(TernGradCodec(clip=clip), kernels, ef=True)


def test_batched_calls_check_what_they_read_through_raw_pointers() -> None:
    """An fp64 input, an fp16 residual, overlapping segments or an fp64 output are refused before
    anything is read or written (the batched calls take all segments at once)."""
    x, segments = batch.awkward_bucket()
    codec, key = TernGradCodec(), RandomKey(1, 2, 3)
    with pytest.raises(ValueError, match="input must be a contiguous fp32"):
        codec.encode_many(x.double(), segments, None)
    with pytest.raises(ValueError, match="residual must be a contiguous fp32"):
        codec.encode_many(x, segments, torch.zeros(x.numel(), dtype=torch.float16))
    with pytest.raises(ValueError, match="overlaps"):
        codec.encode_many(x, [(0, 100, key), (50, 100, key)], None)
    payloads = [[p] for p in codec.encode_many(x, segments, None)]
    with pytest.raises(ValueError, match="out must be a contiguous fp32"):
        codec.decode_many(payloads, torch.zeros(x.numel(), dtype=torch.float64), segments)
