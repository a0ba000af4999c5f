//! Reading the trail back: the current file, then `audit.jsonl.1`, `.2`, ... each
//! from its last line to its first, so events come newest first. Lines that do not
//! parse (a torn last line after a crash) are skipped.

use std::io::ErrorKind;
use std::path::Path;
use std::time::SystemTime;

use super::writer::path_of;
use super::{Action, Event};

/// Events returned when no `limit` is given, and at most.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 10_000;

/// Which events to return.
#[derive(Debug, Clone)]
pub struct Filter {
    pub source: Option<String>,
    pub branch: Option<String>,
    /// An action, or a pattern such as `branch.*`.
    pub action: Option<String>,
    /// Only events at or after this time.
    pub since: Option<SystemTime>,
    pub limit: usize,
}

impl Default for Filter {
    fn default() -> Self {
        Self {
            source: None,
            branch: None,
            action: None,
            since: None,
            limit: DEFAULT_LIMIT,
        }
    }
}

/// A filter parameter that cannot be used, naming it.
#[derive(Debug, thiserror::Error)]
#[error("{param}: {problem}")]
pub struct FilterError {
    pub param: &'static str,
    pub problem: String,
}

fn bad(param: &'static str, problem: impl Into<String>) -> FilterError {
    FilterError {
        param,
        problem: problem.into(),
    }
}

impl Filter {
    /// Builds a filter from text parameters as a query string gives them. `since`
    /// is an RFC 3339 time (`2026-01-31T12:00:00Z`) or a duration back from `now`
    /// (`10m`, `2h`).
    pub fn parse(
        source: Option<String>,
        branch: Option<String>,
        action: Option<String>,
        since: Option<&str>,
        limit: Option<&str>,
        now: SystemTime,
    ) -> Result<Self, FilterError> {
        if let Some(a) = &action {
            if !Action::is_pattern(a) {
                let all: Vec<&str> = Action::ALL.iter().map(|a| a.as_str()).collect();
                return Err(bad(
                    "action",
                    format!(
                        "{a:?} names no action; use one of {} (or a prefix such as branch.*)",
                        all.join(", ")
                    ),
                ));
            }
        }
        let since = match since.filter(|s| !s.is_empty()) {
            None => None,
            Some(s) => Some(parse_since(s, now)?),
        };
        let limit = match limit.filter(|s| !s.is_empty()) {
            None => DEFAULT_LIMIT,
            Some(l) => match l.parse::<usize>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
                _ => {
                    return Err(bad(
                        "limit",
                        format!("{l:?} is not a number from 1 to {MAX_LIMIT}"),
                    ))
                }
            },
        };
        let nonempty = |s: Option<String>| s.filter(|s| !s.is_empty());
        Ok(Self {
            source: nonempty(source),
            branch: nonempty(branch),
            action: nonempty(action),
            since,
            limit,
        })
    }

    fn selects(&self, e: &Event) -> bool {
        let eq = |want: &Option<String>, have: &Option<String>| {
            want.as_ref().is_none_or(|w| have.as_ref() == Some(w))
        };
        eq(&self.source, &e.source)
            && eq(&self.branch, &e.branch)
            && self.action.as_ref().is_none_or(|a| e.action.matches(a))
    }
}

fn parse_since(s: &str, now: SystemTime) -> Result<SystemTime, FilterError> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t);
    }
    match humantime::parse_duration(s) {
        Ok(d) => Ok(now.checked_sub(d).unwrap_or(SystemTime::UNIX_EPOCH)),
        Err(_) => Err(bad(
            "since",
            format!(
                "{s:?} is neither a time (RFC 3339, e.g. 2026-01-31T12:00:00Z) nor a \
                 duration back from now (e.g. 10m, 2h)"
            ),
        )),
    }
}

/// Reads the files under `dir` (the current one and `keep` rotated ones), newest
/// first, until `filter.limit` events are found or an event older than
/// `filter.since` is met (the files are in time order).
pub(super) fn read(dir: &Path, keep: usize, filter: &Filter) -> std::io::Result<Vec<Event>> {
    let mut out = Vec::new();
    for n in 0..=keep {
        let text = match std::fs::read(path_of(dir, n)) {
            Ok(t) => t,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for line in text.split(|b| *b == b'\n').rev() {
            let Ok(event) = serde_json::from_slice::<Event>(line) else {
                continue;
            };
            if filter.since.is_some_and(|since| event.at < since) {
                return Ok(out);
            }
            if filter.selects(&event) {
                out.push(event);
                if out.len() >= filter.limit {
                    return Ok(out);
                }
            }
        }
    }
    Ok(out)
}
