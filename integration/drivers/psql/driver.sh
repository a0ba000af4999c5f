#!/usr/bin/env bash
# psql through Offshoot: every check the driver suite makes, on one branch.
#
# Connection parameters come from PGHOST, PGPORT, PGUSER and PGDATABASE; EXPECT_DB
# is the clone the branch must land on. Prints one line per check and exits
# non-zero with the reason at the first mismatch.
set -euo pipefail

work=$(mktemp -d)
bg=""
cleanup() {
    [[ -n $bg ]] && kill "$bg" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

fail() {
    printf 'FAIL: %s\n' "$*" >&2
    exit 1
}
ok() { printf 'ok %s\n' "$*"; }

# One value (or rows, unaligned) from a query; any error stops the script.
q() { psql -X -q -v ON_ERROR_STOP=1 -At -c "$1"; }

expect() {
    local what=$1 want=$2 got=$3
    [[ $got == "$want" ]] || fail "$what: expected '$want', got '$got'"
}

# The branch is new: the proxy says so while it makes it (NoticeResponse after
# AuthenticationOk), and psql prints that on stderr.
first=$(psql -X -At -c 'SELECT 1' 2>&1) || fail "first connection: $first"
[[ $first == *"NOTICE:  creating branch"* ]] ||
    fail "first connection to a new branch: expected the proxy's notice, got: $first"
ok "progress notices while the branch is made"

expect "source table items" 3 "$(q 'SELECT count(*) FROM items')"
ok "clone has the source's rows"

psql -X -q -v ON_ERROR_STOP=1 <<'SQL'
SET client_min_messages = warning;
DROP TABLE IF EXISTS drv_items;
CREATE TABLE drv_items (id int PRIMARY KEY, name text, qty int);
INSERT INTO drv_items VALUES (1, 'one', 10), (2, 'two', 20), (3, 'three', 30);
SQL
expect "after insert" 3 "$(q 'SELECT count(*) FROM drv_items')"
ok "create table and insert"

# SQL-level PREPARE/EXECUTE: psql has no protocol-level prepared statements.
got=$(psql -X -q -v ON_ERROR_STOP=1 -At <<'SQL'
PREPARE ins(int, text, int) AS INSERT INTO drv_items VALUES ($1, $2, $3);
EXECUTE ins(4, 'n4', 40);
EXECUTE ins(5, 'n5', 50);
EXECUTE ins(6, 'n6', 60);
PREPARE sel(int) AS SELECT name FROM drv_items WHERE id = $1;
EXECUTE sel(1);
EXECUTE sel(2);
EXECUTE sel(5);
EXECUTE sel(1);
EXECUTE sel(2);
EXECUTE sel(5);
SELECT count(*) FROM pg_prepared_statements WHERE name IN ('ins', 'sel');
SQL
)
expect "prepared statements" "one two n5 one two n5 2" "${got//$'\n'/ }"
ok "prepared statements (PREPARE/EXECUTE)"

got=$(psql -X -q -v ON_ERROR_STOP=1 -At <<'SQL'
BEGIN;
INSERT INTO drv_items VALUES (100, 'tx', 1);
SELECT count(*) FROM drv_items;
ROLLBACK;
SQL
)
expect "inside transaction" 7 "$got"
expect "after rollback (id 100)" 0 "$(q 'SELECT count(*) FROM drv_items WHERE id = 100')"
expect "after rollback" 6 "$(q 'SELECT count(*) FROM drv_items')"
ok "transaction rollback"

# 5,000 rows (about 155 kB) of COPY text format, with escapes, non-ASCII text and
# a NULL: enough to span many protocol messages and relay reads.
for ((i = 1000; i < 6000; i++)); do
    if ((i == 1042)); then name='\N'; else name="row-$i-é\\ttab\\\\slash"; fi
    printf '%s\t%s\t%s\n' "$i" "$name" $((i % 7))
done >"$work/copy.in"
psql -X -q -v ON_ERROR_STOP=1 -c 'COPY drv_items (id, name, qty) FROM STDIN' <"$work/copy.in"
psql -X -q -v ON_ERROR_STOP=1 \
    -c 'COPY (SELECT id, name, qty FROM drv_items WHERE id >= 1000 ORDER BY id) TO STDOUT' \
    >"$work/copy.out"
cmp -s "$work/copy.in" "$work/copy.out" ||
    fail "COPY round trip differs: sent $(wc -c <"$work/copy.in") bytes, got $(wc -c <"$work/copy.out")"
expect "COPY NULL" 1 "$(q 'SELECT count(*) FROM drv_items WHERE name IS NULL')"
ok "COPY FROM STDIN / TO STDOUT round trip"

# The listener LISTENs, says so through a file, waits (in its own shell escape)
# until the notification has been sent, then runs a query: psql prints
# notifications that arrived by the time that query completes.
psql -X -q -v ON_ERROR_STOP=1 >"$work/listen.out" 2>&1 <<SQL &
LISTEN drv_chan;
\! touch '$work/listening'
\! for i in \$(seq 200); do [ -e '$work/notified' ] && break; sleep 0.05; done
SELECT 1;
SQL
bg=$!
for ((i = 0; i < 200; i++)); do
    [[ -e $work/listening ]] && break
    sleep 0.05
done
[[ -e $work/listening ]] || fail "LISTEN/NOTIFY: listener did not start: $(cat "$work/listen.out")"
q "NOTIFY drv_chan, 'payload-psql-é'" >/dev/null
touch "$work/notified"
wait "$bg" || fail "LISTEN/NOTIFY: listener failed: $(cat "$work/listen.out")"
bg=""
grep -q 'Asynchronous notification "drv_chan" with payload "payload-psql-é" received' "$work/listen.out" ||
    fail "LISTEN/NOTIFY: no notification; listener printed: $(cat "$work/listen.out")"
ok "LISTEN/NOTIFY"

# SIGINT makes psql send a protocol CancelRequest (with the key the proxy issued)
# for the running query; VERBOSITY=verbose prints the SQLSTATE.
start=$(date +%s%N)
psql -X -v VERBOSITY=verbose -c 'SELECT pg_sleep(30)' >"$work/cancel.out" 2>&1 &
bg=$!
sent=""
for ((i = 0; i < 200; i++)); do
    running=$(q "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
                 AND state = 'active' AND query = 'SELECT pg_sleep(30)'")
    if [[ $running == 1 ]]; then
        kill -INT "$bg"
        sent=1
        break
    fi
    sleep 0.05
done
[[ -n $sent ]] || fail "cancel: pg_sleep(30) never showed up in pg_stat_activity"
rc=0
wait "$bg" || rc=$?
bg=""
elapsed_ms=$((($(date +%s%N) - start) / 1000000))
((rc != 0)) || fail "cancel: pg_sleep(30) finished without being cancelled"
grep -q 'ERROR:  57014: canceling statement due to user request' "$work/cancel.out" ||
    fail "cancel: expected SQLSTATE 57014, psql printed: $(cat "$work/cancel.out")"
((elapsed_ms < 10000)) || fail "cancel took ${elapsed_ms}ms (limit 10s)"
ok "cancel (57014 after $((elapsed_ms / 1000)).$((elapsed_ms % 1000 / 100))s)"

expect "current_database()" "$EXPECT_DB" "$(q 'SELECT current_database()')"
ok "current_database() = $EXPECT_DB"
