"""Regenerate tests/data/topk_golden.npz: small deterministic inputs of the top-k codec with the
payloads, residuals and decoded sums the CPU reference produces for them.

    PYTHONPATH=. python tests/codecs/gen_golden_topk.py

Inputs are stored with the outputs.  tests/codecs/test_topk.py checks that the CPU path reproduces every
array bit for bit and that the CUDA path does too (on a GPU).  Only regenerate after an intended change of the wire format or of the
selection rule, and say so in the commit.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hvd_compress.codecs.base import RandomKey
from hvd_compress.codecs.topk import TopKCodec

PATH = Path(__file__).resolve().parents[1] / "data" / "topk_golden.npz"

#: name -> (codec arguments, n, input kind, residual: None (no error feedback) or the scale of a
#: normal initial residual, key); see inputs().
CASES: dict[str, tuple[dict, int, str, float | None, RandomKey]] = {
    # stride 33 sample (n >= 33 * 64 / ratio), fp16 values, error feedback
    "sampled_fp16_ef": (dict(ratio=0.4), 6000, "normal", 0.25, RandomKey(11, 3, 5)),
    "sampled_fp32": (dict(ratio=0.01, value_dtype=torch.float32), 4099, "heavy", None,
                     RandomKey(2, 0, 1)),
    "exact_fp16_ties": (dict(ratio=0.05, mode="exact"), 1027, "ties", 0.25, RandomKey(5, 9, 0)),
    # exact ties: thr selects far more than 1.3 k, so the band above it fills k in index order
    "sampled_band_ties": (dict(ratio=0.05), 4099, "ties", None, RandomKey(7, 1, 2)),
    "threshold_fp32_ef": (dict(mode="threshold", threshold=1.5, value_dtype=torch.float32), 1000,
                          "normal", 0.25, RandomKey(0, 0, 0)),
    "exact_k_mostly_zeros": (dict(ratio=0.2, exact_k=True), 37, "sparse", None, RandomKey(1, 1, 1)),
    # every value sent: fp16 saturation, ties to even, subnormals; residual keeps the rest
    "fp16_rounding": (dict(ratio=1.0, exact_k=True), 16, "fp16_edges", 0.0, RandomKey(3, 0, 0)),
}
#: decode_accumulate golden: payloads of "sampled_fp16_ef" at these steps, added to its input.
DECODE_STEPS = (0, 1, 2)


def inputs(kind: str, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(n, generator=gen)
    if kind == "heavy":                               # Cauchy: ratio of two normals
        return torch.randn(n, generator=gen) / torch.randn(n, generator=gen)
    if kind == "ties":
        return torch.randint(-3, 4, (n,), generator=gen).float()
    if kind == "sparse":
        x = torch.zeros(n)
        x[torch.randperm(n, generator=gen)[:3]] = torch.randn(3, generator=gen)
        return x
    if kind == "fp16_edges":                          # saturation, ties to even, subnormals
        return torch.tensor([1e6, -7e4, 65519.0, 65520.0, 65504.0, 1.0 + 2 ** -11,
                             1.0 + 3 * 2 ** -11, 2 ** -24, 2 ** -25, 3 * 2 ** -26, 1e-30, -0.0,
                             0.1, -1e-5, 2049.0, 3.0e-8])
    raise ValueError(kind)


def case_inputs(name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(g, residual or None) of a golden case: stored in the file, so torch's RNG may change."""
    _, n, kind, scale, _ = CASES[name]
    return inputs(kind, n, seed=n), (None if scale is None else inputs("normal", n, n + 1) * scale)


def run_case(name: str, g: torch.Tensor, r: torch.Tensor | None, key: RandomKey | None = None):
    """Payload of a golden case; updates ``r`` (error feedback) in place."""
    kwargs, _, _, _, case_key = CASES[name]
    return TopKCodec(**kwargs).encode(g, key or case_key, residual=r)


def run_decode(g: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """g + the payloads of "sampled_fp16_ef" (inputs g, r) at DECODE_STEPS, added in that order."""
    kwargs, _, _, _, key = CASES["sampled_fp16_ef"]
    payloads = [run_case("sampled_fp16_ef", g, r.clone(), RandomKey(key.seed, s, key.tensor_id))
                for s in DECODE_STEPS]
    return TopKCodec(**kwargs).decode_accumulate(payloads, g.clone())


def values_array(values: torch.Tensor) -> np.ndarray:
    """fp16 values stored as their int16 bit patterns, fp32 as is."""
    return (values.view(torch.int16) if values.dtype == torch.float16 else values).cpu().numpy()


def generate() -> dict[str, np.ndarray]:
    arrays = {}
    for name in CASES:
        g, r = case_inputs(name)
        arrays[f"{name}/g"] = g.numpy()
        if r is not None:
            arrays[f"{name}/r"] = r.numpy().copy()
        payload = run_case(name, g, r)
        arrays[f"{name}/indices"] = payload.parts["indices"].numpy()
        arrays[f"{name}/values"] = values_array(payload.parts["values"])
        if r is not None:
            arrays[f"{name}/residual"] = r.numpy()
    g, r = case_inputs("sampled_fp16_ef")
    arrays["decode/out"] = run_decode(g, r).numpy()
    return arrays


if __name__ == "__main__":
    PATH.parent.mkdir(exist_ok=True)
    np.savez_compressed(PATH, **generate())
    print(f"wrote {PATH} ({PATH.stat().st_size} bytes)")
