#!/usr/bin/env bash
# Scrapes Offshoot's /metrics with a real Prometheus and checks what Prometheus
# stored. `bash benches/prometheus.sh --help` explains it.
set -euo pipefail

# shellcheck source=benches/harness.sh
source "$(dirname "${BASH_SOURCE[0]}")/harness.sh"

usage() {
    cat <<'EOF'
Usage: bash benches/prometheus.sh [--help]

Checks that a real Prometheus can scrape Offshoot and sees sane values.

It installs Debian's `prometheus` package when the binary is missing (as root;
the package's service is not started), starts a throw-away PostgreSQL cluster and
Offshoot (source `src`), connects CONNECTIONS times to src.prom with psql and
once to an unknown source (a routing error), then runs its own Prometheus (own
config and data dir in the temp dir, 127.0.0.1 on a free port) scraping the
proxy's admin /metrics every second. SCRAPE_WAIT seconds after the first scrape
it queries Prometheus's HTTP API and checks:

  up{job="offshoot"} = 1, and at least SCRAPE_WAIT - 2 scrapes in the last
    SCRAPE_WAIT seconds
  offshoot_connections_total >= the connections the script made
  offshoot_branches{source="src",state="ready"} = 1
  offshoot_branches_created_total{source="src"} = 1
  offshoot_client_connections{source="src"} = 0 (all closed again)
  offshoot_bytes_total: both directions present and > 0
  offshoot_errors_total{kind="routing"} >= 1
  the target's health in /api/v1/targets is "up"

Prints one line per check and `N passed, M failed`; exits 1 when a check failed.
Everything started is stopped on exit. Only 127.0.0.1 is used.

Environment:
  CONNECTIONS=5        psql connections through the proxy
  SCRAPE_WAIT=5        seconds Prometheus scrapes before the queries
  PROMETHEUS           prometheus binary (default: prometheus on PATH)
  OFFSHOOT_BIN, PG_BIN, KEEP_TMP, RUST_LOG: as in benches/load.sh
EOF
}

harness_args "$@"

CONNECTIONS=${CONNECTIONS:-5}
SCRAPE_WAIT=${SCRAPE_WAIT:-5}
require_positive CONNECTIONS SCRAPE_WAIT
command -v python3 >/dev/null 2>&1 || die "python3 is needed to read Prometheus's JSON answers"

if [[ -n ${PROMETHEUS:-} ]]; then
    [[ -x $PROMETHEUS ]] || die "PROMETHEUS=$PROMETHEUS is not an executable"
    PROM_BIN=$PROMETHEUS
else
    apt_install_missing prometheus prometheus || die "prometheus is not installed and could not be installed"
    PROM_BIN=$(command -v prometheus)
fi
log "Prometheus: $("$PROM_BIN" --version 2>&1 | awk 'NR == 1')"

harness_init prometheus

PROM_PID=""
harness_on_exit() {
    [[ -n $PROM_PID ]] && stop_process "$PROM_PID" TERM 10 prometheus
}

# --- Cluster, proxy, traffic --------------------------------------------------

harness_start_pg "max_connections = 50" || die "PostgreSQL did not start"
harness_psql postgres -c 'CREATE DATABASE src' || die "cannot create database src"
harness_start_offshoot "[sources.src]
server = \"host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres\"
database = \"src\"
idle_expire = \"1h\""

for ((i = 1; i <= CONNECTIONS; i++)); do
    "$PSQL" -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PROXY_PORT" -U postgres -d src.prom \
        -c 'SELECT 1' >/dev/null || die "connection $i to src.prom through offshoot failed"
done
if "$PSQL" -X -q -At -h 127.0.0.1 -p "$PROXY_PORT" -U postgres -d nosuch.prom -c 'SELECT 1' >/dev/null 2>&1; then
    die "a connection to the unknown source 'nosuch' succeeded"
fi
MADE=$((CONNECTIONS + 1))
log "Made $MADE connections through the proxy ($CONNECTIONS to src.prom, 1 refused)"

# --- Prometheus ---------------------------------------------------------------

PROM_PORT=$(free_port)
mkdir -p "$BENCH_TMP/prometheus"
cat >"$BENCH_TMP/prometheus/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: offshoot
    static_configs:
      - targets: ["127.0.0.1:$ADMIN_PORT"]
EOF
log "Prometheus: listening on 127.0.0.1:$PROM_PORT, scraping 127.0.0.1:$ADMIN_PORT/metrics every 1s"
"$PROM_BIN" --config.file="$BENCH_TMP/prometheus/prometheus.yml" \
    --storage.tsdb.path="$BENCH_TMP/prometheus/data" \
    --web.listen-address="127.0.0.1:$PROM_PORT" \
    --log.level=warn >"$BENCH_TMP/prometheus.log" 2>&1 &
PROM_PID=$!
wait_for_port "$PROM_PORT" 30 "$PROM_PID" prometheus || {
    tail -n 20 "$BENCH_TMP/prometheus.log" >&2
    die "prometheus did not start"
}
# Prints one line per series of the instant query $1: name{labels} (without job
# and instance), a tab, and the value.
prom_query() {
    curl -fsS --max-time 10 -G "http://127.0.0.1:$PROM_PORT/api/v1/query" --data-urlencode "query=$1" |
        python3 -c '
import json, sys
d = json.load(sys.stdin)
if d.get("status") != "success":
    sys.exit("query failed: %s" % d.get("error"))
for r in d["data"]["result"]:
    m = dict(r["metric"])
    name = m.pop("__name__", "")
    labels = ",".join("%s=\"%s\"" % kv for kv in sorted(m.items()) if kv[0] not in ("job", "instance"))
    print("%s%s\t%s" % (name, "{%s}" % labels if labels else "", r["value"][1]))
'
}

# Prints the value of the first series of query $1; nothing when there is none.
prom_value() {
    prom_query "$1" | awk -F'\t' 'NR == 1 { print $2 }'
}

# Prometheus needs a moment after it listens before its first scrape.
for ((i = 0; i < 300; i++)); do
    [[ -n $(prom_value 'up{job="offshoot"}') ]] && break
    kill -0 "$PROM_PID" 2>/dev/null || die "prometheus exited (see $BENCH_TMP/prometheus.log)"
    sleep 0.1
done
[[ -n $(prom_value 'up{job="offshoot"}') ]] || log "Prometheus: no scrape of offshoot after 30s"
log "Prometheus: first scrape seen; letting it scrape for ${SCRAPE_WAIT}s"
sleep "$SCRAPE_WAIT"

PASSED=0
FAILED=0
# check NAME VALUE AWK-CONDITION-ON-v
check() {
    local name=$1 value=$2 cond=$3
    if [[ -n $value ]] && awk -v v="$value" "BEGIN { exit !($cond) }"; then
        PASSED=$((PASSED + 1))
        printf 'pass: %s = %s\n' "$name" "$value"
    else
        FAILED=$((FAILED + 1))
        printf 'FAIL: %s = %s (expected %s)\n' "$name" "${value:-<no series>}" "$cond"
    fi
}

check 'up{job="offshoot"}' "$(prom_value 'up{job="offshoot"}')" 'v == 1'
# Scraping every second: at least SCRAPE_WAIT - 2 scrapes in the last SCRAPE_WAIT seconds.
min_scrapes=$((SCRAPE_WAIT > 3 ? SCRAPE_WAIT - 2 : 1))
check "count_over_time(up{job=\"offshoot\"}[${SCRAPE_WAIT}s])" \
    "$(prom_value "count_over_time(up{job=\"offshoot\"}[${SCRAPE_WAIT}s])")" "v >= $min_scrapes"
check 'offshoot_connections_total' "$(prom_value 'offshoot_connections_total{job="offshoot"}')" "v >= $MADE"
check 'offshoot_branches{source="src",state="ready"}' \
    "$(prom_value 'offshoot_branches{job="offshoot",source="src",state="ready"}')" 'v == 1'
check 'offshoot_branches_created_total{source="src"}' \
    "$(prom_value 'offshoot_branches_created_total{job="offshoot",source="src"}')" 'v == 1'
check 'offshoot_client_connections{source="src"}' \
    "$(prom_value 'offshoot_client_connections{job="offshoot",source="src"}')" 'v == 0'
check 'offshoot_bytes_total{direction="client_to_server"}' \
    "$(prom_value 'offshoot_bytes_total{job="offshoot",direction="client_to_server"}')" 'v > 0'
check 'offshoot_bytes_total{direction="server_to_client"}' \
    "$(prom_value 'offshoot_bytes_total{job="offshoot",direction="server_to_client"}')" 'v > 0'
check 'count(offshoot_bytes_total)' "$(prom_value 'count(offshoot_bytes_total{job="offshoot"})')" 'v == 2'
check 'offshoot_errors_total{kind="routing"}' \
    "$(prom_value 'offshoot_errors_total{job="offshoot",kind="routing"}')" 'v >= 1'
health=$(curl -fsS --max-time 10 "http://127.0.0.1:$PROM_PORT/api/v1/targets" | python3 -c '
import json, sys
t = [t for t in json.load(sys.stdin)["data"]["activeTargets"] if t["labels"].get("job") == "offshoot"]
print(t[0]["health"] + ((" (" + t[0]["lastError"] + ")") if t and t[0].get("lastError") else "") if t else "no target")
')
if [[ $health == up ]]; then
    PASSED=$((PASSED + 1))
    echo "pass: target health = up"
else
    FAILED=$((FAILED + 1))
    echo "FAIL: target health = $health (expected up)"
fi

echo
echo "offshoot series Prometheus holds:"
prom_query '{job="offshoot",__name__=~"offshoot_.*"}' | sort | sed 's/^/  /'

echo
echo "$PASSED passed, $FAILED failed"
((FAILED == 0)) || exit 1
