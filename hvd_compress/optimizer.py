"""``hvd_compress.DistributedOptimizer``: Horovod's, plus what a single ``compression=`` object
cannot express.

Same signature as ``horovod.torch.DistributedOptimizer``; ``compression`` may also be a mapping
from parameter-name patterns (``fnmatch`` style, first match wins) to compressors, e.g.::

    opt = hvd_compress.DistributedOptimizer(
        opt, named_parameters=model.named_parameters(),
        compression={"embedding.*": hvd_compress.TopK(ratio=0.001),
                     "*.bias": hvd.Compression.none,
                     "*": hvd_compress.QSGD(bits=4)})

A parameter no pattern matches is sent uncompressed.  ``optimizer.compression_stats()`` sums
the byte counters of every hvd_compress compressor in use.
"""
from __future__ import annotations

import fnmatch
from typing import Mapping

import torch
from horovod.torch.compression import Compression, Compressor as _HorovodCompressor

from .compressor import _calling_optimizer


class PerParameterCompressor(_HorovodCompressor):
    """Dispatches each gradient to the compressor of the first pattern its name matches."""

    def __init__(self, mapping: Mapping[str, object]) -> None:
        if not mapping:
            raise ValueError("compression map is empty")
        self.mapping = dict(mapping)
        self._by_name: dict[str, object] = {}

    def _for(self, tensor: torch.Tensor):
        name = _calling_optimizer(tensor).name
        if name not in self._by_name:
            self._by_name[name] = next((c for pattern, c in self.mapping.items()
                                        if fnmatch.fnmatchcase(name, pattern)), Compression.none)
        return self._by_name[name]

    def compress(self, tensor: torch.Tensor):
        compressor = self._for(tensor)
        compressed, ctx = compressor.compress(tensor)
        return compressed, (compressor, ctx)

    def decompress(self, tensor: torch.Tensor, ctx):
        compressor, inner = ctx
        return compressor.decompress(tensor, inner)

    def stats(self) -> dict[str, int]:
        total = {"bytes_sent": 0, "bytes_received": 0, "bytes_dense": 0}
        for compressor in {id(c): c for c in self.mapping.values()}.values():
            for key, value in getattr(compressor, "stats", dict)().items():
                total[key] += value
        return total


def DistributedOptimizer(optimizer: torch.optim.Optimizer, named_parameters=None,
                         compression=Compression.none, **kwargs):
    """``horovod.torch.DistributedOptimizer`` with ``compression`` also accepting a
    pattern -> compressor mapping (see the module docstring).  Every other argument is Horovod's."""
    import horovod.torch as hvd
    if isinstance(compression, Mapping):
        if named_parameters is None:
            raise ValueError("a compression map needs named_parameters= to match names against")
        compression = PerParameterCompressor(compression)
    opt = hvd.DistributedOptimizer(optimizer, named_parameters=named_parameters,
                                   compression=compression, **kwargs)
    opt.compression_stats = getattr(compression, "stats", None)
    return opt
