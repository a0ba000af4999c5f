//! The Rehearsals view: the stored rehearsal reports (`<state.dir>/rehearsals/`,
//! stored by the admin API), listed newest first, and one report drawn
//! in the order of its Markdown rendering (summary and outcome, hazards, the probe,
//! statements, schema diff, data checks).
//!
//! The probe's stalls are drawn as one small SVG timeline per table: the report
//! keeps every period a probe could not get its lock (`probe.tables[].stalls`, from
//! and to, in ms since the migration started), so each bar is a measured stall on
//! the run's own time axis, one lane for reads and one for writes.
//!
//! Every value from a report passes through [`esc`]; the styles are the console's
//! CSS variables, so both themes apply.

use std::fmt::Write;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::Extension;
use serde_json::Value;

use super::pages::{esc, layout, Nav};
use super::{Access, Console};
use crate::rehearsal_report::{
    human_bytes, human_ms, mode_words, stored_reports, strongest_locks, valid_id, CheckResult,
    Outcome, ProbeTable, Report,
};

/// Styles of this view only; colours come from the console's variables.
const STYLE: &str = r#"<style>
.outcome { font-weight: 600; }
.outcome.passed { color: var(--ready); } .outcome.failed { color: var(--danger); }
.hazard td:first-child { font-weight: 600; }
.hazard.fails td:first-child { color: var(--danger); } .hazard.warns td:first-child { color: var(--provisioning); }
td.wrap { white-space: normal; max-width: 32rem; }
.timeline { width: 100%; max-width: 720px; height: auto; display: block; }
.timeline .grid { stroke: var(--line); stroke-width: 1; }
.timeline .axis { fill: var(--muted); font-size: 11px; }
.timeline .run { fill: var(--code); }
.timeline .read { fill: var(--cold); } .timeline .write { fill: var(--resume); }
.key.read::before { background: var(--cold); } .key.write::before { background: var(--resume); }
pre.diff { background: var(--code); padding: .6rem .8rem; border-radius: 6px; overflow-x: auto; font-size: 13px; }
pre.diff .add { color: var(--ready); } pre.diff .del { color: var(--danger); }
</style>"#;

fn outcome_words(outcome: &str) -> (&'static str, &'static str) {
    match outcome {
        "passed" => ("passed", "passed"),
        "migration_failed" => ("the migration failed", "failed"),
        "check_failed" => ("a data check failed", "failed"),
        "hazard_found" => ("hazards found", "failed"),
        _ => ("unknown", ""),
    }
}

pub(super) async fn list(
    State(c): State<Arc<Console>>,
    Extension(access): Extension<Access>,
) -> Html<String> {
    let dir = c.rehearsals.clone();
    let reports = tokio::task::spawn_blocking(move || stored_reports(&dir))
        .await
        .unwrap_or_default();
    Html(list_page(&c, access, &reports))
}

fn list_page(c: &Console, access: Access, reports: &[Value]) -> String {
    let mut body = String::from("<h1>Rehearsals</h1>");
    if reports.is_empty() {
        body.push_str(r#"<p class="empty">No rehearsal reports yet. <code>offshoot rehearse SOURCE --probe --sql migrations/</code> runs a migration on a fresh branch and stores its report here.</p>"#);
        return layout(c, access, "Rehearsals", Nav::Rehearsals, &body);
    }
    body.push_str(r#"<table id="rehearsals"><thead><tr><th>Report</th><th>Source</th><th>Branch</th><th>Started</th><th>Outcome</th><th class="num">Exit code</th><th class="num">Statements</th><th class="num">Hazards</th></tr></thead><tbody>"#);
    for r in reports {
        let id = r["id"].as_str().unwrap_or("");
        let (words, class) = match r["status"].as_str() {
            Some("running") => ("running", ""),
            Some("failed") => ("could not run", "failed"),
            _ => outcome_words(r["outcome"].as_str().unwrap_or("")),
        };
        let count = |k: &str| r[k].as_array().map_or(0, Vec::len);
        let _ = write!(
            body,
            r#"<tr data-id="{id}"><td><a href="/rehearsals/{id}"><code>{id}</code></a></td><td>{src}</td><td>{br}</td><td>{at}</td><td><span class="outcome {class}">{words}</span></td><td class="num">{exit}</td><td class="num">{st}</td><td class="num">{hz}</td></tr>"#,
            id = esc(id),
            src = esc(r["source"].as_str().unwrap_or("")),
            br = esc(r["branch"].as_str().unwrap_or("")),
            at = esc(r["started_at"].as_str().unwrap_or("")),
            exit = r["exit_code"]
                .as_u64()
                .map_or("?".into(), |n| n.to_string()),
            st = count("statements"),
            hz = count("hazards"),
        );
    }
    body.push_str("</tbody></table>");
    let page = format!("{STYLE}{body}");
    layout(c, access, "Rehearsals", Nav::Rehearsals, &page)
}

pub(super) async fn show(
    State(c): State<Arc<Console>>,
    Extension(access): Extension<Access>,
    Path(id): Path<String>,
) -> Response {
    let not_found = |c: &Console| {
        let body = format!(
            r#"<h1>Not found</h1><p class="error">There is no rehearsal report {}.</p><p><a href="/rehearsals">All rehearsals</a></p>"#,
            esc(&id)
        );
        (
            StatusCode::NOT_FOUND,
            Html(layout(c, access, "Not found", Nav::Rehearsals, &body)),
        )
            .into_response()
    };
    if !valid_id(&id) {
        return not_found(&c);
    }
    let path = c.rehearsals.join(format!("{id}.json"));
    let bytes = match tokio::fs::read(&path).await {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return not_found(&c),
        Err(e) => {
            tracing::warn!(error = %e, report = %id, "console: cannot read a rehearsal report");
            return unreadable(
                &c,
                access,
                &id,
                "it could not be read from the state directory",
            );
        }
    };
    if let Some(page) = unfinished(&c, access, &id, &bytes) {
        return Html(page).into_response();
    }
    match serde_json::from_slice::<Report>(&bytes) {
        Ok(report) => Html(detail_page(&c, access, &report)).into_response(),
        Err(e) => unreadable(
            &c,
            access,
            &id,
            &format!("it is not a report this version can draw ({e}); /api/v1/rehearsals/{id} returns it as stored"),
        ),
    }
}

/// The page of a run the proxy has not finished (`running`) or could not make
/// (`failed`); `None` for a report.
fn unfinished(c: &Console, access: Access, id: &str, bytes: &[u8]) -> Option<String> {
    let r: Value = serde_json::from_slice(bytes).ok()?;
    let what = match r["status"].as_str()? {
        "running" => "is running; this page shows its report once it is done".to_owned(),
        "failed" => format!(
            "could not run: {}",
            r["error"].as_str().unwrap_or("no reason was recorded")
        ),
        _ => return None,
    };
    let body = format!(
        r#"<h1>Rehearsal {id}</h1><p>Source <code>{src}</code>, branch <code>{br}</code>, started {at}.</p><p class="{class}">This rehearsal {what}.</p><p><a href="/rehearsals">All rehearsals</a></p>"#,
        id = esc(id),
        src = esc(r["source"].as_str().unwrap_or("")),
        br = esc(r["branch"].as_str().unwrap_or("")),
        at = esc(r["started_at"].as_str().unwrap_or("")),
        class = if r["status"] == "failed" {
            "error"
        } else {
            "empty"
        },
        what = esc(&what),
    );
    Some(layout(c, access, "Rehearsal", Nav::Rehearsals, &body))
}

fn unreadable(c: &Console, access: Access, id: &str, why: &str) -> Response {
    let body = format!(
        r#"<h1>Rehearsal {id}</h1><p class="error">This report cannot be shown: {why}.</p><p><a href="/rehearsals">All rehearsals</a></p>"#,
        id = esc(id),
        why = esc(why)
    );
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Html(layout(c, access, "Rehearsal", Nav::Rehearsals, &body)),
    )
        .into_response()
}

fn detail_page(c: &Console, access: Access, r: &Report) -> String {
    let mut b = String::from(STYLE);
    let (words, class) = outcome_words(match r.outcome {
        Outcome::Passed => "passed",
        Outcome::MigrationFailed => "migration_failed",
        Outcome::CheckFailed => "check_failed",
        Outcome::HazardFound => "hazard_found",
    });
    let migration = if r.migration.kind == "command" {
        format!("<code>{}</code>", esc(&r.migration.command.join(" ")))
    } else {
        r.migration
            .files
            .iter()
            .map(|f| format!("<code>{}</code>", esc(f)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = write!(
        b,
        r#"<p class="crumbs"><a href="/rehearsals">Rehearsals</a> / {id}</p>
<h1>Migration rehearsal: <span class="outcome {class}" id="outcome">{words}</span></h1>
<section class="card" id="summary"><dl class="facts">
<dt>source</dt><dd>{src}</dd><dt>branch</dt><dd>{br}</dd><dt>started</dt><dd>{at}</dd>
<dt>migration</dt><dd>{migration}</dd>
<dt>ran</dt><dd>{n} statements in {dur}, {wal} of WAL</dd>
<dt>exit code</dt><dd>{exit}</dd>
<dt>fails on</dt><dd>{fail_on}</dd>"#,
        id = esc(&r.id),
        src = esc(&r.source),
        br = esc(&r.branch),
        at = esc(&r.started_at),
        n = r.statements.len(),
        dur = human_ms(r.duration_ms),
        wal = human_bytes(r.wal_bytes),
        exit = r.exit_code,
        fail_on = esc(&r.settings.fail_on.join(", ")),
    );
    if let Some(e) = &r.migration.error {
        let _ = write!(b, r#"<dt>failure</dt><dd class="error">{}</dd>"#, esc(e));
    }
    b.push_str("</dl></section>");
    hazards(&mut b, r);
    probe(&mut b, r);
    statements(&mut b, r);
    schema_diff(&mut b, r);
    data(&mut b, r);
    layout(
        c,
        access,
        &format!("Rehearsal {}", r.id),
        Nav::Rehearsals,
        &b,
    )
}

fn hazards(b: &mut String, r: &Report) {
    b.push_str(r#"<section class="card" id="hazards"><h2>Hazards</h2>"#);
    if r.hazards.is_empty() {
        b.push_str(r#"<p class="empty">None.</p></section>"#);
        return;
    }
    b.push_str(r#"<table><thead><tr><th>Rule</th><th>Relation</th><th>Statement</th><th>Measured</th><th>Instead</th></tr></thead><tbody>"#);
    for h in &r.hazards {
        let _ = write!(
            b,
            r#"<tr class="hazard {cls}" data-rule="{rule}"><td>{mark} <code>{rule}</code></td><td><code>{rel}</code></td><td>{st}</td><td class="wrap">{fig}</td><td class="wrap">{adv}</td></tr>"#,
            cls = if h.fails { "fails" } else { "warns" },
            mark = if h.fails { "✖" } else { "⚠" },
            rule = esc(&h.rule),
            rel = esc(&h.relation),
            st = h
                .statement
                .map(|n| format!("<a href=\"#st-{n}\">#{n}</a>"))
                .unwrap_or_default(),
            fig = esc(&h.figure),
            adv = esc(&h.advice),
        );
    }
    b.push_str("</tbody></table></section>");
}

fn probe(b: &mut String, r: &Report) {
    let Some(p) = &r.probe else {
        return;
    };
    let _ = write!(
        b,
        r#"<section class="card" id="probe"><h2>Concurrent traffic</h2><p class="muted">A side session read from and wrote to (rolled back) each table every {} ms while the migration ran. Bars are the periods it waited for a lock, on the run's time axis.</p>"#,
        p.interval_ms
    );
    if p.tables.is_empty() {
        b.push_str(r#"<p class="empty">The migration touched no table the probe could reach.</p></section>"#);
        return;
    }
    let span = run_span(r);
    for t in &p.tables {
        let _ = write!(
            b,
            r#"<div class="probe-table" data-table="{n}"><h3><code>{n}</code>: longest read stall {rs}, longest write stall {ws}</h3>{svg}</div>"#,
            n = esc(&t.table),
            rs = human_ms(t.max_read_stall_ms),
            ws = human_ms(t.max_write_stall_ms),
            svg = timeline(t, span),
        );
    }
    b.push_str(r#"<div class="legend"><span class="key read">read stalled</span><span class="key write">write stalled</span></div></section>"#);
}

/// The time axis of the probe charts: the run, or the last stall if it ended later.
fn run_span(r: &Report) -> f64 {
    let last = r
        .probe
        .iter()
        .flat_map(|p| &p.tables)
        .flat_map(|t| &t.stalls)
        .map(|s| s.end_ms)
        .fold(0.0, f64::max);
    r.duration_ms.max(last).max(1.0)
}

/// A round spacing (1, 2 or 5 times a power of ten, in ms) giving 3 to 8 ticks.
fn tick_step(span_ms: f64) -> f64 {
    let raw = span_ms / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag)
}

const TW: f64 = 720.0;
const TL: f64 = 52.0;
const TR: f64 = 12.0;
const LANE: f64 = 16.0;

/// One table's stalls: a read lane and a write lane over `span_ms`.
fn timeline(t: &ProbeTable, span_ms: f64) -> String {
    let h = 2.0 * LANE + 30.0;
    let x = |ms: f64| TL + (ms.clamp(0.0, span_ms) / span_ms) * (TW - TL - TR);
    let mut svg = format!(
        r#"<svg class="timeline" viewBox="0 0 {TW} {h}" role="img" aria-label="{label}"><title>{label}</title>"#,
        label = esc(&format!(
            "Lock waits of the probe on {} over {}: longest read {}, longest write {}",
            t.table,
            human_ms(span_ms),
            human_ms(t.max_read_stall_ms),
            human_ms(t.max_write_stall_ms)
        )),
    );
    for (i, kind) in ["read", "write"].iter().enumerate() {
        let y = 6.0 + i as f64 * (LANE + 4.0);
        let _ = write!(
            svg,
            r#"<text class="axis" x="{lx}" y="{ty}" text-anchor="end">{kind}</text><rect class="run" x="{TL}" y="{y}" width="{w}" height="{LANE}"/>"#,
            lx = TL - 6.0,
            ty = y + LANE - 4.0,
            w = TW - TL - TR,
        );
        for s in t.stalls.iter().filter(|s| s.kind == *kind) {
            let (x0, x1) = (x(s.start_ms), x(s.end_ms));
            let _ = write!(
                svg,
                r#"<rect class="{kind} stall" x="{x0:.1}" y="{y}" width="{w:.1}" height="{LANE}"><title>{kind} waited {d} (from {a} to {z})</title></rect>"#,
                w = (x1 - x0).max(1.5),
                d = human_ms(s.end_ms - s.start_ms),
                a = human_ms(s.start_ms),
                z = human_ms(s.end_ms),
            );
        }
    }
    let base = 6.0 + 2.0 * (LANE + 4.0);
    let step = tick_step(span_ms);
    let mut ms = 0.0;
    while ms <= span_ms {
        let xx = x(ms);
        let anchor = if ms == 0.0 { "start" } else { "middle" };
        let _ = write!(
            svg,
            r#"<line class="grid" x1="{xx:.1}" y1="4" x2="{xx:.1}" y2="{base}"/><text class="axis" x="{xx:.1}" y="{ty}" text-anchor="{anchor}">{label}</text>"#,
            ty = base + 14.0,
            label = human_ms(ms),
        );
        ms += step;
    }
    svg.push_str("</svg>");
    svg
}

fn statements(b: &mut String, r: &Report) {
    b.push_str(r#"<section class="card" id="statements"><h2>Statements</h2>"#);
    if r.statements.is_empty() {
        b.push_str(r#"<p class="empty">No statement was recorded.</p></section>"#);
        return;
    }
    b.push_str(r#"<div style="overflow-x:auto"><table><thead><tr><th class="num">#</th><th>Statement</th><th class="num">Start</th><th class="num">Duration</th><th>Result</th><th>Locks</th><th>Rewrites</th></tr></thead><tbody>"#);
    for s in &r.statements {
        let result = match &s.error {
            Some(e) => format!(
                r#"<span class="error">{} {}</span>"#,
                esc(&e.sqlstate),
                esc(&e.message)
            ),
            None => match s.rows {
                Some(n) if n > 0 => format!("{} ({n} rows)", esc(&s.tag)),
                _ => esc(&s.tag),
            },
        };
        // The strongest lock per relation, as the Markdown shows them.
        let locks: Vec<String> = strongest_locks(&s.locks)
            .iter()
            .map(|l| {
                format!(
                    "{} on <code>{}</code> {}{}",
                    esc(&mode_words(&l.mode)),
                    esc(&l.relation),
                    human_ms(l.held_ms),
                    if l.inferred { " (inferred)" } else { "" }
                )
            })
            .collect();
        let rewrites: Vec<String> = s
            .rewrites
            .iter()
            .map(|w| format!("{} <code>{}</code>", esc(&w.kind), esc(&w.relation)))
            .chain(s.indexes_built.iter().map(|i| {
                format!(
                    "built <code>{}</code>{}",
                    esc(&i.index),
                    if i.concurrently { " concurrently" } else { "" }
                )
            }))
            .collect();
        let _ = write!(
            b,
            r#"<tr id="st-{n}"><td class="num">{n}</td><td class="wrap"><code>{sql}</code><div class="muted">{origin}</div></td><td class="num">{start}</td><td class="num">{dur}</td><td class="wrap">{result}</td><td class="wrap">{locks}</td><td class="wrap">{rewrites}</td></tr>"#,
            n = s.n,
            sql = esc(&s.sql),
            origin = esc(&s.origin),
            start = human_ms(s.started_ms),
            dur = human_ms(s.duration_ms),
            locks = locks.join("<br>"),
            rewrites = rewrites.join("<br>"),
        );
    }
    b.push_str("</tbody></table></div></section>");
}

fn schema_diff(b: &mut String, r: &Report) {
    let d = &r.schema_diff;
    b.push_str(r#"<section class="card" id="schema-diff"><h2>Schema diff</h2>"#);
    if d.added.is_empty() && d.removed.is_empty() && d.changed.is_empty() {
        b.push_str(r#"<p class="empty">No change.</p></section>"#);
        return;
    }
    b.push_str(r#"<pre class="diff">"#);
    let line = |b: &mut String, cls: &str, sign: char, kind: &str, name: &str, def: &str| {
        let _ = writeln!(
            b,
            r#"<span class="{cls}">{sign} {} {}: {}</span>"#,
            esc(kind),
            esc(name),
            esc(def)
        );
    };
    for o in &d.added {
        line(b, "add", '+', &o.kind, &o.name, &o.definition);
    }
    for o in &d.removed {
        line(b, "del", '-', &o.kind, &o.name, &o.definition);
    }
    for c in &d.changed {
        line(b, "del", '-', &c.kind, &c.name, &c.before);
        line(b, "add", '+', &c.kind, &c.name, &c.after);
    }
    b.push_str("</pre></section>");
}

fn data(b: &mut String, r: &Report) {
    b.push_str(r#"<section class="card" id="data"><h2>Data checks</h2>"#);
    if r.checks.is_empty() {
        b.push_str(r#"<p class="empty">No <code>--check</code> was given.</p>"#);
    }
    for c in &r.checks {
        let word = |c: &CheckResult| match (&c.error, c.passed) {
            (Some(e), _) => format!(r#"<span class="error">error: {}</span>"#, esc(e)),
            (None, true) => "passed".to_owned(),
            (None, false) => format!(
                r#"<span class="error">{} violations</span>"#,
                c.violation_count
            ),
        };
        let _ = write!(
            b,
            "<h3><code>{}</code>: before {}, after {}</h3>",
            esc(&c.file),
            word(&c.before),
            word(&c.after)
        );
        if !c.after.violations.is_empty() {
            b.push_str("<ul>");
            for v in &c.after.violations {
                let _ = write!(
                    b,
                    "<li><code>{}</code></li>",
                    esc(&Value::Object(v.clone()).to_string())
                );
            }
            b.push_str("</ul>");
        }
    }
    let n = |v: Option<i64>| v.map_or("—".to_owned(), |v| v.to_string());
    if !r.row_counts.is_empty() {
        b.push_str(r#"<h3>Row counts</h3><table><thead><tr><th>Table</th><th class="num">Before</th><th class="num">After</th></tr></thead><tbody>"#);
        for c in &r.row_counts {
            let _ = write!(
                b,
                r#"<tr{cls}><td><code>{}</code></td><td class="num">{}</td><td class="num">{}</td></tr>"#,
                esc(&c.table),
                n(c.before),
                n(c.after),
                cls = if c.before != c.after {
                    r#" class="changed""#
                } else {
                    ""
                },
            );
        }
        b.push_str("</tbody></table>");
    }
    b.push_str("</section>");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rehearsal_report::Stall;

    #[test]
    fn ids_are_safe_file_names() {
        assert!(valid_id("0a1b2c3d"));
        for bad in ["", "0A1B2C3D", "../../x", "0a1b2c3", "0a1b2c3g"] {
            assert!(!valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn timeline_draws_each_stall_in_its_lane_and_escapes_names() {
        let t = ProbeTable {
            table: "public.<orders>".into(),
            reads: 40,
            writes: 40,
            max_read_stall_ms: 1900.0,
            max_write_stall_ms: 2000.0,
            stalls: vec![
                Stall {
                    kind: "read".into(),
                    start_ms: 100.0,
                    end_ms: 2000.0,
                },
                Stall {
                    kind: "write".into(),
                    start_ms: 0.0,
                    end_ms: 2000.0,
                },
            ],
        };
        let svg = timeline(&t, 4000.0);
        assert_eq!(svg.matches(r#"class="read stall""#).count(), 1);
        assert_eq!(svg.matches(r#"class="write stall""#).count(), 1);
        assert!(svg.contains("read waited 1.9 s"), "{svg}");
        assert!(!svg.contains("<orders>"), "{svg}");
        // A stall from 0 to half the run spans half the plot.
        let half = (TW - TL - TR) / 2.0;
        assert!(
            svg.contains(&format!(r#"x="{TL:.1}" y="26" width="{half:.1}""#)),
            "{svg}"
        );
    }
}
