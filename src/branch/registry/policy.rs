//! Policy: who may make a branch and how many there may be, which branches are
//! persistent or protected, and when each is due for suspension or expiry.
//!
//! A branch is governed by the first `[[sources.X.policies]]` pattern its name
//! matches (see [`crate::config::Policy`]), over its source's keys; what its record
//! says (a TTL, protection set through the API, `persistent` at creation) comes on
//! top of that.
//!
//! Every check here runs under the registry's lock, against the branches it holds,
//! so two connections racing for the last slot of a quota cannot both win.

use std::fmt;
use std::time::{Duration, SystemTime};

use super::state::{Branch, Phase};
use super::{Book, Registry, RemoveReason, Source};
use crate::branch::store::BranchRecord;
use crate::clock::unix_ms;
use crate::config::Policy;
use crate::error::ProvisionError;
use crate::names::BranchId;

/// An authenticated role asking for a branch: whether it may make one, and how many
/// it may have.
#[derive(Debug, Clone)]
pub struct Creator {
    pub role: String,
    /// The governing policy's `create_roles` (or the source's) allows it.
    pub may_create: bool,
    /// `sources.<name>.max_branches_per_role`; 0: no limit.
    pub max_branches: usize,
}

/// Why a branch is refused deletion (and, for [`Guard::Protected`], reset) unless
/// the request is forced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Guard {
    /// Protected by its policy or through the API; `until` is when that ends.
    Protected {
        by: &'static str,
        until: Option<u64>,
    },
    /// Persistent: it never expires, and deleting it is deliberate.
    Persistent { by: &'static str },
}

impl fmt::Display for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Guard::Protected { by, until: None } => write!(f, "protected ({by})"),
            Guard::Protected { by, until: Some(t) } => {
                write!(f, "protected until {} ({by})", rfc3339(*t))
            }
            Guard::Persistent { by } => write!(f, "persistent ({by})"),
        }
    }
}

/// A branch due for removal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub id: BranchId,
    pub reason: RemoveReason,
    /// How long it has had no connection.
    pub idle: Duration,
}

pub(super) fn rfc3339(ms: u64) -> String {
    let t = SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(t).to_string()
}

impl Registry {
    /// Whether a new branch `id` may be made now, by `creator` if given: the role's
    /// permission and quota, the governing policy's `max_branches`, then the
    /// source's.
    pub(super) fn may_create(
        &self,
        book: &Book,
        id: &BranchId,
        source: &Source,
        creator: Option<&Creator>,
    ) -> Result<(), ProvisionError> {
        let of_source = || book.branches.iter().filter(|(k, _)| k.source == id.source);
        let policy = source.config.policy(&id.branch);
        let refused = |reason: &str| {
            self.metrics
                .policy_refusals_total
                .with_label_values(&[id.source.as_str(), reason])
                .inc();
        };
        if let Some(c) = creator {
            if !c.may_create {
                refused("create_roles");
                let key = match policy.index {
                    Some(i) => format!(
                        "policy \"{}\", sources.{}.policies[{i}].create_roles",
                        policy.name.unwrap_or_default(),
                        id.source
                    ),
                    None => format!("sources.{}.create_roles", id.source),
                };
                return Err(ProvisionError::CreateForbidden {
                    role: c.role.clone(),
                    branch: id.clone(),
                    key,
                });
            }
            let mine = of_source().filter(|(_, b)| b.made_by(c)).count();
            if c.max_branches > 0 && mine >= c.max_branches {
                refused("max_branches_per_role");
                return Err(ProvisionError::RoleQuota {
                    role: c.role.clone(),
                    source_name: id.source.to_string(),
                    limit: c.max_branches,
                });
            }
        }
        if let (Some(limit), Some(index)) = (policy.max_branches, policy.index) {
            let governed = of_source()
                .filter(|(k, _)| source.config.policy_index(k.branch.as_str()) == Some(index))
                .count();
            if governed >= limit {
                refused("max_branches");
                return Err(ProvisionError::PolicyQuota {
                    source_name: id.source.to_string(),
                    policy: policy.name.unwrap_or_default().to_owned(),
                    limit,
                });
            }
        }
        if let Some(limit) = source.config.max_total_size {
            let total = self.total_size(book, &id.source);
            if total >= limit.bytes() {
                refused("max_total_size");
                return Err(ProvisionError::SizeQuota {
                    source_name: id.source.to_string(),
                    limit: limit.to_string(),
                    total: crate::config::ByteSize(total).to_string(),
                });
            }
        }
        if of_source().count() >= source.config.max_branches {
            refused("source_max_branches");
            return Err(ProvisionError::Quota {
                source_name: id.source.to_string(),
                limit: source.config.max_branches,
            });
        }
        Ok(())
    }

    /// The policy governing `rec`'s branch.
    pub(super) fn governing(&self, rec: &BranchRecord) -> Policy<'_> {
        self.sources[&rec.source].config.policy(&rec.branch)
    }

    /// Never expires: made persistent, named in its source's `persistent` list, or
    /// governed by a persistent policy.
    pub(super) fn is_persistent(&self, rec: &BranchRecord) -> bool {
        rec.persistent || self.persistent_by(rec).is_some()
    }

    pub(super) fn persistent_by(&self, rec: &BranchRecord) -> Option<&'static str> {
        let source = self.sources.get(&rec.source)?;
        if source.persistent.contains(&rec.branch) {
            return Some("the source's `persistent` list");
        }
        if source.config.policy(&rec.branch).persistent {
            return Some("its policy");
        }
        rec.persistent.then_some("created persistent")
    }

    /// Whether `rec` is protected at `now_ms`, and by what.
    pub(super) fn protection_at(&self, rec: &BranchRecord, now_ms: u64) -> Option<Guard> {
        let by = match rec.protected {
            Some(true) => "set through the API",
            Some(false) => return None,
            None if self.governing(rec).protected => "its policy",
            None => return None,
        };
        match rec.protected_until {
            Some(until) if now_ms >= until => None,
            until => Some(Guard::Protected { by, until }),
        }
    }

    /// What refuses an unforced deletion of `rec` now: its protection, or its
    /// persistence.
    pub(super) fn guard(&self, rec: &BranchRecord) -> Option<Guard> {
        self.protection_at(rec, self.clock.unix_ms())
            .or_else(|| self.persistent_by(rec).map(|by| Guard::Persistent { by }))
    }

    /// What refuses an unforced reset of `id` now (its protection), if anything.
    pub fn reset_guard(&self, id: &BranchId) -> Option<Guard> {
        let book = self.lock();
        let b = book.branches.get(id)?;
        self.protection_at(&b.record, self.clock.unix_ms())
    }

    /// When `b` is due for removal if nothing changes, and why: its TTL if it has
    /// one, else the earlier of its idle deadline (only while no connection is open)
    /// and its lifetime. `None` for persistent branches.
    pub(super) fn deadline(&self, b: &Branch) -> Option<(u64, RemoveReason)> {
        let rec = &b.record;
        if self.is_persistent(rec) {
            return None;
        }
        if let Some(at) = rec.expires_at {
            return Some((at, RemoveReason::Ttl));
        }
        let policy = self.governing(rec);
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let idle = policy
            .idle_expire
            .filter(|_| b.activity.connections() == 0)
            .map(|d| {
                (
                    b.activity.last_active_ms().saturating_add(ms(d)),
                    RemoveReason::Idle,
                )
            });
        let life = policy
            .max_lifetime
            .map(|d| (rec.born_at().saturating_add(ms(d)), RemoveReason::Lifetime));
        match (idle, life) {
            (Some(i), Some(l)) => Some(if l.0 <= i.0 { l } else { i }),
            (i, l) => i.or(l),
        }
    }

    /// When the reaper will remove `b` if nothing changes: [`Self::deadline`], but
    /// not before its protection ends (never, while protected for good).
    pub(super) fn expires_at(&self, b: &Branch) -> Option<u64> {
        let (at, _) = self.deadline(b)?;
        match self.protection_at(&b.record, self.clock.unix_ms()) {
            Some(Guard::Protected { until: None, .. }) => None,
            Some(Guard::Protected { until: Some(u), .. }) => Some(at.max(u)),
            _ => Some(at),
        }
    }

    /// Settled (Ready or Suspended), unused, unprotected branches past their
    /// deadline at `now`: idle past `idle_expire`, older than `max_lifetime`, or past
    /// their TTL.
    pub fn expiry_candidates(&self, now: SystemTime) -> Vec<Due> {
        let now_ms = unix_ms(now);
        let book = self.lock();
        book.branches
            .iter()
            .filter_map(|(id, b)| {
                if !b.state().settled() || b.activity.connections() > 0 {
                    return None;
                }
                let (at, reason) = self.deadline(b)?;
                if at > now_ms || self.protection_at(&b.record, now_ms).is_some() {
                    return None;
                }
                let idle = now_ms.saturating_sub(b.activity.last_active_ms());
                Some(Due {
                    id: id.clone(),
                    reason,
                    idle: Duration::from_millis(idle),
                })
            })
            .collect()
    }

    /// Ready, unused branches (persistent ones too) whose server has been idle past
    /// their policy's `suspend_after` at `now`, with how long each has been idle.
    pub fn suspend_candidates(&self, now: SystemTime) -> Vec<(BranchId, Duration)> {
        let now_ms = unix_ms(now);
        let book = self.lock();
        book.branches
            .iter()
            .filter_map(|(id, b)| {
                let source = self.sources.get(&id.source)?;
                let limit = source.config.policy(&id.branch).suspend_after?;
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
