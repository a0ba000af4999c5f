//! Idle suspension and expiry: one step ([`reap_once`]) and a loop around it ([`run`]).
//!
//! Branch sizes are measured here too, on their own interval.
//!
//! A branch idle past its policy's `suspend_after` has its server stopped (engines
//! whose clones run one); past `idle_expire`, past `max_lifetime` since its creation
//! or last reset, or past its TTL, it is removed altogether, once no connection is
//! open. Persistent and protected branches are never removed here.
//!
//! The step takes the time as an argument, so tests can ask "what expires at T?"
//! without sleeping; the loop reads it from the registry's clock. The registry re-checks every condition under its lock when the
//! deletion starts, so a connection arriving between the scan and the deletion wins.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::stream::{self, StreamExt};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::registry::{DeleteError, Due, Registry, RemoveReason};
use crate::names::BranchId;

/// What one step did to one branch.
#[derive(Debug)]
pub enum Outcome {
    Expired {
        id: BranchId,
        /// `Idle`, `Lifetime` or `Ttl`.
        reason: RemoveReason,
        idle: Duration,
    },
    /// Its server was stopped; the data stays.
    Suspended { id: BranchId, idle: Duration },
    /// A connection arrived, or the clone could not be dropped; it stays for now.
    Kept { id: BranchId, why: String },
}

/// Deletions run at once: each DROP DATABASE waits for a checkpoint, so one after
/// another they would make a batch of branches expire late.
const PARALLEL_EXPIRIES: usize = 4;

/// Expires every branch past a deadline of its policy (or its TTL) at `now`,
/// suspends those idle past `suspend_after`, and saves activity stamps.
pub async fn reap_once(registry: &Arc<Registry>, now: SystemTime) -> Vec<Outcome> {
    registry.flush_activity();
    let mut out: Vec<Outcome> = stream::iter(registry.expiry_candidates(now))
        .map(|due| expire(registry, due))
        .buffer_unordered(PARALLEL_EXPIRIES)
        .collect()
        .await;
    let suspended: Vec<Outcome> = stream::iter(registry.suspend_candidates(now))
        .map(|(id, idle)| suspend(registry, id, idle))
        .buffer_unordered(PARALLEL_EXPIRIES)
        .filter_map(|o| async move { o })
        .collect()
        .await;
    out.extend(suspended);
    out
}

async fn suspend(registry: &Arc<Registry>, id: BranchId, idle: Duration) -> Option<Outcome> {
    match registry.suspend(&id).await {
        Ok(true) => {
            info!(branch = %id, idle = %humantime::format_duration(trunc(idle)), "branch server stopped while idle");
            Some(Outcome::Suspended { id, idle })
        }
        // A connection arrived in between.
        Ok(false) => None,
        Err(e) => Some(Outcome::Kept {
            id,
            why: e.to_string(),
        }),
    }
}

async fn expire(registry: &Arc<Registry>, due: Due) -> Outcome {
    let Due { id, reason, idle } = due;
    match registry.delete(&id, false, reason).await {
        Ok(()) => {
            info!(branch = %id, idle = %humantime::format_duration(trunc(idle)), reason = reason.as_str(), "branch expired");
            Outcome::Expired { id, reason, idle }
        }
        // A connection arrived, or it was protected in between.
        Err(
            e @ (DeleteError::InUse { .. } | DeleteError::Busy(_) | DeleteError::Guarded { .. }),
        ) => Outcome::Kept {
            id,
            why: e.to_string(),
        },
        Err(e) => {
            warn!(branch = %id, error = %e, "idle branch could not be expired");
            Outcome::Kept {
                id,
                why: e.to_string(),
            }
        }
    }
}

fn trunc(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

/// Calls [`reap_once`] every `interval` until `shutdown`, and measures branch sizes
/// every `size_interval` in a task of its own (a slow measurement never delays an
/// expiry); saves activity once more on the way out.
pub async fn run(
    registry: Arc<Registry>,
    interval: Duration,
    size_interval: Duration,
    shutdown: CancellationToken,
) {
    let sizes = tokio::spawn(measure(registry.clone(), size_interval, shutdown.clone()));
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {
                reap_once(&registry, registry.clock().now()).await;
            }
        }
    }
    let _ = sizes.await;
    registry.flush_activity();
}

/// Calls [`Registry::refresh_sizes`] every `interval` until `shutdown`.
async fn measure(registry: Arc<Registry>, interval: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => registry.refresh_sizes().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::branch::registry::fake::{id, registry, FakeEngine};
    use crate::branch::Phase;
    use crate::config::{EngineConfig, InstanceConfig, SourceConfig};
    use crate::names::BranchName;

    const WAIT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn expires_only_idle_unused_non_persistent_branches() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(FakeEngine::default());
        let config = SourceConfig {
            idle_expire: Some(Duration::from_secs(60)),
            persistent: vec![BranchName::new("qa").unwrap()],
            ..Default::default()
        };
        let reg = registry(engine.clone(), config, dir.path());
        let clock = reg.clock().clone();
        for b in ["idle", "busy", "qa"] {
            drop(reg.acquire(&id(b), WAIT).await.unwrap());
        }
        let _open = reg.acquire(&id("busy"), WAIT).await.unwrap();

        // Nothing is idle long enough yet.
        clock.advance(Duration::from_secs(59));
        assert!(reap_once(&reg, clock.now()).await.is_empty());

        clock.advance(Duration::from_secs(2));
        let out = reap_once(&reg, clock.now()).await;
        assert_eq!(out.len(), 1, "{out:?}");
        match &out[0] {
            Outcome::Expired {
                id: gone,
                reason,
                idle,
            } => {
                assert_eq!(gone, &id("idle"));
                assert_eq!(*reason, RemoveReason::Idle);
                assert_eq!(*idle, Duration::from_secs(61));
            }
            other => panic!("unexpected {other:?}"),
        }
        let left: Vec<String> = reg.list().into_iter().map(|b| b.branch).collect();
        assert_eq!(left, vec!["busy".to_string(), "qa".to_string()]);
        assert_eq!(engine.clones.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn suspends_when_idle_then_expires_later() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(FakeEngine {
            servers: true,
            ..Default::default()
        });
        let config = SourceConfig {
            engine: EngineConfig::Instance(InstanceConfig {
                suspend_after: Some(Duration::from_secs(60)),
                ..Default::default()
            }),
            idle_expire: Some(Duration::from_secs(600)),
            ..Default::default()
        };
        let reg = registry(engine.clone(), config, dir.path());
        let clock = reg.clock().clone();
        drop(reg.acquire(&id("a"), WAIT).await.unwrap());

        clock.advance(Duration::from_secs(60));
        let out = reap_once(&reg, clock.now()).await;
        assert!(
            matches!(&out[..], [Outcome::Suspended { id: s, idle }] if s == &id("a") && *idle == Duration::from_secs(60)),
            "{out:?}"
        );
        assert_eq!(reg.view(&id("a")).unwrap().state, Phase::Suspended);
        assert!(engine.running.lock().unwrap().is_empty());
        // Suspended, it is not suspended again.
        assert!(reap_once(&reg, clock.now()).await.is_empty());

        clock.advance(Duration::from_secs(540));
        let out = reap_once(&reg, clock.now()).await;
        assert!(
            matches!(&out[..], [Outcome::Expired { id: e, .. }] if e == &id("a")),
            "{out:?}"
        );
        assert!(reg.list().is_empty());
        assert!(engine.clones.lock().unwrap().is_empty());
    }
}
