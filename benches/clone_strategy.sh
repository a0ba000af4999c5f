#!/usr/bin/env bash
# Cold start by clone strategy on PostgreSQL 18: the `database` engine with
# STRATEGY WAL_LOG, the `database` engine with `clone_strategy = "auto"` (FILE_COPY
# with file_copy_method = clone), and the `instance` engine, side by side in one run
# on one copy-on-write filesystem. `bash benches/clone_strategy.sh --help` explains it.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$BENCH_DIR")
# shellcheck source=benches/lib.sh
source "$BENCH_DIR/lib.sh"

usage() {
    cat <<'EOF2'
Usage: PG18_BIN=DIR DATA_ROOT=DIR bash benches/clone_strategy.sh

Starts a PostgreSQL 18 cluster under DATA_ROOT (put it on XFS or Btrfs: see the
README's loop-volume recipe), makes one source database per size in SIZES_MB, and
for each size and way of cloning connects REPEAT times to a branch that does not
exist yet, timing connect to first row with psql. Branches are deleted between
runs. The same data is cloned three ways:

  <size>w   database engine, clone_strategy = "wal_log"
  <size>c   database engine, clone_strategy = "auto" (file_clone on 18 with reflinks)
  <size>i   instance engine, snapshots from a stopped copy of the data directory

Environment:
  PG18_BIN     server binaries of PostgreSQL 18 (.ci/pg-versions.sh 18 installs them)
  DATA_ROOT    a directory on the filesystem under test (created; its contents removed)
  SIZES_MB     source sizes in MB (default "100 1000 2000")
  REPEAT       runs per size and way (default 3)
  RESULTS_FILE Markdown output (default benches/results/clone_strategy.md)
  OFFSHOOT_BIN use this binary instead of building target/release/offshoot
EOF2
}
[[ ${1:-} == --help || ${1:-} == -h ]] && { usage; exit 0; }

PG18_BIN=${PG18_BIN:?set PG18_BIN (see --help)}
DATA_ROOT=${DATA_ROOT:?set DATA_ROOT (see --help)}
SIZES_MB=${SIZES_MB:-"100 1000 2000"}
REPEAT=${REPEAT:-3}
RESULTS_FILE=${RESULTS_FILE:-$REPO_DIR/benches/results/clone_strategy.md}
PSQL=$(command -v psql) || die "psql is needed (Debian: postgresql-client)"
[[ -x $PG18_BIN/postgres ]] || die "no postgres in PG18_BIN=$PG18_BIN"

if [[ -z ${OFFSHOOT_BIN:-} ]]; then
    (cd "$REPO_DIR" && cargo build --release >&2) || die "cargo build --release failed"
    OFFSHOOT_BIN=$REPO_DIR/target/release/offshoot
fi
bench_lock clone_strategy
LOADAVG_START=$(cut -d' ' -f1-3 /proc/loadavg)

pg() { as_pg "$PG18_BIN/$1" "${@:2}"; }
PG_PORT=$(free_port)
PROXY_PORT=$(free_port)
ADMIN_PORT=$(free_port)
OFFSHOOT_PID=""
cleanup() {
    [[ -n $OFFSHOOT_PID ]] && stop_process "$OFFSHOOT_PID" TERM 30 offshoot
    pg pg_ctl -D "$DATA_ROOT/pg" stop -m fast >/dev/null 2>&1 || true
    bench_unlock
}
trap cleanup EXIT

rm -rf "${DATA_ROOT:?}"/*
mkdir -p "$DATA_ROOT/pg" "$DATA_ROOT/run" "$DATA_ROOT/state" "$DATA_ROOT/storage"
chmod 0755 "$DATA_ROOT"
chown postgres "$DATA_ROOT/pg" "$DATA_ROOT/run"
chmod 0700 "$DATA_ROOT/pg"
pg initdb -D "$DATA_ROOT/pg" -U postgres -A trust --no-sync >/dev/null
start_pg() {
    pg pg_ctl -D "$DATA_ROOT/pg" -l "$DATA_ROOT/run/pg.log" -w start \
        -o "-p $PG_PORT -k $DATA_ROOT/run -c listen_addresses=127.0.0.1 -c shared_buffers=256MB -c max_wal_size=4GB -c checkpoint_timeout=30min" >/dev/null
}
start_pg
sql() { "$PSQL" -X -q -At -h 127.0.0.1 -p "$PG_PORT" -U postgres "$@"; }
for mb in $SIZES_MB; do
    is_uint "$mb" || die "SIZES_MB: $mb is not a whole number"
    log "source s$mb: about $mb MB"
    sql -d postgres -c "CREATE DATABASE s$mb"
    sql -d "s$mb" -c "CREATE TABLE t (id int PRIMARY KEY, pad text)" \
        -c "INSERT INTO t SELECT i, repeat(md5(i::text), 3) FROM generate_series(1, $mb * 7000) i" \
        -c "VACUUM ANALYZE t"
done
# The instance engine copies a stopped data directory: take one, reflinked.
pg pg_ctl -D "$DATA_ROOT/pg" stop -m fast -w >/dev/null
cp -a --reflink=auto "$DATA_ROOT/pg" "$DATA_ROOT/stopped"
start_pg

config="[proxy]
listen = \"127.0.0.1:$PROXY_PORT\"
[admin]
listen = \"127.0.0.1:$ADMIN_PORT\"
[state]
dir = \"$DATA_ROOT/state\"
[auth]
method = \"trust\"
[embedded]
bin_dir = \"$PG18_BIN\"
"
for mb in $SIZES_MB; do
    config+="
[sources.${mb}w]
server = \"host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres\"
database = \"s$mb\"
clone_strategy = \"wal_log\"
max_branches = 1000
[sources.${mb}c]
server = \"host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres\"
database = \"s$mb\"
max_branches = 1000
[sources.${mb}i]
engine = \"instance\"
data_dir = \"$DATA_ROOT/stopped\"
storage = \"$DATA_ROOT/storage/$mb\"
database = \"s$mb\"
max_branches = 1000
"
done
echo "$config" >"$DATA_ROOT/offshoot.toml"
"$OFFSHOOT_BIN" serve --config "$DATA_ROOT/offshoot.toml" >"$DATA_ROOT/offshoot.log" 2>&1 &
OFFSHOOT_PID=$!
wait_for_port "$PROXY_PORT" 60 || die "offshoot did not start: $(tail -5 "$DATA_ROOT/offshoot.log")"
wait_for_port "$ADMIN_PORT" 60 || die "offshoot's admin port did not open"

# The admin API wants the token serve generated, for reads as well as writes.
api() {
    local auth=()
    [[ -f $DATA_ROOT/state/admin.token ]] &&
        auth=(-H "Authorization: Bearer $(cat "$DATA_ROOT/state/admin.token")")
    curl -fsS --max-time 300 "${auth[@]}" -H 'Content-Type: application/json' "$@"
}
api_delete() {
    api -X DELETE "http://127.0.0.1:$ADMIN_PORT/api/v1/branches/$1/$2" >/dev/null
}
ms_now() { date +%s%3N; }
declare -A times
for mb in $SIZES_MB; do
    # The instance source's first snapshot is taken on first need: not a clone's cost.
    "$PSQL" -X -q -At -h 127.0.0.1 -p "$PROXY_PORT" -U postgres -d "${mb}i.warm" -c "SELECT 1" >/dev/null
    for way in w c i; do
        for ((n = 1; n <= REPEAT; n++)); do
            sql -d postgres -c "CHECKPOINT"
            start=$(ms_now)
            "$PSQL" -X -q -At -h 127.0.0.1 -p "$PROXY_PORT" -U postgres -d "$mb$way.cold-$n" \
                -c "SELECT count(*) FROM t WHERE id = 1" >/dev/null
            took=$(($(ms_now) - start))
            times[$mb$way]+="$took "
            log "$mb$way.cold-$n: first row after $took ms"
            api_delete "$mb$way" "cold-$n"
        done
    done
done

# Under write load: pgbench TPC-B on another database of the same server while
# branches of the smallest source are made, once per way of cloning. FILE_COPY
# checkpoints twice per clone; WAL_LOG writes the copy through the WAL.
LOAD_SECONDS=${LOAD_SECONDS:-40}
PGBENCH=$(command -v pgbench || true)
load_rows=""
if [[ -n $PGBENCH && $LOAD_SECONDS -gt 0 ]]; then
    small=$(awk '{print $1}' <<<"$SIZES_MB")
    sql -d postgres -c "CREATE DATABASE load"
    "$PGBENCH" -q -i -s 20 -h 127.0.0.1 -p "$PG_PORT" -U postgres load >/dev/null 2>&1
    for way in none w c; do
        sql -d postgres -c "CHECKPOINT"
        "$PGBENCH" -n -c 4 -j 2 -T "$LOAD_SECONDS" -h 127.0.0.1 -p "$PG_PORT" -U postgres load \
            >"$DATA_ROOT/pgbench-$way.log" 2>&1 &
        bench_pid=$!
        clones=()
        if [[ $way != none ]]; then
            deadline=$(($(date +%s) + LOAD_SECONDS - 5))
            n=0
            while (($(date +%s) < deadline)); do
                n=$((n + 1))
                start=$(ms_now)
                "$PSQL" -X -q -At -h 127.0.0.1 -p "$PROXY_PORT" -U postgres -d "$small$way.load-$n" \
                    -c "SELECT count(*) FROM t WHERE id = 1" >/dev/null
                clones+=($(($(ms_now) - start)))
                api_delete "$small$way" "load-$n"
                sleep 2
            done
        fi
        wait "$bench_pid" || die "pgbench failed: $(tail -3 "$DATA_ROOT/pgbench-$way.log")"
        tps=$(grep -Eo 'tps = [0-9.]+' "$DATA_ROOT/pgbench-$way.log" | head -1 | awk '{printf "%.0f", $3}')
        case $way in
        none) label="no clones (baseline)" ;;
        w) label="database engine, \`wal_log\`" ;;
        c) label="database engine, \`auto\`" ;;
        esac
        if ((${#clones[@]} > 0)); then
            load_rows+="
| $label | $tps | ${#clones[@]} | $(median "${clones[@]}") ms |"
        else
            load_rows+="
| $label | $tps | 0 | — |"
        fi
        log "under load, $label: $tps tps, clones ${clones[*]:-none}"
    done
fi

fs=$(df -T "$DATA_ROOT" | awk 'NR == 2 {print $2}')
table="| source size | database size | runs | database engine, \`wal_log\` | database engine, \`auto\` (file_clone) | instance engine | wal_log ÷ file_clone |
|---:|---:|---:|---:|---:|---:|---:|"
for mb in $SIZES_MB; do
    read -r -a w <<<"${times[${mb}w]}"
    read -r -a c <<<"${times[${mb}c]}"
    read -r -a i <<<"${times[${mb}i]}"
    pw=$(median "${w[@]}") pc=$(median "${c[@]}") pi=$(median "${i[@]}")
    size=$(sql -d postgres -c "SELECT pg_size_pretty(pg_database_size('s$mb'))")
    ratio=$(awk -v a="$pw" -v b="$pc" 'BEGIN { printf "%.0f×", (b > 0 ? a / b : 0) }')
    table+="
| ~$mb MB | $size | $REPEAT | $pw ms | $pc ms | $pi ms | $ratio |"
done
mode=$(api "http://127.0.0.1:$ADMIN_PORT/api/v1/sources" 2>/dev/null | tr -d ' \n' | grep -o '"copy_mode":"file_[a-z]*"' | head -1 || true)

{
    echo "# Cold start by clone strategy, PostgreSQL 18"
    echo
    echo "- $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $("$PG18_BIN/postgres" --version), $fs under $DATA_ROOT; load average $LOADAVG_START at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end."
    echo "- Offshoot binary: $OFFSHOOT_BIN."
    echo "- Each cell: median of $REPEAT runs of psql connecting to a branch that does not exist, through Offshoot, until the first row. A checkpoint runs before each, and the branch is deleted after it."
    echo "- The \`auto\` sources reported ${mode:-an unknown mode} in /api/v1/sources."
    echo
    echo "$table"
    if [[ -n $load_rows ]]; then
        echo
        echo "## Under write load"
        echo
        echo "pgbench TPC-B (\`-c 4 -j 2\`, scale 20) for ${LOAD_SECONDS} s on another database of the same server, while a branch of the ~${small} MB source is made every ~2 s (and deleted)."
        echo
        echo "| clones made with | pgbench tps | clones | p50 connect → first row |"
        echo "|---|---:|---:|---:|"
        echo "${load_rows#$'\n'}"
    fi
} >"$RESULTS_FILE"
echo "$table"
log "wrote $RESULTS_FILE"
