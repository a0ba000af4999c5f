//! `POST /api/v1/branches/{source}/{branch}/reset`: the branch made again under the
//! same name and address (see `Registry::reset`).

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use tracing::warn;

use super::branch_path::{self, not_found, BranchPath};
use super::errors::in_use;
use super::{ApiError, AppState};
use crate::branch::ResetError;
use crate::error::ErrorKind;
use crate::names::BranchId;

/// The request body; `{}` resets to the newest snapshot without force.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ResetBody {
    /// The snapshot to make the branch from; default the newest (or the live
    /// source, where the source has no snapshots).
    #[serde(default)]
    snapshot: Option<String>,
    /// Terminate open sessions (they get 57P01) instead of refusing.
    #[serde(default)]
    force: bool,
}

impl From<ResetError> for ApiError {
    fn from(e: ResetError) -> Self {
        match e {
            ResetError::NotFound(id) => not_found(&id),
            ResetError::InUse { id, conns } => {
                in_use(&id, conns).hint("reset with \"force\": true to terminate them")
            }
            ResetError::Busy(id) => ApiError::of_kind(
                ErrorKind::Busy,
                format!(
                    "branch {id} is being created, started, suspended, reset or deleted; \
                     try again"
                ),
            ),
            ResetError::Snapshot(err) => err.into(),
            ResetError::Kept { id, err } => {
                warn!(branch = %id, error = %err, "reset failed");
                ApiError::of_kind(
                    err.kind(),
                    format!(
                        "could not reset branch {id}: its clone could not be removed, so \
                         it stays as it was: {}",
                        err.client_message()
                    ),
                )
            }
            ResetError::Failed { id, err } => ApiError::of_kind(
                err.kind(),
                format!(
                    "branch {id} was removed: its new clone could not be made: {}",
                    err.client_message()
                ),
            )
            .hint("the next connection or create makes it afresh"),
        }
    }
}

/// A protected branch (by its policy or through the API) is reset only with
/// `force`; a scheduled refresh is not refused (the policy asked for it).
fn refuse_protected(s: &AppState, id: &BranchId) -> Result<(), ApiError> {
    match s.registry.reset_guard(id) {
        None => Ok(()),
        Some(guard) => Err(ApiError::of_kind(
            ErrorKind::Conflict,
            format!("branch {id} is {guard}"),
        )
        .hint("reset with \"force\": true to reset it anyway")),
    }
}

/// Resets the branch and answers with it as it is now, once the new clone serves
/// (202 if that takes longer than `provision_timeout`; the reset goes on).
#[utoipa::path(post, path = "/api/v1/branches/{source}/{branch}/reset", operation_id = "reset_branch",
    tag = "branches", request_body = ResetBody,
    params(BranchPath),
    responses(
        (status = 200, description = "The branch, made again and serving", body = crate::branch::BranchView),
        (status = 202, description = "Still being reset after provision_timeout; it goes on", body = crate::error::ErrorBody),
        (status = 400, description = "No JSON body, or a bad one", body = crate::error::ErrorBody),
        (status = 404, description = "No such source, branch or snapshot", body = crate::error::ErrorBody),
        (status = 409, description = "Open connections or protected (unless force), or in flight", body = crate::error::ErrorBody),
        (status = 422, description = "A JSON body with unknown fields", body = crate::error::ErrorBody),
    ))]
pub(super) async fn reset(
    State(s): State<AppState>,
    super::events::ApiActor(actor): super::events::ApiActor,
    Path(path): Path<BranchPath>,
    body: Result<Json<ResetBody>, axum::extract::rejection::JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Json(body) = body.map_err(super::errors::bad_body)?;
    let id = path.resolve(&s)?;
    if !body.force {
        refuse_protected(&s, &id)?;
    }
    let reset = s.registry.reset(&id, body.snapshot, body.force, actor);
    match tokio::time::timeout(s.provision_timeout, reset).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(ApiError::of_kind(
                ErrorKind::ProvisionTimeout,
                format!("branch {id} is still being reset"),
            )
            .hint("the reset goes on; GET the branch to see when it is ready"))
        }
    }
    Ok(Json(branch_path::view(&s, &id)?))
}
