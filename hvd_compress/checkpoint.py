"""The 0.3 spelling of :mod:`hvd_compress.horovod.checkpoint`."""
from .horovod.checkpoint import gather_state, scatter_state  # noqa: F401
