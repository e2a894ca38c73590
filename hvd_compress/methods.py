"""The compressors users pass to ``hvd.DistributedOptimizer(compression=...)``.

Each is a :class:`hvd_compress.compressor.Compressor` (hence a Horovod ``Compressor``) around one
codec, with the defaults of its paper.  :func:`from_spec` builds one from a command-line string.
"""
from __future__ import annotations

import ast
import math

import torch

from .compressor import Compressor, _Caller, _ParamState


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


class DGC(TopK):
    """Deep Gradient Compression (Lin et al., ICLR 2018): top-k with sampled thresholds plus

    * **momentum correction**: the compressor keeps the momentum, ``u <- m u + g``, and
      accumulates ``v <- v + u`` (the error-feedback residual); the top entries of ``v`` are sent
      and zeroed in ``v``.  The wrapped optimizer must therefore have ``momentum=0`` (checked):
      momentum happens here, before sparsification, which is the point of the correction.
      Tensors below ``min_numel`` send ``u`` densely, i.e. plain momentum SGD.
    * **local gradient clipping** (optional): ``g <- g * min(1, clip_norm / (sqrt(N) ||g||))``
      per tensor before it enters ``u``, the paper's threshold scaled by ``N^-1/2``.
    * **momentum factor masking**: ``u`` is zeroed where ``v`` was sent, so stale momentum does
      not keep pushing the sent coordinates.
    * **sparsity warm-up**: over the first ``warmup_steps`` compressions of each tensor the
      density falls geometrically in four stages from ``warmup_ratio`` (DGC: 25%) to ``ratio``
      (25% -> 6.25% -> ... as the paper's 75%, 93.75%, 98.4%, 99.6%, 99.9%).
    """

    def __init__(self, ratio: float = 0.001, momentum: float = 0.9, *, clip_norm: float | None = None,
                 warmup_steps: int = 0, warmup_ratio: float = 0.25, sample_ratio: float = 0.01,
                 value_dtype: torch.dtype = torch.float16, min_numel: int = 1024, seed: int = 0) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if warmup_steps < 0 or not 0 < ratio <= warmup_ratio <= 1:
            raise ValueError("need warmup_steps >= 0 and 0 < ratio <= warmup_ratio <= 1")
        super().__init__(ratio=ratio, sample_ratio=sample_ratio, value_dtype=value_dtype,
                         error_feedback=True, min_numel=min_numel, seed=seed)
        self.momentum = momentum
        self.clip_norm = clip_norm
        self.warmup_steps = warmup_steps
        self.warmup_ratio = warmup_ratio
        self._codecs: dict = {}

    #: the wrapped optimizer must not apply momentum again (examples/ read this)
    owns_momentum = True

    def __repr__(self) -> str:
        return (f"{super().__repr__()[:-1]}, momentum={self.momentum}, clip_norm={self.clip_norm}, "
                f"warmup_steps={self.warmup_steps}, warmup_ratio={self.warmup_ratio})")

    _STAGES = 4

    def density(self, step: int) -> float:
        """Fraction of entries sent at a tensor's ``step``-th compression."""
        if step >= self.warmup_steps:
            return self.codec.ratio
        stage = step * self._STAGES // self.warmup_steps
        return self.warmup_ratio * (self.codec.ratio / self.warmup_ratio) ** (stage / self._STAGES)

    def _codec_at(self, step: int):
        density = self.density(step)
        if density not in self._codecs:  # at most 5: the warm-up stages and the final ratio
            from .codecs.topk import TopKCodec
            c = self.codec
            self._codecs[density] = TopKCodec(ratio=density, sample_ratio=c.sample_ratio,
                                              value_dtype=c.value_dtype, exact_k=c.exact_k, mode=c.mode)
        return self._codecs[density]

    def _prepare(self, tensor: torch.Tensor, state: _ParamState, caller: _Caller) -> torch.Tensor:
        if state.momentum is None:
            _require_no_optimizer_momentum(caller)
            state.momentum = torch.zeros(tensor.numel(), dtype=torch.float32, device=tensor.device)
        g = tensor.detach().reshape(-1).to(torch.float32)
        if self.clip_norm is not None:
            size = caller.process_set.size() if caller.process_set is not None else _size()
            bound = self.clip_norm / math.sqrt(size)
            g = g * torch.clamp(bound / (g.norm() + 1e-12), max=1.0)
        return state.momentum.mul_(self.momentum).add_(g)

    def _after_encode(self, payload, state: _ParamState) -> None:
        state.momentum.index_fill_(0, payload.parts["indices"].long(), 0.0)


def _size() -> int:
    import horovod.torch as hvd
    return hvd.size()


def _require_no_optimizer_momentum(caller: _Caller) -> None:
    for group in caller.optimizer.param_groups:
        if any(p is caller.param for p in group["params"]) and group.get("momentum", 0):
            raise ValueError(
                f"DGC applies momentum itself (momentum correction, Lin et al. 2018) but the "
                f"optimizer has momentum={group['momentum']} for {caller.name}: build the optimizer "
                f"with momentum=0 and pass the momentum to DGC(momentum=...)")


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
    "terngrad": TernGrad, "qsgd": QSGD, "topk": TopK, "dgc": DGC, "fp16": FP16,
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
