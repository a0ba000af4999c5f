//! The HTML of the console's pages. Every value from the registry, the config or a
//! client passes through [`esc`] on its way into the markup.

use std::fmt::Write;
use std::time::{Duration, SystemTime};

use axum::http::StatusCode;
use axum::response::Html;

use super::{chart, Access, Console, Reach};
use crate::branch::{BranchView, Source};
use crate::config::RouteBy;

/// The page a link in the header points at.
#[derive(PartialEq, Eq, Clone, Copy)]
pub(super) enum Nav {
    Overview,
    Branches,
    Charts,
    Events,
    Rehearsals,
    None,
}

/// HTML-escapes text for element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(ch),
        }
    }
    out
}

pub(super) fn layout(c: &Console, access: Access, title: &str, nav: Nav, body: &str) -> String {
    let link = |n: Nav, href: &str, text: &str| {
        let current = if n == nav {
            r#" aria-current="page""#
        } else {
            ""
        };
        format!(r#"<a href="{href}"{current}>{text}</a>"#)
    };
    let who = match access {
        Access::Open => String::new(),
        Access::Write => r#"<button class="link" data-action="logout">Log out</button>"#.into(),
        Access::ReadOnly if c.gate.has_token() => {
            r#"<span class="badge">read-only</span> <a href="/login">Log in</a>"#.into()
        }
        Access::ReadOnly => String::new(),
    };
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · Offshoot</title>
<link rel="icon" href="/assets/icon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/assets/console.css">
</head><body data-sep="{sep}">
<header><a class="brand" href="/"><img src="/assets/icon.svg" alt="" width="20" height="20"> Offshoot</a>
<nav>{o}{b}{ev}{ch}{r}</nav><div class="who">{who}</div></header>
<main>{body}</main>
<script src="/assets/console.js"></script>
</body></html>"#,
        title = esc(title),
        sep = esc(&c.reach.separator),
        o = link(Nav::Overview, "/", "Overview"),
        b = link(Nav::Branches, "/branches", "Branches"),
        ev = link(Nav::Events, "/events", "Events"),
        ch = link(Nav::Charts, "/charts", "Charts"),
        r = link(Nav::Rehearsals, "/rehearsals", "Rehearsals"),
    )
}

/// Sources, their settings and snapshots, and the branch counts by state.
pub async fn overview(c: &Console, access: Access) -> String {
    let branches = c.registry.list();
    let now = SystemTime::now();
    let mut body = String::from("<h1>Overview</h1>");
    if c.registry.sources().next().is_none() {
        body.push_str(r#"<p class="empty">No sources are configured: every connection is refused. Add a <code>[sources.NAME]</code> section to the config.</p>"#);
    }
    for src in c.registry.sources() {
        let name = src.name.as_str();
        let mine: Vec<&BranchView> = branches.iter().filter(|b| b.source == name).collect();
        let _ = write!(
            body,
            r#"<section class="card source" data-source="{n}"><h2>{n}</h2><dl class="facts">"#,
            n = esc(name)
        );
        for (k, v) in source_facts(src) {
            let _ = write!(body, "<dt>{}</dt><dd>{}</dd>", esc(k), esc(&v));
        }
        let counts: Vec<String> = chart::STATES
            .iter()
            .map(|s| (s, mine.iter().filter(|b| b.state.as_str() == *s).count()))
            .filter(|(_, n)| *n > 0)
            .map(|(s, n)| format!(r#"<span class="state s-{s}">{s}</span> {n}"#))
            .collect();
        let _ = write!(
            body,
            r#"<dt>branches</dt><dd><a href="/branches?source={n}">{total}</a> {counts}</dd></dl>"#,
            n = esc(name),
            total = mine.len(),
            counts = counts.join(" ")
        );
        body.push_str("<h3>Snapshots</h3>");
        match src.engine.snapshots().await {
            Ok(list) if list.is_empty() => {
                let _ = write!(
                    body,
                    r#"<p class="empty">None yet; <code>offshoot snapshot create {}</code> takes one.</p>"#,
                    esc(name)
                );
            }
            Ok(list) => {
                body.push_str(r#"<table><thead><tr><th>Snapshot</th><th>Age</th><th>Size</th><th>Origin</th><th>Branches</th></tr></thead><tbody>"#);
                for s in list.iter().rev() {
                    let mut users = s.branches.clone();
                    users.extend(c.registry.snapshot_users(&src.name, &s.name));
                    users.sort();
                    users.dedup();
                    let _ = write!(
                        body,
                        "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                        esc(&s.name),
                        esc(&age_of(&s.created_at, now)),
                        esc(&bytes(s.size_bytes)),
                        esc(&s.origin),
                        users.len()
                    );
                }
                body.push_str("</tbody></table>");
            }
            Err(crate::error::EngineError::Unsupported(_)) => {
                body.push_str(r#"<p class="empty">This engine has no snapshots.</p>"#)
            }
            Err(e) => {
                let _ = write!(
                    body,
                    r#"<p class="error">Snapshots could not be listed: {}</p>"#,
                    esc(&e.client_message())
                );
            }
        }
        body.push_str("</section>");
    }
    layout(c, access, "Overview", Nav::Overview, &body)
}

/// What the overview shows of a source's configuration.
fn source_facts(src: &Source) -> Vec<(&'static str, String)> {
    let cfg = &src.config;
    let dur = |d: Option<Duration>| {
        d.map_or("never".to_owned(), |d| {
            humantime::format_duration(d).to_string()
        })
    };
    let mut facts = vec![
        ("engine", engine_name(&cfg.engine.kind())),
        ("database", cfg.database_name(src.name.as_str()).to_owned()),
        ("expires when idle for", dur(cfg.idle_expire)),
        ("at most", format!("{} branches", cfg.max_branches)),
    ];
    if src.engine.servers().is_some() {
        facts.push(("suspends when idle for", dur(cfg.suspend_after())));
    }
    if !cfg.persistent.is_empty() {
        let list: Vec<String> = cfg.persistent.iter().map(|p| p.to_string()).collect();
        facts.push(("persistent", list.join(", ")));
    }
    facts
}

fn engine_name(kind: &impl serde::Serialize) -> String {
    match serde_json::to_value(kind) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "unknown".to_owned(),
    }
}

/// The branch table; its rows come from `/api/v1/branches`, refreshed every 2 s.
pub fn branches(c: &Console, access: Access) -> String {
    let mut body = String::from(r#"<h1>Branches</h1>"#);
    if access.can_write() {
        body.push_str(&create_form(c));
    }
    body.push_str(r#"<div class="toolbar"><input type="search" id="filter" placeholder="Filter by source or branch" aria-label="Filter branches">
<select id="state-filter" aria-label="State"><option value="">all states</option>"#);
    for s in chart::STATES {
        let _ = write!(body, r#"<option value="{s}">{s}</option>"#);
    }
    let hint = example_url(&c.reach);
    let _ = write!(
        body,
        r#"</select><span class="muted" id="updated" aria-live="polite"></span></div>
<table id="branches" class="sortable"><thead><tr>
<th data-key="source">Source</th><th data-key="branch">Branch</th><th data-key="state">State</th>
<th data-key="connections" class="num">Connections</th><th data-key="idle" class="num">Idle for</th>
<th data-key="age" class="num">Age</th><th data-key="persistent">Persistent</th>
<th data-key="policy">Policy</th><th data-key="expires_at">Expires at</th><th data-key="protected">Protected</th>
<th data-key="size_bytes" class="num">Size</th>
<th data-key="snapshot">Snapshot</th><th data-key="copy_mode">Copy mode</th></tr></thead>
<tbody><tr><td colspan="13" class="muted">Loading…</td></tr></tbody></table>
<p class="empty" id="no-branches" hidden>No branches yet. Connecting creates one: <code>psql "{}"</code></p>"#,
        esc(&hint)
    );
    layout(c, access, "Branches", Nav::Branches, &body)
}

fn create_form(c: &Console) -> String {
    let mut options = String::new();
    for src in c.registry.sources() {
        let _ = write!(options, r#"<option>{}</option>"#, esc(src.name.as_str()));
    }
    format!(
        r#"<form id="create" class="card inline"><label>Source <select name="source">{options}</select></label>
<label>Branch <input name="branch" required maxlength="40" placeholder="pr-42"></label>
<label>TTL <input name="ttl" maxlength="20" placeholder="3d (optional)"></label>
<label class="check"><input type="checkbox" name="persistent"> persistent</label>
<button type="submit">Create branch</button><span class="error" role="alert"></span></form>"#
    )
}

/// One branch: its facts, connection strings and actions.
pub fn detail(c: &Console, access: Access, v: &BranchView) -> String {
    let now = SystemTime::now();
    let name = format!("{}{}{}", v.source, c.reach.separator, v.branch);
    let mut body = format!(
        r#"<p class="crumbs"><a href="/branches">Branches</a> / {s}</p><h1>{n}</h1>
<section class="card" id="detail" data-source="{s}" data-branch="{b}" data-name="{n}"><dl class="facts">
<dt>state</dt><dd><span class="state s-{st}" data-field="state">{st}</span></dd>
<dt>connections</dt><dd data-field="connections">{conns}</dd>
<dt>idle for</dt><dd data-field="idle">{idle}</dd>
<dt>created</dt><dd>{created} ({age} ago)</dd>
<dt>engine</dt><dd>{engine}</dd><dt>clone</dt><dd><code>{clone}</code></dd>
<dt>persistent</dt><dd>{persistent}</dd>"#,
        s = esc(&v.source),
        b = esc(&v.branch),
        n = esc(&name),
        st = v.state.as_str(),
        conns = v.connections,
        idle = esc(&age_of(&v.last_active, now)),
        created = esc(&v.created_at),
        age = esc(&age_of(&v.created_at, now)),
        engine = esc(&engine_name(&v.engine)),
        clone = esc(&v.clone_name),
        persistent = if v.persistent { "yes" } else { "no" },
    );
    if let Some(snap) = &v.snapshot {
        let _ = write!(body, "<dt>snapshot</dt><dd><code>{}</code></dd>", esc(snap));
    }
    if let Some(mode) = &v.copy_mode {
        let _ = write!(
            body,
            "<dt>copy mode</dt><dd>{}</dd>",
            esc(&engine_name(mode))
        );
    }
    if let Some(by) = &v.created_by {
        let _ = write!(body, "<dt>created by</dt><dd>{}</dd>", esc(by));
    }
    let _ = write!(
        body,
        r#"<dt>size</dt><dd>{}</dd><dt>policy</dt><dd>{}</dd><dt>expires at</dt><dd data-field="expires_at">{}</dd><dt>protected</dt><dd data-field="protected">{}</dd>"#,
        esc(&v.size_bytes.map_or("not measured yet".to_owned(), bytes)),
        esc(v.policy.as_deref().unwrap_or("the source's settings")),
        esc(v.expires_at.as_deref().unwrap_or("never")),
        match (v.protected, &v.protected_until) {
            (true, Some(until)) => format!("yes, until {}", esc(until)),
            (true, None) => "yes".to_owned(),
            (false, _) => "no".to_owned(),
        },
    );
    body.push_str("</dl></section><section class=\"card\"><h2>Connect</h2>");
    for (id, label, value) in connection_strings(&c.reach, v) {
        let _ = write!(
            body,
            r#"<div class="conn"><span class="label">{label}</span><code id="conn-{id}">{v}</code><button class="copy" data-copy="conn-{id}">Copy</button></div>"#,
            v = esc(&value)
        );
    }
    body.push_str("</section>");
    // Filled by the page's script from /api/v1/events (why it changed, who did it).
    body.push_str(r#"<section class="card" id="recent-events"><h2>Recent events</h2><ul class="events"><li class="muted">Loading…</li></ul></section>"#);
    if access.can_write() {
        body.push_str(r#"<section class="card actions"><h2>Actions</h2><button data-action="reset">Reset</button> "#);
        let suspendable = c
            .registry
            .source(&v.source)
            .is_some_and(|s| s.engine.servers().is_some());
        if suspendable {
            body.push_str(r#"<button data-action="suspend">Suspend</button> "#);
        }
        let _ = write!(
            body,
            r#"<button data-action="protect"{p}>Protect</button> <button data-action="unprotect"{u}>Unprotect</button> <button data-action="ttl">Change TTL</button> <button class="danger" data-action="delete">Delete</button><p class="error" role="alert"></p><p class="muted" role="status"></p></section>"#,
            p = if v.protected { " hidden" } else { "" },
            u = if v.protected { "" } else { " hidden" },
        );
    }
    layout(c, access, &name, Nav::Branches, &body)
}

/// The psql URL, libpq keywords and JDBC URL of a branch, with their labels.
fn connection_strings(reach: &Reach, v: &BranchView) -> Vec<(&'static str, &'static str, String)> {
    let c = reach.connection(v);
    vec![
        ("psql", "psql URL", c.url),
        ("libpq", "libpq", c.libpq),
        ("jdbc", "JDBC", c.jdbc),
    ]
}

fn example_url(reach: &Reach) -> String {
    let (host, port) = (reach.addr.ip(), reach.addr.port());
    let sep = &reach.separator;
    let user = &reach.user;
    match reach.route_by {
        RouteBy::Database => format!("postgres://{user}@{host}:{port}/SOURCE{sep}BRANCH"),
        RouteBy::User => format!("postgres://{user}{sep}BRANCH@{host}:{port}/SOURCE"),
    }
}

/// The audit trail, newest first; its rows come from `/api/v1/events`, refreshed
/// every 5 s with the filters in the toolbar (also read from the page's query).
pub fn events(c: &Console, access: Access) -> String {
    let mut sources = String::new();
    for src in c.registry.sources() {
        let _ = write!(sources, r#"<option>{}</option>"#, esc(src.name.as_str()));
    }
    let body = format!(
        r#"<h1>Events</h1><form class="toolbar" id="event-filters">
<select name="source" aria-label="Source"><option value="">all sources</option>{sources}</select>
<input type="search" name="branch" placeholder="Branch" aria-label="Branch" maxlength="63">
<input type="search" name="action" placeholder="Action, e.g. branch.* or branch.expired" aria-label="Action" maxlength="40">
<button type="submit">Filter</button><span class="muted" id="updated" aria-live="polite"></span></form>
<p class="error" role="alert" id="events-error"></p>
<table id="events"><thead><tr><th>Time</th><th>Action</th><th>Source</th><th>Branch</th><th>By</th><th>Why</th><th>Outcome</th></tr></thead>
<tbody><tr><td colspan="7" class="muted">Loading…</td></tr></tbody></table>"#
    );
    layout(c, access, "Events", Nav::Events, &body)
}

pub fn charts(c: &Console, access: Access) -> String {
    let body = format!(
        r#"<h1>Charts</h1><p class="muted">Sampled by the proxy itself every 10 s and kept in memory for an hour; a restart starts afresh.</p><div id="charts-panel">{}</div>"#,
        charts_panel(c)
    );
    layout(c, access, "Charts", Nav::Charts, &body)
}

/// The charts alone, refreshed in place by the page.
pub fn charts_panel(c: &Console) -> String {
    let samples = c.history.samples();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if samples.is_empty() {
        return r#"<p class="empty">No samples yet: the first is taken a few seconds after start.</p>"#.into();
    }
    let mut legend = String::new();
    for s in chart::STATES {
        let _ = write!(legend, r#"<span class="key s-{s}">{s}</span>"#);
    }
    let timed = samples
        .iter()
        .any(|s| s.cold_starts.count + s.resumes.count > 0);
    format!(
        r#"<section class="card"><h2>Branches by state</h2>{}<div class="legend">{legend}</div></section>
<section class="card"><h2>Cold-start and resume times</h2>{}<div class="legend"><span class="key cold">cold start (created)</span><span class="key resume">resume (suspended → ready)</span></div>{}</section>"#,
        chart::states(&samples, now),
        chart::timings(&samples, now),
        if timed {
            ""
        } else {
            r#"<p class="muted">No branch was created or resumed in the last hour.</p>"#
        }
    )
}

pub fn login(c: &Console, access: Access, next: &str) -> String {
    let body = if !c.gate.has_token() {
        r#"<h1>Log in</h1><p>This server has no admin token; everything is open to whoever reaches this address. <a href="/">Go to the overview</a>.</p>"#.to_owned()
    } else {
        format!(
            r#"<h1>Log in</h1><form id="login" class="card narrow" data-next="{}">
<label>Admin token <input type="password" name="token" autocomplete="current-password" required autofocus></label>
<p class="muted">The token is in the file <code>admin.token</code> of the state directory, or the file <code>admin.token_file</code> names.</p>
<button type="submit">Log in</button><p class="error" role="alert"></p></form>"#,
            esc(next)
        )
    };
    layout(c, access, "Log in", Nav::None, &body)
}

pub fn not_found(c: &Console, access: Access, message: &str) -> (StatusCode, Html<String>) {
    let body = format!(
        r#"<h1>Not found</h1><p class="error">{}</p><p><a href="/branches">All branches</a></p>"#,
        esc(message)
    );
    (
        StatusCode::NOT_FOUND,
        Html(layout(c, access, "Not found", Nav::None, &body)),
    )
}

/// "3m 12s"-style time since an RFC 3339 timestamp (two units at most).
fn age_of(rfc3339: &str, now: SystemTime) -> String {
    match humantime::parse_rfc3339_weak(rfc3339) {
        Ok(t) => short_duration(now.duration_since(t).unwrap_or_default()),
        Err(_) => "unknown".to_owned(),
    }
}

fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (d_, h, m, sec) = (s / 86400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (d_, h, m) {
        (0, 0, 0) => format!("{sec}s"),
        (0, 0, _) => format!("{m}m {sec}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d_}d {h}h"),
    }
}

fn bytes(n: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1000.0 && i < units.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            esc(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn durations_and_sizes_read_short() {
        assert_eq!(short_duration(Duration::from_secs(42)), "42s");
        assert_eq!(short_duration(Duration::from_secs(192)), "3m 12s");
        assert_eq!(short_duration(Duration::from_secs(7500)), "2h 5m");
        assert_eq!(
            short_duration(Duration::from_secs(3 * 86400 + 3600)),
            "3d 1h"
        );
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(23_400_000), "23.4 MB");
    }
}
