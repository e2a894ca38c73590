#!/usr/bin/env bash
# A throwaway one-node Slurm cluster on this machine, for tests/system/test_slurm.py and for trying the
# batch files in examples/slurm/ without a real cluster.
#
#   ci/slurm_cluster.sh start    install (Debian packages, idempotent), configure, start, wait idle
#   ci/slurm_cluster.sh status   exit 0 when all daemons run and the node answers
#   ci/slurm_cluster.sh stop     end every process of this cluster, remove its directory
#
# Everything lives in $HVDC_SLURM_DIR (default /tmp/hvdc-slurm): slurm.conf, munge key and
# socket, state, spool, logs.  Nothing under /etc is changed, so a system Slurm is left alone;
# clients find this cluster through SLURM_CONF=$HVDC_SLURM_DIR/slurm.conf (start prints it).
# Needs root: slurmd starts job steps as the submitting user.  The pieces this script shares with
# ci/cluster.sh (a Slurm across emulated hosts) are in ci/slurm_lib.sh.
set -euo pipefail

DIR=${HVDC_SLURM_DIR:-/tmp/hvdc-slurm}
CONF=$DIR/slurm.conf
# Ports away from Slurm's defaults (6817/6818), so a system Slurm on this host does not clash.
CTLD_PORT=${HVDC_SLURM_PORT:-16817}
TIMEOUT=${HVDC_SLURM_TIMEOUT:-60}
export SLURM_CONF=$CONF
SLURM_DIR=$DIR

die() { echo "[slurm_cluster] $*" >&2; exit 1; }
say() { echo "[slurm_cluster] $*"; }
# shellcheck source=ci/slurm_lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/slurm_lib.sh"

daemons_running() {
    local pid n=0
    [ -f "$DIR/pids" ] || return 1
    while read -r pid; do
        kill -0 "$pid" 2>/dev/null && n=$((n + 1))
    done <"$DIR/pids"
    [ "$n" -eq 3 ]
}

# stop kills whatever holds files under $DIR and deletes it: only ever a directory this script
# made (marker file) or an empty one.
check_dir() {
    [ ! -d "$DIR" ] || [ -f "$DIR/.hvdc-slurm" ] || [ -z "$(ls -A "$DIR")" ] ||
        die "$DIR is neither empty nor made by this script; set HVDC_SLURM_DIR"
}

node_state() { sinfo -h -N -o %T 2>/dev/null | head -n1; }

write_config() {
    local host cpus
    host=$(hostname -s)
    # The tests run 2 tasks; a 1-core machine gets 2 declared CPUs (config_overrides keeps slurmd
    # from draining the node for having fewer than configured).
    cpus=$(nproc); [ "$cpus" -ge 2 ] || cpus=2
    {
        echo "ClusterName=hvdc"
        echo "SlurmctldHost=$host(127.0.0.1)"
        echo "SlurmdSpoolDir=$DIR/spool"
        echo "SlurmdPidFile=$DIR/slurmd.pid"
        echo "SlurmdLogFile=$DIR/log/slurmd.log"
        slurm_conf_common
        echo "NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN"
        echo "PartitionName=debug Nodes=$host Default=YES MaxTime=60 State=UP"
    } >"$CONF"
}

start() {
    [ "$(id -u)" = 0 ] || die "needs root (slurmd starts job steps as the submitting user)"
    if daemons_running && [ "$(node_state)" = idle ]; then
        say "already running: export SLURM_CONF=$CONF"
        return
    fi
    stop >/dev/null  # a half-started cluster from before
    slurm_install_packages
    mkdir -p "$DIR"/{munge,state,spool,log}
    touch "$DIR/.hvdc-slurm"
    chmod 755 "$DIR"
    write_config
    slurm_start_munge || { stop >/dev/null; die "munged did not start"; }
    slurmctld -D -f "$CONF" </dev/null >>"$DIR/log/slurmctld.out" 2>&1 &
    echo $! >>"$DIR/pids"
    slurmd -D -f "$CONF" -N "$(hostname -s)" </dev/null >>"$DIR/log/slurmd.out" 2>&1 &
    echo $! >>"$DIR/pids"

    if ! slurm_wait_idle 1 "$TIMEOUT" daemons_running; then
        tail -n 30 "$DIR"/log/*
        stop >/dev/null
        die "node not idle after ${TIMEOUT}s"
    fi
    say "up: node $(hostname -s) idle, $(sinfo -h -o %C) CPUs (alloc/idle/other/total)"
    say "export SLURM_CONF=$CONF"
}

stop() {
    local pids=()
    # Jobs first, while slurmctld/slurmd still run, so their steps end the way Slurm ends them.
    if daemons_running; then
        slurm_cancel_jobs
    fi
    read -ra pids <<<"$(pids_holding_dir "$DIR")"
    terminate_pids "${pids[@]}"
    rm -rf "$DIR"
    say "stopped"
}

status() {
    if daemons_running; then
        say "daemons up (pids $(tr '\n' ' ' <"$DIR/pids")), SLURM_CONF=$CONF"
        sinfo -N
    else
        say "not running"
        return 1
    fi
}

check_dir
case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: $0 start|stop|status" ;;
esac
