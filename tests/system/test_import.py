"""``hvd_compress.codecs`` imports and its CPU path runs with Horovod and CuPy unimportable and no
GPU visible (docs/design.md: the codecs layer needs neither)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import hvd_compress

# Import the same hvd_compress this test session uses (installed, or an in-place build).
PACKAGE_PARENT = Path(hvd_compress.__file__).resolve().parents[1]

PROBE = r"""
import importlib, pkgutil, sys

class Block:
    # A meta-path finder that refuses these packages, as if they were not installed.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("horovod", "cupy", "cupy_backends"):
            raise ImportError(f"{name} is blocked by test_import")
        return None

sys.meta_path.insert(0, Block())

import hvd_compress.codecs
from hvd_compress.backends import cuda
from hvd_compress.codecs import RandomKey
from hvd_compress.codecs.rng import random_u32

# Every codec module and backend must import too, not just the package.
for package in (hvd_compress.codecs, importlib.import_module("hvd_compress.backends")):
    for module in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        importlib.import_module(module.name)

assert not cuda.available()
words = random_u32(9, RandomKey(seed=1, step=2, tensor_id=3))
assert words.shape == (9,) and words.device.type == "cpu"
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("horovod", "cupy", "cupy_backends"))
assert not leaked, leaked
print("ok")
"""


def test_codecs_import_without_horovod_cupy_or_gpu(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")
