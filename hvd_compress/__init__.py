"""hvd_compress: gradient compression for Horovod.

Layers, bottom to top (each usable without the ones above it):

* :mod:`hvd_compress.codecs`: pure tensor transforms (TernGrad, QSGD, top-k with sampled
  thresholds, stochastic fp16) with a C reference on the CPU and CuPy/NVRTC kernels on the GPU,
  bit-identical to each other.  Needs neither Horovod nor a GPU nor CuPy.
* :mod:`hvd_compress.routes`: how one bucket's payloads travel (dense, summable allreduce,
  allgather, two-phase quantized, two-phase sparse).
* :mod:`hvd_compress.engine`: buckets, the plan (a route per bucket), transactional state, the
  step lifecycle.
* :mod:`hvd_compress.adaptor` / :mod:`hvd_compress.methods`: Horovod ``Compressor`` objects for
  ``hvd.DistributedOptimizer(compression=...)``: ``TernGrad``, ``QSGD``, ``TopK``, ``DGC``,
  ``FP16``, and ``from_spec("topk:ratio=0.01")``; ``DistributedOptimizer`` adds per-parameter
  maps and the compressor state in ``state_dict()``.  Horovod is imported on first use only.
* :mod:`hvd_compress.local_sgd` / :mod:`hvd_compress.delayed`: optimizers used in place of
  ``hvd.DistributedOptimizer`` that average less often (``LocalSGD``) or late
  (``DelayedAveraging``), optionally through a compressor.
"""
__version__ = "0.3.0"

_LAZY = {"TernGrad": "methods", "QSGD": "methods", "TopK": "methods", "DGC": "methods",
         "FP16": "methods", "OneBit": "methods", "EFSignSGD": "methods", "SignSGD": "methods",
         "RandomK": "methods", "Sketch": "methods", "PowerSGD": "methods", "GradDrop": "methods",
         "AdaComp": "methods", "STC": "methods", "from_spec": "methods", "Compressor": "adaptor",
         "Link": "routes.base", "DistributedOptimizer": "optimizer", "LocalSGD": "local_sgd",
         "DelayedAveraging": "delayed",
         "ESGD": "methods", "LAQ": "methods", "DIANA": "methods"}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'hvd_compress' has no attribute {name!r}")
