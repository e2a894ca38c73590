"""Unbiased stochastic rounding fp32 -> fp16: neighbours, unbiasedness (normal and subnormal
range), exact values, overflow to inf, signed zeros; CUDA == CPU and golden vectors through the
contract."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hvd_compress.codecs.fp16 import StochasticFP16Codec
from quant_contract import KEY, CodecContract, chi2_check, repeat_draws

CODEC = StochasticFP16Codec()


class TestStochasticFP16(CodecContract):
    cases = {"sr": CODEC}
    golden_file = "fp16sr_golden.npz"

    def wire_bytes(self, codec: StochasticFP16Codec, n: int) -> int:
        return 2 * n


def neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp16 values below and above x (|x| <= 65504; both x itself when exact), as float64."""
    h = x.numpy().astype(np.float16)
    above, below = h.astype(np.float64) > x.numpy(), h.astype(np.float64) < x.numpy()
    other = np.nextafter(h, np.where(above, -np.inf, np.where(below, np.inf, h)).astype(np.float16))
    lo, hi = np.where(above, other, h), np.where(below, other, h)
    return torch.from_numpy(lo.astype(np.float64)), torch.from_numpy(hi.astype(np.float64))


@pytest.mark.parametrize("scale", [1.0, 1e-6, 3e4])           # normal, subnormal, large
def test_unbiased_between_neighbours(scale: float) -> None:
    """Always one of the two neighbouring fp16 values; E = x with variance
    (hi - lo)^2 p (1 - p), p = (x - lo) / (hi - lo)."""
    torch.manual_seed(0)
    x, draws = torch.randn(1000) * scale, 1000
    x = x.clamp(-65504, 65504)
    d = repeat_draws(CODEC, x, draws).double()
    lo, hi = neighbours(x)
    assert bool(((d == lo) | (d == hi)).all())
    p = torch.where(hi > lo, (x.double() - lo) / (hi - lo), 0.0)
    chi2_check(d, x, (hi - lo) ** 2 * p * (1 - p))


def test_round_up_probability() -> None:
    """1 + 2^-12 lies a quarter of the way from 1 to 1 + 2^-10: rounds up with probability 1/4."""
    d = CODEC.decode(CODEC.encode(torch.full((100_000,), 1 + 2 ** -12), KEY))
    ups = int((d > 1).sum())
    assert abs(ups - 25_000) < 6 * (100_000 * 0.25 * 0.75) ** 0.5


def test_exact_values_unchanged() -> None:
    """Every finite fp16 value (subnormals and signed zeros included) encodes as itself."""
    h = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    h = h[torch.isfinite(h)]
    p = CODEC.encode(h.float(), KEY)
    assert torch.equal(p.parts["values"].view(torch.int16), h.view(torch.int16))
    assert torch.equal(CODEC.decode(p), h.float())


def test_error_feedback_is_exact() -> None:
    """D and v = g + r are within one fp16 ulp of each other, so r_new = v - D is exact in fp32:
    D + r_new == g + r_old (as fp32) bit for bit."""
    torch.manual_seed(2)
    g, r = torch.randn(10_000) * 100, torch.randn(10_000)
    v = g + r
    d = CODEC.decode(CODEC.encode(g, KEY, residual=r))
    assert torch.equal(d + r, v)


def test_overflows_to_inf_like_horovods_fp16() -> None:
    """Above 65504 the next value up is inf: |x| >= 65536 (and inf) is inf, 65504 < |x| < 65536
    is inf with probability (|x| - 65504) / 32, NaN stays NaN, 65504 itself is exact.  (A loss
    scaler sees the overflow and backs off, as with Horovod's Compression.fp16.)"""
    x = torch.tensor([65504.0, 7e4, -1e30, 3.4e38, 65536.0, float("inf"), -float("inf"), float("nan")])
    d = CODEC.decode(CODEC.encode(x, KEY, check_finite=False))
    assert d[:7].tolist() == [65504.0, math.inf, -math.inf, math.inf, math.inf, math.inf, -math.inf]
    assert math.isnan(d[7])
    between = torch.full((200_000,), 65520.0)            # halfway: inf with probability 1/2
    d = CODEC.decode(CODEC.encode(between, KEY))
    assert set(d.unique().tolist()) == {65504.0, math.inf}
    assert abs(float(d.isinf().float().mean()) - 0.5) < 0.01
    with_residual = torch.tensor([-65519.0] * 64)       # inf with probability 15/32, else -65504
    r = torch.zeros_like(with_residual)
    d = CODEC.decode(CODEC.encode(with_residual, KEY, residual=r))
    assert torch.equal(r, with_residual - d)


def test_tiny_values_and_signs() -> None:
    """Below 2^-25 the neighbours are 0 and 2^-24 (the smallest subnormal); signs are kept."""
    x = torch.tensor([1e-30, -1e-30, 1e-12, -0.0, 0.0, -2.0 ** -26])
    v = CODEC.encode(x, KEY).parts["values"]
    assert set(v.abs().float().tolist()) <= {0.0, 2.0 ** -24}
    assert torch.equal(torch.signbit(v), torch.signbit(x))


def test_payload_is_plain_fp16() -> None:
    """The payload sums as fp16 (what Horovod's allreduce does) to the sum of the decodings."""
    torch.manual_seed(1)
    p = [CODEC.encode(torch.randn(100), KEY) for _ in range(2)]
    assert p[0].parts["values"].dtype == torch.float16
    assert torch.equal((p[0].parts["values"] + p[1].parts["values"]).float(),
                       (CODEC.decode(p[0]) + CODEC.decode(p[1])).half().float())
