"""Emulated CUDA backend (test tooling, not installed): ``kernels/*.cu`` compiled by the host C++
compiler with the SIMT emulator
``tests/emu_kernels/simt.h`` and run on CPU tensors, with the loader interface of
:mod:`hvd_compress.backends.cuda` (``kernel``, ``launch``, ``grid_size``, ``ptr_array``).

Inside :func:`hvd_compress.backends.emulate` the codecs take their CUDA code path for CPU tensors
and launch the very kernel sources through this backend, so the Python that sizes grids,
allocates buffers and sequences kernels runs too.  Every launch:

* checks each argument against the kernel's C signature (taken from the compiled code): numpy
  scalars of exactly the parameter's type, tensors whose dtype fits the pointer type, the right
  number of arguments, ``__launch_bounds__``;
* copies every tensor argument (and every buffer a pointer array names) into a staging buffer with
  256-byte red zones of 0xFF on both sides (same address alignment modulo 256), so out-of-bounds
  reads see NaN / -1 and out-of-bounds writes are reported; buffers passed only as ``const T *``
  must come back unchanged;
* runs the blocks in a seeded random order, the threads of a block as fibers in a seeded random
  order between barriers (see ``tests/emu_kernels/simt.h``); barrier divergence, deadlocks and
  inconsistent warp collectives raise :class:`EmulatorError`.

Modules are cached on disk under ``$HVD_COMPRESS_EMU_CACHE`` (default
``~/.cache/hvd_compress/emu``), keyed by a hash of the kernel source, every header next to it,
the emulator header, the compiler and its flags.  What the emulator cannot prove is in
``docs/emulator.md``.
"""
from __future__ import annotations

import collections
import ctypes
import hashlib
import mmap
import os
import re
import shutil
import subprocess
import tempfile
import threading
import weakref
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from hvd_compress.backends import cuda

#: Compiler flags of every emulated module: C++17 like NVRTC, IEEE fp32 like the numeric contract
#: (no contraction, no fast-math), hidden symbols so a kernel never binds to the CPU library's
#: function of the same name.
FLAGS = ("-std=c++17", "-O2", "-fPIC", "-shared", "-fvisibility=hidden", "-ffp-contract=off",
         "-fno-fast-math", "-fno-strict-aliasing", "-fstack-clash-protection", "-Wall",
         "-Wno-unknown-pragmas", "-Wno-unused-function", "-Wno-unused-variable")
#: Scheduling policies of simt.h (enum Policy), in order.
SCHEDULES = ("uniform", "warp-priority", "thread-priority", "mixed")
#: Bytes of 0xFF on each side of every staged buffer.
REDZONE = 256
_SECTION = "hvdc_emu_shared"
_LOCK = threading.Lock()      # one launch at a time: a module's scheduler state is global
#: launches per kernel name, over every EmulatedBackend of this process (tests report coverage)
LAUNCHES: collections.Counter = collections.Counter()
_U64 = (1 << 64) - 1

# ``__global__ [__launch_bounds__(N)] void [__launch_bounds__(N)] name(``
_GLOBAL = re.compile(r"__global__\s+(?:__launch_bounds__\s*\(([^)]*)\)\s*)?void\s+"
                     r"(?:__launch_bounds__\s*\(([^)]*)\)\s*)?(\w+)\s*\(")
_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)


class EmulatorError(RuntimeError):
    """A kernel misbehaved under the emulator (barrier divergence, deadlock, inconsistent warp
    collective, out-of-bounds write, write through a const pointer) or failed to compile."""


def compiler() -> str | None:
    """The host C++ compiler (``$CXX``, else g++), or None when there is none."""
    return shutil.which(os.environ.get("CXX", "g++"))


def available() -> bool:
    """True when kernels can be emulated here: a C++ compiler on Linux x86-64 or aarch64."""
    return compiler() is not None and os.uname().sysname == "Linux"


def emu_dir() -> Path:
    """Directory of ``simt.h``: test tooling, beside the emulator's probe kernels."""
    return Path(__file__).resolve().parent / "emu_kernels"


def kernel_names(text: str) -> list[tuple[str, str | None, str]]:
    """(name, ``__launch_bounds__`` expression or None, parameter list) of every ``__global__``
    function of a CUDA source."""
    text = _COMMENT.sub(" ", text)
    found = []
    for m in _GLOBAL.finditer(text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        params = " ".join(text[m.end():i - 1].split())
        bound = (m.group(1) or m.group(2) or "").split(",")[0].strip() or None
        found.append((m.group(3), bound, params))
    return found


def _cache_dir() -> Path:
    default = Path.home() / ".cache" / "hvd_compress" / "emu"
    return Path(os.environ.get("HVD_COMPRESS_EMU_CACHE", default))


@lru_cache(maxsize=None)
def _compiler_id(cxx: str) -> str:
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    machine = subprocess.run([cxx, "-dumpmachine"], capture_output=True, text=True).stdout
    return out.splitlines()[0] + " " + machine.strip()


def _defines() -> tuple[str, ...]:
    return ("-DHVDC_EMU_FORCE_UCONTEXT",) if os.environ.get("HVD_COMPRESS_EMU_UCONTEXT") == "1" else ()


def build(source: Path) -> Path:
    """Compile ``source`` (a ``.cu`` file; its headers are looked up next to it) into an emulated
    module, or return the cached one.  Raises :class:`EmulatorError` with the compiler's
    output if it fails."""
    cxx = compiler()
    if cxx is None:
        raise EmulatorError("no C++ compiler (g++ or $CXX) to build the emulated kernels")
    source = Path(source).resolve()
    text = source.read_text()
    kernels = kernel_names(text)
    if not kernels:
        raise EmulatorError(f"{source}: no __global__ function found")
    wrapper = "\n".join([f"/* generated by tests/emulator.py for {source.name} */",
                         f'#include "{source.name}"',      # found through -I{source.parent}
                         *(f"HVDC_EMU_KERNEL({name}, {bound or 0}, ({params}))"
                           for name, bound, params in kernels), ""])
    simt = emu_dir() / "simt.h"
    flags = (*FLAGS, *_defines(), f"-I{source.parent}", "-include", str(simt))
    digest = hashlib.sha256()
    for path in [source, simt, *sorted(source.parent.glob("*.h")), *sorted(source.parent.glob("*.cuh"))]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update("\0".join((wrapper, *FLAGS, *_defines(), _compiler_id(cxx))).encode())
    out = _cache_dir() / f"{source.stem}-{digest.hexdigest()[:32]}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        cpp = Path(tmp, f"{source.stem}_emu.cpp")
        cpp.write_text(wrapper)
        so = Path(tmp, out.name)
        result = subprocess.run([cxx, *flags, str(cpp), "-o", str(so)], capture_output=True, text=True)
        if result.returncode != 0:
            raise EmulatorError(f"emulated build of {source} failed:\n{' '.join([cxx, *flags])}\n"
                                f"{result.stderr[-6000:]}")
        Path(tmp, out.stem + ".log").write_text(result.stderr)
        Path(tmp, out.stem + ".statics").write_text("\n".join(_statics_outside_section(so)))
        os.replace(Path(tmp, out.stem + ".log"), out.with_suffix(".log"))
        os.replace(Path(tmp, out.stem + ".statics"), out.with_suffix(".statics"))
        os.replace(so, out)
    return out


def _statics_outside_section(so: Path) -> list[str]:
    """Function-local static objects of the kernel code that are not in the shared-memory
    section: ``__shared__`` variables inside templates (gcc puts those in COMDAT sections) or
    other statics.  A module with any runs one block at a time, where static storage is still
    block-private.  ``?`` when objdump is missing (then assume the worst)."""
    objdump = shutil.which("objdump")
    if objdump is None:
        return ["?"]
    table = subprocess.run([objdump, "-t", str(so)], capture_output=True, text=True).stdout
    found = []
    for line in table.splitlines():
        m = re.search(r"\sO\s+(\S+)\s+[0-9a-fA-F]+\s+(?:\.\w+\s+)?(\S+)\s*$", line)
        if m and m.group(2).startswith("_ZZ") and not m.group(2).startswith("_ZZN8hvdc_emu") \
                and m.group(1) != _SECTION:
            found.append(m.group(2))
    return found


@dataclass(frozen=True)
class Param:
    kind: str       # "s" scalar, "p" pointer, "pc" pointer to const
    elem: str       # f32 f64 i8 u8 i16 u16 i32 u32 i64 u64 void ptr other
    ctype: str      # as the compiler spells it

    @property
    def pointer(self) -> bool:
        return self.kind != "s"


class Module:
    """One compiled ``.cu`` file: its kernels (name -> index, parameters, launch bounds)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lib = ctypes.CDLL(str(path), mode=os.RTLD_NOW | os.RTLD_LOCAL)
        lib = self.lib
        for name, res in (("hvdc_emu_kernel_name", ctypes.c_char_p),
                          ("hvdc_emu_kernel_params", ctypes.c_char_p),
                          ("hvdc_emu_kernel_max_threads", ctypes.c_uint)):
            getattr(lib, name).argtypes = (ctypes.c_int,)
            getattr(lib, name).restype = res
        lib.hvdc_emu_shared_bytes.restype = ctypes.c_size_t
        lib.hvdc_emu_launch.argtypes = (ctypes.c_int, ctypes.POINTER(ctypes.c_uint),
                                        ctypes.POINTER(ctypes.c_uint64), ctypes.c_uint64,
                                        ctypes.c_uint, ctypes.c_uint, ctypes.c_size_t,
                                        ctypes.c_char_p, ctypes.c_size_t)
        lib.hvdc_emu_launch.restype = ctypes.c_int
        lib.hvdc_emu_last_stats.argtypes = (ctypes.POINTER(ctypes.c_uint64),)
        self.kernels: dict[str, tuple[int, tuple[Param, ...], int]] = {}
        for k in range(lib.hvdc_emu_kernel_count()):
            raw = lib.hvdc_emu_kernel_params(k).decode()
            params = tuple(Param(*p.split(":", 2)) for p in raw.split(";")) if raw else ()
            self.kernels[lib.hvdc_emu_kernel_name(k).decode()] = (k, params,
                                                                 lib.hvdc_emu_kernel_max_threads(k))
        self.shared_bytes = lib.hvdc_emu_shared_bytes()
        self.ucontext = bool(lib.hvdc_emu_uses_ucontext())
        statics = path.with_suffix(".statics")
        self.private_statics = [s for s in (statics.read_text().split("\n") if statics.is_file()
                                            else ["?"]) if s]
        log = path.with_suffix(".log")
        self.build_log = log.read_text() if log.is_file() else ""


@lru_cache(maxsize=None)
def _load(path: Path) -> Module:
    return Module(path)


def load(source: Path) -> Module:
    """The emulated module of a ``.cu`` file (built or taken from the disk cache, loaded once per
    process: like the CUDA loader, a process does not see later edits of the source)."""
    return _load_source(Path(source).resolve(), _defines(), str(_cache_dir()))


@lru_cache(maxsize=None)
def _load_source(source: Path, defines: tuple, cache: str) -> Module:
    return _load(build(source))


@dataclass(frozen=True)
class EmulatedKernel:
    """What :meth:`EmulatedBackend.kernel` returns (the counterpart of a ``cupy.RawKernel``)."""
    module: Module
    index: int
    name: str
    params: tuple[Param, ...]
    max_threads: int


# Tensor dtypes each pointer element type accepts (a kernel may view int32 as unsigned, fp16
# as unsigned short, etc.; sizes must match, floats must be exact).
def _dtypes(*names: str) -> frozenset:
    return frozenset(getattr(torch, n) for n in names if hasattr(torch, n))


_INT8 = _dtypes("int8", "uint8", "bool")
_INT16 = _dtypes("int16", "uint16", "float16", "bfloat16")
_INT32 = _dtypes("int32", "uint32")
_INT64 = _dtypes("int64", "uint64")
_POINTEE = {"f32": _dtypes("float32"), "f64": _dtypes("float64"), "i8": _INT8, "u8": _INT8,
            "i16": _INT16, "u16": _INT16, "i32": _INT32, "u32": _INT32, "i64": _INT64,
            "u64": _INT64, "ptr": _INT64}
_SCALAR = {"i8": np.int8, "u8": np.uint8, "i16": np.int16, "u16": np.uint16, "i32": np.int32,
           "u32": np.uint32, "i64": np.int64, "u64": np.uint64, "f32": np.float32,
           "f64": np.float64}


@dataclass
class _Region:
    """A contiguous byte range of host memory staged for one launch (overlapping arguments, e.g.
    one tensor passed twice, share a region so that they still alias)."""
    start: int
    end: int
    labels: list
    const: bool
    pointer_array: bool = False
    area: int = 0             # address of its read-write pages in the arena
    size: int = 0             # bytes of those pages
    offset: int = 0           # of the data inside them
    expected: bytes = b""     # a pointer array's staged contents

    @property
    def staged(self) -> int:
        return self.area + self.offset


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_MAP_NORESERVE = 0x4000
_PROT_NONE = 0


class _Arena:
    """The staging memory of one launch: every region on its own read-write pages, with
    :data:`GUARD` bytes of inaccessible memory before and after each, so that an access far
    beyond a buffer faults (and is reported) instead of landing in Python's heap."""

    GUARD = 4 << 20

    def __init__(self, regions: list[_Region]) -> None:
        page = mmap.PAGESIZE
        offsets, at = [], self.GUARD
        for r in regions:
            r.offset = REDZONE + r.start % 256           # same address alignment modulo 256
            r.size = -(-(r.offset + (r.end - r.start) + REDZONE) // page) * page
            offsets.append(at)
            at += r.size + self.GUARD
        self.size = at
        base = _libc.mmap(None, at, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
                          -1, 0)
        if base in (None, ctypes.c_void_p(-1).value):
            raise MemoryError(f"emulator: mmap of {at} bytes failed (errno {ctypes.get_errno()})")
        self.base = base
        for r, off in zip(regions, offsets):
            r.area = base + off
            if _libc.mprotect(r.area, r.size, mmap.PROT_READ | mmap.PROT_WRITE):
                self.close()
                raise MemoryError(f"emulator: mprotect failed (errno {ctypes.get_errno()})")
            ctypes.memset(r.area, 0xFF, r.size)

    def close(self) -> None:
        if self.base:
            _libc.munmap(self.base, self.size)
            self.base = 0


@dataclass
class _Span:
    """One buffer a launch touches: a tensor argument, or a buffer named by a pointer array."""
    start: int
    nbytes: int
    label: str
    const: bool
    arg: int | None                      # argument index (None: named by a pointer array)
    targets: list | None = None          # a pointer array's buffers (their _Spans)
    region: _Region | None = None

    @property
    def staged(self) -> int:
        return self.region.staged + (self.start - self.region.start)


class EmulatedBackend:
    """The loader interface of :mod:`hvd_compress.backends.cuda`, executing on CPU tensors.

    Args:
        seed: seeds the block and thread orders; launch i of this backend uses a seed derived
            from (seed, i), so a test is reproducible and different launches see different orders.
        schedule: how the next thread is picked at each barrier: "uniform" (at random),
            "warp-priority" (random priorities per warp: one warp runs ahead alone),
            "thread-priority" (random priorities per thread), or "mixed" (default: one of the
            three per launch, drawn from the launch's seed).
        sm_count: streaming multiprocessors that :meth:`grid_size` pretends to have (grids of at
            most 32 blocks per SM, as on the GPU): small, so grid-stride loops loop at small sizes.
        resident_blocks: blocks interleaved at a time (each with its own shared memory).
        kernel_dir: where the ``.cu`` files and their headers are (default ``cuda.kernel_dir()``);
            tests point it at modified copies.
        stack_kib: stack of each emulated thread.
    """

    name = "emulator"

    def __init__(self, seed: int = 0, *, schedule: str = "mixed", sm_count: int = 2,
                 resident_blocks: int = 2, kernel_dir: str | Path | None = None,
                 stack_kib: int = 64) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.seed = int(seed) & _U64
        self.schedule = schedule
        self.policy = SCHEDULES.index(schedule)
        self.sm_count = sm_count
        self.resident_blocks = resident_blocks
        self.kernel_dir = Path(kernel_dir) if kernel_dir is not None else None
        self.stack_bytes = stack_kib * 1024
        self.launches = 0
        #: totals over this backend's launches: fiber resumes, __syncthreads, warp collectives, blocks
        self.stats = {"resumes": 0, "syncthreads": 0, "warp_ops": 0, "blocks": 0}
        self.launched: dict[str, int] = {}   # kernel name -> launches
        self.schedules: dict[str, int] = {}  # schedule -> launches
        self._ptr_arrays: dict[int, tuple[weakref.ref, tuple[torch.Tensor, ...]]] = {}

    def __repr__(self) -> str:
        return (f"EmulatedBackend(seed={self.seed:#x}, schedule={self.schedule!r}, sm_count={self.sm_count}, "
                f"resident_blocks={self.resident_blocks}, kernel_dir={self.kernel_dir})")

    # ---- the loader interface ----

    def kernel(self, source: str, name: str, device: Any = None) -> EmulatedKernel:
        """Kernel ``name`` of ``<kernel_dir>/<source>``, built for the emulator."""
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"the emulator runs kernels on CPU tensors, not on {device}")
        module = load((self.kernel_dir or cuda.kernel_dir()) / source)
        if name not in module.kernels:
            raise KeyError(f"no kernel {name!r} in {source} (has {sorted(module.kernels)})")
        index, params, max_threads = module.kernels[name]
        return EmulatedKernel(module, index, name, params, max_threads)

    def grid_size(self, work_items: int, block: int, device: Any = None) -> int:
        """As :func:`cuda.grid_size` on a GPU with :attr:`sm_count` SMs."""
        return min(-(-work_items // block), 32 * self.sm_count)

    def ptr_array(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """int64 tensor of the buffers' addresses (as :func:`cuda.ptr_array`); the launch stages
        the buffers it names and passes their staged addresses."""
        tensors = tuple(tensors)
        if any(t.device.type != "cpu" for t in tensors):
            raise ValueError("emulated pointer arrays need CPU tensors")
        arr = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)
        key = id(arr)
        self._ptr_arrays[key] = (weakref.ref(arr), tensors)
        weakref.finalize(arr, self._ptr_arrays.pop, key, None)
        return arr

    def launch(self, fn: EmulatedKernel, grid: int | Sequence[int], block: int | Sequence[int],
               args: Sequence[Any], shared_mem: int = 0) -> None:
        """Run ``fn`` over ``grid`` x ``block`` with ``args`` (tensors and numpy scalars, as for
        :func:`cuda.launch`); returns when the kernel has finished."""
        grid = (grid,) if isinstance(grid, int) else tuple(grid)
        block = (block,) if isinstance(block, int) else tuple(block)
        name = fn.name
        if shared_mem:
            raise NotImplementedError(f"{name}: dynamic shared memory is not emulated")
        if not (1 <= len(grid) <= 3 and 1 <= len(block) <= 3):
            raise ValueError(f"{name}: grid and block need 1 to 3 dimensions, got {grid}, {block}")
        grid3 = (*grid, 1, 1)[:3]
        block3 = (*block, 1, 1)[:3]
        threads = block3[0] * block3[1] * block3[2]
        if min(block3) < 1 or threads > 1024 or block3[0] > 1024 or block3[1] > 1024 or block3[2] > 64:
            raise ValueError(f"{name}: invalid block {block} (at most 1024 threads, z <= 64)")
        if min(grid3) < 0 or grid3[0] >= 2 ** 31 or max(grid3[1:]) > 65535:
            raise ValueError(f"{name}: invalid grid {grid}")
        if fn.max_threads and threads > fn.max_threads:
            raise ValueError(f"{name}: {threads} threads per block exceed its "
                             f"__launch_bounds__({fn.max_threads})")
        if len(args) != len(fn.params):
            raise TypeError(f"{name} takes {len(fn.params)} arguments "
                            f"({', '.join(p.ctype for p in fn.params)}), got {len(args)}")
        if not any(isinstance(a, torch.Tensor) for a in args):
            raise ValueError("launch needs at least one tensor argument to pick the device")
        slots, spans, regions = self._marshal(fn, args)
        if 0 in grid3:
            return
        resident = self.resident_blocks if not fn.module.private_statics else 1
        seed = (self.seed * 0x9E3779B97F4A7C15 + (self.launches + 1) * 0xD1B54A32D192ED03) & _U64
        self.launches += 1
        self.launched[name] = self.launched.get(name, 0) + 1
        LAUNCHES[name] += 1
        arena = self._stage(spans, regions, slots)
        try:
            self._run(fn, grid, block, grid3, block3, slots, seed, resident, regions)
        finally:
            arena.close()

    def _run(self, fn, grid, block, grid3, block3, slots, seed, resident, regions) -> None:
        name = fn.name
        dims = (ctypes.c_uint * 6)(*grid3, *block3)
        raw = (ctypes.c_uint64 * max(1, len(slots)))(*slots)
        err = ctypes.create_string_buffer(4096)
        with _LOCK:
            rc = fn.module.lib.hvdc_emu_launch(fn.index, dims, raw, seed, self.policy, resident,
                                               self.stack_bytes, err, len(err))
            stats = (ctypes.c_uint64 * 5)()
            fn.module.lib.hvdc_emu_last_stats(stats)
        for key, value in zip(self.stats, stats[:4]):
            self.stats[key] += value
        policy = SCHEDULES[stats[4]]
        self.schedules[policy] = self.schedules.get(policy, 0) + 1
        context = (f"[{name}<<<{grid}, {block}>>>, launch seed {seed:#018x}, {policy} schedule, "
                   f"{self!r}]")
        if rc:
            message = err.value.decode(errors="replace")
            fault = re.search(r"at address (0x[0-9a-f]+)", message)
            if fault:
                message += self._locate(int(fault.group(1), 16), regions)
            raise EmulatorError(f"{message} {context}")
        self._unstage(regions, context)

    # ---- arguments ----

    def _marshal(self, fn: EmulatedKernel, args: Sequence[Any]):
        """Raw 64-bit slots of the scalars, the buffers the launch touches, and the regions of
        host memory to stage (overlapping buffers merged)."""
        slots: list[int] = [0] * len(args)
        spans: list[_Span] = []
        for i, (a, p) in enumerate(zip(args, fn.params)):
            what = f"{fn.name} argument {i} ({p.ctype})"
            if isinstance(a, torch.Tensor):
                if not p.pointer:
                    raise TypeError(f"{what}: got a tensor for a scalar parameter")
                if a.device.type != "cpu" or not a.is_contiguous():
                    raise ValueError(f"kernel argument {i}: tensors must be contiguous and on the "
                                     f"CPU for the emulator, got {a.device} "
                                     f"(contiguous={a.is_contiguous()})")
                allowed = _POINTEE.get(p.elem)
                if allowed is not None and a.dtype not in allowed:
                    raise TypeError(f"{what}: a {a.dtype} tensor does not fit the pointer type")
                span = _Span(a.data_ptr(), a.numel() * a.element_size(), what, p.kind == "pc", i)
                spans.append(span)
                entry = self._ptr_arrays.get(id(a))
                if entry is not None and entry[0]() is a:
                    span.targets = []
                    for w, t in enumerate(entry[1]):
                        if not t.is_contiguous():
                            raise ValueError(f"{what}[{w}]: not contiguous")
                        target = _Span(t.data_ptr(), t.numel() * t.element_size(), f"{what}[{w}]",
                                       False, None)
                        span.targets.append(target)
                        spans.append(target)
            elif isinstance(a, np.generic):
                if p.pointer:
                    if a.dtype not in (np.uint64, np.int64) or int(a) != 0:
                        raise TypeError(f"{what}: pass a tensor, or np.uint64(0) for a null "
                                        f"pointer, not np.{a.dtype}({a})")
                else:
                    want = _SCALAR.get(p.elem)
                    if not (want is not None and a.dtype == want
                            or p.ctype == "bool" and a.dtype == np.bool_):
                        raise TypeError(f"{what}: needs "
                                        f"{'np.' + np.dtype(want).name if want else p.ctype}, "
                                        f"got np.{a.dtype}")
                    slots[i] = int.from_bytes(a.tobytes().ljust(8, b"\0"), "little")
            elif isinstance(a, (bool, int, float)):
                raise TypeError(f"kernel argument {i}: pass a numpy scalar of the parameter's C "
                                f"type, not a Python {type(a).__name__}")
            else:
                raise TypeError(f"{what}: unsupported argument {type(a).__name__}")
        regions: list[_Region] = []
        for span in sorted(spans, key=lambda s: s.start):
            cur = regions[-1] if regions else None
            if cur is not None and span.nbytes and span.start < cur.end:
                cur.end = max(cur.end, span.start + span.nbytes)
                cur.labels.append(span.label)
                cur.const = cur.const and span.const
                cur.pointer_array = cur.pointer_array or span.targets is not None
            else:
                cur = _Region(span.start, span.start + span.nbytes, [span.label], span.const,
                              span.targets is not None)
                regions.append(cur)
            span.region = cur
        for region in regions:
            if region.pointer_array and len(region.labels) > 1:
                raise ValueError(f"a pointer array overlaps other buffers: {region.labels}")
        return slots, spans, regions

    @staticmethod
    def _stage(spans: list[_Span], regions: list[_Region], slots: list[int]) -> _Arena:
        """Copy every region into the arena (red zones of 0xFF around it, guard pages beyond);
        point the slots and the pointer arrays at the copies."""
        arena = _Arena(regions)
        for r in regions:
            if r.end > r.start:
                ctypes.memmove(r.staged, r.start, r.end - r.start)
        for span in spans:
            if span.arg is not None:
                slots[span.arg] = span.staged
            if span.targets is not None:
                values = (ctypes.c_int64 * len(span.targets))(*(t.staged for t in span.targets))
                ctypes.memmove(span.staged, values, 8 * len(span.targets))
                span.region.expected = bytes(values)
        return arena

    @staticmethod
    def _locate(address: int, regions: list[_Region]) -> str:
        """Where a faulting address lies relative to the staged buffers."""
        for r in regions:
            lo, hi = r.staged, r.staged + (r.end - r.start)
            if r.area - _Arena.GUARD <= address < r.area + r.size + _Arena.GUARD:
                where = (f"{lo - address} bytes before" if address < lo else
                         f"{address - hi} bytes past the end of" if address >= hi else "inside")
                return f" ({where} {' / '.join(r.labels)})"
        return " (not near any argument)"

    @staticmethod
    def _unstage(regions: list[_Region], context: str) -> None:
        errors = []
        for r in regions:
            nbytes = r.end - r.start
            data = np.ctypeslib.as_array((ctypes.c_ubyte * r.size).from_address(r.area))
            for lo, hi, side in ((0, r.offset, "before"), (r.offset + nbytes, r.size, "past the end of")):
                bad = np.flatnonzero(data[lo:hi] != 0xFF)
                if bad.size:
                    first, last = lo + bad[0] - r.offset, lo + bad[-1] - r.offset
                    if side != "before":
                        first, last = first - nbytes, last - nbytes
                    errors.append(f"wrote {bad.size} byte(s) {side} {' / '.join(r.labels)} "
                                  f"(byte offsets {first}..{last} relative to "
                                  f"{'its start' if side == 'before' else 'its end'})")
            staged = ctypes.string_at(r.staged, nbytes) if nbytes else b""
            if r.pointer_array:
                if staged != r.expected:
                    errors.append(f"overwrote the pointer array {r.labels[0]}")
                continue
            if r.const:
                if staged != ctypes.string_at(r.start, nbytes):
                    errors.append(f"wrote through a const pointer: {' / '.join(r.labels)}")
                continue
            if nbytes:
                ctypes.memmove(r.start, r.staged, nbytes)
        if errors:
            raise EmulatorError("; ".join(errors) + " " + context)
