//! Changing a branch's TTL and protection after its creation (the API's PATCH).
//!
//! The record is rewritten under the registry's lock, so the reaper, a deletion or a
//! second change never act on a half-applied one, and a restart keeps what was set.

use tracing::info;

use super::policy::rfc3339;
use super::{BranchView, Registry};
use crate::audit::{Action, Actor, Event};
use crate::names::BranchId;

/// What to change; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    /// The TTL's deadline (Unix milliseconds); `Some(None)` removes the TTL, so the
    /// policy's deadlines apply again.
    pub expires_at: Option<Option<u64>>,
    /// Protect it (`true`) or lift its protection, the policy's included (`false`).
    pub protected: Option<bool>,
    /// When the protection ends; `Some(None)`: it does not end by itself.
    pub protected_until: Option<Option<u64>>,
}

/// Why a change was refused.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("branch {0} does not exist")]
    NotFound(BranchId),
    #[error("branch {0} is being created, started, suspended or deleted; try again")]
    Busy(BranchId),
    #[error(
        "branch {id} is persistent ({by}), so a TTL would never apply; unset persistence first"
    )]
    Persistent { id: BranchId, by: &'static str },
    #[error("could not save branch {0}'s record")]
    Store(BranchId, #[source] std::io::Error),
}

impl Registry {
    /// Applies `changes` to the settled branch `id` and saves its record; the audit
    /// trail records the new settings as its reason, on behalf of `actor`.
    pub fn update(
        &self,
        id: &BranchId,
        changes: &Changes,
        actor: Actor,
    ) -> Result<BranchView, UpdateError> {
        let mut book = self.lock();
        let branch = book
            .branches
            .get_mut(id)
            .ok_or_else(|| UpdateError::NotFound(id.clone()))?;
        // A creation in flight rewrites the record when it ends.
        if !branch.state().settled() {
            return Err(UpdateError::Busy(id.clone()));
        }
        let mut rec = branch.record.clone();
        if let Some(expires_at) = changes.expires_at {
            if expires_at.is_some() {
                if let Some(by) = self.persistent_by(&rec) {
                    return Err(UpdateError::Persistent { id: id.clone(), by });
                }
            }
            rec.expires_at = expires_at;
        }
        match (changes.protected, changes.protected_until) {
            (Some(false), _) => {
                rec.protected = Some(false);
                rec.protected_until = None;
            }
            (Some(true), until) => {
                rec.protected = Some(true);
                rec.protected_until = until.flatten();
            }
            // A time alone protects until then.
            (None, Some(until)) => {
                rec.protected = Some(true);
                rec.protected_until = until;
            }
            (None, None) => {}
        }
        self.store
            .save(&rec)
            .map_err(|e| UpdateError::Store(id.clone(), e))?;
        let expires = rec.expires_at.map_or("policy".into(), rfc3339);
        let protection = match (rec.protected, rec.protected_until) {
            (None, _) => "policy".to_owned(),
            (Some(false), _) => "off".to_owned(),
            (Some(true), None) => "on".to_owned(),
            (Some(true), Some(t)) => format!("until {}", rfc3339(t)),
        };
        info!(branch = %id, expires_at = %expires, protected = %protection, "branch lifecycle changed");
        self.audit.record(
            Event::new(Action::BranchUpdated, actor)
                .branch(id)
                .snapshot(rec.snapshot.as_deref())
                .reason(format!("expires_at {expires}, protected {protection}")),
        );
        branch.record = rec;
        let branch = &book.branches[id];
        Ok(self.view_of(branch))
    }
}
