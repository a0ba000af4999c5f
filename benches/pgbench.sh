#!/usr/bin/env bash
# End-to-end benchmark: pgbench against a throw-away PostgreSQL cluster directly,
# through Offshoot, and through PgBouncer (session mode), all on loopback, and a
# Markdown table of the medians. `bash benches/pgbench.sh --help` explains it.
set -euo pipefail

# shellcheck source=benches/harness.sh
source "$(dirname "${BASH_SOURCE[0]}")/harness.sh"

usage() {
    cat <<'EOF'
Usage: bash benches/pgbench.sh [--help | --chart-only]

Measures what Offshoot costs compared with connecting to PostgreSQL directly and
with PgBouncer. It builds the proxy (cargo build --release), creates a throw-away
cluster in a temp dir, loads `pgbench -i -s SCALE` into database `bench`, starts
Offshoot with source `bench` and connects once to `bench.b1`, which clones `bench`
into the branch database (bench__b1). The direct and PgBouncer runs target that same
clone, so all three read the same data. Then, for ROUNDS rounds, it runs every
workload against direct, offshoot and pgbouncer in turn, each for DURATION seconds:

  select    pgbench -S (simple protocol), CLIENTS clients
  prepared  pgbench -S -M prepared, CLIENTS clients
  latency   pgbench -S, 1 client: average latency and the latency added vs direct
  connect   pgbench -C -S, CONNECT_CLIENTS clients (and as many threads): a new
            connection per transaction. PgBouncer keeps its server connections
            across client connections, so only the client side is new there;
            Offshoot keeps them too (server_reuse, on by default).
  connect_noreuse
            the same through Offshoot only, on a second source with
            server_reuse = false (branch benchoff.nr, also a clone of bench):
            every client connection starts a PostgreSQL backend, as direct.
  tpcb      pgbench's default TPC-B-like mix, CLIENTS clients

Every run uses -n (no vacuum) and -T DURATION. For each Offshoot and PgBouncer run
the proxy process's user+system CPU time (/proc/<pid>/stat) is divided by the
transactions pgbench processed, and the share of it spent in the kernel (system
time) is reported too. The table shows medians over the rounds; it is
printed on stdout and written, with the machine and the settings, to RESULTS_FILE.
The medians also go to a CSV beside it (latest.csv), and gnuplot draws them as a
PNG (latest.png): TPS relative to direct per workload, and the proxies' CPU
µs/txn (benches/pgbench_chart.sh; gnuplot-nox is installed with apt-get when
missing, and the chart is skipped with a message when it cannot be).
`--chart-only` runs no benchmark: it redraws the PNG from the CSV (making the CSV
from RESULTS_FILE's "All runs" table when there is none).
Progress and diagnostics go to stderr. Everything started is stopped on exit.

PostgreSQL runs with fsync=off: durability is off because the benchmark measures
the proxies, not the disk. PostgreSQL and PgBouncer refuse to run as root; when
the script runs as root it runs them as the `postgres` system user, and installs
pgbouncer with apt-get when it is missing.

Environment:
  ROUNDS=3            rounds; each round runs every workload on every target
  DURATION=10         seconds per pgbench run
  WARMUP=2            seconds of pgbench -S per target before round 1 (0: none)
  SCALE=10            pgbench -i scale factor
  CLIENTS=16          clients of the select, prepared and tpcb workloads
  CONNECT_CLIENTS=8   clients of the connect workload
  THREADS=2           pgbench worker threads (-j), at most the number of clients
                      (the connect workload uses one thread per client)
  WORKLOADS="select prepared latency connect connect_noreuse tpcb"
                      which workloads to run, in this order
  OFFSHOOT_BIN        use this offshoot binary instead of building one
  PG_BIN              directory with initdb, pg_ctl, postgres, pgbench, psql
                      (default: pg_config --bindir, else /usr/lib/postgresql/<newest>/bin)
  PG_SHARED_BUFFERS=256MB
                      shared_buffers; the default holds scale 10 in memory
  PGBOUNCER           pgbouncer binary (default: pgbouncer on PATH or /usr/sbin)
  SKIP_PGBOUNCER=1    leave PgBouncer out
  SYSCALLS=1          also count, with `perf stat` on each proxy process during
                      its runs, its system calls, epoll_wait calls and context
                      switches per transaction (perf must be able to read the
                      syscall tracepoints; counting adds a little CPU to both
                      proxies alike, so compare CPU figures of runs without it)
  RESULTS_FILE        where the report goes (default: benches/results/latest.md)
  KEEP_TMP=1          keep the temp dir (logs, configs, cluster) after the run
  RUST_LOG            Offshoot's log filter (default: info)
  OFFSHOOT__*         passed to Offshoot as configuration overrides and recorded
                      in the report (e.g. OFFSHOOT__PROXY__RELAY_THREADS=1)

Example: ROUNDS=1 DURATION=3 bash benches/pgbench.sh
EOF
}

CHART_ONLY=0
case "${1:-}" in
-h | --help)
    usage
    exit 0
    ;;
--chart-only) CHART_ONLY=1 ;;
"") ;;
*)
    usage >&2
    die "unknown argument: $1"
    ;;
esac

# --- Settings ---------------------------------------------------------------

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
SCALE=${SCALE:-10}
CLIENTS=${CLIENTS:-16}
CONNECT_CLIENTS=${CONNECT_CLIENTS:-8}
THREADS=${THREADS:-2}
WORKLOADS=${WORKLOADS:-"select prepared latency connect connect_noreuse tpcb"}
PG_SHARED_BUFFERS=${PG_SHARED_BUFFERS:-256MB}
SKIP_PGBOUNCER=${SKIP_PGBOUNCER:-0}
SYSCALLS=${SYSCALLS:-0}
KEEP_TMP=${KEEP_TMP:-0}
RESULTS_FILE=${RESULTS_FILE:-$BENCH_DIR/results/latest.md}
export RUST_LOG=${RUST_LOG:-info}

require_positive ROUNDS DURATION SCALE CLIENTS CONNECT_CLIENTS THREADS
is_uint "$WARMUP" || die "WARMUP must be a non-negative integer, got '$WARMUP'"

# --- Chart --------------------------------------------------------------------

CSV_FILE="${RESULTS_FILE%.md}.csv"
PNG_FILE="${RESULTS_FILE%.md}.png"

# The chart's subtitle: the date and settings lines of the Markdown report.
chart_subtitle() {
    awk '/^- Date: / { d = substr($0, 9) } /^- Settings: / { s = substr($0, 13); sub(/;.*/, "", s) }
        END { printf "%s%s%s", s, (s != "" && d != "" ? "; " : ""), d }' "$RESULTS_FILE" 2>/dev/null || true
}

# Draws PNG_FILE from CSV_FILE; a chart that cannot be drawn is only a warning.
render_chart() {
    local rc=0
    bash "$BENCH_DIR/pgbench_chart.sh" "$CSV_FILE" "$PNG_FILE" "$(chart_subtitle)" || rc=$?
    case $rc in
    0) ;;
    2) warn "no chart: gnuplot is not available" ;;
    *) warn "drawing the chart failed (status $rc)" ;;
    esac
}

# Makes the CSV from a Markdown report's "All runs" table (medians over the
# rounds, as the summary table shows them; titles from the summary table, in order).
csv_from_markdown() {
    awk '
        function med(key,    n, i, j, t, a) {
            n = split(vals[key], a, " ")
            if (!n) return ""
            for (i = 2; i <= n; i++) { t = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
            return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
        }
        function add(key, v) { if (v != "" && v != "failed") vals[key] = vals[key] " " v }
        /^\| workload \| direct TPS/ { summary = 1; next }
        summary && /^\|---/ { next }
        summary && /^\| / { split($0, c, " \\| "); titles[++nt] = substr(c[1], 3); next }
        summary { summary = 0 }
        /^\| round \| workload/ { raw = 1; next }
        raw && /^\|---/ { next }
        raw && /^\| [0-9]/ {
            n = split($0, c, "|")
            for (i = 1; i <= n; i++) gsub(/^ +| +$/, "", c[i])
            wl = c[3]; t = c[4]
            if (!(wl in seen)) { seen[wl] = 1; order[++nw] = wl }
            add(wl "|" t "|tps", c[5]); add(wl "|" t "|lat", c[6]); add(wl "|" t "|cpu", c[8])
            next
        }
        raw { raw = 0 }
        END {
            if (!nw) exit 1
            print "workload,title,direct_tps,offshoot_tps,pgbouncer_tps,direct_latency_ms,offshoot_latency_ms,pgbouncer_latency_ms,offshoot_cpu_us_per_txn,pgbouncer_cpu_us_per_txn"
            for (i = 1; i <= nw; i++) {
                wl = order[i]
                printf "%s,\"%s\",%s,%s,%s,%s,%s,%s,%s,%s\n", wl, (i in titles ? titles[i] : wl),
                    med(wl "|direct|tps"), med(wl "|offshoot|tps"), med(wl "|pgbouncer|tps"),
                    med(wl "|direct|lat"), med(wl "|offshoot|lat"), med(wl "|pgbouncer|lat"),
                    med(wl "|offshoot|cpu"), med(wl "|pgbouncer|cpu")
            }
        }' "$RESULTS_FILE"
}

if ((CHART_ONLY)); then
    if [[ ! -s $CSV_FILE ]]; then
        [[ -s $RESULTS_FILE ]] || die "neither $CSV_FILE nor $RESULTS_FILE exists; run the benchmark first"
        log "No $CSV_FILE: making it from $RESULTS_FILE"
        csv_from_markdown >"$CSV_FILE.tmp" || die "no \"All runs\" table in $RESULTS_FILE"
        mv "$CSV_FILE.tmp" "$CSV_FILE"
    fi
    render_chart
    [[ -s $PNG_FILE ]] || exit 1
    exit 0
fi

min() { (($1 < $2)) && echo "$1" || echo "$2"; }

# pgbench arguments and titles of each workload.
declare -A WL_ARGS WL_TITLE
WL_ARGS[select]="-S -c $CLIENTS -j $(min "$THREADS" "$CLIENTS")"
WL_TITLE[select]="select-only, simple protocol, $CLIENTS clients"
WL_ARGS[prepared]="-S -M prepared -c $CLIENTS -j $(min "$THREADS" "$CLIENTS")"
WL_TITLE[prepared]="select-only, prepared, $CLIENTS clients"
WL_ARGS[latency]="-S -c 1 -j 1"
WL_TITLE[latency]="select-only, 1 client"
# pgbench opens connections synchronously within a thread, so with fewer threads
# than clients it would measure its own queueing; one thread per client here.
WL_ARGS[connect]="-C -S -c $CONNECT_CLIENTS -j $CONNECT_CLIENTS"
WL_TITLE[connect]="select-only, new connection per txn (-C), $CONNECT_CLIENTS clients"
WL_ARGS[connect_noreuse]=${WL_ARGS[connect]}
WL_TITLE[connect_noreuse]="the same (-C), Offshoot with server_reuse = false"
WL_ARGS[tpcb]="-c $CLIENTS -j $(min "$THREADS" "$CLIENTS")"
WL_TITLE[tpcb]="TPC-B-like mix, $CLIENTS clients"

read -ra WL_LIST <<<"${WORKLOADS//,/ }"
((${#WL_LIST[@]} > 0)) || die "WORKLOADS is empty"
for wl in "${WL_LIST[@]}"; do
    [[ -n ${WL_ARGS[$wl]+set} ]] || die "unknown workload '$wl' in WORKLOADS (known: select prepared latency connect connect_noreuse tpcb)"
done

# --- Tools, cluster, proxy (benches/harness.sh) ------------------------------

# Takes the benchmark lock, finds PostgreSQL, builds Offshoot, makes the temp dir
# and installs the clean-up trap (which also stops PgBouncer, below).
harness_init bench
[[ -x "$PG_BIN/pgbench" ]] || die "pgbench not found in PG_BIN='$PG_BIN'; set PG_BIN to PostgreSQL's bin directory"
PGBENCH="$PG_BIN/pgbench"
mkdir -p "$BENCH_TMP/runs"
PERF_EVENTS=raw_syscalls:sys_enter,syscalls:sys_enter_epoll_wait,context-switches
if [[ $SYSCALLS == 1 ]]; then
    command -v perf >/dev/null 2>&1 || die "SYSCALLS=1 needs perf (apt-get install linux-perf)"
    perf stat -x, -e "$PERF_EVENTS" -- true >/dev/null 2>&1 ||
        die "SYSCALLS=1: perf cannot count syscall tracepoints here (perf_event_paranoid, tracefs)"
fi
HARNESS_LOGS+=(pgbench-init.log pgbouncer.log)

find_pgbouncer() {
    if [[ -n ${PGBOUNCER:-} ]]; then
        [[ -x $PGBOUNCER ]] || die "PGBOUNCER=$PGBOUNCER is not an executable"
        echo "$PGBOUNCER"
    elif command -v pgbouncer >/dev/null 2>&1; then
        command -v pgbouncer
    elif [[ -x /usr/sbin/pgbouncer ]]; then
        echo /usr/sbin/pgbouncer
    fi
}

PGBOUNCER_BIN=""
if [[ $SKIP_PGBOUNCER == 1 ]]; then
    log "PgBouncer: skipped (SKIP_PGBOUNCER=1)"
else
    PGBOUNCER_BIN=$(find_pgbouncer)
    if [[ -z $PGBOUNCER_BIN ]]; then
        if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
            apt_install_missing pgbouncer pgbouncer || true
            PGBOUNCER_BIN=$(find_pgbouncer)
            [[ -n $PGBOUNCER_BIN ]] || die "could not install pgbouncer; set SKIP_PGBOUNCER=1 to run without it"
        else
            log "PgBouncer: not installed and not root, so not installing it; the PgBouncer columns are skipped"
            log "           (install pgbouncer or set PGBOUNCER=/path/to/pgbouncer to include it)"
        fi
    fi
fi

TARGETS=(direct offshoot)
[[ -n $PGBOUNCER_BIN ]] && TARGETS+=(pgbouncer)

BOUNCER_PID=""
harness_on_exit() {
    [[ -n $BOUNCER_PID ]] && stop_process "$BOUNCER_PID" TERM 10 pgbouncer
}

harness_start_pg "max_connections = 200" "shared_buffers = '$PG_SHARED_BUFFERS'" ||
    die "PostgreSQL did not start"
harness_psql postgres -c 'CREATE DATABASE bench' || die "cannot create database bench"
log "PostgreSQL: pgbench -i -s $SCALE bench"
"$PGBENCH" -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U postgres bench \
    >"$BENCH_TMP/pgbench-init.log" 2>&1 || die "pgbench -i failed"

harness_start_offshoot "[sources.bench]
server = \"host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres\"
database = \"bench\"
idle_expire = \"1h\"

# The same data with server sessions never kept (the connect_noreuse workload).
[sources.benchoff]
server = \"host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres\"
database = \"bench\"
idle_expire = \"1h\"
server_reuse = false"

# The first connection to bench.b1 clones bench; the direct and PgBouncer runs then
# use the same clone so that all three targets read the same data.
CLONE_DB=$(timeout 120 "$PSQL" -X -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PROXY_PORT" -U postgres \
    -d bench.b1 -c 'SELECT current_database()') ||
    die "cannot connect to bench.b1 through offshoot (status $?)"
[[ -n $CLONE_DB ]] || die "offshoot returned no database name for bench.b1"
log "Offshoot: bench.b1 is database $CLONE_DB"
if [[ " ${WL_LIST[*]} " == *" connect_noreuse "* ]]; then
    timeout 120 "$PSQL" -X -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PROXY_PORT" -U postgres \
        -d benchoff.nr -c 'SELECT 1' >/dev/null || die "cannot connect to benchoff.nr through offshoot"
fi

# --- PgBouncer --------------------------------------------------------------

if [[ -n $PGBOUNCER_BIN ]]; then
    BOUNCER_PORT=$(free_port)
    printf '"postgres" ""\n' >"$BENCH_TMP/pgbouncer.users"
    cat >"$BENCH_TMP/pgbouncer.ini" <<EOF
[databases]
$CLONE_DB = host=127.0.0.1 port=$PG_PORT dbname=$CLONE_DB user=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = trust
auth_file = $BENCH_TMP/pgbouncer.users
pool_mode = session
max_client_conn = 1000
default_pool_size = 32
; Offshoot logs connections only at debug level; keep PgBouncer just as quiet.
log_connections = 0
log_disconnections = 0
logfile = $BENCH_TMP/pgbouncer.log
pidfile = $BENCH_TMP/pgbouncer.pid
EOF
    log "PgBouncer: listening on 127.0.0.1:$BOUNCER_PORT, session mode, pool size 32"
    as_pg "$PGBOUNCER_BIN" -d "$BENCH_TMP/pgbouncer.ini" || die "pgbouncer did not start"
    for ((i = 0; i < 50; i++)); do
        [[ -s $BENCH_TMP/pgbouncer.pid ]] && break
        sleep 0.1
    done
    [[ -s $BENCH_TMP/pgbouncer.pid ]] || die "pgbouncer wrote no pid file"
    BOUNCER_PID=$(<"$BENCH_TMP/pgbouncer.pid")
    wait_for_port "$BOUNCER_PORT" 10 "$BOUNCER_PID" pgbouncer || die "pgbouncer did not start (see its log below)"
    got=$(timeout 30 "$PSQL" -X -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$BOUNCER_PORT" -U postgres \
        -d "$CLONE_DB" -c 'SELECT current_database()') || die "cannot connect to $CLONE_DB through pgbouncer"
    [[ $got == "$CLONE_DB" ]] || die "pgbouncer reached database '$got', expected $CLONE_DB"
fi

# --- Runs -------------------------------------------------------------------

CLK_TCK=$(getconf CLK_TCK)
RUN_TIMEOUT=$((DURATION + 60))

target_port() {
    case $1 in
    direct) echo "$PG_PORT" ;;
    offshoot) echo "$PROXY_PORT" ;;
    pgbouncer) echo "$BOUNCER_PORT" ;;
    esac
}
# $1 target, $2 workload.
target_db() {
    if [[ $1 == offshoot && ${2:-} == connect_noreuse ]]; then
        echo benchoff.nr
    elif [[ $1 == offshoot ]]; then
        echo bench.b1
    else
        echo "$CLONE_DB"
    fi
}
# The targets workload $1 runs against: connect_noreuse only measures Offshoot.
targets_of() {
    if [[ $1 == connect_noreuse ]]; then
        echo offshoot
    else
        echo "${TARGETS[@]}"
    fi
}
target_pid() {
    case $1 in
    offshoot) echo "$OFFSHOOT_PID" ;;
    pgbouncer) echo "$BOUNCER_PID" ;;
    esac
}

# Dies when a proxy process has gone away; every later run would fail anyway.
check_alive() {
    local pid
    pid=$(target_pid "$1")
    [[ -z $pid ]] || kill -0 "$pid" 2>/dev/null || die "$1 (pid $pid) is no longer running"
}

# Results, keyed "workload|target|round".
declare -A TPS LAT TXN CPU SYS SC EW CS
FAILURES=()

# Runs pgbench once. $1 target, $2 workload, $3 round (or "warmup"); $4 seconds.
run_pgbench() {
    local target=$1 wl=$2 round=$3 secs=$4
    local key="$wl|$target|$round" out="$BENCH_TMP/runs/$wl.$target.$round.log"
    local pid before="" after="" rc=0
    local -a args
    read -ra args <<<"${WL_ARGS[$wl]}"
    check_alive "$target"
    pid=$(target_pid "$target")
    local perf_pid="" perf_out="$out.perf"
    [[ -n $pid ]] && before=$(proc_cpu_split "$pid")
    if [[ $SYSCALLS == 1 && -n $pid ]]; then
        perf stat -x, -e "$PERF_EVENTS" -p "$pid" -o "$perf_out" &
        perf_pid=$!
    fi
    timeout -k 10 "$RUN_TIMEOUT" "$PGBENCH" -h 127.0.0.1 -p "$(target_port "$target")" -U postgres \
        -n -T "$secs" "${args[@]}" "$(target_db "$target" "$wl")" >"$out" 2>&1 || rc=$?
    [[ -n $pid ]] && after=$(proc_cpu_split "$pid" || true)
    if [[ -n $perf_pid ]]; then
        kill -INT "$perf_pid" 2>/dev/null
        wait "$perf_pid" 2>/dev/null || true
    fi

    local tps lat txn failed
    tps=$(awk '/^tps = / { print $3; exit }' "$out")
    lat=$(awk '/^latency average = / { print $4; exit }' "$out")
    txn=$(awk -F': *' '/^number of transactions actually processed:/ { split($2, a, "/"); print a[1]; exit }' "$out")
    failed=$(awk -F': *' '/^number of failed transactions:/ { split($2, a, " "); print a[1]; exit }' "$out")
    if ((rc != 0)) || [[ -z $tps || -z $txn || ${failed:-0} != 0 ]] || ((txn == 0)); then
        local why="exit status $rc"
        ((rc == 124)) && why="no result after ${RUN_TIMEOUT}s (killed by timeout)"
        [[ ${failed:-0} != 0 ]] && why+=", $failed failed transactions"
        FAILURES+=("round $round, $wl via $target: $why")
        warn "pgbench $wl via $target (round $round) failed: $why; its output:"
        tail -n 15 "$out" >&2
        check_alive "$target"
        return 0
    fi
    TPS[$key]=$tps
    LAT[$key]=$lat
    TXN[$key]=$txn
    local cpu_note=""
    if [[ -n $before && -n $after ]]; then
        local user=$((${after% *} - ${before% *})) sys=$((${after#* } - ${before#* }))
        CPU[$key]=$(awk -v t=$((user + sys)) -v hz="$CLK_TCK" -v n="$txn" \
            'BEGIN { printf "%.2f", t * 1e6 / hz / n }')
        cpu_note="  ${CPU[$key]} µs CPU/txn"
        if ((user + sys > 0)); then
            SYS[$key]=$((100 * sys / (user + sys)))
            cpu_note+=", ${SYS[$key]}% in the kernel"
        fi
    fi
    if [[ -s $perf_out ]]; then
        # perf stat -x, lines: value,unit,event,...
        local -A counted=()
        local value event
        while IFS=, read -r value _ event _; do
            [[ $value =~ ^[0-9]+$ ]] && counted[$event]=$value
        done <"$perf_out"
        per_txn() { [[ -n ${counted[$1]:-} ]] && awk -v c="${counted[$1]}" -v n="$txn" 'BEGIN { printf "%.2f", c / n }'; }
        SC[$key]=$(per_txn raw_syscalls:sys_enter)
        EW[$key]=$(per_txn syscalls:sys_enter_epoll_wait)
        CS[$key]=$(per_txn context-switches)
        cpu_note+="; per txn: ${SC[$key]} syscalls, ${EW[$key]} epoll_wait, ${CS[$key]} context switches"
    fi
    log "$(printf '  %-8s %-9s %10.0f tps  %8.3f ms%s' "$wl" "$target" "$tps" "$lat" "$cpu_note")"
}

if ((WARMUP > 0)); then
    log "Warm-up: ${WARMUP}s of select per target (not counted)"
    for target in "${TARGETS[@]}"; do
        run_pgbench "$target" select warmup "$WARMUP"
    done
fi

for ((round = 1; round <= ROUNDS; round++)); do
    log "Round $round/$ROUNDS (${DURATION}s per run)"
    for wl in "${WL_LIST[@]}"; do
        for target in $(targets_of "$wl"); do
            run_pgbench "$target" "$wl" "$round" "$DURATION"
        done
    done
done

# --- Report -----------------------------------------------------------------

# Prints the median of map $1 over the rounds of workload $2 and target $3.
median_of() {
    local -n map=$1
    local -a vals=()
    local r
    for ((r = 1; r <= ROUNDS; r++)); do
        [[ -n ${map["$2|$3|$r"]+set} ]] && vals+=("${map["$2|$3|$r"]}")
    done
    median "${vals[@]}"
}

fmt_tps() { [[ -n $1 ]] && printf '%.0f' "$1" || printf 'failed'; }
fmt_ratio() {
    [[ -n $1 && -n $2 ]] || return 0
    awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf " (%.2f×)", a / b }'
}
fmt_cpu() { [[ -n $1 ]] && printf '%.1f' "$1" || printf 'n/a'; }

tables() {
    local have_bouncer=0 wl d o b
    [[ -n $PGBOUNCER_BIN ]] && have_bouncer=1
    echo "| workload | direct TPS | offshoot TPS (× direct) | pgbouncer TPS (× direct) | offshoot CPU µs/txn | pgbouncer CPU µs/txn |"
    echo "|---|---:|---:|---:|---:|---:|"
    for wl in "${WL_LIST[@]}"; do
        # connect_noreuse compares with the connect workload's direct runs.
        d=$(median_of TPS "${wl%_noreuse}" direct)
        o=$(median_of TPS "$wl" offshoot)
        printf '| %s | %s | %s%s ' "${WL_TITLE[$wl]}" "$(fmt_tps "$d")" "$(fmt_tps "$o")" "$(fmt_ratio "$o" "$d")"
        if [[ $wl == connect_noreuse ]]; then
            printf '| — | %s | — |\n' "$(fmt_cpu "$(median_of CPU "$wl" offshoot)")"
            continue
        fi
        if ((have_bouncer)); then
            b=$(median_of TPS "$wl" pgbouncer)
            printf '| %s%s ' "$(fmt_tps "$b")" "$(fmt_ratio "$b" "$d")"
        else
            printf '| skipped '
        fi
        printf '| %s ' "$(fmt_cpu "$(median_of CPU "$wl" offshoot)")"
        if ((have_bouncer)); then
            printf '| %s |\n' "$(fmt_cpu "$(median_of CPU "$wl" pgbouncer)")"
        else
            printf '| skipped |\n'
        fi
    done
    if [[ " ${WL_LIST[*]} " == *" latency "* ]]; then
        echo
        echo "| ${WL_TITLE[latency]} | direct | offshoot | pgbouncer |"
        echo "|---|---:|---:|---:|"
        local t lat row1="| latency µs/txn" row2="| added vs direct, µs" dlat
        dlat=$(median_of LAT latency direct)
        for t in direct offshoot pgbouncer; do
            if [[ $t == pgbouncer ]] && ((!have_bouncer)); then
                row1+=" | skipped"
                row2+=" | skipped"
                continue
            fi
            lat=$(median_of LAT latency "$t")
            if [[ -z $lat ]]; then
                row1+=" | failed"
                row2+=" | failed"
                continue
            fi
            row1+=$(awk -v l="$lat" 'BEGIN { printf " | %.0f", l * 1000 }')
            if [[ $t == direct ]]; then
                row2+=" | —"
            elif [[ -n $dlat ]]; then
                row2+=$(awk -v l="$lat" -v d="$dlat" 'BEGIN { printf " | %+.0f", (l - d) * 1000 }')
            else
                row2+=" | n/a"
            fi
        done
        echo "$row1 |"
        echo "$row2 |"
    fi
}

# The median share of target $1's CPU time spent in the kernel, over all runs.
kernel_share() {
    local -a vals=()
    local k
    for k in "${!SYS[@]}"; do
        [[ $k == *"|$1|"* && $k != *"|warmup" ]] && vals+=("${SYS[$k]}")
    done
    median "${vals[@]}"
}

TABLES=$(tables)
shares=""
for target in offshoot pgbouncer; do
    share=$(kernel_share "$target")
    [[ -n $share ]] && shares+="${shares:+, }$target $share%"
done
[[ -n $shares ]] && TABLES+=$'\n\n'"Share of each proxy's CPU time spent in the kernel (system / user+system time, median over all runs): $shares."
if [[ $SYSCALLS == 1 ]]; then
    TABLES+=$'\n\n'"Per transaction, counted with \`perf stat\` on the proxy process (medians over the rounds; system calls / of them epoll_wait / context switches):"$'\n'
    for wl in "${WL_LIST[@]}"; do
        line="- ${WL_TITLE[$wl]}:"
        for target in $(targets_of "$wl"); do
            [[ $target == direct ]] && continue
            line+=" $target $(median_of SC "$wl" "$target") / $(median_of EW "$wl" "$target") / $(median_of CS "$wl" "$target");"
        done
        TABLES+="${line%;}"$'\n'
    done
fi

bouncer_line="not run"
[[ -n $PGBOUNCER_BIN ]] && bouncer_line="$("$PGBOUNCER_BIN" --version 2>&1 | head -n 1): pool_mode=session, default_pool_size=32, max_client_conn=1000, auth_type=trust, connection logging off"
overrides=$(compgen -e | grep '^OFFSHOOT__' | while read -r v; do printf '%s=%s ' "$v" "${!v}"; done || true)

REPORT=$(
    cat <<EOF
# Offshoot pgbench benchmark

$(harness_describe)
- PgBouncer: $bouncer_line
- Settings: ROUNDS=$ROUNDS DURATION=${DURATION}s WARMUP=${WARMUP}s SCALE=$SCALE CLIENTS=$CLIENTS CONNECT_CLIENTS=$CONNECT_CLIENTS THREADS=$THREADS${overrides:+; Offshoot overrides: $overrides}
- PostgreSQL: max_connections=200, shared_buffers=$PG_SHARED_BUFFERS, **fsync=off** (durability off: the benchmark measures the proxies, not the disk)
- Offshoot: source \`bench\`, clients use \`bench.b1\` (database $CLONE_DB); direct and PgBouncer runs use $CLONE_DB too
- All traffic is TCP over 127.0.0.1 with sslmode=disable; pgbench, PostgreSQL and the proxies share the same CPUs.
- Every pgbench run uses \`-n -T $DURATION\`; targets are interleaved within each round. Values are medians over the rounds.
- The -C rows: pgbench uses one thread per client (it connects synchronously). Direct starts a new PostgreSQL backend per transaction; PgBouncer (session mode) and Offshoot (\`server_reuse\`, on by default) reuse their server connections, so only the client connection is new; the "server_reuse = false" row is Offshoot starting a backend per connection (source \`benchoff\`, branch \`benchoff.nr\`, another clone of bench), compared with the same direct runs.
- Latency is pgbench's "latency average" (printed to 1 µs).
- CPU µs/txn: the proxy process's user+system CPU time during the run (/proc/<pid>/stat, ${CLK_TCK} ticks/s) divided by the transactions pgbench processed; "in the kernel" is the system part of that time.

$TABLES
EOF
)
if ((${#FAILURES[@]} > 0)); then
    REPORT+=$'\n\nFailed runs (left out of the medians):\n'
    for f in "${FAILURES[@]}"; do REPORT+="- $f"$'\n'; done
fi

RAW=$'\n<details><summary>All runs</summary>\n\n| round | workload | target | TPS | latency ms | transactions | CPU µs/txn | CPU in the kernel % | syscalls/txn | epoll_wait/txn | context switches/txn |\n|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n'
for ((round = 1; round <= ROUNDS; round++)); do
    for wl in "${WL_LIST[@]}"; do
        for target in $(targets_of "$wl"); do
            key="$wl|$target|$round"
            if [[ -n ${TPS[$key]+set} ]]; then
                RAW+="| $round | $wl | $target | $(fmt_tps "${TPS[$key]}") | ${LAT[$key]} | ${TXN[$key]} | ${CPU[$key]:-} | ${SYS[$key]:-} | ${SC[$key]:-} | ${EW[$key]:-} | ${CS[$key]:-} |"$'\n'
            else
                RAW+="| $round | $wl | $target | failed | | | | | | | |"$'\n'
            fi
        done
    done
done
RAW+=$'\n</details>\n'

mkdir -p "$(dirname "$RESULTS_FILE")"
printf '%s\n%s' "$REPORT" "$RAW" >"$RESULTS_FILE.tmp"
mv "$RESULTS_FILE.tmp" "$RESULTS_FILE"

# The medians as CSV (empty fields: not run or failed), then the chart.
{
    echo "workload,title,direct_tps,offshoot_tps,pgbouncer_tps,direct_latency_ms,offshoot_latency_ms,pgbouncer_latency_ms,offshoot_cpu_us_per_txn,pgbouncer_cpu_us_per_txn"
    for wl in "${WL_LIST[@]}"; do
        printf '%s,"%s",%s,%s,%s,%s,%s,%s,%s,%s\n' "$wl" "${WL_TITLE[$wl]}" \
            "$(median_of TPS "$wl" direct)" "$(median_of TPS "$wl" offshoot)" "$(median_of TPS "$wl" pgbouncer)" \
            "$(median_of LAT "$wl" direct)" "$(median_of LAT "$wl" offshoot)" "$(median_of LAT "$wl" pgbouncer)" \
            "$(median_of CPU "$wl" offshoot)" "$(median_of CPU "$wl" pgbouncer)"
    done
} >"$CSV_FILE.tmp"
mv "$CSV_FILE.tmp" "$CSV_FILE"
render_chart

echo
echo "$REPORT"
echo
log "Report written to $RESULTS_FILE (medians in $CSV_FILE${PNG_FILE:+, chart in $PNG_FILE})"
((${#FAILURES[@]} == 0)) || die "${#FAILURES[@]} pgbench run(s) failed; see above"
