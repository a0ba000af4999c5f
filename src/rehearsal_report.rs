//! The rehearsal report: what was run, what each statement did, the hazards found,
//! the schema diff and the data checks. Serialised as JSON (`report_version`
//! [`REPORT_VERSION`], documented in `docs/rehearsal-report.md`); [`markdown`]
//! renders the same report as a pull-request comment.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// The JSON schema's version; bumped when a field changes meaning or goes away
/// (added fields do not bump it).
pub const REPORT_VERSION: u32 = 1;

/// The rank of a table lock mode, weakest first.
pub fn strength(mode: &str) -> usize {
    [
        "AccessShareLock",
        "RowShareLock",
        "RowExclusiveLock",
        "ShareUpdateExclusiveLock",
        "ShareLock",
        "ShareRowExclusiveLock",
        "ExclusiveLock",
        "AccessExclusiveLock",
    ]
    .iter()
    .position(|m| *m == mode)
    .unwrap_or(0)
}

/// The outcome of a run and its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Exit 0: the migration ran, every check passed, no hazard matched `fail_on`.
    Passed,
    /// Exit 1: a statement failed or the command exited non-zero.
    MigrationFailed,
    /// Exit 2: a data check failed after the migration.
    CheckFailed,
    /// Exit 3: a hazard matched `fail_on`.
    HazardFound,
}

impl Outcome {
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Passed => 0,
            Outcome::MigrationFailed => 1,
            Outcome::CheckFailed => 2,
            Outcome::HazardFound => 3,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub report_version: u32,
    pub id: String,
    pub source: String,
    pub branch: String,
    /// RFC 3339, UTC.
    pub started_at: String,
    pub duration_ms: f64,
    pub outcome: Outcome,
    pub exit_code: u8,
    pub settings: Settings,
    pub migration: Migration,
    pub statements: Vec<StatementReport>,
    /// Every relation lock the migration's sessions were seen holding, including
    /// those no statement could be matched to (a command's own queries).
    pub locks: Vec<LockSpan>,
    /// Every table and index whose storage was rewritten, by any statement.
    pub rewrites: Vec<Rewrite>,
    /// WAL written by the cluster while the migration ran (bytes).
    pub wal_bytes: u64,
    pub hazards: Vec<Hazard>,
    pub probe: Option<Probe>,
    pub schema_diff: SchemaDiff,
    pub row_counts: Vec<RowCount>,
    pub checks: Vec<Check>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub max_lock_ms: u64,
    pub max_transaction_ms: u64,
    pub index_size_threshold_bytes: u64,
    pub fail_on: Vec<String>,
    pub probe: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Migration {
    /// `sql` (files run by the rehearsal) or `command`.
    pub kind: String,
    pub files: Vec<String>,
    pub command: Vec<String>,
    /// The command's exit code (`command` runs).
    pub command_exit: Option<i32>,
    /// The first failure, in words.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatementReport {
    /// 1-based position in the run.
    pub n: usize,
    /// `file:line` for `sql` runs, `session <k>` for recorded ones.
    pub origin: String,
    pub sql: String,
    /// Parameters of an extended-protocol statement, as text.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub params: Vec<Option<String>>,
    pub started_ms: f64,
    pub duration_ms: f64,
    pub tag: String,
    pub rows: Option<u64>,
    pub error: Option<SqlError>,
    pub locks: Vec<StatementLock>,
    pub rewrites: Vec<Rewrite>,
    pub indexes_built: Vec<IndexBuilt>,
    pub wal_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SqlError {
    pub sqlstate: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatementLock {
    pub relation: String,
    /// As `pg_locks.mode` names it (`AccessExclusiveLock`).
    pub mode: String,
    /// From when the statement took it until its transaction ended.
    pub held_ms: f64,
    /// Not seen by the sampler (the statement was quicker than a sample): the
    /// documented lock level of the command.
    pub inferred: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LockSpan {
    pub pid: i32,
    pub relation: String,
    pub mode: String,
    pub granted: bool,
    pub first_seen_ms: f64,
    pub last_seen_ms: f64,
    /// The statement running when it was first seen.
    pub statement: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rewrite {
    pub relation: String,
    /// `table`, `index`, `materialized view`.
    pub kind: String,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IndexBuilt {
    pub index: String,
    pub table: String,
    pub concurrently: bool,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hazard {
    /// `exclusive-lock`, `blocks-writes`, `table-rewrite`, `index-not-concurrent`,
    /// `deletes-data`, `validate-in-same-tx`, `long-transaction`.
    pub rule: String,
    pub relation: String,
    pub statement: Option<usize>,
    /// The measured figure, in words ("ACCESS EXCLUSIVE held 1.9 s").
    pub figure: String,
    pub advice: String,
    /// The rule is in `fail_on`.
    pub fails: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Probe {
    pub interval_ms: u64,
    pub tables: Vec<ProbeTable>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeTable {
    pub table: String,
    pub reads: u64,
    pub writes: u64,
    pub max_read_stall_ms: f64,
    pub max_write_stall_ms: f64,
    /// Each period a probe could not get its lock: `read` or `write`, from and to.
    pub stalls: Vec<Stall>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stall {
    pub kind: String,
    pub start_ms: f64,
    pub end_ms: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SchemaDiff {
    pub added: Vec<SchemaObject>,
    pub removed: Vec<SchemaObject>,
    pub changed: Vec<SchemaChange>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SchemaObject {
    /// `table`, `column`, `index`, `constraint`, `view`, `function`, `trigger`,
    /// `enum`, `sequence`, `extension`.
    pub kind: String,
    pub name: String,
    pub definition: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SchemaChange {
    pub kind: String,
    pub name: String,
    pub before: String,
    pub after: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RowCount {
    pub table: String,
    pub before: Option<i64>,
    pub after: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    pub file: String,
    pub before: CheckResult,
    pub after: CheckResult,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckResult {
    pub passed: bool,
    /// Set when the check itself could not run.
    pub error: Option<String>,
    pub violation_count: u64,
    /// Up to 20 rows, column name to text value.
    pub violations: Vec<serde_json::Map<String, serde_json::Value>>,
}

/// Milliseconds in words: `850 ms`, `1.9 s`.
pub fn human_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else {
        format!("{ms:.0} ms")
    }
}

/// Bytes in words: `512 B`, `3.4 MB`.
pub fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} kB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

/// `AccessExclusiveLock` → `ACCESS EXCLUSIVE`.
pub fn mode_words(mode: &str) -> String {
    let m = mode.strip_suffix("Lock").unwrap_or(mode);
    let mut out = String::new();
    for (i, c) in m.char_indices() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push(' ');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

fn md_cell(s: &str, max: usize) -> String {
    let one_line: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    let cut: String = if one_line.chars().count() > max {
        one_line.chars().take(max).collect::<String>() + "…"
    } else {
        one_line
    };
    cut.replace('|', "\\|").replace('`', "'")
}

/// The strongest lock each relation was held under, in order of first
/// appearance: what the Markdown and the console show per statement.
pub fn strongest_locks(locks: &[StatementLock]) -> Vec<&StatementLock> {
    let mut strongest: Vec<&StatementLock> = Vec::new();
    for l in locks {
        match strongest.iter_mut().find(|k| k.relation == l.relation) {
            Some(k) if strength(&k.mode) < strength(&l.mode) => *k = l,
            Some(_) => {}
            None => strongest.push(l),
        }
    }
    strongest
}

/// The report as Markdown: summary, hazards, probe, statements, schema diff, data.
pub fn markdown(r: &Report) -> String {
    let mut m = String::new();
    let verdict = match r.outcome {
        Outcome::Passed => "✅ passed",
        Outcome::MigrationFailed => "❌ the migration failed",
        Outcome::CheckFailed => "❌ a data check failed",
        Outcome::HazardFound => "⚠️ hazards found",
    };
    let _ = writeln!(m, "## Migration rehearsal: {verdict}\n");
    let _ = writeln!(
        m,
        "Source `{}`, branch `{}`, {} statements in {}, {} of WAL. Exit code {}.\n",
        r.source,
        r.branch,
        r.statements.len(),
        human_ms(r.duration_ms),
        human_bytes(r.wal_bytes),
        r.exit_code
    );
    if let Some(e) = &r.migration.error {
        let _ = writeln!(m, "**Failure:** {}\n", md_cell(e, 500));
    }
    let _ = writeln!(m, "### Hazards\n");
    if r.hazards.is_empty() {
        let _ = writeln!(m, "None.\n");
    } else {
        let _ = writeln!(m, "| | rule | relation | statement | measured | instead |");
        let _ = writeln!(m, "|---|---|---|---|---|---|");
        for h in &r.hazards {
            let _ = writeln!(
                m,
                "| {} | `{}` | `{}` | {} | {} | {} |",
                if h.fails { "❌" } else { "⚠️" },
                h.rule,
                md_cell(&h.relation, 60),
                h.statement.map(|n| format!("#{n}")).unwrap_or_default(),
                md_cell(&h.figure, 120),
                md_cell(&h.advice, 200)
            );
        }
        let _ = writeln!(m);
    }
    if let Some(p) = &r.probe {
        let _ = writeln!(
            m,
            "### Concurrent traffic (probe every {} ms)\n",
            p.interval_ms
        );
        let _ = writeln!(m, "| table | longest read stall | longest write stall |");
        let _ = writeln!(m, "|---|---|---|");
        for t in &p.tables {
            let _ = writeln!(
                m,
                "| `{}` | {} | {} |",
                md_cell(&t.table, 60),
                human_ms(t.max_read_stall_ms),
                human_ms(t.max_write_stall_ms)
            );
        }
        let _ = writeln!(m);
    }
    let _ = writeln!(m, "### Statements\n");
    let _ = writeln!(
        m,
        "| # | statement | start | duration | result | locks | rewrites |"
    );
    let _ = writeln!(m, "|---|---|---|---|---|---|---|");
    for s in &r.statements {
        let result = match &s.error {
            Some(e) => format!("❌ {} {}", e.sqlstate, md_cell(&e.message, 80)),
            None => match s.rows {
                Some(n) if n > 0 => format!("{} ({n} rows)", s.tag),
                _ => s.tag.clone(),
            },
        };
        // The strongest lock per relation; the JSON has them all.
        let locks: Vec<String> = strongest_locks(&s.locks)
            .iter()
            .map(|l| {
                format!(
                    "{} on {} {}{}",
                    mode_words(&l.mode),
                    md_cell(&l.relation, 40),
                    human_ms(l.held_ms),
                    if l.inferred { " (inferred)" } else { "" }
                )
            })
            .collect();
        let rewrites: Vec<String> = s
            .rewrites
            .iter()
            .map(|w| format!("{} {}", w.kind, md_cell(&w.relation, 40)))
            .chain(s.indexes_built.iter().map(|i| {
                format!(
                    "built {}{}",
                    md_cell(&i.index, 40),
                    if i.concurrently { " concurrently" } else { "" }
                )
            }))
            .collect();
        let _ = writeln!(
            m,
            "| {} | `{}` | {} | {} | {} | {} | {} |",
            s.n,
            md_cell(&s.sql, 100),
            human_ms(s.started_ms),
            human_ms(s.duration_ms),
            result,
            locks.join("<br>"),
            rewrites.join("<br>")
        );
    }
    let _ = writeln!(m);
    let d = &r.schema_diff;
    let _ = writeln!(m, "### Schema diff\n");
    if d.added.is_empty() && d.removed.is_empty() && d.changed.is_empty() {
        let _ = writeln!(m, "No change.\n");
    } else {
        let _ = writeln!(m, "```diff");
        for o in &d.added {
            let _ = writeln!(
                m,
                "+ {} {}: {}",
                o.kind,
                o.name,
                md_cell(&o.definition, 160)
            );
        }
        for o in &d.removed {
            let _ = writeln!(
                m,
                "- {} {}: {}",
                o.kind,
                o.name,
                md_cell(&o.definition, 160)
            );
        }
        for c in &d.changed {
            let _ = writeln!(m, "- {} {}: {}", c.kind, c.name, md_cell(&c.before, 160));
            let _ = writeln!(m, "+ {} {}: {}", c.kind, c.name, md_cell(&c.after, 160));
        }
        let _ = writeln!(m, "```\n");
    }
    if !r.checks.is_empty() {
        let _ = writeln!(m, "### Data checks\n");
        for c in &r.checks {
            let word = |c: &CheckResult| match (&c.error, c.passed) {
                (Some(e), _) => format!("error: {}", md_cell(e, 100)),
                (None, true) => "passed".to_owned(),
                (None, false) => format!("{} violations", c.violation_count),
            };
            let _ = writeln!(
                m,
                "- `{}`: before {}, after {}",
                c.file,
                word(&c.before),
                word(&c.after)
            );
            for v in &c.after.violations {
                let _ = writeln!(
                    m,
                    "  - {}",
                    md_cell(&serde_json::Value::Object(v.clone()).to_string(), 200)
                );
            }
        }
        let _ = writeln!(m);
    }
    let changed: Vec<&RowCount> = r
        .row_counts
        .iter()
        .filter(|c| c.before != c.after)
        .collect();
    if !changed.is_empty() {
        let _ = writeln!(m, "### Row counts that changed\n");
        let _ = writeln!(m, "| table | before | after |");
        let _ = writeln!(m, "|---|---|---|");
        let n = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_else(|| "—".into());
        for c in changed {
            let _ = writeln!(m, "| `{}` | {} | {} |", c.table, n(c.before), n(c.after));
        }
        let _ = writeln!(m);
    }
    m
}

/// Reports listed at most.
const LIST_MAX: usize = 200;

/// A report id: 8 lowercase hex digits (the API stores no other), so it is also a
/// safe file name. The API's handlers check ids with this too.
pub fn valid_id(id: &str) -> bool {
    id.len() == 8
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The stored reports, newest first (at most `LIST_MAX`), read as JSON; the API's
/// list summarises the same ones.
pub fn stored_reports(dir: &std::path::Path) -> Vec<serde_json::Value> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<serde_json::Value> = entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
                .is_some_and(valid_id)
        })
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .collect();
    out.sort_by(|a, b| {
        b["started_at"]
            .as_str()
            .cmp(&a["started_at"].as_str())
            .then_with(|| b["id"].as_str().cmp(&a["id"].as_str()))
    });
    out.truncate(LIST_MAX);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_for_modes_times_and_sizes() {
        assert_eq!(mode_words("AccessExclusiveLock"), "ACCESS EXCLUSIVE");
        assert_eq!(mode_words("ShareLock"), "SHARE");
        assert_eq!(human_ms(1940.0), "1.9 s");
        assert_eq!(human_ms(12.4), "12 ms");
        assert_eq!(human_bytes(3 << 20), "3.0 MB");
        assert_eq!(md_cell("a |\n b`", 10), "a \\| b'");
    }
}
