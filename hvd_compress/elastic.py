"""``import hvd_compress.elastic`` (the 0.3 spelling) registers the compressor state handler:
see :mod:`hvd_compress.horovod.elastic`."""
from .horovod.elastic import CompressionStateHandler, register  # noqa: F401 (importing registers)
