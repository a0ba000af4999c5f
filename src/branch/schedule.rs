//! Scheduled snapshots and `on_snapshot` refresh: one step ([`Schedule::step`]) and
//! a loop around it ([`run`]).
//!
//! A source with `snapshot_every` (aligned to `snapshot_at`, a UTC time of day, when
//! set) has a snapshot taken at each due moment. After it:
//! - the oldest snapshots beyond `keep_snapshots` that no branch uses are deleted
//!   (through the registry, which refuses one in use); one in use is left for a
//!   later step, once its branches have moved on;
//! - every branch whose policy says `refresh = "on_snapshot"` and whose clone is
//!   older than the new snapshot is reset to it at the first step that finds it
//!   with no session. A busy branch keeps its data and is tried again at the next
//!   step; nothing ends its sessions.
//!
//! Only snapshots the schedule took trigger refreshes, and only branches made
//! before them are reset: a branch made later, from any snapshot, is left alone.
//! After a restart the schedule starts afresh (the next due moment), and branches
//! are refreshed at the next scheduled snapshot.
//!
//! The step takes the time as an argument, so tests drive it on a manual clock; the
//! loop reads it from the registry's clock.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::registry::{Registry, ResetError};
use crate::audit::Actor;
use crate::clock::unix_ms;
use crate::names::{BranchId, SourceName};

/// How often the loop looks: due snapshots are taken, and busy branches waiting for
/// a refresh are tried again, within this of the moment.
const TICK: Duration = Duration::from_secs(1);

/// What one step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A scheduled snapshot was taken and sealed.
    Taken {
        source: SourceName,
        snapshot: String,
    },
    /// A scheduled snapshot failed; the next is due one period later.
    Failed { source: SourceName, error: String },
    /// A snapshot beyond `keep_snapshots`, used by no branch, was deleted.
    Pruned {
        source: SourceName,
        snapshot: String,
    },
    /// A branch was reset to the newest scheduled snapshot.
    Refreshed { id: BranchId, snapshot: String },
    /// A branch due for a refresh has sessions open (or something in flight); it is
    /// tried again at the next step.
    Waiting { id: BranchId, why: String },
    /// A refresh failed (see the log); it is tried again at the next step unless the
    /// branch is gone.
    RefreshFailed { id: BranchId, error: String },
}

/// The newest snapshot a source's schedule took, which older branches refresh to.
#[derive(Debug, Clone)]
struct Fresh {
    name: String,
    taken_ms: u64,
}

/// The schedule's own state: when each source's next snapshot is due, and what
/// branches refresh to.
pub struct Schedule {
    due: Mutex<BTreeMap<SourceName, SystemTime>>,
    fresh: Mutex<BTreeMap<SourceName, Fresh>>,
}

/// The first moment at or after `now` of the series `anchor + k * every` (any
/// integer `k`).
fn first_due(anchor: SystemTime, every: Duration, now: SystemTime) -> SystemTime {
    let every_ms = every.as_millis().max(1) as u64;
    let (anchor_ms, now_ms) = (unix_ms(anchor), unix_ms(now));
    let due_ms = if anchor_ms >= now_ms {
        anchor_ms - (anchor_ms - now_ms) / every_ms * every_ms
    } else {
        anchor_ms + (now_ms - anchor_ms).div_ceil(every_ms) * every_ms
    };
    SystemTime::UNIX_EPOCH + Duration::from_millis(due_ms)
}

impl Schedule {
    /// The schedule of every source with `snapshot_every`, starting at `now`: the
    /// first snapshot is due at the first `snapshot_at` moment of the series (one
    /// period from now without it).
    pub fn new(registry: &Registry, now: SystemTime) -> Self {
        let due = registry
            .sources()
            .filter_map(|s| {
                let every = s.config.snapshot_every?;
                let at = match s.config.snapshot_at {
                    Some(t) => first_due(t.next_at_or_after(now), every, now),
                    None => now + every,
                };
                info!(source = %s.name, every = %humantime::format_duration(every),
                      first = %humantime::format_rfc3339_seconds(at), "snapshot schedule");
                Some((s.name.clone(), at))
            })
            .collect();
        Self {
            due: Mutex::new(due),
            fresh: Mutex::new(BTreeMap::new()),
        }
    }

    /// When `source`'s next scheduled snapshot is due.
    pub fn next_due(&self, source: &SourceName) -> Option<SystemTime> {
        lock(&self.due).get(source).copied()
    }

    /// Takes the snapshots due at `now` (pruning after each), then resets the
    /// `on_snapshot` branches that are older than their source's newest scheduled
    /// snapshot and have no session.
    pub async fn step(&self, registry: &Arc<Registry>, now: SystemTime) -> Vec<Outcome> {
        let mut out = Vec::new();
        let due: Vec<SourceName> = lock(&self.due)
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(s, _)| s.clone())
            .collect();
        for source in due {
            self.take(registry, &source, now, &mut out).await;
        }
        let fresh: Vec<(SourceName, Fresh)> = lock(&self.fresh)
            .iter()
            .map(|(s, f)| (s.clone(), f.clone()))
            .collect();
        for (source, fresh) in fresh {
            let mut refreshed = false;
            for id in registry.refresh_due(&source, fresh.taken_ms) {
                let o = refresh(registry, id, &fresh.name).await;
                refreshed |= matches!(o, Outcome::Refreshed { .. });
                out.push(o);
            }
            // A refresh may have freed an old snapshot.
            if refreshed {
                prune(registry, &source, &mut out).await;
            }
        }
        out
    }

    async fn take(
        &self,
        registry: &Arc<Registry>,
        source: &SourceName,
        now: SystemTime,
        out: &mut Vec<Outcome>,
    ) {
        let Some(src) = registry.source(source.as_str()) else {
            return;
        };
        let Some(every) = src.config.snapshot_every else {
            return;
        };
        // The next one is due a period later whatever happens to this one; moments
        // missed while the proxy was busy or stopped are skipped, not caught up.
        if let Some(at) = lock(&self.due).get_mut(source) {
            while *at <= now {
                *at += every;
            }
        }
        info!(source = %source, "taking a scheduled snapshot");
        let counter = |outcome: &str| {
            registry
                .metrics()
                .scheduled_snapshots_total
                .with_label_values(&[source.as_str(), outcome])
                .inc()
        };
        match registry.take_snapshot(source, Actor::scheduler()).await {
            Ok(info) => {
                counter("ok");
                info!(source = %source, snapshot = %info.name, "scheduled snapshot taken");
                lock(&self.fresh).insert(
                    source.clone(),
                    Fresh {
                        name: info.name.clone(),
                        taken_ms: registry.clock().unix_ms(),
                    },
                );
                out.push(Outcome::Taken {
                    source: source.clone(),
                    snapshot: info.name,
                });
                prune(registry, source, out).await;
            }
            Err(e) => {
                counter("failed");
                warn!(source = %source, error = %e, "scheduled snapshot failed");
                out.push(Outcome::Failed {
                    source: source.clone(),
                    error: e.client_message(),
                });
            }
        }
    }
}

/// Resets `id` to `snapshot`, unless it is in use.
async fn refresh(registry: &Arc<Registry>, id: BranchId, snapshot: &str) -> Outcome {
    match registry
        .reset(&id, Some(snapshot.to_owned()), false, Actor::scheduler())
        .await
    {
        Ok(()) => {
            info!(branch = %id, snapshot, "branch refreshed to the new snapshot");
            Outcome::Refreshed {
                id,
                snapshot: snapshot.to_owned(),
            }
        }
        Err(e @ (ResetError::InUse { .. } | ResetError::Busy(_))) => Outcome::Waiting {
            id,
            why: e.to_string(),
        },
        Err(e) => {
            warn!(branch = %id, error = %e, "refresh failed");
            Outcome::RefreshFailed {
                id,
                error: e.to_string(),
            }
        }
    }
}

/// Deletes the oldest snapshots of `source` beyond its `keep_snapshots` that no
/// branch uses.
async fn prune(registry: &Arc<Registry>, source: &SourceName, out: &mut Vec<Outcome>) {
    let Some(src) = registry.source(source.as_str()) else {
        return;
    };
    let Some(keep) = src.config.keep_snapshots else {
        return;
    };
    let all = match src.engine.snapshots().await {
        Ok(all) => all,
        Err(e) => return warn!(source = %source, error = %e, "cannot list snapshots to prune"),
    };
    let surplus = all.len().saturating_sub(keep);
    for snap in all.into_iter().take(surplus) {
        if !registry.snapshot_users(source, &snap.name).is_empty() {
            continue;
        }
        match registry
            .delete_snapshot_by(source, &snap.name, Actor::scheduler())
            .await
        {
            Ok(()) => {
                info!(source = %source, snapshot = %snap.name, keep, "old snapshot deleted");
                out.push(Outcome::Pruned {
                    source: source.clone(),
                    snapshot: snap.name,
                });
            }
            // Taken into use meanwhile, or already gone: the next prune looks again.
            Err(e) => {
                info!(source = %source, snapshot = %snap.name, error = %e, "old snapshot kept")
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain maps, whole after any panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Calls [`Schedule::step`] every second until `shutdown`. Returns at once when no
/// source has a schedule.
pub async fn run(registry: Arc<Registry>, shutdown: CancellationToken) {
    let schedule = Schedule::new(&registry, registry.clock().now());
    if lock(&schedule.due).is_empty() {
        return;
    }
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {
                schedule.step(&registry, registry.clock().now()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests;
