"""The Horovod adaptor: this package's methods as Horovod compressors.

* :class:`~.compressor.Compressor` holds methods and the engine of each optimizer it serves;
  ``hvd_compress.TernGrad(...)`` is :func:`compressor_class` of ``methods.TernGrad``.
* :func:`~.optimizer.DistributedOptimizer`: Horovod's, plus per-parameter maps and the
  compressor state in ``optimizer.state_dict()``.
* :mod:`.elastic` (``hvd.elastic.TorchState`` support) and :mod:`.checkpoint` (one file for
  every rank's state).

Importing this package does not import Horovod; using it does.
"""
from __future__ import annotations

from typing import Any

from .compressor import Compressor, MethodCompressor, as_compressor, compressor_class
from .optimizer import DistributedOptimizer, PerParameterCompressor

__all__ = ["Compressor", "MethodCompressor", "PerParameterCompressor", "DistributedOptimizer",
           "as_compressor", "compressor_class", "from_spec"]


def from_spec(spec: str, **defaults: Any) -> MethodCompressor:
    """The Horovod compressor of :func:`hvd_compress.methods.from_spec` (same arguments):
    ``from_spec("topk:ratio=0.001")`` is ``hvd_compress.TopK(ratio=0.001)``."""
    from ..methods import from_spec as method_from_spec
    method = method_from_spec(spec, **defaults)
    return MethodCompressor.of(method)
