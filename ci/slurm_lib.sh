# shellcheck shell=bash
# Shared pieces of the throwaway Slurm clusters: sourced (never run) by ci/slurm_cluster.sh (one
# node) and ci/cluster.sh (one slurmd per emulated host).
#
# The caller defines die/say (its own message prefix) and sets
#   SLURM_DIR   the cluster's directory: munge key and socket, state, spool, logs, `pids`
#   CTLD_PORT   slurmctld's port (slurmd listens on CTLD_PORT + 1)
# and writes the cluster-specific lines of slurm.conf itself (SlurmctldHost, slurmd paths,
# NodeName, PartitionName) after slurm_conf_common's.

# Install the Debian packages not installed yet (nothing when all are there), without starting
# any service: where no /usr/sbin/policy-rc.d exists, a temporary one that denies every start is in
# place during the install (on a systemd host Debian's munge.service and ssh.service would
# otherwise start as packaged; the clusters start their own daemons with their own files).
hvdc_apt_install() {
    local need=() p policy=/usr/sbin/policy-rc.d made_policy=
    for p in "$@"; do
        dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
    done
    [ ${#need[@]} -eq 0 ] && return
    command -v apt-get >/dev/null || die "missing Debian packages ${need[*]} and no apt-get to install them"
    say "apt-get install ${need[*]}" >&2
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
    fi
    local rc=0
    apt-get update -qq || rc=$?
    [ $rc -ne 0 ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -o DPkg::Lock::Timeout=300 "${need[@]}" >/dev/null || rc=$?
    [ -z "$made_policy" ] || rm -f "$policy"
    [ $rc -eq 0 ] || die "apt-get install ${need[*]} failed (exit $rc)"
}

slurm_install_packages() { hvdc_apt_install slurmctld slurmd slurm-client munge; }

# The part of slurm.conf both clusters share.
slurm_conf_common() {
    cat <<EOF
SlurmctldPort=$CTLD_PORT
SlurmdPort=$((CTLD_PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SLURM_DIR/munge/socket
StateSaveLocation=$SLURM_DIR/state
SlurmctldPidFile=$SLURM_DIR/slurmctld.pid
SlurmctldLogFile=$SLURM_DIR/log/slurmctld.log
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
EOF
}

# Start munged on a fresh key under $SLURM_DIR/munge (a filesystem socket, so daemons in other
# network namespaces reach it too); its pid goes to $SLURM_DIR/pids.  Returns 1 (log shown) when
# the socket does not appear within 10 s.
slurm_start_munge() {
    mkdir -p "$SLURM_DIR/munge" "$SLURM_DIR/log"
    mungekey --create --keyfile="$SLURM_DIR/munge/key" 2>/dev/null
    munged --foreground --key-file="$SLURM_DIR/munge/key" --socket="$SLURM_DIR/munge/socket" \
        --pid-file="$SLURM_DIR/munge/pid" --seed-file="$SLURM_DIR/munge/seed" \
        --log-file="$SLURM_DIR/log/munged.log" </dev/null >>"$SLURM_DIR/log/munged.out" 2>&1 &
    echo $! >>"$SLURM_DIR/pids"
    local t=0
    until [ -S "$SLURM_DIR/munge/socket" ]; do
        sleep 0.2; t=$((t + 1))
        if [ $t -ge 50 ]; then
            tail -n 20 "$SLURM_DIR"/log/munged.* >&2
            return 1
        fi
    done
}

# Processes found by id, never by name: those with a file open under DIR (the daemons log there,
# and so does every slurmstepd, which slurmd starts detached from itself) and all their
# descendants (the jobs' tasks).  The calling script and its ancestors are left out.
pids_holding_dir() {
    local dir=$1 pid ppid grew=1
    local -A ours=() parent=()
    for pid in $(find /proc/[0-9]*/fd -maxdepth 1 -lname "$dir/*" 2>/dev/null | cut -d/ -f3); do
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

# SIGTERM to the given pids, SIGKILL to those still alive 10 s later.
terminate_pids() {
    local pids=("$@") alive=() pid
    [ ${#pids[@]} -gt 0 ] || return 0
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 50); do
        alive=()
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
        [ ${#alive[@]} -eq 0 ] && return 0
        sleep 0.2
    done
    kill -KILL "${alive[@]}" 2>/dev/null || true
}

# Cancel every job while slurmctld/slurmd still run, so their steps end the way Slurm ends them;
# waits up to 10 s for the queue to empty.
slurm_cancel_jobs() {
    local jobs=()
    mapfile -t jobs < <(squeue -h -o %A 2>/dev/null)
    [ ${#jobs[@]} -eq 0 ] || scancel --quiet "${jobs[@]}" || true
    for _ in $(seq 50); do
        [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break
        sleep 0.2
    done
}

# Wait until sinfo reports all N nodes idle; returns 1 after TIMEOUT seconds or when CHECK (a
# command: are the daemons still alive?) fails.
slurm_wait_idle() {
    local n=$1 timeout=$2 check=$3 deadline=$((SECONDS + $2)) idle
    while :; do
        idle=$(sinfo -h -N -o '%N %T' 2>/dev/null | awk '$2 == "idle"' | wc -l)
        [ "$idle" -ge "$n" ] && return 0
        if [ $SECONDS -ge $deadline ] || ! $check; then
            say "nodes after ${timeout}s: $(sinfo -h -N -o '%N=%T' 2>/dev/null | tr '\n' ' ')" >&2
            return 1
        fi
        sleep 0.5
    done
}
