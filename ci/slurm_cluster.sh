#!/usr/bin/env bash
# A throwaway one-node Slurm cluster on this machine, for tests/test_slurm.py and for trying the
# batch files in examples/slurm/ without a real cluster.
#
#   ci/slurm_cluster.sh start    install (Debian packages, idempotent), configure, start, wait idle
#   ci/slurm_cluster.sh status   exit 0 when all daemons run and the node answers
#   ci/slurm_cluster.sh stop     end every process of this cluster, remove its directory
#
# Everything lives in $HVDC_SLURM_DIR (default /tmp/hvdc-slurm): slurm.conf, munge key and
# socket, state, spool, logs.  Nothing under /etc is changed, so a system Slurm is left alone;
# clients find this cluster through SLURM_CONF=$HVDC_SLURM_DIR/slurm.conf (start prints it).
# Needs root: slurmd starts job steps as the submitting user.
set -euo pipefail

DIR=${HVDC_SLURM_DIR:-/tmp/hvdc-slurm}
CONF=$DIR/slurm.conf
# Ports away from Slurm's defaults (6817/6818), so a system Slurm on this host does not clash.
CTLD_PORT=${HVDC_SLURM_PORT:-16817}
TIMEOUT=${HVDC_SLURM_TIMEOUT:-60}
export SLURM_CONF=$CONF

die() { echo "[slurm_cluster] $*" >&2; exit 1; }
say() { echo "[slurm_cluster] $*"; }

install_packages() {
    local need=() p
    for p in slurmctld slurmd slurm-client munge; do
        dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
    done
    [ ${#need[@]} -eq 0 ] && return
    say "apt-get install ${need[*]}"
    apt-get update -qq
    # Containers without an init system never start the packaged services; on a systemd host
    # Debian's munge.service starts as packaged (slurmd/slurmctld need /etc/slurm/slurm.conf and
    # stay down).  This cluster uses none of them.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -o DPkg::Lock::Timeout=300 "${need[@]}" >/dev/null
}

# This cluster's processes, found by id, never by name: those with a file open under $DIR (the
# daemons log there, and so does every slurmstepd, which slurmd starts detached from itself) and
# all their descendants (the jobs' tasks).  This script and its callers are left out.
cluster_pids() {
    local pid ppid grew=1
    local -A ours=() parent=()
    for pid in $(find /proc/[0-9]*/fd -maxdepth 1 -lname "$DIR/*" 2>/dev/null | cut -d/ -f3); do
        ours[$pid]=1
    done
    while read -r pid ppid; do parent[$pid]=$ppid; done < <(ps -e -o pid=,ppid=)
    while [ $grew = 1 ]; do
        grew=0
        for pid in "${!parent[@]}"; do
            if [ -z "${ours[$pid]:-}" ] && [ -n "${ours[${parent[$pid]}]:-}" ]; then
                ours[$pid]=1; grew=1
            fi
        done
    done
    pid=$$
    while [ -n "$pid" ] && [ "$pid" != 0 ]; do unset "ours[$pid]"; pid=${parent[$pid]:-}; done
    echo "${!ours[@]}"
}

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
    cat >"$CONF" <<EOF
ClusterName=hvdc
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$((CTLD_PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No cgroups (sandboxes and containers rarely have usable ones): track job processes by parent
# pid, no binding, no accounting.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
# sbatch --wait polls every 2 s only while MinJobAge <= 4 (it backs off to 32 s otherwise), and a
# job record must outlive one poll: kept 4 s after the job ends.  KillWait: cancelled jobs get
# SIGKILL 5 s after SIGTERM, so stop is quick.
MinJobAge=4
KillWait=5
MailProg=/bin/true
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=60 State=UP
EOF
}

start() {
    [ "$(id -u)" = 0 ] || die "needs root (slurmd starts job steps as the submitting user)"
    if daemons_running && [ "$(node_state)" = idle ]; then
        say "already running: export SLURM_CONF=$CONF"
        return
    fi
    stop >/dev/null  # a half-started cluster from before
    install_packages
    mkdir -p "$DIR"/{munge,state,spool,log}
    touch "$DIR/.hvdc-slurm"
    chmod 755 "$DIR"
    write_config
    mungekey --create --keyfile="$DIR/munge/key" 2>/dev/null
    munged --foreground --key-file="$DIR/munge/key" --socket="$DIR/munge/socket" \
        --pid-file="$DIR/munge/pid" --seed-file="$DIR/munge/seed" --log-file="$DIR/log/munged.log" \
        </dev/null >>"$DIR/log/munged.out" 2>&1 &
    echo $! >>"$DIR/pids"
    local t=0
    until [ -S "$DIR/munge/socket" ]; do
        sleep 0.2; t=$((t + 1))
        [ $t -lt 50 ] || { tail -n 20 "$DIR"/log/munged.*; stop >/dev/null; die "munged did not start"; }
    done
    slurmctld -D -f "$CONF" </dev/null >>"$DIR/log/slurmctld.out" 2>&1 &
    echo $! >>"$DIR/pids"
    slurmd -D -f "$CONF" -N "$(hostname -s)" </dev/null >>"$DIR/log/slurmd.out" 2>&1 &
    echo $! >>"$DIR/pids"

    local deadline=$((SECONDS + TIMEOUT)) state
    while :; do
        state=$(node_state)
        [ "$state" = idle ] && break
        if [ $SECONDS -ge $deadline ] || ! daemons_running; then
            tail -n 30 "$DIR"/log/*
            stop >/dev/null
            die "node not idle after ${TIMEOUT}s (state '${state:-no answer}')"
        fi
        sleep 0.5
    done
    say "up: node $(hostname -s) idle, $(sinfo -h -o %C) CPUs (alloc/idle/other/total)"
    say "export SLURM_CONF=$CONF"
}

stop() {
    local jobs=() pids=() alive=() pid
    # Jobs first, while slurmctld/slurmd still run, so their steps end the way Slurm ends them.
    if daemons_running; then
        mapfile -t jobs < <(squeue -h -o %A 2>/dev/null)
        [ ${#jobs[@]} -eq 0 ] || scancel --quiet "${jobs[@]}" || true
        for _ in $(seq 50); do
            [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
    read -ra pids <<<"$(cluster_pids)"
    if [ ${#pids[@]} -gt 0 ]; then
        kill -TERM "${pids[@]}" 2>/dev/null || true
        for _ in $(seq 50); do
            alive=()
            for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
            [ ${#alive[@]} -eq 0 ] && break
            sleep 0.2
        done
        [ ${#alive[@]} -eq 0 ] || kill -KILL "${alive[@]}" 2>/dev/null || true
    fi
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
