#!/usr/bin/env bash
# README's main-job command: install everything (idempotent), then train the digits CNN with 2
# Horovod workers uncompressed and with the compressors, print the comparison table and write
# out/digits.png.  20 epochs (440 steps) reach the plateau: shorter runs end before DGC at 99.9%
# sparsity has sent each coordinate once (~1/ratio steps) and would misrepresent it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/install.sh
export PATH="$PWD/.venv/bin:$PATH"
exec python examples/compare.py --task digits --np 2 --epochs 20 --out out \
    --specs ${HVD_COMPRESS_SPECS:-none hvd-fp16 terngrad qsgd:bits=4 topk:ratio=0.01 dgc:ratio=0.001,warmup_steps=60} "$@"
