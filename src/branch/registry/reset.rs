//! Reset: a branch made again under the same name and address, from the newest
//! snapshot of its source (or the one named, or the live source where the source
//! has no snapshots).
//!
//! A reset is a transition of the branch's state, with waiters like a creation:
//! Ready or Suspended → Resetting (the old clone is removed) → Provisioning (the new
//! one is made) → Starting (engines with a server per clone) → Ready. A connection
//! arriving at any point waits on the same outcome (57P03 past `provision_timeout`),
//! so it is never given the old clone halfway through its removal, nor a half-made
//! new one.
//!
//! Open sessions refuse a reset unless it is forced; a forced reset tells them to
//! end (the proxy sends each client 57P01 naming the reset), waits a moment for them
//! to leave, and removes the old clone with force, which ends any session left.
//!
//! When it fails:
//! - the old clone could not be removed: it stays and serves as before, and the
//!   reset reports the engine's error ([`ResetError::Kept`]);
//! - the new clone could not be made: the branch is gone, its record removed, as
//!   after a failed creation ([`ResetError::Failed`]); the next connection makes it
//!   afresh. Either way no half-made clone is ever served.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{error, info, warn};

use super::state::{Outcome, Refusal};
use super::{CreateOptions, Registry};
use crate::audit::{Action, Actor, Event};
use crate::branch::engine::snapshot_missing;
use crate::branch::store::{BranchRecord, RecordState};
use crate::config::Refresh;
use crate::error::{EngineError, ProvisionError};
use crate::names::{BranchId, SourceName};

/// How long a forced reset waits for the sessions it ended to leave before it
/// removes the old clone anyway (the removal ends whatever is left).
const SESSIONS_LEAVE: Duration = Duration::from_secs(5);

/// The snapshot branch `id` is made from, as the book says now.
fn snapshot_now(book: &super::Book, id: &BranchId) -> Option<String> {
    book.branches
        .get(id)
        .and_then(|b| b.record.snapshot.clone())
}

/// Why a reset did not happen, or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    #[error("branch {0} does not exist")]
    NotFound(BranchId),
    #[error("branch {id} has {conns} open connection(s); a forced reset terminates them")]
    InUse { id: BranchId, conns: usize },
    #[error("branch {0} is being created, started, suspended, reset or deleted; try again")]
    Busy(BranchId),
    /// The snapshot asked for cannot be used (it does not exist, or the source has
    /// no snapshots). Nothing was changed.
    #[error("{0}")]
    Snapshot(EngineError),
    /// The old clone could not be removed; it stays and serves as before.
    #[error(
        "could not reset branch {id}: its clone could not be removed, so it stays as it was: {err}"
    )]
    Kept { id: BranchId, err: EngineError },
    /// The new clone could not be made; the branch was removed.
    #[error("branch {id} was removed: its new clone could not be made: {err}")]
    Failed {
        id: BranchId,
        err: Box<ProvisionError>,
    },
}

impl Registry {
    /// Makes branch `id` again from `snapshot` (`None`: the newest, or the live
    /// source where there are none), under the same name and address. Open sessions
    /// refuse it unless `force`, which ends them. Returns once the new clone serves.
    pub async fn reset(
        self: &Arc<Self>,
        id: &BranchId,
        snapshot: Option<String>,
        force: bool,
        actor: Actor,
    ) -> Result<(), ResetError> {
        let source = self
            .sources
            .get(&id.source)
            .ok_or_else(|| ResetError::NotFound(id.clone()))?;
        if !self.lock().branches.contains_key(id) {
            return Err(ResetError::NotFound(id.clone()));
        }
        // A snapshot that cannot be used is refused before anything is touched.
        if let Some(want) = &snapshot {
            let all = source
                .engine
                .snapshots()
                .await
                .map_err(ResetError::Snapshot)?;
            if !all.iter().any(|s| &s.name == want) {
                return Err(ResetError::Snapshot(snapshot_missing(
                    id.source.as_str(),
                    want,
                )));
            }
        }
        let opts = CreateOptions {
            persistent: false,
            snapshot: snapshot.clone(),
            actor: actor.clone(),
            ..CreateOptions::default()
        };
        let (old, tx) = loop {
            let held = {
                let mut book = self.lock();
                if self.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
                    return Err(ResetError::Failed {
                        id: id.clone(),
                        err: Box::new(ProvisionError::ShuttingDown),
                    });
                }
                // A deletion of the snapshot this reset could pick goes first.
                match self.snapshot_hold(&book, id, &opts) {
                    Some(held) => held,
                    None => {
                        let branch = book
                            .branches
                            .get_mut(id)
                            .ok_or_else(|| ResetError::NotFound(id.clone()))?;
                        let tx = branch.reset(force).map_err(|r| match r {
                            Refusal::Busy => ResetError::Busy(id.clone()),
                            Refusal::InUse(conns) => ResetError::InUse {
                                id: id.clone(),
                                conns,
                            },
                        })?;
                        let old = branch.record.clone();
                        // What the new clone will be made from: a named snapshot is
                        // in use from now on, so it cannot be deleted meanwhile.
                        branch.record.snapshot = snapshot.clone();
                        break (old, tx);
                    }
                }
            };
            let mut held = held;
            let _ = held.wait_for(|ended| *ended).await;
        };
        let this = self.clone();
        let task = self
            .runtime
            .spawn(async move { this.remake(old, snapshot, tx, actor).await });
        task.await.unwrap_or_else(|e| {
            Err(ResetError::Failed {
                id: id.clone(),
                err: Box::new(ProvisionError::Engine {
                    id: id.clone(),
                    err: EngineError::failed_with("the reset was interrupted", e),
                }),
            })
        })
    }

    /// The work of a reset, as a task of its own (a dropped request does not cut it
    /// short): removes the old clone, then makes the new one as a creation does, and
    /// publishes the outcome to the connections waiting on the branch.
    async fn remake(
        self: Arc<Self>,
        old: BranchRecord,
        snapshot: Option<String>,
        tx: watch::Sender<Outcome>,
        actor: Actor,
    ) -> Result<(), ResetError> {
        let id = old.id();
        let source = &self.sources[&id.source];
        let started = self.clock.instant();
        let event = |snapshot: Option<&str>| {
            Event::new(Action::BranchReset, actor.clone())
                .branch(&id)
                .snapshot(snapshot)
                .duration(self.clock.instant() - started)
        };
        let count = |outcome: &str| {
            self.metrics
                .resets_total
                .with_label_values(&[id.source.as_str(), outcome])
                .inc()
        };
        info!(branch = %id, snapshot = snapshot.as_deref().unwrap_or("newest"), "resetting branch");
        self.sessions_left(&id).await;
        // Server sessions kept for reuse belong to the old clone.
        self.drain_parked(&id);
        if let Err(err) = source.engine.destroy(&old, true).await {
            warn!(branch = %id, error = %err, "reset failed: the old clone could not be removed; it stays");
            if let Some(b) = self.lock().branches.get_mut(&id) {
                b.record = old;
                b.reset_failed(source.engine.servers().is_some());
            }
            count("failed");
            self.audit.record(
                event(snapshot_now(&self.lock(), &id).as_deref()).failed(format!(
                    "the old clone could not be removed: {}",
                    err.client_message()
                )),
            );
            // Waiting connections look again, and find the old clone.
            let _ = tx.send(Some(Ok(())));
            return Err(ResetError::Kept { id, err });
        }
        let now = self.clock.unix_ms();
        let mut record = BranchRecord {
            state: RecordState::Provisioning,
            last_active: now,
            snapshot,
            copy_mode: None,
            ..old
        };
        record.reborn(now);
        if let Some(b) = self.lock().branches.get_mut(&id) {
            b.remake(record.clone());
        }
        let done = tx.subscribe();
        // From here on it is a creation: the record is saved before the clone is
        // made, and a failure removes both.
        self.clone()
            .provision(record, tx, actor.clone(), true)
            .await;
        let outcome = done.borrow().clone();
        match outcome {
            Some(Ok(())) => {
                count("ok");
                info!(branch = %id, "branch reset");
                self.audit
                    .record(event(snapshot_now(&self.lock(), &id).as_deref()));
                Ok(())
            }
            Some(Err(err)) => {
                count("failed");
                error!(branch = %id, error = %err, "reset failed: the branch was removed");
                self.audit.record(event(None).failed(format!(
                    "the branch was removed: its new clone could not be made: {}",
                    err.client_message()
                )));
                Err(ResetError::Failed {
                    id,
                    err: Box::new(err),
                })
            }
            None => {
                count("failed");
                Err(ResetError::Failed {
                    id: id.clone(),
                    err: Box::new(self.interrupted(&id, "reset")),
                })
            }
        }
    }

    /// Branches of `source` whose policy says `refresh = "on_snapshot"` and whose
    /// clone was made (or last reset) before `since_ms`: due for a refresh to a
    /// snapshot taken then.
    pub fn refresh_due(&self, source: &SourceName, since_ms: u64) -> Vec<BranchId> {
        let Some(src) = self.sources.get(source) else {
            return Vec::new();
        };
        self.lock()
            .branches
            .iter()
            .filter(|(id, b)| {
                &id.source == source
                    && b.record.born_at() < since_ms
                    && src.config.policy(&id.branch).refresh == Refresh::OnSnapshot
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Waits (a bounded time) for the sessions a forced reset ended to leave.
    async fn sessions_left(&self, id: &BranchId) {
        let activity = match self.lock().branches.get(id) {
            Some(b) => b.activity.clone(),
            None => return,
        };
        let deadline = tokio::time::Instant::now() + SESSIONS_LEAVE;
        while activity.connections() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
