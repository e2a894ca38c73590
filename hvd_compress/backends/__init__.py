"""Execution backends of the codecs: the CPU reference library and the CUDA kernels.

Both implement the numeric contract of ``kernels/hvdc_common.h``; neither needs Horovod.

:func:`kernel_backend` is the one place where a codec decides how to run: it returns the object
that launches the CUDA kernels for tensors on a device (``kernel``, ``launch``, ``grid_size``,
``ptr_array``), or None when the C reference library does the work.  CUDA devices get the
CuPy/NVRTC loader (:mod:`.cuda`); CPU tensors get the C library, except inside :func:`emulate`,
where they get the backend it is given (the test suite's SIMT emulator, ``tests/emulator.py``)
and so take the codecs' CUDA code path.
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


def on_device(x: torch.Tensor) -> bool:
    """Whether ``x`` is device memory as the codecs see it (CUDA, or the emulated CUDA path): a
    host read of it would stall the CPU until the device has drained."""
    return kernel_backend(x.device) is not None


@contextmanager
def emulate(backend: Any, *, fill_uninitialized: bool = True) -> Iterator[Any]:
    """Run the codecs' CUDA code path on CPU tensors through ``backend`` (an object with the CUDA
    loader's interface: the test suite's SIMT emulator, ``tests/emulator.py``) within the block
    (this thread / async context only).  Yields the backend.

    With ``fill_uninitialized`` (default), ``torch.empty`` returns NaN / the largest integer
    inside the block instead of stale memory (``torch.use_deterministic_algorithms(True,
    warn_only=True)``, restored on exit), so an output element a kernel fails to write shows up,
    and an index read from one points far outside every buffer (a reported fault)."""
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    if fill_uninitialized:
        torch.use_deterministic_algorithms(True, warn_only=True)
    token = _emulated.set(backend)
    try:
        yield backend
    finally:
        _emulated.reset(token)
        if fill_uninitialized:
            torch.use_deterministic_algorithms(before[0], warn_only=before[1])
