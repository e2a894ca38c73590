"""``hvd_compress.DistributedOptimizer``: Horovod's, plus what a single ``compression=`` object
cannot express, and its compressor state in ``state_dict()``.

Same signature as ``horovod.torch.DistributedOptimizer``; ``compression`` may also be a mapping
from parameter-name patterns (``fnmatch`` style, first match wins) to compressors, e.g.::

    opt = hvd_compress.DistributedOptimizer(
        opt, named_parameters=model.named_parameters(),
        compression={"embedding.*": hvd_compress.TopK(ratio=0.001),
                     "*.bias": hvd.Compression.none,
                     "*": hvd_compress.QSGD(bits=4)})

A parameter no pattern matches is sent uncompressed.  Inside a map ``hvd.Compression.none`` and
``hvd.Compression.fp16`` mean what they mean in Horovod (fp32, or fp16 rounded to nearest); the
whole map runs in one engine (buckets per method).  Compared with the stock optimizer:

* the engine is built at construction, so misuse (an optimizer DGC cannot serve, op=Min...)
  raises here rather than in ``synchronize()``;
* ``state_dict()`` holds the compressor state under ``"hvd_compress"`` and ``load_state_dict``
  restores it (so ``hvd.elastic.TorchState(optimizer=...)`` saves and restores it too);
* ``compression_stats()`` and ``compression_plan()``.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Mapping

import torch

from ..methods import FP16, Dense, Method
from ..routes.base import Link
from .compressor import Compressor, MethodCompressor, _FailedEngine


def _horovod_builtins() -> tuple[Any, Any]:
    """Horovod's ``Compression.none`` and ``Compression.fp16`` (None, None without Horovod)."""
    try:
        from horovod.torch.compression import Compression
    except ImportError:
        return None, None
    return Compression.none, Compression.fp16


class PerParameterCompressor(Compressor):
    """Serves each parameter with the compressor of the first pattern its name matches: an
    hvd_compress method (given as ``hvd_compress.TopK(...)`` or ``hvd_compress.methods.TopK(...)``)
    or any other Horovod compressor, used as it is."""

    def __init__(self, mapping: Mapping[str, object], *, bucket_cap_mb: float = 25.0,
                 link: Link | str = "auto") -> None:
        if not mapping:
            raise ValueError("compression map is empty")
        super().__init__(bucket_cap_mb=bucket_cap_mb, link=link)
        self._none = Dense(bucket_cap_mb=bucket_cap_mb)
        self._fp16 = FP16(stochastic=False, min_numel=0, route="allreduce", bucket_cap_mb=bucket_cap_mb)
        none, fp16 = _horovod_builtins()
        builtin = {id(none): self._none, id(fp16): self._fp16}
        self.mapping = {pattern: c.method if isinstance(c, MethodCompressor) else builtin.get(id(c), c)
                        for pattern, c in mapping.items()}
        for pattern, c in self.mapping.items():
            if isinstance(c, Compressor) or not (isinstance(c, Method) or hasattr(c, "compress")
                                                 and hasattr(c, "decompress")):
                raise TypeError(f"compression map entry {pattern!r}: {c!r} is not a compressor of one "
                                "method (or another Horovod compressor)")

    def __repr__(self) -> str:
        return f"PerParameterCompressor({self.mapping!r}, bucket_cap_mb={self.bucket_cap_mb})"

    def method_for(self, name: str):
        return next((c for pattern, c in self.mapping.items() if fnmatch.fnmatchcase(name, pattern)),
                    self._none)


def _state_dict(self):
    state = super(self.__class__, self).state_dict()
    state["hvd_compress"] = self._compression.state_dict()
    return state


def _load_state_dict(self, state_dict):
    state_dict = dict(state_dict)
    compression = state_dict.pop("hvd_compress", None)
    if compression is not None:     # first: it checks everything before it changes anything
        self._compression.load_state_dict(compression)
    self._hvd_load_state_dict(state_dict)


def DistributedOptimizer(optimizer: torch.optim.Optimizer, named_parameters=None, compression=None,
                         *, bucket_cap_mb: float | None = None, link: Link | str | None = None, **kwargs):
    """``horovod.torch.DistributedOptimizer`` with ``compression`` also accepting a
    pattern -> compressor mapping (see the module docstring).  ``bucket_cap_mb`` and ``link``
    apply to a map (single compressors take them as their own arguments).  Every other argument
    is Horovod's."""
    import horovod.torch as hvd
    from horovod.torch.optimizer import _DistributedOptimizer
    if compression is None:
        compression = hvd.Compression.none
    if isinstance(compression, Mapping):
        if named_parameters is None:
            raise ValueError("a compression map needs named_parameters= to match names against")
        compression = PerParameterCompressor(compression, bucket_cap_mb=25.0 if bucket_cap_mb is None
                                             else bucket_cap_mb, link=link or "auto")
    elif bucket_cap_mb is not None or link is not None:
        raise ValueError("bucket_cap_mb= and link= go to the compressor itself (or use a map)")
    opt = hvd.DistributedOptimizer(optimizer, named_parameters=named_parameters,
                                   compression=compression, **kwargs)
    if not isinstance(compression, Compressor):
        return opt
    if opt._grad_accs:  # hooks registered (more than one rank, or elastic): build the engine now
        engine = compression.engine(opt)
        if isinstance(engine, _FailedEngine):
            raise ValueError(engine.message)
    # Horovod's class calls super(self.__class__, self): add methods to a sibling class with the
    # same base (the user's optimizer class), not to a subclass.
    cls = type(opt)
    opt.__class__ = type(cls.__name__, cls.__bases__, {
        **cls.__dict__, "state_dict": _state_dict, "load_state_dict": _load_state_dict,
        "_hvd_load_state_dict": _DistributedOptimizer.load_state_dict,
        "compression_stats": lambda self: self._compression.stats(),
        "compression_plan": lambda self: self._compression.plan()})
    return opt
