#!/usr/bin/env bash
# A multi-host cluster on one machine: N "hosts" that are network namespaces joined by a switch,
# each with its own address, sshd, /etc/hosts and hostname, so that stock `horovodrun -H`,
# `mpirun -H` and a multi-node Slurm launch across them exactly as on a real cluster, with the
# inter-host links limited by tc and the bytes that crossed them counted.
#
#   bash ci/cluster.sh up [--nodes N] [--slots S] [--inter RATE] [--delay D] [--slurm]
#       N hosts (default 2) with S slots each (2); RATE as tc spells it (1gbit, 100mbit, 10gbit)
#       or `unlimited` (default 1gbit); D a one-way delay (0, 1ms; default 0; needs netem in the
#       kernel).  Tears down a cluster that is already up first.  Prints on stdout, last:
#           SLURM_CONF=...   (with --slurm)
#           HOSTS=10.77.0.1:2,10.77.0.2:2
#           IFACE=hvdc0
#       (stdout has nothing else, so `eval "$(bash ci/cluster.sh up)"` sets them in a shell).
#   bash ci/cluster.sh slurm     start the Slurm (below) on a cluster that is up; prints SLURM_CONF=
#   bash ci/cluster.sh bytes     bytes sent on the hosts' inter-host links since `up` (one integer)
#   bash ci/cluster.sh status    exit 0 and print the lines `up` printed, when a cluster is up
#   bash ci/cluster.sh exec I CMD...   run CMD on host I (its network namespace and hostname)
#   bash ci/cluster.sh down      remove everything `up` made; idempotent, also after a crash
#
# Then, from the root shell:
#   horovodrun -np 4 -H $HOSTS --network-interface $IFACE python train.py
#   mpirun --allow-run-as-root -np 4 -H $HOSTS --mca btl_tcp_if_include $IFACE \
#          --mca oob_tcp_if_include $IFACE python train.py
#   SLURM_CONF=... sbatch -N 2 --ntasks-per-node=2 examples/slurm/digits_horovodrun.sbatch
#
# Design (docs/cluster.md has the user's side):
# * Network.  Host I is the namespace hvdc-nI with one veth, named $IFACE (hvdc0) in every host so
#   that `--network-interface hvdc0` fits all of them, address <net>.(I+1)/24 ($HVDC_CLUSTER_NET,
#   default 10.77.0.0/24).  The other ends are ports of a bridge inside a namespace of its own
#   (hvdc-sw, the "switch"), so the root namespace's links and routes are not involved, except
#   for one more port: an unlimited veth named $IFACE in the root namespace with <net>.254 (the
#   "head node"), so that launchers run from the root shell reach the hosts and the hosts reach
#   the launcher (horovodrun binds its rendezvous server on the launcher's $IFACE address).
#   Ranks on one host talk to their host's own address, which goes through that namespace's `lo`:
#   unlimited and not counted, as shared memory / loopback on a real node.
# * Links.  Each host's link is limited like a full-duplex NIC: the host's end (its uplink) and
#   the switch's port towards it (its downlink, which also makes incast queue at the switch) each
#   get a tbf at RATE; a delay D goes on the host's end only (netem; one-way D, RTT 2D).
#   tbf's burst and queue: those ci/bandwidth_bench.sh found loss-free for TCP at 1 Gbit/s
#   (burst 256kb, latency 50ms), the burst scaled with the rate elsewhere.  IPv6 is off on the
#   cluster's links, so no router solicitations or MLD reports add to the byte counts.
# * ssh.  Each host runs its own sshd (Debian's openssh-server, installed if missing, never started
#   as a service) with its own config and host key under the state directory, listening on the
#   host's address only, root login by key only, no PAM, no DNS.  One client key pair, and a
#   delimited `Host <net>.* hvdc-n*` block at the top of root's ~/.ssh/config (removed by down)
#   make `ssh 10.77.0.2 cmd` non-interactive, as horovodrun and mpirun need.  Whatever sshd
#   starts inherits its namespaces, so remote ranks really run "on" that host.
# * Names.  sshd (and slurmd) run in their own UTS namespace with hostname hvdc-nI, and
#   /etc/netns/hvdc-nI/hosts (which `ip netns exec` bind-mounts over /etc/hosts) names every
#   host, and the head node hvdc-head.  Open MPI and Slurm tell nodes apart by hostname.
# * Slurm (`up --slurm` or `slurm` after up): munged and slurmctld in the root namespace
#   (SlurmctldHost at <net>.254, so sbatch/srun/squeue work from the root shell with SLURM_CONF
#   set), one slurmd per host inside its network namespace and a UTS namespace named hvdc-nI
#   (NodeName=hvdc-nI NodeAddr=<its address>), so jobs' tasks run on the hosts.  Each node gets
#   its own spool and TmpFS directory (%n), or the nodes' PMIx servers would share one directory.
#   Ports 16827/16828 ($HVDC_CLUSTER_SLURM_PORT): away from Slurm's defaults and from
#   ci/slurm_cluster.sh's.  The shared pieces are in ci/slurm_lib.sh.
# * State.  Everything lives in $HVDC_CLUSTER_DIR (default /tmp/hvdc-cluster): config (what up
#   was asked for), ssh keys and configs, logs, pids, the byte counters at up, the Slurm
#   directory.  Outside it: the namespaces hvdc-sw and hvdc-n*, the root's $IFACE, /etc/netns/
#   hvdc-n*/hosts, the ssh config block and /run/sshd (sshd's privilege-separation directory).
#   down ends the processes in the cluster's namespaces (`ip netns pids`) and those holding files
#   under the state directory (munged, slurmctld), and removes all of the above.
# * One cluster per machine: the namespace names are fixed.
#
# Needs root, iproute2 (ip netns, tc), util-linux (unshare); exits 2 when that is not there.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATE=${HVDC_CLUSTER_DIR:-/tmp/hvdc-cluster}
NET=${HVDC_CLUSTER_NET:-10.77.0.0/24}
IFACE=hvdc0                 # the cluster interface: the same name in every host and in root
SW=hvdc-sw                  # the switch namespace
BR=br0                      # the bridge inside it
NS_RE='^hvdc-(n[0-9]+|sw)$' # the namespaces this script makes (and down removes)
CTLD_PORT=${HVDC_CLUSTER_SLURM_PORT:-16827}
SLURM_DIR=$STATE/slurm
SLURM_TIMEOUT=${HVDC_CLUSTER_TIMEOUT:-60}
MARK_BEGIN="# >>> hvdc-cluster (ci/cluster.sh up added this block; ci/cluster.sh down removes it)"
MARK_END="# <<< hvdc-cluster"

die() { echo "[cluster] $*" >&2; exit 1; }
say() { echo "[cluster] $*" >&2; }   # stdout is kept for the KEY=VALUE lines
unsupported() { echo "[cluster] $*" >&2; exit 2; }
# shellcheck source=ci/slurm_lib.sh
. "$HERE/slurm_lib.sh"

usage() {
    sed -n '/^#   bash ci\/cluster.sh up/,/^#   bash ci\/cluster.sh down/p' "${BASH_SOURCE[0]}" | sed 's/^#//' >&2
    exit 1
}

check_environment() {
    [ "$(id -u)" = 0 ] || unsupported "needs root (network namespaces, tc, sshd); run it with sudo"
    local tool
    for tool in ip tc unshare; do
        command -v "$tool" >/dev/null || unsupported "$tool not found (apt-get install iproute2 util-linux)"
    done
    ip netns list >/dev/null 2>&1 || unsupported "\`ip netns\` does not work here (no network namespaces?)"
}

# <net> as the first three octets: only /24 networks (node I = .I+1, head = .254).
BASE=
parse_net() {
    [[ $NET =~ ^([0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3})\.0/24$ ]] ||
        die "HVDC_CLUSTER_NET must be a /24 like 10.77.0.0/24 (is '$NET')"
    BASE=${BASH_REMATCH[1]}
}

node_ns() { echo "hvdc-n$1"; }
node_addr() { echo "$BASE.$(($1 + 1))"; }
head_addr() { echo "$BASE.254"; }
ssh_config_file() { echo "$(getent passwd 0 | cut -d: -f6)/.ssh/config"; }   # what ssh reads

our_namespaces() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E "$NS_RE" || true; }

# The directory down deletes: only one this script made (marker file) or an empty one.
check_state_dir() {
    [ ! -e "$STATE" ] || [ -f "$STATE/.hvdc-cluster" ] || [ -z "$(ls -A "$STATE" 2>/dev/null)" ] ||
        die "$STATE is neither empty nor made by this script; set HVDC_CLUSTER_DIR"
}

load_config() {
    [ -f "$STATE/config" ] || die "no cluster is up (no $STATE/config); run: bash ci/cluster.sh up"
    # shellcheck source=/dev/null
    . "$STATE/config"
}

# ---------------------------------------------------------------------------------------------
# Links

# tc arguments for one direction of a link at RATE with one-way DELAY ("" = leave it alone).
# Rates: <n>kbit/mbit/gbit.  tbf's burst: 2 ms of line rate rounded up to a power of two, at
# least 64kb (100mbit: 64kb, 1gbit: 256kb, 10gbit: 4mb); its queue: 100 ms below 1 Gbit/s,
# 50 ms from there (the values ci/bandwidth_bench.sh uses at 100mbit and 1gbit).
rate_bps() {
    [[ $1 =~ ^([0-9]+)(kbit|mbit|gbit)$ ]] ||
        die "--inter must be like 100mbit, 1gbit, 10gbit or unlimited (is '$1')"
    local n=${BASH_REMATCH[1]}
    case ${BASH_REMATCH[2]} in
        kbit) echo $((n * 1000)) ;;
        mbit) echo $((n * 1000000)) ;;
        gbit) echo $((n * 1000000000)) ;;
    esac
}

tbf_args() {
    local bps burst=65536 latency=100ms
    bps=$(rate_bps "$1")
    while [ $((burst * 8 * 500)) -lt "$bps" ]; do burst=$((burst * 2)); done   # burst >= 2 ms
    [ "$bps" -lt 1000000000 ] || latency=50ms
    echo "rate $1 burst $((burst / 1024))kb latency $latency"
}

no_delay() { [[ $1 =~ ^0+(\.0+)?(us|ms|s)?$ ]]; }

# qdisc for the host's end: tbf for the rate alone; netem when there is a delay (netem's own rate
# then; its queue holds 100k packets, more than 50 ms at 10 Gbit/s).
uplink_qdisc() {
    local rate=$1 delay=$2
    if no_delay "$delay"; then
        [ "$rate" = unlimited ] || echo "tbf $(tbf_args "$rate")"
    else
        local q="netem delay $delay limit 100000"
        [ "$rate" = unlimited ] || q="$q rate $rate"
        echo "$q"
    fi
}

downlink_qdisc() { [ "$1" = unlimited ] || echo "tbf $(tbf_args "$1")"; }

# `echo 1 >` a sysctl file inside a namespace, where the kernel has it.
ns_sysctl() {
    local ns=$1 key=$2 value=$3
    ip netns exec "$ns" sh -c "[ ! -w /proc/sys/$key ] || echo $value > /proc/sys/$key"
}

make_switch() {
    ip netns add "$SW"
    ip -n "$SW" link set lo up
    ns_sysctl "$SW" net/ipv6/conf/default/disable_ipv6 1
    ns_sysctl "$SW" net/ipv6/conf/all/disable_ipv6 1
    # Bridged frames are not to go through iptables (br_netfilter, where loaded): no rules here.
    ns_sysctl "$SW" net/bridge/bridge-nf-call-iptables 0
    ip -n "$SW" link add "$BR" type bridge    # STP off: ports forward at once
    ip -n "$SW" link set "$BR" up
    # The head node's port: unlimited.
    ip link add "$IFACE" type veth peer name phead netns "$SW"
    [ ! -w "/proc/sys/net/ipv6/conf/$IFACE/disable_ipv6" ] || echo 1 >"/proc/sys/net/ipv6/conf/$IFACE/disable_ipv6"
    ip addr add "$(head_addr)/24" dev "$IFACE"
    ip link set "$IFACE" up
    ip -n "$SW" link set phead master "$BR" up
}

# make_host I RATE DELAY
make_host() {
    local i=$1 rate=$2 delay=$3 ns port=p$1 q
    ns=$(node_ns "$i")
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ns_sysctl "$ns" net/ipv6/conf/default/disable_ipv6 1
    ns_sysctl "$ns" net/ipv6/conf/all/disable_ipv6 1
    ip link add "$IFACE" netns "$ns" type veth peer name "$port" netns "$SW"
    ip -n "$ns" addr add "$(node_addr "$i")/24" dev "$IFACE"
    ip -n "$ns" link set "$IFACE" up
    ip -n "$SW" link set "$port" master "$BR" up
    q=$(uplink_qdisc "$rate" "$delay")
    if [ -n "$q" ]; then
        # shellcheck disable=SC2086  # q is a list of tc arguments
        ip netns exec "$ns" tc qdisc add dev "$IFACE" root $q 2>"$STATE/tc.err" || {
            grep -q netem <<<"$q" && grep -qi "unknown" "$STATE/tc.err" &&
                unsupported "--delay needs the netem qdisc, which this kernel does not have (CONFIG_NET_SCH_NETEM); use --delay 0"
            die "tc qdisc add dev $IFACE root $q (host $ns): $(cat "$STATE/tc.err")"
        }
    fi
    q=$(downlink_qdisc "$rate")
    # shellcheck disable=SC2086
    [ -z "$q" ] || ip netns exec "$SW" tc qdisc add dev "$port" root $q
}

write_hosts_files() {
    local i j f
    for i in $(seq 0 $((NODES - 1))); do
        f=/etc/netns/$(node_ns "$i")/hosts
        mkdir -p "$(dirname "$f")"
        {
            echo "# written by ci/cluster.sh up for the host $(node_ns "$i"); down removes it"
            echo "127.0.0.1 localhost"
            # Processes started with a bare `ip netns exec` keep this machine's hostname.
            echo "127.0.1.1 $(hostname)"
            echo "$(head_addr) hvdc-head"
            for j in $(seq 0 $((NODES - 1))); do echo "$(node_addr "$j") $(node_ns "$j")"; done
        } >"$f"
    done
}

# Run "$@" on host I: its network namespace (and /etc/hosts), a UTS namespace named like it.
# exec: in the background (`on_host ... &`) $! is then the daemon itself, not a subshell.
on_host() {
    local i=$1; shift
    # shellcheck disable=SC2016  # $0 and $@ are the inner shell's
    exec ip netns exec "$(node_ns "$i")" unshare --uts sh -c 'hostname "$0" && exec "$@"' "$(node_ns "$i")" "$@"
}

# ---------------------------------------------------------------------------------------------
# ssh

ssh_block() {
    cat <<EOF
$MARK_BEGIN
Host $BASE.* hvdc-n*
    User root
    IdentityFile $STATE/ssh/id_ed25519
    IdentitiesOnly yes
    BatchMode yes
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    GSSAPIAuthentication no
    ConnectTimeout 10
    LogLevel ERROR
$MARK_END
EOF
}

# Delete our block (between the markers, inclusive) from root's ssh config, if there.
remove_ssh_block() {
    local f tmp
    f=$(ssh_config_file)
    [ -f "$f" ] && grep -qxF "$MARK_BEGIN" "$f" || return 0
    tmp=$(mktemp "$f.XXXXXX")
    awk -v b="$MARK_BEGIN" -v e="$MARK_END" '$0 == b {skip = 1} !skip {print} $0 == e {skip = 0}' "$f" >"$tmp"
    chmod 600 "$tmp"
    mv "$tmp" "$f"
    # A config file that up created and that holds nothing else goes too.
    if [ -f "$STATE/ssh_config_created" ] && ! grep -q '[^[:space:]]' "$f"; then
        rm -f "$f"
        [ ! -f "$STATE/ssh_dir_created" ] || rmdir "$(dirname "$f")" 2>/dev/null || true
    fi
}

# Our block at the top (ssh takes the first value it finds for each option).
add_ssh_block() {
    local f tmp
    f=$(ssh_config_file)
    remove_ssh_block
    [ -d "$(dirname "$f")" ] || { mkdir -p "$(dirname "$f")"; touch "$STATE/ssh_dir_created"; }
    chmod 700 "$(dirname "$f")"
    [ -e "$f" ] || { : >"$f"; touch "$STATE/ssh_config_created"; }
    tmp=$(mktemp "$f.XXXXXX")
    { ssh_block; echo; cat "$f"; } >"$tmp"
    chmod 600 "$tmp"
    mv "$tmp" "$f"
}

start_sshd() {
    local i=$1 dir conf
    dir=$STATE/$(node_ns "$i")
    conf=$dir/sshd_config
    mkdir -p "$dir"
    ssh-keygen -q -t ed25519 -N '' -C "$(node_ns "$i")" -f "$dir/ssh_host_ed25519_key"
    cat >"$conf" <<EOF
# sshd of the emulated host $(node_ns "$i") (ci/cluster.sh)
ListenAddress $(node_addr "$i")
Port 22
HostKey $dir/ssh_host_ed25519_key
PidFile $dir/sshd.pid
PermitRootLogin prohibit-password
PubkeyAuthentication yes
AuthorizedKeysFile $STATE/ssh/id_ed25519.pub
# The key lives under /tmp, whose permissions StrictModes would refuse.
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
PrintMotd no
PrintLastLog no
X11Forwarding no
# Launchers open many sessions at once (one per rank, plus checks).
MaxStartups 200
MaxSessions 200
EOF
    # sshd wants its privilege-separation directory (Debian's service unit makes it).
    if [ ! -d /run/sshd ]; then mkdir -p /run/sshd; chmod 755 /run/sshd; touch "$STATE/run_sshd_created"; fi
    on_host "$i" /usr/sbin/sshd -D -f "$conf" -E "$dir/sshd.log" </dev/null >>"$dir/sshd.out" 2>&1 &
    echo "sshd-$(node_ns "$i") $!" >>"$STATE/pids"
}

# Wait until every host answers `ssh <address> hostname` with its own name.
wait_ssh() {
    local i name deadline=$((SECONDS + 20))
    for i in $(seq 0 $((NODES - 1))); do
        until name=$(ssh -o ConnectTimeout=2 "$(node_addr "$i")" hostname 2>"$STATE/ssh.err") &&
                [ "$name" = "$(node_ns "$i")" ]; do
            [ $SECONDS -lt $deadline ] || {
                tail -n 20 "$STATE/$(node_ns "$i")/sshd.log" >&2 || true
                die "ssh $(node_addr "$i") hostname: '${name:-}' $(cat "$STATE/ssh.err")"
            }
            sleep 0.3
        done
    done
}

# ---------------------------------------------------------------------------------------------
# Byte counters

tx_sum() {
    local i total=0 v
    for i in $(seq 0 $((NODES - 1))); do
        v=$(ip netns exec "$(node_ns "$i")" cat "/sys/class/net/$IFACE/statistics/tx_bytes")
        total=$((total + v))
    done
    echo "$total"
}

# ---------------------------------------------------------------------------------------------
# Slurm

slurm_daemons_running() {
    local pid
    [ -f "$SLURM_DIR/pids" ] || return 1
    while read -r pid; do kill -0 "$pid" 2>/dev/null || return 1; done <"$SLURM_DIR/pids"
}

write_slurm_conf() {
    local i last=$((NODES - 1))
    {
        echo "ClusterName=hvdcnet"
        echo "SlurmctldHost=$(hostname -s)($(head_addr))"
        # Per node (%n): each slurmd has its spool, pid and log file, and its TmpFS, where the
        # PMIx plugin makes a directory named after the job step (a shared one would clash).
        echo "SlurmdSpoolDir=$SLURM_DIR/spool/%n"
        echo "SlurmdPidFile=$SLURM_DIR/slurmd.%n.pid"
        echo "SlurmdLogFile=$SLURM_DIR/log/slurmd.%n.log"
        echo "TmpFS=$SLURM_DIR/tmp/%n"
        slurm_conf_common
        for i in $(seq 0 "$last"); do
            echo "NodeName=$(node_ns "$i") NodeAddr=$(node_addr "$i") CPUs=$SLOTS State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=hvdc-n[0-$last] Default=YES MaxTime=60 State=UP"
    } >"$SLURM_DIR/slurm.conf"
}

start_slurm() {
    load_config
    export SLURM_CONF=$SLURM_DIR/slurm.conf
    if slurm_daemons_running; then
        say "Slurm already runs"
        echo "SLURM_CONF=$SLURM_CONF"
        return
    fi
    [ ! -e "$SLURM_DIR" ] || die "$SLURM_DIR exists but its daemons do not all run; run down, then up --slurm"
    slurm_install_packages
    local i
    mkdir -p "$SLURM_DIR"/{state,log,spool,tmp}
    for i in $(seq 0 $((NODES - 1))); do
        mkdir -p "$SLURM_DIR/tmp/$(node_ns "$i")" "$SLURM_DIR/spool/$(node_ns "$i")"
    done
    write_slurm_conf
    # slurmd always loads a cgroup plugin (22.05), and by default picks v1 or v2 from what is
    # mounted on /sys/fs/cgroup; but `ip netns exec` mounts a fresh /sys for the host's
    # namespace, with no cgroup filesystem on it, and slurmd would stop there.  Naming the plugin
    # skips that check; nothing uses cgroups here (proctrack/linuxproc, task/none).
    echo "CgroupPlugin=cgroup/v1" >"$SLURM_DIR/cgroup.conf"
    slurm_start_munge || die "munged did not start"
    slurmctld -D -f "$SLURM_CONF" </dev/null >>"$SLURM_DIR/log/slurmctld.out" 2>&1 &
    echo $! >>"$SLURM_DIR/pids"
    for i in $(seq 0 $((NODES - 1))); do
        on_host "$i" slurmd -D -f "$SLURM_CONF" </dev/null >>"$SLURM_DIR/log/slurmd.out" 2>&1 &
        echo $! >>"$SLURM_DIR/pids"
    done
    if ! slurm_wait_idle "$NODES" "$SLURM_TIMEOUT" slurm_daemons_running; then
        tail -n 20 "$SLURM_DIR"/log/* >&2
        die "Slurm: not all $NODES nodes idle after ${SLURM_TIMEOUT}s (logs in $SLURM_DIR/log)"
    fi
    say "Slurm up: $(sinfo -h -N -o '%N %T' | tr '\n' ' ')"
    echo "SLURM_CONF=$SLURM_CONF"
}

# ---------------------------------------------------------------------------------------------
# Commands

print_env() {
    [ ! -f "$SLURM_DIR/slurm.conf" ] || echo "SLURM_CONF=$SLURM_DIR/slurm.conf"
    echo "HOSTS=$HOSTS"
    echo "IFACE=$IFACE"
}

up() {
    local nodes=2 slots=2 rate=1gbit delay=0 slurm='' i
    while [ $# -gt 0 ]; do
        case $1 in
            --nodes) nodes=${2:?}; shift 2 ;;
            --slots) slots=${2:?}; shift 2 ;;
            --inter) rate=${2:?}; shift 2 ;;
            --delay) delay=${2:?}; shift 2 ;;
            --slurm) slurm=1; shift ;;
            -h|--help) usage ;;
            *) die "unknown option '$1' (see: bash ci/cluster.sh --help)" ;;
        esac
    done
    [[ $nodes =~ ^[0-9]+$ ]] && [ "$nodes" -ge 1 ] && [ "$nodes" -le 200 ] || die "--nodes: 1 to 200"
    [[ $slots =~ ^[0-9]+$ ]] && [ "$slots" -ge 1 ] || die "--slots: a positive number"
    [ "$rate" = unlimited ] || rate_bps "$rate" >/dev/null
    no_delay "$delay" || [[ $delay =~ ^[0-9]+(\.[0-9]+)?(us|ms|s)$ ]] || die "--delay must be like 0, 500us or 1ms"

    if [ -e "$STATE" ] || [ -n "$(our_namespaces)" ]; then
        say "a cluster is up (or half up): tearing it down first"
        down
    fi
    # The subnet must be free in the root namespace: no address or route in it or around it
    # (other than the default route).
    if [ -n "$(ip -4 addr show to "$NET")" ] || [ -n "$(ip -4 route show root "$NET")" ] ||
            [ -n "$(ip -4 route show match "$NET" | grep -v '^default')" ]; then
        die "$NET is in use here ($(ip -4 route show match "$NET" | grep -v '^default' | head -n1)); choose another with HVDC_CLUSTER_NET=10.x.y.0/24"
    fi
    ! ip link show "$IFACE" >/dev/null 2>&1 || die "an interface named $IFACE exists already"

    hvdc_apt_install openssh-server
    command -v /usr/sbin/sshd >/dev/null || die "no /usr/sbin/sshd after installing openssh-server"

    mkdir -p "$STATE/ssh"
    touch "$STATE/.hvdc-cluster"
    chmod 755 "$STATE"
    NODES=$nodes SLOTS=$slots
    HOSTS=$(for i in $(seq 0 $((nodes - 1))); do printf '%s:%s,' "$(node_addr "$i")" "$slots"; done)
    HOSTS=${HOSTS%,}
    cat >"$STATE/config" <<EOF
NODES=$nodes
SLOTS=$slots
RATE=$rate
DELAY=$delay
NET=$NET
BASE=$BASE
HOSTS=$HOSTS
EOF
    # From here on, a failure leaves a half-made cluster: take it down again.
    trap 'rc=$?; [ $rc -eq 0 ] || { say "up failed: tearing down"; down >/dev/null 2>&1 || true; }; exit $rc' EXIT

    make_switch
    for i in $(seq 0 $((nodes - 1))); do make_host "$i" "$rate" "$delay"; done
    our_namespaces >"$STATE/namespaces"
    write_hosts_files
    say "$nodes hosts on $NET (head $(head_addr)), links $rate each way, one-way delay $delay"

    ssh-keygen -q -t ed25519 -N '' -C hvdc-cluster -f "$STATE/ssh/id_ed25519"
    for i in $(seq 0 $((nodes - 1))); do start_sshd "$i"; done
    add_ssh_block
    wait_ssh
    tx_sum >"$STATE/bytes0"
    say "sshd answers on every host; ssh $(node_addr 0) works without a prompt"

    if [ -n "$slurm" ]; then
        start_slurm >/dev/null
        tx_sum >"$STATE/bytes0"    # the counters start after the nodes registered
    fi
    trap - EXIT
    print_env
}

down() {
    local ns pids=() had=
    # Slurm's jobs first, while its daemons still run, so their steps end the way Slurm ends them.
    if [ -f "$SLURM_DIR/slurm.conf" ] && slurm_daemons_running; then
        SLURM_CONF=$SLURM_DIR/slurm.conf slurm_cancel_jobs
    fi
    # Every process in the hosts' namespaces (sshd, slurmd and what they started).  Twice: a
    # dying session may still start a process between the listing and the signal.
    for _ in 1 2; do
        pids=()
        for ns in $(our_namespaces); do
            # shellcheck disable=SC2207
            pids+=($(ip netns pids "$ns" 2>/dev/null || true))
        done
        [ ${#pids[@]} -eq 0 ] && break
        had=1
        terminate_pids "${pids[@]}"
    done
    # In the root namespace: whatever holds files under the state directory (munged, slurmctld,
    # and a leftover sshd whose namespace is gone) and its descendants.
    if [ -d "$STATE" ]; then
        read -ra pids <<<"$(pids_holding_dir "$STATE")"
        [ ${#pids[@]} -eq 0 ] || { had=1; terminate_pids "${pids[@]}"; }
    fi
    # Namespaces: the hosts', then the switch's (which takes the root's veth end with it).
    for ns in $(our_namespaces | sort -r); do ip netns del "$ns"; had=1; done
    if ip -d link show "$IFACE" 2>/dev/null | grep -qw veth; then ip link del "$IFACE"; had=1; fi
    for ns in /etc/netns/hvdc-n*; do
        [ -d "$ns" ] || continue
        [[ $(basename "$ns") =~ ^hvdc-n[0-9]+$ ]] || continue
        rm -f "$ns/hosts"
        rmdir "$ns" 2>/dev/null || true
        had=1
    done
    rmdir /etc/netns 2>/dev/null || true
    remove_ssh_block
    if [ -f "$STATE/run_sshd_created" ]; then rmdir /run/sshd 2>/dev/null || true; fi
    [ -e "$STATE" ] && had=1
    rm -rf "$STATE"
    if [ -n "$had" ]; then say "down: cluster removed"; else say "down: no cluster was up"; fi
}

bytes() {
    load_config
    [ -f "$STATE/bytes0" ] || die "no byte counters recorded at up"
    echo $(($(tx_sum) - $(cat "$STATE/bytes0")))
}

status() {
    [ -f "$STATE/config" ] || { say "no cluster is up"; return 1; }
    load_config
    local ns
    for ns in $(seq 0 $((NODES - 1))); do
        ip netns list | awk '{print $1}' | grep -qxF "$(node_ns "$ns")" || { say "host $(node_ns "$ns") is missing"; return 1; }
    done
    say "$NODES hosts, $SLOTS slots each, links $RATE, delay $DELAY; sent between hosts since up: $(bytes) bytes"
    if [ -f "$SLURM_DIR/slurm.conf" ]; then
        if slurm_daemons_running; then
            say "Slurm: $(SLURM_CONF=$SLURM_DIR/slurm.conf sinfo -h -N -o '%N %T' | tr '\n' ' ')"
        else
            say "Slurm: not all daemons run"
        fi
    fi
    print_env
}

main() {
    local cmd=${1:-}
    [ $# -gt 0 ] && shift
    case $cmd in
        up|down|bytes|status|slurm|exec) ;;
        -h|--help|"") usage ;;
        *) die "unknown command '$cmd' (up, slurm, bytes, status, exec, down)" ;;
    esac
    check_environment
    check_state_dir
    parse_net
    case $cmd in
        up) up "$@" ;;
        down) down ;;
        bytes) bytes ;;
        status) status ;;
        slurm) start_slurm ;;
        exec)
            load_config
            [[ ${1:-} =~ ^[0-9]+$ ]] && [ "$1" -lt "$NODES" ] || die "usage: exec <host index 0..$((NODES - 1))> CMD..."
            on_host "$@" ;;
    esac
}

main "$@"
