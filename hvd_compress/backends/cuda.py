"""CUDA backend: compiles ``kernels/*.cu`` with CuPy (NVRTC) on first use and launches them on
PyTorch's current stream, passing tensors zero-copy through DLPack.

Importing this module needs neither CuPy nor a GPU; :func:`available` says whether the CUDA
path can run.  The NVRTC options live here once (:func:`nvrtc_options`) and the CI compile
check (tests/test_nvrtc_compile.py) uses the very same ones.
"""
from __future__ import annotations

import importlib.resources
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch

#: --fmad=false: no FMA contraction, so kernels round exactly like the CPU reference.
_BASE_OPTIONS = ("--std=c++17", "--fmad=false")


def kernel_dir() -> Path:
    """Directory of the CUDA sources: the installed package data ``hvd_compress/kernels``, or
    ``kernels/`` of a source checkout."""
    try:
        path = Path(str(importlib.resources.files("hvd_compress.kernels")))
        if (path / "hvdc_common.h").exists():
            return path
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parents[2] / "kernels"


def nvrtc_options() -> tuple[str, ...]:
    """Options for every kernel compile (CuPy adds the -arch of the device itself)."""
    return _BASE_OPTIONS + (f"-I{kernel_dir()}",)


@lru_cache(maxsize=1)
def available() -> bool:
    """True when CuPy imports and torch sees a CUDA device."""
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


@lru_cache(maxsize=None)
def _module(source: str, device_index: int):
    import cupy
    code = (kernel_dir() / source).read_text()
    with cupy.cuda.Device(device_index):
        return cupy.RawModule(code=code, options=nvrtc_options(), backend="nvrtc")


def kernel(source: str, name: str, device: torch.device):
    """The ``extern "C"`` kernel ``name`` of ``kernels/<source>``, compiled for ``device``."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _module(source, index).get_function(name)


def as_cupy(t: torch.Tensor):
    """Zero-copy CuPy view of a CUDA tensor (DLPack)."""
    import cupy
    return cupy.from_dlpack(t.detach())


def launch(fn, grid: int | tuple, block: int | tuple, args: Sequence, shared_mem: int = 0) -> None:
    """Launch on torch's current stream; tensors in ``args`` go through DLPack, Python ints and
    floats must already be wrapped in numpy scalars of the kernel's parameter type."""
    import cupy
    stream = torch.cuda.current_stream()
    grid = grid if isinstance(grid, tuple) else (grid,)
    block = block if isinstance(block, tuple) else (block,)
    converted = tuple(as_cupy(a) if isinstance(a, torch.Tensor) else a for a in args)
    with cupy.cuda.ExternalStream(stream.cuda_stream, stream.device_index):
        fn(grid, block, converted, shared_mem=shared_mem)
