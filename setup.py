"""hvd_compress: gradient compression for Horovod, with C and CUDA kernels.

The CPU reference codecs are a small C library (csrc/, sharing kernels/hvdc_common.h with the CUDA
kernels) built here; the CUDA sources in kernels/ are installed as package data
(hvd_compress/kernels) and compiled by CuPy/NVRTC at run time.
"""
import re
from glob import glob

from setuptools import Extension, setup

cpu_library = Extension(
    "hvd_compress._hvdc_cpu",
    sources=sorted(glob("csrc/*.c")),
    depends=sorted(glob("csrc/*.h") + glob("kernels/*.h")),
    include_dirs=["kernels", "csrc"],
    # -ffp-contract=off: no FMA, so the CPU reference rounds like NVRTC with --fmad=false.
    extra_compile_args=["-O3", "-std=c11", "-fopenmp", "-ffp-contract=off", "-fno-fast-math",
                        "-fvisibility=default"],
    extra_link_args=["-fopenmp"],
)

setup(
    name="hvd_compress",
    version=re.search(r'__version__ = "([^"]+)"', open("hvd_compress/__init__.py", encoding="utf-8").read())[1],
    description=("Gradient compression for Horovod and PyTorch DDP: 17 methods (TernGrad, QSGD, top-k/DGC, "
                 "sign, low-rank, lazy) over a bucketed engine with cost-model routes, topology-aware across "
                 "hosts; bit-identical C and CUDA kernels"),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["hvd_compress", "hvd_compress.codecs", "hvd_compress.backends", "hvd_compress.routes",
              "hvd_compress.engine", "hvd_compress.methods", "hvd_compress.horovod", "hvd_compress.ddp",
              "hvd_compress.kernels"],
    package_dir={"hvd_compress.kernels": "kernels"},
    package_data={"hvd_compress.kernels": ["*.cu", "*.h", "*.cuh"]},
    ext_modules=[cpu_library],
    install_requires=["numpy>=1.24", "torch>=2.0"],
    extras_require={
        "cuda12": ["cupy-cuda12x>=13", "cuda-bindings>=12,<13"],
        "cuda13": ["cupy-cuda13x>=14", "cuda-bindings>=13,<14"],
        "horovod": ["horovod==0.28.1"],
        "examples": ["tqdm>=4.66", "matplotlib>=3.8", "scikit-learn>=1.4"],
    },
    license="Apache-2.0",
)
