#!/usr/bin/env bash
# Stop what .ci/services/slurm.sh started, by the pids it recorded: the two slurmd, slurmctld, and munged
# when slurm.sh started it (/run/dwmtest-munged.pid). --keep-munge leaves munged running.
# Saved job and node state stays in /var/spool/slurmctld (slurm.sh --clean starts without it).
set -uo pipefail

KEEP_MUNGE=0
[ "${1:-}" = --keep-munge ] && KEEP_MUNGE=1

# proc_is PID NAME: PID is a live (not zombie) process called NAME
proc_is() {
    local st
    st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$st" ] && [ "$st" != Z ] && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ]
}

# stop PIDFILE NAME: TERM the process if the pid file names a running NAME, wait up to 10 s, then KILL
stop() {
    local f=$1 name=$2 pid
    [ -s "$f" ] || return 0
    pid=$(cat "$f")
    if [[ $pid =~ ^[0-9]+$ ]] && proc_is "$pid" "$name"; then
        kill "$pid" 2>/dev/null
        for _ in $(seq 100); do
            proc_is "$pid" "$name" || break
            sleep 0.1
        done
        if proc_is "$pid" "$name"; then
            kill -9 "$pid" 2>/dev/null
            echo "slurm-stop.sh: killed $name (pid $pid) with SIGKILL" >&2
        else
            echo "slurm-stop.sh: stopped $name (pid $pid)" >&2
        fi
    fi
    rm -f "$f"
}

stop /run/dwmtest-slurmd-n1.pid slurmd
stop /run/dwmtest-slurmd-n2.pid slurmd
stop /run/dwmtest-slurmctld.pid slurmctld
[ $KEEP_MUNGE = 1 ] || stop /run/dwmtest-munged.pid munged
exit 0
