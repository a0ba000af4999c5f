#!/usr/bin/env bash
# The recording relay of rehearsal branches against the plain relay, in one run:
# pgbench -S directly, on a normal branch, on a normal branch while a rehearsal
# branch is being recorded, and on the rehearsal branch itself.
# `bash benches/rehearse_relay.sh --help` explains it.
set -euo pipefail

# shellcheck source=benches/harness.sh
source "$(dirname "${BASH_SOURCE[0]}")/harness.sh"

usage() {
    cat <<'EOF2'
Usage: bash benches/rehearse_relay.sh [--help]

Starts a throw-away PostgreSQL cluster and Offshoot in front of it, loads
`pgbench -i -s SCALE` into database `bench` (a `database`-engine source), makes
two branches through the admin API, `bench.normal` and `bench.rehearse-relay`
(only branches named `rehearse-*` get the recording relay), and a third,
`bench.rehearse-bg`, for the background rehearsal. Then, ROUNDS times, in turn:

  direct      pgbench straight to the cluster (database `bench`)
  normal      through Offshoot to bench.normal (the unparsed byte relay)
  normal+rec  bench.normal again while a recorded session runs a loop of
              statements on bench.rehearse-bg (pgbench -S -c 1 -R BG_RATE), as
              a rehearsal's migration would
  rehearsal   through Offshoot to bench.rehearse-relay itself: every message
              read and recorded

each with two workloads: `pgbench -S -c 8 -j 2` (tps) and `pgbench -S -c 1`
(the round trip: average latency). The report gives medians over the rounds
and each as a ratio to direct; the recording's own figures (statements kept and
dropped) come from GET /api/v1/rehearsals/recording/bench/<branch>.

Environment:
  SCALE        pgbench -i scale factor (default 10)
  DURATION     seconds per pgbench run (default 10)
  ROUNDS       rounds (default 3)
  BG_RATE      statements per second of the background recorded session (default 200)
  RESULTS_FILE Markdown output (default benches/results/rehearse_relay.md)
  OFFSHOOT_BIN use this binary instead of building target/release/offshoot
  PG_BIN       PostgreSQL's bin directory (default: found)
EOF2
}
harness_args "$@"

SCALE=${SCALE:-10}
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
BG_RATE=${BG_RATE:-200}
RESULTS_FILE=${RESULTS_FILE:-$REPO_DIR/benches/results/rehearse_relay.md}
require_positive SCALE DURATION ROUNDS BG_RATE

harness_init rehearse_relay
PGBENCH="$PG_BIN/pgbench"
[[ -x $PGBENCH ]] || die "pgbench not found in PG_BIN='$PG_BIN'"
harness_start_pg "shared_buffers = '256MB'" "max_connections = 100" || die "PostgreSQL did not start"

log "PostgreSQL: pgbench -i -s $SCALE bench"
harness_psql postgres -c "CREATE DATABASE bench"
"$PGBENCH" -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U postgres bench \
    >"$BENCH_TMP/pgbench-init.log" 2>&1 || die "pgbench -i failed"
harness_psql postgres -c "CHECKPOINT"

harness_start_offshoot "[sources.bench]
engine = \"database\"
server = \"host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres\"
database = \"bench\"
max_branches = 10
idle_expire = \"1h\""

for b in normal rehearse-relay rehearse-bg; do
    log "branch bench.$b"
    harness_api POST /api/v1/branches -d "{\"source\":\"bench\",\"branch\":\"$b\"}" >/dev/null
done

mkdir -p "$BENCH_TMP/runs"
BG_PID=""
harness_on_exit() {
    [[ -z $BG_PID ]] || kill "$BG_PID" 2>/dev/null || true
}

# The background rehearsal: a recorded session sending BG_RATE statements a
# second on bench.rehearse-bg for $1 seconds.
start_background() {
    "$PGBENCH" -h 127.0.0.1 -p "$PROXY_PORT" -U postgres -n -S -c 1 -R "$BG_RATE" -T "$1" \
        bench.rehearse-bg >"$BENCH_TMP/runs/background.$2.log" 2>&1 &
    BG_PID=$!
    sleep 1
    kill -0 "$BG_PID" 2>/dev/null || die "the background rehearsal session did not start (runs/background.$2.log)"
}

declare -A TPS LAT
# Runs pgbench once: $1 target name, $2 port, $3 database, $4 workload, $5 round.
run() {
    local target=$1 port=$2 db=$3 wl=$4 round=$5
    local out="$BENCH_TMP/runs/$target.$wl.$round.log" rc=0
    local -a args=(-S -c 8 -j 2)
    [[ $wl == c1 ]] && args=(-S -c 1)
    timeout -k 10 $((DURATION + 60)) "$PGBENCH" -h 127.0.0.1 -p "$port" -U postgres -n \
        -T "$DURATION" "${args[@]}" "$db" >"$out" 2>&1 || rc=$?
    local tps lat
    tps=$(awk '/^tps = / { print $3; exit }' "$out")
    lat=$(awk '/^latency average = / { print $4; exit }' "$out")
    if ((rc != 0)) || [[ -z $tps || -z $lat ]]; then
        tail -n 15 "$out" >&2
        die "pgbench $wl on $target (round $round) failed with status $rc"
    fi
    TPS[$target|$wl]+="$tps "
    LAT[$target|$wl]+="$lat "
    log "$(printf '  round %s  %-11s %-3s %10.0f tps  %8.3f ms' "$round" "$target" "$wl" "$tps" "$lat")"
}

TARGETS=(direct normal normal+rec rehearsal)
for ((round = 1; round <= ROUNDS; round++)); do
    log "round $round of $ROUNDS"
    for wl in c8 c1; do
        run direct "$PG_PORT" bench "$wl" "$round"
        run normal "$PROXY_PORT" bench.normal "$wl" "$round"
        start_background $((DURATION + 3)) "$round.$wl"
        run normal+rec "$PROXY_PORT" bench.normal "$wl" "$round"
        wait "$BG_PID" || warn "the background session ended with status $?"
        BG_PID=""
        run rehearsal "$PROXY_PORT" bench.rehearse-relay "$wl" "$round"
    done
done

recording() {
    harness_admin "/api/v1/rehearsals/recording/bench/$1" |
        python3 -c 'import json,sys; r=json.load(sys.stdin); print(len(r["statements"]), r["dropped"])'
}
read -r bg_kept bg_dropped <<<"$(recording rehearse-bg)"
read -r relay_kept relay_dropped <<<"$(recording rehearse-relay)"

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "?" }'; }
declare -A MED_TPS MED_LAT
for t in "${TARGETS[@]}"; do
    for wl in c8 c1; do
        # shellcheck disable=SC2086
        MED_TPS[$t|$wl]=$(median ${TPS[$t|$wl]})
        # shellcheck disable=SC2086
        MED_LAT[$t|$wl]=$(median ${LAT[$t|$wl]})
    done
done
declare -A TITLE=([direct]="direct" [normal]="normal branch" [normal+rec]="normal branch, rehearsal recording beside it" [rehearsal]="the \`rehearse-\` branch itself (recorded)")
table="| target | \`-S -c 8\` tps | × direct | \`-S -c 1\` latency | × direct |
|---|---:|---:|---:|---:|"
for t in "${TARGETS[@]}"; do
    table+="
| ${TITLE[$t]} | $(printf '%.0f' "${MED_TPS[$t|c8]}") | $(ratio "${MED_TPS[$t|c8]}" "${MED_TPS[direct|c8]}") | $(printf '%.3f' "${MED_LAT[$t|c1]}") ms | $(ratio "${MED_LAT[$t|c1]}" "${MED_LAT[direct|c1]}") |"
done
raw="| target | workload | tps per round | latency per round (ms) |
|---|---|---|---|"
for t in "${TARGETS[@]}"; do
    for wl in c8 c1; do
        raw+="
| $t | $wl | ${TPS[$t|$wl]% } | ${LAT[$t|$wl]% } |"
    done
done

report=$(
    echo "# The recording relay of rehearsal branches"
    echo
    harness_describe
    echo "- pgbench scale $SCALE, $DURATION s per run, $ROUNDS rounds (medians below), targets interleaved in each round; \`-S -c 8 -j 2\` for throughput, \`-S -c 1\` for the round trip."
    echo "- The background rehearsal: \`pgbench -S -c 1 -R $BG_RATE\` on \`bench.rehearse-bg\`, recorded by the proxy (it kept $bg_kept statements and dropped $bg_dropped past its bounds). The recorded branch under test: $relay_kept kept, $relay_dropped dropped (the relay reads every message either way)."
    echo
    echo "$table"
    echo
    echo "Tps ratios above 1 are faster than direct, latency ratios above 1 slower. A normal branch keeps the byte relay whether or not a rehearsal is recorded beside it: its row with the recording beside it differs from the one without only by the machine's noise and the CPU the background session itself takes on this $(nproc)-CPU machine. The \`rehearse-\` branch's own row is what recording costs that branch's sessions."
    echo
    echo "Every run:"
    echo
    echo "$raw"
)
harness_report "$report"
