"""Shared fixtures and markers.

Kernel tests take the ``kernels`` fixture (a :class:`KernelTarget`) and run twice:

* ``[cuda]``: on a real CUDA device (marked ``gpu``; skipped unless CUDA and CuPy are present;
  ``ci/gpu_check.sh`` runs them on a lent GPU);
* ``[emu]``: on the SIMT emulator (marked ``emu``; run in CI): CPU tensors, the codecs' CUDA code
  path, the very ``kernels/*.cu`` compiled by the host compiler (docs/emulator.md).  Each test
  gets its own scheduling seed (a hash of its node id, xor ``$HVD_COMPRESS_EMU_SEED``), and
  uninitialised memory from ``torch.empty`` is filled with NaN / the largest integer, so an
  output a kernel fails to write shows.  Emulated variants of tests parametrized with a size
  ``n`` above ``$HVD_COMPRESS_EMU_MAX_NUMEL`` (default 2,100,000; 0: no limit) are deselected
  to keep CI fast.  The terminal summary lists the kernels the emulator ran.

Tests without the fixture that are marked ``gpu`` themselves are CUDA-only.
"""
from __future__ import annotations

import contextlib
import os
import zlib

import pytest
import torch

import emulator
from hvd_compress.backends import cuda, emulate

EMU_MAX_NUMEL = int(os.environ.get("HVD_COMPRESS_EMU_MAX_NUMEL", 2_100_000)) or float("inf")
EMU_SEED = int(os.environ.get("HVD_COMPRESS_EMU_SEED", "0"), 0)


class KernelTarget:
    """Where a kernel test runs its CUDA path: ``put`` moves inputs there, and code inside
    ``with target:`` runs the codecs on it (for the emulator: inside ``backends.emulate``)."""

    def __init__(self, name: str, seed: int = 0) -> None:
        self.name = name
        self.emulated = name == "emu"
        self.device = torch.device("cpu" if self.emulated else "cuda")
        #: the loader the codecs use: ``backends.cuda`` or an ``EmulatedBackend``
        self.backend = emulator.EmulatedBackend(seed) if self.emulated else cuda
        self._stack: list[contextlib.ExitStack] = []

    def __repr__(self) -> str:
        return f"KernelTarget({self.name}, {self.backend!r})"

    def put(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of ``t`` on the target (never the same storage as ``t``)."""
        return t.to(self.device, copy=True)

    def __enter__(self) -> "KernelTarget":
        stack = contextlib.ExitStack()
        if self.emulated:
            stack.enter_context(emulate(self.backend))     # also fills torch.empty with NaN / max
        self._stack.append(stack)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.pop().close()


@pytest.fixture
def kernels(request) -> KernelTarget:
    seed = (zlib.crc32(request.node.nodeid.encode()) ^ EMU_SEED) & 0xFFFFFFFF
    return KernelTarget(request.param, seed)


def pytest_generate_tests(metafunc):
    if "kernels" in metafunc.fixturenames:
        metafunc.parametrize("kernels", [pytest.param("cuda", marks=pytest.mark.gpu),
                                         pytest.param("emu", marks=pytest.mark.emu)],
                             indirect=True)


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        big = isinstance(params.get("n"), int) and params["n"] > EMU_MAX_NUMEL
        (drop if params.get("kernels") == "emu" and big else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    if not cuda.available():
        skip = pytest.mark.skip(reason="needs a CUDA device and CuPy (run ci/gpu_check.sh on a GPU)")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)
    if not emulator.available():
        skip = pytest.mark.skip(reason="the emulated kernels need a C++ compiler (g++ or $CXX)")
        for item in items:
            if item.get_closest_marker("emu"):
                item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    if emulator.LAUNCHES:
        runs = ", ".join(f"{k} {v}" for k, v in sorted(emulator.LAUNCHES.items()))
        terminalreporter.write_line(f"emulated kernel launches: {runs}")
