"""LAQ's innovation quantizer (hvd_compress/codecs/laq.py; Sun, Chen, Giannakis, Yang, NeurIPS
2019) as a kernel-backed codec: the C reference and the CUDA kernels (here on the SIMT emulator)
against a plain-torch statement of the formula, bit for bit; the empty payload; CUDA == CPU and
golden vectors through the shared contract.  (The paper's grid and the method: test_lazy_diff.py.)"""
from __future__ import annotations

import pytest
import torch

from hvd_compress.codecs.laq import InnovationCodec, pack_codes
from quant_contract import KEY, CodecContract, payload_equal

CASES = {"laq2": InnovationCodec(bits=2), "laq4": InnovationCodec(bits=4), "laq8": InnovationCodec(bits=8)}


def torch_statement(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(radius, packed codes) in plain torch fp32: R = max |x|, step = (R + R) / L,
    q = clamp(floor((x + R) / step + 1/2), 0, L)."""
    top = (1 << bits) - 1
    radius = x.abs().amax().reshape(1)
    step = (radius + radius) / top
    q = torch.floor((x + radius) / step + 0.5).clamp_(0, top)
    return radius, pack_codes(q.to(torch.int32), bits)


class TestInnovationCodec(CodecContract):
    """Deterministic (no per-rank draws), no error feedback (the innovation is LAQ's memory)."""
    cases = CASES
    golden_file = "laq_golden.npz"
    keyed = False

    def error_feedback(self, codec) -> bool:
        return False

    def wire_bytes(self, codec: InnovationCodec, n: int) -> int:
        return codec.n_code_bytes(n) + 4 if n else 0

    @pytest.mark.parametrize("n", [0, 1, 3, 7, 1000, 4099])
    def test_sizes_and_error_feedback(self, codec, n: int) -> None:
        """ceil(n b / 8) + 4 bytes per upload (the size depends on whether R = 0: not fixed-size);
        a residual is refused."""
        g = torch.randn(n, generator=torch.Generator().manual_seed(n))
        with pytest.raises(ValueError, match="error feedback"):
            codec.encode(g, KEY, residual=torch.zeros(n))
        p = codec.encode(g, KEY)
        assert p.nbytes == self.wire_bytes(codec, n) and p.numel == n
        assert all(t.is_contiguous() and t.dim() == 1 for t in p.parts.values())

    def test_all_zero(self, codec) -> None:
        """R = 0 is the empty payload (what a skipped upload sends), and decodes to nothing."""
        p = codec.encode(torch.zeros(1003), KEY)
        assert p.nbytes == 0 and torch.equal(codec.decode(p), torch.zeros(1003))
        out = torch.randn(1003)
        assert torch.equal(codec.decode_accumulate([p, p], out.clone()), out)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n", [1, 5, 1001, 70_003])
def test_matches_the_torch_statement(bits: int, n: int) -> None:
    """Radius and codes equal the plain-torch fp32 statement; dQ = q step - R likewise (on
    values over six decades, so the grid's rounding ties and saturation at both ends occur)."""
    gen = torch.Generator().manual_seed(n + bits)
    x = torch.randn(n, generator=gen) * torch.logspace(-3, 3, n)[torch.randperm(n, generator=gen)]
    codec = InnovationCodec(bits=bits)
    p = codec.encode(x)
    radius, codes = torch_statement(x, bits)
    assert torch.equal(p.parts["radius"], radius) and torch.equal(p.parts["codes"], codes)
    step = (radius + radius) / codec.top
    q = torch.floor((x + radius) / step + 0.5).clamp_(0, codec.top)
    assert torch.equal(codec.innovation(p), torch.zeros(n) + (q * step - radius))


def test_empty_payloads_among_uploads(kernels) -> None:
    """Workers that skipped (empty payloads) add nothing, on the CUDA path too, wherever they are
    in the list; the others add in list order."""
    codec = InnovationCodec(bits=4)
    xs = [torch.randn(777, generator=torch.Generator().manual_seed(w)) for w in range(3)]
    xs[1] = torch.zeros(777)
    out = torch.randn(777)
    cpu = codec.decode_accumulate([codec.encode(x) for x in xs], out.clone())
    assert torch.equal(cpu, out + codec.innovation(codec.encode(xs[0])) + codec.innovation(codec.encode(xs[2])))
    with kernels:
        payloads = [codec.encode(kernels.put(x)) for x in xs]
        gpu = codec.decode_accumulate(payloads, kernels.put(out))
    assert payloads[1].nbytes == 0 and payload_equal(payloads[0], codec.encode(xs[0]))
    assert torch.equal(gpu.cpu(), cpu)


def test_radius_nan_wins() -> None:
    """A NaN in v makes R NaN, as torch.amax does (the engine then rejects the step)."""
    x = torch.ones(100)
    x[17] = float("nan")
    assert torch.isnan(InnovationCodec().radius(x)).all()
