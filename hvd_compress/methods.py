"""The compressors users pass to ``hvd.DistributedOptimizer(compression=...)``.

Each is a :class:`hvd_compress.compressor.Compressor` (hence a Horovod ``Compressor``) around one
codec, with the defaults of its paper.  :func:`from_spec` builds one from a command-line string.
"""
from __future__ import annotations

import ast

import torch

from .compressor import Compressor


class TernGrad(Compressor):
    """TernGrad (Wen et al., NeurIPS 2017): ``s * sign(g) * b``, ``b ~ Bernoulli(|g|/s)``,
    ``s = max|g|`` per tensor (or per bucket) after clipping at ``clip * sigma``; 2 bits per
    element + fp32 scales on the wire.  Unbiased without clipping; error feedback optional."""

    def __init__(self, clip: float | None = 2.5, bucket_size: int | None = None, *,
                 error_feedback: bool = False, min_numel: int = 1024, seed: int = 0) -> None:
        from .codecs.terngrad import TernGradCodec
        super().__init__(TernGradCodec(bucket_size=bucket_size, clip=clip),
                         error_feedback=error_feedback, min_numel=min_numel, seed=seed)


class QSGD(Compressor):
    """QSGD (Alistarh et al., NeurIPS 2017): unbiased stochastic rounding of ``|g_i| / ||g||``
    to ``2^(bits-1) - 1`` levels per bucket; ``bits`` per element + one fp32 norm per bucket."""

    def __init__(self, bits: int = 4, bucket_size: int = 512, *, error_feedback: bool = False,
                 min_numel: int = 1024, seed: int = 0) -> None:
        from .codecs.qsgd import QSGDCodec
        super().__init__(QSGDCodec(bits=bits, bucket_size=bucket_size),
                         error_feedback=error_feedback, min_numel=min_numel, seed=seed)


class TopK(Compressor):
    """Top-k sparsification with sampled thresholds (Lin et al., DGC, ICLR 2018; Aji & Heafield,
    EMNLP 2017): send the ``ratio`` largest-magnitude entries as (int32 index, fp16 value) through
    a sparse allgather; error feedback on by default (what is not sent accumulates)."""

    def __init__(self, ratio: float = 0.01, sample_ratio: float = 0.01, *,
                 value_dtype: torch.dtype = torch.float16, exact_k: bool | None = None,
                 mode: str = "sampled", threshold: float | None = None, error_feedback: bool = True,
                 min_numel: int = 1024, seed: int = 0) -> None:
        from .codecs.topk import TopKCodec
        super().__init__(TopKCodec(ratio=ratio, sample_ratio=sample_ratio, value_dtype=value_dtype,
                                   exact_k=exact_k, mode=mode, threshold=threshold),
                         error_feedback=error_feedback, min_numel=min_numel, seed=seed)


class FP16(Compressor):
    """fp32 -> fp16 with unbiased stochastic rounding (or round-to-nearest with
    ``stochastic=False``); the payload is summed by Horovod's own allreduce."""

    def __init__(self, stochastic: bool = True, *, error_feedback: bool = False,
                 min_numel: int = 1024, seed: int = 0) -> None:
        from .codecs.fp16 import StochasticFP16Codec
        if not stochastic:
            raise NotImplementedError("FP16(stochastic=False) is Horovod's hvd.Compression.fp16")
        super().__init__(StochasticFP16Codec(), error_feedback=error_feedback,
                         min_numel=min_numel, seed=seed)


_METHODS: dict[str, type[Compressor]] = {
    "terngrad": TernGrad, "qsgd": QSGD, "topk": TopK, "fp16": FP16,
}


def from_spec(spec: str) -> Compressor:
    """Build a compressor from ``"name"`` or ``"name:key=value,key=value"``, e.g.
    ``"topk:ratio=0.001"``, ``"qsgd:bits=8,bucket_size=1024"``, ``"terngrad:clip=None"``.
    Values are Python literals; ``value_dtype=float32`` names a torch dtype."""
    name, _, arg_text = spec.strip().partition(":")
    method = _METHODS.get(name.strip().lower())
    if method is None:
        raise ValueError(f"unknown compressor {name!r} in spec {spec!r}; known: {', '.join(sorted(_METHODS))}")
    kwargs = {}
    for item in filter(None, (a.strip() for a in arg_text.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"spec {spec!r}: expected key=value, got {item!r}")
        key = key.strip()
        if key == "value_dtype":
            kwargs[key] = getattr(torch, value.strip())
            continue
        try:
            kwargs[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key] = value.strip()
    try:
        return method(**kwargs)
    except TypeError as e:
        raise ValueError(f"spec {spec!r}: {e}") from None
