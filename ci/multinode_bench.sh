#!/usr/bin/env bash
# Two hosts, one job: step time and inter-host bytes of Horovod training across the hosts of
# ci/cluster.sh (network namespaces joined by tc-limited links, stock horovodrun over ssh), for
# Horovod's fp16 and for flat and hierarchical compression, at each inter-host rate.
#
#   sudo bash ci/multinode_bench.sh                                   # the committed run (~25 min)
#   MN_RATES=1gbit MN_SPECS="hvd-fp16 terngrad:hierarchy=True" bash ci/multinode_bench.sh
#
# Each run is examples/bandwidth_bench.py (ResNet-50's 161 parameter tensors by default, after the
# compressor settled: link measured, trial done), launched with
#   horovodrun -np N*S -H $HOSTS --network-interface $IFACE --gloo
# and with --link-dev $IFACE, so rank 0 reads the bytes its host sent to the other hosts around the
# timed steps (from its link's qdisc).  Writes $MN_OUT/results.jsonl and $MN_MARKDOWN.
# Settings (environment):
#   MN_RATES   inter-host rates ("1gbit 10gbit");  MN_NODES, MN_SLOTS: hosts, ranks per host (2, 2)
#   MN_SPECS   compressions (Horovod fp16; TernGrad and top-k 1% as planned, and forced flat and
#              hierarchical);  MN_SPECS_<RATE> (e.g. MN_SPECS_100MBIT): instead, at that rate
#   MN_MODEL   model arguments ("--model resnet50");  MN_STEPS, MN_WARMUP, MN_MINTIME (5, 2, 6)
#   MN_TIMEOUT seconds per job (600);  MN_OUT (out/multinode);  MN_MARKDOWN (docs/multinode-results.md, "" = none)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if [ "$(id -u)" != 0 ]; then
    echo "ci/multinode_bench.sh: needs root (ci/cluster.sh makes network namespaces)" >&2
    exit 2
fi
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$(dirname "$PY")/horovodrun" ] || bash ci/install.sh
HOROVODRUN=$(dirname "$PY")/horovodrun

RATES=${MN_RATES:-1gbit 10gbit}
NODES=${MN_NODES:-2}
SLOTS=${MN_SLOTS:-2}
FORCED="terngrad:route='compressed',hierarchy=False terngrad:route='compressed',hierarchy=True"
FORCED="$FORCED topk:ratio=0.01,route='compressed',hierarchy=False topk:ratio=0.01,route='compressed',hierarchy=True"
SPECS=${MN_SPECS:-hvd-fp16 terngrad topk:ratio=0.01 $FORCED}
MODEL=${MN_MODEL:---model resnet50}
STEPS=${MN_STEPS:-5}
WARMUP=${MN_WARMUP:-2}
MINTIME=${MN_MINTIME:-6}
TIMEOUT=${MN_TIMEOUT:-600}
OUT=${MN_OUT:-out/multinode}
MARKDOWN=${MN_MARKDOWN-docs/multinode-results.md}
NP=$((NODES * SLOTS))

# The tree's package, C library built in place (the remote ranks see the same files: the hosts
# share this machine's file system; horovodrun passes PYTHONPATH on).
"$PY" setup.py -q build_ext --inplace >/dev/null
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
: > "$RESULTS"

trap 'bash ci/cluster.sh down >/dev/null 2>&1 || true' EXIT

for rate in $RATES; do
    lines=$(bash ci/cluster.sh up --nodes "$NODES" --slots "$SLOTS" --inter "$rate")
    HOSTS=$(sed -n 's/^HOSTS=//p' <<< "$lines")
    IFACE=$(sed -n 's/^IFACE=//p' <<< "$lines")
    echo "== $rate: $NODES hosts x $SLOTS ranks, -H $HOSTS, interface $IFACE"
    var="MN_SPECS_$(echo "$rate" | tr '[:lower:]' '[:upper:]')"
    for spec in ${!var:-$SPECS}; do
        log=$OUT/log-$rate-$(echo "$spec" | tr -c 'A-Za-z0-9.=\n' '_').txt
        before=$(bash ci/cluster.sh bytes)
        start=$SECONDS
        rc=0
        # shellcheck disable=SC2086
        timeout -k 10 "$TIMEOUT" "$HOROVODRUN" -np "$NP" -H "$HOSTS" --network-interface "$IFACE" --gloo \
            "$PY" examples/bandwidth_bench.py --compression "$spec" --steps "$STEPS" --warmup "$WARMUP" \
            --min-time "$MINTIME" --rate-label "$rate" --link-dev "$IFACE" --out "$RESULTS" $MODEL \
            > "$log" 2>&1 || rc=$?
        after=$(bash ci/cluster.sh bytes)
        if [ "$rc" != 0 ]; then
            tail -n 20 "$log" >&2
            printf '{"bench": "failed", "compression": "%s", "rate": "%s", "workers": %s, "reason": "exit %s"}\n' \
                "$spec" "$rate" "$NP" "$rc" >> "$RESULTS"
            continue
        fi
        grep -o '"step_s": [0-9.e-]*' "$log" | tail -n 1
        echo "   $spec: $((SECONDS - start)) s, $(( (after - before) / 1000000 )) MB between hosts in the whole job"
    done
    bash ci/cluster.sh down >/dev/null
done

if [ -n "$MARKDOWN" ]; then
    commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
    git diff --quiet HEAD -- . ":(exclude)$MARKDOWN" 2>/dev/null || commit="$commit (+ uncommitted changes)"
    "$PY" examples/multinode_report.py "$RESULTS" "$MARKDOWN" "bash ci/multinode_bench.sh" "$commit"
    echo "wrote $MARKDOWN"
fi
echo "results: $RESULTS"
