#!/usr/bin/env python3
"""The web console in a real browser.

Starts the real `offshoot` binary on the demo configuration (embedded PostgreSQL,
a temporary state directory, free ports), drives Debian's Chromium through
Playwright like a person would, and checks what the pages show: logging in, a
branch appearing in the live table after a psql connection, creating, suspending
and deleting branches with their confirmations, the connection strings (used for
real with psql), the charts, and a rehearsal report with its probe timelines.
Screenshots go to docs/screenshots/ (or $OFFSHOOT_SCREENSHOTS).

Usage: python3 integration/browser/test_console.py
  OFFSHOOT_BIN      the binary (default: target/debug/offshoot)
  CHROMIUM          the browser (default: /usr/bin/chromium)

The last line printed is "N passed, M failed"; the exit status is 1 when any failed.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("OFFSHOOT_BIN", ROOT / "target/debug/offshoot"))
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(os.environ.get("OFFSHOOT_SCREENSHOTS", ROOT / "docs/screenshots"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Waits for things that involve PostgreSQL (a clone, a server start or stop).
SLOW_MS = 60_000


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Offshoot:
    """The proxy on the demo config, in a temporary state directory."""

    def __init__(self, extra_env=None):
        self.dir = tempfile.mkdtemp(prefix="offshoot-browser-")
        # The embedded server runs as `postgres` when this runs as root.
        os.chmod(self.dir, 0o755)
        self.state = Path(self.dir) / "state"
        self.pg_port = free_port()
        self.admin_port = free_port()
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        env = dict(os.environ)
        env.update(
            {
                "OFFSHOOT__PROXY__LISTEN": f"127.0.0.1:{self.pg_port}",
                "OFFSHOOT__ADMIN__LISTEN": f"127.0.0.1:{self.admin_port}",
                "OFFSHOOT__STATE__DIR": str(self.state),
                # The branch table shows idle branches; keep the reaper out of the way.
                "OFFSHOOT__REAPER__INTERVAL": "1h",
                "RUST_LOG": "info,offshoot::proxy=debug",
            }
        )
        env.update(extra_env or {})
        self.log = open(Path(self.dir) / "offshoot.log", "w")
        self.proc = subprocess.Popen(
            [
                str(BIN),
                "--log-format",
                "json",
                "serve",
                "--config",
                str(ROOT / "conf/offshoot.toml"),
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"offshoot exited at start:\n{self.log_text()}")
            try:
                urllib.request.urlopen(self.admin + "/healthz", timeout=1).read()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"offshoot did not start in 120 s:\n{self.log_text()}")

    def log_text(self, full=False):
        self.log.flush()
        text = (Path(self.dir) / "offshoot.log").read_text()
        return text if full else text[-4000:]

    def token(self):
        path = self.state / "admin.token"
        return path.read_text().strip() if path.exists() else None

    def psql(self, url, sql):
        out = subprocess.run(
            ["psql", url, "-XAtc", sql], capture_output=True, text=True, timeout=120
        )
        if out.returncode != 0:
            raise AssertionError(f"psql {url} failed: {out.stderr.strip()}")
        return out.stdout.strip()

    def url(self, source, branch):
        return f"postgres://postgres@127.0.0.1:{self.pg_port}/{source}.{branch}"

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def accept_dialog(page, expected, action):
    """Runs `action`, accepts the confirmation it opens, and checks the confirmation
    names `expected`."""
    seen = []

    def on_dialog(d):
        seen.append(d.message)
        d.accept()

    page.once("dialog", on_dialog)
    action()
    deadline = time.time() + 5
    while not seen and time.time() < deadline:
        page.wait_for_timeout(50)
    assert seen, "no confirmation was asked"
    assert expected in seen[0], f"confirmation {seen[0]!r} does not name {expected}"


class Suite:
    def __init__(self, proxy, browser):
        self.proxy = proxy
        self.context = browser.new_context(viewport={"width": 1366, "height": 800})
        self.context.grant_permissions(
            ["clipboard-read", "clipboard-write"], origin=proxy.admin
        )
        self.page = self.context.new_page()
        self.page.set_default_timeout(10_000)

    def go(self, path):
        self.page.goto(self.proxy.admin + path)

    # ---- the tests, in order ----

    def test_login(self):
        page = self.page
        self.go("/branches")
        token = self.proxy.token()
        if token is None:
            # A build whose admin listener has no token: the console is open, and
            # says nothing about logging in.
            expect(page.locator("h1")).to_have_text("Branches")
            expect(page.locator('a[href="/login"]')).to_have_count(0)
            return
        expect(page).to_have_url(re.compile(r"/login\?next=/branches$"))
        page.fill("input[name=token]", "not-the-token")
        page.click("button[type=submit]")
        expect(page.locator("#login .error")).to_contain_text("not the admin token")
        page.fill("input[name=token]", token)
        page.click("button[type=submit]")
        expect(page).to_have_url(self.proxy.admin + "/branches")
        cookie = [c for c in self.context.cookies() if c["name"] == "offshoot_session"]
        assert cookie, "no session cookie"
        assert cookie[0]["httpOnly"] and cookie[0]["sameSite"] == "Strict", cookie
        assert token not in cookie[0]["value"], "the cookie holds the token"

    def test_overview_lists_sources(self):
        page = self.page
        self.go("/")
        shop = page.locator("section.source[data-source=shop]")
        expect(shop.locator("h2")).to_have_text("shop")
        expect(shop).to_contain_text("database")
        expect(page.locator("section.source[data-source=shop_full]")).to_contain_text(
            "instance"
        )

    def test_branch_appears_after_a_connection(self):
        page = self.page
        self.go("/branches")
        expect(page.locator("#no-branches")).to_be_visible()
        # A connection from outside the browser; the table refreshes itself.
        count = self.proxy.psql(
            self.proxy.url("shop", "pr-7"), "select count(*) from customers"
        )
        assert int(count) > 0, count
        row = page.locator('tr[data-branch="shop.pr-7"]')
        expect(row).to_be_visible(timeout=SLOW_MS)
        expect(row.locator(".state")).to_have_text("ready")
        expect(page.locator("#no-branches")).to_be_hidden()
        # The filter hides what does not match.
        page.fill("#filter", "no-such-branch")
        expect(row).to_be_hidden()
        expect(page.locator("#branches tbody")).to_contain_text("No branch matches")
        page.fill("#filter", "pr-7")
        expect(row).to_be_visible()

    def test_create_from_the_form(self):
        page = self.page
        self.go("/branches")
        page.select_option("#create select[name=source]", "shop")
        page.fill("#create input[name=branch]", "qa-ui")
        accept_dialog(
            page, "shop.qa-ui", lambda: page.click("#create button[type=submit]")
        )
        expect(page).to_have_url(
            self.proxy.admin + "/branches/shop/qa-ui", timeout=SLOW_MS
        )
        expect(page.locator("h1")).to_have_text("shop.qa-ui")
        expect(page.locator('[data-field="state"]')).to_have_text("ready")
        # A bad name gets the server's reason, shown on the page.
        self.go("/branches")
        page.fill("#create input[name=branch]", "Bad Name")
        accept_dialog(page, "Bad Name", lambda: page.click("#create button[type=submit]"))
        expect(page.locator("#create .error")).to_contain_text("invalid branch name")

    def test_detail_connection_string_works(self):
        page = self.page
        self.go("/branches/shop/qa-ui")
        psql_url = page.locator("#conn-psql").inner_text()
        assert psql_url == self.proxy.url("shop", "qa-ui"), psql_url
        expect(page.locator("#conn-jdbc")).to_have_text(
            f"jdbc:postgresql://127.0.0.1:{self.proxy.pg_port}/shop.qa-ui?user=postgres"
        )
        expect(page.locator("#conn-libpq")).to_contain_text("dbname=shop.qa-ui")
        # Its recent events come from the audit trail: how it was made, and by whom.
        expect(page.locator('#recent-events li[data-action="branch.created"]')).to_have_count(1)
        expect(page.locator("dt:text-is('expires at') + dd")).not_to_be_empty()
        page.click('button[data-copy="conn-psql"]')
        expect(page.locator('button[data-copy="conn-psql"]')).to_have_text("Copied")
        assert page.evaluate("navigator.clipboard.readText()") == psql_url
        # The string the page shows reaches that branch.
        clone = page.locator("dt:text-is('clone') + dd code").inner_text()
        assert self.proxy.psql(psql_url, "select current_database()") == clone, clone
        self.page.emulate_media(color_scheme="dark")
        self.shot("branch-detail-dark.png")
        self.page.emulate_media(color_scheme="light")

    def test_delete_with_confirmation(self):
        page = self.page
        self.go("/branches/shop/qa-ui")
        expect(page.locator('[data-field="state"]')).to_have_text("ready")
        accept_dialog(
            page, "shop.qa-ui", lambda: page.click('button[data-action="delete"]')
        )
        expect(page.locator('[data-field="state"]')).to_have_text(
            "deleted", timeout=SLOW_MS
        )
        self.go("/branches")
        expect(page.locator('tr[data-branch="shop.pr-7"]')).to_be_visible()
        expect(page.locator('tr[data-branch="shop.qa-ui"]')).to_have_count(0)
        self.go("/branches/shop/qa-ui")
        expect(page.locator("main")).to_contain_text("does not exist")

    def test_force_delete_of_a_branch_in_use(self):
        page = self.page
        url = self.proxy.url("shop", "busy")
        session = subprocess.Popen(
            ["psql", url, "-XAtc", "select pg_sleep(120)"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            self.go("/branches/shop/busy")
            # The page may open before the session's branch exists.
            deadline = time.time() + SLOW_MS / 1000
            while "does not exist" in page.inner_text("main") and time.time() < deadline:
                page.wait_for_timeout(200)
                self.go("/branches/shop/busy")
            expect(page.locator('[data-field="connections"]')).to_have_text("1")
            accept_dialog(page, "shop.busy", lambda: page.click('button[data-action="delete"]'))
            expect(page.locator(".actions .error")).to_contain_text("connection")
            accept_dialog(
                page,
                "terminate",
                lambda: page.click('button[data-action="force-delete"]'),
            )
            expect(page.locator('[data-field="state"]')).to_have_text(
                "deleted", timeout=SLOW_MS
            )
            session.wait(timeout=30)
            assert session.returncode != 0, "the open session survived a forced delete"
        finally:
            if session.poll() is None:
                session.kill()
                session.wait()

    def test_suspend_an_instance_branch(self):
        page = self.page
        # An instance branch has a server of its own, which suspend stops.
        self.proxy.psql(self.proxy.url("shop_full", "pr-9"), "select 1")
        self.go("/branches/shop_full/pr-9")
        state = page.locator('[data-field="state"]')
        expect(state).to_have_text("ready")
        accept_dialog(
            page, "shop_full.pr-9", lambda: page.click('button[data-action="suspend"]')
        )
        expect(state).to_have_text("suspended", timeout=SLOW_MS)
        # The database engine's branches have no server: no suspend button.
        self.go("/branches/shop/pr-7")
        expect(page.locator('button[data-action="delete"]')).to_be_visible()
        expect(page.locator('button[data-action="suspend"]')).to_have_count(0)
        # The next connection starts it again, and the table shows it.
        self.proxy.psql(self.proxy.url("shop_full", "pr-9"), "select 1")
        self.go("/branches")
        row = page.locator('tr[data-branch="shop_full.pr-9"]')
        expect(row.locator(".state")).to_have_text("ready", timeout=SLOW_MS)
        self.shot("branches.png")

    def test_reset_protect_and_events(self):
        page = self.page
        # The table shows each branch's size, in readable units.
        self.go("/branches")
        size = page.locator('tr[data-branch="shop.pr-7"] [data-field="size"]')
        expect(size).to_have_text(re.compile(r"^(—|\d+(\.\d)? (B|kB|MB|GB|TB))$"))
        # Reset, from the branch's page: the audit trail shows it on the page.
        self.go("/branches/shop/pr-7")
        accept_dialog(page, "shop.pr-7", lambda: page.click('button[data-action="reset"]'))
        expect(page.locator(".actions [role=status]")).to_contain_text(
            "shop.pr-7 was reset", timeout=SLOW_MS
        )
        expect(page.locator('[data-field="state"]')).to_have_text("ready", timeout=SLOW_MS)
        expect(page.locator('#recent-events li[data-action="branch.reset"]')).to_be_visible(
            timeout=SLOW_MS
        )
        # A change of TTL shows the new deadline.
        asked = []

        def answer(d):
            asked.append(d.message)
            d.accept("2d")

        page.once("dialog", answer)
        page.click('button[data-action="ttl"]')
        expect(page.locator('[data-field="expires_at"]')).not_to_have_text("never")
        assert asked and "shop.pr-7" in asked[0], asked
        # Protected, it refuses a delete and says why.
        accept_dialog(page, "shop.pr-7", lambda: page.click('button[data-action="protect"]'))
        expect(page.locator('[data-field="protected"]')).to_have_text("yes")
        accept_dialog(page, "shop.pr-7", lambda: page.click('button[data-action="delete"]'))
        expect(page.locator(".actions .error")).to_contain_text("protected")
        expect(page.locator('[data-field="state"]')).to_have_text("ready")
        accept_dialog(page, "shop.pr-7", lambda: page.click('button[data-action="unprotect"]'))
        expect(page.locator('[data-field="protected"]')).to_have_text("no")
        # The Events page: the deleted branch's event, found with the filters.
        self.go("/events")
        page.select_option("#event-filters select[name=source]", "shop")
        page.fill("#event-filters input[name=action]", "branch.deleted")
        page.click("#event-filters button[type=submit]")
        row = page.locator('#events tr[data-branch="shop.qa-ui"][data-action="branch.deleted"]')
        expect(row).to_be_visible(timeout=SLOW_MS)
        expect(page.locator('#events tr[data-action="branch.reset"]')).to_have_count(0)
        page.fill("#event-filters input[name=action]", "")
        page.click("#event-filters button[type=submit]")
        expect(page.locator('#events tr[data-action="branch.reset"]').first).to_be_visible()
        self.shot("events.png")

    def test_charts_draw_the_history(self):
        page = self.page
        self.go("/charts")
        # Samples are taken every 10 s and the panel redraws itself every 10 s.
        expect(page.locator("polyline.s-ready")).to_have_count(1, timeout=SLOW_MS)
        expect(page.locator("circle.dot.cold").first).to_be_attached(timeout=SLOW_MS)
        self.shot("charts.png")

    def test_rehearsal_report(self):
        page = self.page
        # The demo's example migrations; the third rewrites order_items.
        args = [
            str(BIN), "rehearse", "shop", "--probe",
            "--sql", "examples/migrations",
            "--admin", f"127.0.0.1:{self.proxy.admin_port}",
            "--proxy", f"127.0.0.1:{self.proxy.pg_port}",
            "--user", "postgres",
        ]
        if self.proxy.token() is not None:
            args += ["--token-file", str(self.proxy.state / "admin.token")]
        out = subprocess.run(
            args, capture_output=True, text=True, timeout=600, cwd=ROOT
        )
        assert out.returncode == 3, f"exit {out.returncode}: {out.stdout}{out.stderr}"
        self.go("/rehearsals")
        expect(page.locator("h1")).to_have_text("Rehearsals")
        row = page.locator("#rehearsals tbody tr").first
        expect(row).to_contain_text("hazards found")
        report_id = row.get_attribute("data-id")
        row.locator("a").click()
        expect(page).to_have_url(self.proxy.admin + f"/rehearsals/{report_id}")
        expect(page.locator("#outcome")).to_have_text("hazards found")
        hazard = page.locator('tr.hazard[data-rule="table-rewrite"]')
        expect(hazard).to_contain_text("order_items")
        expect(hazard).to_contain_text("rewritten in")
        # One timeline per probed table, one bar per stall the report holds.
        report = page.evaluate(
            "async (id) => (await fetch('/api/v1/rehearsals/' + id)).json()", report_id
        )
        tables = report["probe"]["tables"]
        assert any(t["table"].endswith("order_items") for t in tables), tables
        expect(page.locator("svg.timeline")).to_have_count(len(tables))
        for t in tables:
            chart = page.locator(f'.probe-table[data-table="{t["table"]}"] svg.timeline')
            expect(chart).to_be_visible()
            expect(chart.locator("rect.stall")).to_have_count(len(t["stalls"]))
        expect(page.locator("#statements tbody tr")).to_have_count(len(report["statements"]))
        self.shot("rehearsal.png")
        # An id that names no report is a 404 page.
        resp = page.goto(self.proxy.admin + "/rehearsals/ffffffff")
        assert resp.status == 404, resp.status
        expect(page.locator("h1")).to_have_text("Not found")

    def test_logout_ends_the_session(self):
        page = self.page
        if self.proxy.token() is None:
            expect(page.locator('button[data-action="logout"]')).to_have_count(0)
            return
        self.go("/branches")
        page.click('button[data-action="logout"]')
        expect(page).to_have_url(re.compile(r"/login$"))
        self.go("/branches")
        expect(page).to_have_url(re.compile(r"/login\?next=/branches$"))

    def test_log_is_one_json_object_per_line(self):
        import json

        lines = [l for l in self.proxy.log_text(full=True).splitlines() if l.strip()]
        assert lines, "the log is empty"
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except ValueError:
                raise AssertionError(f"not a JSON log line: {line!r}")
        # A session's lines carry its connection's fields.
        spans = [r.get("span", {}) for r in records]
        assert any(
            s.get("source") == "shop" and s.get("branch") == "pr-7" and "peer" in s
            for s in spans
        ), "no log line with the connection's source, branch and peer"

    def shot(self, name):
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SHOTS / name), full_page=True)


class ReadOnlySuite:
    """`admin.public_read = true`: pages and lists without logging in, no actions."""

    def __init__(self, proxy, browser):
        self.proxy = proxy
        self.context = browser.new_context(viewport={"width": 1366, "height": 800})
        self.page = self.context.new_page()
        self.page.set_default_timeout(10_000)

    def test_read_only_without_login(self):
        page = self.page
        self.proxy.psql(self.proxy.url("shop", "ro-1"), "select 1")
        page.goto(self.proxy.admin + "/branches")
        expect(page.locator("h1")).to_have_text("Branches")
        expect(page.locator(".badge")).to_have_text("read-only")
        expect(page.locator('tr[data-branch="shop.ro-1"]')).to_be_visible()
        # No form and no buttons for what this visitor may not do.
        expect(page.locator("#create")).to_have_count(0)
        page.goto(self.proxy.admin + "/branches/shop/ro-1")
        expect(page.locator("#conn-psql")).to_have_text(self.proxy.url("shop", "ro-1"))
        expect(page.locator("button[data-action]")).to_have_count(0)
        # A write from the page's own origin without a session is refused.
        status = page.evaluate(
            """async () => (await fetch('/api/v1/branches/shop/ro-1',
                {method: 'DELETE', headers: {'Content-Type': 'application/json',
                 'X-Offshoot-Console': '1'}, body: '{}'})).status"""
        )
        assert status == 401, status
        page.goto(self.proxy.admin + "/branches")
        expect(page.locator('tr[data-branch="shop.ro-1"]')).to_be_visible()


def run_suite(suite_class, proxy, browser):
    """Runs a suite's tests in order; returns (passed, failed)."""
    passed = failed = 0
    suite = suite_class(proxy, browser)
    for name in [n for n in suite_class.__dict__ if n.startswith("test_")]:
        test = getattr(suite, name)
        started = time.time()
        try:
            test()
            passed += 1
            print(f"ok   {name} ({time.time() - started:.1f} s)", flush=True)
        except Exception:
            failed += 1
            print(f"FAIL {name}", flush=True)
            traceback.print_exc()
            where = Path(tempfile.gettempdir()) / f"offshoot-failed-{name}.png"
            suite.page.screenshot(path=str(where), full_page=True)
            print(f"     screenshot: {where}", flush=True)
    suite.context.close()
    return passed, failed


def main():
    if not BIN.exists():
        print(f"{BIN} does not exist: build it first (cargo build)", file=sys.stderr)
        print("0 passed, 1 failed")
        return 1
    passed = failed = 0
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        has_token = False
        for suite_class, env in [
            (Suite, {}),
            (ReadOnlySuite, {"OFFSHOOT__ADMIN__PUBLIC_READ": "true"}),
        ]:
            if suite_class is ReadOnlySuite and not has_token:
                # Read-only access exists only where the listener has a token.
                print("(read-only suite not run: this build's admin listener has no token)")
                continue
            try:
                proxy = Offshoot(env)
            except Exception:
                traceback.print_exc()
                failed += 1
                continue
            try:
                has_token = has_token or proxy.token() is not None
                ok, bad = run_suite(suite_class, proxy, browser)
                passed, failed = passed + ok, failed + bad
                if bad:
                    print("--- offshoot log (tail) ---\n" + proxy.log_text())
            finally:
                proxy.stop()
        browser.close()
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
