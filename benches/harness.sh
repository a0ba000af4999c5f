# shellcheck shell=bash
# What every benchmark script starts with: a throw-away PostgreSQL cluster with
# Offshoot in front of it, the clean-up, and the report's header. A script begins
#
#   set -euo pipefail
#   source "$(dirname "${BASH_SOURCE[0]}")/harness.sh"   sets BENCH_DIR, REPO_DIR; sources lib.sh
#
# defines usage(), then:
#
#   harness_args "$@"                  --help prints usage(); any other argument is an error
#   harness_init                       tools, the offshoot binary, temp dir, clean-up trap
#   harness_start_pg "key = value"...  initdb + start on a free 127.0.0.1 port
#   harness_psql DB -c SQL             psql straight to that cluster
#   harness_start_offshoot TOML        start the proxy; TOML holds [sources.*] etc.
#   harness_admin PATH                 GET from the admin HTTP endpoint
#   harness_api METHOD PATH [curl...]  a write to the admin API (token, JSON)
#   harness_metric NAME LABEL...       a metric's value from /metrics
#   harness_describe                   machine, versions, load average: the report's header
#   harness_report TEXT                write RESULTS_FILE, print it, show the proxy's warnings
#
# It sets BENCH_TMP, PG_BIN, PSQL, PG_PORT, PGDATA_DIR, OFFSHOOT_BIN, OFFSHOOT_PID,
# PROXY_PORT and ADMIN_PORT. On exit it stops the proxy (SIGTERM), then
# PostgreSQL, then removes the temp dir (KEEP_TMP=1 keeps it); when the script
# failed it prints the tail of every log in HARNESS_LOGS first (names in the temp
# dir; scripts add their own). A script that starts more processes defines
# harness_on_exit, which runs first.
#
# One benchmark runs at a time: harness_init takes a lock (BENCH_LOCK, default
# $TMPDIR/offshoot-bench.lock, holding the owner's pid) and refuses to start while a
# live process holds it, since figures taken beside another benchmark measure both.
# The load average at the start and at the end goes into every report.

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$BENCH_DIR")
# shellcheck source=benches/lib.sh
source "$BENCH_DIR/lib.sh"

# The scripts take no arguments but --help (settings come from the environment).
harness_args() {
    case "${1:-}" in
    -h | --help)
        usage
        exit 0
        ;;
    "") ;;
    *)
        usage >&2
        die "unknown argument: $1"
        ;;
    esac
}

# Checks the tools, finds or builds offshoot (OFFSHOOT_BIN skips the build), makes
# the temp dir and installs the clean-up trap. $1 names the script in the temp dir.
harness_init() {
    local name=$1
    OFFSHOOT_PID=""
    PG_STARTED=0
    BENCH_TMP=""
    HARNESS_LOGS=(offshoot.log postgres.log)
    trap _harness_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    bench_lock "$name"
    HARNESS_LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || true)
    PG_BIN=$(find_pg_bin)
    local tool
    for tool in initdb pg_ctl postgres psql; do
        [[ -x "$PG_BIN/$tool" ]] || die "$tool not found in PG_BIN='$PG_BIN'; set PG_BIN to PostgreSQL's bin directory"
    done
    PSQL="$PG_BIN/psql"
    if [[ $EUID -eq 0 ]]; then
        id postgres >/dev/null 2>&1 || die "running as root, but there is no 'postgres' user to run PostgreSQL as"
        command -v runuser >/dev/null 2>&1 || die "running as root, but runuser (util-linux) is missing"
    fi
    command -v curl >/dev/null 2>&1 || die "curl is needed to read the admin endpoint"
    command -v setsid >/dev/null 2>&1 || die "setsid (util-linux) is needed to start offshoot in a session of its own"

    HARNESS_PREBUILT=0
    if [[ -n ${OFFSHOOT_BIN:-} ]]; then
        [[ -x $OFFSHOOT_BIN ]] || die "OFFSHOOT_BIN=$OFFSHOOT_BIN is not an executable"
        log "Offshoot: using $OFFSHOOT_BIN (not building)"
        HARNESS_PREBUILT=1
    else
        command -v cargo >/dev/null 2>&1 || die "cargo not found; install Rust or set OFFSHOOT_BIN"
        log "Offshoot: cargo build --release"
        (cd "$REPO_DIR" && cargo build --release >&2) || die "cargo build --release failed"
        OFFSHOOT_BIN="$REPO_DIR/target/release/offshoot"
        [[ -x $OFFSHOOT_BIN ]] || die "the build did not produce $OFFSHOOT_BIN"
    fi

    # Connection settings come from the command line only.
    while read -r var; do unset "$var"; done < <(compgen -e | grep -E '^PG[A-Z]+$' || true)
    export PGSSLMODE=disable PGGSSENCMODE=disable
    export RUST_LOG=${RUST_LOG:-info}

    BENCH_TMP=$(mktemp -d -t "offshoot-$name.XXXXXX")
    # A Unix socket path must fit in 107 bytes.
    ((${#BENCH_TMP} < 80)) || die "temp dir path $BENCH_TMP is too long for a Unix socket; set TMPDIR=/tmp"
    mkdir -p "$BENCH_TMP/sock"
    if [[ $EUID -eq 0 ]]; then
        chown -R postgres: "$BENCH_TMP"
        # Offshoot started as root drops to its own user (process.user), which must
        # reach its state dir in here; mktemp made the dir 0700.
        chmod 711 "$BENCH_TMP"
    fi
    log "Temp dir: $BENCH_TMP"
}

_harness_show_log() {
    [[ -s $1 ]] || return 0
    log "---- last lines of $1 ----"
    tail -n 25 "$1" >&2
}

_harness_cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    declare -F harness_on_exit >/dev/null && harness_on_exit
    if [[ -n $OFFSHOOT_PID ]]; then
        if kill -0 "$OFFSHOOT_PID" 2>/dev/null; then
            stop_process "$OFFSHOOT_PID" TERM 20 offshoot
            wait "$OFFSHOOT_PID"
            local status=$?
            ((status == 0)) || warn "offshoot exited with status $status after SIGTERM"
        else
            wait "$OFFSHOOT_PID"
            warn "offshoot had already exited (status $?)"
            ((rc != 0)) || rc=1
        fi
    fi
    if ((PG_STARTED)); then
        as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -m fast -w -t 60 stop >/dev/null 2>&1 ||
            as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -m immediate -w stop >/dev/null 2>&1
    fi
    if [[ -n $BENCH_TMP ]]; then
        if ((rc != 0)); then
            local name
            for name in "${HARNESS_LOGS[@]}"; do
                _harness_show_log "$BENCH_TMP/$name"
            done
        fi
        if [[ ${KEEP_TMP:-0} == 1 ]]; then
            log "Kept $BENCH_TMP (KEEP_TMP=1)"
        else
            rm -rf "$BENCH_TMP"
        fi
    fi
    bench_unlock
    exit "$rc"
}

# initdb and start a cluster on 127.0.0.1 (trust authentication, fsync off). The
# arguments are extra postgresql.conf lines. Returns 1 (after printing the log)
# when the server does not start, so a caller may retry with other settings after
# harness_stop_pg.
harness_start_pg() {
    PG_PORT=$(free_port)
    PGDATA_DIR="$BENCH_TMP/data"
    if [[ ! -d $PGDATA_DIR ]]; then
        log "PostgreSQL: initdb"
        as_pg "$PG_BIN/initdb" -D "$PGDATA_DIR" --auth=trust -U postgres -E UTF8 --no-locale --no-sync \
            >"$BENCH_TMP/initdb.log" 2>&1 || {
            _harness_show_log "$BENCH_TMP/initdb.log"
            die "initdb failed"
        }
        cp "$PGDATA_DIR/postgresql.conf" "$BENCH_TMP/postgresql.conf.orig"
    fi
    {
        cat "$BENCH_TMP/postgresql.conf.orig"
        echo
        echo "# offshoot benches/harness.sh"
        echo "listen_addresses = '127.0.0.1'"
        echo "port = $PG_PORT"
        echo "unix_socket_directories = '$BENCH_TMP/sock'"
        echo "fsync = off"
        printf '%s\n' "$@"
    } >"$PGDATA_DIR/postgresql.conf"
    log "PostgreSQL: starting on 127.0.0.1:$PG_PORT ($*)"
    PG_STARTED=1
    if ! as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -l "$BENCH_TMP/postgres.log" -w -t 120 start >/dev/null; then
        _harness_show_log "$BENCH_TMP/postgres.log"
        return 1
    fi
}

# Stops the cluster started by harness_start_pg (its data directory stays).
harness_stop_pg() {
    ((PG_STARTED)) || return 0
    as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -m fast -w -t 60 stop >/dev/null 2>&1 ||
        as_pg "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -m immediate -w stop >/dev/null 2>&1
    PG_STARTED=0
}

# psql straight to the cluster: harness_psql DB [psql arguments...]
harness_psql() {
    local db=$1
    shift
    "$PSQL" -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres -d "$db" "$@"
}

# Starts offshoot on free ports with the listen addresses and state dir filled in;
# $1 is the rest of the configuration (sources, reaper, ...).
harness_start_offshoot() {
    PROXY_PORT=$(free_port)
    ADMIN_PORT=$(free_port)
    local conf="$BENCH_TMP/offshoot.toml"
    cat >"$conf" <<EOF
[proxy]
listen = "127.0.0.1:$PROXY_PORT"

[admin]
listen = "127.0.0.1:$ADMIN_PORT"
# Loopback only: reads (metrics, health, lists) need no token; writes use
# harness_api, which sends the one serve makes in state.dir.
public_read = true

[state]
dir = "$BENCH_TMP/state"

# The benchmark clusters trust local connections, as PgBouncer's set-up does.
[auth]
method = "trust"

$1
EOF
    "$OFFSHOOT_BIN" check --config "$conf" >/dev/null || die "offshoot rejected the generated configuration $conf"
    log "Offshoot: listening on 127.0.0.1:$PROXY_PORT (admin 127.0.0.1:$ADMIN_PORT)"
    # In a session of its own, as PostgreSQL (pg_ctl) and a daemonized PgBouncer
    # are: with the kernel's autogroup scheduling, a process shares its CPU share
    # with its session, and a proxy in the script's session would be scheduled as
    # one group with pgbench. (setsid execs in place here: the pid stays the proxy's.)
    setsid "$OFFSHOOT_BIN" serve --config "$conf" >"$BENCH_TMP/offshoot.log" 2>&1 &
    OFFSHOOT_PID=$!
    wait_for_port "$PROXY_PORT" 30 "$OFFSHOOT_PID" offshoot || die "offshoot did not start (see its log below)"
    wait_for_port "$ADMIN_PORT" 10 "$OFFSHOOT_PID" "offshoot admin" || die "offshoot's admin endpoint did not start"
}

# GET http://<admin>$1, body on stdout; fails on an HTTP error.
harness_admin() {
    curl -fsS --max-time 10 "http://127.0.0.1:$ADMIN_PORT$1"
}

# $1 (POST, DELETE) http://<admin>$2 with the admin token and a JSON content type;
# further arguments go to curl (-d BODY, --max-time N). Body on stdout; fails on
# an HTTP error.
harness_api() {
    local method=$1 path=$2
    shift 2
    curl -fsS --max-time 600 -X "$method" \
        -H "Authorization: Bearer $(cat "$BENCH_TMP/state/admin.token")" \
        -H 'Content-Type: application/json' "$@" "http://127.0.0.1:$ADMIN_PORT$path"
}

# Prints the sum of the samples of metric $1 on the proxy's /metrics whose labels
# include every further argument, written as they are exposed: 'reason="idle"'.
# Prints nothing when no sample matches.
harness_metric() {
    local name=$1
    shift
    harness_admin /metrics | awk -v name="$name" -v want="$*" '
        BEGIN { n = split(want, w, " ") }
        $1 == name || index($1, name "{") == 1 {
            for (i = 1; i <= n; i++) if (index($1, w[i]) == 0) next
            sum += $2; found = 1
        }
        END { if (found) print sum }'
}

# Writes report $1 to RESULTS_FILE (whole or not at all) and stdout, then shows
# the proxy's warnings and errors, if it logged any.
harness_report() {
    mkdir -p "$(dirname "$RESULTS_FILE")"
    printf '%s\n' "$1" >"$RESULTS_FILE.tmp"
    mv "$RESULTS_FILE.tmp" "$RESULTS_FILE"
    echo "$1"
    log "Report written to $RESULTS_FILE"
    if grep -q -E '\b(WARN|ERROR)\b' "$BENCH_TMP/offshoot.log"; then
        log "---- WARN/ERROR lines of the proxy's log ----"
        grep -m 20 -E '\b(WARN|ERROR)\b' "$BENCH_TMP/offshoot.log" >&2 || true
    fi
}

# Prints machine, PostgreSQL and offshoot versions as Markdown list items.
harness_describe() {
    local cpu_model mem_total git_rev
    cpu_model=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || true)
    mem_total=$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo 2>/dev/null || true)
    git_rev=$(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || true)
    if [[ -n $git_rev ]] && [[ -n $(git -C "$REPO_DIR" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
        git_rev+=" (with uncommitted changes)"
    fi
    # A binary given in OFFSHOOT_BIN need not be built from the work tree.
    ((HARNESS_PREBUILT)) && git_rev=""
    echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- Machine: $(nproc) CPUs, ${cpu_model:-$(uname -m)}, ${mem_total:-? GiB} RAM, Linux $(uname -r)"
    echo "- Load average (1, 5, 15 min) when the script started: ${HARNESS_LOADAVG:-?}; at the report: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?') (anything else running on the machine skews the figures)"
    echo "- $("$PG_BIN/postgres" --version); $("$OFFSHOOT_BIN" --version 2>/dev/null || echo offshoot)${git_rev:+ built at $git_rev}$( ((HARNESS_PREBUILT)) && echo " (OFFSHOOT_BIN=$OFFSHOOT_BIN)")"
}
