# shellcheck shell=bash
# Helpers shared by the end-to-end benchmark scripts in benches/.
# Source it; it defines functions only and changes no shell options.

# Messages go to stderr so that stdout carries only the result table.
log() { printf '%s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# True when $1 is a non-negative integer.
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

# One benchmark at a time: figures taken beside another benchmark measure both.
# The lock file (BENCH_LOCK, default $TMPDIR/offshoot-bench.lock) holds
# "<pid> <name>" of its owner.
BENCH_LOCK=${BENCH_LOCK:-${TMPDIR:-/tmp}/offshoot-bench.lock}
BENCH_LOCKED=0

_bench_claim() {
    (
        set -o noclobber
        echo "$$ $1" >"$BENCH_LOCK"
    ) 2>/dev/null
}

# Takes the lock for benchmark $1, or dies naming the benchmark that holds it. A
# lock whose process is gone (a script killed with -9) is taken over. The script's
# EXIT trap must call bench_unlock.
bench_lock() {
    local holder="" what=""
    if ! _bench_claim "$1"; then
        read -r holder what <"$BENCH_LOCK" 2>/dev/null || true
        if [[ -n $holder ]] && kill -0 "$holder" 2>/dev/null; then
            die "another benchmark is running (${what:-?}, pid $holder, lock $BENCH_LOCK); figures taken beside it would measure both"
        fi
        warn "taking over the lock $BENCH_LOCK of pid ${holder:-?}, which is gone"
        rm -f "$BENCH_LOCK"
        _bench_claim "$1" || die "could not take the benchmark lock $BENCH_LOCK"
    fi
    BENCH_LOCKED=1
}

# Releases the lock if this script holds it.
bench_unlock() {
    if ((BENCH_LOCKED)) && [[ $(cut -d' ' -f1 "$BENCH_LOCK" 2>/dev/null) == "$$" ]]; then
        rm -f "$BENCH_LOCK"
    fi
    BENCH_LOCKED=0
}

# Dies unless each variable named is a positive integer.
require_positive() {
    local var
    for var in "$@"; do
        if ! is_uint "${!var}" || ((${!var} == 0)); then
            die "$var must be a positive integer, got '${!var}'"
        fi
    done
}

# Runs a command as the `postgres` system user when we are root (PostgreSQL and
# PgBouncer refuse to run as root), otherwise as ourselves. It runs in $BENCH_TMP
# so that the user can always read its working directory.
as_pg() {
    if [[ $EUID -eq 0 ]]; then
        (cd "${BENCH_TMP:-/}" && runuser -u postgres -- "$@")
    else
        "$@"
    fi
}

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Prints a TCP port nobody listens on, below the kernel's ephemeral range so that
# outgoing connections (pgbench -C opens thousands) never hold it. Ports handed out
# before by this function are not handed out again.
_FREE_PORTS_GIVEN=" "
free_port() {
    local low=32768 port i
    if [[ -r /proc/sys/net/ipv4/ip_local_port_range ]]; then
        read -r low _ </proc/sys/net/ipv4/ip_local_port_range
    fi
    ((low > 11000)) || low=32768
    local listening=""
    if command -v ss >/dev/null 2>&1; then
        listening=" $(ss -Htln 2>/dev/null | awk '{n = split($4, a, ":"); printf "%s ", a[n]}') "
    fi
    for ((i = 0; i < 200; i++)); do
        port=$((10000 + RANDOM % (low - 10000)))
        [[ $_FREE_PORTS_GIVEN == *" $port "* || $listening == *" $port "* ]] && continue
        port_open "$port" && continue
        _FREE_PORTS_GIVEN+="$port "
        echo "$port"
        return 0
    done
    die "no free TCP port found on 127.0.0.1"
}

# Waits until 127.0.0.1:$1 accepts connections. $2: timeout in seconds; $3: pid
# that must stay alive meanwhile (optional); $4: what is being waited for.
wait_for_port() {
    local port=$1 secs=$2 pid=${3:-} what=${4:-"port $1"} i
    for ((i = 0; i < secs * 10; i++)); do
        port_open "$port" && return 0
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            return 1
        fi
        sleep 0.1
    done
    warn "$what did not accept connections on 127.0.0.1:$port within ${secs}s"
    return 1
}

# Prints the user and the system (kernel) CPU time of process $1 (all of its
# threads), in clock ticks, as "USER SYSTEM": fields 14 and 15 of /proc/<pid>/stat.
# The command name (field 2) may hold spaces and parentheses, so fields are counted
# from the last ')'.
proc_cpu_split() {
    local stat rest
    { stat=$(<"/proc/$1/stat"); } 2>/dev/null || return 1
    rest=${stat##*) }
    local -a f
    read -ra f <<<"$rest"
    # f[0] is field 3 (state), so field 14 is f[11] and field 15 is f[12].
    echo "${f[11]} ${f[12]}"
}

# Prints the user+system CPU time of process $1, in clock ticks.
proc_cpu_ticks() {
    local split
    split=$(proc_cpu_split "$1") || return 1
    echo $((${split% *} + ${split#* }))
}

# Prints the median of the numeric arguments; prints nothing when there are none.
median() {
    (($# > 0)) || return 0
    printf '%s\n' "$@" | sort -g | awk '
        { v[NR] = $1 }
        END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# Stops process $1 with signal $2, waiting up to $3 seconds before SIGKILL.
# $4 names it in messages. Returns 1 when SIGKILL was needed.
stop_process() {
    local pid=$1 sig=$2 secs=$3 what=$4 i
    kill -0 "$pid" 2>/dev/null || return 0
    kill "-$sig" "$pid" 2>/dev/null || return 0
    for ((i = 0; i < secs * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    warn "$what (pid $pid) still running ${secs}s after SIG$sig; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    return 1
}

# Prints VmRSS of process $1 in KiB (from /proc/<pid>/status); fails when it is gone.
proc_rss_kib() {
    awk '/^VmRSS:/ { print $2; found = 1 } END { exit !found }' "/proc/$1/status" 2>/dev/null
}

# Prints PostgreSQL's bin directory: $PG_BIN when set, else `pg_config --bindir`,
# else the newest /usr/lib/postgresql/<version>/bin.
find_pg_bin() {
    if [[ -n ${PG_BIN:-} ]]; then
        echo "$PG_BIN"
    elif command -v pg_config >/dev/null 2>&1 && [[ -x "$(pg_config --bindir)/initdb" ]]; then
        pg_config --bindir
    else
        printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1
    fi
}

# Installs Debian packages $2... unless command $1 is already there. Only as root
# with apt-get; the package's services are not started (policy-rc.d says no while
# it runs, unless the machine already has a policy-rc.d, which is left alone).
# Returns 1 when the command is still missing afterwards.
apt_install_missing() {
    local cmd=$1
    shift
    command -v "$cmd" >/dev/null 2>&1 && return 0
    if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        warn "$cmd is missing; install $* (needs root and apt-get)"
        return 1
    fi
    log "Installing $* with apt-get (for $cmd)"
    local policy=/usr/sbin/policy-rc.d own_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && own_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
    local rc=$?
    ((own_policy)) && rm -f "$policy"
    ((rc == 0)) || warn "apt-get install $* failed (status $rc)"
    command -v "$cmd" >/dev/null 2>&1
}

# Prints the path of a Python that has psycopg 3: a venv under
# ~/.cache/offshoot-bench, made (python3 -m venv, pip install "psycopg[binary]") on
# first use. Set BENCH_PYTHON to use another interpreter that has psycopg.
bench_python() {
    if [[ -n ${BENCH_PYTHON:-} ]]; then
        echo "$BENCH_PYTHON"
        return 0
    fi
    local venv="${XDG_CACHE_HOME:-$HOME/.cache}/offshoot-bench/venv"
    if ! "$venv/bin/python" -c 'import psycopg' >/dev/null 2>&1; then
        command -v python3 >/dev/null 2>&1 || die "python3 is needed for the benchmark clients"
        log "Python: creating $venv with psycopg 3"
        python3 -m venv "$venv" >&2 || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
        "$venv/bin/pip" install -q "psycopg[binary]>=3.1" >&2 || die "pip install psycopg[binary] failed"
    fi
    echo "$venv/bin/python"
}
