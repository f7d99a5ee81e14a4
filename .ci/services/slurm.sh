#!/usr/bin/env bash
# A two-node SLURM cluster (nodes n1, n2; partition "debug") on this one host, for tests.
#
#   .ci/services/slurm.sh [--clean]     start munged, slurmctld and one slurmd per node; wait until both
#                                        nodes are idle (at most SLURM_UP_TIMEOUT s, default 60)
#   .ci/services/slurm-stop.sh          stop what this script started
#
# Idempotent: when its daemons run and the cluster answers with both nodes up (and slurm.conf is
# unchanged), it does nothing; a daemon that died is started again. --clean starts slurmctld with -c (forget jobs and node state saved by an earlier run).
#
# Both slurmd run on 127.0.0.1, one per node name (slurmd -N n1 / -N n2) on their own ports 17001 and
# 17002, with their own spool directory, log and pid file (%n in slurm.conf). Pid files:
#   /run/dwmtest-munged.pid (only when this script started munged), /run/dwmtest-slurmctld.pid,
#   /run/dwmtest-slurmd-n1.pid, /run/dwmtest-slurmd-n2.pid.   Logs: /var/log/slurm/.
# Short requeue delay: AuthInfo=cred_expire=10 (a requeued job may start again 10 s after it ended;
# SLURM's default is 120 s).
set -euo pipefail

CONF=/etc/slurm/slurm.conf
NODES=(n1 n2)
TIMEOUT=${SLURM_UP_TIMEOUT:-60}
CLEAN=0
for a in "$@"; do
    case $a in
    --clean) CLEAN=1 ;;
    -h | --help)
        awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
        exit 0
        ;;
    *)
        echo "slurm.sh: unknown argument $a" >&2
        exit 2
        ;;
    esac
done

log() { echo "slurm.sh: $*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

# proc_is PID NAME: PID is a live (not zombie) process called NAME
proc_is() {
    local st
    st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$st" ] && [ "$st" != Z ] && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ]
}

# live_pids NAME: the pids of live processes called NAME (pgrep also lists zombies)
live_pids() {
    local p
    for p in $(pgrep -x "$1"); do
        proc_is "$p" "$1" && echo "$p"
    done
    return 0
}

# alive PIDFILE NAME: the pid in PIDFILE is a running process called NAME
alive() {
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] && proc_is "$pid" "$2"
}

ensure_packages() {
    local c missing=0
    for c in munged munge unmunge slurmctld slurmd sinfo srun sbatch scontrol; do
        command -v "$c" >/dev/null 2>&1 || [ -x "/usr/sbin/$c" ] || missing=1
    done
    [ $missing = 0 ] && return 0
    log "installing munge and slurm-wlm"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q munge slurm-wlm
}

ensure_hosts() { # n1 and n2 must resolve (MASTER_ADDR of a 2-node job is its first node name)
    local n
    for n in "${NODES[@]}"; do
        if ! getent hosts "$n" >/dev/null; then
            echo "127.0.0.1 $n" >>/etc/hosts
            log "added '127.0.0.1 $n' to /etc/hosts"
        fi
    done
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
        log "created /etc/munge/munge.key"
    fi
    local d
    for d in /run/munge /var/log/munge /var/lib/munge; do
        if [ ! -d $d ]; then
            mkdir -p $d
            chmod 0755 $d
        fi
        chown munge:munge $d
    done
    # (with no munged, `munge -n` retries for ~15 s before it fails: ask only a running one)
    if [ -n "$(live_pids munged)" ]; then
        munge_works && return 0
        die "munged is running (pid $(live_pids munged | tr '\n' ' ')) but 'munge -n | unmunge' fails"
    fi
    # --force: a socket left behind by a munged that died is not an error
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 50); do
        munge_works && break
        sleep 0.1
    done
    munge_works || die "munged does not answer (see /var/log/munge/munged.log)"
    cp /run/munge/munged.pid /run/dwmtest-munged.pid
    log "munged started (pid $(cat /run/dwmtest-munged.pid))"
}

write_conf() { # prints "changed" when slurm.conf was (re)written
    local tmp
    tmp=$(mktemp)
    cat >"$tmp" <<'EOF'
# Written by .ci/services/slurm.sh: a two-node test cluster on one host. Do not edit by hand.
ClusterName=dwmtest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
AuthType=auth/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/dwmtest-slurmctld.pid
SlurmdPidFile=/run/dwmtest-slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ReturnToService=2
JobRequeue=1
# timers suited to tests
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=20
KillWait=5
UnkillableStepTimeout=30
MinJobAge=300
InactiveLimit=0
Waittime=0
BatchStartTimeout=20
# scheduling: look at pending jobs every 2 s (a dependent or requeued job starts without a long wait);
# kill_invalid_depend: a job whose dependency can never be met (afterok on a failed job) is cancelled
# rather than left pending forever
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
DependencyParameters=kill_invalid_depend
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
PriorityType=priority/basic
# no accounting
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# two nodes on this host, one slurmd each (slurmd -N n1 / slurmd -N n2)
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=17001 CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=4000 State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=17002 CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
    mkdir -p /etc/slurm
    if cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
    else
        install -m 0644 "$tmp" "$CONF"
        rm -f "$tmp"
        echo changed
    fi
}

node_states() { timeout 15 sinfo -h -N -p debug -o '%N %t' 2>/dev/null; }

# both nodes answer and are usable (a busy node is fine: rerunning this script during a job is a no-op)
cluster_up() {
    local out n
    out=$(node_states) || return 1
    for n in "${NODES[@]}"; do
        grep -Eq "^$n (idle|mix|alloc|comp)\$" <<<"$out" || return 1
    done
}

stop_slurm_daemons() {
    local f name pid
    for f in slurmd-n1 slurmd-n2 slurmctld; do
        name=${f%%-*} f=/run/dwmtest-$f.pid
        [ -s "$f" ] || continue
        pid=$(cat "$f")
        if alive "$f" "$name"; then
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 100); do
                proc_is "$pid" "$name" || break
                sleep 0.1
            done
            ! proc_is "$pid" "$name" || kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$f"
    done
}

ensure_packages
ensure_hosts
start_munge
mkdir -p /var/log/slurm /var/spool/slurmctld /var/spool/slurmd/n1 /var/spool/slurmd/n2
changed=$(write_conf)

if [ -n "$changed" ]; then
    if alive /run/dwmtest-slurmctld.pid slurmctld || alive /run/dwmtest-slurmd-n1.pid slurmd ||
        alive /run/dwmtest-slurmd-n2.pid slurmd; then
        log "slurm.conf changed: restarting the slurm daemons"
        stop_slurm_daemons
    fi
elif [ $CLEAN = 0 ] && alive /run/dwmtest-slurmctld.pid slurmctld && alive /run/dwmtest-slurmd-n1.pid slurmd &&
    alive /run/dwmtest-slurmd-n2.pid slurmd && cluster_up; then
    log "cluster already up: $(node_states | tr '\n' ' ')"
    exit 0
fi

if [ $CLEAN = 1 ] && alive /run/dwmtest-slurmctld.pid slurmctld; then
    stop_slurm_daemons
fi

if ! alive /run/dwmtest-slurmctld.pid slurmctld; then
    [ -z "$(live_pids slurmctld)" ] || die "a slurmctld not started by this script runs (pid $(live_pids slurmctld | tr '\n' ' '))"
    if [ $CLEAN = 1 ]; then slurmctld -c; else slurmctld; fi
    for _ in $(seq 100); do
        alive /run/dwmtest-slurmctld.pid slurmctld && timeout 5 scontrol ping >/dev/null 2>&1 && break
        sleep 0.2
    done
    alive /run/dwmtest-slurmctld.pid slurmctld || die "slurmctld did not start; tail of /var/log/slurm/slurmctld.log:
$(tail -n 20 /var/log/slurm/slurmctld.log 2>/dev/null)"
    log "slurmctld started (pid $(cat /run/dwmtest-slurmctld.pid))"
fi

for n in "${NODES[@]}"; do
    if ! alive "/run/dwmtest-slurmd-$n.pid" slurmd; then
        slurmd -N "$n"
        for _ in $(seq 50); do
            alive "/run/dwmtest-slurmd-$n.pid" slurmd && break
            sleep 0.1
        done
        alive "/run/dwmtest-slurmd-$n.pid" slurmd || die "slurmd -N $n did not start; tail of /var/log/slurm/slurmd-$n.log:
$(tail -n 20 "/var/log/slurm/slurmd-$n.log" 2>/dev/null)"
        log "slurmd for $n started (pid $(cat "/run/dwmtest-slurmd-$n.pid"))"
    fi
done

deadline=$((SECONDS + TIMEOUT))
last_resume=-10
while :; do
    states=$(node_states || true)
    if cluster_up; then
        log "cluster up: $(tr '\n' ' ' <<<"$states")"
        exit 0
    fi
    # a node left down/drained by an earlier run: bring it back (ReturnToService=2 covers most cases)
    if grep -Eq ' (down|drain|drng|fail|failg|inval)' <<<"$states" && ((SECONDS - last_resume >= 5)); then
        scontrol update nodename=n1,n2 state=resume >/dev/null 2>&1 || true
        last_resume=$SECONDS
    fi
    if ((SECONDS >= deadline)); then
        log "ERROR: the nodes are not idle after ${TIMEOUT} s; sinfo says: $(tr '\n' ' ' <<<"$states")"
        for f in /var/log/slurm/slurmctld.log /var/log/slurm/slurmd-n1.log /var/log/slurm/slurmd-n2.log; do
            echo "--- tail of $f" >&2
            tail -n 15 "$f" >&2 2>/dev/null || true
        done
        exit 1
    fi
    sleep 1
done
