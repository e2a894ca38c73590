"""hvd_compress: gradient compression for Horovod and PyTorch DDP.

Codecs (:mod:`hvd_compress.codecs`, usable alone: no Horovod, no GPU needed) under routes
(:mod:`hvd_compress.routes`) under the engine (:mod:`hvd_compress.engine`), which runs the
methods (:mod:`hvd_compress.methods`, the algorithms); the framework adaptors serve them to
Horovod (:mod:`hvd_compress.horovod`) and to PyTorch DDP (:mod:`hvd_compress.ddp`).  The names
exported here are what a Horovod script passes as ``compression=`` (and what
``hvd_compress.ddp.State`` takes): ``TernGrad()``, ``QSGD()``, ``TopK()``, ... (each the Horovod
compressor of the method of that name) and ``from_spec("topk:ratio=0.01")``; docs/design.md
("Layers") has the map.  Horovod is imported on first use only.
"""
__version__ = "0.4.0"

#: names exported lazily (importing them needs torch; Horovod only on first use) -> module;
#: the compressors come from the methods' registry (:data:`hvd_compress.methods.REGISTRY`)
_LAZY = {"from_spec": "horovod", "Compressor": "horovod", "Link": "routes.base",
         "DistributedOptimizer": "horovod", "LocalSGD": "local_sgd", "DelayedAveraging": "delayed"}


def _compressors() -> dict:
    """Class name -> Horovod compressor class, for every registered method."""
    from .horovod import compressor_class
    from .methods import REGISTRY
    return {cls.__name__: compressor_class(cls) for cls in REGISTRY.values()}


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
