"""hvd_compress: gradient compression for Horovod.

Codecs (:mod:`hvd_compress.codecs`, usable alone: no Horovod, no GPU needed) under routes
(:mod:`hvd_compress.routes`) under the engine (:mod:`hvd_compress.engine`) under the Horovod
adaptor and the compressors users name (``TernGrad()``, ``QSGD()``, ``TopK()``, ... and
``from_spec("topk:ratio=0.01")``); docs/design.md ("Layers") has the map.  Horovod is imported
on first use only.
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
