"""eSGD's element-wise step (hvd_compress/codecs/esgd.py; Tao & Li, HotEdge 2018): the momentum
residual, the threshold flags and the selection keys of the C reference and of the CUDA kernel
(here on the SIMT emulator) against the plain-torch statement, bit for bit; the accuracy of the
fp32 polynomial log2 over every level of u; the draw's law (chi-square against the weights); golden
vectors.  (The method itself: test_lazy_diff.py.)"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from hvd_compress.codecs.base import RandomKey
from hvd_compress.codecs.esgd import keys_torch, log2_torch, momentum_step
from quant_contract import DATA, golden_inputs

KEY = RandomKey(seed=0x0123456789ABCDEF, step=7, tensor_id=3)
BETA = 0.9
GOLDEN = "esgd_golden.npz"
GOLDEN_SIZES = (1, 7, 1000, 4099)


def inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """g, r, H (integer counts, as eSGD keeps them) and the threshold mean |g|."""
    gen = torch.Generator().manual_seed(seed + n)
    g, r = torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 0.5
    h = torch.randint(0, 40, (n,), generator=gen).float()
    return g, r, h, g.abs().mean().reshape(1)


def step(g, r, h, thr, key):
    a = torch.empty_like(g)
    keys, over = momentum_step(g, r, h, BETA, thr, key, a)
    return a, keys, over


@pytest.mark.parametrize("n", [1, 5, 4099, 70_001])
def test_matches_the_torch_statement(n: int) -> None:
    """a = r * beta + g (torch's two roundings), over = |a| > threshold, keys = log2~(u) / (1 + H)
    (the same fp32 operations in torch); without a key no keys are drawn and a is unchanged."""
    g, r, h, thr = inputs(n)
    a, keys, over = step(g, r, h, thr, KEY)
    want = torch.mul(r, BETA).add_(g)
    assert torch.equal(a, want) and torch.equal(over, want.abs() > thr)
    assert torch.equal(keys, keys_torch(n, KEY, h))
    a2, none, over2 = step(g, r, h, thr, None)
    assert none is None and torch.equal(a2, a) and torch.equal(over2, over)


def test_log2_is_within_2_pow_minus_21_at_every_level() -> None:
    """log2~ of all 2^23 values of u against float64 log2: relative error < 2^-21, and it is
    monotone (a larger u never gets a smaller log), so equal weights select the largest u."""
    u = (torch.arange(2 ** 23, dtype=torch.int64) * 2 + 1).to(torch.float32) * 2.0 ** -24
    got, exact = log2_torch(u).double(), torch.log2(u.double())
    assert float(((got - exact) / exact).abs().max()) < 2.0 ** -21
    assert bool((got[1:] >= got[:-1]).all())


@pytest.mark.parametrize("n", [1, 7, 4099, 3 * 8192 + 5])
def test_gpu_matches_cpu(n: int, kernels) -> None:
    """The CUDA kernel gives the C reference's a, keys and flags bit for bit (with and without the
    draw)."""
    g, r, h, thr = inputs(n, 1)
    want = [step(g, r, h, thr, key) for key in (KEY, None)]
    with kernels:
        got = [step(*(kernels.put(t) for t in (g, r, h, thr)), key) for key in (KEY, None)]
    for w, x in zip(want, got):
        for a, b in zip(w, x):
            assert (a is None and b is None) or torch.equal(a, b.cpu())


WEIGHTS = torch.tensor([1.0, 2.0, 3.0, 5.0, 8.0, 13.0])


def draws(rows: int) -> torch.Tensor:
    """The keys of ``rows`` independent draws over WEIGHTS (H = w - 1): one stream, row by row."""
    n = WEIGHTS.numel()
    h = (WEIGHTS - 1).repeat(rows)
    z = torch.zeros(n * rows)
    _, keys, _ = step(z, z, h, torch.zeros(1), KEY)
    return keys.view(rows, n)


def chi2_accept(counts: np.ndarray, expected: np.ndarray) -> None:
    dof = counts.size - 1
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert abs(chi2 - dof) < 6 * math.sqrt(2 * dof), f"chi2 = {chi2:.1f} for {dof} degrees of freedom"


def test_weighted_draw_follows_the_weights() -> None:
    """The largest key is i with probability w_i / W, and the two largest are (i, j) in this order
    with probability w_i / W * w_j / (W - w_i) (successive draws without replacement): chi-square
    over 60,000 draws, 6 and 30 cells."""
    rows, w = 60_000, WEIGHTS.double().numpy()
    W = w.sum()
    top2 = torch.topk(draws(rows), 2, dim=1).indices.numpy()
    chi2_accept(np.bincount(top2[:, 0], minlength=w.size), rows * w / W)
    pairs = list(itertools.permutations(range(w.size), 2))
    seen = dict.fromkeys(pairs, 0)
    for i, j in map(tuple, top2):
        seen[(i, j)] += 1
    chi2_accept(np.array([seen[p] for p in pairs]),
                np.array([rows * w[i] / W * w[j] / (W - w[i]) for i, j in pairs]))


def golden_arrays() -> dict[str, np.ndarray]:
    """For golden_inputs (x as g, r as r, H = i % 7, threshold mean |g|): a, keys, flags."""
    arrays: dict[str, np.ndarray] = {"sizes": np.array(GOLDEN_SIZES)}
    for n in GOLDEN_SIZES:
        g, r = golden_inputs(n)
        h = (torch.arange(n) % 7).float()
        a, keys, over = step(g, r, h, g.abs().mean().reshape(1), KEY)
        arrays.update({f"a_{n}": a.numpy(), f"keys_{n}": keys.numpy(), f"over_{n}": over.numpy()})
    return arrays


def write_golden() -> None:
    np.savez(DATA / GOLDEN, **golden_arrays())


def check_golden(kernels=None) -> None:
    data = np.load(DATA / GOLDEN)
    for n in data["sizes"]:
        g, r = golden_inputs(int(n))
        h, thr = (torch.arange(int(n)) % 7).float(), g.abs().mean().reshape(1)
        if kernels is None:
            got = step(g, r, h, thr, KEY)
        else:
            with kernels:
                got = step(*(kernels.put(t) for t in (g, r, h, thr)), KEY)
        for name, t in zip(("a", "keys", "over"), got):
            assert np.array_equal(t.cpu().numpy().view(np.uint8), data[f"{name}_{n}"].view(np.uint8)), (name, n)


def test_golden() -> None:
    check_golden()


def test_gpu_golden(kernels) -> None:
    check_golden(kernels)
