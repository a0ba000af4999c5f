//! `/api/v1/rehearsals/recording/{source}/{branch}`: the statements the proxy
//! recorded on a rehearsal branch's sessions (`GET`), and dropping them (`DELETE`).
//! `offshoot rehearse` reads them after a `-- COMMAND` run.

use axum::extract::Path;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;

use crate::recording::Recordings;

pub(super) async fn recording(Path((source, branch)): Path<(String, String)>) -> impl IntoResponse {
    Json(Recordings::global().get(&source, &branch))
}

pub(super) async fn drop_recording(
    Path((source, branch)): Path<(String, String)>,
) -> impl IntoResponse {
    Recordings::global().take(&source, &branch);
    StatusCode::NO_CONTENT
}
