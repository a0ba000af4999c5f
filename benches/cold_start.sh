#!/usr/bin/env bash
# Cold start of the `database` engine: time from a new client's connect to its
# first result row on a never-used branch, for sources of several sizes.
# `bash benches/cold_start.sh --help` explains it.
set -euo pipefail

# shellcheck source=benches/harness.sh
source "$(dirname "${BASH_SOURCE[0]}")/harness.sh"

usage() {
    cat <<'EOF2'
Usage: bash benches/cold_start.sh [--help]

Starts a throw-away PostgreSQL cluster and Offshoot in front of it, makes one
source database per size in SIZES_MB, and for each connects REPEAT times to a
branch that does not exist yet (`s<size>.cold-<n>`), timing connect to first
row with psql. Between runs the branches are deleted through the admin API, and
a checkpoint flushes the source so every run copies the same state.

Environment:
  SIZES_MB   source sizes in MB (default "10 100 1000")
  REPEAT     runs per size (default 5)
  RESULTS_FILE  Markdown output (default benches/results/cold_start.md)
  OFFSHOOT_BIN  use this binary instead of building target/release/offshoot
EOF2
}
harness_args "$@"

SIZES_MB=${SIZES_MB:-"10 100 1000"}
REPEAT=${REPEAT:-5}
RESULTS_FILE=${RESULTS_FILE:-$REPO_DIR/benches/results/cold_start.md}

harness_init cold_start
harness_start_pg "shared_buffers = '256MB'" "max_wal_size = '4GB'" "checkpoint_timeout = '30min'" ||
    die "PostgreSQL did not start"

sources=""
for mb in $SIZES_MB; do
    is_uint "$mb" || die "SIZES_MB: $mb is not a whole number"
    db="s$mb"
    log "source $db: about $mb MB"
    harness_psql postgres -c "CREATE DATABASE $db"
    # ~ 1 MB per 7,000 rows of (int, 100-char text) including overhead.
    harness_psql "$db" -c "CREATE TABLE t (id int PRIMARY KEY, pad text)" \
        -c "INSERT INTO t SELECT i, repeat(md5(i::text), 3) FROM generate_series(1, $mb * 7000) i" \
        -c "VACUUM ANALYZE t"
    size=$(harness_psql "$db" -c "SELECT pg_size_pretty(pg_database_size('$db'))")
    log "source $db: $size"
    sources+="[sources.$db]
server = \"host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres\"
database = \"$db\"
max_branches = 1000
idle_expire = \"1h\"
"
done
harness_psql postgres -c "CHECKPOINT"
harness_start_offshoot "$sources"

ms_now() { date +%s%3N; }
declare -A times
for mb in $SIZES_MB; do
    db="s$mb"
    for ((n = 1; n <= REPEAT; n++)); do
        start=$(ms_now)
        "$PSQL" -X -q -At -h 127.0.0.1 -p "$PROXY_PORT" -U postgres -d "$db.cold-$n" \
            -c "SELECT count(*) FROM t WHERE id = 1" >/dev/null
        took=$(($(ms_now) - start))
        times[$mb]+="$took "
        log "$db.cold-$n: first row after $took ms"
        harness_api DELETE "/api/v1/branches/$db/cold-$n" --max-time 120 >/dev/null
        harness_psql postgres -c "CHECKPOINT"
    done
done

table="| source size | database size | runs | p50 connect → first row | min | max |
|---:|---:|---:|---:|---:|---:|"
for mb in $SIZES_MB; do
    read -r -a xs <<<"${times[$mb]}"
    sorted=$(printf '%s\n' "${xs[@]}" | sort -n)
    p50=$(median "${xs[@]}")
    size=$(harness_psql postgres -c "SELECT pg_size_pretty(pg_database_size('s$mb'))")
    table+="
| ~$mb MB | $size | ${#xs[@]} | $p50 ms | $(head -1 <<<"$sorted") ms | $(tail -1 <<<"$sorted") ms |"
done

{
    echo "# Cold start, \`database\` engine"
    echo
    harness_describe
    echo "- Each run: psql connects to a branch that does not exist, Offshoot runs CREATE DATABASE ... TEMPLATE with the source's clone_strategy (\`auto\`: STRATEGY FILE_COPY on PostgreSQL 15), then the query returns its row. The branch is deleted and a checkpoint taken between runs."
    echo
    echo "$table"
} >"$RESULTS_FILE"
echo "$table"
log "wrote $RESULTS_FILE"
