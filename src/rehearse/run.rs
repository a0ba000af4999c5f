//! Running the migration itself: each statement of the `--sql` files on one session,
//! timed, with the relations' storage read again after each (inside the
//! migration's transaction, so rewrites and new indexes show where they happened);
//! or a command with the branch in its environment.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};

use tokio_postgres::{Client, SimpleQueryMessage};

use super::catalog::{self, Relations};
use super::classify::normalize;
use super::classify::{classify, Command, TxEffect};
use super::{SqlFile, Target};
use crate::recording::Recorded;
use crate::rehearsal_report::{CheckResult, IndexBuilt, Rewrite, SqlError};
use crate::sqltext::split;

/// Violations shown per check.
const MAX_VIOLATIONS: usize = 20;

/// One statement as it ran, before locks are matched to it.
pub struct Ran {
    pub origin: String,
    pub sql: String,
    pub params: Vec<Option<String>>,
    pub command: Command,
    pub started_ms: f64,
    pub duration_ms: f64,
    pub rows: Option<u64>,
    pub error: Option<SqlError>,
    pub rewrites: Vec<Rewrite>,
    pub indexes_built: Vec<IndexBuilt>,
    pub wal_bytes: Option<u64>,
    /// When the transaction this statement ran in ended (its own end outside an
    /// explicit transaction).
    pub tx_end_ms: f64,
    /// Whether it ran inside an explicit transaction block, and which one.
    pub tx: Option<usize>,
    /// OIDs of relations that existed before the run (for "pre-existing" checks).
    pub new_relations: Vec<u32>,
}

impl Ran {
    /// A statement that did not run: the holder of a before/after comparison.
    pub fn empty() -> Self {
        Self {
            origin: String::new(),
            sql: String::new(),
            params: Vec::new(),
            command: classify(""),
            started_ms: 0.0,
            duration_ms: 0.0,
            rows: None,
            error: None,
            rewrites: Vec::new(),
            indexes_built: Vec::new(),
            wal_bytes: None,
            tx_end_ms: 0.0,
            tx: None,
            new_relations: Vec::new(),
        }
    }
}

pub fn ms_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1000.0
}

/// Runs `files` statement by statement on `client`, stopping at the first error.
/// `rels` is the relations before the first statement; it is kept current.
pub async fn run_sql(
    client: &Client,
    files: &[SqlFile],
    start: Instant,
    rels: &mut Relations,
) -> Vec<Ran> {
    let mut out: Vec<Ran> = Vec::new();
    let mut wal = catalog::wal_position(client).await.ok();
    let mut tx: Option<usize> = None;
    let mut tx_count = 0;
    'files: for f in files {
        for st in split(&f.text) {
            let command = classify(&st.sql);
            if command.tx == TxEffect::Begin && tx.is_none() {
                tx_count += 1;
                tx = Some(tx_count);
            }
            let started_ms = ms_since(start);
            let result = client.simple_query(&st.sql).await;
            let duration_ms = ms_since(start) - started_ms;
            let (rows, error) = match result {
                Ok(msgs) => (
                    msgs.iter().rev().find_map(|m| match m {
                        SimpleQueryMessage::CommandComplete(n) => Some(*n),
                        _ => None,
                    }),
                    None,
                ),
                Err(e) => (None, Some(sql_error(&e))),
            };
            let mut ran = Ran {
                origin: format!("{}:{}", f.name, st.line),
                sql: st.sql,
                params: Vec::new(),
                command,
                started_ms,
                duration_ms,
                rows,
                error,
                rewrites: Vec::new(),
                indexes_built: Vec::new(),
                wal_bytes: None,
                tx_end_ms: started_ms + duration_ms,
                tx,
                new_relations: Vec::new(),
            };
            if ran.error.is_none() {
                if let Ok(now) = catalog::relations(client).await {
                    compare(rels, &now, &mut ran);
                    *rels = now;
                }
                if let (Some(before), Ok(after)) = (wal, catalog::wal_position(client).await) {
                    ran.wal_bytes = Some(after.saturating_sub(before));
                    wal = Some(after);
                }
            }
            let ends_tx = ran.command.tx == TxEffect::End;
            let failed = ran.error.is_some();
            out.push(ran);
            if ends_tx || failed {
                if let Some(t) = tx.take() {
                    let end = out
                        .last()
                        .map(|r| r.started_ms + r.duration_ms)
                        .unwrap_or(0.0);
                    for r in out.iter_mut().filter(|r| r.tx == Some(t)) {
                        r.tx_end_ms = end;
                    }
                }
            }
            if failed {
                break 'files;
            }
        }
    }
    out
}

/// Rewrites (same relation, new storage) and indexes built between two readings.
pub fn compare(before: &Relations, after: &Relations, ran: &mut Ran) {
    for (oid, rel) in after {
        match before.get(oid) {
            Some(old) if old.filenode != 0 && old.filenode != rel.filenode => {
                ran.rewrites.push(Rewrite {
                    relation: rel.name.clone(),
                    kind: rel.kind_word().to_owned(),
                    size_bytes: rel.size,
                })
            }
            Some(_) => {}
            None => {
                ran.new_relations.push(*oid);
                if matches!(rel.kind, 'i' | 'I') {
                    let table = rel
                        .table
                        .and_then(|t| after.get(&t))
                        .map(|t| t.name.clone())
                        .unwrap_or_default();
                    ran.indexes_built.push(IndexBuilt {
                        index: rel.name.clone(),
                        table,
                        concurrently: ran.command.concurrently,
                        size_bytes: rel.size,
                    });
                }
            }
        }
    }
    // A rewritten table's indexes are rebuilt with it: name the table only.
    let tables: Vec<String> = ran
        .rewrites
        .iter()
        .filter(|w| w.kind == "table")
        .map(|w| w.relation.clone())
        .collect();
    ran.rewrites.retain(|w| {
        w.kind != "index"
            || !after
                .values()
                .find(|r| r.name == w.relation)
                .and_then(|r| r.table)
                .and_then(|t| after.get(&t))
                .is_some_and(|t| tables.contains(&t.name))
    });
    ran.rewrites.sort_by(|a, b| a.relation.cmp(&b.relation));
}

/// The server's SQLSTATE and message, or the client library's words when the
/// server said nothing (a lost connection).
pub fn sql_error(e: &tokio_postgres::Error) -> SqlError {
    match e.as_db_error() {
        Some(db) => SqlError {
            sqlstate: db.code().code().to_owned(),
            message: db.message().to_owned(),
        },
        None => SqlError {
            sqlstate: e
                .code()
                .map(|c| c.code().to_owned())
                .unwrap_or_else(|| "08006".to_owned()),
            message: e.to_string(),
        },
    }
}

/// Runs one check: it passes with no rows, or with one row holding a single `true`.
pub async fn run_check(c: &Client, sql: &str) -> CheckResult {
    let msgs = match c.simple_query(sql).await {
        Ok(m) => m,
        Err(e) => {
            let e = sql_error(&e);
            return CheckResult {
                passed: false,
                error: Some(format!("{} {}", e.sqlstate, e.message)),
                violation_count: 0,
                violations: Vec::new(),
            };
        }
    };
    let rows: Vec<&tokio_postgres::SimpleQueryRow> = msgs
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .collect();
    let single_true = rows.len() == 1
        && rows[0].columns().len() == 1
        && matches!(rows[0].get(0), Some("t") | Some("true"));
    let passed = rows.is_empty() || single_true;
    let violations = if passed {
        Vec::new()
    } else {
        rows.iter()
            .take(MAX_VIOLATIONS)
            .map(|r| {
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, col)| {
                        let v = r.get(i).map(|s| serde_json::Value::String(s.to_owned()));
                        (col.name().to_owned(), v.unwrap_or(serde_json::Value::Null))
                    })
                    .collect()
            })
            .collect()
    };
    CheckResult {
        passed,
        error: None,
        violation_count: if passed { 0 } else { rows.len() as u64 },
        violations,
    }
}

/// Runs `argv` with the branch in its environment; its output goes to ours.
pub async fn run_command(argv: &[String], target: &Target) -> Result<i32> {
    let (prog, args) = argv.split_first().ok_or_else(|| anyhow!("empty command"))?;
    let status = tokio::process::Command::new(prog)
        .args(args)
        .envs(target.env())
        .stdin(std::process::Stdio::null())
        .status()
        .await
        .with_context(|| format!("cannot run {prog:?}"))?;
    Ok(status.code().unwrap_or(128 + 9))
}

/// Statements the proxy recorded (a command's sessions), from `start_unix` on, in
/// the order they were sent; transactions followed per session.
pub fn from_recording(mut recorded: Vec<Recorded>, start_unix: f64) -> Vec<Ran> {
    recorded.retain(|r| r.started_unix_ms >= start_unix);
    recorded.sort_by(|a, b| a.started_unix_ms.total_cmp(&b.started_unix_ms));
    let mut out: Vec<Ran> = Vec::new();
    // Per session: the open transaction (its number) and its statements.
    let mut open: HashMap<u64, (usize, Vec<usize>)> = HashMap::new();
    let mut tx_count = 0;
    for r in recorded {
        let mut command = classify(&r.sql);
        let (tag, rows) = split_tag(r.tag.as_deref().unwrap_or(""));
        if !tag.is_empty() {
            command.tag = tag;
        }
        let started_ms = r.started_unix_ms - start_unix;
        let end = started_ms + r.duration_ms;
        if command.tx == TxEffect::Begin && !open.contains_key(&r.session) {
            tx_count += 1;
            open.insert(r.session, (tx_count, Vec::new()));
        }
        let ends = command.tx == TxEffect::End;
        let i = out.len();
        out.push(Ran {
            origin: format!("session {}", r.session),
            sql: r.sql,
            params: r.params,
            command,
            started_ms,
            duration_ms: r.duration_ms,
            rows,
            error: r.sqlstate.map(|sqlstate| SqlError {
                sqlstate,
                message: r.message.unwrap_or_default(),
            }),
            rewrites: Vec::new(),
            indexes_built: Vec::new(),
            wal_bytes: None,
            tx_end_ms: end,
            tx: open.get(&r.session).map(|(t, _)| *t),
            new_relations: Vec::new(),
        });
        if let Some((_, members)) = open.get_mut(&r.session) {
            members.push(i);
        }
        if ends {
            if let Some((_, members)) = open.remove(&r.session) {
                for m in members {
                    out[m].tx_end_ms = end;
                }
            }
        }
    }
    out
}

/// `INSERT 0 3` → (`INSERT`, Some(3)); `ALTER TABLE` → (`ALTER TABLE`, None).
fn split_tag(tag: &str) -> (String, Option<u64>) {
    let last = tag.rsplit(';').next().unwrap_or("").trim();
    let words: Vec<&str> = last.split(' ').collect();
    match words.last().and_then(|w| w.parse::<u64>().ok()) {
        Some(n) => {
            let name = words
                .iter()
                .take_while(|w| w.parse::<u64>().is_err())
                .copied()
                .collect::<Vec<_>>()
                .join(" ");
            (name, Some(n))
        }
        None => (last.to_owned(), None),
    }
}

/// Rewrites and indexes found by comparing before and after, matched to the
/// recorded statement that names their table (or index); returns the rewrites no
/// statement names.
pub fn attach_changes(ran: &mut [Ran], before: &Relations, after: &Relations) -> Vec<Rewrite> {
    let mut all = Ran::empty();
    compare(before, after, &mut all);
    let mut loose = Vec::new();
    for w in all.rewrites {
        let target = normalize(&w.relation);
        let by = ran.iter_mut().rev().find(|r| {
            r.error.is_none()
                && r.command.target.as_deref() == Some(target.as_str())
                && r.command.mode == Some("AccessExclusiveLock")
        });
        match by {
            Some(r) => r.rewrites.push(w),
            None => loose.push(w),
        }
    }
    for mut ix in all.indexes_built {
        let bare = normalize(&ix.index)
            .rsplit('.')
            .next()
            .unwrap_or("")
            .to_ascii_lowercase();
        let by = ran.iter_mut().rev().find(|r| {
            r.error.is_none()
                && r.command.tag == "CREATE INDEX"
                && r.sql.to_ascii_lowercase().contains(&bare)
        });
        if let Some(r) = by {
            ix.concurrently = r.command.concurrently;
            r.indexes_built.push(ix);
        }
    }
    loose
}
