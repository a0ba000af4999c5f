"""Idle-connection client of benches/idle_conns.sh: opens idle sessions through
Offshoot in steps and samples the proxy's memory at each step.

  run     for each level in --levels (ascending), opens connections until that
          many are open, waits --settle seconds, and samples the proxy process
          (/proc/<pid>/status: VmRSS, RssAnon, RssFile, VmHWM, Threads), the
          proxy's own count (/healthz client_connections) and MemAvailable. Then
          closes them all, waits until the proxy counts none, and samples once
          more; --rounds > 1 opens and closes the top level again that many times
          (memory growing from round to round is a leak). Every connection is a complete
          session (startup, authentication, ReadyForQuery), then sends nothing.
          Opening stops early when MemAvailable falls below --min-available-mib or
          connections keep failing; the result says so.
  report  prints the Markdown table of a `run` result.

Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.request
from collections import Counter

import psycopg

from client_common import error_text, log


def proc_status(pid: int) -> dict[str, int]:
    """The kB fields (and Threads) of /proc/<pid>/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM", "Threads"):
                out[key] = int(rest.split()[0])
    return out


def mem_available_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def healthz(admin_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/healthz", timeout=10) as r:
        return json.load(r)


async def sample(args, label: str, target: int, open_now: int, note: str | None) -> dict:
    """Median of three samples one second apart, after --settle seconds."""
    await asyncio.sleep(args.settle)
    samples = []
    for i in range(3):
        if i:
            await asyncio.sleep(1)
        samples.append(proc_status(args.proxy_pid))
    mid = {k: sorted(s[k] for s in samples)[1] for k in samples[0]}
    try:
        proxy_count = healthz(args.admin_port).get("client_connections")
    except Exception as e:  # noqa: BLE001
        proxy_count = f"unavailable: {error_text(e)}"
    row = {
        "label": label,
        "target": target,
        "open": open_now,
        "proxy_client_connections": proxy_count,
        "mem_available_kib": mem_available_kib(),
        "note": note,
        **mid,
    }
    log(
        f"idle: {label}: {open_now} open, proxy sees {proxy_count}, VmRSS {mid['VmRSS'] / 1024:.1f} MiB, "
        f"MemAvailable {row['mem_available_kib'] / 1048576:.1f} GiB"
    )
    return row


async def server_sessions(args) -> int | str:
    """Sessions PostgreSQL itself has open on the branch's database."""
    try:
        async with await psycopg.AsyncConnection.connect(
            host="127.0.0.1", port=args.pg_port, user=args.user, dbname="postgres",
            sslmode="disable", gssencmode="disable", connect_timeout=10, autocommit=True,
        ) as c:
            cur = await c.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (args.clone,)
            )
            return (await cur.fetchone())[0]
    except Exception as e:  # noqa: BLE001
        return f"unavailable: {error_text(e)}"


async def wait_drained(args, t0: float) -> dict:
    """Polls until the proxy counts no client connection (or --drain-timeout);
    returns when that happened and a trace of (seconds, proxy count, server sessions)."""
    trace = []
    drained_s = None
    while time.monotonic() - t0 < args.drain_timeout:
        try:
            count = healthz(args.admin_port).get("client_connections")
        except Exception as e:  # noqa: BLE001
            count = f"unavailable: {error_text(e)}"
        server = await server_sessions(args)
        t = round(time.monotonic() - t0, 1)
        trace.append((t, count, server))
        if count == 0:
            drained_s = t
            break
        await asyncio.sleep(1.0)
    log(
        f"idle: proxy count 0 after {drained_s}s" if drained_s is not None
        else f"idle: proxy still counts {trace[-1][1]} after {args.drain_timeout:.0f}s"
    )
    return {"drained_seconds": drained_s, "trace": trace}


async def run(args) -> dict:
    conns: list[psycopg.AsyncConnection] = []
    errors: Counter = Counter()
    rows = []
    floor_kib = args.min_available_mib * 1024
    stopped = False
    started = time.time()

    async def open_one() -> None:
        try:
            conns.append(
                await psycopg.AsyncConnection.connect(
                    host="127.0.0.1",
                    port=args.port,
                    user=args.user,
                    dbname=args.db,
                    sslmode="disable",
                    gssencmode="disable",
                    connect_timeout=args.connect_timeout,
                    application_name="offshoot-idle",
                )
            )
        except Exception as e:  # noqa: BLE001
            errors[error_text(e)] += 1

    async def open_until(level: int) -> str | None:
        """Opens connections until `level` are open; a note when it stopped early."""
        while len(conns) < level:
            avail = mem_available_kib()
            if avail < floor_kib:
                return (
                    f"stopped at {len(conns)}: MemAvailable {avail / 1024:.0f} MiB fell below "
                    f"the {args.min_available_mib} MiB floor"
                )
            failures_before = sum(errors.values())
            batch = min(args.concurrency, level - len(conns))
            await asyncio.gather(*(open_one() for _ in range(batch)))
            if sum(errors.values()) - failures_before == batch:
                return f"stopped at {len(conns)}: a whole batch of {batch} connections failed"
            if sum(errors.values()) > args.max_errors:
                return f"stopped at {len(conns)}: more than {args.max_errors} failed connections"
        return None

    async def close_all(round_label: str) -> dict:
        n = len(conns)
        t0 = time.monotonic()
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
        conns.clear()
        closed_s = time.monotonic() - t0
        log(f"idle: closed {n} connections in {closed_s:.1f}s; waiting for the proxy to see them gone")
        drain = await wait_drained(args, t0)
        rows.append(await sample(args, f"after closing all {n}{round_label} (proxy counts 0)", 0, 0, None))
        return {"closed": n, "close_seconds": round(closed_s, 1), **drain}

    rows.append(await sample(args, "baseline: proxy started, no client connection", 0, 0, None))
    top = 0
    for level in args.levels:
        if level == 0 or stopped:
            continue
        t0 = time.monotonic()
        note = await open_until(level)
        elapsed = time.monotonic() - t0
        log(f"idle: {len(conns)} connections open ({elapsed:.1f}s for this step)")
        if note:
            log(f"idle: {note}")
            stopped = True
        top = len(conns)
        row = await sample(args, f"{level} idle connections", level, len(conns), note)
        row["open_seconds"] = round(elapsed, 1)
        rows.append(row)
    closes = [await close_all("")]
    # Later rounds open and close the top level again: memory that keeps growing
    # from round to round is a leak; memory that stays put is the allocator
    # keeping what it was once given.
    for r in range(2, args.rounds + 1):
        t0 = time.monotonic()
        note = await open_until(top)
        log(f"idle: round {r}: {len(conns)} connections open ({time.monotonic() - t0:.1f}s)")
        rows.append(await sample(args, f"{top} idle connections, round {r}", top, len(conns), note))
        closes.append(await close_all(f", round {r}"))
    return {
        "closes": closes,
        "rows": rows,
        "errors": dict(errors.most_common()),
        "levels": args.levels,
        "rounds": args.rounds,
        "seconds": round(time.time() - started, 1),
    }


def cmd_run(args) -> int:
    args.levels = sorted(set(args.levels))
    out = asyncio.run(run(args))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    return 0


def cmd_report(args) -> int:
    with open(args.result) as f:
        res = json.load(f)
    rows = res["rows"]
    base = rows[0]["VmRSS"]
    p = print
    p("| proxy state | connections open | proxy's count (/healthz) | VmRSS MiB | RssAnon MiB | Δ VmRSS vs no connection, MiB | Δ VmRSS per connection, KiB | threads | MemAvailable GiB |")
    p("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        delta = r["VmRSS"] - base
        per = f"{delta / r['open']:.1f}" if r["open"] else "—"
        p(
            f"| {r['label']} | {r['open']} | {r['proxy_client_connections']} | {r['VmRSS'] / 1024:.1f} | "
            f"{r.get('RssAnon', 0) / 1024:.1f} | {delta / 1024:+.1f} | {per} | {r.get('Threads', '?')} | "
            f"{r['mem_available_kib'] / 1048576:.1f} |"
        )
    p()
    opened = [r for r in rows if r["open"] and "round" not in r["label"]]
    if len(opened) >= 2:
        a, b = opened[-2], opened[-1]
        marginal = (b["VmRSS"] - a["VmRSS"]) / (b["open"] - a["open"]) if b["open"] != a["open"] else 0
        p(
            f"Marginal cost from {a['open']} to {b['open']} connections: {marginal:.1f} KiB of proxy RSS "
            "per connection."
        )
        p()
    tops = [r for r in rows if r["open"] and r["open"] == max(x["open"] for x in rows)]
    afters = [r for r in rows if r["label"].startswith("after closing")]
    if len(afters) > 1:
        p(
            f"Leak check, {len(afters)} rounds of opening and closing {tops[0]['open']} connections: VmRSS with them open "
            + " → ".join(f"{r['VmRSS'] / 1024:.1f}" for r in tops)
            + " MiB; after closing them "
            + " → ".join(f"{r['VmRSS'] / 1024:.1f}" for r in afters)
            + " MiB."
        )
        p()
    for i, drain in enumerate(res.get("closes", []), start=1):
        trace = drain["trace"]
        round_label = f" (round {i})" if len(res["closes"]) > 1 else ""
        when = (
            f"the proxy counted 0 client connections {drain['drained_seconds']} s after the client began closing them"
            if drain["drained_seconds"] is not None
            else f"the proxy still counted {trace[-1][1]} client connections {trace[-1][0]} s after the client began closing them"
        )
        p(f"Closing{round_label}: the client closed {drain['closed']} connections in {drain['close_seconds']} s; {when}.")
        if i == 1 and len(trace) > 1:
            p()
            p("| seconds after closing began | proxy's count (/healthz) | server sessions on the branch (pg_stat_activity) |")
            p("|---:|---:|---:|")
            step = max(1, len(trace) // 12)
            for j, (t, count, server) in enumerate(trace):
                if j % step == 0 or j == len(trace) - 1:
                    p(f"| {t} | {count} | {server} |")
        p()
    notes = [r["note"] for r in rows if r.get("note")]
    for n in notes:
        p(f"**Note:** {n}.")
        p()
    if res["errors"]:
        p("Failed connections:")
        p()
        p("| count | error |")
        p("|---:|---|")
        for msg, n in res["errors"].items():
            p(f"| {n} | `{msg}` |")
    else:
        p("Failed connections: none.")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--admin-port", type=int, required=True)
    r.add_argument("--proxy-pid", type=int, required=True)
    r.add_argument("--db", required=True)
    r.add_argument("--pg-port", type=int, required=True, help="PostgreSQL itself, to count its sessions")
    r.add_argument("--clone", required=True, help="the branch's database name on the server")
    r.add_argument("--drain-timeout", type=float, default=180.0)
    r.add_argument("--user", default="postgres")
    r.add_argument("--levels", type=lambda s: [int(x) for x in s.replace(",", " ").split()], required=True)
    r.add_argument("--concurrency", type=int, default=50)
    r.add_argument("--connect-timeout", type=int, default=60)
    r.add_argument("--min-available-mib", type=int, default=2048)
    r.add_argument("--max-errors", type=int, default=100)
    r.add_argument("--settle", type=float, default=3.0)
    r.add_argument("--rounds", type=int, default=2, help="open/close rounds of the top level (leak check)")
    r.add_argument("--out", required=True)
    p = sub.add_parser("report")
    p.add_argument("--result", required=True)
    args = ap.parse_args()
    return {"run": cmd_run, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
