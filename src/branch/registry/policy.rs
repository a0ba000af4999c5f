//! Policy: who may make a branch and how many there may be, which branches never
//! expire, and which are due for suspension or expiry at a given time.
//!
//! Every check here runs under the registry's lock, against the branches it holds,
//! so two connections racing for the last slot of a quota cannot both win.

use std::time::{Duration, SystemTime};

use super::state::Phase;
use super::{Book, Registry, Source};
use crate::branch::store::BranchRecord;
use crate::clock::unix_ms;
use crate::error::ProvisionError;
use crate::names::BranchId;

/// An authenticated role asking for a branch: whether it may make one, and how many
/// it may have.
#[derive(Debug, Clone)]
pub struct Creator {
    pub role: String,
    /// `sources.<name>.create_roles` allows it.
    pub may_create: bool,
    /// `sources.<name>.max_branches_per_role`; 0: no limit.
    pub max_branches: usize,
}

impl Registry {
    /// Whether a new branch `id` may be made now, by `creator` if given: the role's
    /// permission and quota, then the source's `max_branches`.
    pub(super) fn may_create(
        &self,
        book: &Book,
        id: &BranchId,
        source: &Source,
        creator: Option<&Creator>,
    ) -> Result<(), ProvisionError> {
        let of_source = || book.branches.iter().filter(|(k, _)| k.source == id.source);
        if let Some(c) = creator {
            if !c.may_create {
                return Err(ProvisionError::CreateForbidden {
                    role: c.role.clone(),
                    source_name: id.source.to_string(),
                });
            }
            let mine = of_source().filter(|(_, b)| b.made_by(c)).count();
            if c.max_branches > 0 && mine >= c.max_branches {
                return Err(ProvisionError::RoleQuota {
                    role: c.role.clone(),
                    source_name: id.source.to_string(),
                    limit: c.max_branches,
                });
            }
        }
        if of_source().count() >= source.config.max_branches {
            return Err(ProvisionError::Quota {
                source_name: id.source.to_string(),
                limit: source.config.max_branches,
            });
        }
        Ok(())
    }

    /// Never expires: made persistent, or named in its source's `persistent` list.
    pub(super) fn is_persistent(&self, rec: &BranchRecord) -> bool {
        rec.persistent
            || self
                .sources
                .get(&rec.source)
                .is_some_and(|s| s.persistent.contains(&rec.branch))
    }

    /// Settled (Ready or Suspended), unused, non-persistent branches idle past their
    /// source's `idle_expire` at `now`, with how long each has been idle.
    pub fn idle_candidates(&self, now: SystemTime) -> Vec<(BranchId, Duration)> {
        let now_ms = unix_ms(now);
        let book = self.lock();
        book.branches
            .iter()
            .filter_map(|(id, b)| {
                let limit = self.sources.get(&id.source)?.config.idle_expire?;
                if !b.state().settled()
                    || b.activity.connections() > 0
                    || self.is_persistent(&b.record)
                {
                    return None;
                }
                let idle =
                    Duration::from_millis(now_ms.saturating_sub(b.activity.last_active_ms()));
                (idle >= limit).then(|| (id.clone(), idle))
            })
            .collect()
    }

    /// Ready, unused branches (persistent ones too) whose server has been idle past
    /// their source's `suspend_after` at `now`, with how long each has been idle.
    pub fn suspend_candidates(&self, now: SystemTime) -> Vec<(BranchId, Duration)> {
        let now_ms = unix_ms(now);
        let book = self.lock();
        book.branches
            .iter()
            .filter_map(|(id, b)| {
                let source = self.sources.get(&id.source)?;
                let limit = source.config.suspend_after()?;
                if source.engine.servers().is_none()
                    || b.phase() != Phase::Ready
                    || b.activity.connections() > 0
                {
                    return None;
                }
                let idle =
                    Duration::from_millis(now_ms.saturating_sub(b.activity.last_active_ms()));
                (idle >= limit).then(|| (id.clone(), idle))
            })
            .collect()
    }
}
