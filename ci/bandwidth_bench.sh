#!/usr/bin/env bash
# Bandwidth-limited benchmark: 2 and 4 Horovod ranks (Gloo) inside a private network namespace
# whose loopback is rate-limited with tc (tbf), every compressor at every rate over the same link,
# plus runs without a limit; writes out/bandwidth/results.jsonl and docs/bandwidth.md.
# BW_FRAMEWORK=ddp runs PyTorch DDP ranks (torchrun, gloo) instead: specs are then none,
# torch-fp16, torch-powersgd:rank=R (PyTorch's own hooks) and hvd_compress specs (its DDP hook).
#
#   sudo bash ci/bandwidth_bench.sh                      # full run (about an hour on 2 cores)
#   BW_RATES="100mbit" BW_SPECS="none topk:ratio=0.01" BW_MODEL="--width 64 --depth 2" \
#   BW_STEPS_100MBIT=2 BW_MINTIME_100MBIT=0 BW_MARKDOWN=/tmp/bw.md bash ci/bandwidth_bench.sh   # what the smoke test runs
#
# Needs root (ip netns, tc) and an installed environment (.venv with horovodrun; ci/install.sh).
# The tree's own hvd_compress is used (C library built in place, PYTHONPATH=.), not the venv's copy.
# Settings (environment):
#   BW_FRAMEWORK horovod (default) or ddp
#   BW_NP        world sizes (default "2 4")
#   BW_RATES     rates as tc spells them, and/or "unlimited"   (default "100mbit 1gbit unlimited")
#   BW_SPECS     compressions (default "none hvd-fp16 terngrad qsgd:bits=4 topk:ratio=0.01";
#                specs this tree's hvd_compress does not know are skipped and listed as not run)
#   BW_SPECS_<RATE>, BW_SPECS_<RATE>_NP<N>: more specs at that rate (and world size); by default
#                the layer-wise variants (bucket_cap_mb=0) at 1gbit with 2 ranks
#   BW_STEPS_<RATE>, BW_MINTIME_<RATE>, BW_WARMUP_<RATE>: at least this many timed steps, and
#                on until they take this many seconds (BW_MAX_STEPS at most, 30), after this many
#                warm-up steps; e.g. BW_STEPS_100MBIT=3 BW_MINTIME_100MBIT=10 BW_WARMUP_100MBIT=1
#   BW_MODEL     model arguments (default "--model resnet50": ResNet-50's 161 parameter shapes)
#   BW_TIMEOUT   seconds per horovodrun (default 600); BW_CALIBRATE seconds per goodput test (2)
#   BW_OUT       results directory (out/bandwidth); BW_MARKDOWN report (docs/bandwidth.md, "" = none)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

if [ "$(id -u)" != 0 ]; then
    echo "ci/bandwidth_bench.sh: needs root for ip netns and tc (run it with sudo)" >&2
    exit 2
fi
for tool in ip tc timeout; do
    command -v "$tool" >/dev/null || { echo "ci/bandwidth_bench.sh: $tool not found (apt-get install iproute2 coreutils)" >&2; exit 2; }
done
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$(dirname "$PY")/horovodrun" ] || bash ci/install.sh
HOROVODRUN=$(dirname "$PY")/horovodrun

NPS=${BW_NP:-2 4}
RATES=${BW_RATES:-100mbit 1gbit unlimited}
SPECS=${BW_SPECS:-none hvd-fp16 terngrad qsgd:bits=4 topk:ratio=0.01}
BW_SPECS_1GBIT_NP2=${BW_SPECS_1GBIT_NP2-terngrad:bucket_cap_mb=0 topk:ratio=0.01,bucket_cap_mb=0}
MODEL=${BW_MODEL:---model resnet50}
TIMEOUT=${BW_TIMEOUT:-600}
CALIBRATE=${BW_CALIBRATE:-2}
OUT=${BW_OUT:-out/bandwidth}
MARKDOWN=${BW_MARKDOWN-docs/bandwidth.md}
FRAMEWORK=${BW_FRAMEWORK:-horovod}
MTU=1500

# Build the C library in place so the tree's package is the one imported.
"$PY" setup.py -q build_ext --inplace >/dev/null
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1

mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
: > "$RESULTS"

NS=hvdbw-$$-$RANDOM
CHILD=
cleanup() {
    local pids
    # The running job first (timeout passes the TERM on to horovodrun), then whatever is left in
    # our own namespace (only processes this script started), then the namespace.
    [ -z "$CHILD" ] || kill -TERM "$CHILD" 2>/dev/null || true
    if ip netns list | awk '{print $1}' | grep -qxF "$NS"; then
        # Only processes inside our own namespace (all started by this script).
        pids=$(ip netns pids "$NS" 2>/dev/null || true)
        [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
        ip netns del "$NS" || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Run a command in the background and wait for it: a signal to this script then runs the trap
# at once (bash defers traps until a foreground child ends).
bounded() {
    "$@" &
    CHILD=$!
    local rc=0
    wait "$CHILD" || rc=$?
    CHILD=
    return "$rc"
}

ip netns add "$NS"
ip netns exec "$NS" ip link set lo mtu "$MTU"
ip netns exec "$NS" ip link set lo up
echo "namespace $NS: lo mtu $MTU"

# tbf parameters per rate: burst well above one 1514-byte frame (a few ms of line rate), and a
# queue (latency) long enough that TCP does not lose packets at the bucket.
tbf_args() {
    case $1 in
        100mbit) echo "rate 100mbit burst 64kb latency 100ms" ;;
        1gbit)   echo "rate 1gbit burst 256kb latency 50ms" ;;
        *mbit|*gbit|*kbit) echo "rate $1 burst 256kb latency 100ms" ;;
        *) echo "" ;;
    esac
}

# Timed steps per rate: at least STEPS, and on until they add up to MINTIME seconds (at most
# BW_MAX_STEPS): few at 100 Mbit/s, where an uncompressed step takes ~7 s, more where steps are short.
steps_for() {
    local key
    key=$(echo "$1" | tr '[:lower:]' '[:upper:]')
    local s="BW_STEPS_$key" w="BW_WARMUP_$key" t="BW_MINTIME_$key"
    case $1 in
        100mbit) echo "${!s:-3} ${!w:-1} ${!t:-8}" ;;
        *)       echo "${!s:-5} ${!w:-2} ${!t:-4}" ;;
    esac
}
MAX_STEPS=${BW_MAX_STEPS:-30}

# The specs of one (rate, world size) that this tree can build; the others are listed as not run.
specs_for() {  # specs_for RATE NP
    local key var extra spec reason
    key=$(echo "$1" | tr '[:lower:]' '[:upper:]')
    var="BW_SPECS_$key"; extra="${!var:-}"
    var="BW_SPECS_${key}_NP$2"; extra="$extra ${!var:-}"
    for spec in $SPECS $extra; do
        case $spec in
            none|hvd-fp16|torch-fp16|torch-powersgd*) echo "$spec"; continue ;;
        esac
        if reason=$("$PY" -c 'import sys, hvd_compress; hvd_compress.from_spec(sys.argv[1])' "$spec" 2>&1); then
            echo "$spec"
        else
            reason=$(echo "$reason" | tail -n 1 | tr -d '"\\')
            echo "skipping $spec: $reason" >&2
            printf '{"bench": "skipped", "compression": "%s", "reason": "%s"}\n' "$spec" "$reason" >> "$RESULTS"
        fi
    done
}

for rate in $RATES; do
    tbf=$(tbf_args "$rate")
    ip netns exec "$NS" tc qdisc del dev lo root 2>/dev/null || true
    if [ -n "$tbf" ]; then
        ip netns exec "$NS" tc qdisc add dev lo root tbf $tbf
        label=$rate
        linkdev=(--link-dev lo)   # count the bytes through the tbf
    else
        label=unlimited
        linkdev=()                # lo's default noqueue counts nothing
    fi
    echo "== $label: $(ip netns exec "$NS" tc qdisc show dev lo | head -n 1)"
    bounded timeout -k 5 60 ip netns exec "$NS" "$PY" examples/bandwidth_bench.py --calibrate "$CALIBRATE" \
        --rate-label "$label" "${linkdev[@]}" --tc "${tbf:+tbf $tbf}" --out "$RESULTS"
    read -r steps warmup mintime <<< "$(steps_for "$rate")"
    for np in $NPS; do
    mapfile -t run_specs < <(specs_for "$rate" "$np")
    for spec in "${run_specs[@]}"; do
        echo "-- $label np=$np $spec ($warmup warm-up, then >= $steps steps and >= $mintime s)"
        start=$SECONDS
        log=$OUT/log-$label-np$np-$(echo "$spec" | tr -c 'A-Za-z0-9.=\n' '_').txt
        rc=0
        if [ "$FRAMEWORK" = ddp ]; then
            # PyTorch's PowerSGD hook chains its allreduces in future callbacks, which interleave
            # differently on each rank when several buckets are in flight (a gloo size mismatch
            # on ResNet-50's shapes): it gets one bucket (docs/ddp.md)
            bucket=25; case $spec in torch-powersgd*) bucket=1000 ;; esac
            launch=("$PY" -m torch.distributed.run --nproc_per_node "$np" --master_port $((29400 + RANDOM % 500)))
            launch_args=(--framework ddp --ddp-bucket-mb "$bucket")
        else
            launch=("$HOROVODRUN" -np "$np" -H "localhost:$np" --gloo "$PY")
            launch_args=()
        fi
        # shellcheck disable=SC2086
        bounded timeout -k 10 "$TIMEOUT" ip netns exec "$NS" "${launch[@]}" \
            examples/bandwidth_bench.py "${launch_args[@]}" --compression "$spec" --steps "$steps" --warmup "$warmup" \
            --min-time "$mintime" --max-steps "$MAX_STEPS" \
            --rate-label "$label" "${linkdev[@]}" --out "$RESULTS" $MODEL > "$log" 2>&1 || rc=$?
        if [ "$rc" != 0 ]; then
            tail -n 20 "$log" >&2
            printf '{"bench": "failed", "compression": "%s", "rate": "%s", "workers": %s, "reason": "exit %s after %ss"}\n' \
                "$spec" "$label" "$np" "$rc" "$((SECONDS - start))" >> "$RESULTS"
            # Leave nothing behind in the namespace before the next run.
            pids=$(ip netns pids "$NS" 2>/dev/null || true)
            [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
            continue
        fi
        grep -o '{"bench": "bandwidth".*' "$log" | tail -n 1 | cut -c 1-200
        echo "   ($((SECONDS - start)) s)"
    done
    done
done

if [ -n "$MARKDOWN" ]; then
    command="bash ci/bandwidth_bench.sh"
    for var in BW_FRAMEWORK BW_NP BW_RATES BW_SPECS BW_MODEL BW_TIMEOUT BW_CALIBRATE BW_MAX_STEPS $(compgen -v BW_STEPS_) $(compgen -v BW_WARMUP_) $(compgen -v BW_MINTIME_); do
        [ -z "${!var+x}" ] || command="$var=\"${!var}\" $command"
    done
    commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
    git diff --quiet HEAD -- . ":(exclude)$MARKDOWN" 2>/dev/null || commit="$commit (+ uncommitted changes)"
    "$PY" examples/bandwidth_bench.py --report "$RESULTS" --markdown "$MARKDOWN" --command "$command" --commit "$commit"
    echo "wrote $MARKDOWN"
fi
echo "results: $RESULTS"
