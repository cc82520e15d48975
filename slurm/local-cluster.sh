#!/usr/bin/env bash
# A real one-node Slurm cluster on this Debian machine, for tests and for trying `vitas submit`.
#
#   bash slurm/local-cluster.sh start    install (if missing) and start munge + slurmctld + slurmd
#   bash slurm/local-cluster.sh stop     stop the daemons and remove their state and logs
#   bash slurm/local-cluster.sh status   print sinfo / squeue
#
# Runs as root. `start` is idempotent: it installs slurmctld, slurmd, slurm-client and munge with
# apt-get when they are missing, creates a munge key when there is none, writes /etc/slurm/slurm.conf
# for one node (CPUs = nproc, RealMemory a bit below free memory, one default partition "debug",
# proctrack/linuxproc, task/none, select/cons_tres with CR_CPU, JobRequeue=1, no accounting),
# starts munged as user munge and slurmctld/slurmd as root (daemon mode), then waits until the node
# is idle and `srun hostname` works. When the daemons already run with the same slurm.conf it only
# checks them; with another one it rewrites it and restarts them. A fresh start of slurmctld
# clears the job records of earlier runs (after a reboot they would hold the node forever). `sacct` errors (no accounting storage) are expected and harmless: submitit falls
# back to squeue/scontrol. Environment: SLURM_PARTITION (default debug), SLURM_START_TIMEOUT (60 s).
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
PARTITION=${SLURM_PARTITION:-debug}
START_TIMEOUT=${SLURM_START_TIMEOUT:-60}
NODE=$(hostname -s)

log() { echo "local-cluster: $*"; }
die() { echo "local-cluster: error: $*" >&2; exit 1; }

need_root() { [ "$(id -u)" -eq 0 ] || die "must run as root"; }

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
    fi
}

start_munge() {
    mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating munge key"
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
    chmod 0700 /etc/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    chmod 0400 /etc/munge/munge.key
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        log "starting munged"
        pkill_pidfile /run/munge/munged.pid
        runuser -u munge -- munged --force
        for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
        munge -n | unmunge >/dev/null || die "munged does not answer"
    fi
}

# slurm.conf for this machine, printed on stdout.
render_conf() {
    local cpus mem_mb
    cpus=$(nproc)
    # RealMemory a bit below what is free now, so that slurmd never marks the node invalid.
    mem_mb=$(awk '/MemAvailable/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    cat <<EOF
# Written by slurm/local-cluster.sh: a one-node cluster for tests.
ClusterName=vitas-local
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobRequeue=1
ReturnToService=2
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=300
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

# True when the pid file names a live process; a zombie (this VM's init may not reap) is dead.
pid_alive() {
    [ -s "$1" ] || return 1
    local pid state
    pid=$(cat "$1")
    kill -0 "$pid" 2>/dev/null || return 1
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)
    [ -n "$state" ] && [ "$state" != Z ]
}

pkill_pidfile() {
    local pidfile=$1 pid
    pid_alive "$pidfile" || { rm -f "$pidfile"; return 0; }
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
}

node_state() { sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1 | tr -d '*~#!%$@^-'; }

wait_ready() {
    local deadline=$((SECONDS + START_TIMEOUT)) state=""
    while [ $SECONDS -lt $deadline ]; do
        state=$(node_state || true)
        case "$state" in
            idle|mixed|allocated) break ;;
            down|drained|draining|fail|failing)
                scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 1
    done
    case "$state" in
        idle|mixed|allocated) ;;
        *) status >&2 || true
           tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
           die "node $NODE is '${state:-unknown}' after ${START_TIMEOUT}s" ;;
    esac
    local out
    out=$(timeout "$START_TIMEOUT" srun -N1 -n1 -t 1 -J local-cluster-check hostname) \
        || die "'srun hostname' failed"
    log "srun hostname -> $out"
}

start() {
    need_root
    install_packages
    mkdir -p "$CONF_DIR" "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR" "$RUN_DIR"
    start_munge
    local new
    new=$(render_conf)
    if ! pid_alive "$RUN_DIR/slurmctld.pid"; then
        log "writing $CONF"
        printf '%s\n' "$new" > "$CONF"
    elif [ "$(sed 's/RealMemory=[0-9]*//' "$CONF")" != "$(sed 's/RealMemory=[0-9]*//' <<<"$new")" ]; then
        # Running with another configuration (free memory moving alone does not count): restart.
        log "configuration changed: rewriting $CONF and restarting the daemons"
        printf '%s\n' "$new" > "$CONF"
        pkill_pidfile "$RUN_DIR/slurmd.pid"
        pkill_pidfile "$RUN_DIR/slurmctld.pid"
    fi
    if ! pid_alive "$RUN_DIR/slurmctld.pid"; then
        # A fresh start forgets the jobs of an earlier life (-c): their processes died with the
        # daemons (or the machine), yet recovered records would hold the node as allocated.
        log "starting slurmctld (clearing job state of earlier runs)"
        slurmctld -c -i
    fi
    if ! pid_alive "$RUN_DIR/slurmd.pid"; then
        log "starting slurmd"
        slurmd
    fi
    wait_ready
    status
    log "ready: partition '$PARTITION', node $NODE ($(nproc) CPUs)"
}

stop() {
    need_root
    if command -v scancel >/dev/null && pid_alive "$RUN_DIR/slurmctld.pid"; then
        scancel --full --quiet --partition "$PARTITION" 2>/dev/null || true
    fi
    pkill_pidfile "$RUN_DIR/slurmd.pid"
    pkill_pidfile "$RUN_DIR/slurmctld.pid"
    pkill_pidfile /run/munge/munged.pid
    rm -rf "${STATE_DIR:?}"/* "${SPOOL_DIR:?}"/* "${LOG_DIR:?}"/*
    log "stopped"
}

status() {
    if ! command -v sinfo >/dev/null; then log "slurm is not installed"; return 1; fi
    if ! pid_alive "$RUN_DIR/slurmctld.pid"; then log "slurmctld is not running"; return 1; fi
    sinfo -N -o '%N %P %T %c %m'
    squeue -o '%i %j %T %M %R'
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
