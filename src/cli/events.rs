//! `offshoot events`: the audit trail of a running proxy (`GET /api/v1/events`),
//! oldest of the selection first, so the newest is at the bottom as in a log;
//! `--follow` keeps printing new events as they are recorded.

use std::collections::HashSet;
use std::io::Write;
use std::time::Duration;

use anyhow::{anyhow, Result};
use serde_json::Value;

use super::output::{cell, Align, Format, OutputArg, Table};
use super::{call, AdminApi, ApiArgs};

/// How often `--follow` asks for new events.
const POLL: Duration = Duration::from_secs(1);

/// Print the audit trail: who created, suspended, resumed, expired or deleted
/// which branch, and snapshots taken and deleted.
#[derive(clap::Args, Debug)]
pub struct EventsArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// Only events of this source.
    #[arg(long)]
    pub source: Option<String>,
    /// Only events of this branch: `shop.pr-42`, or `pr-42` with `--source`.
    #[arg(long)]
    pub branch: Option<String>,
    /// Only this action (`branch.expired`) or kind of action (`branch.*`).
    #[arg(long)]
    pub action: Option<String>,
    /// Only events since an RFC 3339 time (`2026-01-31T12:00:00Z`) or for a
    /// duration back from now (`2h`).
    #[arg(long)]
    pub since: Option<String>,
    /// At most this many of the newest events (1 to 10000; default 100).
    #[arg(long)]
    pub limit: Option<u32>,
    /// Keep printing new events as they are recorded (`--output json`: one JSON
    /// object per line); stop with Ctrl-C.
    #[arg(long, short)]
    pub follow: bool,
    #[command(flatten)]
    pub output: OutputArg,
}

impl EventsArgs {
    pub fn run(&self) -> Result<()> {
        let admin = self.api.connect()?;
        let (source, branch) = match (&self.source, &self.branch) {
            (None, Some(b)) if b.contains('.') => {
                let (s, b) = super::split_name(b)?;
                (Some(s.to_owned()), Some(b.to_owned()))
            }
            (s, b) => (s.clone(), b.clone()),
        };
        let mut params = vec![
            ("source", source),
            ("branch", branch),
            ("action", self.action.clone()),
            ("limit", self.limit.map(|l| l.to_string())),
        ];
        let answer = call(&admin, "GET", &path(&params, self.since.as_deref()), None)?;
        let mut events = list(&answer.value)?;
        events.reverse();
        if !self.follow {
            return match self.output.output {
                Format::Json => {
                    println!("{}", answer.text.trim_end());
                    Ok(())
                }
                Format::Table => {
                    print!("{}", table(&events).render());
                    Ok(())
                }
            };
        }
        params.retain(|(k, _)| *k != "limit");
        params.push(("limit", Some("10000".to_owned())));
        follow(&admin, &params, events, self.output.output)
    }
}

/// Prints `first`, then every new event, polling with `since` set to the newest
/// time seen; events of that same millisecond already printed are skipped.
fn follow(
    admin: &AdminApi,
    params: &[(&str, Option<String>)],
    first: Vec<Value>,
    format: Format,
) -> Result<()> {
    let mut last_at = None;
    let mut seen: HashSet<String> = HashSet::new();
    let mut header = true;
    let mut batch = first;
    loop {
        let fresh: Vec<Value> = batch
            .into_iter()
            .filter(|e| {
                let at = e["at"].as_str().map(str::to_owned);
                !(at.is_some() && at == last_at && seen.contains(&e.to_string()))
            })
            .collect();
        if let Some(newest) = fresh.last() {
            let at = newest["at"].as_str().map(str::to_owned);
            if at != last_at {
                seen.clear();
                last_at = at;
            }
            seen.extend(
                fresh
                    .iter()
                    .filter(|e| e["at"].as_str() == last_at.as_deref())
                    .map(Value::to_string),
            );
        }
        match format {
            Format::Json => {
                for e in &fresh {
                    println!("{e}");
                }
            }
            Format::Table if !fresh.is_empty() || header => {
                let text = table(&fresh).render();
                // Later batches go on under the first one's header.
                let skip = usize::from(!header);
                for line in text.lines().skip(skip) {
                    println!("{line}");
                }
                header = false;
            }
            Format::Table => {}
        }
        std::io::stdout().flush()?;
        std::thread::sleep(POLL);
        let answer = call(admin, "GET", &path(params, last_at.as_deref()), None)?;
        batch = list(&answer.value)?;
        batch.reverse();
    }
}

fn list(v: &Value) -> Result<Vec<Value>> {
    v.as_array()
        .cloned()
        .ok_or_else(|| anyhow!("unexpected answer from the admin API: {v}"))
}

/// `/api/v1/events?...` with the parameters that are set.
fn path(params: &[(&str, Option<String>)], since: Option<&str>) -> String {
    let query: Vec<String> = params
        .iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
        .chain(since.map(|s| (&"since", s)))
        .map(|(k, v)| format!("{k}={}", encode(v)))
        .collect();
    if query.is_empty() {
        "/api/v1/events".to_owned()
    } else {
        format!("/api/v1/events?{}", query.join("&"))
    }
}

/// Percent-encodes a query value (everything but unreserved characters).
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'*' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Who, in a few characters: `client postgres@127.0.0.1:5000`, `api (admin)`,
/// `reaper`.
fn actor(e: &Value) -> String {
    let a = &e["actor"];
    let kind = cell(a, "kind");
    match (
        a["role"].as_str(),
        a["addr"].as_str(),
        a["token_name"].as_str(),
    ) {
        (Some(role), Some(addr), _) => format!("{kind} {role}@{addr}"),
        (Some(role), None, _) => format!("{kind} {role}"),
        (None, _, Some(token)) => format!("{kind} ({token})"),
        _ => kind,
    }
}

/// The events as a table, in the order given.
fn table(events: &[Value]) -> Table {
    let mut t = Table::new(&[
        ("AT", Align::Left),
        ("ACTION", Align::Left),
        ("BRANCH", Align::Left),
        ("SNAPSHOT", Align::Left),
        ("ACTOR", Align::Left),
        ("REASON", Align::Left),
        ("OUTCOME", Align::Left),
        ("MS", Align::Right),
    ]);
    for e in events {
        let name = match (e["source"].as_str(), e["branch"].as_str()) {
            (Some(s), Some(b)) => format!("{s}.{b}"),
            (Some(s), None) => s.to_owned(),
            _ => String::new(),
        };
        let mut outcome = cell(e, "outcome");
        if let Some(err) = e["error"].as_str() {
            outcome = format!("{outcome}: {err}");
        }
        t.row(vec![
            cell(e, "at"),
            cell(e, "action"),
            name,
            cell(e, "snapshot"),
            actor(e),
            cell(e, "reason"),
            outcome,
            cell(e, "duration_ms"),
        ]);
    }
    t
}
