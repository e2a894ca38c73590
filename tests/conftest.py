"""Shared fixtures and markers.  GPU tests are skipped unless CUDA and CuPy are present."""
import pytest

from hvd_compress.backends import cuda


def pytest_collection_modifyitems(config, items):
    if cuda.available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and CuPy (run ci/gpu_check.sh on a GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
