#!/usr/bin/env bash
# A real Slurm cluster on this one machine, to practise sbatch, squeue, scontrol and scancel
# without access to a cluster. Two "nodes", n1 and n2, are two slurmd daemons on this host
# (Slurm's own way of emulating nodes); slurmctld, the controller, schedules jobs onto them.
#
#   sudo slurm/local_cluster.sh start     install Slurm if needed, start the daemons, wait until both nodes are idle
#   sudo slurm/local_cluster.sh status    sinfo and squeue
#   sudo slurm/local_cluster.sh stop      cancel the jobs, stop the daemons this script started
#
# Needs root (Debian/Ubuntu: it installs the slurm-wlm package with apt-get when slurmctld is
# missing, and the daemons run as root). Nothing outside the state directory is configured:
# the cluster's slurm.conf lives there, and the Slurm commands find it through the SLURM_CONF
# environment variable, which `start` prints for you to paste:
#   export SLURM_CONF=/tmp/ddp-steps-slurm/slurm.conf
#
# Environment:
#   SLURM_LOCAL_DIR   state directory: config, logs, PIDs, spool (default /tmp/ddp-steps-slurm)
#   SLURM_LOCAL_PORT  slurmctld's TCP port; the nodes use the next two (default 17000)
#   SLURM_LOCAL_CPUS  CPUs each emulated node advertises (default: this machine's, at least 2)
#
# Exit codes: 0 ok, 1 usage or not root or the cluster failed to start, 3 Slurm could not be installed.
set -euo pipefail

STATE="${SLURM_LOCAL_DIR:-/tmp/ddp-steps-slurm}"
PORT="${SLURM_LOCAL_PORT:-17000}"
CONF="$STATE/slurm.conf"
NODES=(n1 n2)
START_TIMEOUT=30  # seconds to wait for both nodes to become idle

usage() {
    sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
}

die() {
    echo "error: $*" >&2
    exit 1
}

# Does the PID recorded in file $1 still belong to the program the file is named after
# (slurmctld.pid: slurmctld, slurmd-n1.pid: slurmd, munged.pid: munged)? A PID alone could
# by now be another program's, after a reboot say.
alive() {
    local pid name
    [[ -s "$1" ]] || return 1
    pid=$(cat "$1")
    name=$(basename "$1" .pid)
    name=${name%%-*}
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$name" ]]
}

need_root() {
    if [[ $(id -u) -ne 0 ]]; then
        die "the local Slurm cluster needs root (it installs packages and runs slurmctld, slurmd and munged): sudo $0 $1"
    fi
}

install_slurm() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
    if ! command -v apt-get >/dev/null; then
        echo "error: slurmctld is not installed and there is no apt-get to install it; install Slurm (slurm-wlm) and munge yourself" >&2
        exit 3
    fi
    echo "Installing Slurm and munge (apt-get install slurm-wlm, about 15 s) ..."
    export DEBIAN_FRONTEND=noninteractive
    # No package lists yet (a fresh container)? Then the first try fails: update and try again.
    if ! apt-get install -y --no-install-recommends slurm-wlm >"$STATE/apt.log" 2>&1; then
        if ! { apt-get update && apt-get install -y --no-install-recommends slurm-wlm; } >>"$STATE/apt.log" 2>&1; then
            tail -n 5 "$STATE/apt.log" >&2
            echo "error: could not install slurm-wlm with apt-get (no network to the package mirror?); log: $STATE/apt.log" >&2
            exit 3
        fi
    fi
}

# munge authenticates every message between the Slurm commands and daemons. One munged per
# machine serves every Slurm on it: start it only if none runs, and remember that we did.
start_munge() {
    if [[ -S /run/munge/munge.socket.2 ]] && alive /run/munge/munged.pid; then
        return 0
    fi
    mkdir -p /run/munge
    chown munge:munge /run/munge
    chmod 0755 /run/munge
    [[ -f /etc/munge/munge.key ]] || die "/etc/munge/munge.key is missing (the munge package creates it): reinstall munge"
    # munged refuses to run as root; it puts itself in the background and writes its PID file.
    runuser -u munge -- munged || die "munged did not start: see /var/log/munge/munged.log"
    for _ in $(seq 50); do
        alive /run/munge/munged.pid && break
        sleep 0.1
    done
    alive /run/munge/munged.pid || die "munged did not start: see /var/log/munge/munged.log"
    cp /run/munge/munged.pid "$STATE/munged.pid"
}

write_config() {
    local host cpus
    host=$(hostname -s)
    cpus="${SLURM_LOCAL_CPUS:-$(nproc)}"
    (( cpus >= 2 )) || cpus=2
    mkdir -p "$STATE/state" "$STATE/spool/n1" "$STATE/spool/n2"
    cat >"$CONF" <<EOF
# Written by slurm/local_cluster.sh: a one-machine Slurm cluster with two emulated nodes.
ClusterName=ddpsteps
# The controller runs on this host, reached at 127.0.0.1 (no name lookup needed).
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
# Daemons and jobs run as root: this is a practice cluster on your own machine.
SlurmUser=root
AuthType=auth/munge
# Track a job's processes through /proc, bind nothing to cores: works without cgroups (containers too).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# Schedule CPUs (and GPUs, where a cluster has them) of each node separately, so jobs can share a node.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# No accounting database (so no sacct here; use scontrol show job) and no mail.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
MpiDefault=none
ReturnToService=2
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.pid.daemon
SlurmdPidFile=$STATE/slurmd-%n.pid.daemon
# No log files set: the daemons run in the foreground (-D) and log to stderr, which
# local_cluster.sh sends to slurmctld.log and slurmd-n1.log, slurmd-n2.log in this directory.
# Two nodes on one host: each slurmd (slurmd -N n1, slurmd -N n2) listens on its own port.
# config_overrides: believe the CPUs written here rather than count the real ones.
SlurmdParameters=config_overrides
NodeName=n[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=[$((PORT + 1))-$((PORT + 2))] CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

show_logs() {
    local log
    for log in "$STATE/slurmctld.log" "$STATE"/slurmd-n*.log; do
        [[ -f "$log" ]] || continue
        echo "--- last lines of $log ---" >&2
        tail -n 8 "$log" >&2
    done
}

is_running() {
    local node
    alive "$STATE/slurmctld.pid" || return 1
    for node in "${NODES[@]}"; do
        alive "$STATE/slurmd-$node.pid" || return 1
    done
}

dead_daemons() {
    local node dead=()
    alive "$STATE/slurmctld.pid" || dead+=(slurmctld)
    for node in "${NODES[@]}"; do
        alive "$STATE/slurmd-$node.pid" || dead+=("slurmd -N $node")
    done
    echo "${dead[*]}"
}

start() {
    need_root start
    mkdir -p "$STATE"
    if is_running; then
        start_munge  # in case munged stopped (it answers every Slurm command)
        echo "The local Slurm cluster is already running (state in $STATE)."
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    stop_daemons  # whatever is left of an earlier, half-started cluster
    install_slurm
    start_munge
    write_config
    export SLURM_CONF="$CONF"
    # -D: stay in the foreground (we put it in the background and record its PID);
    # -c: start clean, forgetting jobs of an earlier run (job ids start again at 1);
    # -i: ignore state files that can't be read. setsid: survive the closing of this terminal.
    setsid slurmctld -D -c -i </dev/null >>"$STATE/slurmctld.log" 2>&1 &
    echo $! >"$STATE/slurmctld.pid"
    for node in "${NODES[@]}"; do
        # -N: the node this slurmd plays (its port and name come from slurm.conf).
        setsid slurmd -D -N "$node" </dev/null >>"$STATE/slurmd-$node.log" 2>&1 &
        echo $! >"$STATE/slurmd-$node.pid"
    done
    local waited=0 idle
    while true; do
        idle=$(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l || true)
        (( idle == ${#NODES[@]} )) && break
        if ! is_running; then
            echo "error: the local Slurm cluster failed to start: $(dead_daemons) exited (a port in use? see the log below)" >&2
        elif (( waited >= START_TIMEOUT * 2 )); then
            echo "error: the local Slurm cluster did not come up within ${START_TIMEOUT} s (nodes idle: $idle of ${#NODES[@]})" >&2
        else
            sleep 0.5
            waited=$((waited + 1))
            continue
        fi
        sinfo -N 2>&1 | sed 's/^/  /' >&2 || true
        show_logs
        stop_daemons
        exit 1
    done
    echo "Local Slurm cluster up: nodes n1 and n2 idle (state, config and logs in $STATE)."
    sinfo
    echo
    echo "Paste this into your shell so that sbatch, squeue, scontrol and scancel find it:"
    echo "export SLURM_CONF=$CONF"
}

# The PIDs of this cluster's job processes: slurmstepd (which slurmd starts for every job
# step, and which outlives slurmd) and the programs of the jobs, recognised by SLURM_CONF=our
# slurm.conf together with SLURM_JOB_ID in their environment. Your own shell is none of them.
our_job_processes() {
    local env pid
    for env in /proc/[0-9]*/environ; do
        pid=${env#/proc/}
        pid=${pid%/environ}
        [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
        grep -qzxF "SLURM_CONF=$CONF" "$env" 2>/dev/null || continue
        if [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == slurmstepd ]] || grep -qz '^SLURM_JOB_ID=' "$env" 2>/dev/null; then
            echo "$pid"
        fi
    done
}

# Send SIGTERM to the process recorded in each PID file given, wait for them to exit
# (SIGKILL after 10 s), and remove the files.
kill_recorded() {
    local file pids=() pid
    for file in "$@"; do
        alive "$file" && pids+=("$(cat "$file")")
    done
    if (( ${#pids[@]} )); then
        kill "${pids[@]}" 2>/dev/null || true
        for _ in $(seq 100); do
            local left=0
            for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left=1; done
            (( left )) || break
            sleep 0.1
        done
        for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    fi
    rm -f "$@"
}

stop_daemons() {
    local files=("$STATE/slurmctld.pid") node
    for node in "${NODES[@]}"; do files+=("$STATE/slurmd-$node.pid"); done
    kill_recorded "${files[@]}"
}

stop() {
    need_root stop
    if [[ ! -d "$STATE" ]]; then
        echo "No local Slurm cluster here (no $STATE)."
        return 0
    fi
    export SLURM_CONF="$CONF"
    if alive "$STATE/slurmctld.pid"; then
        # Cancel the jobs first, so their processes end with them.
        local jobs
        jobs=$(squeue -h -o '%i' 2>/dev/null || true)
        if [[ -n "$jobs" ]]; then
            echo "Cancelling jobs: $(echo $jobs)"
            scancel $jobs 2>/dev/null || true
            for _ in $(seq 30); do
                [[ -z "$(squeue -h -o '%i' 2>/dev/null || true)" ]] && break
                sleep 0.5
            done
        fi
    fi
    stop_daemons
    local left
    left=$(our_job_processes)
    if [[ -n "$left" ]]; then
        echo "Ending leftover job processes: $(echo $left)"
        kill $left 2>/dev/null || true
        sleep 1
        left=$(our_job_processes)
        [[ -z "$left" ]] || kill -9 $left 2>/dev/null || true
    fi
    if [[ -f "$STATE/munged.pid" ]]; then  # only the munged that `start` started
        kill_recorded "$STATE/munged.pid"
    fi
    echo "Local Slurm cluster stopped (logs kept in $STATE)."
}

status() {
    if ! is_running; then
        echo "The local Slurm cluster is not running (state directory $STATE)."
        return 1
    fi
    export SLURM_CONF="$CONF"
    echo "The local Slurm cluster is running: export SLURM_CONF=$CONF"
    sinfo
    echo
    squeue
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    -h|--help|help) usage ;;
    *) usage >&2; exit 1 ;;
esac
