//! Statements recorded on rehearsal branches' sessions, kept in memory per branch
//! until the rehearsal reads and drops them (`/api/v1/rehearsals/recording/...`).
//!
//! A leaf shared by the data path (`proxy::record` appends) and the admin API
//! (which hands them out), so neither imports the other. One store per process
//! ([`Recordings::global`]); unit tests make their own.
//!
//! Bounded: at most [`MAX_BRANCHES`] branches (the oldest recording goes first),
//! [`MAX_STATEMENTS`] statements and [`MAX_BYTES`] of text per branch (later ones
//! are counted, not kept), and SQL text and parameters cut at [`MAX_TEXT`] bytes.

use std::collections::VecDeque;
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Branches whose sessions are recorded: the rehearsal's own are named so.
pub const BRANCH_PREFIX: &str = "rehearse-";
/// `application_name` prefix of the rehearsal's own sessions (runner, sampler,
/// probe), which are never recorded.
pub const OWN_APP_PREFIX: &str = "offshoot-rehearse";
pub const MAX_BRANCHES: usize = 16;
pub const MAX_STATEMENTS: usize = 10_000;
pub const MAX_TEXT: usize = 16 * 1024;
/// Bytes of SQL text and parameters kept per branch.
pub const MAX_BYTES: usize = 8 << 20;

/// One statement as the wire showed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Recorded {
    /// The proxy's number for the session (1, 2, ... per branch).
    pub session: u64,
    pub sql: String,
    /// Bind parameters (extended protocol), as text; binary ones as `\x` hex.
    #[serde(default)]
    pub params: Vec<Option<String>>,
    /// Wall-clock time the statement was sent, ms since the Unix epoch.
    pub started_unix_ms: f64,
    pub duration_ms: f64,
    /// The command tag of its CommandComplete (`ALTER TABLE`, `INSERT 0 3`).
    pub tag: Option<String>,
    pub sqlstate: Option<String>,
    pub message: Option<String>,
}

/// A branch's recording.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Recording {
    pub statements: Vec<Recorded>,
    /// Statements not kept once [`MAX_STATEMENTS`] were.
    pub dropped: u64,
    #[serde(skip)]
    sessions: u64,
    #[serde(skip)]
    bytes: usize,
}

#[derive(Default)]
pub struct Recordings {
    /// `(source, branch)` → recording, oldest first.
    inner: Mutex<VecDeque<((String, String), Recording)>>,
}

static GLOBAL: OnceLock<Recordings> = OnceLock::new();

/// Whether sessions of `branch` opened by `application_name` are recorded.
pub fn records(branch: &str, application_name: Option<&str>) -> bool {
    branch.starts_with(BRANCH_PREFIX)
        && !application_name.is_some_and(|a| a.starts_with(OWN_APP_PREFIX))
}

/// Now, in ms since the Unix epoch.
pub fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// `text` cut at [`MAX_TEXT`] bytes (on a character boundary).
pub fn cut(text: &str) -> String {
    if text.len() <= MAX_TEXT {
        return text.to_owned();
    }
    let mut end = MAX_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

impl Recordings {
    /// The process's store.
    pub fn global() -> &'static Recordings {
        GLOBAL.get_or_init(Recordings::default)
    }

    fn with<R>(&self, source: &str, branch: &str, f: impl FnOnce(&mut Recording) -> R) -> R {
        let mut all = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let key = (source.to_owned(), branch.to_owned());
        let i = match all.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                if all.len() >= MAX_BRANCHES {
                    all.pop_front();
                }
                all.push_back((key, Recording::default()));
                all.len() - 1
            }
        };
        f(&mut all[i].1)
    }

    /// A number for a new session of the branch.
    pub fn open_session(&self, source: &str, branch: &str) -> u64 {
        self.with(source, branch, |r| {
            r.sessions += 1;
            r.sessions
        })
    }

    pub fn push(&self, source: &str, branch: &str, statement: Recorded) {
        self.with(source, branch, |r| {
            let size = statement.sql.len()
                + statement
                    .params
                    .iter()
                    .flatten()
                    .map(String::len)
                    .sum::<usize>();
            if r.statements.len() < MAX_STATEMENTS && r.bytes + size <= MAX_BYTES {
                r.bytes += size;
                r.statements.push(statement);
            } else {
                r.dropped += 1;
            }
        })
    }

    /// A copy of the branch's recording (empty when there is none).
    pub fn get(&self, source: &str, branch: &str) -> Recording {
        let all = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        all.iter()
            .find(|(k, _)| k.0 == source && k.1 == branch)
            .map(|(_, r)| r.clone())
            .unwrap_or_default()
    }

    /// The branch's recording, removed from the store.
    pub fn take(&self, source: &str, branch: &str) -> Recording {
        let mut all = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match all.iter().position(|(k, _)| k.0 == source && k.1 == branch) {
            Some(i) => all.remove(i).map(|(_, r)| r).unwrap_or_default(),
            None => Recording::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(session: u64, sql: &str) -> Recorded {
        Recorded {
            session,
            sql: sql.into(),
            params: vec![],
            started_unix_ms: 0.0,
            duration_ms: 0.0,
            tag: None,
            sqlstate: None,
            message: None,
        }
    }

    #[test]
    fn only_rehearsal_branches_and_never_the_rehearsals_own_sessions() {
        assert!(records("rehearse-1a2b", Some("alembic")));
        assert!(records("rehearse-1a2b", None));
        assert!(!records("rehearse-1a2b", Some("offshoot-rehearse-side")));
        assert!(!records("pr-42", None));
    }

    #[test]
    fn bounded_per_branch_and_in_branches() {
        let r = Recordings::default();
        assert_eq!(r.open_session("s", "rehearse-a"), 1);
        assert_eq!(r.open_session("s", "rehearse-a"), 2);
        r.push("s", "rehearse-a", st(1, "SELECT 1"));
        for i in 0..MAX_BRANCHES {
            r.push("s", &format!("rehearse-{i}"), st(1, "x"));
        }
        assert!(
            r.take("s", "rehearse-a").statements.is_empty(),
            "the oldest went"
        );
        let got = r.take("s", "rehearse-5");
        assert_eq!(got.statements, vec![st(1, "x")]);
        assert!(
            r.take("s", "rehearse-5").statements.is_empty(),
            "taken once"
        );
        assert_eq!(cut(&"é".repeat(MAX_TEXT)).len(), MAX_TEXT + "…".len());
    }
}
