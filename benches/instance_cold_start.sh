#!/usr/bin/env bash
# Cold start of the `instance` engine next to the `database` engine and next to
# a warm spare, resume of a suspended branch, memory of an idle clone and of the
# proxy with 100 suspended branches. `bash benches/instance_cold_start.sh --help` explains it.
set -euo pipefail

# shellcheck source=benches/harness.sh
source "$(dirname "${BASH_SOURCE[0]}")/harness.sh"

usage() {
    cat <<'EOF2'
Usage: bash benches/instance_cold_start.sh [--help]

For each size in SIZES_MB, starts a throw-away PostgreSQL cluster holding one
database of about that size, and puts three sources in front of it in one
Offshoot: `db<size>` on the `database` engine (CREATE DATABASE ... TEMPLATE),
`in<size>` on the `instance` engine (pg_basebackup snapshot, one server per
branch) and `sp<size>`, the same with `warm_spares = 1`. Then:

- cold start: REPEAT times per source, psql connects to a branch that does not
  exist yet and runs one query; the time from connect to first row is taken (the
  branch is deleted between runs; for `sp<size>` each run waits until the spare
  pool is full again, so each measures a claim);
- reference: REPEAT times, psql connects to an `in<size>` branch whose server is
  already running and runs the same query (what a warm spare is measured against);
- resume: REPEAT times, a branch of the smallest instance source is suspended
  through the admin API and psql connects to it again;
- memory: proportional set size (PSS) of all processes of one idle running clone,
  and the proxy's RSS with SUSPENDED branches suspended; the storage volume's used
  space per branch, against the source's size.

Clones are only copy-on-write on a filesystem with reflinks. When STORAGE_DIR is
unset and the script runs as root, it CREATES AN XFS IMAGE (XFS_IMAGE, sparse,
XFS_SIZE) and loop-mounts it with `mkfs.xfs -m reflink=1` for the instance
sources' storage, installing xfsprogs with apt-get if needed; it unmounts and
deletes it on exit. Not root and no STORAGE_DIR: the storage stays in the temp dir
and clones are plain copies (the report says so).

Environment:
  SIZES_MB     source sizes in MB (default "100 1000"; add 5000 for the 5 GB row)
  REPEAT       runs per measurement (default 5)
  SUSPENDED    branches for the proxy memory figure (default 100)
  STORAGE_DIR  where instance sources keep snapshots and clones (skips the XFS image)
  XFS_IMAGE    image file (default /var/tmp/offshoot-bench-xfs.img)
  XFS_SIZE     its size (default 40G; sparse)
  RESULTS_FILE Markdown output (default benches/results/instance_cold_start.md)
  OFFSHOOT_BIN use this binary instead of building target/release/offshoot
EOF2
}
harness_args "$@"

SIZES_MB=${SIZES_MB:-"100 1000"}
REPEAT=${REPEAT:-5}
SUSPENDED=${SUSPENDED:-100}
XFS_IMAGE=${XFS_IMAGE:-/var/tmp/offshoot-bench-xfs.img}
XFS_SIZE=${XFS_SIZE:-40G}
RESULTS_FILE=${RESULTS_FILE:-$REPO_DIR/benches/results/instance_cold_start.md}
for v in REPEAT SUSPENDED; do is_uint "${!v}" || die "$v must be a whole number"; done

harness_init instance_cold_start

CLUSTERS=()
XFS_MNT=""
harness_on_exit() {
    # The proxy stops its branch servers on SIGTERM; stop it before unmounting.
    if [[ -n $OFFSHOOT_PID ]] && kill -0 "$OFFSHOOT_PID" 2>/dev/null; then
        stop_process "$OFFSHOOT_PID" TERM 60 offshoot
        wait "$OFFSHOOT_PID" 2>/dev/null || true
    fi
    OFFSHOOT_PID=""
    local dir
    for dir in "${CLUSTERS[@]}"; do
        as_pg "$PG_BIN/pg_ctl" -D "$dir" -m fast -w -t 60 stop >/dev/null 2>&1 ||
            as_pg "$PG_BIN/pg_ctl" -D "$dir" -m immediate -w stop >/dev/null 2>&1
    done
    if [[ -n $XFS_MNT ]]; then
        umount "$XFS_MNT" 2>/dev/null || umount -l "$XFS_MNT" 2>/dev/null || warn "could not unmount $XFS_MNT"
        rm -f "$XFS_IMAGE"
        log "unmounted $XFS_MNT and removed $XFS_IMAGE"
    fi
}

# --- storage -------------------------------------------------------------------
STORAGE_NOTE=""
if [[ -n ${STORAGE_DIR:-} ]]; then
    mkdir -p "$STORAGE_DIR"
    STORAGE_NOTE="instance storage: $STORAGE_DIR ($(stat -f -c %T "$STORAGE_DIR"))"
elif [[ $EUID -eq 0 ]]; then
    apt_install_missing mkfs.xfs xfsprogs || die "mkfs.xfs is needed for the reflink volume"
    [[ -e $XFS_IMAGE ]] && die "$XFS_IMAGE exists; remove it or set XFS_IMAGE"
    XFS_MNT="$BENCH_TMP/xfs"
    mkdir -p "$XFS_MNT"
    log "Creating an XFS reflink volume: $XFS_IMAGE ($XFS_SIZE, sparse), loop-mounted at $XFS_MNT"
    truncate -s "$XFS_SIZE" "$XFS_IMAGE"
    mkfs.xfs -q -m reflink=1 "$XFS_IMAGE" >&2
    mount -o loop "$XFS_IMAGE" "$XFS_MNT"
    STORAGE_DIR="$XFS_MNT"
    STORAGE_NOTE="instance storage: XFS (reflink=1) on a loop-mounted image made by this script"
else
    STORAGE_DIR="$BENCH_TMP/storage"
    mkdir -p "$STORAGE_DIR"
    STORAGE_NOTE="instance storage: $STORAGE_DIR ($(stat -f -c %T "$STORAGE_DIR")); not root, so no reflink volume was made"
    warn "not root and no STORAGE_DIR: instance clones will be plain copies"
fi
if [[ $EUID -eq 0 ]]; then
    # Started as root, the proxy drops to its own user (`process.user`, offshoot),
    # which owns the storage and must reach the state dir inside the temp dir.
    if id -u offshoot >/dev/null 2>&1; then
        chown offshoot: "$STORAGE_DIR"
        chmod 711 "$BENCH_TMP"
    else
        chown postgres: "$STORAGE_DIR"
    fi
fi
log "$STORAGE_NOTE"

# --- one cluster per size ----------------------------------------------------
declare -A PORT
sources=""
for mb in $SIZES_MB; do
    is_uint "$mb" || die "SIZES_MB: $mb is not a whole number"
    dir="$BENCH_TMP/pg$mb"
    port=$(free_port)
    PORT[$mb]=$port
    log "cluster for ~$mb MB: initdb"
    as_pg "$PG_BIN/initdb" -D "$dir" --auth=trust -U postgres -E UTF8 --no-locale --no-sync \
        >"$BENCH_TMP/initdb$mb.log" 2>&1 || die "initdb failed (see $BENCH_TMP/initdb$mb.log)"
    {
        echo "listen_addresses = '127.0.0.1'"
        echo "port = $port"
        echo "unix_socket_directories = '$BENCH_TMP/sock'"
        echo "shared_buffers = '128MB'"
        echo "max_wal_size = '4GB'"
        echo "checkpoint_timeout = '30min'"
    } >>"$dir/postgresql.conf"
    as_pg "$PG_BIN/pg_ctl" -D "$dir" -l "$BENCH_TMP/pg$mb.log" -w -t 120 start >/dev/null ||
        die "PostgreSQL did not start (see $BENCH_TMP/pg$mb.log)"
    CLUSTERS+=("$dir")
    db="s$mb"
    q() { "$PSQL" -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres "$@"; }
    q -d postgres -c "CREATE DATABASE $db"
    log "cluster for ~$mb MB: filling $db"
    # ~ 1 MB per 7,000 rows of (int, 100-char text) including overhead.
    q -d "$db" -c "CREATE TABLE t (id int PRIMARY KEY, pad text)" \
        -c "INSERT INTO t SELECT i, repeat(md5(i::text), 3) FROM generate_series(1, $mb * 7000) i" \
        -c "VACUUM ANALYZE t" -c "CHECKPOINT"
    log "cluster for ~$mb MB: $(q -d "$db" -c "SELECT pg_size_pretty(pg_database_size('$db'))")"
    sources+="
[sources.db$mb]
server = \"host=127.0.0.1 port=$port user=postgres dbname=postgres\"
database = \"$db\"
max_branches = 1000
idle_expire = \"1h\"

[sources.in$mb]
engine = \"instance\"
upstream = \"host=127.0.0.1 port=$port user=postgres\"
database = \"$db\"
storage = \"$STORAGE_DIR/in$mb\"
max_branches = 1000
idle_expire = \"1h\"
suspend_after = \"1h\"

[sources.sp$mb]
engine = \"instance\"
upstream = \"host=127.0.0.1 port=$port user=postgres\"
database = \"$db\"
storage = \"$STORAGE_DIR/sp$mb\"
max_branches = 1000
idle_expire = \"1h\"
suspend_after = \"1h\"
warm_spares = 1
"
done
harness_start_offshoot "$sources
[reaper]
interval = \"1h\""

api() {
    local method=$1 path=$2
    harness_api "$method" "$path" --max-time 3600
}
ms_now() { date +%s%3N; }
first_row() {
    "$PSQL" -X -q -At -h 127.0.0.1 -p "$PROXY_PORT" -U postgres -d "$1" \
        -c "SELECT count(*) FROM t WHERE id = 1" >/dev/null
}
# Clones (instance sources) and databases are deleted between runs; each run then
# writes a checkpoint on the source so every run starts from the same state.
checkpoint() {
    "$PSQL" -X -q -At -h 127.0.0.1 -p "${PORT[$1]}" -U postgres -d postgres -c "CHECKPOINT"
}

# --- snapshots ---------------------------------------------------------------
declare -A SNAP_MS SNAP_SIZE
for mb in $SIZES_MB; do
    start=$(ms_now)
    body=$(api POST "/api/v1/sources/in$mb/snapshots")
    SNAP_MS[$mb]=$(($(ms_now) - start))
    SNAP_SIZE[$mb]=$(sed -E 's/.*"size_bytes":([0-9]+).*/\1/' <<<"$body")
    log "in$mb: snapshot taken in ${SNAP_MS[$mb]} ms ($((SNAP_SIZE[$mb] / 1000000)) MB data directory)"
    api POST "/api/v1/sources/sp$mb/snapshots" >/dev/null
done

# Waits until source $1's spare pool is full (one spare), for at most 10 minutes.
spare_ready() {
    local n
    for ((n = 0; n < 6000; n++)); do
        [[ $(harness_metric offshoot_spares_ready "source=\"$1\"") == 1 ]] && return 0
        sleep 0.1
    done
    die "$1: no warm spare became ready (see $BENCH_TMP/offshoot.log)"
}

# --- cold start --------------------------------------------------------------
declare -A times modes SPARE_HITS SPARE_MISSES
for mb in $SIZES_MB; do
    for engine in db in sp; do
        src="$engine$mb"
        for ((n = 1; n <= REPEAT; n++)); do
            [[ $engine == sp ]] && spare_ready "$src"
            sync
            start=$(ms_now)
            first_row "$src.cold-$n"
            took=$(($(ms_now) - start))
            times[$src]+="$took "
            if [[ $engine != db ]]; then
                modes[$src]=$(api GET "/api/v1/branches/$src/cold-$n" | sed -E 's/.*"copy_mode":"([a-z]+)".*/\1/')
            fi
            log "$src.cold-$n: first row after $took ms"
            api DELETE "/api/v1/branches/$src/cold-$n" >/dev/null
            checkpoint "$mb"
        done
    done
done
# The reference: a plain connection to a branch whose server is already running.
for mb in $SIZES_MB; do
    first_row "in$mb.running"
    for ((n = 1; n <= REPEAT; n++)); do
        start=$(ms_now)
        first_row "in$mb.running"
        took=$(($(ms_now) - start))
        times[run$mb]+="$took "
        log "in$mb.running: first row after $took ms"
    done
    api DELETE "/api/v1/branches/in$mb/running?force=true" >/dev/null
done
for mb in $SIZES_MB; do
    SPARE_HITS[$mb]=$(harness_metric offshoot_spare_claims_total "source=\"sp$mb\"" 'outcome="hit"')
    SPARE_MISSES[$mb]=$(harness_metric offshoot_spare_claims_total "source=\"sp$mb\"" 'outcome="miss"')
done
# How long the copy itself took, from the proxy's log ("clone made ... ms=N").
clone_ms() {
    grep -E "clone made branch=$1/cold-" "$BENCH_TMP/offshoot.log" | sed -E 's/.* ms=([0-9]+).*/\1/'
}

# --- resume ------------------------------------------------------------------
small=$(tr ' ' '\n' <<<"$SIZES_MB" | grep . | sort -n | head -1)
first_row "in$small.warm"
resumes=()
for ((n = 1; n <= REPEAT; n++)); do
    api POST "/api/v1/branches/in$small/warm/suspend" >/dev/null
    start=$(ms_now)
    first_row "in$small.warm"
    resumes+=($(($(ms_now) - start)))
    log "in$small.warm: resumed, first row after ${resumes[-1]} ms"
done

# --- memory of an idle running clone ---------------------------------------------
sleep 2
data="$STORAGE_DIR/in$small/branches/warm/data"
clone_pss_kib=0
clone_procs=0
for p in /proc/[0-9]*; do
    cwd=$(readlink "$p/cwd" 2>/dev/null || true)
    [[ $cwd == "$data" ]] || continue
    pss=$(awk '/^Pss:/ { print $2 }' "$p/smaps_rollup" 2>/dev/null || echo 0)
    clone_pss_kib=$((clone_pss_kib + ${pss:-0}))
    clone_procs=$((clone_procs + 1))
done
log "idle clone: $clone_procs processes, PSS $((clone_pss_kib / 1024)) MiB"

# --- the proxy with SUSPENDED suspended branches --------------------------------
used_kib() { df -k --output=used "$STORAGE_DIR" | tail -1 | tr -d ' '; }
rss_before=$(proc_rss_kib "$OFFSHOOT_PID")
used_before=$(used_kib)
for ((n = 1; n <= SUSPENDED; n++)); do
    harness_api POST /api/v1/branches \
        -d "{\"source\":\"in$small\",\"branch\":\"idle-$n\"}" >/dev/null
    api POST "/api/v1/branches/in$small/idle-$n/suspend" >/dev/null
done
sync
used_after=$(used_kib)
sleep 1
rss_after=$(proc_rss_kib "$OFFSHOOT_PID")
per_branch_kib=$(((used_after - used_before) / SUSPENDED))
log "proxy RSS: $((rss_before / 1024)) MiB before, $((rss_after / 1024)) MiB with $SUSPENDED suspended branches"
log "storage used per new branch: $per_branch_kib KiB"

# --- report ------------------------------------------------------------------
stats() {
    local -a xs
    read -r -a xs <<<"$1"
    local sorted
    sorted=$(printf '%s\n' "${xs[@]}" | sort -n)
    echo "$(median "${xs[@]}") ms | $(head -1 <<<"$sorted") ms | $(tail -1 <<<"$sorted") ms"
}
table="| source | data directory | engine | p50 connect → first row | min | max | copy |
|---:|---:|---|---:|---:|---:|---|"
for mb in $SIZES_MB; do
    size_mb=$((SNAP_SIZE[$mb] / 1000000))
    read -r -a copies <<<"$(clone_ms "in$mb" | tr '\n' ' ')"
    table+="
| ~$mb MB | $size_mb MB | database | $(stats "${times[db$mb]}") | (CREATE DATABASE) |
| ~$mb MB | $size_mb MB | instance | $(stats "${times[in$mb]}") | ${modes[in$mb]:-?}, p50 $(median "${copies[@]}") ms |
| ~$mb MB | $size_mb MB | instance, warm spare | $(stats "${times[sp$mb]}") | spare claimed ${SPARE_HITS[$mb]:-0} of $REPEAT (misses ${SPARE_MISSES[$mb]:-0}) |
| ~$mb MB | $size_mb MB | instance, branch already running (reference) | $(stats "${times[run$mb]}") | no creation |"
done
ratio_table="| source | warm spare p50 ÷ running branch p50 | no spare p50 ÷ running branch p50 |
|---:|---:|---:|"
ratio() {
    local a b
    read -r -a a <<<"$1"
    read -r -a b <<<"$2"
    awk -v x="$(median "${a[@]}")" -v y="$(median "${b[@]}")" 'BEGIN { printf "%.2f×", x / y }'
}
for mb in $SIZES_MB; do
    ratio_table+="
| ~$mb MB | $(ratio "${times[sp$mb]}" "${times[run$mb]}") | $(ratio "${times[in$mb]}" "${times[run$mb]}") |"
done
snap_table="| source | data directory | snapshot (pg_basebackup + seal) |
|---:|---:|---:|"
for mb in $SIZES_MB; do
    snap_table+="
| ~$mb MB | $((SNAP_SIZE[$mb] / 1000000)) MB | ${SNAP_MS[$mb]} ms |"
done
small_mb=$((SNAP_SIZE[$small] / 1000000))
other="| measure | value |
|---|---:|
| resume of a suspended branch (~$small MB), connect → first row, p50 of $REPEAT | $(median "${resumes[@]}") ms (min $(printf '%s\n' "${resumes[@]}" | sort -n | head -1), max $(printf '%s\n' "${resumes[@]}" | sort -n | tail -1)) |
| memory of an idle running clone (PSS, $clone_procs processes, shared_buffers 32MB) | $((clone_pss_kib / 1024)) MiB |
| proxy RSS, before → with $SUSPENDED suspended branches | $((rss_before / 1024)) MiB → $((rss_after / 1024)) MiB |
| storage used per new branch (~$small MB source, $small_mb MB data directory) | $per_branch_kib KiB ($(awk -v a="$per_branch_kib" -v b="$small_mb" 'BEGIN { printf "%.2f", 100 * a / 1024 / b }')% of the data directory) |"

{
    echo "# Cold start: \`instance\` engine vs \`database\` engine"
    echo
    harness_describe
    echo "- $STORAGE_NOTE"
    echo "- Each cold-start run: psql connects to a branch that does not exist and runs one query; Offshoot makes the clone (instance: copy of the sealed snapshot, then \`postgres\` started on a private socket and polled every 5 ms; database: CREATE DATABASE ... TEMPLATE), then the row comes back. The branch is deleted and the source checkpointed between runs. \"copy\" gives the copy mode and the p50 of the copy alone. \"warm spare\": the same on a source with \`warm_spares = 1\`, each run started once its spare is ready, so the branch is a claimed spare (its server already running). \"branch already running\": psql connects to an existing branch whose server runs and runs the same query."
    echo
    echo "$table"
    echo
    echo "Warm spares (\`warm_spares = 1\`, the pool full before each run) against a plain connection to an already-running branch, measured in the same run:"
    echo
    echo "$ratio_table"
    echo
    echo "$snap_table"
    echo
    echo "$other"
} >"$RESULTS_FILE"
cat "$RESULTS_FILE"
log "wrote $RESULTS_FILE"
