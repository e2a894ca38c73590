"""hvd_compress: gradient compression for Horovod.

Codecs (:mod:`hvd_compress.codecs`, usable alone: no Horovod, no GPU needed) under routes
(:mod:`hvd_compress.routes`) under the engine (:mod:`hvd_compress.engine`) under the Horovod
adaptor and the compressors users name (``TernGrad()``, ``QSGD()``, ``TopK()``, ... and
``from_spec("topk:ratio=0.01")``); docs/design.md ("Layers") has the map.  Horovod is imported
on first use only.
"""
__version__ = "0.3.0"

#: names exported lazily (importing them needs torch; Horovod only on first use) -> module;
#: the compressors come from the methods' registry (:data:`hvd_compress.methods.REGISTRY`)
_LAZY = {"from_spec": "methods", "Compressor": "adaptor", "Link": "routes.base",
         "DistributedOptimizer": "optimizer", "LocalSGD": "local_sgd", "DelayedAveraging": "delayed"}


def _compressors() -> dict:
    """Class name -> method class, for every registered method."""
    from .methods import REGISTRY
    return {cls.__name__: cls for cls in REGISTRY.values()}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name == "__all__":
        return sorted([*_LAZY, *_compressors()])
    if not name.startswith("_"):
        compressors = _compressors()
        if name in compressors:
            return compressors[name]
    raise AttributeError(f"module 'hvd_compress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY, *_compressors()])
