//! `/api/v1/rehearsals/recording/{source}/{branch}`: the statements the proxy
//! recorded on a rehearsal branch's sessions (`GET`), and dropping them (`DELETE`).
//! `offshoot rehearse` reads them after a `-- COMMAND` run.

use axum::extract::Path;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;

use crate::recording::Recordings;

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
