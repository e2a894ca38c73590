"""Sketched update (hvd_compress/codecs/sketch.py; Konečný et al. 2016): encode and decode bit for
bit against a NumPy model of the documented algorithm (sign flips, FWHT stage order, kept
coordinates, min/max levels, Bernoulli draws), unbiasedness over the per-rank and the shared
randomness, the rotated-domain sum of workers, the layout and wire sizes, the error against QSGD
at the same bits; CUDA == CPU and golden vectors through the shared contract."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hvd_compress.codecs import QSGDCodec, SketchCodec
from hvd_compress.codecs.base import Payload, RandomKey
from hvd_compress.codecs.randk import random_indices
from hvd_compress.codecs.rng import random_u32
from quant_contract import KEY, CodecContract, chi2_check, gpu_matches_cpu

SHARED = RandomKey(seed=0x5EED5EED, step=7, tensor_id=3)
CASES = {"b4": SketchCodec().with_shared_key(SHARED),
         "b1_sub": SketchCodec(bits=1, ratio=0.25, block_size=64).with_shared_key(SHARED),
         "b2_norot": SketchCodec(bits=2, rotate=False, block_size=128).with_shared_key(SHARED),
         "b8_sub": SketchCodec(bits=8, ratio=0.5, block_size=4096).with_shared_key(SHARED)}


class TestSketch(CodecContract):
    cases = CASES
    golden_file = "sketch_golden.npz"

    def error_feedback(self, codec) -> bool:
        return False

    def wire_bytes(self, codec: SketchCodec, n: int) -> int:
        _, nblocks, kept = codec.layout(n)
        return -(-nblocks * kept * codec.bits // 8) + 8 * nblocks

    @pytest.mark.parametrize("n", [1, 7, 4099, 3 * 8192 + 5, 1 << 18])
    def test_gpu_matches_cpu(self, codec: SketchCodec, n: int, kernels) -> None:
        """CUDA == CPU bit for bit (blocks are independent: 2^18 elements already loop the
        emulated grid many times; 2^21 at 64-element blocks takes over a minute emulated)."""
        gpu_matches_cpu(codec, n, kernels, error_feedback=False)

    def test_decode_accumulate_in_worker_order(self, codec: SketchCodec) -> None:
        """Workers are summed in the rotated domain, in list order (the NumPy model), which
        differs from adding separately decoded workers only by rounding."""
        torch.manual_seed(3)
        payloads = [codec.encode(torch.randn(1001) * 10 ** w, RandomKey(w, 1, 2)) for w in range(3)]
        out = torch.randn(1001)
        expected = reference_decode(codec, payloads, out)
        separately = out.clone()
        for p in payloads:
            separately = separately + codec.decode(p)
        assert codec.decode_accumulate(payloads, out) is out
        assert np.array_equal(out.numpy(), expected)
        assert torch.allclose(out, separately, rtol=1e-4, atol=1e-4 * float(separately.abs().max()))


# ---- the NumPy model of kernels/sketch.h ----

def fwht(s: np.ndarray) -> np.ndarray:
    """Stages h = 1, 2, ..., B/2 of (a, b) -> (a + b, a - b) on the rows of s (fp32)."""
    rows, block = s.shape
    h = 1
    while h < block:
        v = s.reshape(rows, -1, 2, h)
        a, b = v[:, :, 0, :].copy(), v[:, :, 1, :].copy()
        v[:, :, 0, :], v[:, :, 1, :] = a + b, a - b
        h *= 2
    return s


def words(n: int, key: RandomKey) -> np.ndarray:
    return random_u32(n, key).numpy().view(np.uint32)


def flips(codec: SketchCodec, nblocks: int, block: int) -> np.ndarray:
    """-1 where the top bit of the padded coordinate's word of the shared key is set."""
    return np.where(words(nblocks * block, codec.shared_key) >> 31, np.float32(-1), np.float32(1)).reshape(
        nblocks, block)


def kept_positions(codec: SketchCodec, block: int, kept: int) -> np.ndarray:
    return random_indices(block, kept, codec.shared_key).numpy() if kept < block else np.arange(kept)


def reference_encode(codec: SketchCodec, x: torch.Tensor, key: RandomKey) -> dict[str, np.ndarray]:
    n, bits = x.numel(), codec.bits
    block, nblocks, kept = codec.layout(n)
    s = np.zeros(nblocks * block, np.float32)
    s[:n] = x.numpy()
    s = s.reshape(nblocks, block)
    if codec.rotate:
        s = fwht(s * flips(codec, nblocks, block))
    z = s[:, kept_positions(codec, block, kept)] + np.float32(0)
    lo, hi = z.min(1, keepdims=True), z.max(1, keepdims=True)
    top = np.float32(2 ** bits - 1)
    step = (hi - lo) / top
    r = np.where(step > 0, np.minimum((z - lo) / np.where(step > 0, step, np.float32(1)), top), np.float32(0))
    level = np.floor(r).astype(np.uint64)
    threshold = ((r - level.astype(np.float32)) * np.float32(2.0 ** 32)).astype(np.uint64)
    level += words(nblocks * kept, key).reshape(nblocks, kept).astype(np.uint64) < threshold
    per = 8 // bits
    flat = np.concatenate([level.reshape(-1), np.zeros(-level.size % per, np.uint64)]).reshape(-1, per)
    codes = (flat << (bits * np.arange(per, dtype=np.uint64))).sum(1).astype(np.uint8)
    return {"codes": codes, "ranges": np.concatenate([lo, hi], 1).reshape(-1)}


def reference_decode(codec: SketchCodec, payloads: list[Payload], out: torch.Tensor) -> np.ndarray:
    n, bits = out.numel(), codec.bits
    block, nblocks, kept = codec.layout(n)
    acc = np.zeros((nblocks, kept), np.float32)
    for p in payloads:
        ranges = p.parts["ranges"].numpy().reshape(nblocks, 2)
        lo, hi = ranges[:, :1], ranges[:, 1:]
        step = (hi - lo) / np.float32(2 ** bits - 1)
        per = 8 // bits
        codes = p.parts["codes"].numpy()
        level = (codes[:, None] >> (bits * np.arange(per, dtype=np.uint8))) & (2 ** bits - 1)
        level = level.reshape(-1)[:nblocks * kept].reshape(nblocks, kept)
        acc = acc + np.where(level == 2 ** bits - 1, hi, lo + level.astype(np.float32) * step)
    s = np.zeros((nblocks, block), np.float32)
    s[:, kept_positions(codec, block, kept)] = acc
    w = fwht(s) * flips(codec, nblocks, block) if codec.rotate else s * np.float32(block)
    return out.numpy() + (w / np.float32(kept)).reshape(-1)[:n]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("n", [1, 3, 8, 13, 1000, 3 * 1024 + 5])
def test_matches_the_numpy_model(case: str, n: int) -> None:
    """Payload and decoded values equal the model of the docstring, bit for bit."""
    codec = CASES[case]
    torch.manual_seed(n)
    x = torch.randn(n) * torch.rand(n) ** 3
    p = codec.encode(x, KEY)
    expected = reference_encode(codec, x, KEY)
    assert np.array_equal(p.parts["codes"].numpy(), expected["codes"])
    assert np.array_equal(p.parts["ranges"].numpy(), expected["ranges"])
    out = torch.randn(n)
    assert np.array_equal(codec.decode_accumulate([p, p], out.clone()).numpy(),
                          reference_decode(codec, [p, p], out))


@pytest.mark.parametrize("n,block,expected", [(1, 1024, (1, 1, 1)), (3, 1024, (4, 1, 4)),
                                              (5, 1024, (8, 1, 8)), (1000, 1024, (1024, 1, 1024)),
                                              (1025, 1024, (1024, 2, 1024)), (100, 16, (16, 7, 16))])
def test_layout(n: int, block: int, expected: tuple[int, int, int]) -> None:
    """B = min(block_size, next power of two >= n), the last block padded with zeros."""
    assert SketchCodec(block_size=block).layout(n) == expected


def test_layout_with_subsampling_and_wire_sizes() -> None:
    """kB = ceil(ratio * B) rounded up to a multiple of 8 (all for blocks under 8); bytes =
    ceil(nblocks kB b / 8) + 8 nblocks; 1024-element blocks cost b + 1/16 bits per element, as
    QSGD's b bits with 512-element buckets."""
    codec = SketchCodec(bits=2, ratio=0.1, block_size=256).with_shared_key(SHARED)
    assert codec.layout(10_000) == (256, 40, 32)
    assert codec.encode(torch.randn(10_000), KEY).nbytes == 40 * 32 * 2 // 8 + 8 * 40
    assert SketchCodec(ratio=0.01).layout(5) == (8, 1, 8)
    assert SketchCodec(ratio=0.01).layout(100) == (128, 1, 8)
    for bits in (2, 4, 8):
        n = 1 << 20
        sketch = SketchCodec(bits=bits).payload_nbytes(n)
        assert sketch == QSGDCodec(bits=bits, bucket_size=512).payload_nbytes(n) == n * (bits + 1 / 16) / 8


@pytest.mark.parametrize("codec", [SketchCodec(bits=2), SketchCodec(bits=1, block_size=64, ratio=0.25),
                                   SketchCodec(bits=8, block_size=16, ratio=0.5)],
                         ids=["b2", "b1_sub", "b8_sub"])
def test_unbiased(codec: SketchCodec) -> None:
    """E[D(C(v))] = v over the per-rank draws and the shared rotation / subsampling (a fresh
    shared key per draw): chi^2 of the mean of 600 decodings against their empirical variance
    (every decoded coordinate mixes many random levels, so none is deterministic)."""
    torch.manual_seed(4)
    v = torch.randn(300) * torch.rand(300) ** 2
    rows = []
    for s in range(600):
        c = codec.with_shared_key(RandomKey(s, 1, 1))
        rows.append(c.decode(c.encode(v, RandomKey(s, 2, 2))))
    rows = torch.stack(rows)
    chi2_check(rows, v, rows.double().var(0))


def test_unbiased_without_rotation() -> None:
    """Without rotation each coordinate is rounded between its two levels: variance step^2 p
    (1 - p), p = frac((v - lo) / step) per 32-element block; the block's min and max are exact."""
    torch.manual_seed(4)
    v = torch.randn(320) * torch.rand(320) ** 2
    codec = SketchCodec(bits=4, rotate=False, block_size=32).with_shared_key(SHARED)
    rows = torch.stack([codec.decode(codec.encode(v, RandomKey(s, 2, 2))) for s in range(600)])
    blocks = v.double().view(10, 32)
    lo, hi = blocks.min(1, keepdim=True).values, blocks.max(1, keepdim=True).values
    step = (hi - lo) / 15
    r = (blocks - lo) / step
    p = r - r.floor()
    chi2_check(rows, v, (step ** 2 * p * (1 - p)).view(-1))
    extremes = (blocks == lo) | (blocks == hi)
    assert torch.equal(rows[:, extremes.view(-1)], v[extremes.view(-1)].expand(600, -1))


def test_unbiased_over_rounding_alone() -> None:
    """With one shared key (fixed rotation, no subsampling), the per-rank stochastic levels alone
    average to v."""
    torch.manual_seed(5)
    v = torch.randn(1000)
    codec = SketchCodec(bits=1, block_size=256).with_shared_key(SHARED)
    rows = torch.stack([codec.decode(codec.encode(v, RandomKey(s, 0, 0))) for s in range(600)])
    chi2_check(rows, v, rows.double().var(0))


def test_constant_and_exact_blocks() -> None:
    """A constant block is exact without rotation (lo = hi, step 0); a block whose coordinates are
    all on the b-bit grid between its min and max is exact too (no draw changes it)."""
    codec = SketchCodec(rotate=False, block_size=8).with_shared_key(SHARED)
    x = torch.full((16,), -0.75)
    assert torch.equal(codec.decode(codec.encode(x, KEY)), x)
    grid = torch.tensor([0.0, 1.0, 2.0, 15.0, 3.0, 3.0, 7.0, 8.0])
    assert torch.equal(codec.decode(codec.encode(grid, KEY)), grid)


def test_subsampling_keeps_the_shared_positions() -> None:
    """Without rotation, a decoded block is nonzero only at its kept positions (the same in every
    block and on every rank), scaled by B / kB."""
    codec = SketchCodec(bits=8, ratio=0.25, rotate=False, block_size=64).with_shared_key(SHARED)
    x = torch.rand(640) + 1.0
    d = codec.decode(codec.encode(x, KEY)).view(10, 64)
    kept = random_indices(64, 16, SHARED)
    mask = torch.zeros(64, dtype=torch.bool)
    mask[kept] = True
    assert bool((d[:, ~mask] == 0).all()) and bool((d[:, mask] > 3.5).all())


def test_rotated_sum_is_linear() -> None:
    torch.manual_seed(6)
    codec = SketchCodec(bits=4, ratio=0.5, block_size=256).with_shared_key(SHARED)
    payloads = [codec.encode(torch.randn(2000), RandomKey(w, 0, 0)) for w in range(3)]
    together = codec.decode_accumulate(payloads, torch.zeros(2000))
    apart = sum(codec.decode(p) for p in payloads)
    assert torch.allclose(together, apart, atol=1e-4 * float(apart.abs().max()))


def test_keys_and_options() -> None:
    codec = SketchCodec()
    with pytest.raises(ValueError, match="with_shared_key"):
        codec.encode(torch.randn(10), KEY)
    keyed = codec.with_shared_key(SHARED)
    with pytest.raises(ValueError, match="must differ"):
        keyed.encode(torch.randn(10), SHARED)
    with pytest.raises(ValueError, match="no error feedback"):
        keyed.encode(torch.randn(10), KEY, residual=torch.zeros(10))
    p = keyed.encode(torch.randn(3000), KEY)
    other = codec.with_shared_key(RandomKey(SHARED.seed, SHARED.step + 1, SHARED.tensor_id))
    assert not torch.equal(keyed.decode(p), other.decode(p))           # the rotation is keyed
    with pytest.raises(FloatingPointError, match="overflows"):
        SketchCodec(block_size=4096).with_shared_key(SHARED).encode(torch.full((4096,), 3e37), KEY)
    for kwargs in ({"bits": 3}, {"block_size": 4}, {"block_size": 8192}, {"block_size": 100},
                   {"ratio": 0.0}, {"ratio": 1.5}):
        with pytest.raises(ValueError):
            SketchCodec(**kwargs)


# ---- the error against QSGD at the same bits ----

def relative_error(codec, v: torch.Tensor, key: RandomKey) -> float:
    d = codec.decode(codec.encode(v, key)).double()
    return float(((d - v.double()) ** 2).sum() / (v.double() ** 2).sum())


def sample_vectors(n: int) -> dict[str, torch.Tensor]:
    """Gaussian; Student-t with 2 degrees of freedom (heavy tails: Z / sqrt(chi^2_2 / 2), chi^2_2 =
    -2 log U); Gaussian with 0.1% outliers of +-100 sigma."""
    gen = torch.Generator().manual_seed(0)
    gauss = torch.randn(n, generator=gen)
    t2 = torch.randn(n, generator=gen) / (-torch.log(torch.rand(n, generator=gen))).sqrt()
    outliers = torch.randn(n, generator=gen)
    where = torch.randperm(n, generator=gen)[: n // 1000]
    outliers[where] = 100.0 * torch.sign(torch.randn(where.numel(), generator=gen))
    return {"gaussian": gauss, "student-t(2)": t2, "gaussian+outliers": outliers}


def error_table(n: int = 1 << 18) -> list[tuple[int, str, float, float, float]]:
    """(bits, vector, QSGD, sketch rotated, sketch without rotation) relative squared errors, at
    b + 1/16 bits per element for all three (QSGD: 512-element buckets; sketch: 1024-element
    blocks, min/max levels)."""
    rows = []
    vectors = sample_vectors(n)
    for bits in (2, 4, 8):
        for name, v in vectors.items():
            errors = [relative_error(QSGDCodec(bits=bits, bucket_size=512), v, KEY)]
            for rotate in (True, False):
                errors.append(relative_error(SketchCodec(bits=bits, rotate=rotate).with_shared_key(SHARED), v, KEY))
            rows.append((bits, name, *errors))
    return rows


def test_error_against_qsgd(capsys) -> None:
    """The rotation's point: at the same wire bits the rotated sketch beats QSGD on every vector,
    and beats the unrotated min/max quantizer where the vector is far from uniform (heavy tails,
    outliers).  The table is printed (``pytest -s``) and recorded in docs/codecs-seed-methods.md."""
    rows = error_table()
    with capsys.disabled():
        print("\nbits  vector              QSGD        sketch      sketch, no rotation")
        for bits, name, qsgd, rot, norot in rows:
            print(f"{bits:>4}  {name:<18}  {qsgd:.3e}   {rot:.3e}   {norot:.3e}")
    for bits, name, qsgd, rot, norot in rows:
        assert rot < qsgd, (bits, name)
        if name != "gaussian":
            assert rot < 0.5 * norot, (bits, name)
