//! Migration rehearsal: run a migration on a branch through the proxy and report
//! what it did and what it would have done to a live database.
//!
//! The order of a run ([`rehearse`]):
//! 1. a side session reads the schema, the relations' storage, row counts, the
//!    data checks and the WAL position;
//! 2. the lock sampler ([`observe`]) and, with `probe`, the probe start;
//! 3. the migration runs: each statement of the SQL files on one session
//!    ([`run`]), or a command with the branch in its environment;
//! 4. the side session reads everything again; locks are matched to statements
//!    by time, the hazard rules run ([`hazards`]) and the [`crate::rehearsal_report::Report`] is made.
//!
//! Every session goes through the proxy to the branch, like the application's own.
//! Nothing here knows how the branch was made: the CLI (`cli::rehearse`) and the
//! admin API (`admin::rehearsals`) create it and remove it afterwards.

pub mod attribute;
pub mod catalog;
pub mod classify;
pub mod files;
pub mod hazards;
pub mod observe;
pub mod run;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, Context, Result};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use self::catalog::Relations;
use self::classify::normalize;
use self::observe::{SAMPLE_EVERY, SIDE_APP};
use self::run::Ran;
use crate::recording::Recorded;
use crate::rehearsal_report::{Check, Migration, Outcome, Report, Settings, REPORT_VERSION};

/// `application_name` of the session that runs `--sql` files.
pub const MIGRATION_APP: &str = "offshoot-rehearse";

/// Most bytes of SQL (migration and checks together) one rehearsal reads from
/// files the admin API names.
pub const MAX_SQL_BYTES: u64 = 16 << 20;

/// A SQL file's name (for the report) and text.
#[derive(Debug, Clone)]
pub struct SqlFile {
    pub name: String,
    pub text: String,
}

/// Reads `paths` in order; a directory stands for its `*.sql` files in name order.
pub fn read_sql_paths(paths: &[PathBuf]) -> Result<Vec<SqlFile>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("cannot read directory {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|e| e == "sql") && f.is_file())
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(anyhow!("{} holds no .sql files", p.display()));
            }
            for f in files {
                out.push(read_one(&f)?);
            }
        } else {
            out.push(read_one(p)?);
        }
    }
    Ok(out)
}

fn read_one(p: &Path) -> Result<SqlFile> {
    let text =
        std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
    Ok(SqlFile {
        name: p.display().to_string(),
        text,
    })
}

/// Where the branch is reached: the proxy's address and the role to log in as.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    /// `<source>.<branch>`.
    pub dbname: String,
}

fn conn_quote(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

fn url_encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Target {
    /// A libpq-style connection string (without the password).
    pub fn conninfo(&self) -> String {
        let mut s = format!(
            "host={} port={} user={} dbname={}",
            conn_quote(&self.host),
            self.port,
            conn_quote(&self.user),
            conn_quote(&self.dbname)
        );
        if let Some(p) = &self.password {
            s.push_str(&format!(" password={}", conn_quote(p)));
        }
        s
    }

    /// `postgresql://user@host:port/db` (the password stays in `PGPASSWORD`).
    pub fn url(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!(
            "postgresql://{}@{host}:{}/{}",
            url_encode(&self.user),
            self.port,
            url_encode(&self.dbname)
        )
    }

    /// The environment a migration command gets.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("DATABASE_URL".to_owned(), self.url()),
            ("PGHOST".to_owned(), self.host.clone()),
            ("PGPORT".to_owned(), self.port.to_string()),
            ("PGDATABASE".to_owned(), self.dbname.clone()),
            ("PGUSER".to_owned(), self.user.clone()),
        ];
        if let Some(p) = &self.password {
            env.push(("PGPASSWORD".to_owned(), p.clone()));
        }
        env
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub enum Plan {
    Sql(Vec<SqlFile>),
    Command(Vec<String>),
}

/// Reads what the proxy recorded on the branch's sessions (a `-- COMMAND` run);
/// blocking.
pub type FetchRecording = Arc<dyn Fn() -> Result<Vec<Recorded>> + Send + Sync>;

#[derive(Clone)]
pub struct Options {
    pub target: Target,
    pub source: String,
    pub branch: String,
    pub plan: Plan,
    pub checks: Vec<SqlFile>,
    pub probe: bool,
    pub max_lock: Duration,
    pub max_transaction: Duration,
    pub index_size_threshold: u64,
    pub fail_on: Vec<String>,
    /// Where a command run's statements come from.
    pub recording: Option<FetchRecording>,
}

/// A fresh report id: 8 hex digits.
pub fn new_id() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// Runs the rehearsal; an `Err` means it could not be run at all (the branch
/// unreachable), not that the migration failed.
pub async fn rehearse(opts: &Options) -> Result<Report> {
    let started_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let conninfo = opts.target.conninfo();
    let side = observe::connect(&conninfo, SIDE_APP)
        .await
        .context("cannot connect to the branch through the proxy")?;
    let rels_before = catalog::relations(&side).await?;
    let schema_before = catalog::schema(&side).await?;
    let counts_before = catalog::row_counts(&side).await?;
    let mut checks_before = Vec::new();
    for c in &opts.checks {
        checks_before.push(run::run_check(&side, &c.text).await);
    }
    let wal_before = catalog::wal_position(&side).await?;

    let start = Instant::now();
    let start_unix = crate::recording::unix_ms();
    let stop = CancellationToken::new();
    let (touched_tx, touched_rx) = mpsc::unbounded_channel();
    let sampler_client = observe::connect(&conninfo, SIDE_APP).await?;
    let sampler = observe::start_sampler(
        sampler_client,
        start,
        stop.clone(),
        opts.probe.then_some(touched_tx),
    );
    let probe = opts.probe.then(|| {
        observe::start_probe(
            conninfo.clone(),
            start,
            stop.clone(),
            probe_targets(&opts.plan, &rels_before),
            touched_rx,
        )
    });
    if opts.probe {
        // Let every probe session connect before the first statement.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let mut migration = Migration::default();
    let mut rels_during = rels_before.clone();
    let mut ran: Vec<Ran> = match &opts.plan {
        Plan::Sql(files) => {
            migration.kind = "sql".into();
            migration.files = files.iter().map(|f| f.name.clone()).collect();
            let client = observe::connect(&conninfo, MIGRATION_APP).await?;
            let ran = run::run_sql(&client, files, start, &mut rels_during).await;
            drop(client);
            if let Some(r) = ran.iter().find(|r| r.error.is_some()) {
                let e = r
                    .error
                    .as_ref()
                    .map(|e| format!("{} {}", e.sqlstate, e.message));
                migration.error = Some(format!(
                    "statement at {} failed: {}",
                    r.origin,
                    e.unwrap_or_default()
                ));
            }
            ran
        }
        Plan::Command(argv) => {
            migration.kind = "command".into();
            migration.command = argv.clone();
            match run::run_command(argv, &opts.target).await {
                Ok(code) => {
                    migration.command_exit = Some(code);
                    if code != 0 {
                        migration.error =
                            Some(format!("`{}` exited with code {code}", argv.join(" ")));
                    }
                }
                Err(e) => migration.error = Some(format!("{e:#}")),
            }
            match &opts.recording {
                Some(fetch) => {
                    let fetch = fetch.clone();
                    let recorded = tokio::task::spawn_blocking(move || fetch())
                        .await
                        .context("reading the recording")?
                        .context("cannot read the proxy's recording of the migration")?;
                    run::from_recording(recorded, start_unix)
                }
                None => Vec::new(),
            }
        }
    };
    // A few more samples see the last locks go.
    tokio::time::sleep(SAMPLE_EVERY * 4).await;
    stop.cancel();
    let sampled = sampler.await.context("lock sampler")??;
    let probe_tables = match probe {
        Some(p) => Some(p.await.context("probe")?.finish().await),
        None => None,
    };
    let duration_ms = run::ms_since(start);

    let wal_after = catalog::wal_position(&side).await?;
    let rels_after = catalog::relations(&side).await?;
    let schema_after = catalog::schema(&side).await?;
    let counts_after = catalog::row_counts(&side).await?;
    let mut checks = Vec::new();
    for (c, before) in opts.checks.iter().zip(checks_before) {
        checks.push(Check {
            file: c.name.clone(),
            before,
            after: run::run_check(&side, &c.text).await,
        });
    }

    // Names of relations by OID, including those the migration made and dropped.
    let mut names: HashMap<u32, String> = HashMap::new();
    for rels in [&rels_before, &rels_during, &rels_after] {
        for (oid, r) in rels.iter() {
            names.insert(*oid, r.name.clone());
        }
    }
    let mut spans: Vec<crate::rehearsal_report::LockSpan> = sampled
        .spans
        .into_iter()
        .filter_map(|(oid, mut s)| {
            // A relation no reading ever named lived only inside one statement
            // (the new heap of a rewrite): its table's lock is the one that counts.
            s.relation = names.get(&oid)?.clone();
            Some(s)
        })
        .collect();
    let mut loose_rewrites = Vec::new();
    if matches!(opts.plan, Plan::Command(_)) {
        loose_rewrites = run::attach_changes(&mut ran, &rels_before, &rels_after);
    }
    let statements = attribute::attribute(&ran, &mut spans, &names);
    let existed: HashSet<String> = rels_before.values().map(|r| r.name.clone()).collect();
    let existed_tables: HashSet<String> = rels_before
        .values()
        .filter(|r| r.is_table() || r.kind == 'm')
        .map(|r| r.name.clone())
        .collect();
    let loose_locks: Vec<(String, String, f64)> = spans
        .iter()
        .filter(|s| s.statement.is_none() && s.granted)
        .map(|s| {
            let held = s.last_seen_ms - s.first_seen_ms + SAMPLE_EVERY.as_secs_f64() * 1000.0;
            (s.relation.clone(), s.mode.clone(), held)
        })
        .collect();
    let mut all_rewrites: Vec<crate::rehearsal_report::Rewrite> =
        statements.iter().flat_map(|s| s.rewrites.clone()).collect();
    all_rewrites.extend(loose_rewrites.iter().cloned());
    let diff = catalog::diff(&schema_before, &schema_after);
    let row_counts = attribute::merge_counts(&counts_before, &counts_after);
    let transactions = attribute::transactions(&ran);
    let validated = attribute::validated_in_tx(&ran, &existed, &names);
    let sizes: HashMap<String, u64> = rels_before
        .values()
        .map(|r| (r.name.clone(), r.size))
        .collect();
    let size_of = |t: &str| sizes.get(t).copied().unwrap_or(0);
    let mut hazards = hazards::find(&hazards::Inputs {
        statements: &statements,
        loose_locks: &loose_locks,
        loose_rewrites: &loose_rewrites,
        existed: &existed,
        existed_tables: &existed_tables,
        table_size: &size_of,
        diff: &diff,
        row_counts: &row_counts,
        transactions: &transactions,
        validated_in_tx: &validated,
        max_lock_ms: opts.max_lock.as_secs_f64() * 1000.0,
        max_transaction_ms: opts.max_transaction.as_secs_f64() * 1000.0,
        index_size_threshold: opts.index_size_threshold,
    });
    hazards::mark_failing(&mut hazards, &opts.fail_on);

    let outcome = if migration.error.is_some() {
        Outcome::MigrationFailed
    } else if checks.iter().any(|c| !c.after.passed) {
        Outcome::CheckFailed
    } else if hazards.iter().any(|h| h.fails) {
        Outcome::HazardFound
    } else {
        Outcome::Passed
    };
    Ok(Report {
        report_version: REPORT_VERSION,
        id: new_id(),
        source: opts.source.clone(),
        branch: opts.branch.clone(),
        started_at,
        duration_ms,
        outcome,
        exit_code: outcome.exit_code(),
        settings: Settings {
            max_lock_ms: opts.max_lock.as_millis() as u64,
            max_transaction_ms: opts.max_transaction.as_millis() as u64,
            index_size_threshold_bytes: opts.index_size_threshold,
            fail_on: opts.fail_on.clone(),
            probe: opts.probe,
        },
        migration,
        statements,
        locks: spans,
        rewrites: all_rewrites,
        wal_bytes: wal_after.saturating_sub(wal_before),
        hazards,
        probe: probe_tables.map(|tables| crate::rehearsal_report::Probe {
            interval_ms: observe::PROBE_EVERY.as_millis() as u64,
            tables,
        }),
        schema_diff: diff,
        row_counts,
        checks,
    })
}

/// The tables the SQL names that exist now, by their catalog names.
fn probe_targets(plan: &Plan, rels: &Relations) -> Vec<String> {
    let Plan::Sql(files) = plan else {
        return Vec::new();
    };
    let tables: HashMap<String, &str> = rels
        .values()
        .filter(|r| r.is_table())
        .map(|r| (normalize(&r.name), r.name.as_str()))
        .collect();
    let mut out: Vec<String> = Vec::new();
    for f in files {
        for st in crate::sqltext::split(&f.text) {
            if let Some(t) = classify::classify(&st.sql).target {
                if let Some(name) = tables.get(&t) {
                    if !out.iter().any(|o| o == name) {
                        out.push((*name).to_owned());
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_strings_quote_and_urls_encode() {
        let t = Target {
            host: "127.0.0.1".into(),
            port: 6432,
            user: "o'neil".into(),
            password: None,
            dbname: "shop.rehearse-1".into(),
        };
        assert_eq!(
            t.conninfo(),
            "host='127.0.0.1' port=6432 user='o\\'neil' dbname='shop.rehearse-1'"
        );
        assert_eq!(
            t.url(),
            "postgresql://o%27neil@127.0.0.1:6432/shop.rehearse-1"
        );
        let parsed: tokio_postgres::Config = t.conninfo().parse().unwrap();
        assert_eq!(parsed.get_user(), Some("o'neil"));
    }
}
