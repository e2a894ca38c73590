"""The compressors users name: ``hvd.DistributedOptimizer(..., compression=hvd_compress.TernGrad())``.

One module per family (quantizers, sparsifiers, signs, low rank) and one per stateful algorithm
(dgc, esgd, laq, diana), on the base of :mod:`.base` (the shared options, the registry).  A new
method: see docs/adding-a-method.md.
"""
from . import dgc, diana, esgd, laq, low_rank, quantizers, signs, sparsifiers  # noqa: F401 - they register
from .base import REGISTRY, Dense, Method, register
from .dgc import DGC
from .diana import DIANA
from .esgd import ESGD
from .laq import LAQ
from .low_rank import PowerSGD
from .quantizers import FP16, QSGD, Sketch, TernGrad
from .signs import EFSignSGD, OneBit, SignSGD
from .sparsifiers import STC, AdaComp, GradDrop, RandomK, TopK
from .spec import from_spec, parse_spec

__all__ = ["REGISTRY", "Dense", "Method", "register", "from_spec", "parse_spec",
           *(cls.__name__ for cls in REGISTRY.values())]
