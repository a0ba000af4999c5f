//! A branch as the API shows it. The JSON is part of the API: field names and the
//! `state` strings do not change.

use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::state::{Branch, Phase};
use super::Registry;
use crate::branch::engine::CopyMode;
use crate::config::EngineKind;
use crate::names::BranchId;

/// A branch as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct BranchView {
    pub source: String,
    pub branch: String,
    pub state: Phase,
    pub engine: EngineKind,
    pub clone_name: String,
    pub created_at: String,
    pub last_active: String,
    pub connections: usize,
    pub persistent: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// The snapshot the clone was made from (engines with snapshots).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// `reflink` or `copy` (engines that copy files).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy_mode: Option<CopyMode>,
    /// The `match` pattern of the policy governing it; null: the source's keys.
    pub policy: Option<String>,
    /// When the reaper will remove it if nobody uses it (its TTL, or the earlier of
    /// its idle and lifetime deadlines, not before its protection ends); null: never.
    pub expires_at: Option<String>,
    /// Deleting or resetting it needs `force` now.
    pub protected: bool,
    /// When its protection ends; null: it does not.
    pub protected_until: Option<String>,
    /// Its creation or last reset: where `max_lifetime` counts from.
    pub born_at: String,
    /// Its own bytes as last measured in the background; null until then.
    pub size_bytes: Option<u64>,
    /// False when `size_bytes` is the apparent size (blocks shared with the
    /// snapshot counted too); null with `size_bytes`.
    pub size_exact: Option<bool>,
}

fn rfc3339(ms: u64) -> String {
    let t = SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

impl Registry {
    pub fn view(&self, id: &BranchId) -> Option<BranchView> {
        let book = self.lock();
        book.branches.get(id).map(|b| self.view_of(b))
    }

    /// The phase of `id`, if it exists: what a connection looks at, without the
    /// cost of a whole view.
    pub fn phase(&self, id: &BranchId) -> Option<Phase> {
        self.lock().branches.get(id).map(|b| b.phase())
    }

    pub fn list(&self) -> Vec<BranchView> {
        let book = self.lock();
        book.branches.values().map(|b| self.view_of(b)).collect()
    }

    pub(super) fn view_of(&self, b: &Branch) -> BranchView {
        let protection = self.protection_at(&b.record, self.clock.unix_ms());
        let size = self.size_of(&b.record.id());
        BranchView {
            source: b.record.source.to_string(),
            branch: b.record.branch.to_string(),
            state: b.phase(),
            engine: b.record.engine,
            clone_name: b.record.clone_name.clone(),
            created_at: rfc3339(b.record.created_at),
            last_active: rfc3339(b.activity.last_active_ms()),
            connections: b.activity.connections(),
            persistent: self.is_persistent(&b.record),
            created_by: b.record.created_by.clone(),
            snapshot: b.record.snapshot.clone(),
            copy_mode: b.record.copy_mode,
            policy: self.governing(&b.record).name.map(str::to_owned),
            expires_at: self.expires_at(b).map(rfc3339),
            protected: protection.is_some(),
            protected_until: match protection {
                Some(super::Guard::Protected { until, .. }) => until.map(rfc3339),
                _ => None,
            },
            born_at: rfc3339(b.record.born_at()),
            size_bytes: size.map(|u| u.bytes),
            size_exact: size.map(|u| u.exact),
        }
    }
}
