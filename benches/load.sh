#!/usr/bin/env bash
# Load test: 1,000 concurrent clients over 20 branches created on first connect,
# then a check that every branch expires on schedule once they are gone.
# `bash benches/load.sh --help` explains it.
set -euo pipefail

# shellcheck source=benches/harness.sh
source "$(dirname "${BASH_SOURCE[0]}")/harness.sh"

usage() {
    cat <<'EOF'
Usage: bash benches/load.sh [--help]

Starts a throw-away PostgreSQL cluster (max_connections = CLIENTS + 100, fsync
off) with a source database `src` (table accounts, ROWS rows) and Offshoot in
front of it (source `src`: idle_expire = IDLE_EXPIRE s, max_branches = 50;
reaper interval = REAPER_INTERVAL s). Then:

1. CLIENTS psycopg 3 connections (benches/load_client.py, asyncio, WORKERS
   processes) to src.load-00 ... src.load-NN, BRANCHES branches, all opened at
   once: the first connections to each branch wait while the proxy creates it.
2. Once all have connected, each runs transactions for DURATION seconds:
   BEGIN; UPDATE accounts SET balance = balance + 1 WHERE id = $k;
   SELECT balance FROM accounts WHERE id = $k; COMMIT (k random).
3. All connections close. The script polls /api/v1/branches until every branch
   is gone and checks that each went between IDLE_EXPIRE and IDLE_EXPIRE +
   REAPER_INTERVAL + 2 s after its last connection closed, that
   offshoot_branches_expired_total{reason="idle"} counts them all, and that no
   clone database is left in pg_database.

Reported: errors (distinct messages), throughput, transaction latency p50/p99,
connect time p50/p99 (including the wait for branch creation), the proxy's CPU
and RSS, and the expiry times. The Markdown section goes to stdout and to
RESULTS_FILE; progress to stderr. Exits non-zero when a check fails. Everything
started is stopped on exit. Only 127.0.0.1 is used.

Environment:
  DURATION=60          seconds of transactions
  CLIENTS=1000         client connections
  BRANCHES=20          branches the clients are spread over (at most 50)
  WORKERS=2            client processes
  ROWS=1000            rows in the accounts table
  IDLE_EXPIRE=20       the source's idle_expire, seconds
  REAPER_INTERVAL=1    reaper.interval, seconds
  RESULTS_FILE         default: benches/results/load.md
  OFFSHOOT_BIN         use this offshoot binary instead of building one
  PG_BIN               PostgreSQL's bin directory (default: pg_config --bindir, else
                       the newest /usr/lib/postgresql/<version>/bin)
  BENCH_PYTHON         a Python with psycopg 3 (default: a venv made under
                       ~/.cache/offshoot-bench on first use)
  KEEP_TMP=1           keep the temp dir (logs, configs, cluster)
  RUST_LOG             Offshoot's log filter (default: info)

Example: DURATION=10 bash benches/load.sh
EOF
}

harness_args "$@"

DURATION=${DURATION:-60}
CLIENTS=${CLIENTS:-1000}
BRANCHES=${BRANCHES:-20}
WORKERS=${WORKERS:-2}
ROWS=${ROWS:-1000}
IDLE_EXPIRE=${IDLE_EXPIRE:-20}
REAPER_INTERVAL=${REAPER_INTERVAL:-1}
RESULTS_FILE=${RESULTS_FILE:-$BENCH_DIR/results/load.md}
require_positive DURATION CLIENTS BRANCHES WORKERS ROWS IDLE_EXPIRE REAPER_INTERVAL
((BRANCHES <= 50)) || die "BRANCHES must be at most 50 (the source's max_branches)"
((BRANCHES <= CLIENTS)) || die "BRANCHES ($BRANCHES) must not exceed CLIENTS ($CLIENTS)"
MAX_BRANCHES=50
SLACK=2

# Every client holds a socket here, two in the proxy, and PostgreSQL's backends
# each open files of their own: raise the descriptor limit (root may raise the
# hard limit too).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
[[ $NOFILE == unlimited ]] || ((NOFILE >= 2 * CLIENTS + 1000)) ||
    die "open-file limit is $NOFILE; $CLIENTS clients need at least $((2 * CLIENTS + 1000)) (raise ulimit -n)"

harness_init load
PYTHON=$(bench_python)

# --- Cluster and proxy --------------------------------------------------------

PG_MAX_CONN=$((CLIENTS + 100))
harness_start_pg "max_connections = $PG_MAX_CONN" "shared_buffers = '256MB'" "log_autovacuum_min_duration = 0" ||
    die "PostgreSQL did not start with max_connections = $PG_MAX_CONN"
harness_psql postgres -c 'CREATE DATABASE src' || die "cannot create database src"
# Only the proxy's administrative connection (and this script) use database
# postgres: log the duration of its statements (CREATE/DROP DATABASE, ...).
harness_psql postgres -c 'ALTER DATABASE postgres SET log_min_duration_statement = 0' ||
    die "cannot set log_min_duration_statement"
harness_psql src -c "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL DEFAULT 0)" \
    -c "INSERT INTO accounts (id) SELECT generate_series(1, $ROWS)" -c "VACUUM ANALYZE accounts" ||
    die "cannot fill database src"

harness_start_offshoot "[reaper]
interval = \"${REAPER_INTERVAL}s\"

[sources.src]
server = \"host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres\"
database = \"src\"
idle_expire = \"${IDLE_EXPIRE}s\"
max_branches = $MAX_BRANCHES"

# --- Load ---------------------------------------------------------------------

CONNECT_TIMEOUT=120
CLK_TCK=$(getconf CLK_TCK)
cpu_before=$(proc_cpu_ticks "$OFFSHOOT_PID")
rss_before=$(proc_rss_kib "$OFFSHOOT_PID")
LOAD_RC=0
timeout -k 10 $((DURATION + CONNECT_TIMEOUT + 300)) "$PYTHON" "$BENCH_DIR/load_client.py" load \
    --port "$PROXY_PORT" --source src --prefix load- --branches "$BRANCHES" --clients "$CLIENTS" \
    --duration "$DURATION" --rows "$ROWS" --workers "$WORKERS" --connect-timeout "$CONNECT_TIMEOUT" \
    --out "$BENCH_TMP/load.json" || LOAD_RC=$?
kill -0 "$OFFSHOOT_PID" 2>/dev/null || die "offshoot is no longer running after the load (see its log below)"
((LOAD_RC == 0)) || die "the load client failed (status $LOAD_RC)"
cpu_after=$(proc_cpu_ticks "$OFFSHOOT_PID")
rss_after=$(proc_rss_kib "$OFFSHOOT_PID")
rss_peak=$(awk '/^VmHWM:/ { print $2 }' "/proc/$OFFSHOOT_PID/status")
txns=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["txns"])' "$BENCH_TMP/load.json")
cpu_per_txn=$(awk -v t=$((cpu_after - cpu_before)) -v hz="$CLK_TCK" -v n="$txns" \
    'BEGIN { if (n > 0) printf "%.1f", t * 1e6 / hz / n; else print "n/a" }')
cpu_seconds=$(awk -v t=$((cpu_after - cpu_before)) -v hz="$CLK_TCK" 'BEGIN { printf "%.1f", t / hz }')
branches_after_load=$(harness_admin /api/v1/branches | "$PYTHON" -c \
    'import json, sys; print(sum(b["source"] == "src" for b in json.load(sys.stdin)))')
log "Load done: $branches_after_load branches exist; waiting for them to expire"

# --- Expiry -------------------------------------------------------------------

EXPIRY_TIMEOUT=$((IDLE_EXPIRE + REAPER_INTERVAL + 60))
"$PYTHON" "$BENCH_DIR/load_client.py" expiry --admin-port "$ADMIN_PORT" --load "$BENCH_TMP/load.json" \
    --timeout "$EXPIRY_TIMEOUT" --out "$BENCH_TMP/expiry.json" || die "the expiry watch failed"
expired_metric=$(harness_metric offshoot_branches_expired_total 'reason="idle"' 'source="src"')
created_metric=$(harness_metric offshoot_branches_created_total 'source="src"')
provision_sum=$(harness_metric offshoot_provision_seconds_sum 'source="src"')
provision_count=$(harness_metric offshoot_provision_seconds_count 'source="src"')
leftover=$(harness_psql postgres -c "SELECT string_agg(datname, ', ' ORDER BY datname) FROM pg_database WHERE datname LIKE 'src\_\_%'")
expired_logged=$(grep -c 'branch expired' "$BENCH_TMP/offshoot.log" || true)

# Prints "n: min / median / max" of the durations (ms) PostgreSQL logged for
# statements starting with $1.
pg_durations() {
    awk -v stmt="$1" '
        /LOG:  duration: / && index($0, "statement: " stmt) {
            for (i = 1; i < NF; i++) if ($i == "duration:") { print $(i + 1); break }
        }' "$BENCH_TMP/postgres.log" | sort -g | awk '
        { v[++n] = $1 }
        END {
            if (!n) { print "none logged"; exit }
            printf "%d: %.0f / %.0f / %.0f", n, v[1], v[int((n + 1) / 2)], v[n]
        }'
}
create_ms=$(pg_durations 'CREATE DATABASE')
drop_ms=$(pg_durations 'DROP DATABASE')
autovacuums=$(grep -c 'automatic vacuum of table "src__' "$BENCH_TMP/postgres.log" || true)
warn_lines=$(grep -cE '\b(WARN|ERROR)\b' "$BENCH_TMP/offshoot.log" || true)

# --- Report -------------------------------------------------------------------

PASSED=0
FAILED=0
CHECKS=""
# check DESCRIPTION COMMAND...: a passed check when COMMAND succeeds.
check() {
    local what=$1
    shift
    if "$@"; then
        PASSED=$((PASSED + 1))
        CHECKS+="- pass: $what"$'\n'
    else
        FAILED=$((FAILED + 1))
        CHECKS+="- **FAIL**: $what"$'\n'
    fi
}
jq_py() { "$PYTHON" -c "import json, sys; d = json.load(open(sys.argv[1])); print($2)" "$1"; }
connected=$(jq_py "$BENCH_TMP/load.json" 'd["connected"]')
errors=$(jq_py "$BENCH_TMP/load.json" 'd["error_count"]')
gone=$(jq_py "$BENCH_TMP/expiry.json" 'len(d["gone_at"])')
TABLES=$("$PYTHON" "$BENCH_DIR/load_client.py" report --load "$BENCH_TMP/load.json" \
    --expiry "$BENCH_TMP/expiry.json" --idle-expire "$IDLE_EXPIRE" --interval "$REAPER_INTERVAL" --slack "$SLACK")
on_schedule=$(grep -c '| yes |$' <<<"$TABLES" || true)

check "all $CLIENTS clients connected ($connected did)" test "$connected" = "$CLIENTS"
check "no client errors ($errors)" test "$errors" = "0"
check "$BRANCHES branches existed after the load ($branches_after_load)" test "$branches_after_load" = "$BRANCHES"
check "every branch left /api/v1/branches within ${EXPIRY_TIMEOUT}s ($gone of $BRANCHES)" test "$gone" = "$BRANCHES"
check "every branch went ${IDLE_EXPIRE}–$((IDLE_EXPIRE + REAPER_INTERVAL + SLACK)) s after its last connection closed ($on_schedule of $BRANCHES)" test "$on_schedule" = "$BRANCHES"
check "offshoot_branches_expired_total{reason=\"idle\",source=\"src\"} = $BRANCHES (${expired_metric:-missing})" test "${expired_metric:-missing}" = "$BRANCHES"
check "offshoot_branches_created_total{source=\"src\"} = $BRANCHES (${created_metric:-missing})" test "${created_metric:-missing}" = "$BRANCHES"
check "no clone database left in pg_database (${leftover:-none})" test -z "$leftover"
check "the proxy logged $BRANCHES 'branch expired' lines ($expired_logged)" test "$expired_logged" = "$BRANCHES"

provision_mean="n/a"
if [[ -n $provision_count && $provision_count != 0 ]]; then
    provision_mean=$(awk -v s="$provision_sum" -v n="$provision_count" 'BEGIN { printf "%.0f", s / n * 1000 }')
fi

REPORT=$(
    cat <<EOF
## Load: $CLIENTS connections over $BRANCHES branches

$(harness_describe)
- Settings: DURATION=${DURATION}s CLIENTS=$CLIENTS BRANCHES=$BRANCHES WORKERS=$WORKERS ROWS=$ROWS; source \`src\`: idle_expire = ${IDLE_EXPIRE}s, max_branches = $MAX_BRANCHES; reaper.interval = ${REAPER_INTERVAL}s
- PostgreSQL: max_connections=$PG_MAX_CONN, shared_buffers=256MB, **fsync=off**; client, proxy and PostgreSQL share the machine's CPUs, over TCP on 127.0.0.1
- Client: \`benches/load_client.py\`, psycopg $("$PYTHON" -c 'import psycopg; print(psycopg.__version__)') (asyncio) in $WORKERS processes. All $CLIENTS connections are opened at once, round-robin over \`src.load-00\`…; the first connections to a branch wait for its creation. When all are connected, each runs \`BEGIN; UPDATE accounts SET balance = balance + 1 WHERE id = \$k; SELECT balance ...; COMMIT\` (random k) in a loop for ${DURATION}s; then all close.
- Latency is per transaction (BEGIN to COMMIT done, four round trips); connect time is from the connect call to the session being ready.

$TABLES

| proxy | value |
|---|---:|
| branch creation, mean of offshoot_provision_seconds, ms | $provision_mean (${provision_count:-0} branches) |
| CPU during the load (connect + ${DURATION}s), s | $cpu_seconds |
| CPU per transaction, µs | $cpu_per_txn |
| RSS before / after the load / peak (VmHWM), MiB | $(awk -v a="$rss_before" -v b="$rss_after" -v c="$rss_peak" 'BEGIN { printf "%.1f / %.1f / %.1f", a / 1024, b / 1024, c / 1024 }') |
| WARN/ERROR lines in the proxy's log | $warn_lines |

| PostgreSQL (from its log) | value |
|---|---:|
| CREATE DATABASE ... TEMPLATE, n: min / median / max ms | $create_ms |
| DROP DATABASE, n: min / median / max ms | $drop_ms |
| autovacuum runs on clone databases | $autovacuums |

Checks:

$CHECKS
$PASSED passed, $FAILED failed
EOF
)

harness_report "$REPORT"
((FAILED == 0)) || die "$FAILED check(s) failed"
