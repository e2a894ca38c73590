"""hvd_compress: gradient compression for Horovod.

Layers, bottom to top (each usable without the ones above it):

* :mod:`hvd_compress.codecs`: pure tensor transforms (TernGrad, QSGD, top-k with sampled
  thresholds, stochastic fp16) with a C reference on the CPU and CuPy/NVRTC kernels on the GPU,
  bit-identical to each other.  Needs neither Horovod nor a GPU nor CuPy.
* :mod:`hvd_compress.comm`: which collective carries which payload (sparse allgather,
  compressed allreduce).  Needs Horovod.
* Horovod integration: ``Compressor`` objects for ``hvd.DistributedOptimizer(compression=...)``.
"""
__version__ = "0.1.0"
