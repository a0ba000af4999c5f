//! `offshoot rehearse`: make a rehearsal branch through a running proxy's admin API,
//! rehearse the migration on it through the proxy, write the reports, and remove
//! the branch (unless `--keep`), on failure too.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use super::progress::{on_terminal, Spinner};
use super::{api, AdminApi};
use crate::recording::{Recording, BRANCH_PREFIX};
use crate::rehearsal_report::{markdown, Report};
use crate::rehearse::hazards::{parse_fail_on, DEFAULT_FAIL_ON};
use crate::rehearse::{new_id, read_sql_paths, rehearse, FetchRecording, Options, Plan, Target};

/// Exit code of a rehearsal that could not run (as for a failed migration).
const EXIT_FAILED: u8 = 1;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The source to branch from.
    pub source: String,
    /// Snapshot to clone; default the newest.
    #[arg(long)]
    pub snapshot: Option<String>,
    /// The rehearsal branch's name; default `rehearse-<short id>`.
    #[arg(long)]
    pub name: Option<String>,
    /// Keep the branch afterwards and print its connection string.
    #[arg(long)]
    pub keep: bool,
    /// SQL file to run, or a directory whose `*.sql` files run in name order.
    /// Repeatable; the files run in the order given.
    #[arg(long = "sql", value_name = "PATH")]
    pub sql: Vec<PathBuf>,
    /// Data check: SQL that must return no rows (its rows are the violations) or a
    /// single `true`. Run before and after the migration. Repeatable.
    #[arg(long = "check", value_name = "PATH")]
    pub check: Vec<PathBuf>,
    /// Measure how long reads and writes on the touched tables were blocked.
    #[arg(long)]
    pub probe: bool,
    /// Longest acceptable hold of a lock that blocks reads or writes.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub max_lock: Duration,
    /// Longest acceptable explicit transaction.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub max_transaction: Duration,
    /// Tables at least this big (bytes) need CREATE INDEX CONCURRENTLY.
    #[arg(long, default_value_t = 10 << 20)]
    pub index_size_threshold: u64,
    /// Hazard rules that make the run fail with exit code 3 (`none` for none).
    #[arg(long, default_value = DEFAULT_FAIL_ON)]
    pub fail_on: String,
    /// Write the Markdown report here.
    #[arg(long, value_name = "FILE")]
    pub report_md: Option<PathBuf>,
    /// Write the JSON report here.
    #[arg(long, value_name = "FILE")]
    pub report_json: Option<PathBuf>,
    /// Run it on the proxy (`POST /api/v1/rehearsals`): the `--sql` and `--check`
    /// files are read here and sent inline; the proxy logs in as `--user` with
    /// `PGPASSWORD`. SQL only: a migration command runs where the CLI runs.
    #[arg(long)]
    pub remote: bool,
    /// The proxy's client address (`proxy.listen`).
    #[arg(long, default_value = "127.0.0.1:6432", env = "OFFSHOOT_PROXY")]
    pub proxy: String,
    /// Role to log in as; the password comes from `PGPASSWORD`.
    #[arg(long, default_value = "postgres", env = "PGUSER")]
    pub user: String,
    /// The migration command, run with DATABASE_URL, PGHOST, PGPORT, PGDATABASE and
    /// PGUSER set to the branch (e.g. `-- alembic upgrade head`).
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// Runs the command; the exit code is the report's (0, 1, 2, 3).
pub fn main(admin: &AdminApi, args: &Args) -> ExitCode {
    match run(admin, args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("offshoot: {e:#}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn run(admin: &AdminApi, args: &Args) -> Result<u8> {
    if args.remote {
        return remote(admin, args);
    }
    let plan = match (args.sql.is_empty(), args.command.is_empty()) {
        (false, true) => Plan::Sql(read_sql_paths(&args.sql)?),
        (true, false) => Plan::Command(args.command.clone()),
        (true, true) => bail!("nothing to rehearse: give --sql PATH or -- COMMAND"),
        (false, false) => bail!("give either --sql or -- COMMAND, not both"),
    };
    let checks = read_sql_paths(&args.check)?;
    let fail_on = parse_fail_on(&args.fail_on).map_err(|e| anyhow!(e))?;
    let (host, port) = split_addr(&args.proxy)?;
    let branch = args
        .name
        .clone()
        .unwrap_or_else(|| format!("rehearse-{}", new_id()));
    if matches!(plan, Plan::Command(_)) && !branch.starts_with(BRANCH_PREFIX) {
        bail!(
            "--name {branch:?}: a command's statements are recorded only on branches \
             named {BRANCH_PREFIX}..., so the name must start with it"
        );
    }
    let mut body = serde_json::json!({ "source": args.source, "branch": branch });
    if let Some(s) = &args.snapshot {
        body["snapshot"] = s.as_str().into();
    }
    // Progress on a terminal only; a command's own output would interleave with
    // a spinner, so a command run shows none while it runs.
    let spinner = Spinner::start(format!("making branch {}.{branch}", args.source));
    let made = api(admin, "POST", "/api/v1/branches", Some(&body.to_string()));
    spinner.finish();
    made.context("cannot create the rehearsal branch")?;
    let spinner = Spinner::start_if(
        on_terminal() && matches!(plan, Plan::Sql(_)),
        format!("rehearsing on {}.{branch}", args.source),
    );
    let opts = Options {
        target: Target {
            host,
            port,
            user: args.user.clone(),
            password: std::env::var("PGPASSWORD").ok().filter(|p| !p.is_empty()),
            dbname: format!("{}.{branch}", args.source),
        },
        source: args.source.clone(),
        branch: branch.clone(),
        plan,
        checks,
        probe: args.probe,
        max_lock: args.max_lock,
        max_transaction: args.max_transaction,
        index_size_threshold: args.index_size_threshold,
        fail_on,
        recording: Some(fetch_recording(admin, &args.source, &branch)),
    };
    let result = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the runtime")
        .and_then(|rt| rt.block_on(rehearse(&opts)));
    spinner.finish();
    let written = match &result {
        Ok(r) => write_reports(r, args),
        Err(_) => Ok(()),
    };
    if let Ok(r) = &result {
        // Kept by the proxy too (`GET /api/v1/rehearsals/<id>`, the console); a
        // refusal there does not change the run's outcome.
        match serde_json::to_string(r)
            .map_err(anyhow::Error::from)
            .and_then(|body| api(admin, "POST", "/api/v1/rehearsals/reports", Some(&body)))
        {
            Ok(_) => eprintln!("report {} stored: GET /api/v1/rehearsals/{}", r.id, r.id),
            Err(e) => eprintln!("offshoot: the report was not stored by the proxy: {e:#}"),
        }
    }
    let recording = format!("/api/v1/rehearsals/recording/{}/{branch}", args.source);
    let _ = api(admin, "DELETE", &recording, None);
    if args.keep {
        println!(
            "branch kept: {} (password from PGPASSWORD)",
            opts.target.url()
        );
    } else {
        let path = format!("/api/v1/branches/{}/{branch}?force=true", args.source);
        if let Err(e) = api(admin, "DELETE", &path, None) {
            eprintln!("offshoot: cannot remove the rehearsal branch {branch}: {e:#}");
        }
    }
    let report = result?;
    written?;
    Ok(report.exit_code)
}

/// `--remote`: starts the rehearsal on the proxy, polls it, and writes its report.
fn remote(admin: &AdminApi, args: &Args) -> Result<u8> {
    if !args.command.is_empty() {
        bail!(
            "--remote runs SQL only: a migration command runs where the CLI runs, without --remote"
        );
    }
    if args.sql.is_empty() {
        bail!("nothing to rehearse: give --sql PATH");
    }
    let texts = |files: Vec<crate::rehearse::SqlFile>| -> Vec<String> {
        files.into_iter().map(|f| f.text).collect()
    };
    let mut body = serde_json::json!({
        "source": args.source,
        "keep": args.keep,
        "probe": args.probe,
        "max_lock": humantime::format_duration(args.max_lock).to_string(),
        "max_transaction": humantime::format_duration(args.max_transaction).to_string(),
        "index_size_threshold": args.index_size_threshold,
        "fail_on": args.fail_on,
        "user": args.user,
        "sql": texts(read_sql_paths(&args.sql)?),
        "checks": texts(read_sql_paths(&args.check)?),
    });
    if let Some(s) = &args.snapshot {
        body["snapshot"] = s.as_str().into();
    }
    if let Some(n) = &args.name {
        body["name"] = n.as_str().into();
    }
    if let Some(p) = std::env::var("PGPASSWORD").ok().filter(|p| !p.is_empty()) {
        body["password"] = p.into();
    }
    let started = api(admin, "POST", "/api/v1/rehearsals", Some(&body.to_string()))
        .context("the proxy did not start the rehearsal")?;
    let id = started["id"].as_str().unwrap_or_default().to_owned();
    let spinner = Spinner::start(format!(
        "rehearsing on {}.{} (on the proxy, report {id})",
        args.source,
        started["branch"].as_str().unwrap_or("?")
    ));
    let path = format!("/api/v1/rehearsals/{id}");
    let result = loop {
        match api(admin, "GET", &path, None) {
            Ok(r) if r["status"] == "running" => std::thread::sleep(Duration::from_millis(500)),
            other => break other,
        }
    };
    spinner.finish();
    let record = result?;
    if record["status"] == "failed" {
        bail!(
            "the rehearsal {id} could not run: {}",
            record["error"].as_str().unwrap_or("no reason given")
        );
    }
    let report: Report = serde_json::from_value(record)
        .context("the proxy's report is not one this version reads")?;
    write_reports(&report, args)?;
    if args.keep {
        println!("branch kept: {}.{}", report.source, report.branch);
    }
    Ok(report.exit_code)
}

/// Reads the proxy's recording of the branch through the admin API.
fn fetch_recording(admin: &AdminApi, source: &str, branch: &str) -> FetchRecording {
    let admin = AdminApi {
        addr: admin.addr.clone(),
        token: admin.token.clone(),
    };
    let path = format!("/api/v1/rehearsals/recording/{source}/{branch}");
    Arc::new(move || {
        let v = api(&admin, "GET", &path, None)?;
        let recording: Recording = serde_json::from_value(v)?;
        if recording.dropped > 0 {
            eprintln!(
                "offshoot: the proxy kept the first {} statements of the migration; {} more were not recorded",
                recording.statements.len(),
                recording.dropped
            );
        }
        Ok(recording.statements)
    })
}

fn write_reports(r: &Report, args: &Args) -> Result<()> {
    if let Some(p) = &args.report_json {
        let text = serde_json::to_string_pretty(r)?;
        std::fs::write(p, text + "\n").with_context(|| format!("cannot write {}", p.display()))?;
    }
    let md = markdown(r);
    if let Some(p) = &args.report_md {
        std::fs::write(p, &md).with_context(|| format!("cannot write {}", p.display()))?;
    }
    if args.report_md.is_none() {
        print!("{md}");
    } else {
        println!(
            "rehearsal {}: {:?}, {} hazards, exit code {}",
            r.id,
            r.outcome,
            r.hazards.len(),
            r.exit_code
        );
    }
    Ok(())
}

fn split_addr(addr: &str) -> Result<(String, u16)> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("--proxy {addr:?}: expected HOST:PORT"))?;
    let port = port
        .parse()
        .map_err(|_| anyhow!("--proxy {addr:?}: {port:?} is not a port number"))?;
    Ok((host.trim_matches(['[', ']']).to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_addresses() {
        assert_eq!(
            split_addr("127.0.0.1:6432").unwrap(),
            ("127.0.0.1".into(), 6432)
        );
        assert_eq!(split_addr("[::1]:6432").unwrap(), ("::1".into(), 6432));
        assert!(split_addr("localhost").is_err());
        assert!(split_addr("h:x")
            .unwrap_err()
            .to_string()
            .contains("not a port"));
    }
}
