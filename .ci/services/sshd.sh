#!/usr/bin/env bash
# Two "hosts" on loopback reachable as root over ssh, for a DeepSpeed --hostfile launch (pdsh -R ssh):
#   dwmhost1 = 127.0.0.2:22, dwmhost2 = 127.0.0.3:22, one sshd each.
#
#   .ci/services/sshd.sh [--private DIR]                start both (idempotent)
#   .ci/services/sshd.sh --restart-host2 [--private DIR]  (re)start only dwmhost2's sshd
#   .ci/services/sshd-stop.sh                          stop both
#
# --private DIR: dwmhost2's sshd runs in its own mount namespace where DIR.host2 is bind-mounted on DIR,
# so a command run over ssh on dwmhost2 sees (and writes) DIR.host2 under the name DIR, while dwmhost1
# and this shell see the real DIR: node-local storage for tests. DIR and DIR.host2 are created if
# missing. sshd.sh --private DIR with another DIR than the running dwmhost2 has restarts dwmhost2;
# without --private a running dwmhost2 keeps its private directory, and --restart-host2 without
# --private gives it none. Sessions already open keep the namespace they started in.
#
# Each sshd also runs in its own UTS namespace, so `hostname` there prints dwmhost1 / dwmhost2.
# Pid files: /run/dwmtest-sshd-dwmhost1.pid, /run/dwmtest-sshd-dwmhost2.pid; configs and logs in
# /etc/ssh/dwmtest/ and /var/log/dwmtest-sshd-*.log. Remote commands get sshd's default PATH plus what
# root's ~/.bashrc adds (nothing from the caller's environment): run python by absolute path, as
# DeepSpeed does (sys.executable), and it exports PYTHON* variables itself.
set -euo pipefail

HOSTS=(dwmhost1 dwmhost2)
declare -A ADDR=([dwmhost1]=127.0.0.2 [dwmhost2]=127.0.0.3)
CONF_DIR=/etc/ssh/dwmtest
PRIVATE=""
RESTART2=0
while [ $# -gt 0 ]; do
    case $1 in
    --private)
        [ $# -ge 2 ] || {
            echo "sshd.sh: --private needs a directory" >&2
            exit 2
        }
        PRIVATE=$2
        shift 2
        ;;
    --private=*)
        PRIVATE=${1#--private=}
        shift
        ;;
    --restart-host2)
        RESTART2=1
        shift
        ;;
    -h | --help)
        awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
        exit 0
        ;;
    *)
        echo "sshd.sh: unknown argument $1" >&2
        exit 2
        ;;
    esac
done

log() { echo "sshd.sh: $*" >&2; }
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

pidfile() { echo "/run/dwmtest-sshd-$1.pid"; }

alive() { # alive HOST: the sshd recorded for HOST runs
    local f pid
    f=$(pidfile "$1")
    [ -s "$f" ] || return 1
    pid=$(cat "$f")
    [[ $pid =~ ^[0-9]+$ ]] && proc_is "$pid" sshd
}

stop_host() {
    local f pid
    f=$(pidfile "$1")
    if alive "$1"; then
        pid=$(cat "$f")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do
            proc_is "$pid" sshd || break
            sleep 0.1
        done
        ! proc_is "$pid" sshd || kill -9 "$pid" 2>/dev/null || true
        log "stopped $1's sshd (pid $pid)"
    fi
    rm -f "$f" "/run/dwmtest-sshd-$1.private"
}

ensure_packages() {
    local missing=()
    [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
    command -v ssh >/dev/null 2>&1 || missing+=(openssh-client)
    command -v pdsh >/dev/null 2>&1 || missing+=(pdsh)
    command -v unshare >/dev/null 2>&1 || missing+=(util-linux)
    ((${#missing[@]})) || return 0
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # no daemon autostart from the package scripts: a system sshd on *:22 would take our ports
    local policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        policy=1
    fi
    apt-get update -q
    apt-get install -y -q "${missing[@]}" || {
        [ $policy = 0 ] || rm -f /usr/sbin/policy-rc.d
        die "apt-get install ${missing[*]} failed"
    }
    [ $policy = 0 ] || rm -f /usr/sbin/policy-rc.d
}

ensure_hosts() {
    local h
    for h in "${HOSTS[@]}"; do
        if ! getent hosts "$h" >/dev/null; then
            echo "${ADDR[$h]} $h" >>/etc/hosts
            log "added '${ADDR[$h]} $h' to /etc/hosts"
        elif [ "$(getent hosts "$h" | awk '{print $1; exit}')" != "${ADDR[$h]}" ]; then
            die "$h resolves to $(getent hosts "$h" | awk '{print $1; exit}'), not ${ADDR[$h]} (see /etc/hosts)"
        fi
    done
}

ensure_keys() {
    mkdir -p /root/.ssh
    chmod 700 /root/.ssh
    [ -s /root/.ssh/id_ed25519 ] || ssh-keygen -q -t ed25519 -N '' -C "root@dwmtest" -f /root/.ssh/id_ed25519
    local pub
    pub=$(cat /root/.ssh/id_ed25519.pub)
    touch /root/.ssh/authorized_keys
    grep -qxF "$pub" /root/.ssh/authorized_keys || echo "$pub" >>/root/.ssh/authorized_keys
    chmod 600 /root/.ssh/authorized_keys
    # client options for the two hosts, first in ~/.ssh/config (ssh takes the first value it finds)
    local begin="# >>> dwmtest (.ci/services/sshd.sh)" end="# <<< dwmtest"
    local block
    block="$begin
Host dwmhost1 dwmhost2 127.0.0.2 127.0.0.3
    User root
    IdentityFile /root/.ssh/id_ed25519
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    BatchMode yes
    LogLevel ERROR
    ConnectTimeout 10
$end"
    touch /root/.ssh/config
    if ! grep -qxF "$begin" /root/.ssh/config; then
        { echo "$block"; cat /root/.ssh/config; } >/root/.ssh/config.new
        mv /root/.ssh/config.new /root/.ssh/config
    fi
    chmod 600 /root/.ssh/config
    ls /etc/ssh/ssh_host_*_key >/dev/null 2>&1 || ssh-keygen -A
    [ -s /etc/ssh/ssh_host_ed25519_key ] || ssh-keygen -A
}

write_conf() { # write_conf HOST
    local h=$1 f="$CONF_DIR/sshd-$1.conf" k
    mkdir -p "$CONF_DIR"
    {
        echo "# Written by .ci/services/sshd.sh: the sshd of test host $h"
        echo "ListenAddress ${ADDR[$h]}"
        echo "Port 22"
        echo "PidFile $(pidfile "$h")"
        for k in /etc/ssh/ssh_host_ed25519_key /etc/ssh/ssh_host_ecdsa_key /etc/ssh/ssh_host_rsa_key; do
            [ -s "$k" ] && echo "HostKey $k"
        done
        cat <<'EOF'
PermitRootLogin prohibit-password
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PrintMotd no
PrintLastLog no
UseDNS no
X11Forwarding no
MaxStartups 100:30:200
MaxSessions 100
AcceptEnv LANG LC_*
Subsystem sftp /usr/lib/openssh/sftp-server
EOF
        echo "SyslogFacility AUTH"
        echo "LogLevel INFO"
    } >"$f.new"
    /usr/sbin/sshd -t -f "$f.new" || die "sshd rejects $f.new"
    if cmp -s "$f.new" "$f"; then
        rm -f "$f.new"
    else
        mv "$f.new" "$f"
        echo changed
    fi
}

port_taken_by_other() { # some listener other than ours holds ADDR:22 or *:22
    local h=$1
    ss -Hltn "( sport = :22 )" 2>/dev/null | awk '{print $4}' |
        grep -Eq "^(0\.0\.0\.0|\*|\[::\]|${ADDR[$h]//./\\.}):22\$"
}

start_host() { # start_host HOST [PRIVATE_DIR]
    local h=$1 priv=${2:-} f conf="$CONF_DIR/sshd-$1.conf" log="/var/log/dwmtest-sshd-$1.log" inner
    f=$(pidfile "$h")
    rm -f "$f"
    if port_taken_by_other "$h"; then
        die "port 22 on ${ADDR[$h]} is already taken (ss -ltnp 'sport = :22': $(ss -Hltnp '( sport = :22 )' | tr -s ' ' | tr '\n' ';')); stop that sshd first"
    fi
    # -E: log to a file (there is no syslog here)
    inner="hostname $h && exec /usr/sbin/sshd -f $conf -E $log"
    if [ -n "$priv" ]; then
        mkdir -p "$priv" "$priv.host2"
        # a mount namespace of its own (mounts made here do not reach the host, later host mounts do
        # reach it): DIR.host2 appears at DIR
        unshare --uts --mount --propagation slave \
            bash -c "mount --bind \"\$1.host2\" \"\$1\" && $inner" _ "$priv"
        echo "$priv" >"/run/dwmtest-sshd-$h.private"
    else
        unshare --uts bash -c "$inner"
        rm -f "/run/dwmtest-sshd-$h.private"
    fi
    for _ in $(seq 50); do
        alive "$h" && break
        sleep 0.1
    done
    alive "$h" || die "sshd for $h did not start; tail of $log: $(tail -n 5 "$log" 2>/dev/null)"
    log "sshd for $h started on ${ADDR[$h]}:22 (pid $(cat "$f"))${priv:+, private $priv <- $priv.host2}"
}

current_private() { cat "/run/dwmtest-sshd-dwmhost2.private" 2>/dev/null || true; }

ensure_packages
ensure_hosts
ensure_keys
mkdir -p /run/sshd
chmod 0755 /run/sshd
if [ -n "$PRIVATE" ]; then
    mkdir -p "$PRIVATE"
    PRIVATE=$(cd "$PRIVATE" && pwd -P)
fi

for h in "${HOSTS[@]}"; do
    changed=$(write_conf "$h")
    if [ "$h" = dwmhost2 ]; then
        # without --private a running dwmhost2 keeps the private directory it has
        want_private=$PRIVATE
        [ -n "$PRIVATE" ] || [ $RESTART2 = 1 ] || want_private=$(current_private)
        if [ $RESTART2 = 1 ] || [ -n "$changed" ] || [ "$(current_private)" != "$want_private" ]; then
            stop_host "$h"
        fi
        alive "$h" || start_host "$h" "$want_private"
    else
        [ $RESTART2 = 1 ] && continue # --restart-host2 leaves dwmhost1 alone (unless it is down)
        [ -z "$changed" ] || stop_host "$h"
        alive "$h" || start_host "$h"
    fi
done
if [ $RESTART2 = 1 ] && ! alive dwmhost1; then
    start_host dwmhost1
fi

# both answer, non-interactively, with key authentication
for h in "${HOSTS[@]}"; do
    ok=0
    for _ in $(seq 20); do
        if ssh -o BatchMode=yes "$h" true </dev/null 2>/dev/null; then
            ok=1
            break
        fi
        sleep 0.25
    done
    [ $ok = 1 ] || die "ssh $h does not work: $(ssh -o BatchMode=yes "$h" true </dev/null 2>&1 | tail -n 3)"
done
priv=$(current_private)
log "dwmhost1 (pid $(cat "$(pidfile dwmhost1)")) and dwmhost2 (pid $(cat "$(pidfile dwmhost2)")${priv:+, private $priv}) answer over ssh"
