"""Checks every fixed-size codec (TernGrad, QSGD, stochastic fp16; 1-bit SGD, the sign codecs,
random-k, the sketch) must pass: the test modules subclass :class:`CodecContract` with their codec
configurations.  Also the helpers for the
statistical tests and the golden files."""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from hvd_compress.codecs.base import Codec, Payload, RandomKey

DATA = Path(__file__).resolve().parents[1] / "data"
KEY = RandomKey(seed=0x0123456789ABCDEF, step=7, tensor_id=3)


def payload_equal(a: Payload, b: Payload) -> bool:
    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.cpu().view(torch.uint8)
    return a.numel == b.numel and list(a.parts) == list(b.parts) and all(
        torch.equal(raw(a.parts[k]), raw(b.parts[k])) for k in a.parts)


def chi2_check(decoded: torch.Tensor, g: torch.Tensor, var: torch.Tensor) -> None:
    """Unbiasedness: the mean m of ``draws`` independent decodings (the rows of ``decoded``)
    should be g with per-element variance var / draws (CLT; draws >= 400).  Two statistics,
    each accepted within 6 standard deviations:
      - sum_i (m_i - g_i)^2 / (var_i / draws) ~ chi^2 with k = #{var_i > 0} degrees of freedom
        (mean k, sd sqrt(2k)): catches bias on a few elements;
      - sum_i sign(g_i) (m_i - g_i) / sqrt(sum_i var_i / draws) ~ N(0, 1): catches a small
        systematic shrinkage or inflation of magnitudes.
    Elements with var == 0 are not random: equal to g up to fp32 rounding of the decoding."""
    draws = decoded.shape[0]
    mean, g, var = decoded.double().mean(0), g.double(), var.double()
    random = var > 0
    assert torch.allclose(mean[~random], g[~random], rtol=2.0 ** -22, atol=0.0)
    k = int(random.sum())
    z = float(((mean - g)[random] ** 2 / (var[random] / draws)).sum())
    assert abs(z - k) < 6 * math.sqrt(2 * k), f"chi2 = {z:.1f} for {k} degrees of freedom"
    z_lin = float((torch.sign(g) * (mean - g)).sum() / (var.sum() / draws).sqrt())
    assert abs(z_lin) < 6, f"systematic bias: z = {z_lin:.1f}"


def repeat_draws(codec: Codec, g: torch.Tensor, draws: int, key: RandomKey = KEY) -> torch.Tensor:
    """``draws`` independent decodings of g, as rows: one encoding of g repeated ``draws`` times
    (independent Philox counters; every bucket or tensor statistic is that of g itself, as long
    as g.numel() is a multiple of the bucket, or the codec scales per tensor by max |g|)."""
    return codec.decode(codec.encode(g.repeat(draws), key)).view(draws, -1)


class CodecContract:
    """Subclasses set ``cases`` (name -> codec configuration; the names key the golden file
    ``golden_file``) and :meth:`wire_bytes`.  Every test runs for every case."""

    cases: dict[str, Codec] = {}
    golden_file: str = ""
    #: False for codecs that draw nothing per rank (the payload ignores the encode key)
    keyed: bool = True
    #: what every element of an all-zero tensor decodes to (signSGD: sign(0) = +1)
    zero_decodes_to: float = 0.0

    def error_feedback(self, codec: Codec) -> bool:
        """Whether ``codec`` takes a residual; one that does not must refuse it (ValueError)."""
        return True

    def pytest_generate_tests(self, metafunc) -> None:
        if "case" in metafunc.fixturenames:
            metafunc.parametrize("case", list(self.cases))

    @pytest.fixture
    def codec(self, case: str) -> Codec:
        return self.cases[case]

    def wire_bytes(self, codec: Codec, n: int) -> int:
        raise NotImplementedError

    @pytest.mark.parametrize("n", [0, 1, 3, 7, 1000, 4099])
    def test_sizes_and_error_feedback(self, codec: Codec, n: int) -> None:
        """Exact wire size; error feedback r <- fl(g + r - D(C(g + r))), so D + r_new equals
        g + r_old up to the rounding of that one subtraction (1/2 ulp of r_new)."""
        torch.manual_seed(n)
        g, r = torch.randn(n), torch.randn(n) * 0.1
        v = g + r
        if not self.error_feedback(codec):
            with pytest.raises(ValueError):
                codec.encode(g, KEY, residual=r)
            r = None
        p = codec.encode(g, KEY, residual=r)
        assert p.nbytes == self.wire_bytes(codec, n)
        assert codec.payload_nbytes(n) == p.nbytes
        assert p.numel == n and all(t.is_contiguous() and t.dim() == 1 for t in p.parts.values())
        if r is None:
            return
        d = codec.decode(p)
        assert torch.equal(r, v - d)
        err = (d.double() + r.double() - v.double()).abs()
        assert bool((err <= r.double().abs() * 2.0 ** -24).all())
        q = codec.encode(v, KEY)
        assert payload_equal(p, q), "error feedback must encode exactly g + r"

    def test_all_zero(self, codec: Codec) -> None:
        p = codec.encode(torch.zeros(1003), KEY)
        assert torch.equal(codec.decode(p), torch.full((1003,), self.zero_decodes_to))
        assert all(int(t.view(torch.uint8).max()) == 0 for t in p.parts.values())

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
    def test_input_dtypes_and_layout(self, codec: Codec, dtype: torch.dtype) -> None:
        torch.manual_seed(1)
        x = torch.randn(40, 30, dtype=dtype)[:, ::3]               # non-contiguous
        assert payload_equal(codec.encode(x, KEY), codec.encode(x.contiguous().float().view(-1), KEY))

    @pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
    def test_non_finite_raises_with_name(self, codec: Codec, bad: float) -> None:
        x = torch.ones(10)
        x[3] = bad
        with pytest.raises(FloatingPointError, match="layer1.weight"):
            codec.encode(x, KEY, name="layer1.weight")

    def test_thread_count_independent(self, codec: Codec, monkeypatch) -> None:
        torch.manual_seed(4)
        x, r = torch.randn(5 * 8192 + 3), torch.randn(5 * 8192 + 3)
        results = []
        for threads in ("1", "2"):             # 2 threads split 5 tiles unevenly
            monkeypatch.setenv("HVD_COMPRESS_CPU_THREADS", threads)
            res = r.clone() if self.error_feedback(codec) else None
            p = codec.encode(x, KEY, residual=res)
            results.append((p, res, codec.decode_accumulate([p, p], x.clone())))
        for p, res, out in results[1:]:
            assert payload_equal(p, results[0][0])
            assert (res is None or torch.equal(res, results[0][1])) and torch.equal(out, results[0][2])

    def test_determinism(self, codec: Codec) -> None:
        torch.manual_seed(2)
        x = torch.randn(777)
        same = codec.encode(x, KEY)
        assert payload_equal(same, codec.encode(x.clone(), KEY))
        for other in (RandomKey(KEY.seed, KEY.step + 1, KEY.tensor_id), RandomKey(KEY.seed, KEY.step, 0),
                      RandomKey(KEY.seed ^ (1 << 63), KEY.step, KEY.tensor_id)):
            assert payload_equal(same, codec.encode(x, other)) != self.keyed

    def test_decode_accumulate_in_worker_order(self, codec: Codec) -> None:
        """out + D_0 + D_1 + D_2, added left to right in fp32."""
        torch.manual_seed(3)
        payloads = [codec.encode(torch.randn(1001) * 10 ** w, RandomKey(w, 1, 2)) for w in range(3)]
        out = torch.randn(1001)
        expected = out.clone()
        for p in payloads:
            expected = expected + codec.decode(p)
        assert codec.decode_accumulate(payloads, out) is out
        assert torch.equal(out, expected)

    def test_decode_accumulate_checks_payloads(self, codec: Codec) -> None:
        p = codec.encode(torch.randn(100), KEY)
        with pytest.raises(ValueError):
            codec.decode_accumulate([p], torch.zeros(99))
        with pytest.raises(ValueError):
            codec.decode_accumulate([p, codec.encode(torch.randn(96), KEY)], torch.zeros(100))
        with pytest.raises(ValueError):
            codec.decode_accumulate([], torch.zeros(100))

    def test_golden(self, codec: Codec, case: str) -> None:
        check_golden(codec, self.golden_file, case, error_feedback=self.error_feedback(codec))

    def test_gpu_golden(self, codec: Codec, case: str, kernels) -> None:
        check_golden(codec, self.golden_file, case, kernels, self.error_feedback(codec))

    @pytest.mark.parametrize("n", [1, 7, 4099, 3 * 8192 + 5, 1 << 21])
    def test_gpu_matches_cpu(self, codec: Codec, n: int, kernels) -> None:
        """CUDA == CPU bit for bit on fresh inputs: payload, residual, decoded sum of 3 workers."""
        gpu_matches_cpu(codec, n, kernels, error_feedback=self.error_feedback(codec))


def gpu_matches_cpu(codec: Codec, n: int, kernels, scale: float = 1.0, error_feedback: bool = True) -> None:
    """The CUDA path on ``kernels`` (a conftest.KernelTarget: a GPU or the emulator) gives the C
    reference's payloads, residual (worker 0 with ``error_feedback``) and decoded sum, bit for
    bit."""
    gen = torch.Generator().manual_seed(n)
    xs = [torch.randn(n, generator=gen) * scale for _ in range(3)]
    r_cpu = torch.randn(n, generator=gen) * 0.1
    r_gpu = kernels.put(r_cpu)
    out = torch.randn(n, generator=gen)
    ef = [error_feedback] + [False] * (len(xs) - 1)
    cpu_p = [codec.encode(x, RandomKey(w, 9, 4), residual=r_cpu if ef[w] else None)
             for w, x in enumerate(xs)]
    cpu_out = codec.decode_accumulate(cpu_p, out.clone())
    with kernels:
        gpu_p = [codec.encode(kernels.put(x), RandomKey(w, 9, 4), residual=r_gpu if ef[w] else None)
                 for w, x in enumerate(xs)]
        gpu_out = codec.decode_accumulate(gpu_p, kernels.put(out))
    for a, b in zip(cpu_p, gpu_p):
        assert payload_equal(a, codec.unpadded(b))
    assert torch.equal(r_cpu, r_gpu.cpu())
    assert torch.equal(cpu_out, gpu_out.cpu())


def golden_inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic inputs with the awkward values in them: zeros, a zero 512-bucket, exact and
    subnormal fp16 values, values beyond fp16's range, tiny values."""
    gen = torch.Generator().manual_seed(1234 + n)
    x = torch.randn(n, generator=gen) * torch.logspace(-3, 1, n).roll(n // 3)
    special = torch.tensor([0.0, -0.0, 1.0, -2.5, 65504.0, 70000.0, -1e5, 6e-8, -3e-6, 1e-30, 2 ** -24,
                            0.1, -0.3333])
    x[: min(n, special.numel())] = special[: min(n, special.numel())]
    if n > 1024:
        x[512:1024] = 0.0
    return x, torch.randn(n, generator=gen) * 0.01


def check_golden(codec: Codec, filename: str, case: str, kernels=None, error_feedback: bool = True) -> None:
    """The recorded payload bytes, residual and decoded values (tests/codecs/gen_golden.py) are
    reproduced by the C reference (``kernels`` None) or the CUDA path on ``kernels`` (a
    conftest.KernelTarget); without ``error_feedback`` the input alone is encoded."""
    data = np.load(DATA / filename)
    for n in data["sizes"]:
        x, r = (torch.from_numpy(data[f"{k}_{n}"]) for k in ("x", "r"))
        if kernels is not None:
            x, r = kernels.put(x), kernels.put(r)
        v = x + r if error_feedback else x
        with kernels or contextlib.nullcontext():
            p = codec.encode(x, KEY, residual=r if error_feedback else None)
            decoded = codec.decode(p)
            p = codec.unpadded(p)
        for part, t in p.parts.items():
            recorded = data[f"{case}_{n}_{part}"]
            assert np.array_equal(t.cpu().view(torch.uint8).numpy(), recorded), (case, n, part)
        recorded = data[f"{case}_{n}_decoded"]
        assert np.array_equal(decoded.cpu().numpy().view(np.uint32), recorded.view(np.uint32))
        if error_feedback:
            assert torch.equal(r, v - decoded)


def write_golden(filename: str, cases: dict[str, Codec], sizes=(1, 7, 1000, 4099),
                 error_feedback: Callable[[Codec], bool] = lambda codec: True) -> None:
    """Record, from the CPU path, each case's payload parts (as bytes) and decoded values for the
    inputs of :func:`golden_inputs` (stored too), error feedback on where the codec has it."""
    arrays: dict[str, np.ndarray] = {"sizes": np.array(sizes)}
    for n in sizes:
        x, r = golden_inputs(n)
        arrays[f"x_{n}"], arrays[f"r_{n}"] = x.numpy(), r.numpy()
        for case, codec in cases.items():
            res = r.clone() if error_feedback(codec) else None
            p = codec.encode(x, KEY, residual=res)
            for part, t in p.parts.items():
                arrays[f"{case}_{n}_{part}"] = t.view(torch.uint8).numpy()
            arrays[f"{case}_{n}_decoded"] = codec.decode(p).numpy()
    DATA.mkdir(exist_ok=True)
    np.savez_compressed(DATA / filename, **arrays)


def warp_sum(x: np.ndarray) -> np.float32:
    """hvdc_warp_sum in numpy fp32: lane j adds x[j], x[j + 32], ... in order, then the butterfly
    (zero padding only adds +0.0 to lanes, which never hold -0.0)."""
    lanes = np.zeros(32, np.float32)
    padded = np.concatenate([x.astype(np.float32), np.zeros(-len(x) % 32, np.float32)])
    for row in padded.reshape(-1, 32):
        lanes = lanes + row
    for off in (16, 8, 4, 2, 1):
        lanes[:off] = lanes[:off] + lanes[off:2 * off]
    return lanes[0]


def contract_sum(x: np.ndarray) -> np.float32:
    """The contract's long sum: warp sums of chunks of 8192, then of the partials, until one."""
    while True:
        parts = np.array([warp_sum(x[i:i + 8192]) for i in range(0, len(x), 8192)], np.float32)
        if len(parts) == 1:
            return parts[0]
        x = parts
