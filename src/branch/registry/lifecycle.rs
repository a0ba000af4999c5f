//! The work behind the transitions: making a clone and starting its server,
//! stopping it, removing it. Each runs as a task on the control-plane runtime and
//! announces its end to the connections waiting in the branch's state, so a request
//! dropped halfway (a client that hangs up) never leaves a branch stuck in flight.

use std::sync::Arc;

use tokio::sync::watch;
use tracing::{error, info, warn};

use super::state::{Outcome, Refusal};
use super::{trail, DeleteError, Registry, RemoveReason};
use crate::audit::{Action, Actor, Event};
use crate::branch::store::{BranchRecord, RecordState};
use crate::error::{EngineError, ProvisionError};
use crate::names::BranchId;

impl Registry {
    /// Runs one creation (and the first start of the clone's server) to its end and
    /// publishes the outcome. `resetting`: the new clone of a reset, audited and
    /// counted as the reset (by `reset`), not as a creation.
    pub(super) async fn provision(
        self: Arc<Self>,
        mut record: BranchRecord,
        tx: watch::Sender<Outcome>,
        actor: Actor,
        resetting: bool,
    ) {
        let id = record.id();
        let source = &self.sources[&id.source];
        let started = self.clock.instant();
        info!(branch = %id, clone = %record.clone_name, "creating branch");
        let result = match self.store.save(&record) {
            Err(e) => Err(EngineError::io("cannot write the branch record", e)),
            Ok(()) => source.engine.create(&record).await,
        };
        let mut made = false;
        let mut from_spare = false;
        let result = result.map(|m| {
            made = true;
            from_spare = m.spare;
            if let Some(mode) = &m.copy_mode {
                self.metrics
                    .clones_total
                    .with_label_values(&[id.source.as_str(), mode.as_str()])
                    .inc();
            }
            record.snapshot = m.snapshot;
            record.copy_mode = m.copy_mode;
            record.state = RecordState::Ready;
        });
        // The clone exists: start its server (engines without one are done).
        let result = match (result, source.engine.servers()) {
            (Ok(()), Some(servers)) => {
                if let Some(b) = self.lock().branches.get_mut(&id) {
                    b.made(record.clone());
                }
                servers.start(&record).await
            }
            (other, _) => other,
        };
        let (outcome, ready_write) = match result {
            Ok(()) => {
                let secs = (self.clock.instant() - started).as_secs_f64();
                self.metrics
                    .provision_seconds
                    .with_label_values(&[id.source.as_str()])
                    .observe(secs);
                if !resetting {
                    self.metrics
                        .branches_created_total
                        .with_label_values(&[id.source.as_str()])
                        .inc();
                }
                info!(branch = %id, ms = (secs * 1000.0) as u64, "branch ready");
                // A reset's new clone is audited as the reset, by `reset`.
                if !resetting {
                    self.audit.record(
                        Event::new(Action::BranchCreated, actor)
                            .branch(&id)
                            .snapshot(record.snapshot.as_deref())
                            .duration(self.clock.instant() - started)
                            .from_spare(from_spare),
                    );
                }
                // The Ready record is written after the waiting connections are let
                // go, off their path: until it is on disk the record says
                // Provisioning and the clone is complete (its making was made
                // durable by the engine), which a restart settles as Ready (see
                // `adopt`). The write lock is taken before the registry lock is
                // released, so no later write of this record overtakes it.
                let writer = {
                    let mut book = self.lock();
                    if let Some(b) = book.branches.get_mut(&id) {
                        b.record = record.clone();
                        b.started();
                    }
                    self.store.writer()
                };
                (Ok(()), Some(writer))
            }
            Err(err) => {
                error!(branch = %id, error = %err, "branch creation failed");
                // If the clone was made but its server did not start, take the clone
                // down again: nothing half-made stays behind.
                if made {
                    if let Err(e) = source.engine.destroy(&record, true).await {
                        error!(branch = %id, error = %e, "could not remove clone after failure");
                    }
                }
                if let Err(e) = self.store.remove(&id) {
                    error!(branch = %id, error = %e, "could not remove branch record");
                }
                self.lock().branches.remove(&id);
                if !resetting {
                    self.audit.record(
                        Event::new(Action::BranchCreateFailed, actor)
                            .branch(&id)
                            .snapshot(record.snapshot.as_deref())
                            .duration(self.clock.instant() - started)
                            .failed(err.client_message()),
                    );
                }
                let failed = Err(ProvisionError::Engine {
                    id: id.clone(),
                    err,
                });
                (failed, None)
            }
        };
        let _ = tx.send(Some(outcome));
        if let Some(writer) = ready_write {
            if let Err(e) = writer.save(&record) {
                // The branch serves; a restart finds its record Provisioning and its
                // clone complete, and settles it as Ready.
                error!(branch = %id, error = %e, "cannot mark the branch record ready");
            }
        }
    }

    /// Starts the server of a suspended branch and publishes the outcome.
    pub(super) async fn resume(
        self: Arc<Self>,
        record: BranchRecord,
        tx: watch::Sender<Outcome>,
        actor: Actor,
    ) {
        let id = record.id();
        let source = &self.sources[&id.source];
        let started = self.clock.instant();
        let result = match source.engine.servers() {
            Some(servers) => servers.start(&record).await,
            None => Ok(()),
        };
        let event = Event::new(Action::BranchResumed, actor)
            .branch(&id)
            .duration(self.clock.instant() - started);
        self.audit.record(match &result {
            Ok(()) => event,
            Err(err) => event.failed(err.client_message()),
        });
        let outcome = match result {
            Ok(()) => {
                let secs = (self.clock.instant() - started).as_secs_f64();
                self.metrics
                    .start_seconds
                    .with_label_values(&[id.source.as_str()])
                    .observe(secs);
                info!(branch = %id, ms = (secs * 1000.0) as u64, "branch resumed");
                Ok(())
            }
            Err(err) => {
                error!(branch = %id, error = %err, "branch server did not start; it stays suspended");
                Err(ProvisionError::Start {
                    id: id.clone(),
                    err,
                })
            }
        };
        if let Some(b) = self.lock().branches.get_mut(&id) {
            b.resumed(outcome.is_ok());
        }
        let _ = tx.send(Some(outcome));
    }

    /// Stops the server of a Ready branch nobody is connected to; its data stays and
    /// the next connection starts it again. Returns false (and does nothing) when the
    /// branch is not in that state or its engine has no server to stop. The reaper's
    /// suspension; [`Registry::suspend_by`] names another actor.
    pub async fn suspend(self: &Arc<Self>, id: &BranchId) -> Result<bool, EngineError> {
        self.suspend_by(id, Actor::reaper()).await
    }

    /// [`Registry::suspend`] on behalf of `actor`.
    pub async fn suspend_by(
        self: &Arc<Self>,
        id: &BranchId,
        actor: Actor,
    ) -> Result<bool, EngineError> {
        let Some(source) = self.sources.get(&id.source) else {
            return Ok(false);
        };
        if source.engine.servers().is_none() {
            return Ok(false);
        }
        let (record, tx) = {
            let mut book = self.lock();
            let Some(branch) = book.branches.get_mut(id) else {
                return Ok(false);
            };
            let Some(tx) = branch.suspend() else {
                return Ok(false);
            };
            (branch.record.clone(), tx)
        };
        self.drain_parked(id);
        let this = self.clone();
        self.runtime
            .spawn(async move { this.stop(record, tx, actor).await })
            .await
            .unwrap_or_else(|e| {
                Err(EngineError::failed_with(
                    "the suspension was interrupted",
                    e,
                ))
            })
            .map(|()| true)
    }

    async fn stop(
        self: Arc<Self>,
        record: BranchRecord,
        tx: watch::Sender<bool>,
        actor: Actor,
    ) -> Result<(), EngineError> {
        let id = record.id();
        let started = self.clock.instant();
        let result = match self.sources[&id.source].engine.servers() {
            Some(servers) => servers.stop(&record).await,
            None => Ok(()),
        };
        let mut event = Event::new(Action::BranchSuspended, actor.clone())
            .branch(&id)
            .duration(self.clock.instant() - started);
        if let Some(reason) = self.suspension_reason(&id, &actor) {
            event = event.reason(reason);
        }
        self.audit.record(match &result {
            Ok(()) => event,
            Err(err) => event.failed(err.client_message()),
        });
        match &result {
            Ok(()) => {
                self.metrics
                    .suspensions_total
                    .with_label_values(&[id.source.as_str()])
                    .inc();
                info!(branch = %id, "branch suspended");
            }
            // The server may still run: keep serving it.
            Err(err) => {
                warn!(branch = %id, error = %err, "could not stop the branch's server; it stays ready")
            }
        }
        if let Some(b) = self.lock().branches.get_mut(&id) {
            b.stopped(result.is_ok());
        }
        let _ = tx.send(true);
        result
    }

    /// A connection could not reach the server of Ready branch `id`. If the server
    /// is gone (killed, or crashed; the engine clears what it left), the branch
    /// becomes Suspended, so the next connection starts it again instead of failing
    /// until the branch is next suspended. Returns whether that happened.
    pub async fn server_lost(self: &Arc<Self>, id: &BranchId) -> bool {
        let Some(servers) = self
            .sources
            .get(&id.source)
            .and_then(|s| s.engine.servers())
        else {
            return false;
        };
        let record = match self.lock().branches.get(id) {
            Some(b) if b.phase() == super::Phase::Ready => b.record.clone(),
            _ => return false,
        };
        match servers.running(&record).await {
            Ok(false) => {}
            Ok(true) => return false,
            Err(e) => {
                warn!(branch = %id, error = %e, "cannot tell whether the branch's server runs");
                return false;
            }
        }
        let lost = self.lock().branches.get_mut(id).is_some_and(|b| b.lost());
        if lost {
            self.drain_parked(id);
            warn!(branch = %id, "the branch's server is gone; the next connection starts it again");
            self.audit.record(
                Event::new(Action::BranchSuspended, Actor::proxy())
                    .branch(id)
                    .reason("server gone"),
            );
        }
        lost
    }

    /// Suspends every Ready branch with no connection (on shutdown), a few at once.
    pub async fn suspend_all(self: &Arc<Self>) {
        use futures_util::stream::{self, StreamExt};
        let ids: Vec<BranchId> = {
            let book = self.lock();
            book.branches
                .iter()
                .filter(|(_, b)| b.phase() == super::Phase::Ready)
                .map(|(id, _)| id.clone())
                .collect()
        };
        stream::iter(ids)
            .for_each_concurrent(8, |id| async move {
                if let Err(e) = self.suspend_by(&id, Actor::proxy()).await {
                    warn!(branch = %id, error = %e, "left running");
                }
            })
            .await;
    }

    /// Removes a settled branch. Connections wait for the outcome meanwhile;
    /// afterwards a new connection makes a fresh clone. A protected or persistent
    /// branch is removed only by a forced deletion through the API (the reaper
    /// never removes one). The audit trail names the reaper (idle) or an API
    /// caller; [`Registry::delete_by`] names the caller.
    pub async fn delete(
        self: &Arc<Self>,
        id: &BranchId,
        force: bool,
        reason: RemoveReason,
    ) -> Result<(), DeleteError> {
        self.delete_by(id, force, reason, trail::remover(reason))
            .await
    }

    /// [`Registry::delete`] on behalf of `actor`.
    pub async fn delete_by(
        self: &Arc<Self>,
        id: &BranchId,
        force: bool,
        reason: RemoveReason,
        actor: Actor,
    ) -> Result<(), DeleteError> {
        let (record, tx) = {
            let mut book = self.lock();
            let branch = book
                .branches
                .get_mut(id)
                .ok_or_else(|| DeleteError::NotFound(id.clone()))?;
            if !(force && reason == RemoveReason::Api) {
                if let Some(guard) = self.guard(&branch.record) {
                    return Err(DeleteError::Guarded {
                        id: id.clone(),
                        guard,
                    });
                }
            }
            let tx = branch.expire(force).map_err(|r| match r {
                Refusal::Busy => DeleteError::Busy(id.clone()),
                Refusal::InUse(conns) => DeleteError::InUse {
                    id: id.clone(),
                    conns,
                },
            })?;
            (branch.record.clone(), tx)
        };
        self.drain_parked(id);
        let this = self.clone();
        self.runtime
            .spawn(async move { this.remove(record, force, reason, tx, actor).await })
            .await
            .unwrap_or_else(|e| {
                Err(DeleteError::Engine {
                    id: id.clone(),
                    err: EngineError::failed_with("the deletion was interrupted", e),
                })
            })
    }

    async fn remove(
        self: Arc<Self>,
        record: BranchRecord,
        force: bool,
        reason: RemoveReason,
        tx: watch::Sender<bool>,
        actor: Actor,
    ) -> Result<(), DeleteError> {
        let id = record.id();
        let source = &self.sources[&id.source];
        let started = self.clock.instant();
        let result = source.engine.destroy(&record, force).await;
        // A forced removal does not wait for sessions: one that ended cleanly just
        // before may have been parked after the first drain (its reset answered
        // before the server stopped). Its server is gone now; close it too.
        self.drain_parked(&id);
        let action = match reason {
            RemoveReason::Idle | RemoveReason::Lifetime | RemoveReason::Ttl => {
                Action::BranchExpired
            }
            RemoveReason::Api => Action::BranchDeleted,
        };
        let mut event = Event::new(action, actor)
            .branch(&id)
            .snapshot(record.snapshot.as_deref())
            .duration(self.clock.instant() - started);
        if let Some(why) = self.removal_reason(&id, reason) {
            event = event.reason(why);
        }
        self.audit.record(match &result {
            Ok(()) => event,
            Err(err) => event.failed(err.client_message()),
        });
        let mut book = self.lock();
        let out = match result {
            Ok(()) => {
                if let Err(e) = self.store.remove(&id) {
                    error!(branch = %id, error = %e, "could not remove branch record");
                }
                book.branches.remove(&id);
                self.metrics
                    .branches_expired_total
                    .with_label_values(&[id.source.as_str(), reason.as_str()])
                    .inc();
                info!(branch = %id, reason = reason.as_str(), "branch removed");
                Ok(())
            }
            Err(err) => {
                warn!(branch = %id, error = %err, "branch removal failed; it stays");
                if let Some(b) = book.branches.get_mut(&id) {
                    b.expire_failed(source.engine.servers().is_some());
                }
                Err(DeleteError::Engine { id, err })
            }
        };
        drop(book);
        let _ = tx.send(true);
        out
    }

    /// Writes changed activity stamps to the records, so a restart keeps them.
    pub fn flush_activity(&self) {
        // The write lock is taken before the registry lock is released: a change or
        // removal made after the copies were taken is written after them.
        let (dirty, writer): (Vec<BranchRecord>, _) = {
            let mut book = self.lock();
            let dirty = book
                .branches
                .values_mut()
                .filter(|b| matches!(b.phase(), super::Phase::Ready | super::Phase::Suspended))
                .filter(|b| b.activity.take_dirty())
                .map(|b| {
                    b.record.last_active = b.activity.last_active_ms();
                    b.record.clone()
                })
                .collect();
            (dirty, self.store.writer())
        };
        for rec in dirty {
            if let Err(e) = writer.save(&rec) {
                warn!(branch = %rec.id(), error = %e, "could not save activity");
            }
        }
    }
}
