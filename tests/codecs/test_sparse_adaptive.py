"""The adaptive sparsifiers' codecs (hvd_compress/codecs/ternary.py, GradDropCodec in
codecs/topk.py): AdaComp (Chen et al., AAAI 2018), Gradient Dropping (Aji & Heafield, EMNLP 2017)
and Sparse Ternary Compression (Sattler et al., TNNLS 2019) against plain-torch statements of
their papers' formulas; STC's Golomb-Rice stream and its size; CUDA == CPU bit for bit (the
emulator in CI) and golden vectors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hvd_compress.codecs import AdaCompCodec, GradDropCodec, Payload, RandomKey, STCCodec
from hvd_compress.codecs.ternary import expected_bits_per_entry, rice_parameter
from quant_contract import KEY, check_golden, contract_sum, gpu_matches_cpu, payload_equal

LAYOUT = [torch.Size([40, 50]), torch.Size([1003])]
CASES = {"adacomp": AdaCompCodec(), "adacomp_bin64": AdaCompCodec(bin_size=64),
         "stc": STCCodec(ratio=0.01), "graddrop": GradDropCodec(), "graddrop_fp32": GradDropCodec(
             ratio=0.05, value_dtype=torch.float32)}


class TestGolden:
    """Golden vectors (tests/codecs/gen_golden.py): payload bytes, residual and decoded values recorded
    from the C reference, reproduced by it and by the CUDA path."""
    cases = CASES
    golden_file = "sparse_adaptive_golden.npz"

    def error_feedback(self, codec) -> bool:
        return True

    @pytest.mark.parametrize("case", sorted(CASES))
    def test_golden(self, case):
        check_golden(CASES[case], self.golden_file, case)

    @pytest.mark.parametrize("case", sorted(CASES))
    def test_gpu_golden(self, case, kernels):
        check_golden(CASES[case], self.golden_file, case, kernels)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("n", [7, 4099, 3 * 8192 + 5])
def test_gpu_matches_cpu(case, n, kernels):
    """Payloads, residual and the decoded sum of 3 workers, bit for bit (layout: two tensors
    where the codec takes one)."""
    codec = CASES[case]
    if hasattr(codec, "with_layout") and n > 2000:
        codec = codec.with_layout([torch.Size([2000]), torch.Size([n - 2000])])
    gpu_matches_cpu(codec, n, kernels)


# -- AdaComp ------------------------------------------------------------------------------------

def adacomp_reference(g: torch.Tensor, r: torch.Tensor, L: int):
    """The paper's algorithm in plain torch/numpy: H = r + g; per bin gmax = max |H|; send where
    H != 0 and |H + g| >= gmax; s = mean |H| of the sent (summed in index order, fp32);
    D = sign(H) s; r = H - D."""
    H = r + g
    idx, scales, decoded = [], [], torch.zeros_like(g)
    for lo in range(0, g.numel(), L):
        h, gb = H[lo:lo + L], g[lo:lo + L]
        sel = (h != 0) & ((h + gb).abs() >= h.abs().max())
        sent = h[sel].abs().numpy()
        s = np.float32(np.cumsum(sent, dtype=np.float32)[-1] / np.float32(len(sent))) if len(sent) else np.float32(0)
        scales.append(float(s))
        where = torch.nonzero(sel).view(-1) + lo
        idx.append(where)
        decoded[where] = torch.where(H[where] < 0, -torch.tensor(float(s)), torch.tensor(float(s)))
    return torch.cat(idx).int(), torch.tensor(scales, dtype=torch.float32), decoded, H - decoded


@pytest.mark.parametrize("n,L", [(1, 50), (1000, 50), (4321, 500), (777, 64)])
def test_adacomp_matches_the_paper(n, L):
    torch.manual_seed(n)
    g, r = torch.randn(n), torch.randn(n) * 2
    g[: n // 5] = 0.0                                        # bins with zero gradients
    codec = AdaCompCodec(bin_size=L)
    res = r.clone()
    p = codec.encode(g, KEY, residual=res)
    idx, scales, decoded, r_new = adacomp_reference(g, r, L)
    assert torch.equal(p.parts["indices"], idx) and torch.equal(p.parts["scales"], scales)
    assert torch.equal(codec.decode(p), decoded) and torch.equal(res, r_new)
    negative = (r + g)[idx.long()] < 0
    bits = torch.tensor([int(negative[j]) << (j % 8) for j in range(idx.numel())], dtype=torch.int64)
    packed = torch.zeros(-(-idx.numel() // 8), dtype=torch.int64).index_add_(
        0, torch.arange(idx.numel()) // 8, bits)
    assert torch.equal(p.parts["signs"], packed.to(torch.uint8))
    assert p.nbytes == 4 * idx.numel() + -(-idx.numel() // 8) + 4 * -(-n // L)


def test_adacomp_bin_size_follows_the_layer():
    """L_T = 50 for convolution weights, 500 for the rest; bin_size overrides."""
    codec = AdaCompCodec()
    assert codec.with_layout([torch.Size([16, 8, 3, 3])]).bin_for() == 50
    assert codec.with_layout([torch.Size([100, 64])]).bin_for() == 500
    assert codec.bin_for() == 500 and AdaCompCodec(bin_size=7).with_layout([torch.Size([4, 4, 3])]).bin_for() == 7
    conv = codec.with_layout([torch.Size([16, 8, 3, 3])])
    assert conv.encode(torch.randn(1152)).parts["scales"].numel() == 1152 // 50 + 1
    assert repr(conv) == repr(codec)                         # the layout is not configuration


def test_adacomp_sends_nothing_from_silent_bins_and_keeps_the_rest():
    codec = AdaCompCodec(bin_size=50)
    p = codec.encode(torch.zeros(1000))
    assert p.parts["indices"].numel() == 0 and torch.equal(p.parts["scales"], torch.zeros(20))
    g = torch.zeros(100)
    g[3], g[60] = 2.0, -1.0
    r = torch.zeros(100)
    p = codec.encode(g, residual=r)
    assert p.parts["indices"].tolist() == [3, 60] and p.parts["scales"].tolist() == [2.0, 1.0]
    assert torch.equal(codec.decode(p), g) and not r.any()


def test_adacomp_residual_carries_what_was_not_sent():
    """Over steps, sum of decoded + final residual = sum of gradients (error feedback), and
    the residual stays bounded."""
    torch.manual_seed(3)
    codec, n = AdaCompCodec(bin_size=50), 5000
    r = torch.zeros(n)
    sent, true = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for _ in range(100):
        g = torch.randn(n)
        sent += codec.decode(codec.encode(g, residual=r)).double()
        true += g.double()
    assert torch.allclose(sent + r.double(), true, atol=1e-3)
    assert float(r.abs().max()) < 50


# -- STC ----------------------------------------------------------------------------------------

def test_rice_parameter_is_the_papers():
    phi = (1 + 5 ** 0.5) / 2
    for p in (0.0025, 0.01, 0.001, 0.1, 0.3):
        assert rice_parameter(p) == 1 + math.floor(math.log2(math.log(phi - 1) / math.log(1 - p)))
    assert rice_parameter(0.0025) == 8 and rice_parameter(0.01) == 6 and rice_parameter(0.9) == 0
    assert abs(expected_bits_per_entry(0.0025) - 11.11) < 0.01


def golomb_reference(idx: list[int], negative: list[bool], b: int) -> bytes:
    """Gaps d = i_j - i_{j-1} - 1: d >> b ones, a zero, the b low bits (MSB first), the sign."""
    bits, prev = [], -1
    for i, neg in zip(idx, negative):
        d = i - prev - 1
        bits += [1] * (d >> b) + [0] + [(d >> (b - 1 - t)) & 1 for t in range(b)] + [int(neg)]
        prev = i
    bits += [0] * (-len(bits) % 8)
    return bytes(sum(bit << t for t, bit in enumerate(bits[i:i + 8])) for i in range(0, len(bits), 8))


@pytest.mark.parametrize("n,ratio", [(1, 0.0025), (400, 0.0025), (10_007, 0.0025), (5000, 0.05)])
def test_stc_matches_the_paper(n, ratio):
    """Exact top-k of |g + r| (torch.topk), mu = mean |v| of the kept (the contract's sum),
    D = mu sign(v), r = v - D; the stream is the Golomb-Rice code of the gaps with b*(p)."""
    torch.manual_seed(n)
    g, r = torch.randn(n), torch.randn(n) * 0.1
    v = g + r
    codec = STCCodec(ratio=ratio)
    k = codec.k(n)
    res = r.clone()
    p = codec.encode(g, KEY, residual=res)
    top = torch.sort(torch.topk(v.abs(), k).indices).values
    mu = contract_sum(v[top].abs().numpy()) / np.float32(k)
    assert float(p.parts["mu"]) == float(np.float32(mu))
    decoded = torch.zeros(n)
    decoded[top] = torch.where(v[top] < 0, -p.parts["mu"], p.parts["mu"])
    assert torch.equal(codec.decode(p), decoded) and torch.equal(res, v - decoded)
    stream = golomb_reference(top.tolist(), (v[top] < 0).tolist(), rice_parameter(ratio))
    assert bytes(p.parts["bits"].tolist()) == stream and p.nbytes == len(stream) + 4


def test_stc_bits_per_entry_as_documented():
    """At p = 1/400 on a million elements the positions are about uniform: the stream costs
    b* + 1 + (unary ones) + 1 sign = 11.1 bits per entry on average (docs: measured 11.1)."""
    torch.manual_seed(0)
    codec = STCCodec()
    p = codec.encode(torch.randn(1_000_000))
    k = codec.k(1_000_000)
    bits_per_entry = 8 * p.parts["bits"].numel() / k
    assert abs(bits_per_entry - expected_bits_per_entry(0.0025)) < 0.15, bits_per_entry
    assert abs(codec.expected_nbytes(1_000_000) - p.nbytes) < 0.02 * p.nbytes


def test_stc_stream_is_checked():
    codec = STCCodec(ratio=0.01)
    p = codec.encode(torch.randn(1000))
    with pytest.raises(ValueError, match="code word"):
        codec.decode(Payload(1000, {"bits": p.parts["bits"][:3], "mu": p.parts["mu"]}))
    with pytest.raises(ValueError, match="code word"):   # positions past n
        codec.decode(Payload(500, {"bits": torch.full((20,), 255, dtype=torch.uint8), "mu": p.parts["mu"]}))
    with pytest.raises(ValueError):
        codec.decode_accumulate([p], torch.zeros(999))


# -- Gradient Dropping --------------------------------------------------------------------------

def test_graddrop_one_threshold_over_normalized_tensors():
    """y = g' / max|g'| per tensor; the sent set is {|y| >= t} for one t over the bucket; the
    values are g' itself (fp16), the residual g' elsewhere and g' - fp16(g') where sent."""
    torch.manual_seed(5)
    sizes = [3000, 2000, 5000]
    scale = [1.0, 1e-3, 10.0]                                # very different layer magnitudes
    g = torch.cat([torch.randn(n) * s for n, s in zip(sizes, scale)])
    r = torch.randn(10_000) * 0.01 * torch.cat([torch.full((n,), s) for n, s in zip(sizes, scale)])
    v = g + r
    codec = GradDropCodec(ratio=0.01).with_layout([torch.Size([n]) for n in sizes])
    res = r.clone()
    p = codec.encode(g, KEY, residual=res)
    idx = p.parts["indices"].long()
    y = torch.cat([part / part.abs().max() for part in v.split(sizes)])
    chosen = torch.zeros(10_000, dtype=torch.bool)
    chosen[idx] = True
    assert float(y[chosen].abs().min()) >= float(y[~chosen].abs().max())
    assert 0.8 * 100 <= idx.numel() <= 1.3 * 100
    assert torch.equal(p.parts["values"], v[idx].half())
    expect = v.clone()
    expect[idx] = v[idx] - v[idx].half().float()
    assert torch.equal(res, expect)
    per_layer = [int(((idx >= a) & (idx < a + n)).sum()) for a, n in zip([0, 3000, 5000], sizes)]
    assert min(per_layer) > 5                                # the 1e-3 layer still sends its share
    plain = GradDropCodec(ratio=0.01, layer_norm=False).encode(g, KEY).parts["indices"].long()
    assert int(((plain >= 3000) & (plain < 5000)).sum()) == 0   # a global threshold starves it


def test_graddrop_without_layout_is_one_tensor_and_payload_is_topk():
    torch.manual_seed(6)
    g = torch.randn(4000)
    a = GradDropCodec().encode(g, KEY)
    b = GradDropCodec().with_layout([torch.Size([4000])]).encode(g, KEY)
    assert payload_equal(a, b) and list(a.parts) == ["indices", "values"]
    assert repr(GradDropCodec().with_layout([torch.Size([10])])) == repr(GradDropCodec())


@pytest.mark.parametrize("make", [lambda: AdaCompCodec(bin_size=0), lambda: AdaCompCodec(conv_bin_size=-1),
                                  lambda: STCCodec(ratio=0.0), lambda: STCCodec(ratio=1.5),
                                  lambda: GradDropCodec(ratio=0.0)])
def test_bad_arguments(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize("case", ["adacomp", "graddrop"])
def test_thread_count_independent(case, monkeypatch):
    torch.manual_seed(4)
    codec = CASES[case]
    x, r = torch.randn(200_003), torch.randn(200_003)
    results = []
    for threads in ("1", "2"):
        monkeypatch.setenv("HVD_COMPRESS_CPU_THREADS", threads)
        res = r.clone()
        results.append((codec.encode(x, RandomKey(1, 2, 3), residual=res), res))
    assert payload_equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
