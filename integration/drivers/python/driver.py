"""psycopg 3 through Offshoot: every check the driver suite makes, on one branch.

Connection parameters come from PGHOST, PGPORT, PGUSER and PGDATABASE (libpq reads
them); EXPECT_DB is the clone the branch must land on. Prints one line per check
and exits non-zero with the reason at the first mismatch.
"""

import os
import sys
import threading
import time

import psycopg
from psycopg import errors

EXPECT_DB = os.environ["EXPECT_DB"]


class Mismatch(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Mismatch(what)


def ok(what):
    print(f"ok {what}", flush=True)


def connect():
    return psycopg.connect("", autocommit=True, connect_timeout=30)


def copy_rows():
    """5,000 rows (about 155 kB) of COPY text format, with escapes, non-ASCII text and
    a NULL: enough to span many protocol messages and relay reads."""
    lines = []
    for i in range(1000, 6000):
        name = "\\N" if i == 1042 else f"row-{i}-\u00e9\\ttab\\\\slash"
        lines.append(f"{i}\t{name}\t{i % 7}\n")
    return "".join(lines).encode()


def main():
    conn = connect()

    n = conn.execute("SELECT count(*) FROM items").fetchone()[0]
    check(n == 3, f"source table items: expected 3 rows in the clone, got {n}")
    ok("clone has the source's rows")

    conn.execute("DROP TABLE IF EXISTS drv_items")
    conn.execute("CREATE TABLE drv_items (id int PRIMARY KEY, name text, qty int)")
    conn.execute("INSERT INTO drv_items VALUES (1, 'one', 10), (2, 'two', 20), (3, 'three', 30)")
    n = conn.execute("SELECT count(*) FROM drv_items").fetchone()[0]
    check(n == 3, f"after insert: expected 3 rows, got {n}")
    ok("create table and insert")

    # Server-side prepared statements: prepare=True prepares on first use.
    for i in (4, 5, 6):
        conn.execute(
            "INSERT INTO drv_items VALUES (%s, %s, %s)", (i, f"n{i}", i * 10), prepare=True
        )
    for _ in range(2):
        for i, want in ((1, "one"), (2, "two"), (5, "n5")):
            got = conn.execute(
                "SELECT name FROM drv_items WHERE id = %s", (i,), prepare=True
            ).fetchone()
            check(got == (want,), f"prepared select id={i}: expected {want!r}, got {got!r}")
    prepared = conn.execute(
        "SELECT count(*) FROM pg_prepared_statements WHERE NOT from_sql"
    ).fetchone()[0]
    check(prepared >= 2, f"expected >= 2 protocol-level prepared statements, got {prepared}")
    ok(f"prepared statements ({prepared} server-side)")

    with conn.transaction(force_rollback=True):
        conn.execute("INSERT INTO drv_items VALUES (100, 'tx', 1)")
        n = conn.execute("SELECT count(*) FROM drv_items").fetchone()[0]
        check(n == 7, f"inside transaction: expected 7 rows, got {n}")
    n = conn.execute("SELECT count(*) FROM drv_items WHERE id = 100").fetchone()[0]
    check(n == 0, "row inserted in a rolled-back transaction is still there")
    n = conn.execute("SELECT count(*) FROM drv_items").fetchone()[0]
    check(n == 6, f"after rollback: expected 6 rows, got {n}")
    ok("transaction rollback")

    data = copy_rows()
    with conn.cursor() as cur:
        with cur.copy("COPY drv_items (id, name, qty) FROM STDIN") as copy:
            copy.write(data)
        out = bytearray()
        with cur.copy(
            "COPY (SELECT id, name, qty FROM drv_items WHERE id >= 1000 ORDER BY id) TO STDOUT"
        ) as copy:
            for chunk in copy:
                out += chunk
    check(bytes(out) == data, f"COPY round trip differs: sent {len(data)} bytes, got {len(out)}")
    n = conn.execute("SELECT count(*) FROM drv_items WHERE name IS NULL").fetchone()[0]
    check(n == 1, f"COPY NULL: expected 1 NULL name, got {n}")
    ok("COPY FROM STDIN / TO STDOUT round trip")

    listener = connect()
    listener.execute("LISTEN drv_chan")
    payload = "payload-python-\u00e9"
    conn.execute("SELECT pg_notify('drv_chan', %s)", (payload,))
    got = [(n.channel, n.payload) for n in listener.notifies(timeout=5.0, stop_after=1)]
    check(got == [("drv_chan", payload)], f"LISTEN/NOTIFY: expected one {payload!r}, got {got!r}")
    ok("LISTEN/NOTIFY")

    # conn.cancel() sends a protocol CancelRequest (with the key the proxy issued).
    monitor = listener
    victim = connect()

    def cancel_when_running():
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            running = monitor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND state = 'active' AND query = 'SELECT pg_sleep(30)'"
            ).fetchone()[0]
            if running:
                victim.cancel()
                return
            time.sleep(0.05)

    t = threading.Thread(target=cancel_when_running)
    start = time.monotonic()
    t.start()
    state = None
    try:
        victim.execute("SELECT pg_sleep(30)")
    except errors.QueryCanceled as e:
        state = e.sqlstate
    except psycopg.Error as e:
        raise Mismatch(f"cancel: expected SQLSTATE 57014, got {e.sqlstate}: {e}") from e
    elapsed = time.monotonic() - start
    t.join()
    check(state == "57014", "cancel: pg_sleep(30) finished without being cancelled")
    check(elapsed < 10, f"cancel took {elapsed:.1f}s (limit 10s)")
    got = victim.execute("SELECT 1").fetchone()
    check(got == (1,), "session unusable after cancel")
    ok(f"cancel (57014 after {elapsed:.1f}s)")

    db = conn.execute("SELECT current_database()").fetchone()[0]
    check(db == EXPECT_DB, f"current_database(): expected {EXPECT_DB!r}, got {db!r}")
    ok(f"current_database() = {db}")

    # The pid in BackendKeyData is the server session's own.
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    check(conn.info.backend_pid == pid, f"backend_pid {conn.info.backend_pid} != pg_backend_pid() {pid}")
    ok(f"backend_pid = pg_backend_pid() = {pid}")

    for c in (victim, listener, conn):
        c.close()


if __name__ == "__main__":
    try:
        main()
    except Mismatch as e:
        print(f"FAIL: {e}", file=sys.stderr)
        sys.exit(1)
    except psycopg.Error as e:
        print(f"FAIL: {type(e).__name__} (SQLSTATE {e.sqlstate}): {e}", file=sys.stderr)
        sys.exit(1)
