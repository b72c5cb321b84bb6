#!/usr/bin/env bash
# A real one-node SLURM cluster on localhost, for tests (Debian 12 / SLURM 22.05, no systemd).
#
#   scripts/slurm_local.sh start    # bring it up (idempotent); last stdout line: export SLURM_CONF=...
#   scripts/slurm_local.sh stop     # cancel jobs, stop slurmd, slurmctld (and munged if we started it)
#   scripts/slurm_local.sh status   # exit 0 iff `sinfo` shows the node idle/mixed/allocated
#
# Everything SLURM writes lives in the state directory ${CEHRX_SLURM_DIR:-/tmp/cehrx-slurm}
# (slurm.conf, state/, spool/, log/, pid files); /etc/slurm is never touched. Both daemons are
# given the config with `-f`, and clients find it through SLURM_CONF, which the caller must
# export (the `start` output prints the line). munged is the system one (/run/munge socket,
# /etc/munge/munge.key); the key is created if missing. Daemons run as root: `start`/`stop` need
# root unless the cluster is already up. `start` is a cold start: the job queue starts empty.
#
# Plugins need no cgroups (proctrack/linuxproc, task/none, jobacct_gather/none), no accounting
# DB (accounting_storage/none: no sacct; use squeue / scontrol show job). JobRequeue=1.
set -uo pipefail

DIR=${CEHRX_SLURM_DIR:-/tmp/cehrx-slurm}
CONF=$DIR/slurm.conf
HOST=$(hostname -s)
export SLURM_CONF=$CONF
WAIT_S=${CEHRX_SLURM_WAIT_S:-60}

log() { echo "slurm_local: $*" >&2; }
die() { log "$*"; exit 1; }

# pid from a pid file, if that process is alive and its command name matches $2.
live_pid() {
    local pid
    [[ -r $1 ]] || return 1
    pid=$(tr -dc '0-9' <"$1")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$2"* ]] || return 1
    echo "$pid"
}

node_state() { timeout 15 sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -n1; }

is_up() {
    [[ -r $CONF ]] || return 1
    case $(node_state) in idle | mixed | allocated | completing) return 0 ;; *) return 1 ;; esac
}

dump_logs() {
    local f
    for f in /var/log/munge/munged.log "$DIR/log/slurmd.log" "$DIR/log/slurmctld.log"; do
        [[ -r $f ]] && { echo "---- tail $f" >&2; tail -n 20 "$f" >&2; }
    done
}

ensure_installed() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sinfo >/dev/null \
        && command -v munged >/dev/null && return 0
    [[ $EUID -eq 0 ]] || die "SLURM/munge not installed and not root: cannot apt-get install them"
    log "installing slurmctld slurmd slurm-client munge with apt-get"
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        slurmctld slurmd slurm-client munge; } >"/tmp/cehrx-slurm-apt.log" 2>&1 \
        || die "apt-get install of SLURM failed (see /tmp/cehrx-slurm-apt.log)"
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

ensure_munge() {
    local key=/etc/munge/munge.key i
    munge_ok && return 0
    if [[ ! -s $key ]]; then
        log "creating $key"
        install -d -o munge -g munge -m 0700 /etc/munge
        (umask 077 && dd if=/dev/urandom of="$key" bs=1024 count=1 status=none) || die "cannot write $key"
        chown munge:munge "$key" && chmod 0400 "$key"
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    # A stale socket/pid from a dead munged makes it refuse to start without --force.
    runuser -u munge -- munged --force 2>>"$DIR/log/munged.start.log" \
        || munged --force 2>>"$DIR/log/munged.start.log" || { dump_logs; die "munged failed to start"; }
    for i in $(seq 20); do munge_ok && break; sleep 0.5; done
    munge_ok || { dump_logs; die "munged started but munge -n | unmunge fails"; }
    cp /run/munge/munged.pid "$DIR/munged.pid" 2>/dev/null || true  # marks "we started it"
}

write_conf() {
    local cpus mem_mb
    cpus=$(nproc)
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    mem_mb=$((mem_mb * 90 / 100))  # a bit under what slurmd detects, else the node drains
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    : >"$DIR/plugstack.conf"  # no SPANK plugins (the system one includes /etc/slurm/plugstack.conf.d)
    cat >"$CONF" <<EOF
# Written by scripts/slurm_local.sh: one-node test cluster on localhost.
ClusterName=cehrx-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=${CEHRX_SLURMCTLD_PORT:-6817}
SlurmdPort=${CEHRX_SLURMD_PORT:-6818}
AuthType=auth/munge
# Requeued jobs wait cred_expire s (default 120) before they may start again.
AuthInfo=cred_expire=10
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$DIR/plugstack.conf
ReturnToService=2
MpiDefault=none
JobRequeue=1
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((mem_mb / cpus))
InactiveLimit=0
KillWait=5
MinJobAge=300
SlurmdTimeout=300
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    local i st f d
    if is_up; then
        log "already up ($HOST: $(node_state))"
        printf "export SLURM_CONF=%q\n" "$CONF"
        return 0
    fi
    ensure_installed
    [[ $EUID -eq 0 ]] || die "not root: cannot start munged/slurmctld/slurmd"
    mkdir -p "$DIR/log"
    ensure_munge
    if ! live_pid "$DIR/slurmctld.pid" slurmctld >/dev/null && ! live_pid "$DIR/slurmd.pid" slurmd >/dev/null; then
        write_conf
        for f in "$DIR"/log/slurm*.log; do [[ -e $f ]] && mv -f "$f" "$f.prev"; done
        log "starting slurmctld (cold start) and slurmd, config $CONF"
        slurmctld -c -f "$CONF" || { dump_logs; die "slurmctld failed to start"; }
        slurmd -c -f "$CONF" || { dump_logs; die "slurmd failed to start"; }
    else
        live_pid "$DIR/slurmctld.pid" slurmctld >/dev/null || slurmctld -f "$CONF" || { dump_logs; die "slurmctld failed"; }
        live_pid "$DIR/slurmd.pid" slurmd >/dev/null || slurmd -f "$CONF" || { dump_logs; die "slurmd failed"; }
    fi
    for ((i = 0; i < WAIT_S; i++)); do
        st=$(node_state)
        case $st in
            idle | mixed | allocated | completing)
                log "up: node $HOST $st"
                printf "export SLURM_CONF=%q\n" "$CONF"
                return 0 ;;
            down | drain* | draining | drained | fail*)  # '*' suffix = not responding yet: wait
                scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 ;;
        esac
        for d in slurmctld slurmd; do
            live_pid "$DIR/$d.pid" "$d" >/dev/null || { [[ $i -gt 2 ]] && { dump_logs; die "$d died"; }; }
        done
        sleep 1
    done
    timeout 10 scontrol show node "$HOST" >&2 2>/dev/null
    dump_logs
    die "node $HOST not idle after ${WAIT_S}s (state: ${st:-no answer})"
}

stop_pid() {  # stop_pid <pidfile> <comm>
    local pid i
    pid=$(live_pid "$1" "$2") || { rm -f "$1"; return 0; }
    kill -TERM "$pid" 2>/dev/null
    for i in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    rm -f "$1"
    log "stopped $2 ($pid)"
}

stop() {
    local i jobs
    if [[ -r $CONF ]] && live_pid "$DIR/slurmctld.pid" slurmctld >/dev/null; then
        jobs=$(timeout 10 squeue -h -o %i 2>/dev/null)
        if [[ -n $jobs ]]; then
            log "cancelling jobs: $(echo $jobs)"
            timeout 10 scancel $jobs 2>/dev/null
            for i in $(seq 20); do
                [[ -z $(timeout 10 squeue -h -t running,completing -o %i 2>/dev/null) ]] && break
                sleep 0.5
            done
        fi
    fi
    stop_pid "$DIR/slurmd.pid" slurmd
    stop_pid "$DIR/slurmctld.pid" slurmctld
    [[ -e $DIR/munged.pid ]] && { stop_pid "$DIR/munged.pid" munged; rm -f "$DIR/munged.pid"; }
    return 0
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status)
        if is_up; then log "up: node $HOST $(node_state)"; exit 0; fi
        log "down"; exit 1 ;;
    *) echo "usage: $0 start|stop|status  (state dir: $DIR)" >&2; exit 2 ;;
esac
