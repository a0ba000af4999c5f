//! `/api/v1/rehearsals`: rehearsal reports kept under `<state.dir>/rehearsals/`
//! (list them; read one; `POST /api/v1/rehearsals/reports` stores one, as
//! `offshoot rehearse` does after a run; `POST /api/v1/rehearsals` starts a run
//! on the server, see [`super::rehearsal_run`]), and
//! `/api/v1/rehearsals/recording/{source}/{branch}`: the statements the proxy
//! recorded on a rehearsal branch's sessions (`GET`), and dropping them (`DELETE`).
//!
//! Reports are JSON as `docs/rehearsal-report.md` describes; the API checks the
//! fields it reads (`report_version`, `id`, `source`, `branch`) and keeps the rest
//! as sent. Each stored report is an audit event (`rehearsal.reported`).

use std::path::{Path as FsPath, PathBuf};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde_json::{json, Value};
use tracing::warn;

use super::events::ApiActor;
use super::{ApiError, AppState};
use crate::audit::{Action, Event};
use crate::recording::Recordings;
use crate::rehearsal_report::{stored_reports, valid_id};

/// The report versions this server stores.
const VERSIONS: [u64; 1] = [1];

/// The statements recorded on a rehearsal branch's sessions, oldest first.
#[utoipa::path(get, path = "/api/v1/rehearsals/recording/{source}/{branch}",
    operation_id = "show_recording", tag = "rehearsals",
    params(("source" = String, Path, description = "The source's name"),
           ("branch" = String, Path, description = "The rehearsal branch's name")),
    responses((status = 200, description = "The recording (empty if none)", body = crate::recording::Recording)))]
pub(super) async fn recording(Path((source, branch)): Path<(String, String)>) -> impl IntoResponse {
    Json(Recordings::global().get(&source, &branch))
}

/// Drops a rehearsal branch's recording.
#[utoipa::path(delete, path = "/api/v1/rehearsals/recording/{source}/{branch}",
    operation_id = "drop_recording", tag = "rehearsals",
    params(("source" = String, Path, description = "The source's name"),
           ("branch" = String, Path, description = "The rehearsal branch's name")),
    responses(
        (status = 204, description = "Dropped (or there was none)"),
        (status = 401, description = "No or a wrong token", body = crate::error::ErrorBody),
    ))]
pub(super) async fn drop_recording(
    Path((source, branch)): Path<(String, String)>,
) -> impl IntoResponse {
    Recordings::global().take(&source, &branch);
    StatusCode::NO_CONTENT
}

fn file(dir: &FsPath, id: &str) -> PathBuf {
    dir.join(format!("{id}.json"))
}

pub(super) fn internal(what: &str, e: impl std::fmt::Display) -> ApiError {
    warn!(error = %e, "rehearsal reports: {what}");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot {what}"))
}

/// Stores a report made elsewhere (`offshoot rehearse`); 201 with its id and
/// where to read it.
#[utoipa::path(post, path = "/api/v1/rehearsals/reports", operation_id = "store_rehearsal", tag = "rehearsals",
    request_body(content = Object, description = "A rehearsal report, as docs/rehearsal-report.md describes"),
    responses(
        (status = 201, description = "Stored", body = Object),
        (status = 400, description = "Not a report this server stores", body = crate::error::ErrorBody),
        (status = 401, description = "No or a wrong token", body = crate::error::ErrorBody),
    ))]
pub(super) async fn store(
    State(s): State<AppState>,
    ApiActor(actor): ApiActor,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Json(report) = body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let version = report["report_version"].as_u64();
    if !version.is_some_and(|v| VERSIONS.contains(&v)) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("report_version must be one of {VERSIONS:?}"),
        ));
    }
    let id = report["id"].as_str().unwrap_or("").to_owned();
    if !valid_id(&id) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "id must be 8 lowercase hex digits",
        ));
    }
    let (Some(source), Some(branch)) = (report["source"].as_str(), report["branch"].as_str())
    else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "source and branch are required",
        ));
    };
    let (source, branch) = (source.to_owned(), branch.to_owned());
    super::rehearsal_run::write_record(&s.rehearsals.dir, &id, &report)
        .await
        .map_err(|e| internal("store the report", e))?;
    let mut event = Event::new(Action::RehearsalReported, actor);
    event.source = Some(source);
    event.branch = Some(branch);
    event.reason = Some(format!(
        "{} (exit code {}), report {id}",
        report["outcome"].as_str().unwrap_or("?"),
        report["exit_code"].as_u64().unwrap_or(1)
    ));
    s.registry.audit().record(event);
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": id, "url": format!("/api/v1/rehearsals/{id}") })),
    ))
}

/// Summaries of the stored reports, newest first.
#[utoipa::path(get, path = "/api/v1/rehearsals", operation_id = "list_rehearsals", tag = "rehearsals",
    responses(
        (status = 200, description = "id, status (running, done, failed), source, branch, started_at, outcome, exit_code, statements, hazards", body = Vec<Object>),
        (status = 401, description = "No or a wrong token", body = crate::error::ErrorBody),
    ))]
pub(super) async fn list(State(s): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let dir = s.rehearsals.dir.clone();
    let summaries = tokio::task::spawn_blocking(move || -> Vec<Value> {
        stored_reports(&dir)
            .into_iter()
            .map(|r| {
                json!({
                    "id": r["id"],
                    "status": r["status"].as_str().unwrap_or("done"),
                    "source": r["source"],
                    "branch": r["branch"],
                    "started_at": r["started_at"],
                    "outcome": r["outcome"],
                    "exit_code": r["exit_code"],
                    "statements": r["statements"].as_array().map_or(0, Vec::len),
                    "hazards": r["hazards"].as_array().map_or(0, Vec::len),
                })
            })
            .collect()
    })
    .await
    .map_err(|e| internal("list the reports", e))?;
    Ok(Json(summaries))
}

/// One stored report, as stored.
#[utoipa::path(get, path = "/api/v1/rehearsals/{id}", operation_id = "show_rehearsal", tag = "rehearsals",
    params(("id" = String, Path, description = "The report's id (8 hex digits)")),
    responses(
        (status = 200, description = "The report (docs/rehearsal-report.md); a run the proxy makes shows status running until its report is done, or failed with an error", body = Object),
        (status = 404, description = "No such report", body = crate::error::ErrorBody),
    ))]
pub(super) async fn show(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, format!("no rehearsal report {id:?}"));
    if !valid_id(&id) {
        return Err(not_found());
    }
    let path = file(&s.rehearsals.dir, &id);
    let bytes = match tokio::fs::read(&path).await {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_found()),
        Err(e) => return Err(internal("read the report", e)),
    };
    let report: Value =
        serde_json::from_slice(&bytes).map_err(|e| internal("read the report", e))?;
    Ok(Json(report))
}
