"""Load client of benches/load.sh: many concurrent psycopg 3 connections through
Offshoot, then a watch of the branches' idle expiry.

Subcommands (each writes JSON to --out; progress goes to stderr):

  load    CLIENTS connections spread round-robin over BRANCHES branches
          (<source>.<prefix>NN), all opened at once, so the first connections to a
          branch wait for its creation. When every client has connected (or given
          up), all of them run short transactions for DURATION seconds:
          BEGIN; UPDATE accounts ...; SELECT ... ; COMMIT on a random row. Then
          every connection is closed, and the time each branch's last one closed
          is recorded.
  expiry  polls the admin API's /api/v1/branches until the branches of a `load`
          result are gone, and records when each disappeared.
  report  prints the Markdown tables of a `load` and an `expiry` result.

Worker processes (--workers) each run an asyncio loop with a share of the
clients, so the client side can use more than one core. Only 127.0.0.1 is ever
contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import random
import resource
import sys
import time
import urllib.request
from array import array
from collections import Counter

import psycopg

from client_common import error_text, log


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    total = sum(vals[:8])  # guest time is already counted in user
    return total - idle, total


def percentile(sorted_vals, q: float):
    """Nearest-rank percentile of an already sorted sequence; None when empty."""
    if not sorted_vals:
        return None
    k = max(0, min(len(sorted_vals) - 1, math.ceil(q / 100 * len(sorted_vals)) - 1))
    return sorted_vals[k]


# --- load ---------------------------------------------------------------------


def branch_name(args, i: int) -> str:
    return f"{args.prefix}{i:02d}"


class Client:
    """One connection and what happened to it."""

    def __init__(self, idx: int, branch: str):
        self.idx = idx
        self.branch = branch
        self.conn: psycopg.AsyncConnection | None = None
        self.closed_at: float | None = None


async def worker_main(args, indices, pipe) -> None:
    loop = asyncio.get_running_loop()
    clients = [Client(i, branch_name(args, i % args.branches)) for i in indices]
    errors: Counter = Counter()
    connect_s = array("d")
    latency_s = array("d")
    txns = 0  # transactions started before the end and committed

    async def connect(c: Client) -> psycopg.AsyncConnection:
        return await psycopg.AsyncConnection.connect(
            host="127.0.0.1",
            port=args.port,
            user=args.user,
            dbname=f"{args.source}.{c.branch}",
            sslmode="disable",
            gssencmode="disable",
            connect_timeout=args.connect_timeout,
            autocommit=True,
            application_name="offshoot-load",
        )

    async def first_connect(c: Client) -> None:
        t0 = time.monotonic()
        try:
            c.conn = await connect(c)
            connect_s.append(time.monotonic() - t0)
        except Exception as e:  # noqa: BLE001 - every failure is a result
            errors[f"connect: {error_text(e)}"] += 1

    await asyncio.gather(*(first_connect(c) for c in clients))
    pipe.send(("ready", sum(c.conn is not None for c in clients)))
    start_at, end_at = await loop.run_in_executor(None, pipe.recv)

    async def run(c: Client) -> None:
        nonlocal txns
        rng = random.Random(c.idx)
        await asyncio.sleep(max(0.0, start_at - time.time()))
        while time.time() < end_at:
            if c.conn is None or c.conn.closed:
                # A connection lost (or never made) is made again; each failure counts.
                try:
                    c.conn = await connect(c)
                except Exception as e:  # noqa: BLE001
                    errors[f"reconnect: {error_text(e)}"] += 1
                    await asyncio.sleep(0.5)
                    continue
            key = rng.randint(1, args.rows)
            t0 = time.monotonic()
            try:
                async with c.conn.transaction():
                    cur = c.conn.cursor()
                    await cur.execute(
                        "UPDATE accounts SET balance = balance + 1 WHERE id = %s", (key,)
                    )
                    await cur.execute("SELECT balance FROM accounts WHERE id = %s", (key,))
                    await cur.fetchone()
                latency_s.append(time.monotonic() - t0)
                txns += 1
            except Exception as e:  # noqa: BLE001
                errors[f"transaction: {error_text(e)}"] += 1
                await asyncio.sleep(0.1)
        if c.conn is not None:
            try:
                await c.conn.close()
            except Exception as e:  # noqa: BLE001
                errors[f"close: {error_text(e)}"] += 1
            c.closed_at = time.time()

    await asyncio.gather(*(run(c) for c in clients))
    last_close: dict[str, float] = {}
    for c in clients:
        if c.closed_at is not None:
            last_close[c.branch] = max(last_close.get(c.branch, 0.0), c.closed_at)
    pipe.send(
        (
            "done",
            {
                "txns": txns,
                "errors": dict(errors),
                "connect_s": connect_s,
                "latency_s": latency_s,
                "last_close": last_close,
            },
        )
    )


def worker_entry(args, indices, pipe) -> None:
    try:
        asyncio.run(worker_main(args, indices, pipe))
    except BaseException as e:  # report, then let the parent decide
        pipe.send(("crashed", error_text(e)))
        raise


def cmd_load(args) -> int:
    ctx = mp.get_context("fork")
    workers = []
    for w in range(args.workers):
        parent_end, child_end = ctx.Pipe()
        indices = list(range(w, args.clients, args.workers))
        p = ctx.Process(target=worker_entry, args=(args, indices, child_end), daemon=True)
        p.start()
        workers.append((p, parent_end))

    def recv(pipe, timeout):
        if not pipe.poll(timeout):
            raise SystemExit(f"a worker sent nothing for {timeout:.0f}s; giving up")
        kind, payload = pipe.recv()
        if kind == "crashed":
            raise SystemExit(f"a worker crashed: {payload}")
        return payload

    log(f"load: opening {args.clients} connections to {args.branches} branches at once")
    t0 = time.time()
    connected = sum(recv(pipe, args.connect_timeout + 60) for _, pipe in workers)
    connect_phase = time.time() - t0
    log(f"load: {connected}/{args.clients} connected in {connect_phase:.1f}s; running {args.duration}s of transactions")
    start_at = time.time() + 0.5
    end_at = start_at + args.duration
    for _, pipe in workers:
        pipe.send((start_at, end_at))
    time.sleep(max(0.0, start_at - time.time()))
    busy0, total0 = cpu_ticks()
    time.sleep(max(0.0, end_at - time.time()))
    busy1, total1 = cpu_ticks()
    results = [recv(pipe, 120) for _, pipe in workers]
    for p, _ in workers:
        p.join(10)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)

    errors: Counter = Counter()
    connect_s: list[float] = []
    latency_s: list[float] = []
    last_close: dict[str, float] = {}
    txns = 0
    for r in results:
        errors.update(r["errors"])
        connect_s.extend(r["connect_s"])
        latency_s.extend(r["latency_s"])
        txns += r["txns"]
        for b, t in r["last_close"].items():
            last_close[b] = max(last_close.get(b, 0.0), t)
    connect_s.sort()
    latency_s.sort()

    def ms(v):
        return None if v is None else round(v * 1000, 2)

    out = {
        "clients": args.clients,
        "branches": [branch_name(args, i) for i in range(args.branches)],
        "source": args.source,
        "workers": args.workers,
        "duration_s": args.duration,
        "connected": connected,
        "connect_phase_s": round(connect_phase, 2),
        "connect_ms": {
            "p50": ms(percentile(connect_s, 50)),
            "p99": ms(percentile(connect_s, 99)),
            "max": ms(connect_s[-1] if connect_s else None),
        },
        "txns": txns,
        "tps": round(txns / args.duration, 1),
        "latency_ms": {
            "p50": ms(percentile(latency_s, 50)),
            "p99": ms(percentile(latency_s, 99)),
            "max": ms(latency_s[-1] if latency_s else None),
        },
        "errors": dict(errors.most_common()),
        "error_count": sum(errors.values()),
        "machine_busy_pct": round(100 * (busy1 - busy0) / max(1, total1 - total0), 1),
        "client_cpu_s": round(children.ru_utime + children.ru_stime, 1),
        "cpus": os.cpu_count(),
        "last_close": last_close,
        "all_closed_at": max(last_close.values()) if last_close else None,
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    log(
        f"load: {txns} transactions ({out['tps']}/s), {out['error_count']} errors, "
        f"latency p50 {out['latency_ms']['p50']} ms p99 {out['latency_ms']['p99']} ms"
    )
    return 0


# --- expiry -------------------------------------------------------------------


def cmd_expiry(args) -> int:
    with open(args.load) as f:
        load = json.load(f)
    source = load["source"]
    waiting = set(load["branches"])
    gone: dict[str, float] = {}
    states: dict[str, str] = {}
    url = f"http://127.0.0.1:{args.admin_port}/api/v1/branches"
    deadline = time.time() + args.timeout
    polls = poll_errors = 0
    log(f"expiry: watching {len(waiting)} branches (timeout {args.timeout:.0f}s)")
    while waiting and time.time() < deadline:
        polls += 1
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                listing = json.load(resp)
        except Exception as e:  # noqa: BLE001
            poll_errors += 1
            log(f"expiry: GET {url} failed: {error_text(e)}")
            time.sleep(args.poll)
            continue
        now = time.time()
        present = {b["branch"]: b for b in listing if b.get("source") == source}
        for name in list(waiting):
            if name in present:
                states[name] = str(present[name].get("state"))
            else:
                gone[name] = now
                waiting.discard(name)
        time.sleep(args.poll)
    out = {
        "gone_at": gone,
        "never_gone": sorted(waiting),
        "last_state": {b: states.get(b) for b in sorted(waiting)},
        "polls": polls,
        "poll_errors": poll_errors,
        "poll_interval_s": args.poll,
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    log(f"expiry: {len(gone)} gone, {len(waiting)} still there")
    return 0


# --- report -------------------------------------------------------------------


def cmd_report(args) -> int:
    with open(args.load) as f:
        load = json.load(f)
    with open(args.expiry) as f:
        exp = json.load(f)
    p = print
    lat, con = load["latency_ms"], load["connect_ms"]
    p("| measure | value |")
    p("|---|---:|")
    p(f"| client connections (connected / attempted) | {load['connected']} / {load['clients']} |")
    p(f"| branches | {len(load['branches'])} |")
    p(f"| errors | {load['error_count']} |")
    p(f"| transactions in {load['duration_s']} s | {load['txns']} |")
    p(f"| throughput, txn/s | {load['tps']:.0f} |")
    p(f"| transaction latency p50 / p99 / max, ms | {lat['p50']} / {lat['p99']} / {lat['max']} |")
    p(f"| connect time p50 / p99 / max, ms (first connects, incl. branch creation) | {con['p50']} / {con['p99']} / {con['max']} |")
    p(f"| all clients connected after, s | {load['connect_phase_s']} |")
    p(f"| machine CPU busy during the {load['duration_s']} s of transactions (all {load['cpus']} CPUs) | {load['machine_busy_pct']}% |")
    p(f"| client processes' CPU (connect + transactions + close), s | {load['client_cpu_s']} |")
    p()
    if load["errors"]:
        p("Distinct errors:")
        p()
        p("| count | error |")
        p("|---:|---|")
        for msg, n in load["errors"].items():
            p(f"| {n} | `{msg}` |")
        p()
    else:
        p("Distinct errors: none.")
        p()

    idle, interval, slack = args.idle_expire, args.interval, args.slack
    lo, hi = idle, idle + interval + slack
    all_closed = load["all_closed_at"]
    p(
        f"Expiry after all clients closed (idle_expire = {idle:g} s, reaper interval = {interval:g} s; "
        f"on schedule = {lo:g} s to {hi:g} s after the branch's last connection closed, "
        f"polling every {exp['poll_interval_s']:g} s):"
    )
    p()
    p("| branch | gone after its last close, s | gone after all clients closed, s | on schedule |")
    p("|---|---:|---:|---|")
    deltas = []
    for b in load["branches"]:
        closed = load["last_close"].get(b)
        gone = exp["gone_at"].get(b)
        if gone is None or closed is None:
            why = f"still there (state {exp['last_state'].get(b)})" if gone is None else "never closed"
            p(f"| {b} | — | — | **no: {why}** |")
            continue
        d = gone - closed
        deltas.append(d)
        ok = "yes" if lo <= d <= hi else ("**no: too early**" if d < lo else "**no: too late**")
        p(f"| {b} | {d:.1f} | {gone - all_closed:.1f} | {ok} |")
    p()
    if deltas:
        p(
            f"Gone after their last close: min {min(deltas):.1f} s, median "
            f"{sorted(deltas)[len(deltas) // 2]:.1f} s, max {max(deltas):.1f} s."
        )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    a = sub.add_parser("load")
    a.add_argument("--port", type=int, required=True)
    a.add_argument("--user", default="postgres")
    a.add_argument("--source", default="src")
    a.add_argument("--prefix", default="load-")
    a.add_argument("--branches", type=int, default=20)
    a.add_argument("--clients", type=int, default=1000)
    a.add_argument("--duration", type=int, default=60)
    a.add_argument("--rows", type=int, default=1000)
    a.add_argument("--workers", type=int, default=2)
    a.add_argument("--connect-timeout", type=int, default=120)
    a.add_argument("--out", required=True)

    e = sub.add_parser("expiry")
    e.add_argument("--admin-port", type=int, required=True)
    e.add_argument("--load", required=True)
    e.add_argument("--timeout", type=float, required=True)
    e.add_argument("--poll", type=float, default=0.1)
    e.add_argument("--out", required=True)

    r = sub.add_parser("report")
    r.add_argument("--load", required=True)
    r.add_argument("--expiry", required=True)
    r.add_argument("--idle-expire", type=float, required=True)
    r.add_argument("--interval", type=float, required=True)
    r.add_argument("--slack", type=float, default=2.0)

    args = ap.parse_args()
    return {"load": cmd_load, "expiry": cmd_expiry, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
