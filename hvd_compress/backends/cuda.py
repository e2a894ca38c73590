"""CUDA backend: compile ``kernels/*.cu`` with NVRTC, load them with CuPy, launch them on torch's
current stream with tensors passed zero-copy through DLPack.

Importable without CuPy, without a GPU and without the CUDA toolkit; :func:`available` says
whether kernels can run.

Why not ``cupy.RawModule(code=...)``: CuPy appends ``-ftz=true`` after the caller's options (and
NVRTC honours the last occurrence), so subnormals would flush to zero on the GPU but not in the
C reference, breaking the bit-for-bit contract of ``docs/design.md``; and its disk cache is keyed
by the source text only, not by the ``#include``-d headers that hold the numeric contract.  So
this module runs NVRTC itself with exactly :func:`nvrtc_options` plus ``-arch=sm_XX`` (a CUBIN
for the device, no PTX JIT), caches the CUBIN on disk under a hash of source, headers, options
and NVRTC version, and loads it with ``cupy.RawModule(path=...)``.  The same :func:`compile_cubin`
is what ``tests/kernels/test_nvrtc_compile.py`` runs on machines without a GPU.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

#: Kernel arguments that are not tensors must carry their C type (numpy scalars); a Python int
#: would go to CuPy as int64 and a float as double whatever the kernel signature says.
_UNTYPED = (bool, int, float)


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel source; the message carries the options and the compiler log."""


@lru_cache(maxsize=None)
def available() -> bool:
    """True when CuPy imports and torch sees a CUDA device (then kernels can be compiled and run).
    Any failure to import or initialise CuPy (missing libraries, no driver) means False."""
    if not torch.cuda.is_available():
        return False
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - CuPy raises ImportError, RuntimeError or CUDARuntimeError
        return False


@lru_cache(maxsize=None)
def kernel_dir() -> Path:
    """Directory of the CUDA sources and ``hvdc_common.h``: the installed package data
    ``hvd_compress/kernels``, or ``kernels/`` of a source checkout."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "kernels", package.parent / "kernels"):
        if (candidate / "hvdc_common.h").is_file():
            return candidate
    raise FileNotFoundError(f"kernels/hvdc_common.h not found next to {package}")


def nvrtc_options() -> tuple[str, ...]:
    """NVRTC options of every kernel (``-arch`` excluded): C++17, the IEEE fp32 settings of the
    numeric contract spelled out (no FMA contraction, no flush-to-zero, correctly rounded division
    and sqrt), and the include path of ``hvdc_common.h`` (NVRTC finds headers only via ``-I``)."""
    return ("--std=c++17", "--fmad=false", "--ftz=false", "--prec-div=true", "--prec-sqrt=true",
            f"-I{kernel_dir()}")


def _run_cuda_bindings(nvrtc: Any, source: str, name: str,
                       options: Sequence[str]) -> tuple[bytes | None, str]:
    """One compilation through NVIDIA's ``cuda.bindings.nvrtc``: (CUBIN or None on error, log)."""
    def check(result: tuple) -> tuple:
        if result[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise KernelCompileError(f"NVRTC call failed on {name}: {result[0]!r}")
        return result[1:]

    (prog,) = check(nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []))
    try:
        status = nvrtc.nvrtcCompileProgram(prog, len(options), [o.encode() for o in options])[0]
        (log_size,) = check(nvrtc.nvrtcGetProgramLogSize(prog))
        log = b" " * log_size
        check(nvrtc.nvrtcGetProgramLog(prog, log))
        log_text = log.rstrip(b"\0").decode(errors="replace")
        if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            return None, log_text
        (size,) = check(nvrtc.nvrtcGetCUBINSize(prog))
        cubin = b" " * size
        check(nvrtc.nvrtcGetCUBIN(prog, cubin))
        return cubin, log_text
    finally:
        check(nvrtc.nvrtcDestroyProgram(prog))


def _run_cupy(nvrtc: Any, source: str, name: str,
              options: Sequence[str]) -> tuple[bytes | None, str]:
    """One compilation through CuPy's own NVRTC binding: (CUBIN or None on error, log)."""
    prog = nvrtc.createProgram(source, name, (), ())
    try:
        try:
            nvrtc.compileProgram(prog, list(options))
        except nvrtc.NVRTCError:
            return None, nvrtc.getProgramLog(prog)
        return nvrtc.getCUBIN(prog), nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)


@lru_cache(maxsize=None)
def _nvrtc() -> tuple[Callable[[str, str, Sequence[str]], tuple[bytes | None, str]], str]:
    """(compile function, NVRTC version) of the binding in use: NVIDIA's ``cuda.bindings`` (needs
    no driver; what the GPU-less compile test runs), else the NVRTC binding CuPy ships with."""
    try:
        from cuda.bindings import nvrtc
        status, major, minor = nvrtc.nvrtcVersion()  # loads libnvrtc, which may be missing
        if status == nvrtc.nvrtcResult.NVRTC_SUCCESS:
            return partial(_run_cuda_bindings, nvrtc), f"nvrtc {major}.{minor} (cuda.bindings)"
    except Exception:  # noqa: BLE001 - ImportError, or RuntimeError when libnvrtc cannot load
        pass
    from cupy_backends.cuda.libs import nvrtc
    return partial(_run_cupy, nvrtc), "nvrtc %d.%d (cupy)" % nvrtc.getVersion()


def nvrtc_version() -> str:
    """Version of the NVRTC library kernels are compiled with, and the binding used.  Raises
    ImportError when neither ``cuda.bindings`` nor CuPy provides NVRTC."""
    return _nvrtc()[1]


def compile_cubin(source: str, arch: str, extra_options: Sequence[str] = ()) -> tuple[bytes, str]:
    """Compile ``kernel_dir()/source`` for ``sm_<arch>`` (e.g. ``"90"``) with
    :func:`nvrtc_options`, ``-arch=sm_<arch>`` and ``extra_options``; returns (CUBIN, log).
    Raises :class:`KernelCompileError` with the log when NVRTC reports an error."""
    text = (kernel_dir() / source).read_text()
    options = (*nvrtc_options(), f"-arch=sm_{arch}", *extra_options)
    cubin, log = _nvrtc()[0](text, source, options)
    if cubin is None:
        raise KernelCompileError(f"NVRTC failed on {source} with {' '.join(options)}:\n{log}")
    return cubin, log


def _cache_key(source: str, arch: str) -> str:
    """Hash of everything the CUBIN depends on: the source, every header next to it (the numeric
    contract), the options, the architecture and the NVRTC version."""
    digest = hashlib.sha256()
    for path in [kernel_dir() / source, *sorted(kernel_dir().glob("*.h")),
                 *sorted(kernel_dir().glob("*.cuh"))]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update("\0".join((*nvrtc_options(), arch, nvrtc_version())).encode())
    return digest.hexdigest()[:32]


def _cache_dir() -> Path:
    """``$HVD_COMPRESS_KERNEL_CACHE``, else ``~/.cache/hvd_compress/kernels``."""
    default = Path.home() / ".cache" / "hvd_compress" / "kernels"
    return Path(os.environ.get("HVD_COMPRESS_KERNEL_CACHE", default))


@lru_cache(maxsize=None)
def _module(source: str, arch: str) -> Any:
    """``cupy.RawModule`` of one kernel file for one architecture, compiled once per content
    hash (the disk cache is shared by processes: written to a temporary name, then renamed)."""
    import cupy

    path = _cache_dir() / f"{Path(source).stem}-sm{arch}-{_cache_key(source, arch)}.cubin"
    if not path.is_file():
        cubin, _ = compile_cubin(source, arch)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
            tmp.write(cubin)
        os.replace(tmp.name, path)
    return cupy.RawModule(path=str(path))


def _cuda_device(device: torch.device | str | int) -> torch.device:
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"CUDA kernels need a CUDA device, got {device}")
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def kernel(source: str, name: str, device: torch.device | str | int = "cuda") -> Any:
    """The ``extern "C"`` kernel ``name`` of ``kernels/<source>`` compiled for ``device``'s
    architecture (a ``cupy.RawKernel``; launch it with :func:`launch`)."""
    return _kernel(source, name, "%d%d" % torch.cuda.get_device_capability(_cuda_device(device)))


@lru_cache(maxsize=None)
def _kernel(source: str, name: str, arch: str) -> Any:
    return _module(source, arch).get_function(name)


def _torch_stream(device: torch.device) -> Any:
    """torch's current stream on ``device`` as a CuPy stream, so kernels and DLPack exchanges
    are ordered with the surrounding torch work without any synchronisation."""
    import cupy
    return cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream, device.index)


def as_cupy(t: torch.Tensor) -> Any:
    """Zero-copy CuPy view of a CUDA tensor (DLPack), exchanged on torch's current stream."""
    import cupy
    with cupy.cuda.Device(t.device.index), _torch_stream(t.device):
        return cupy.from_dlpack(t.detach())


def launch(fn: Any, grid: int | Sequence[int], block: int | Sequence[int], args: Sequence[Any],
           shared_mem: int = 0) -> None:
    """Launch ``fn`` on torch's current stream of the device of its tensor arguments.

    Tensors must be contiguous and on one CUDA device (kernels index raw pointers); other
    arguments must be numpy scalars of the kernel's parameter types (``np.int64``,
    ``np.uint32``, ``np.float32``...).  A grid with a zero dimension launches nothing.
    """
    grid = (grid,) if isinstance(grid, int) else tuple(grid)
    block = (block,) if isinstance(block, int) else tuple(block)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors:
        raise ValueError("launch needs at least one tensor argument to pick the device")
    device = tensors[0].device
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            if a.device != device or not a.is_contiguous():
                raise ValueError(f"kernel argument {i}: tensors must be contiguous and all on "
                                 f"{device}, got {a.device} (contiguous={a.is_contiguous()})")
        elif isinstance(a, _UNTYPED) and not isinstance(a, np.generic):  # np.float64 is a float
            raise TypeError(f"kernel argument {i}: pass a numpy scalar of the parameter's C "
                            f"type, not a Python {type(a).__name__}")
    if device.type != "cuda":
        raise ValueError(f"CUDA kernels need CUDA tensors, got {device}")
    if 0 in grid:
        return
    import cupy
    with cupy.cuda.Device(device.index), _torch_stream(device):
        cargs = tuple(cupy.from_dlpack(a.detach()) if isinstance(a, torch.Tensor) else a
                      for a in args)
        fn(grid, block, cargs, shared_mem=shared_mem)


def ptr_array(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """int64 tensor on the buffers' device holding their addresses (a kernel argument of type
    ``const unsigned long long *``, e.g. the per-worker payloads of a decode kernel)."""
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=tensors[0].device)


@lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def grid_size(work_items: int, block: int, device: torch.device | str | int) -> int:
    """Blocks for a grid-stride loop over ``work_items``: enough to cover them, at most 32 per
    SM (beyond that a grid-stride loop gains nothing); 0 when there is no work."""
    return min(-(-work_items // block), 32 * _sm_count(_cuda_device(device).index))
