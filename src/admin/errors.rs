//! The admin API's side of the one error shape: how its own failures, axum's
//! rejections, unknown routes and methods become an [`ApiError`] (the shape itself
//! is in `crate::error`).

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::Request;
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::warn;

use crate::branch::DeleteError;
use crate::error::{ApiError, EngineError, ErrorKind, ProvisionError};
use crate::names::{BranchId, NameError};

/// What a refused deletion of a branch in use says to do.
const FORCE_HINT: &str = "delete with ?force=true to terminate them";

impl From<NameError> for ApiError {
    fn from(e: NameError) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, e.to_string())
    }
}

impl From<ProvisionError> for ApiError {
    fn from(e: ProvisionError) -> Self {
        ApiError::of_kind(e.kind(), e.client_message()).with_sqlstate(e.sqlstate())
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        warn!(error = %e, "admin API request failed");
        ApiError::of_kind(e.kind(), e.client_message()).with_sqlstate(e.sqlstate())
    }
}

impl From<DeleteError> for ApiError {
    fn from(e: DeleteError) -> Self {
        match e {
            DeleteError::NotFound(id) => super::branch_path::not_found(&id),
            DeleteError::InUse { id, conns } => in_use(&id, conns).hint(FORCE_HINT),
            e @ DeleteError::Guarded { .. } => {
                ApiError::of_kind(ErrorKind::Conflict, e.to_string())
                    .hint("delete with ?force=true to remove it anyway")
            }
            DeleteError::Busy(id) => ApiError::of_kind(
                ErrorKind::Busy,
                format!("branch {id} is being created, started, suspended or deleted; try again"),
            ),
            DeleteError::Engine { id, err } => {
                warn!(branch = %id, error = %err, "deletion failed");
                ApiError::of_kind(
                    err.kind(),
                    format!("could not delete branch {id}: {}", err.client_message()),
                )
                .with_sqlstate(err.sqlstate())
            }
        }
    }
}

/// A branch refused a change because clients are connected to it (409); the
/// caller adds the hint that says how to force it.
pub(super) fn in_use(id: &BranchId, conns: usize) -> ApiError {
    ApiError::of_kind(
        ErrorKind::Conflict,
        format!("branch {id} has {conns} open connection(s)"),
    )
}

/// A body axum could not read (not JSON, wrong fields), in the one error shape.
pub(super) fn bad_body(e: JsonRejection) -> ApiError {
    ApiError::new(e.status(), e.body_text())
}

/// A query string axum could not read, in the one error shape.
pub(super) fn bad_query(e: QueryRejection) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, e.body_text())
}

/// Answers a path no route serves: JSON under `/api/`, plain text elsewhere.
pub(super) async fn no_route(method: Method, uri: axum::http::Uri) -> Response {
    let path = uri.path();
    if path.starts_with("/api/") {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no API route {method} {path}; the routes are listed at /api/v1/openapi.json"),
        )
        .into_response()
    } else {
        (StatusCode::NOT_FOUND, "not found").into_response()
    }
}

/// Gives an error answer that is not JSON yet (axum's own: a method not allowed,
/// a body too large, an extractor's rejection) the one error shape.
pub(super) async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let text = axum::body::to_bytes(resp.into_body(), 4096)
        .await
        .ok()
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .filter(|t| !t.is_empty());
    let message = text.unwrap_or_else(|| match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            "this route does not take that method; see /api/v1/openapi.json".to_owned()
        }
        other => other.canonical_reason().unwrap_or("error").to_owned(),
    });
    ApiError::new(status, message).into_response()
}
