#!/usr/bin/env bash
# Real-driver suite: psql, psycopg 3, node-postgres, pgjdbc and tokio-postgres each
# run the same checks through a real `offshoot serve`, each on its own branch of a
# throw-away cluster. See integration/drivers/README.md.
#
#   bash integration/drivers/run.sh [-v] [DRIVER...]    DRIVER: psql python node java rust
#
# -v prints every driver's check lines. Installs what a driver needs when it is
# missing (Python and npm packages go to $OFFSHOOT_DRIVERS_CACHE, default
# ~/.cache/offshoot-drivers, never into the repository). Set OFFSHOOT_DRIVERS_KEEP=1
# to keep the temp dir (cluster, proxy config and logs) for a look afterwards.
# Prints a line per driver and closes with "N passed, M failed[, K skipped]";
# exits non-zero when a driver failed, the set-up did, no driver ran, or (with
# CI=true) a driver was skipped because its runtime could not be installed.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${OFFSHOOT_DRIVERS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/offshoot-drivers}
driver_timeout=${OFFSHOOT_DRIVERS_TIMEOUT:-120}
all_drivers=(psql python node java rust)

verbose=""
drivers=()
for arg in "$@"; do
    case $arg in
    -v) verbose=1 ;;
    -h | --help)
        sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    psql | python | node | java | rust) drivers+=("$arg") ;;
    *)
        echo "unknown driver or option: $arg (drivers: ${all_drivers[*]})" >&2
        exit 2
        ;;
    esac
done
((${#drivers[@]} > 0)) || drivers=("${all_drivers[@]}")

log() { printf '%s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}
indent() { sed 's/^/    /'; }

# ---------------------------------------------------------------------------
# Temp dir and cleanup

tmp=$(mktemp -d "${TMPDIR:-/tmp}/offshoot-drivers.XXXXXX") || die "mktemp failed"
# The server runs as `postgres` when we are root; it must reach its data dir.
chmod 0755 "$tmp"
pg_bin=""
pg=""
proxy_pid=""
driver_pid=""

cleanup() {
    if [[ -n $driver_pid ]]; then
        # timeout(1) passes the signal on to the driver's process group.
        kill -TERM "$driver_pid" 2>/dev/null
        wait "$driver_pid" 2>/dev/null
    fi
    if [[ -n $proxy_pid ]] && kill -0 "$proxy_pid" 2>/dev/null; then
        kill -TERM "$proxy_pid" 2>/dev/null
        for ((i = 0; i < 100; i++)); do
            kill -0 "$proxy_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$proxy_pid" 2>/dev/null
        wait "$proxy_pid" 2>/dev/null
    fi
    if [[ -n $pg && -f $pg/data/postmaster.pid ]]; then
        as_pg "$pg_bin/pg_ctl" -D "$pg/data" -m immediate -w stop >/dev/null 2>&1
    fi
    if [[ -n ${OFFSHOOT_DRIVERS_KEEP:-} ]]; then
        log "kept $tmp"
    else
        rm -rf "$tmp"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Runs a command as `postgres` when we are root (PostgreSQL refuses root), in a
# directory that user can read.
as_pg() {
    if [[ $EUID -eq 0 ]]; then
        (cd "$tmp" && runuser -u postgres -- "$@")
    else
        "$@"
    fi
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# A TCP port nobody listens on, below the kernel's ephemeral range so that
# outgoing connections do not take it meanwhile; never the same one twice.
ports_given=" "
free_port() {
    local low=32768 port i
    if [[ -r /proc/sys/net/ipv4/ip_local_port_range ]]; then
        read -r low _ </proc/sys/net/ipv4/ip_local_port_range
    fi
    ((low > 11000)) || low=32768
    for ((i = 0; i < 200; i++)); do
        port=$((10000 + RANDOM % (low - 10000)))
        [[ $ports_given == *" $port "* ]] && continue
        port_open "$port" && continue
        ports_given+="$port "
        echo "$port"
        return 0
    done
    die "no free TCP port on 127.0.0.1"
}

# GET http://127.0.0.1:$1$2; prints the whole response.
http_get() {
    (
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        # The admin API wants the token `serve` wrote into its state directory.
        printf 'GET %s HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer %s\r\nConnection: close\r\n\r\n' \
            "$2" "$(cat "$tmp/state/admin.token" 2>/dev/null)" >&3
        timeout 5 cat <&3
    ) 2>/dev/null
}

# ---------------------------------------------------------------------------
# Installing what a driver needs

apt_updated=""
# Installs Debian packages quietly; fails when we are not root or apt fails.
apt_install() {
    if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        return 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    if [[ -z $apt_updated ]]; then
        apt-get update -qq || return 1
        apt_updated=1
    fi
    apt-get install -y -qq --no-install-recommends "$@"
}

# Each prepare_<driver> readies its driver and sets `cmd` (the command to run it).
# Returns 0 when ready, 1 on failure (reason in `why`), 2 when the runtime is
# missing and cannot be installed (skip). Its output goes to a log.

prepare_psql() {
    local p
    for p in "$pg_bin/psql" "$(command -v psql 2>/dev/null)"; do
        if [[ -x $p ]]; then
            cmd=(env "PATH=$(dirname "$p"):$PATH" bash "$here/psql/driver.sh")
            return 0
        fi
    done
    why="no psql"
    return 2
}

prepare_python() {
    if ! command -v python3 >/dev/null 2>&1 || ! python3 -m venv -h >/dev/null 2>&1; then
        apt_install python3 python3-venv || true
        command -v python3 >/dev/null 2>&1 || { why="no python3"; return 2; }
    fi
    local venv=$cache/python-venv req=$here/python/requirements.txt
    if ! cmp -s "$req" "$venv/requirements.txt" ||
        ! "$venv/bin/python" -c 'import psycopg' >/dev/null 2>&1; then
        rm -rf "$venv"
        python3 -m venv "$venv" || { why="python3 -m venv failed"; return 1; }
        "$venv/bin/pip" install -q --disable-pip-version-check -r "$req" ||
            { why="pip install -r python/requirements.txt failed"; return 1; }
        cp "$req" "$venv/requirements.txt"
    fi
    cmd=("$venv/bin/python" "$here/python/driver.py")
}

prepare_node() {
    if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
        apt_install nodejs npm || true
        if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
            why="no node/npm"
            return 2
        fi
    fi
    # node_modules lives in the cache, keyed by the committed lock file.
    local dir=$cache/node
    if ! cmp -s "$here/node/package-lock.json" "$dir/installed-lock.json" ||
        [[ ! -d $dir/node_modules/pg-copy-streams ]]; then
        rm -rf "$dir"
        mkdir -p "$dir"
        cp "$here/node/package.json" "$here/node/package-lock.json" "$dir/"
        (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error) ||
            { why="npm ci failed"; return 1; }
        cp "$here/node/package-lock.json" "$dir/installed-lock.json"
    fi
    cmd=(env "NODE_PATH=$dir/node_modules" node "$here/node/driver.js")
}

prepare_java() {
    local jar=/usr/share/java/postgresql.jar
    if ! command -v java >/dev/null 2>&1 || ! command -v javac >/dev/null 2>&1; then
        apt_install default-jdk-headless || true
        if ! command -v java >/dev/null 2>&1 || ! command -v javac >/dev/null 2>&1; then
            why="no java/javac"
            return 2
        fi
    fi
    if [[ ! -f $jar ]]; then
        apt_install libpostgresql-jdbc-java || { why="apt-get install libpostgresql-jdbc-java failed"; return 1; }
    fi
    mkdir -p "$tmp/java"
    javac -d "$tmp/java" -cp "$jar" "$here/java/Driver.java" || { why="javac failed"; return 1; }
    cmd=(java -cp "$tmp/java:$jar" Driver)
}

prepare_rust() {
    command -v cargo >/dev/null 2>&1 || { why="no cargo"; return 2; }
    cargo build --quiet --locked --manifest-path "$here/rust/Cargo.toml" \
        --target-dir "$repo/target/drivers" || { why="cargo build failed"; return 1; }
    cmd=("$repo/target/drivers/debug/offshoot-driver-rust")
}

# ---------------------------------------------------------------------------
# The proxy binary, the cluster and the proxy

proxy_bin=$repo/target/debug/offshoot
if [[ ! -x $proxy_bin ]] ||
    [[ -n $(find "$repo/src" "$repo/Cargo.toml" "$repo/Cargo.lock" -newer "$proxy_bin" -print -quit) ]]; then
    log "building target/debug/offshoot"
    (cd "$repo" && cargo build --quiet --bin offshoot) || die "cargo build failed"
fi

if command -v pg_config >/dev/null 2>&1 && [[ -x "$(pg_config --bindir)/initdb" ]]; then
    pg_bin=$(pg_config --bindir)
else
    initdb=$(compgen -G '/usr/lib/postgresql/*/bin/initdb' | sort -V | tail -n 1)
    [[ -n $initdb ]] || die "no PostgreSQL server binaries (initdb) found"
    pg_bin=$(dirname "$initdb")
fi
if [[ $EUID -eq 0 ]]; then
    id -u postgres >/dev/null 2>&1 || die "running as root, but there is no postgres user"
fi

# Everything the server writes lives in $pg, which it owns.
pg=$tmp/pg
mkdir -p "$pg/run"
[[ $EUID -eq 0 ]] && chown -R postgres: "$pg"
pg_port=$(free_port)
as_pg "$pg_bin/initdb" -D "$pg/data" -U postgres --auth=trust -E UTF8 --no-locale --no-sync \
    >"$tmp/initdb.log" 2>&1 || {
    indent <"$tmp/initdb.log" >&2
    die "initdb failed"
}
cat >>"$pg/data/postgresql.conf" <<EOF
port = $pg_port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$pg/run'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 50
shared_buffers = 16MB
EOF
# As on a real server: the proxy's own role (postgres) is trusted over TCP, every
# other role must prove its password with SCRAM. The drivers connect as `app`, so
# the proxy checks their SCRAM itself and logs in to each branch as `app`.
cat >"$pg/data/pg_hba.conf" <<EOF
local all all trust
host all postgres 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
EOF
as_pg "$pg_bin/pg_ctl" -D "$pg/data" -l "$pg/postgres.log" -w -t 60 start >/dev/null || {
    indent <"$pg/postgres.log" >&2
    die "PostgreSQL did not start"
}

direct() { "$pg_bin/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$pg_port" -U postgres "$@"; }
direct -d postgres -c 'CREATE DATABASE shop' >/dev/null || die "CREATE DATABASE shop failed"
direct -d shop >/dev/null <<'SQL' || die "seeding shop failed"
SET password_encryption = 'scram-sha-256';
CREATE ROLE app LOGIN PASSWORD 'app-secret';
GRANT ALL ON SCHEMA public TO app;
CREATE TABLE items (id int PRIMARY KEY, note text);
ALTER TABLE items OWNER TO app;
INSERT INTO items VALUES (1, 'one'), (2, 'two'), (3, 'three');
SQL

proxy_port=$(free_port)
admin_port=$(free_port)
cat >"$tmp/offshoot.toml" <<EOF
[proxy]
listen = "127.0.0.1:$proxy_port"
relay_threads = 2
shutdown_grace = "2s"

[admin]
listen = "127.0.0.1:$admin_port"

[state]
dir = "$tmp/state"

[sources.shop]
server = "host=127.0.0.1 port=$pg_port user=postgres dbname=postgres"
database = "shop"
EOF
RUST_LOG=${RUST_LOG:-offshoot=debug} "$proxy_bin" serve --config "$tmp/offshoot.toml" \
    >"$tmp/offshoot.log" 2>&1 </dev/null &
proxy_pid=$!
healthy=""
for ((i = 0; i < 300; i++)); do
    kill -0 "$proxy_pid" 2>/dev/null || break
    if http_get "$admin_port" /healthz | grep -q '"status":"ok"'; then
        healthy=1
        break
    fi
    sleep 0.1
done
if [[ -z $healthy ]]; then
    indent <"$tmp/offshoot.log" >&2
    die "offshoot did not become healthy on 127.0.0.1:$admin_port"
fi
log "PostgreSQL on 127.0.0.1:$pg_port, offshoot on 127.0.0.1:$proxy_port (admin $admin_port)"

# ---------------------------------------------------------------------------
# The drivers

passed=0
failed=0
skipped=0
for name in "${drivers[@]}"; do
    cmd=()
    why=""
    started=$SECONDS
    rc=0
    "prepare_$name" >"$tmp/$name.prepare.log" 2>&1 || rc=$?
    if ((rc == 2)); then
        echo "SKIP $name: $why"
        skipped=$((skipped + 1))
        continue
    elif ((rc != 0)); then
        echo "FAIL $name: $why"
        tail -n 30 "$tmp/$name.prepare.log" | indent
        failed=$((failed + 1))
        continue
    fi

    # In the background, so that a signal to this script is handled (and the driver
    # stopped) at once rather than when the driver ends.
    PGHOST=127.0.0.1 PGPORT=$proxy_port PGUSER=app PGPASSWORD=app-secret PGDATABASE="shop.drv-$name" \
        EXPECT_DB="shop__drv-$name" PGCONNECT_TIMEOUT=30 \
        timeout -k 5 "$driver_timeout" "${cmd[@]}" >"$tmp/$name.log" 2>&1 </dev/null &
    driver_pid=$!
    rc=0
    wait "$driver_pid" || rc=$?
    driver_pid=""
    took=$((SECONDS - started))
    if ((rc == 0)); then
        echo "PASS $name (${took}s)"
        [[ -n $verbose ]] && indent <"$tmp/$name.log"
        passed=$((passed + 1))
    else
        if ((rc == 124 || rc == 137)); then
            reason="timed out after ${driver_timeout}s"
        else
            reason=$(grep -m1 '^FAIL: ' "$tmp/$name.log" | sed 's/^FAIL: //')
            [[ -n $reason ]] || reason="exit status $rc"
        fi
        echo "FAIL $name: $reason"
        tail -n 30 "$tmp/$name.log" | indent
        failed=$((failed + 1))
    fi
done

# Every cancel above went to the proxy as a CancelRequest; the proxy counts them.
metrics=$(http_get "$admin_port" /metrics)
cancel_count() {
    sed -n "s/^offshoot_cancel_requests_total{outcome=\"$1\"} //p" <<<"$metrics" | tr -d '\r'
}
forwarded=$(cancel_count forwarded)
ignored=$(cancel_count ignored)
log "offshoot: cancel requests forwarded=${forwarded:-0} ignored=${ignored:-0}"
reuse_count() {
    sed -n "s/^offshoot_server_reuse_total{outcome=\"$1\"} //p" <<<"$metrics" | tr -d '\r'
}
log "offshoot: server sessions reused=$(reuse_count hit) missed=$(reuse_count miss) discarded=$(reuse_count discard)"

if ((failed > 0)); then
    problems=$(grep -E ' (WARN|ERROR) ' "$tmp/offshoot.log" | tail -n 20)
    if [[ -n $problems ]]; then
        echo "offshoot log, warnings and errors (last 20):"
        indent <<<"$problems"
    else
        echo "offshoot log: no warnings or errors (OFFSHOOT_DRIVERS_KEEP=1 keeps the whole log)"
    fi
fi
summary="$passed passed, $failed failed"
((skipped > 0)) && summary+=", $skipped skipped"
echo "$summary"
# A run in which no driver ran proves nothing; under CI every driver must run.
if ((passed == 0)); then
    echo "no driver ran" >&2
    exit 1
fi
if [[ ${CI:-} == true ]] && ((skipped > 0)); then
    echo "CI=true: every driver must run, and $skipped did not (see SKIP above)" >&2
    exit 1
fi
((failed == 0))
