#!/usr/bin/env bash
# Stop the two sshd that .ci/services/sshd.sh started (dwmhost1, dwmhost2), by their pid files. Sessions
# already open are left to end by themselves.
set -uo pipefail

# proc_is PID NAME: PID is a live (not zombie) process called NAME
proc_is() {
    local st
    st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$st" ] && [ "$st" != Z ] && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ]
}

for h in dwmhost1 dwmhost2; do
    f=/run/dwmtest-sshd-$h.pid
    if [ -s "$f" ]; then
        pid=$(cat "$f")
        if [[ $pid =~ ^[0-9]+$ ]] && proc_is "$pid" sshd; then
            kill "$pid" 2>/dev/null
            for _ in $(seq 50); do
                proc_is "$pid" sshd || break
                sleep 0.1
            done
            ! proc_is "$pid" sshd || kill -9 "$pid" 2>/dev/null
            echo "sshd-stop.sh: stopped $h's sshd (pid $pid)" >&2
        fi
    fi
    rm -f "$f" "/run/dwmtest-sshd-$h.private"
done
exit 0
