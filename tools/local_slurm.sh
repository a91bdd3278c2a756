#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for tests and trying the SLURM profile.
#
#   tools/local_slurm.sh start    install slurm-wlm + munge (apt), write the config, start
#                                 munged, slurmctld and slurmd, wait until the node is idle
#   tools/local_slurm.sh status   exit 0 when the cluster answers and its node is usable
#   tools/local_slurm.sh stop     cancel its jobs, stop slurmd, slurmctld and munged
#
# Needs root on Debian (or Ubuntu): it installs packages with apt-get and writes
# /etc/slurm/slurm.conf and /etc/slurm/gres.conf. It never overwrites a slurm.conf it did
# not write itself (first line below), so a machine with a real SLURM setup is left alone.
#
# The node ("localhost", partition "debug") gets the CPUs and memory `slurmd -C` detects,
# and LOCAL_SLURM_GPUS (default 1) GPU generic resources backed by dummy device files
# (character devices with /dev/null's numbers), so jobs that ask for a GPU (sbatch
# --gpus=1 / --gres=gpu:1) schedule on a machine without one (they get
# CUDA_VISIBLE_DEVICES but no real device). No accounting storage (no slurmdbd):
# sacct has nothing to report, so job status comes from squeue; MinJobAge keeps finished
# jobs visible to squeue (and `scontrol show job`) for an hour.
#
# Environment: LOCAL_SLURM_GPUS (default 1), LOCAL_SLURM_TIMEOUT (seconds to wait for an
# idle node, default 90).
set -euo pipefail

MARK="# written by semiseg tools/local_slurm.sh"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
GRES_CONF="$CONF_DIR/gres.conf"
NODE=localhost
GPUS="${LOCAL_SLURM_GPUS:-1}"
TIMEOUT="${LOCAL_SLURM_TIMEOUT:-90}"
STATE=/var/lib/slurm/semiseg-local
LOGDIR=/var/log/slurm
FAKE_GPU_DIR="$STATE/fake-gpu"
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid

die() {
    echo "local_slurm.sh: $*" >&2
    exit 1
}

log() {
    echo "local_slurm.sh: $*"
}

require_root_debian() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts daemons)"
    command -v apt-get >/dev/null && command -v dpkg-query >/dev/null ||
        die "needs a Debian-style system with apt-get and dpkg-query"
}

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

install_packages() {
    if installed slurm-wlm && installed munge; then
        return
    fi
    log "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends slurm-wlm munge; then
        # Stale package lists are the usual reason; refresh once and retry.
        apt-get update
        apt-get install -y --no-install-recommends slurm-wlm munge
    fi
}

pid_alive() { # pid file
    local pid
    pid=$(cat "$1" 2>/dev/null) && [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null
}

write_config() {
    if [[ -e $CONF ]] && [[ $(head -n 1 "$CONF") != "$MARK" ]]; then
        die "$CONF exists and was not written by this script; refusing to overwrite it"
    fi
    local hw
    # e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
    hw=$(slurmd -C | head -n 1 | sed -e 's/^NodeName=[^ ]* //')
    [[ $hw == CPUs=* ]] || die "unexpected 'slurmd -C' output: $hw"
    mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/slurmd" "$FAKE_GPU_DIR" "$LOGDIR"
    local files=() i
    for ((i = 0; i < GPUS; i++)); do
        # A character device with /dev/null's numbers: slurmd wants a device file.
        [[ -c $FAKE_GPU_DIR/gpu$i ]] || {
            rm -f "$FAKE_GPU_DIR/gpu$i"
            mknod -m 0666 "$FAKE_GPU_DIR/gpu$i" c 1 3
        }
        files+=("$FAKE_GPU_DIR/gpu$i")
    done
    local gres_node="" gres_line=""
    if ((GPUS > 0)); then
        gres_node=" Gres=gpu:$GPUS"
        gres_line="NodeName=$NODE Name=gpu File=$(IFS=,; echo "${files[*]}")"
    fi
    cat >"$CONF" <<EOF
$MARK
# A single-node test cluster: controller and compute node on this machine.
ClusterName=semiseg-local
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
ReturnToService=2
# Finished jobs stay visible to squeue / scontrol for an hour (status without sacct).
MinJobAge=3600
KillWait=5
InactiveLimit=0
DefMemPerCPU=500
NodeName=$NODE NodeAddr=127.0.0.1 $hw$gres_node State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    {
        echo "$MARK"
        echo "$gres_line"
    } >"$GRES_CONF"
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    [[ -s /etc/munge/munge.key ]] || {
        log "creating /etc/munge/munge.key"
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    }
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGE_PID"
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.2
    done
    die "munged did not start (see /var/log/munge/munged.log)"
}

start_daemon() { # pid file, log file, command...: start a self-daemonising command
    local pidfile=$1 logfile=$2
    shift 2
    pid_alive "$pidfile" && return
    rm -f "$pidfile" # stale
    "$@"
    for _ in $(seq 100); do
        pid_alive "$pidfile" && return
        sleep 0.1
    done
    die "$1 did not start: $(tail -n 3 "$logfile" 2>/dev/null)"
}

node_state() {
    # A short timeout: sinfo otherwise retries for a while when slurmctld is not up.
    timeout 10 sinfo --noheader --nodes="$NODE" --format=%T 2>/dev/null | head -n 1
}

cmd_start() {
    require_root_debian
    install_packages
    if cmd_status >/dev/null 2>&1; then
        log "already running: $(node_state)"
        return
    fi
    write_config
    start_munge
    # -c: start with a clean job state (a test cluster keeps no jobs across starts).
    start_daemon "$CTLD_PID" "$LOGDIR/slurmctld.log" slurmctld -c
    start_daemon "$SLURMD_PID" "$LOGDIR/slurmd.log" slurmd -N "$NODE"
    local state="" start=$SECONDS
    while ((SECONDS - start < TIMEOUT)); do
        pid_alive "$CTLD_PID" || die "slurmctld exited: $(tail -n 3 "$LOGDIR/slurmctld.log")"
        pid_alive "$SLURMD_PID" || die "slurmd exited: $(tail -n 3 "$LOGDIR/slurmd.log")"
        state=$(node_state || true)
        case $state in
        idle | mixed | allocated) break ;;
        down* | drain*)
            # A node that was known before comes back "down" until resumed.
            scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true
            ;;
        esac
        sleep 1
    done
    case $state in
    idle | mixed | allocated) ;;
    *)
        die "node $NODE not idle after ${TIMEOUT}s (state '${state:-none}'); see $LOGDIR/slurmctld.log and $LOGDIR/slurmd.log"
        ;;
    esac
    log "cluster up in $((SECONDS - start))s:"
    sinfo --Node --long --nodes="$NODE"
}

cmd_status() {
    command -v sinfo >/dev/null || {
        echo "SLURM is not installed"
        return 1
    }
    local state
    if ! pid_alive "$CTLD_PID"; then
        echo "not running (no slurmctld)"
        return 1
    fi
    state=$(node_state || true)
    case $state in
    idle | mixed | allocated)
        echo "running: node $NODE $state"
        return 0
        ;;
    *)
        echo "not running (node state '${state:-none}')"
        return 1
        ;;
    esac
}

stop_pid() { # pid file, name
    local pidfile=$1 name=$2 pid
    pid=$(cat "$pidfile" 2>/dev/null) || return 0
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    die "$name (pid $pid) did not stop"
}

cmd_stop() {
    require_root_debian
    if command -v squeue >/dev/null && pid_alive "$CTLD_PID"; then
        local jobs
        jobs=$(squeue --noheader --format=%i --states=PENDING,RUNNING,CONFIGURING,COMPLETING 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            log "cancelling jobs: $(echo "$jobs" | tr '\n' ' ')"
            # shellcheck disable=SC2086
            scancel $jobs || true
        fi
    fi
    stop_pid "$SLURMD_PID" slurmd
    stop_pid "$CTLD_PID" slurmctld
    stop_pid "$MUNGE_PID" munged
    log "stopped"
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
*)
    echo "usage: $0 start|status|stop" >&2
    exit 2
    ;;
esac
