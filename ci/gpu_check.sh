#!/usr/bin/env bash
# GPU check: one command for a lent GPU machine, sized to run twice inside 15 minutes of device
# time (budget 7.5 minutes; about 3 expected on an H100/H200).
#
#   bash ci/gpu_check.sh
#
# Needs only what the lent image has: Python with torch (CUDA), CuPy and pytest, and a C compiler
# for the CPU reference library (built in place with setuptools, or with cc directly).  Installs
# nothing, uses no network and no Horovod.  Steps, each under `timeout` and a global deadline:
#
#   1. environment (GPU, driver, CUDA, torch, CuPy, NVRTC);
#   2. the C reference library, built in place;
#   3. every GPU-marked test ([cuda] variants: every kernel against the C reference, bit for bit;
#      the sync guard: no CUDA synchronization in the backward hooks, tests/engine/test_sync_guard.py;
#      golden vectors; the emulator's warp collectives against the hardware);
#   4. the NVRTC/ptxas compile check (registers, spills) for sm_80 and sm_90;
#   5. the kernel benchmark (python -m hvd_compress.bench --device cuda, 100M elements);
#
# then writes the report to docs/gpu/<YYYY-MM-DD>-<gpu>.md (commit it) and prints its path; logs
# go to build/gpu_check/.  Every step runs even if an earlier one failed; the exit status is
# non-zero if anything failed or the GPU tests could not run.
#
# Settings (environment): PYTHON (default python3), GPU_CHECK_BUDGET (seconds, default 450),
# GPU_BENCH_NUMEL (default 100000000), GPU_REPORT_DIR (default docs/gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

PY=${PYTHON:-$(command -v python3 || command -v python)}
BUDGET=${GPU_CHECK_BUDGET:-450}
NUMEL=${GPU_BENCH_NUMEL:-100000000}
REPORT_DIR=${GPU_REPORT_DIR:-docs/gpu}
LOGS=build/gpu_check
mkdir -p "$LOGS" "$REPORT_DIR"
LOG=$LOGS/gpu_check.log
: >"$LOG"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# A private kernel cache: every kernel is compiled from scratch, nothing is left behind.
kernel_cache=$(mktemp -d)
trap 'rm -rf "$kernel_cache"' EXIT
export HVD_COMPRESS_KERNEL_CACHE="$kernel_cache"
failed=()
timings=()
START=$SECONDS

remaining() { echo $((BUDGET - (SECONDS - START))); }

# step NAME CAP OUTFILE CMD...: run CMD under timeout min(CAP, time left), output to OUTFILE and
# the log; remember a failure or a timeout.
step() {
    local name=$1 cap=$2 out=$3; shift 3
    local left t0 rc limit
    left=$(remaining)
    limit=$(( cap < left ? cap : left ))
    if [ "$limit" -le 5 ]; then
        echo "== $name: skipped, the ${BUDGET}s budget is spent" | tee -a "$LOG"
        failed+=("$name (not run: time budget spent)")
        timings+=("| $name | not run | |")
        echo "not run: time budget spent" >"$out"
        return 124
    fi
    local cmd="$*"
    echo "== $name (limit ${limit}s): ${cmd:0:160}" | tee -a "$LOG"
    t0=$SECONDS
    timeout -k 10 "$limit" "$@" >"$out" 2>&1
    rc=$?
    cat "$out" >>"$LOG"
    local took=$((SECONDS - t0))
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        failed+=("$name (timed out after ${limit}s)")
        timings+=("| $name | ${took} s | timed out |")
        echo "   TIMED OUT after ${limit}s" | tee -a "$LOG"
    elif [ $rc -ne 0 ]; then
        failed+=("$name (exit $rc)")
        timings+=("| $name | ${took} s | exit $rc |")
        echo "   FAILED (exit $rc, ${took}s)" | tee -a "$LOG"
    else
        timings+=("| $name | ${took} s | ok |")
        echo "   ok (${took}s)" | tee -a "$LOG"
    fi
    return $rc
}

summary() {  # the final "N passed, M skipped in Ts" line of a pytest output file
    grep -E '[0-9]+ (passed|failed|errors?|skipped|deselected)|no tests ran' "$1" | tail -1 \
        | sed -E 's/^=+ //; s/ =+$//'
}

# ---- 1. environment ---------------------------------------------------------------------------
step environment 60 "$LOGS/env.md" "$PY" - <<'EOF'
import platform, subprocess
def ver(fn):
    try:
        return fn()
    except Exception as e:  # report what is missing instead of stopping
        return f"n/a ({type(e).__name__}: {e})".replace("|", "/").replace("\n", " ")[:120]
import torch
rows = [("GPU", ver(lambda: torch.cuda.get_device_name(0))),
        ("compute capability", ver(lambda: "sm_%d%d" % torch.cuda.get_device_capability(0))),
        ("SMs", ver(lambda: torch.cuda.get_device_properties(0).multi_processor_count)),
        ("driver", ver(lambda: subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, check=True, timeout=30).stdout.strip())),
        ("CUDA (torch build)", ver(lambda: torch.version.cuda)),
        ("torch", torch.__version__),
        ("CuPy", ver(lambda: __import__("cupy").__version__)),
        ("CUDA runtime (CuPy)", ver(lambda: __import__("cupy").cuda.runtime.runtimeGetVersion())),
        ("NVRTC", ver(lambda: __import__("hvd_compress.backends.cuda", fromlist=["x"]).nvrtc_version())),
        ("cuda-bindings", ver(lambda: __import__("cuda.bindings", fromlist=["x"]).__version__)),
        ("pytest", ver(lambda: __import__("pytest").__version__)),
        ("C compiler", ver(lambda: subprocess.run(["cc", "--version"], capture_output=True, text=True,
                                                  timeout=30).stdout.splitlines()[0])),
        ("Python", platform.python_version()),
        ("host", f"{platform.node()}, {__import__('os').cpu_count()} CPUs")]
print("| component | version |\n|---|---|")
for k, v in rows:
    print(f"| {k} | {v} |")
EOF
cat "$LOGS/env.md"
gpu_name=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))" 2>/dev/null || true)
slug=$(echo "${gpu_name:-no-gpu}" | tr '[:upper:]' '[:lower:]' | sed -E 's/^nvidia //; s/[^a-z0-9]+/-/g; s/^-+|-+$//g')
REPORT="$REPORT_DIR/$(date -u +%F)-${slug:-no-gpu}.md"

# ---- 2. the C reference library, in place ------------------------------------------------------
build_cpu_library() {
    if "$PY" -c "import setuptools" 2>/dev/null; then
        "$PY" setup.py -q build_ext --inplace
    else  # no setuptools: the same flags as setup.py, with the C compiler directly
        local suffix
        suffix=$("$PY" -c "import importlib.machinery as m; print(m.EXTENSION_SUFFIXES[0])")
        ${CC:-cc} -O3 -std=c11 -fopenmp -ffp-contract=off -fno-fast-math -fvisibility=default \
            -fPIC -shared -Ikernels -Icsrc csrc/*.c -o "hvd_compress/_hvdc_cpu$suffix"
    fi
}
export PY
step build 180 "$LOGS/build.log" bash -c "$(declare -f build_cpu_library); build_cpu_library"
step cuda-available 60 "$LOGS/cuda_available.log" "$PY" -c \
    "from hvd_compress.backends import cuda; assert cuda.available(), 'CuPy or the GPU is not usable'"

# ---- 3. GPU tests -----------------------------------------------------------------------------
# Test files that need neither Horovod nor the multi-process harness.
test_files=()
for f in tests/*/test_*.py; do
    grep -qE '^(from|import) (harness|horovod)' "$f" || test_files+=("$f")
done
step "pytest -m gpu" 300 "$LOGS/gpu_pytest.log" "$PY" -m pytest -m gpu -q -rfEs -p no:cacheprovider \
    "${test_files[@]}"
rc=$?
gpu_summary=$(summary "$LOGS/gpu_pytest.log")
[ $rc -eq 5 ] && failed+=("pytest -m gpu collected nothing")
# conftest.py skips GPU tests with this reason when CuPy or the device is unusable.
if grep -q 'needs a CUDA device and CuPy' "$LOGS/gpu_pytest.log"; then
    failed+=("GPU tests skipped: CuPy or the device is unusable, so nothing ran on a GPU")
fi
echo "pytest -m gpu: $gpu_summary"

# ---- 4. NVRTC compile check ---------------------------------------------------------------------
rm -f build/nvrtc_report.txt
step "NVRTC compile test" 150 "$LOGS/nvrtc_pytest.log" "$PY" -m pytest tests/kernels/test_nvrtc_compile.py -q -rfE \
    -p no:cacheprovider
nvrtc_summary=$(summary "$LOGS/nvrtc_pytest.log")
echo "NVRTC compile test: $nvrtc_summary"

# ---- 5. benchmark -------------------------------------------------------------------------------
step benchmark 240 "$LOGS/bench.txt" "$PY" -m hvd_compress.bench --device cuda --numel "$NUMEL" --repeat 5 \
    --json "$LOGS/bench.json"

# ---- report ---------------------------------------------------------------------------------------
total=$((SECONDS - START))
{
    echo "# GPU check $(date -u +%Y-%m-%dT%H:%MZ): ${gpu_name:-no GPU}"
    echo
    commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
    [ -z "$(git status --porcelain --untracked-files=no 2>/dev/null | grep -v " $REPORT_DIR/")" ] \
        || commit="$commit (+ uncommitted changes)"
    echo "Commit \`$commit\`; command \`bash ci/gpu_check.sh\`; ${total} s in all (budget ${BUDGET} s)."
    echo
    cat "$LOGS/env.md"
    echo
    echo "## Result: $([ ${#failed[@]} -eq 0 ] && echo PASS || echo FAIL)"
    echo
    for f in "${failed[@]}"; do echo "- failed: $f"; done
    echo "- \`pytest -m gpu\` (${#test_files[@]} test files): ${gpu_summary:-no summary (see gpu_pytest.log)}"
    echo "- NVRTC compile test: ${nvrtc_summary:-no summary (see nvrtc_pytest.log)}"
    if grep -qE '^(FAILED|ERROR) ' "$LOGS/gpu_pytest.log"; then
        echo
        echo '```'
        grep -E '^(FAILED|ERROR) ' "$LOGS/gpu_pytest.log" | head -40
        echo '```'
    fi
    echo
    echo "| step | time | status |"
    echo "|---|---|---|"
    printf '%s\n' "${timings[@]}"
    if [ -f build/nvrtc_report.txt ]; then
        echo
        echo "## Kernel resources (ptxas -v through NVRTC)"
        echo
        echo '```'
        cat build/nvrtc_report.txt
        echo '```'
    fi
    echo
    echo "## Benchmark (\`python -m hvd_compress.bench --device cuda --numel $NUMEL --repeat 5\`)"
    echo
    echo '```'
    tail -n 40 "$LOGS/bench.txt"
    echo '```'
} >"$REPORT"
echo "report: $REPORT (logs: $LOGS/; ${total} s)"

[ ${#failed[@]} -eq 0 ]
