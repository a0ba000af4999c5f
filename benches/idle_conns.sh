#!/usr/bin/env bash
# Memory of the proxy per idle client connection: its RSS with 0, 1,000 and
# 10,000 idle sessions to one branch. `bash benches/idle_conns.sh --help` explains it.
set -euo pipefail

# shellcheck source=benches/harness.sh
source "$(dirname "${BASH_SOURCE[0]}")/harness.sh"

usage() {
    cat <<'EOF'
Usage: bash benches/idle_conns.sh [--help]

Measures the resident memory (VmRSS in /proc/<pid>/status) of the Offshoot
process with 0, 1,000 and 10,000 idle client connections to one branch.

Offshoot does not pool: each client session is a PostgreSQL backend too. So the
script starts a throw-away cluster with max_connections = the largest level + 100
(shared_buffers 128MB, fsync off), and every connection is a complete session:
client -> proxy -> PostgreSQL backend, startup and authentication done,
ReadyForQuery received, then silence. benches/idle_client.py (psycopg 3,
asyncio) opens them CONCURRENCY at a time, watches MemAvailable, and samples the
proxy at each level after SETTLE seconds (median of three samples 1 s apart).
Then it closes them all, waits until the proxy counts none (/healthz), samples
again, and repeats the top level ROUNDS - 1 more times as a leak check.
Only the proxy's RSS is reported per connection; PostgreSQL's backends are what
make 10,000 sessions expensive, and MemAvailable shows their cost for the machine.

If PostgreSQL does not start with that many connections, the script falls back
to FALLBACK_LEVELS, says so, and the report states what was measured. If
opening stops early (MemAvailable below MIN_AVAILABLE_MIB, or connections
failing), the level reports how many were open. The proxy needs two file
descriptors per session: when `ulimit -n` cannot be raised far enough (the script
tries 65536), the top level is lowered to what fits, with a note.

The Markdown section goes to stdout and to RESULTS_FILE; progress to stderr.
Everything started is stopped on exit. Only 127.0.0.1 is used.

Environment:
  LEVELS="0 1000 10000"      connection counts to measure at, ascending
  FALLBACK_LEVELS="0 1000 2000"
  CONCURRENCY=50             connections opened at once
  SETTLE=3                   seconds to wait before sampling a level
  ROUNDS=2                   rounds of opening and closing the top level; RSS
                             growing from round to round would be a leak
  MIN_AVAILABLE_MIB=2048     stop opening connections below this MemAvailable
  NOFILE_CLAMP=1             lower the top level to what the open-file limit allows
                             (2 descriptors per session in the proxy); 0: try anyway,
                             to see how the proxy behaves when it runs out
  RESULTS_FILE               default: benches/results/idle.md
  OFFSHOOT_BIN, PG_BIN, BENCH_PYTHON, KEEP_TMP, RUST_LOG: as in benches/load.sh

Example: LEVELS="0 100 500" bash benches/idle_conns.sh
EOF
}

harness_args "$@"

LEVELS=${LEVELS:-"0 1000 10000"}
FALLBACK_LEVELS=${FALLBACK_LEVELS:-"0 1000 2000"}
CONCURRENCY=${CONCURRENCY:-50}
SETTLE=${SETTLE:-3}
MIN_AVAILABLE_MIB=${MIN_AVAILABLE_MIB:-2048}
ROUNDS=${ROUNDS:-2}
NOFILE_CLAMP=${NOFILE_CLAMP:-1}
RESULTS_FILE=${RESULTS_FILE:-$BENCH_DIR/results/idle.md}
for var in CONCURRENCY SETTLE MIN_AVAILABLE_MIB ROUNDS; do
    is_uint "${!var}" || die "$var must be a non-negative integer, got '${!var}'"
done
((CONCURRENCY > 0)) || die "CONCURRENCY must be positive"
((ROUNDS > 0)) || die "ROUNDS must be positive"
[[ $NOFILE_CLAMP == [01] ]] || die "NOFILE_CLAMP must be 0 or 1, got '$NOFILE_CLAMP'"

# Prints the largest of the levels in $1, checking them on the way.
max_level() {
    local l max=0
    for l in $1; do
        is_uint "$l" || die "levels must be non-negative integers, got '$l'"
        ((l > max)) && max=$l
    done
    ((max > 0)) || die "no positive level in '$1'"
    echo "$max"
}
MAX_LEVEL=$(max_level "$LEVELS")
FALLBACK_MAX=$(max_level "$FALLBACK_LEVELS")

# The proxy holds two sockets per session (client and server): raise the
# descriptor limit it inherits. Where the hard limit cannot be raised (no
# CAP_SYS_RESOURCE), the top level is lowered to what fits, and the report says so.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
NOTE=""
if [[ $NOFILE != unlimited ]] && ((2 * MAX_LEVEL + 200 > NOFILE)); then
    fits=$(((NOFILE - 200) / 2 / 100 * 100))
    if [[ $NOFILE_CLAMP == 1 ]]; then
        NOTE="The open-file limit here is $NOFILE and cannot be raised (ulimit -n 65536 failed), and the proxy needs two descriptors per session, so the top level is $fits connections instead of $MAX_LEVEL."
        warn "$NOTE"
        new_levels=""
        for l in $LEVELS; do
            ((l > fits)) && l=$fits
            [[ " $new_levels " == *" $l "* ]] || new_levels+="${new_levels:+ }$l"
        done
        LEVELS=$new_levels
        MAX_LEVEL=$fits
    else
        warn "open-file limit $NOFILE: the proxy will run out of descriptors before $MAX_LEVEL sessions (NOFILE_CLAMP=0)"
    fi
fi

harness_init idle
PYTHON=$(bench_python)

# --- Cluster and proxy --------------------------------------------------------

pg_settings() {
    echo "max_connections = $(($1 + 100))"
    echo "shared_buffers = '128MB'"
}
mapfile -t settings < <(pg_settings "$MAX_LEVEL")
if ! harness_start_pg "${settings[@]}"; then
    NOTE+="${NOTE:+ }PostgreSQL did not start with max_connections = $((MAX_LEVEL + 100)) (see its log above), so levels $FALLBACK_LEVELS were measured instead of $LEVELS."
    warn "$NOTE"
    harness_stop_pg
    LEVELS=$FALLBACK_LEVELS
    MAX_LEVEL=$FALLBACK_MAX
    mapfile -t settings < <(pg_settings "$MAX_LEVEL")
    harness_start_pg "${settings[@]}" || die "PostgreSQL did not start with max_connections = $((MAX_LEVEL + 100)) either"
fi
harness_psql postgres -c 'CREATE DATABASE src' || die "cannot create database src"
harness_psql src -c 'CREATE TABLE t (id int PRIMARY KEY)' || die "cannot fill database src"

export OFFSHOOT__PROXY__MAX_CONNECTIONS=$((MAX_LEVEL + 100))
harness_start_offshoot "[sources.src]
server = \"host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres\"
database = \"src\"
idle_expire = \"1h\""

# Create the branch first, so that no level includes the clone's creation.
clone=$("$PSQL" -X -At -h 127.0.0.1 -p "$PROXY_PORT" -U postgres -d src.idle -c 'SELECT current_database()') ||
    die "cannot connect to src.idle through offshoot"
log "Offshoot: src.idle is database $clone"

# --- Measure ------------------------------------------------------------------

RUN_TIMEOUT=$((MAX_LEVEL / 10 + 600))
timeout -k 10 "$RUN_TIMEOUT" "$PYTHON" "$BENCH_DIR/idle_client.py" run \
    --port "$PROXY_PORT" --admin-port "$ADMIN_PORT" --proxy-pid "$OFFSHOOT_PID" --db src.idle \
    --pg-port "$PG_PORT" --clone "$clone" \
    --levels "$LEVELS" --concurrency "$CONCURRENCY" --settle "$SETTLE" \
    --min-available-mib "$MIN_AVAILABLE_MIB" --rounds "$ROUNDS" --out "$BENCH_TMP/idle.json" ||
    die "the idle client failed (status $?)"
kill -0 "$OFFSHOOT_PID" 2>/dev/null || die "offshoot is no longer running (see its log below)"
TABLE=$("$PYTHON" "$BENCH_DIR/idle_client.py" report --result "$BENCH_TMP/idle.json")
warn_lines=$(grep -cE '\b(WARN|ERROR)\b' "$BENCH_TMP/offshoot.log" || true)

REPORT=$(
    cat <<EOF
## Idle connections: proxy memory

$(harness_describe)
- What was measured: the VmRSS of the offshoot process (/proc/<pid>/status; median of three samples 1 s apart, ${SETTLE}s after the last connection of a level opened) with the given number of **idle client sessions** to one branch (\`src.idle\`, created before the baseline). Every session is complete end to end: client → proxy → its own PostgreSQL backend, startup and trust authentication done, ReadyForQuery received, then no traffic. Offshoot does not pool, so N sessions are N backends: PostgreSQL ran with max_connections = $((MAX_LEVEL + 100)), shared_buffers = 128MB, fsync off.
- Levels: $LEVELS, then the top level closed, reopened and closed again, $ROUNDS rounds in all (a leak check); opened $CONCURRENCY at a time by \`benches/idle_client.py\` (psycopg $("$PYTHON" -c 'import psycopg; print(psycopg.__version__)'), asyncio, one process) over TCP on 127.0.0.1; opening stops early if MemAvailable falls below $MIN_AVAILABLE_MIB MiB.
- Proxy: default settings except proxy.max_connections = $((MAX_LEVEL + 100)); relay threads = one per core ($(nproc)).
- MemAvailable is the whole machine's (PostgreSQL backends, the Python client and the proxy).${NOTE:+
- **$NOTE**}

$TABLE

WARN/ERROR lines in the proxy's log: $warn_lines.
EOF
)

harness_report "$REPORT"
