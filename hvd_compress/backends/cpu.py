"""ctypes binding of the CPU reference library (``csrc/*.c``, built by ``pip install``).

The library works on plain buffers; this module declares every exported signature once
(:data:`_SIGNATURES`) and turns tensors into pointers.  Tensors passed in must be contiguous
CPU tensors of the dtype the C function expects; :func:`ptr` checks that.
"""
from __future__ import annotations

import ctypes
import importlib.machinery
import os
from functools import lru_cache
from pathlib import Path

import torch

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_U64 = ctypes.c_uint64
_U32 = ctypes.c_uint32
_INT = ctypes.c_int
_F32 = ctypes.c_float

#: name -> argument types of every function the library exports (all return void).
_SIGNATURES: dict[str, tuple] = {
    "hvdc_philox_kat": (_P, _U32, _U32, _P),
    "hvdc_stream_u32": (_P, _I64, _U64, _U32, _U32, _INT),
}


def register(name: str, *argtypes) -> None:
    """Declare the argument types of an exported C function (codec modules call this)."""
    _SIGNATURES[name] = argtypes
    lib.cache_clear()


@lru_cache(maxsize=None)
def lib() -> ctypes.CDLL:
    """Load the compiled library that sits next to this package."""
    pkg = Path(__file__).resolve().parent.parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = pkg / f"_hvdc_cpu{suffix}"
        if path.exists():
            break
    else:
        raise ImportError(
            f"hvd_compress CPU library (_hvdc_cpu*.so) not found in {pkg}: install the package "
            "with `pip install .` (it compiles csrc/ with the C compiler) instead of importing "
            "it from a source checkout")
    handle = ctypes.CDLL(str(path))
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(handle, name)
        fn.argtypes = argtypes
        fn.restype = None
    return handle


def call(name: str, *args) -> None:
    """Call an exported function; tensors must already be converted with :func:`ptr`."""
    getattr(lib(), name)(*args)


def ptr(t: torch.Tensor, dtype: torch.dtype | None = None) -> ctypes.c_void_p:
    """Pointer to a contiguous CPU tensor's data, after checking device, layout and dtype."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("CPU library needs contiguous CPU tensors")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"expected {dtype}, got {t.dtype}")
    return ctypes.c_void_p(t.data_ptr())


def threads() -> int:
    """Threads for the OpenMP loops: torch's intra-op setting (1 inside each Horovod rank if the
    user pinned it), overridable with HVD_COMPRESS_CPU_THREADS."""
    return int(os.environ.get("HVD_COMPRESS_CPU_THREADS", torch.get_num_threads()))
