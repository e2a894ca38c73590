"""Checks for the codecs that take a bucket's tensors in one call (``encode_many`` /
``decode_many``: TernGrad, the sign codecs, random-k; top-k has its own in test_topk.py): every
tensor's payload, residual and decoded sum bit for bit those of its own ``encode`` /
``decode_accumulate``, on the host in one C call and on the device (the emulator, a GPU) in one
launch per kernel.  ``for_tensor(codec, key)`` is the codec a tensor gets on its own (random-k:
keyed with the tensor's id)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
import torch

from hvd_compress.backends import cpu
from hvd_compress.codecs.base import Codec, RandomKey
from quant_contract import payload_equal

ForTensor = Callable[[Codec, RandomKey], Codec]


def same(codec: Codec, key: RandomKey) -> Codec:
    return codec


def awkward_bucket() -> tuple[torch.Tensor, list[tuple[int, int, RandomKey]]]:
    """Tensors end to end: one element, three (a partial code byte), a constant one (sigma 0),
    one just over a sum chunk, one of nine chunks with a spike, zeros, one of 33 (a partial
    warp); and their segments (offset, numel, key)."""
    g = torch.Generator().manual_seed(3)
    parts = [torch.tensor([-2.0]), torch.randn(3, generator=g), torch.full((100,), 0.25),
             torch.randn(8192 + 5, generator=g), torch.randn(70_001, generator=g), torch.zeros(4000),
             torch.randn(33, generator=g)]
    parts[4][17] = 40.0
    offsets = np.cumsum([0] + [p.numel() for p in parts]).tolist()
    return torch.cat(parts), [(offsets[j], p.numel(), RandomKey(7, 2, 30 + j)) for j, p in enumerate(parts)]


def residual_for(x: torch.Tensor) -> torch.Tensor:
    return torch.randn(x.numel(), generator=torch.Generator().manual_seed(4)) * 0.1


def each(codec: Codec, x: torch.Tensor, segments, residual, for_tensor: ForTensor = same):
    return [for_tensor(codec, key).encode(x[o:o + n], key, residual=None if residual is None else residual[o:o + n])
            for o, n, key in segments]


def check_encode_many(monkeypatch, codec: Codec, ef: bool, c_name: str, for_tensor: ForTensor = same) -> None:
    """One C call (``c_name``) for the bucket gives every tensor its own encode's payload and
    residual."""
    calls = []
    real_call = cpu.call
    monkeypatch.setattr(cpu, "call", lambda name, *args: (calls.append(name), real_call(name, *args))[1])
    x, segments = awkward_bucket()
    r_many = residual_for(x) if ef else None
    r_each = r_many.clone() if ef else None
    many = codec.encode_many(x, segments, r_many)
    assert calls == [c_name]
    assert all(payload_equal(a, b) for a, b in zip(many, each(codec, x, segments, r_each, for_tensor)))
    if ef:
        assert torch.equal(r_many, r_each)


def check_decode_many(codec: Codec, wrong_size: Codec, for_tensor: ForTensor = same) -> None:
    """One call decodes every segment as its own decode does (workers in list order); a bad
    payload anywhere (``wrong_size``'s payload of 7 elements) raises before anything is
    written."""
    x, segments = awkward_bucket()
    workers = [codec.encode_many(x * (w + 1), segments, None) for w in range(3)]
    per_segment = [[workers[w][s] for w in range(3)] for s in range(len(segments))]
    start = torch.randn(x.numel(), generator=torch.Generator().manual_seed(5))
    many = codec.decode_many(per_segment, start.clone(), segments)
    expected = start.clone()
    for (o, n, key), ps in zip(segments, per_segment):
        for_tensor(codec, key).decode_accumulate(ps, expected[o:o + n])
    assert torch.equal(many, expected)
    per_segment[-1][1] = wrong_size.encode(torch.randn(7))
    out = start.clone()
    with pytest.raises(ValueError, match="payload 1"):
        codec.decode_many(per_segment, out, segments)
    assert torch.equal(out, start)


def check_many_on_device(codec: Codec, kernels, ef: bool) -> None:
    """The bucket in one launch per kernel (segment tables): the host's payloads, residual and
    decoded sums."""
    x, segments = awkward_bucket()
    r_cpu = residual_for(x) if ef else None
    r_dev = kernels.put(r_cpu) if ef else None
    host = codec.encode_many(x, segments, r_cpu)
    out_cpu = codec.decode_many([[p, p] for p in host], torch.ones(x.numel()), segments)
    with kernels:
        dev = codec.encode_many(kernels.put(x), segments, r_dev)
        out_dev = codec.decode_many([[p, p] for p in dev], kernels.put(torch.ones(x.numel())), segments)
    if kernels.emulated:    # the batched kernels ran, no per-tensor one
        launched = set(kernels.backend.launched)
        assert launched and all(name.startswith("hvdc_seg_") for name in launched), launched
    assert all(payload_equal(a, b) for a, b in zip(host, dev))
    if ef:
        assert torch.equal(r_cpu, r_dev.cpu())
    assert torch.equal(out_cpu, out_dev.cpu())
