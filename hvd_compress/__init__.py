"""hvd_compress: gradient compression for Horovod.

Layers, bottom to top (each usable without the ones above it):

* :mod:`hvd_compress.codecs`: pure tensor transforms (TernGrad, QSGD, top-k with sampled
  thresholds, stochastic fp16) with a C reference on the CPU and CuPy/NVRTC kernels on the GPU,
  bit-identical to each other.  Needs neither Horovod nor a GPU nor CuPy.
* :mod:`hvd_compress.comm`: which collective carries which payload.  Needs Horovod.
* :mod:`hvd_compress.compressor` / :mod:`hvd_compress.methods`: Horovod ``Compressor`` objects
  for ``hvd.DistributedOptimizer(compression=...)``: ``TernGrad``, ``QSGD``, ``TopK``, ``DGC``, ``FP16``,
  and ``from_spec("topk:ratio=0.01")``; ``DistributedOptimizer`` adds per-parameter
  compressor maps to Horovod's.  Imported on first use, so ``import hvd_compress`` works
  without Horovod.
"""
__version__ = "0.1.0"

_HOROVOD_LAYER = {"TernGrad", "QSGD", "TopK", "DGC", "FP16", "from_spec"}
__all__ = sorted(_HOROVOD_LAYER) + ["Compressor", "DistributedOptimizer"]


def __getattr__(name: str):
    if name in _HOROVOD_LAYER:
        from . import methods
        return getattr(methods, name)
    if name == "DistributedOptimizer":
        from .optimizer import DistributedOptimizer
        return DistributedOptimizer
    if name == "Compressor":
        from .compressor import Compressor
        return Compressor
    raise AttributeError(f"module 'hvd_compress' has no attribute {name!r}")
