#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian machine for hvd_compress: system packages, a virtualenv in
# .venv with torch 2.13.0 (CPU), Horovod 0.28.1 built with Gloo + MPI (cached), test and example
# dependencies, and hvd_compress itself.  A second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: OpenMPI for Horovod's MPI controller, cmake/g++ to build Horovod.
need=()
for p in openmpi-bin libopenmpi-dev cmake g++ make; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "[install] apt-get install ${need[*]}"
    SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
PY=.venv/bin/python
# torch is pinned: 2.13.0 is a local CPU wheel; any other version pulls gigabytes of CUDA.
$PY -m pip install --quiet --upgrade "pip>=23" "setuptools>=69" wheel
$PY -m pip install --quiet "torch==2.13.0" -r ci/requirements.txt
PYTHON=$PY bash ci/build_horovod.sh
# hvd_compress itself (compiles the CPU codec library; CUDA kernels compile at run time).
rm -rf build ./*.egg-info  # a stale build/ would be packaged instead of the tree
$PY -m pip install --quiet --no-deps --force-reinstall .
echo "[install] done: $($PY -c 'import hvd_compress; print("hvd_compress", hvd_compress.__version__)')"
