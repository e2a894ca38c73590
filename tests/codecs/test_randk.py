"""Random-k with a shared mask (hvd_compress/codecs/randk.py; Konečný et al. 2016, Stich et al.
2018): the selection is exactly k distinct indices and a uniformly random k-subset over keys,
the unbiased variant is unbiased, error feedback keeps the rest, payloads are summable; CUDA ==
CPU and golden vectors through the shared contract."""
from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch

from hvd_compress.codecs import RandomKCodec
from hvd_compress.codecs.base import Payload, RandomKey
from hvd_compress.codecs.randk import permutation_bits, random_indices

import batch_contract as batch
from quant_contract import KEY, CodecContract, chi2_check

SHARED = RandomKey(seed=0xFEEDFACE, step=7, tensor_id=3)
CASES = {"ef_1pct": RandomKCodec(ratio=0.01).with_shared_key(SHARED),
         "ef_30pct": RandomKCodec(ratio=0.3).with_shared_key(SHARED),
         "unbiased_10pct": RandomKCodec(ratio=0.1, unbiased=True).with_shared_key(SHARED)}


class TestRandomK(CodecContract):
    cases = CASES
    golden_file = "randk_golden.npz"
    keyed = False                       # the per-rank key is not used: the mask is shared

    def error_feedback(self, codec: RandomKCodec) -> bool:
        return not codec.unbiased

    def wire_bytes(self, codec: RandomKCodec, n: int) -> int:
        return 4 * codec.k(n)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 31, 32, 33, 1000, 4097, 65536, 100_003])
def test_exactly_k_distinct_indices(n: int) -> None:
    """k distinct indices in [0, n) for every k, and a prefix of the k + 1 ones (so k = n is a
    permutation of [0, n))."""
    full = random_indices(n, n, SHARED)
    assert sorted(full.tolist()) == list(range(n))
    for k in {1, n // 3, n // 2, n - 1} - {0}:
        assert torch.equal(random_indices(n, k, SHARED), full[:k])


def test_huge_range() -> None:
    """n beyond int32 (nothing of size n is allocated): distinct indices below n."""
    n = 3 * 2 ** 40 + 7
    idx = random_indices(n, 5000, SHARED)
    assert idx.unique().numel() == 5000 and int(idx.min()) >= 0 and int(idx.max()) < n
    assert int(idx.max()) > 2 ** 41                    # the whole range is reached


def test_inclusion_probability_is_k_over_n() -> None:
    """Over shared keys, every index is selected with probability k / n (what makes the
    unbiased variant unbiased): chi^2 of the inclusion counts over 2000 keys, and n = 1000 is not
    a power of two (cycle walking)."""
    n, k, keys = 1000, 100, 2000
    counts = torch.zeros(n)
    for s in range(keys):
        counts[random_indices(n, k, RandomKey(s, 1, 2))] += 1
    p = k / n
    chi2 = float(((counts - keys * p) ** 2).sum() / (keys * p * (1 - p)))
    assert abs(chi2 - (n - 1)) < 6 * math.sqrt(2 * (n - 1)), chi2


@pytest.mark.parametrize("n,k", [(3, 2), (4, 2), (5, 2), (7, 3), (9, 2)])
def test_uniform_k_subsets(n: int, k: int) -> None:
    """Every k-subset of a small range is equally likely over keys (the Feistel network's small
    domains are where a weak permutation would show): chi^2 over the C(n, k) subsets."""
    keys = 12_000
    seen = Counter(tuple(sorted(random_indices(n, k, RandomKey(s, 3, 4)).tolist())) for s in range(keys))
    subsets = list(itertools.combinations(range(n), k))
    assert set(seen) == set(subsets)
    e = keys / len(subsets)
    chi2 = sum((seen[s] - e) ** 2 / e for s in subsets)
    dof = len(subsets) - 1
    assert abs(chi2 - dof) < 6 * math.sqrt(2 * dof), chi2


def test_unbiased_estimator() -> None:
    """E[D(C(v))] = v with c = n / k: the mean over 1000 shared keys, per-element variance
    v_i^2 (n / k - 1)."""
    torch.manual_seed(0)
    n, draws = 500, 1000
    v = torch.randn(n)
    codec = RandomKCodec(ratio=0.1, unbiased=True)
    assert codec.scale(n) == 10.0
    rows = torch.stack([codec.with_shared_key(RandomKey(s, 0, 9)).decode(
        codec.with_shared_key(RandomKey(s, 0, 9)).encode(v)) for s in range(draws)])
    chi2_check(rows, v, v.double() ** 2 * (n / codec.k(n) - 1))


def test_error_feedback_keeps_the_rest() -> None:
    """r <- g + r off the mask and 0 on it, values = g + r on it; over steps with fresh shared
    keys sum_t D_t + r_T = sum_t g_t, with r bounded (random-k is a k/n contraction)."""
    torch.manual_seed(1)
    n = 4000
    codec = RandomKCodec(ratio=0.25)
    g, r = torch.randn(n), torch.randn(n)
    v = g + r
    c = codec.with_shared_key(SHARED)
    p = c.encode(g, KEY, residual=r)
    idx = c.indices(n)
    assert torch.equal(p.parts["values"], v[idx])
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx] = True
    assert torch.equal(r[mask], torch.zeros(codec.k(n))) and torch.equal(r[~mask], v[~mask])

    r = torch.zeros(n)
    sent, true = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for t in range(200):
        g = torch.randn(n)
        c = codec.with_shared_key(RandomKey(5, t, 0))
        sent += c.decode(c.encode(g, KEY, residual=r)).double()
        true += g.double()
    assert torch.allclose(sent + r.double(), true, atol=1e-3)
    assert float(r.abs().max()) < 30                         # ~ sqrt(n/k) * |g|: bounded


def test_payloads_are_summable() -> None:
    """Every rank selects the same positions, so the element-wise sum of the workers' values (an
    allreduce) decodes to the sum of their decodings: bit for bit into zeros."""
    torch.manual_seed(2)
    codec = RandomKCodec(ratio=0.05, unbiased=True).with_shared_key(SHARED)
    payloads = [codec.encode(torch.randn(3001), RandomKey(w, 1, 1)) for w in range(4)]
    summed = payloads[0].parts["values"] + payloads[1].parts["values"]
    summed = (summed + payloads[2].parts["values"]) + payloads[3].parts["values"]
    once = codec.decode(Payload(3001, {"values": summed}))
    assert torch.equal(once, codec.decode_accumulate(payloads, torch.zeros(3001)))
    assert int((once != 0).sum()) == codec.k(3001)


def test_shared_key_required_and_used() -> None:
    codec = RandomKCodec(ratio=0.1)
    with pytest.raises(ValueError, match="with_shared_key"):
        codec.encode(torch.randn(100))
    p = codec.with_shared_key(SHARED).encode(torch.randn(100))
    with pytest.raises(ValueError, match="with_shared_key"):
        codec.decode(p)
    with pytest.raises(TypeError):
        codec.with_shared_key((1, 2, 3))
    a, b = (codec.with_shared_key(k).indices(1000) for k in (SHARED, RandomKey(SHARED.seed, 8, 3)))
    assert not torch.equal(a, b)
    assert codec.payload_nbytes(1000) == 400


def test_edge_sizes() -> None:
    codec = RandomKCodec(ratio=0.5).with_shared_key(SHARED)
    assert codec.encode(torch.randn(0)).nbytes == 0
    assert torch.equal(codec.decode(codec.encode(torch.tensor([-3.0]))), torch.tensor([-3.0]))
    x = torch.randn(77)
    everything = RandomKCodec(ratio=1.0, unbiased=True).with_shared_key(SHARED)
    assert torch.equal(everything.decode(everything.encode(x)), x)
    assert permutation_bits(1) == 0 and permutation_bits(2) == 1 and permutation_bits(1025) == 11


def test_unbiased_refuses_a_residual() -> None:
    with pytest.raises(ValueError, match="no error feedback"):
        CASES["unbiased_10pct"].encode(torch.randn(10), residual=torch.zeros(10))


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_bad_ratio(ratio: float) -> None:
    with pytest.raises(ValueError):
        RandomKCodec(ratio=ratio)


@pytest.mark.parametrize("size", [1, 1000, 2 ** 40 + 3])
def test_gpu_indices_match_cpu(size: int, kernels) -> None:
    """The CUDA permutation kernel gives the C reference's indices (also beyond 2^32; nothing of
    that size is allocated)."""
    k = min(size, 3000)
    with kernels:
        gpu = random_indices(size, k, SHARED, kernels.device)
    assert torch.equal(gpu.cpu(), random_indices(size, k, SHARED))


# ---- a bucket's tensors in one call (encode_many / decode_many) ---------------------------------

BATCH_KEY = RandomKey(11, 4, 0)
BATCHED = {"ef": (RandomKCodec(ratio=0.05).with_shared_key(BATCH_KEY), True),
           "unbiased": (RandomKCodec(ratio=0.3, unbiased=True).with_shared_key(BATCH_KEY), False)}


def for_tensor(codec: RandomKCodec, key: RandomKey) -> RandomKCodec:
    """A tensor alone: the shared key with the tensor's id (the routes' codec_for)."""
    return codec.with_shared_key(RandomKey(BATCH_KEY.seed, BATCH_KEY.step, key.tensor_id))


@pytest.mark.parametrize("threads", ["1", "3"])
@pytest.mark.parametrize("case", list(BATCHED))
def test_encode_many_is_each_encode_bit_for_bit(monkeypatch, threads, case) -> None:
    monkeypatch.setenv("HVD_COMPRESS_CPU_THREADS", threads)
    codec, ef = BATCHED[case]
    batch.check_encode_many(monkeypatch, codec, ef, "hvdc_randk_gather_many", for_tensor)


@pytest.mark.parametrize("case", list(BATCHED))
def test_decode_many_is_each_decode_bit_for_bit(case) -> None:
    codec = BATCHED[case][0]
    batch.check_decode_many(codec, codec, for_tensor)


@pytest.mark.parametrize("case", list(BATCHED))
def test_encode_many_on_the_device_is_the_hosts_bit_for_bit(case, kernels) -> None:
    codec, ef = BATCHED[case]
    batch.check_many_on_device(codec, kernels, ef)


def test_decode_many_needs_the_keys() -> None:
    codec = BATCHED["ef"][0]
    x, segments = batch.awkward_bucket()
    payloads = [[p] for p in codec.encode_many(x, segments, None)]
    with pytest.raises(ValueError, match="needs \\(offset, numel, key\\)"):
        codec.decode_many(payloads, torch.zeros(x.numel()), [(o, n) for o, n, _ in segments])
