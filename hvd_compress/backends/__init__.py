"""Execution backends of the codecs: the CPU reference library and the CUDA kernels.

Both implement the numeric contract of ``kernels/hvdc_common.h``; neither needs Horovod.

:func:`kernel_backend` is the one place where a codec decides how to run: it returns the object
that launches the CUDA kernels for tensors on a device (``kernel``, ``launch``, ``grid_size``,
``ptr_array``), or None when the C reference library does the work.  CUDA devices get the
CuPy/NVRTC loader (:mod:`.cuda`); CPU tensors get the C library, except inside :func:`emulate`,
where they get the SIMT emulator (:mod:`.emulator`) and so take the codecs' CUDA code path.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator

import torch

from . import cuda

_emulated: ContextVar[Any] = ContextVar("hvd_compress_emulated_kernels", default=None)


def kernel_backend(device: torch.device | str) -> Any | None:
    """The kernel launcher for tensors on ``device``: the CUDA loader module for a CUDA device,
    the active emulator for a CPU device inside :func:`emulate`, else None (C reference)."""
    device = torch.device(device)
    if device.type == "cuda":
        return cuda
    if device.type == "cpu":
        return _emulated.get()
    return None


@contextmanager
def emulate(backend: Any = None, **options: Any) -> Iterator[Any]:
    """Run the codecs' CUDA code path on CPU tensors through the SIMT emulator within the block
    (this thread / async context only).  ``backend`` is an
    :class:`~hvd_compress.backends.emulator.EmulatedBackend`, else one is made from ``options``
    (``seed=...``, ``sm_count=...``).  Yields the backend."""
    if backend is None:
        from .emulator import EmulatedBackend
        backend = EmulatedBackend(**options)
    elif options:
        raise TypeError("pass either a backend or options, not both")
    token = _emulated.set(backend)
    try:
        yield backend
    finally:
        _emulated.reset(token)
