//! What every route of one branch (`/api/v1/branches/{source}/{branch}...`) shares:
//! its two path parameters, resolved once into the [`BranchId`] (names validated,
//! source configured), and the one answer for a branch that does not exist.

use serde::Deserialize;
use utoipa::IntoParams;

use super::{unknown_source, ApiError, AppState};
use crate::branch::BranchView;
use crate::error::ErrorKind;
use crate::names::{BranchId, BranchName, SourceName};

/// The `{source}/{branch}` of a branch's route, as sent; also its OpenAPI
/// parameters (`params(BranchPath)`).
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub(super) struct BranchPath {
    /// The source's name
    source: String,
    /// The branch's name
    branch: String,
}

impl BranchPath {
    /// The branch it names: 400 for a name that is not valid, 404 for a source
    /// that is not configured. Whether the branch exists is the caller's question.
    pub(super) fn resolve(&self, state: &AppState) -> Result<BranchId, ApiError> {
        branch_id(state, &self.source, &self.branch)
    }
}

/// `source` and `branch` as a [`BranchId`], wherever they were sent (a path or
/// a body): validated names of a configured source.
pub(super) fn branch_id(
    state: &AppState,
    source: &str,
    branch: &str,
) -> Result<BranchId, ApiError> {
    let source = SourceName::new(source)?;
    if state.registry.source(source.as_str()).is_none() {
        return Err(unknown_source(state, source.as_str()));
    }
    Ok(BranchId {
        source,
        branch: BranchName::new(branch)?,
    })
}

/// The one answer for a branch that does not exist (404).
pub(super) fn not_found(id: &BranchId) -> ApiError {
    ApiError::of_kind(ErrorKind::NotFound, format!("branch {id} does not exist"))
}

/// The branch as it is now, or [`not_found`].
pub(super) fn view(state: &AppState, id: &BranchId) -> Result<BranchView, ApiError> {
    state.registry.view(id).ok_or_else(|| not_found(id))
}
