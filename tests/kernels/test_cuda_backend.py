"""The CUDA loader without a GPU: options, kernel discovery, the CUBIN disk cache (with a stand-in
for ``cupy.RawModule``) and launch-argument validation.  The real launches are the ``gpu`` tests."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from hvd_compress.backends import cuda


def test_options_pin_the_numeric_contract():
    options = cuda.nvrtc_options()
    for flag in ("--fmad=false", "--ftz=false", "--prec-div=true", "--prec-sqrt=true", "--std=c++17"):
        assert flag in options
    assert f"-I{cuda.kernel_dir()}" in options
    assert (cuda.kernel_dir() / "hvdc_common.h").is_file()
    assert not any(o.startswith("-arch") for o in options)


@pytest.fixture
def fresh_loader_caches():
    """The in-process caches of the loader, emptied before and after the test."""
    caches = (cuda._module, cuda._kernel)
    for cache in caches:
        cache.cache_clear()
    yield lambda: [cache.cache_clear() for cache in caches]
    for cache in caches:
        cache.cache_clear()


def test_kernel_compiles_once_into_the_disk_cache(monkeypatch, tmp_path, fresh_loader_caches):
    try:
        cuda.nvrtc_version()
    except ImportError:
        pytest.skip("no NVRTC binding")
    loaded = []

    class RawModule:  # records what cupy.RawModule would load
        def __init__(self, *, path):
            loaded.append(path)

        def get_function(self, name):
            return name

    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(RawModule=RawModule))
    monkeypatch.setenv("HVD_COMPRESS_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    assert cuda.kernel("rng.cu", "hvdc_stream_u32", "cuda") == "hvdc_stream_u32"
    (cubin,) = tmp_path.glob("*.cubin")
    assert cubin.name.startswith("rng-sm90-") and cubin.read_bytes()[:4] == b"\x7fELF"

    # A new process (caches emptied) loads the cached CUBIN without compiling.
    fresh_loader_caches()
    monkeypatch.setattr(cuda, "compile_cubin", lambda *a, **k: pytest.fail("recompiled"))
    cuda.kernel("rng.cu", "hvdc_stream_u32", torch.device("cuda", 0))
    assert loaded == [str(cubin)] * 2


def test_launch_rejects_untyped_scalars_and_bad_tensors():
    t = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(TypeError, match="numpy scalar"):
        cuda.launch(None, 1, 32, (t, 4))
    with pytest.raises(ValueError, match="contiguous"):
        cuda.launch(None, 1, 32, (torch.zeros(4, 2)[:, 0], np.int64(4)))
    with pytest.raises(ValueError, match="CUDA"):
        cuda.launch(None, 1, 32, (t, np.int64(4)))
    with pytest.raises(ValueError, match="tensor"):
        cuda.launch(None, 1, 32, (np.int64(4),))
