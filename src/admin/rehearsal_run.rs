//! `POST /api/v1/rehearsals`: a migration rehearsal the proxy runs itself, with
//! the same code as `offshoot rehearse --sql` (`crate::rehearse::rehearse`).
//!
//! The request is checked whole before anything starts (names, durations, rules,
//! the SQL read from the body or from below `rehearsal.sql_dir`); then the answer
//! is 202 with the id, and a task makes the branch, runs, removes the branch
//! (unless `keep`) and replaces the `running` record `<id>.json` with the report,
//! or with a `failed` record saying why.
//!
//! Credentials: the run logs in through the proxy's own client listener as the
//! role the caller names (`user`, and `password` unless the source is `trust`),
//! like any client, so the proxy's authentication, `allow_superuser` and the
//! source's role rules apply to it unchanged. The admin token alone never yields
//! a database session; the password is kept only in memory for the run and is
//! never written, logged or shown.
//!
//! A record still `running` when the proxy starts belongs to a run the previous
//! process did not finish: [`recover`] marks it `failed` and removes its branch.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{info, warn};
use utoipa::ToSchema;

use super::{ApiError, AppState};
use crate::audit::{Action, Actor, Event};
use crate::branch::registry::IfExists;
use crate::branch::{CreateOptions, RemoveReason};
use crate::config::{Config, RouteBy, TlsMode};
use crate::names::BranchId;
use crate::recording::Recordings;
use crate::rehearse::files::read_below;
use crate::rehearse::hazards::{parse_fail_on, DEFAULT_FAIL_ON};
use crate::rehearse::{new_id, Options, Plan, SqlFile, Target, MAX_SQL_BYTES};

/// Most bytes of inline SQL (migration and checks together) in one request.
pub const MAX_INLINE_BYTES: usize = 1 << 20;

/// How long a run waits for its branch to be made (at least).
const CREATE_WAIT: Duration = Duration::from_secs(30 * 60);

/// What the server-side runs need from the configuration, and the slots that
/// limit how many run at once.
pub struct Runner {
    /// `<state.dir>/rehearsals/`: records and reports, `<id>.json`.
    pub dir: PathBuf,
    sql_dir: Option<PathBuf>,
    /// Where the runs connect: the proxy's client listener, by a loopback address
    /// when it listens on every address.
    proxy: SocketAddr,
    tls_required: bool,
    /// `proxy.separator` and `proxy.route_by`: how the startup names the branch.
    separator: String,
    by_user: bool,
    slots: Arc<Semaphore>,
    max_running: usize,
}

impl Runner {
    pub fn new(cfg: &Config) -> Self {
        let mut proxy = cfg.proxy.listen;
        if proxy.ip().is_unspecified() {
            proxy.set_ip(match proxy.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
        Self {
            dir: cfg.state.dir.join("rehearsals"),
            sql_dir: cfg.rehearsal.sql_dir.clone(),
            proxy,
            tls_required: cfg.tls.enabled() && cfg.tls.mode == TlsMode::Require,
            separator: cfg.proxy.separator.clone(),
            by_user: cfg.proxy.route_by == RouteBy::User,
            slots: Arc::new(Semaphore::new(cfg.rehearsal.max_running)),
            max_running: cfg.rehearsal.max_running,
        }
    }
}

/// SQL given inline: one text, or several run in order.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
pub(super) enum Texts {
    One(String),
    Many(Vec<String>),
}

impl Texts {
    fn into_vec(self) -> Vec<String> {
        match self {
            Texts::One(s) => vec![s],
            Texts::Many(v) => v,
        }
    }
}

/// A rehearsal for the proxy to run: the migration as inline `sql` or as
/// `sql_files` below `rehearsal.sql_dir`, never both.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct StartBody {
    /// The source to branch from.
    source: String,
    /// Snapshot to clone; default the newest.
    #[serde(default)]
    snapshot: Option<String>,
    /// The rehearsal branch's name (it must not exist); default `rehearse-<id>`.
    #[serde(default)]
    name: Option<String>,
    /// Keep the branch afterwards.
    #[serde(default)]
    keep: bool,
    /// Measure how long reads and writes on the touched tables were blocked.
    #[serde(default)]
    probe: bool,
    /// Longest acceptable hold of a lock that blocks reads or writes ("1s").
    #[serde(default)]
    max_lock: Option<String>,
    /// Longest acceptable explicit transaction ("5s").
    #[serde(default)]
    max_transaction: Option<String>,
    /// Tables at least this big (bytes) need CREATE INDEX CONCURRENTLY.
    #[serde(default)]
    index_size_threshold: Option<u64>,
    /// Hazard rules that fail the run with exit code 3: "a,b", a list, or "none".
    #[serde(default)]
    fail_on: Option<Texts>,
    /// The role the run logs in as through the proxy, like any client.
    user: String,
    /// Its password; not needed under `trust`. Never stored.
    #[serde(default)]
    password: Option<String>,
    /// The migration: SQL text, or a list of texts run in order.
    #[serde(default)]
    sql: Option<Texts>,
    /// The migration as files below `rehearsal.sql_dir` (a directory: its `*.sql`
    /// files in name order), run in the order given.
    #[serde(default)]
    sql_files: Vec<String>,
    /// Data checks: SQL that must return no rows or a single `true`.
    #[serde(default)]
    checks: Option<Texts>,
    /// Data checks as files below `rehearsal.sql_dir`.
    #[serde(default)]
    check_files: Vec<String>,
}

/// A started rehearsal: where to poll.
#[derive(Serialize, ToSchema)]
pub(super) struct Started {
    id: String,
    source: String,
    branch: String,
    /// `running`.
    status: &'static str,
    /// `GET` it until `status` is `done` (the report) or `failed`.
    url: String,
}

/// Everything a run needs, checked.
struct Job {
    id: String,
    started_at: String,
    branch: BranchId,
    snapshot: Option<String>,
    keep: bool,
    opts: Options,
    actor: Actor,
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, message)
}

fn duration(key: &str, text: Option<&str>, default: Duration) -> Result<Duration, ApiError> {
    match text {
        None => Ok(default),
        Some(t) => humantime::parse_duration(t).map_err(|_| {
            bad(format!(
                "{key}: {t:?} is not a duration such as \"1s\" or \"500ms\""
            ))
        }),
    }
}

fn inline(what: &str, texts: Option<Texts>) -> Vec<SqlFile> {
    texts
        .map(Texts::into_vec)
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, text)| SqlFile {
            name: format!("{what}[{i}]"),
            text,
        })
        .collect()
}

/// Reads the named files below `rehearsal.sql_dir` (blocking).
fn files(
    runner: &Runner,
    key: &str,
    names: &[String],
    budget: &mut u64,
) -> Result<Vec<SqlFile>, ApiError> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let Some(root) = &runner.sql_dir else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "{key} names files on the server, and this proxy allows none: set \
                 rehearsal.sql_dir in its configuration, or send the SQL inline"
            ),
        ));
    };
    let mut out = Vec::new();
    for name in names {
        let read = read_below(root, name, budget).map_err(|e| {
            let status = match e {
                crate::rehearse::files::FileRefusal::Outside(_) => StatusCode::FORBIDDEN,
                crate::rehearse::files::FileRefusal::NotFound(_) => StatusCode::NOT_FOUND,
                crate::rehearse::files::FileRefusal::TooBig(..) => StatusCode::PAYLOAD_TOO_LARGE,
                _ => StatusCode::UNPROCESSABLE_ENTITY,
            };
            ApiError::new(status, format!("{key}: {}", e.message()))
        })?;
        out.extend(read);
    }
    Ok(out)
}

/// Checks the request and reads its SQL; nothing is started yet.
async fn prepare(s: &AppState, body: StartBody, actor: Actor) -> Result<Job, ApiError> {
    let runner = s.rehearsals.clone();
    let id = new_id();
    let name = body
        .name
        .clone()
        .unwrap_or_else(|| format!("rehearse-{id}"));
    let branch = super::branch_path::branch_id(s, &body.source, &name)?;
    if s.registry.view(&branch).is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("branch {branch} exists already; a rehearsal makes its own branch, so name a new one"),
        ));
    }
    if runner.tls_required {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "this proxy requires TLS from clients (tls.mode = \"require\"), and a server-side \
             rehearsal connects to it over loopback without TLS; run `offshoot rehearse` instead",
        ));
    }
    let max_lock = duration("max_lock", body.max_lock.as_deref(), Duration::from_secs(1))?;
    let max_transaction = duration(
        "max_transaction",
        body.max_transaction.as_deref(),
        Duration::from_secs(5),
    )?;
    let fail_on = match body.fail_on {
        None => DEFAULT_FAIL_ON.to_owned(),
        Some(t) => t.into_vec().join(","),
    };
    let fail_on = parse_fail_on(&fail_on).map_err(|e| bad(e.replace("--fail-on", "fail_on")))?;
    let has_inline = body.sql.as_ref().is_some_and(|t| match t {
        Texts::One(s) => !s.trim().is_empty(),
        Texts::Many(v) => !v.is_empty(),
    });
    match (has_inline, body.sql_files.is_empty()) {
        (false, true) => return Err(bad("nothing to rehearse: give \"sql\" or \"sql_files\"")),
        (true, false) => return Err(bad("give either \"sql\" or \"sql_files\", not both")),
        _ => {}
    }
    let mut plan = inline("sql", body.sql);
    let mut checks = inline("checks", body.checks);
    let inline_bytes: usize = plan.iter().chain(&checks).map(|f| f.text.len()).sum();
    if inline_bytes > MAX_INLINE_BYTES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the inline SQL holds {inline_bytes} bytes; at most {MAX_INLINE_BYTES} are taken \
                 inline (larger migrations go in files below rehearsal.sql_dir)"
            ),
        ));
    }
    let (sql_files, check_files) = (body.sql_files, body.check_files);
    let (from_files, check_from_files) = tokio::task::spawn_blocking(move || {
        let mut budget = MAX_SQL_BYTES;
        let sql = files(&runner, "sql_files", &sql_files, &mut budget)?;
        let checks = files(&runner, "check_files", &check_files, &mut budget)?;
        Ok::<_, ApiError>((sql, checks))
    })
    .await
    .map_err(|e| super::rehearsals::internal("read the SQL files", e))??;
    plan.extend(from_files);
    checks.extend(check_from_files);
    let (proxy, sep) = (s.rehearsals.proxy, &s.rehearsals.separator);
    // The startup names the branch as any client's would.
    let (user, dbname) = if s.rehearsals.by_user {
        (
            format!("{}{sep}{}", body.user, branch.branch),
            branch.source.to_string(),
        )
    } else {
        (
            body.user,
            format!("{}{sep}{}", branch.source, branch.branch),
        )
    };
    Ok(Job {
        id,
        started_at: now_rfc3339(),
        snapshot: body.snapshot,
        keep: body.keep,
        actor,
        opts: Options {
            target: Target {
                host: proxy.ip().to_string(),
                port: proxy.port(),
                user,
                password: body.password.filter(|p| !p.is_empty()),
                dbname,
            },
            source: branch.source.to_string(),
            branch: branch.branch.to_string(),
            plan: Plan::Sql(plan),
            checks,
            probe: body.probe,
            max_lock,
            max_transaction,
            index_size_threshold: body.index_size_threshold.unwrap_or(10 << 20),
            fail_on,
            recording: None,
        },
        branch,
    })
}

/// Starts a rehearsal; 202 with its id, to be polled.
#[utoipa::path(post, path = "/api/v1/rehearsals", operation_id = "start_rehearsal", tag = "rehearsals",
    request_body = StartBody,
    responses(
        (status = 202, description = "Started; GET the url until its status is done or failed", body = Started,
            headers(("Location" = String, description = "/api/v1/rehearsals/{id}"))),
        (status = 400, description = "A bad name, duration, rule, or no SQL", body = crate::error::ErrorBody),
        (status = 401, description = "No or a wrong token", body = crate::error::ErrorBody),
        (status = 403, description = "A file outside rehearsal.sql_dir, or none configured", body = crate::error::ErrorBody),
        (status = 404, description = "No such source, or no such file below rehearsal.sql_dir", body = crate::error::ErrorBody),
        (status = 409, description = "The branch exists, or the proxy requires TLS", body = crate::error::ErrorBody),
        (status = 413, description = "Too much SQL", body = crate::error::ErrorBody),
        (status = 422, description = "A body with missing or unknown fields, or a file that is not usable SQL", body = crate::error::ErrorBody),
        (status = 429, description = "As many rehearsals as rehearsal.max_running are running", body = crate::error::ErrorBody),
    ))]
pub(super) async fn start(
    axum::extract::State(s): axum::extract::State<AppState>,
    super::events::ApiActor(actor): super::events::ApiActor,
    body: Result<axum::Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Result<impl axum::response::IntoResponse, ApiError> {
    let axum::Json(value) = body.map_err(super::errors::bad_body)?;
    if value.get("report_version").is_some() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "this is a report: store it with POST /api/v1/rehearsals/reports",
        ));
    }
    let body: StartBody = serde_json::from_value(value)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("{e}")))?;
    let permit = s.rehearsals.slots.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{} rehearsals are running, the most rehearsal.max_running allows; try again when one is done",
                s.rehearsals.max_running
            ),
        )
    })?;
    let job = prepare(&s, body, actor).await?;
    write_record(&s.rehearsals.dir, &job.id, &running_record(&job))
        .await
        .map_err(|e| super::rehearsals::internal("record the rehearsal", e))?;
    let mut event = Event::new(Action::RehearsalStarted, job.actor.clone());
    event.source = Some(job.opts.source.clone());
    event.branch = Some(job.opts.branch.clone());
    event.reason = Some(format!("rehearsal {}", job.id));
    s.registry.audit().record(event);
    let url = format!("/api/v1/rehearsals/{}", job.id);
    let started = Started {
        id: job.id.clone(),
        source: job.opts.source.clone(),
        branch: job.opts.branch.clone(),
        status: "running",
        url: url.clone(),
    };
    tokio::spawn(run(s, job, permit));
    Ok((
        StatusCode::ACCEPTED,
        [(axum::http::header::LOCATION, url)],
        axum::Json(started),
    ))
}

/// The record of a run that is not over.
fn running_record(job: &Job) -> Value {
    json!({
        "id": job.id,
        "status": "running",
        "source": job.opts.source,
        "branch": job.opts.branch,
        "started_at": job.started_at,
        "keep": job.keep,
    })
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Makes the branch, rehearses, removes the branch unless `keep`, and stores the
/// report (or why there is none). Holds its slot until done.
async fn run(s: AppState, job: Job, _slot: OwnedSemaphorePermit) {
    let opts = CreateOptions {
        snapshot: job.snapshot.clone(),
        if_exists: IfExists::Fail,
        actor: job.actor.clone(),
        ..CreateOptions::default()
    };
    // A background run can wait for its clone longer than a request would.
    let wait = s.provision_timeout.max(CREATE_WAIT);
    // Only a branch this run made is ever removed: `if_exists: fail` makes an
    // existing one (or one made meanwhile by someone else) an error.
    let made = s.registry.ensure(&job.branch, &opts, wait).await;
    let outcome = match made {
        Err(e) => Err(format!(
            "cannot create the rehearsal branch: {}",
            ApiError::from(e).message
        )),
        Ok(_) => {
            // A restart from here on finds the branch to remove in the record.
            let mut record = running_record(&job);
            record["made"] = true.into();
            if let Err(e) = write_record(&s.rehearsals.dir, &job.id, &record).await {
                warn!(error = %e, id = job.id, "rehearsal: cannot update its record");
            }
            let ran = crate::rehearse::rehearse(&job.opts).await;
            Recordings::global().take(&job.opts.source, &job.opts.branch);
            if !job.keep || ran.is_err() {
                remove_branch(&s, &job.branch, job.actor.clone()).await;
            }
            ran.map_err(|e| client_words(&e))
        }
    };
    let (record, mut event) = match outcome {
        Ok(report) => {
            let mut value = serde_json::to_value(&report).unwrap_or(Value::Null);
            value["status"] = "done".into();
            let mut event = Event::new(Action::RehearsalReported, job.actor.clone());
            event.reason = Some(format!(
                "{} (exit code {}), report {}",
                value["outcome"].as_str().unwrap_or("?"),
                report.exit_code,
                job.id
            ));
            // The report's own id is the one the caller polls.
            value["id"] = job.id.clone().into();
            (value, event)
        }
        Err(error) => {
            let mut event = Event::new(Action::RehearsalFailed, job.actor.clone());
            event.reason = Some(format!("rehearsal {}: {error}", job.id));
            let mut record = failed_record(&job.id, &job.opts.source, &job.opts.branch, &error);
            record["started_at"] = job.started_at.clone().into();
            (record, event)
        }
    };
    if let Err(e) = write_record(&s.rehearsals.dir, &job.id, &record).await {
        warn!(error = %e, id = job.id, "rehearsal: cannot store the report");
    }
    event.source = Some(job.opts.source.clone());
    event.branch = Some(job.opts.branch.clone());
    s.registry.audit().record(event);
    info!(id = job.id, branch = %job.branch, status = %record["status"], "rehearsal finished");
}

fn failed_record(id: &str, source: &str, branch: &str, error: &str) -> Value {
    json!({
        "id": id,
        "status": "failed",
        "source": source,
        "branch": branch,
        "started_at": now_rfc3339(),
        "outcome": "migration_failed",
        "exit_code": 1,
        "error": error,
    })
}

/// What a caller may read of a run that could not be made: the contexts, and the
/// server's own words for a database error; never an OS error or a path (those
/// go to the log).
fn client_words(e: &anyhow::Error) -> String {
    warn!(error = format!("{e:#}"), "rehearsal could not run");
    let db = e.chain().find_map(|c| {
        c.downcast_ref::<tokio_postgres::Error>()
            .and_then(|p| p.as_db_error())
            .map(|d| format!("{} {}", d.code().code(), d.message()))
    });
    let top = e.to_string();
    match db {
        Some(db) => format!("{top}: {db}"),
        None => top,
    }
}

async fn remove_branch(s: &AppState, branch: &BranchId, actor: Actor) {
    match s
        .registry
        .delete_by(branch, true, RemoveReason::Api, actor)
        .await
    {
        Ok(()) => {}
        Err(e) => {
            let e = ApiError::from(e);
            if e.status != StatusCode::NOT_FOUND {
                warn!(%branch, error = e.message, "rehearsal: cannot remove the branch");
            }
        }
    }
}

/// Writes `<id>.json` whole (a temporary file, fsynced, renamed over it).
pub(super) async fn write_record(dir: &FsPath, id: &str, value: &Value) -> std::io::Result<()> {
    let dir = dir.to_owned();
    let path = dir.join(format!("{id}.json"));
    let value = value.clone();
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        std::fs::create_dir_all(&dir)?;
        crate::fsutil::write_json_atomic(&path, &value)
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Marks the runs a previous process left `running` as failed and removes the
/// branches they had made (kept or not: a migration that stopped half way is no
/// state to keep).
pub(super) async fn recover(s: AppState) {
    let dir = s.rehearsals.dir.clone();
    let running: Vec<Value> = tokio::task::spawn_blocking(move || {
        crate::rehearsal_report::stored_reports(&dir)
            .into_iter()
            .filter(|r| r["status"] == "running")
            .collect()
    })
    .await
    .unwrap_or_default();
    for r in running {
        let (Some(id), Some(source), Some(branch)) =
            (r["id"].as_str(), r["source"].as_str(), r["branch"].as_str())
        else {
            continue;
        };
        let error = "interrupted: the proxy stopped while the rehearsal ran";
        // Only a branch the run had made (`made`), never one it may have found.
        if r["made"] == true {
            if let Ok(bid) = super::branch_path::branch_id(&s, source, branch) {
                remove_branch(&s, &bid, Actor::proxy()).await;
            }
        }
        let mut record = failed_record(id, source, branch, error);
        record["started_at"] = r["started_at"].clone();
        if let Err(e) = write_record(&s.rehearsals.dir, id, &record).await {
            warn!(error = %e, id, "rehearsal: cannot mark the interrupted run");
            continue;
        }
        let mut event = Event::new(Action::RehearsalFailed, Actor::proxy());
        event.source = Some(source.to_owned());
        event.branch = Some(branch.to_owned());
        event.reason = Some(format!("rehearsal {id}: {error}"));
        s.registry.audit().record(event);
        info!(
            id,
            source, branch, "rehearsal interrupted by a restart: marked failed"
        );
    }
}
