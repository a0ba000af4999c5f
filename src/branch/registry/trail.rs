//! What the registry writes to the audit trail: the reasons its rules give, in the
//! words of the configuration key that decided.

use super::{Registry, RemoveReason};
use crate::audit::{Actor, ActorKind};
use crate::error::ProvisionError;
use crate::names::BranchId;

/// Why a creation was refused, naming the limit (`quota`, `max_branches_per_role
/// 2`, `create_roles`).
pub(super) fn refusal(e: &ProvisionError) -> String {
    match e {
        ProvisionError::Quota { limit, .. } => format!("quota (max_branches {limit})"),
        ProvisionError::RoleQuota { limit, .. } => format!("max_branches_per_role {limit}"),
        ProvisionError::CreateForbidden { key, .. } => key.clone(),
        ProvisionError::PolicyQuota { policy, limit, .. } => {
            format!("policy \"{policy}\" max_branches {limit}")
        }
        ProvisionError::SizeQuota { limit, .. } => format!("max_total_size {limit}"),
        other => other.kind().as_str().to_owned(),
    }
}

fn span(d: std::time::Duration) -> String {
    humantime::format_duration(d).to_string()
}

impl Registry {
    /// The reason recorded for a removal: the limit that expired it (`idle 2h`,
    /// `max_lifetime 7d`, `ttl`).
    pub(super) fn removal_reason(&self, id: &BranchId, reason: RemoveReason) -> Option<String> {
        let policy = self.sources.get(&id.source)?.config.policy(&id.branch);
        match reason {
            RemoveReason::Idle => policy.idle_expire.map(|d| format!("idle {}", span(d))),
            RemoveReason::Lifetime => policy
                .max_lifetime
                .map(|d| format!("max_lifetime {}", span(d))),
            RemoveReason::Ttl => Some("ttl".to_owned()),
            RemoveReason::Api => None,
        }
    }

    /// The reason recorded for a suspension by `actor`.
    pub(super) fn suspension_reason(&self, id: &BranchId, actor: &Actor) -> Option<String> {
        match actor.kind {
            ActorKind::Reaper => {
                let config = &self.sources.get(&id.source)?.config;
                let policy = config.policy(&id.branch);
                policy.suspend_after.map(|d| format!("idle {}", span(d)))
            }
            ActorKind::Proxy => Some("shutdown".to_owned()),
            _ => None,
        }
    }
}

/// Who removes a branch for `reason`, when the caller did not say.
pub(super) fn remover(reason: RemoveReason) -> Actor {
    match reason {
        RemoveReason::Idle | RemoveReason::Lifetime | RemoveReason::Ttl => Actor::reaper(),
        RemoveReason::Api => Actor::api(None, None),
    }
}
