//! Which branches use a snapshot, and deleting one only when none does.
//!
//! The check and the deletion are one step as far as creations are concerned: the
//! deletion is entered in the book under the lock that starts creations, and
//! creations that could pick the snapshot (those that name it, and those that take
//! the newest) wait until it has ended. A creation already in flight that will pick
//! the newest is waited for first, since it may be picking this one.

use std::sync::Arc;

use tokio::sync::watch;

use super::state::{Ended, State};
use super::{Book, CreateOptions, Registry};
use crate::audit::{Action, Actor, Event};
use crate::branch::engine::{snapshot_in_use, snapshot_missing, SnapshotInfo};
use crate::error::EngineError;
use crate::names::{BranchId, SourceName};

/// Branches of `source` made (or being made) from snapshot `name`.
fn users_of(book: &Book, source: &SourceName, name: &str) -> Vec<String> {
    book.branches
        .iter()
        .filter(|(id, b)| &id.source == source && b.record.snapshot.as_deref() == Some(name))
        .map(|(id, _)| id.branch.to_string())
        .collect()
}

/// What a snapshot deletion has to let finish before it may start.
enum Pending {
    /// A creation that will take the newest snapshot, which may be this one.
    Creation(BranchId, watch::Receiver<super::state::Outcome>),
    /// Another deletion of the same snapshot.
    Deletion(Ended),
}

fn pending(book: &Book, source: &SourceName, name: &str) -> Option<Pending> {
    let key = (source.clone(), name.to_owned());
    if let Some(done) = book.snapshot_deletions.get(&key) {
        return Some(Pending::Deletion(done.clone()));
    }
    book.branches.iter().find_map(|(id, b)| match b.state() {
        State::Provisioning { done } | State::Resetting { done }
            if &id.source == source && b.record.snapshot.is_none() =>
        {
            Some(Pending::Creation(id.clone(), done.clone()))
        }
        _ => None,
    })
}

/// A snapshot deletion in the book; leaving it (however the deletion ends) lets the
/// creations it held off go on.
struct Hold {
    registry: Arc<Registry>,
    key: (SourceName, String),
    ended: watch::Sender<bool>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.registry.lock().snapshot_deletions.remove(&self.key);
        let _ = self.ended.send(true);
    }
}

impl Registry {
    /// Branches of `source` made (or being made) from snapshot `name`.
    pub fn snapshot_users(&self, source: &SourceName, name: &str) -> Vec<String> {
        users_of(&self.lock(), source, name)
    }

    /// The deletion a new creation of `id` must wait for: one of a snapshot it
    /// names, or of any snapshot of its source when it takes the newest.
    pub(super) fn snapshot_hold(
        &self,
        book: &Book,
        id: &BranchId,
        opts: &CreateOptions,
    ) -> Option<Ended> {
        book.snapshot_deletions
            .iter()
            .find(|((source, name), _)| {
                source == &id.source && opts.snapshot.as_ref().is_none_or(|want| want == name)
            })
            .map(|(_, done)| done.clone())
    }

    /// Takes a snapshot of `source` through its engine, on behalf of `actor`.
    pub async fn take_snapshot(
        &self,
        source: &SourceName,
        actor: Actor,
    ) -> Result<SnapshotInfo, EngineError> {
        let Some(src) = self.sources.get(source) else {
            return Err(EngineError::NotFound(format!(
                "source {source} is not configured"
            )));
        };
        let started = self.clock.instant();
        let result = src.engine.take_snapshot().await;
        let event = Event::new(Action::SnapshotTaken, actor)
            .source(source.as_str())
            .duration(self.clock.instant() - started);
        self.audit.record(match &result {
            Ok(info) => event.snapshot(Some(&info.name)),
            Err(e) => event.failed(e.client_message()),
        });
        result
    }

    /// Deletes snapshot `name` of `source` through its engine, unless a branch was
    /// made (or is being made) from it; the audit trail names an API caller.
    pub async fn delete_snapshot(
        self: &Arc<Self>,
        source: &SourceName,
        name: &str,
    ) -> Result<(), EngineError> {
        self.delete_snapshot_by(source, name, Actor::api(None, None))
            .await
    }

    /// [`Registry::delete_snapshot`] on behalf of `actor`.
    pub async fn delete_snapshot_by(
        self: &Arc<Self>,
        source: &SourceName,
        name: &str,
        actor: Actor,
    ) -> Result<(), EngineError> {
        let Some(src) = self.sources.get(source) else {
            return Err(snapshot_missing(source.as_str(), name));
        };
        let engine = src.engine.clone();
        let hold = loop {
            let wait = {
                let mut book = self.lock();
                let users = users_of(&book, source, name);
                if !users.is_empty() {
                    return Err(snapshot_in_use(name, &users));
                }
                match pending(&book, source, name) {
                    Some(wait) => wait,
                    None => {
                        let key = (source.clone(), name.to_owned());
                        let (ended, rx) = watch::channel(false);
                        book.snapshot_deletions.insert(key.clone(), rx);
                        break Hold {
                            registry: self.clone(),
                            key,
                            ended,
                        };
                    }
                }
            };
            match wait {
                Pending::Creation(id, mut done) => {
                    if done.wait_for(Option::is_some).await.is_err() {
                        // Its task died: forget it, as a waiting connection would.
                        let _ = self.interrupted(&id, "creation");
                    }
                }
                Pending::Deletion(mut ended) => {
                    let _ = ended.wait_for(|e| *e).await;
                }
            }
        };
        let (name, source) = (name.to_owned(), source.clone());
        let this = self.clone();
        // A task of its own: a request dropped halfway does not cut a deletion short.
        self.runtime
            .spawn(async move {
                let started = this.clock.instant();
                let result = engine.delete_snapshot(&name).await;
                drop(hold);
                let event = Event::new(Action::SnapshotDeleted, actor)
                    .source(source.as_str())
                    .snapshot(Some(&name))
                    .duration(this.clock.instant() - started);
                this.audit.record(match &result {
                    Ok(()) => event,
                    Err(e) => event.failed(e.client_message()),
                });
                result
            })
            .await
            .unwrap_or_else(|e| {
                Err(EngineError::failed_with(
                    "the snapshot deletion was interrupted",
                    e,
                ))
            })
    }
}
