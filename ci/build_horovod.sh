#!/usr/bin/env bash
# Build (once) and install Horovod 0.28.1 for the PyTorch in the active Python, with Gloo and MPI.
#
# Horovod 0.28.1 (the newest release) compiles with C++14, and torch >= 2.1 needs C++17
# (horovod issues #3996/#4014; fixed on master by PR #3998, never released).  The minimal fix is
# to set CMAKE_CXX_STANDARD to 17 in the two CMake files that pin 14; nothing else changes.
#
# The wheel is cached under $HVD_COMPRESS_CACHE (default ~/.cache/hvd_compress) keyed by
# horovod / torch / python / cpu-or-cuda, so a second run only reinstalls it (seconds).
#
# GPU clusters: export HOROVOD_GPU_OPERATIONS=NCCL (and HOROVOD_NCCL_HOME if NCCL is not in the
# CUDA toolkit) before running this script with a CUDA build of torch; the cache key then says
# "nccl" and the wheel gets NCCL allreduce/allgather.  See README "Horovod on a GPU cluster".
set -euo pipefail

PY=${PYTHON:-python}
HVD_VERSION=0.28.1
CACHE=${HVD_COMPRESS_CACHE:-$HOME/.cache/hvd_compress}
torch_ver=$($PY -c 'import torch; print(torch.__version__.replace("+", "_"))')
py_tag=$($PY -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
flavour=cpu
[ "${HOROVOD_GPU_OPERATIONS:-}" = NCCL ] && flavour=nccl
key="horovod-${HVD_VERSION}-torch${torch_ver}-${py_tag}-${flavour}"
wheel_dir="$CACHE/wheels/$key"

if $PY - <<PYEOF 2>/dev/null
import horovod, horovod.torch as hvd
assert horovod.__version__ == "$HVD_VERSION"
assert hvd.gloo_built() and hvd.mpi_built()
PYEOF
then
    echo "[build_horovod] horovod $HVD_VERSION (gloo+mpi) already installed"
    exit 0
fi

if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
    echo "[build_horovod] building $key (about 3 min on 2 cores; cached afterwards in $wheel_dir)"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    $PY -m pip download --quiet --no-deps --no-binary=:all: -d "$work" "horovod==$HVD_VERSION"
    tar -xzf "$work/horovod-$HVD_VERSION.tar.gz" -C "$work"
    src="$work/horovod-$HVD_VERSION"
    # The C++17 fix, and nothing more.
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
        "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
    grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt"
    ! grep -q 'CMAKE_CXX_STANDARD 14' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
    mkdir -p "$wheel_dir"
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
    HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 \
    MAKEFLAGS="-j$(nproc)" HOROVOD_BUILD_ARCH_FLAGS="${HOROVOD_BUILD_ARCH_FLAGS:-}" \
        $PY -m pip wheel --no-build-isolation --no-deps -w "$work/dist" "$src"
    mv "$work"/dist/horovod-*.whl "$wheel_dir/"
fi
$PY -m pip install --quiet --force-reinstall --no-deps "$wheel_dir"/horovod-*.whl
$PY -m pip install --quiet cloudpickle psutil pyyaml packaging
$PY -c 'import horovod.torch as hvd; assert hvd.gloo_built() and hvd.mpi_built(); print("[build_horovod] horovod", __import__("horovod").__version__, "gloo+mpi OK")'
