#!/usr/bin/env bash
# GPU check, one command for a lent GPU machine (torch with CUDA, CuPy, pytest; no Horovod, no
# network, no virtualenv): builds the C reference library in place, runs every GPU-marked test
# (CPU == GPU bit for bit) and the NVRTC/ptxas compile check, runs the kernel benchmark
# (`python -m hvd_compress.bench --device cuda`) when that module exists, and writes a markdown
# report to ${OUT:-build}/gpu_report.md (meant to be committed under docs/gpu/).
#
# Every step runs even if an earlier one failed; the exit status is non-zero if the build, a
# test or the benchmark failed, or if the GPU tests could not run at all.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-$(command -v python3 || command -v python)}
OUT_DIR=${OUT:-build}
mkdir -p "$OUT_DIR"
REPORT="$OUT_DIR/gpu_report.md"
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# A private kernel cache: the run compiles every kernel from scratch and leaves nothing behind.
kernel_cache=$(mktemp -d)
trap 'rm -rf "$kernel_cache"' EXIT
export HVD_COMPRESS_KERNEL_CACHE="$kernel_cache"
failed=()

step() {  # step NAME CMD...: run CMD, append its output to $LOG, remember a failure
    local name=$1; shift
    echo "== $name: $*" | tee -a "$LOG"
    "$@" >>"$LOG" 2>&1
    local rc=$?
    [ $rc -eq 0 ] || { failed+=("$name (exit $rc)"); echo "   FAILED (exit $rc)" | tee -a "$LOG"; }
    return $rc
}

summary() {  # the final "N passed, M skipped in Ts" line of a pytest output file
    grep -E '[0-9]+ (passed|failed|errors?|skipped|deselected)|no tests ran' "$1" | tail -1 \
        | sed -E 's/^=+ //; s/ =+$//'
}

# ---- environment ------------------------------------------------------------------------------
env_table=$("$PY" - <<'EOF' 2>&1
import platform, subprocess
def ver(fn):
    try:
        return fn()
    except Exception as e:  # report what is missing instead of stopping
        return f"n/a ({type(e).__name__}: {e})".replace("|", "/")[:120]
import torch
rows = [("GPU", ver(lambda: torch.cuda.get_device_name(0))),
        ("compute capability", ver(lambda: "sm_%d%d" % torch.cuda.get_device_capability(0))),
        ("driver", ver(lambda: subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, check=True).stdout.strip())),
        ("CUDA (torch build)", ver(lambda: torch.version.cuda)),
        ("torch", torch.__version__),
        ("CuPy", ver(lambda: __import__("cupy").__version__)),
        ("CUDA runtime (CuPy)", ver(lambda: __import__("cupy").cuda.runtime.runtimeGetVersion())),
        ("NVRTC", ver(lambda: __import__("hvd_compress.backends.cuda", fromlist=["x"]).nvrtc_version())),
        ("cuda-bindings", ver(lambda: __import__("cuda.bindings", fromlist=["x"]).__version__)),
        ("Python", platform.python_version())]
print("| component | version |\n|---|---|")
for k, v in rows:
    print(f"| {k} | {v} |")
EOF
)
echo "$env_table" | tee -a "$LOG"

# ---- build and tests --------------------------------------------------------------------------
step build "$PY" setup.py -q build_ext --inplace
step cuda-available "$PY" -c "from hvd_compress.backends import cuda; assert cuda.available(), 'CuPy or the GPU is not usable'"

"$PY" -m pytest -m gpu -q -rfEs -p no:cacheprovider --continue-on-collection-errors >"$OUT_DIR/gpu_pytest.log" 2>&1
rc=$?
cat "$OUT_DIR/gpu_pytest.log" >>"$LOG"
gpu_summary=$(summary "$OUT_DIR/gpu_pytest.log")
# Exit 5 = nothing collected, which on a GPU machine is as bad as a failure.
[ $rc -eq 0 ] || failed+=("pytest -m gpu (exit $rc)")
# conftest.py skips GPU tests with this reason when CuPy or the device is unusable.
if grep -q 'needs a CUDA device and CuPy' "$OUT_DIR/gpu_pytest.log"; then
    failed+=("GPU tests skipped: CuPy or the device unusable")
fi
echo "pytest -m gpu: $gpu_summary"

rm -f build/nvrtc_report.txt
"$PY" -m pytest tests/test_nvrtc_compile.py -q -rfE -p no:cacheprovider >"$OUT_DIR/nvrtc_pytest.log" 2>&1
rc=$?
cat "$OUT_DIR/nvrtc_pytest.log" >>"$LOG"
nvrtc_summary=$(summary "$OUT_DIR/nvrtc_pytest.log")
[ $rc -eq 0 ] || failed+=("NVRTC compile test (exit $rc)")
echo "NVRTC compile test: $nvrtc_summary"

# ---- benchmark (written separately; optional) --------------------------------------------------
bench_out="$OUT_DIR/gpu_bench.md"
if "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('hvd_compress.bench') is None)" 2>/dev/null; then
    "$PY" -m hvd_compress.bench --device cuda >"$bench_out" 2>>"$LOG"
    rc=$?
    [ $rc -eq 0 ] || { failed+=("benchmark (exit $rc)"); echo "(benchmark failed with exit $rc, see gpu_check.log)" >>"$bench_out"; }
else
    echo "hvd_compress.bench is not in this checkout; no benchmark run." >"$bench_out"
fi

# ---- report ------------------------------------------------------------------------------------
{
    echo "# GPU check $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "Commit: \`$(git rev-parse --short HEAD 2>/dev/null || echo unknown)\`; command: \`ci/gpu_check.sh\`."
    echo
    echo "$env_table"
    echo
    echo "## Result: $([ ${#failed[@]} -eq 0 ] && echo PASS || echo FAIL)"
    echo
    for f in "${failed[@]}"; do echo "- failed: $f"; done
    echo "- \`pytest -m gpu\`: ${gpu_summary:-no summary (see gpu_pytest.log)}"
    echo "- NVRTC compile test: ${nvrtc_summary:-no summary (see nvrtc_pytest.log)}"
    if grep -qE '^(FAILED|ERROR) ' "$OUT_DIR/gpu_pytest.log"; then
        echo
        echo '```'
        grep -E '^(FAILED|ERROR) ' "$OUT_DIR/gpu_pytest.log" | head -40
        echo '```'
    fi
    if [ -f build/nvrtc_report.txt ]; then
        echo
        echo "## Kernel resources (ptxas -v through NVRTC)"
        echo
        echo '```'
        cat build/nvrtc_report.txt
        echo '```'
    fi
    echo
    echo "## Benchmark (\`python -m hvd_compress.bench --device cuda\`)"
    echo
    cat "$bench_out"
} >"$REPORT"
echo "report: $REPORT (full log: $LOG)"

[ ${#failed[@]} -eq 0 ]
