"""Sign codecs (hvd_compress/codecs/sign.py): 1-bit SGD (Seide et al. 2014), EF-signSGD's scaled
sign (Karimireddy et al. 2019), signSGD with majority vote (Bernstein et al. 2018).  Means and
scales against a NumPy model of the contract's summation order, the wire format, the error
feedback identity and what error feedback buys, the vote; CUDA == CPU and golden vectors through
the shared contract."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hvd_compress.codecs import OneBitCodec, ScaledSignCodec, SignCodec, majority_vote
from hvd_compress.codecs.sign import MajorityVoteCodec
from hvd_compress.codecs.base import RandomKey

import batch_contract as batch
from quant_contract import CodecContract, contract_sum

CASES = {"onebit": OneBitCodec(), "onebit_b64": OneBitCodec(bucket_size=64),
         "onebit_b8224": OneBitCodec(bucket_size=8224),          # > HVDC_SUM_CHUNK: two chunks
         "scaled": ScaledSignCodec(), "scaled_b96": ScaledSignCodec(bucket_size=96)}


def sign_bytes(n: int) -> int:
    return -(-n // 8)


class TestSignEF(CodecContract):
    """1-bit SGD and the scaled sign: error feedback, deterministic (no per-rank draws)."""
    cases = CASES
    golden_file = "sign_golden.npz"
    keyed = False

    def wire_bytes(self, codec, n: int) -> int:
        return sign_bytes(n) + 4 * codec._nscales * codec.n_buckets(n)


class TestSignSGD(CodecContract):
    """signSGD: the bits alone, no error feedback, zeros decode to +1."""
    cases = {"signsgd": SignCodec()}
    golden_file = "signsgd_golden.npz"
    keyed = False
    zero_decodes_to = 1.0

    def error_feedback(self, codec) -> bool:
        return False

    def wire_bytes(self, codec, n: int) -> int:
        return sign_bytes(n)


def unpack_bits(bits: torch.Tensor, n: int) -> np.ndarray:
    return np.unpackbits(bits.numpy(), bitorder="little")[:n].astype(bool)


def buckets(v: np.ndarray, bucket: int | None) -> list[np.ndarray]:
    b = bucket or max(len(v), 1)
    return [v[i:i + b] for i in range(0, len(v), b)]


def onebit_means(v: np.ndarray, bucket: int | None) -> np.ndarray:
    """(mean of v >= 0, mean of v < 0) per bucket: contract-order sums / counts in fp32."""
    out = []
    for part in buckets(v, bucket):
        neg = part < 0
        npos, nneg = int((~neg).sum()), int(neg.sum())
        s_pos = contract_sum(np.where(neg, np.float32(0), part))
        s_neg = contract_sum(np.where(neg, part, np.float32(0)))
        out += [s_pos / np.float32(npos) if npos else 0.0, s_neg / np.float32(nneg) if nneg else 0.0]
    return np.array(out, np.float32)


@pytest.mark.parametrize("bucket", [None, 32, 96, 8224])
@pytest.mark.parametrize("n", [1, 31, 1000, 3 * 8192 + 5])
def test_onebit_means_and_decoding(bucket: int | None, n: int) -> None:
    """means = (sum_{v >= 0} v / #, sum_{v < 0} v / #) per bucket, sums in the contract's order
    (chunks of 8192 from the bucket's start, then the partials), bit for bit; each element
    decodes to its side's mean; bits are LSB first, 1 = negative, padding 0."""
    torch.manual_seed(n)
    x = torch.randn(n) + 0.3
    p = OneBitCodec(bucket_size=bucket).encode(x)
    v = x.numpy()
    means = onebit_means(v, bucket)
    assert np.array_equal(p.parts["means"].numpy(), means)
    neg = unpack_bits(p.parts["bits"], n)
    assert np.array_equal(neg, v < 0)
    assert not np.unpackbits(p.parts["bits"].numpy(), bitorder="little")[n:].any()
    b = bucket or n
    idx = np.arange(n) // b
    expected = np.where(neg, means[2 * idx + 1], means[2 * idx])
    assert np.array_equal(OneBitCodec(bucket_size=bucket).decode(p).numpy(), expected)


def test_onebit_empty_side_and_zeros() -> None:
    """A bucket with no negative entries has mean_neg 0 (and vice versa); zeros (+0.0 and -0.0)
    are non-negative: bit 0, counted in mean_pos."""
    x = torch.tensor([1.0, 3.0, 0.0, -0.0] + [-2.0] * 28 + [-1.0, -3.0] * 16)
    p = OneBitCodec(bucket_size=32).encode(x)
    assert p.parts["means"].tolist() == [1.0, -2.0, 0.0, -2.0]
    assert p.parts["bits"].tolist() == [0xF0] + [0xFF] * 7
    assert OneBitCodec(bucket_size=32).decode(p)[:4].tolist() == [1.0, 1.0, 1.0, 1.0]


def test_onebit_is_the_best_two_level_code() -> None:
    """Given the sign partition, the means minimise the squared error: the error is the sum of
    the two sides' squared deviations, and moving either reconstruction value increases it."""
    torch.manual_seed(7)
    v = torch.randn(4096).double() * torch.rand(4096).double()
    p = OneBitCodec().encode(v)
    d = OneBitCodec().decode(p).double()
    err = float(((d - v) ** 2).sum())
    pos, neg = v[v >= 0], v[v < 0]
    within = float(((pos - pos.mean()) ** 2).sum() + ((neg - neg.mean()) ** 2).sum())
    assert err == pytest.approx(within, rel=1e-6)
    for delta in (1e-3, -1e-3):
        for side in (v >= 0, v < 0):
            assert float(((d + delta * side - v) ** 2).sum()) > err


@pytest.mark.parametrize("bucket", [None, 64, 96])
@pytest.mark.parametrize("n", [1, 33, 1000, 2 * 8192 + 1])
def test_scaled_sign_scale(bucket: int | None, n: int) -> None:
    """s = ||v||_1 / d per bucket (d the bucket's own length, shorter for the last one), the
    sum in the contract's order; D = s sign(v), sign(0) = +1."""
    torch.manual_seed(n)
    x = torch.randn(n)
    x[0] = 0.0
    codec = ScaledSignCodec(bucket_size=bucket)
    p = codec.encode(x)
    scales = np.array([contract_sum(np.abs(part)) / np.float32(len(part))
                       for part in buckets(x.numpy(), bucket)], np.float32)
    assert np.array_equal(p.parts["scales"].numpy(), scales)
    assert torch.equal(codec.local_scales(x), p.parts["scales"])
    s = scales[np.arange(n) // (bucket or n)]
    assert np.array_equal(codec.decode(p).numpy(), np.where(x.numpy() < 0, -s, s))


def test_scaled_sign_contraction() -> None:
    """||C(v) - v||^2 = ||v||^2 - ||v||_1^2 / d = (1 - delta) ||v||^2, delta = ||v||_1^2 /
    (d ||v||_2^2) (the contraction EF-signSGD's analysis needs), and s = ||v||_1 / d is the
    least-squares scale of sign(v)."""
    torch.manual_seed(3)
    for v in (torch.randn(5000), torch.randn(5000) ** 3, torch.zeros(5000).index_fill_(0, torch.tensor([7]), 2.0)):
        d = ScaledSignCodec().decode(ScaledSignCodec().encode(v)).double()
        v64 = v.double()
        err = float(((d - v64) ** 2).sum())
        assert err == pytest.approx(float((v64 ** 2).sum() - v64.abs().sum() ** 2 / 5000), rel=1e-5)
        for factor in (0.99, 1.01):
            assert float(((d * factor - v64) ** 2).sum()) > err


@pytest.mark.parametrize("codec", [OneBitCodec(), ScaledSignCodec(bucket_size=64)], ids=["onebit", "scaled"])
def test_error_feedback_bounds_the_accumulated_error(codec) -> None:
    """What error feedback is for: with r carried over steps, sum_t D(C(g_t + r_t)) = sum_t g_t -
    r_T exactly (up to fp32 rounding), and r stays bounded, so the time average of the decoded
    updates converges to that of the gradients (without it, the bias of 1-bit codes stays)."""
    torch.manual_seed(11)
    mean_g = torch.randn(2048) * 0.1
    r = torch.zeros(2048)
    sent, true = torch.zeros(2048, dtype=torch.float64), torch.zeros(2048, dtype=torch.float64)
    steps = 400
    for t in range(steps):
        g = mean_g + torch.randn(2048)
        true += g.double()
        sent += codec.decode(codec.encode(g, RandomKey(0, t, 0), residual=r)).double()
    assert torch.allclose(sent + r.double(), true, atol=1e-3)
    assert float(r.abs().max()) < 10.0                     # bounded: |g| is ~3 at most here
    ef_error = float(((sent - true) / steps).norm())
    no_ef = sum(codec.decode(codec.encode(mean_g + torch.randn(2048))).double() for _ in range(steps))
    assert ef_error < 0.2 * float((no_ef / steps - mean_g.double()).norm())


def test_signsgd_vote() -> None:
    """decode_accumulate adds +1 / -1 per worker (sign(0) = +1), the vote is sign(sum) with ties
    at 0, and the wire is ceil(n / 8) bytes."""
    torch.manual_seed(5)
    xs = [torch.randn(1001) for _ in range(4)]
    xs[0][:10] = 0.0
    codec = SignCodec()
    payloads = [codec.encode(x) for x in xs]
    assert all(p.nbytes == 126 for p in payloads)
    total = codec.decode_accumulate(payloads, torch.zeros(1001))
    expected = sum(torch.where(x < 0, -1.0, 1.0) for x in xs)
    assert torch.equal(total, expected)
    vote = majority_vote(total)
    assert torch.equal(vote, torch.sign(expected)) and bool((vote[expected == 0] == 0).all())
    assert bool((expected == 0).any())                      # 4 workers: ties happen


def test_signsgd_magnitude_and_no_error_feedback() -> None:
    torch.manual_seed(6)
    x = torch.randn(3 * 8192 + 7)
    m = SignCodec().magnitude(x)
    assert m.shape == (1,) and m.item() == contract_sum(np.abs(x.numpy())) / np.float32(x.numel())
    with pytest.raises(ValueError, match="no error feedback"):
        SignCodec().encode(x, residual=torch.zeros_like(x))


def test_overflowing_sum_raises() -> None:
    with pytest.raises(FloatingPointError, match="overflows"):
        ScaledSignCodec().encode(torch.full((64,), 3e38))
    with pytest.raises(FloatingPointError, match="overflows"):
        OneBitCodec(bucket_size=32).encode(torch.full((64,), -3e38))


@pytest.mark.parametrize("bucket", [0, 16, 33, -32, 64.0])
def test_bad_buckets(bucket) -> None:
    for cls in (OneBitCodec, ScaledSignCodec):
        with pytest.raises(ValueError):
            cls(bucket_size=bucket)


def test_wire_sizes() -> None:
    x = torch.randn(1000)
    assert OneBitCodec().encode(x).nbytes == 125 + 8
    assert OneBitCodec(bucket_size=64).encode(x).nbytes == 125 + 16 * 8
    assert ScaledSignCodec().encode(x).nbytes == 125 + 4
    assert ScaledSignCodec(bucket_size=512).encode(x).nbytes == 125 + 2 * 4
    assert SignCodec().encode(x).nbytes == 125
    assert OneBitCodec().encode(torch.randn(1)).nbytes == 1 + 8
    for codec in (OneBitCodec(), ScaledSignCodec(), SignCodec()):
        assert codec.encode(torch.randn(0)).nbytes == 0


# ---- a bucket's tensors in one call (encode_many / decode_many) ---------------------------------

BATCHED = {"onebit": (OneBitCodec(), True), "scaled": (ScaledSignCodec(), True), "signsgd": (SignCodec(), False),
           "majority": (MajorityVoteCodec(), False)}


@pytest.mark.parametrize("threads", ["1", "3"])
@pytest.mark.parametrize("case", list(BATCHED))
def test_encode_many_is_each_encode_bit_for_bit(monkeypatch, threads, case) -> None:
    monkeypatch.setenv("HVD_COMPRESS_CPU_THREADS", threads)
    codec, ef = BATCHED[case]
    batch.check_encode_many(monkeypatch, codec, ef, "hvdc_sign_encode_many")


@pytest.mark.parametrize("case", list(BATCHED))
def test_decode_many_is_each_decode_bit_for_bit(case) -> None:
    batch.check_decode_many(BATCHED[case][0], BATCHED[case][0])


def test_encode_many_of_an_overflowing_bucket_raises_on_the_host() -> None:
    """A tensor whose sum overflows fp32 raises as its own encode does (the engine then flags the
    bucket's members), before any tensor's residual changes."""
    x, segments = batch.awkward_bucket()
    x[segments[3][0]:segments[3][0] + 100] = 3e37
    for codec in (OneBitCodec(), ScaledSignCodec()):
        r = batch.residual_for(x)
        before = r.clone()
        with pytest.raises(FloatingPointError, match="overflows"):
            codec.encode_many(x, segments, r)
        assert torch.equal(r, before)


@pytest.mark.parametrize("case", list(BATCHED))
def test_encode_many_on_the_device_is_the_hosts_bit_for_bit(case, kernels) -> None:
    codec, ef = BATCHED[case]
    batch.check_many_on_device(codec, kernels, ef)
