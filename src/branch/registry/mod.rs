//! The one owner of branch state.
//!
//! Layout:
//! - `state`: the [`Phase`] the API shows, the `State` enum with its waiters, and the
//!   transitions (which keep the `offshoot_branches` gauges right).
//! - this file: the registry itself, and the one wait loop that gets a connection
//!   (or the admin API) a Ready branch.
//! - `lifecycle`: the work behind the transitions: creation, start, suspension,
//!   deletion.
//! - `policy`: who may make a branch and how many (quotas, roles), which branches
//!   are persistent or protected, and which are due for suspension or expiry.
//! - `adopt`: restart adoption, interrupted creations, orphans.
//! - `reset`: making a branch again under its name, from a snapshot.
//! - `size`: branch sizes, measured in the background and cached.
//! - `snapshots`: which branches use a snapshot, and deleting one safely.
//! - `update`: changing a branch's TTL and protection after its creation.
//! - `view`: [`BranchView`], the branch as the API shows it.
//!
//! Invariants:
//! - Only this module changes a branch's state and its record on disk.
//! - A branch has at most one creation (or start) in flight: the first connection
//!   starts it, every later one waits on the same result (single flight).
//! - A branch is deleted or suspended only when settled (Ready, or Suspended for a
//!   deletion) with no open connection (unless a deletion is forced); connections are
//!   counted under the same lock that starts a deletion or a suspension, so a
//!   connection is never granted a branch whose server is being stopped or removed.
//! - The record is written before the clone is created and removed after it is gone,
//!   so a crash at any point leaves something [`Registry::adopt`] can settle.
//! - A snapshot is deleted only when no branch uses it, decided under the same lock
//!   that starts creations; creations that could pick it wait for the deletion.
//! - Time comes from the registry's [`Clock`], never from the system directly.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use prometheus::IntGauge;
use tokio::sync::watch;

mod adopt;
mod lifecycle;
mod policy;
mod reset;
mod size;
mod snapshots;
mod state;
mod trail;
mod update;
mod view;

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod tests;

pub use adopt::Orphan;
pub use policy::{Creator, Due, Guard};
pub use reset::ResetError;
pub use state::{ConnGuard, Lease, Phase};
pub use update::{Changes, UpdateError};
pub use view::BranchView;

use state::{Activity, Branch, Ended, Entry, PhaseGauges, State, Wait};

use super::engine::Engine;
use super::store::{BranchRecord, RecordState, Store};
use crate::audit::{Action, Actor, Audit, Event, Outcome};
use crate::clock::Clock;
use crate::config::SourceConfig;
use crate::error::{EngineError, ProvisionError};
use crate::metrics::Metrics;
use crate::names::{BranchId, BranchName, SourceName};

/// A configured source and its engine.
pub struct Source {
    pub name: SourceName,
    pub config: SourceConfig,
    pub engine: Arc<dyn Engine>,
    persistent: HashSet<BranchName>,
}

impl Source {
    pub fn new(name: SourceName, config: SourceConfig, engine: Arc<dyn Engine>) -> Self {
        let persistent = config.persistent.iter().cloned().collect();
        Self {
            name,
            config,
            engine,
            persistent,
        }
    }
}

/// How a branch should be made, when a request creates it.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Never expires (it may still be suspended).
    pub persistent: bool,
    /// The snapshot to clone; unset: the newest.
    pub snapshot: Option<String>,
    /// Who asks, for the audit trail (the default: an API caller with no details).
    pub actor: Actor,
    /// Unix milliseconds at which it is removed (a TTL), replacing its policy's
    /// idle and lifetime deadlines.
    pub expires_at: Option<u64>,
    /// Overrides its policy's `protected`.
    pub protected: Option<bool>,
    /// Unix milliseconds at which its protection ends.
    pub protected_until: Option<u64>,
    /// When the branch exists already: return it (the default) or refuse.
    pub if_exists: IfExists,
}

/// What a creation does when the branch exists already.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum IfExists {
    /// Return the existing branch (never another one, nor the source).
    #[default]
    Reuse,
    /// Refuse with a conflict.
    Fail,
}

/// Why a deletion was refused.
#[derive(Debug, thiserror::Error)]
pub enum DeleteError {
    #[error("branch {0} does not exist")]
    NotFound(BranchId),
    #[error("branch {id} has {conns} open connection(s); a forced deletion terminates them")]
    InUse { id: BranchId, conns: usize },
    #[error("branch {0} is being created, started, suspended or deleted; try again")]
    Busy(BranchId),
    #[error("branch {id} is {guard}; a forced deletion removes it anyway")]
    Guarded { id: BranchId, guard: Guard },
    #[error("could not delete branch {id}: {err}")]
    Engine { id: BranchId, err: EngineError },
}

/// Why a branch was removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveReason {
    /// Nobody used it for its policy's `idle_expire`.
    Idle,
    /// It reached its policy's `max_lifetime` since creation or its last reset.
    Lifetime,
    /// It reached the TTL it was given.
    Ttl,
    /// Deleted through the admin API.
    Api,
}

impl RemoveReason {
    pub const ALL: [RemoveReason; 4] = [
        RemoveReason::Idle,
        RemoveReason::Lifetime,
        RemoveReason::Ttl,
        RemoveReason::Api,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RemoveReason::Idle => "idle",
            RemoveReason::Lifetime => "lifetime",
            RemoveReason::Ttl => "ttl",
            RemoveReason::Api => "api",
        }
    }
}

/// What the registry's lock guards.
#[derive(Default)]
struct Book {
    branches: BTreeMap<BranchId, Branch>,
    /// Snapshot deletions in flight, by source and snapshot name.
    snapshot_deletions: BTreeMap<(SourceName, String), Ended>,
}

pub struct Registry {
    sources: BTreeMap<SourceName, Source>,
    book: Mutex<Book>,
    store: Store,
    metrics: Arc<Metrics>,
    gauges: BTreeMap<SourceName, PhaseGauges>,
    /// `offshoot_client_connections` of each source, looked up once.
    connection_gauges: BTreeMap<SourceName, IntGauge>,
    orphans: Mutex<Vec<Orphan>>,
    /// Branch sizes as last measured (see `size`); locked after `book`, never before.
    sizes: Mutex<size::Sizes>,
    shutting_down: AtomicBool,
    /// The control-plane runtime: creations, suspensions and deletions run there,
    /// not on the relay thread of the connection that asked (their file and SQL work
    /// would stall its relays), and not in a request that can be dropped halfway.
    runtime: tokio::runtime::Handle,
    clock: Clock,
    /// Where transitions are recorded ([`Registry::with_audit`]); off by default.
    audit: Audit,
    /// Closes a branch's server sessions kept for reuse (set by the proxy): they
    /// hold no lease, and must not outlive the server or clone they are open on.
    drain: OnceLock<Drain>,
}

/// See [`Registry::on_drain`].
type Drain = Box<dyn Fn(&BranchId) + Send + Sync>;

impl Registry {
    /// Must be called inside the control-plane runtime.
    pub fn new(sources: Vec<Source>, store: Store, metrics: Arc<Metrics>, clock: Clock) -> Self {
        let sources: BTreeMap<_, _> = sources.into_iter().map(|s| (s.name.clone(), s)).collect();
        // Every series exists from the first scrape, so rates and alerts work.
        let gauges = sources
            .keys()
            .map(|s| (s.clone(), PhaseGauges::new(&metrics, s)))
            .collect();
        let connection_gauges = sources
            .keys()
            .map(|s| {
                (
                    s.clone(),
                    metrics.client_connections.with_label_values(&[s.as_str()]),
                )
            })
            .collect();
        for (name, src) in &sources {
            let s = name.as_str();
            metrics.provision_seconds.with_label_values(&[s]);
            metrics.branches_created_total.with_label_values(&[s]);
            for outcome in ["ok", "failed"] {
                metrics.resets_total.with_label_values(&[s, outcome]);
                if src.config.snapshot_every.is_some() {
                    metrics
                        .scheduled_snapshots_total
                        .with_label_values(&[s, outcome]);
                }
            }
            if src.engine.servers().is_some() {
                metrics.start_seconds.with_label_values(&[s]);
                metrics.suspensions_total.with_label_values(&[s]);
            }
            for reason in RemoveReason::ALL {
                metrics
                    .branches_expired_total
                    .with_label_values(&[s, reason.as_str()]);
            }
        }
        Self {
            sources,
            book: Mutex::new(Book::default()),
            store,
            metrics,
            gauges,
            connection_gauges,
            orphans: Mutex::new(Vec::new()),
            sizes: Mutex::new(size::Sizes::new()),
            shutting_down: AtomicBool::new(false),
            runtime: tokio::runtime::Handle::current(),
            clock,
            audit: Audit::disabled(),
            drain: OnceLock::new(),
        }
    }

    /// Sets what closes a branch's kept server sessions; called before a branch's
    /// server is stopped (suspension, a lost server) or its clone removed. Set once.
    pub fn on_drain(&self, drain: impl Fn(&BranchId) + Send + Sync + 'static) {
        let _ = self.drain.set(Box::new(drain));
    }

    /// Closes the server sessions kept for reuse on branch `id`.
    pub fn drain_parked(&self, id: &BranchId) {
        if let Some(drain) = self.drain.get() {
            drain(id);
        }
    }

    /// Records every transition in `audit`.
    pub fn with_audit(mut self, audit: Audit) -> Self {
        self.audit = audit;
        self
    }

    /// The audit trail, for the events API and for work outside the registry that
    /// records events of its own.
    pub fn audit(&self) -> &Audit {
        &self.audit
    }

    fn lock(&self) -> MutexGuard<'_, Book> {
        // A panic while holding the lock leaves the book consistent (every mutation is
        // a single insert/remove/state step), so poisoning is not fatal.
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The metrics the registry's work is counted in.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The clock every time stamp and idle period is read from.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    pub fn source(&self, name: &str) -> Option<&Source> {
        SourceName::new(name)
            .ok()
            .and_then(|n| self.sources.get(&n))
    }

    pub fn source_names(&self) -> Vec<&str> {
        self.sources.keys().map(|s| s.as_str()).collect()
    }

    pub fn sources(&self) -> impl Iterator<Item = &Source> {
        self.sources.values()
    }

    /// New connections and creations are refused from now on.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Gets `id` ready for a connection, creating it if needed, and counts the
    /// connection in. Waits at most `timeout` for a creation in flight.
    pub async fn acquire(
        self: &Arc<Self>,
        id: &BranchId,
        timeout: Duration,
    ) -> Result<Lease, ProvisionError> {
        self.acquire_as(id, timeout, None).await
    }

    /// [`Registry::acquire`] for an authenticated role: a branch it causes to be made
    /// is checked against, and counted in, its permissions.
    pub async fn acquire_as(
        self: &Arc<Self>,
        id: &BranchId,
        timeout: Duration,
        creator: Option<&Creator>,
    ) -> Result<Lease, ProvisionError> {
        let actor = || Actor::client(creator.map(|c| c.role.clone()), None);
        self.acquire_by(id, timeout, creator, actor).await
    }

    /// [`Registry::acquire_as`] for a client `actor` (its role and address), whom
    /// the audit trail names for a creation or a resume it causes. A branch that is
    /// ready is leased at once, without asking who the actor is.
    pub async fn acquire_by(
        self: &Arc<Self>,
        id: &BranchId,
        timeout: Duration,
        creator: Option<&Creator>,
        actor: impl FnOnce() -> Actor,
    ) -> Result<Lease, ProvisionError> {
        if let Some(lease) = self.lease_ready(id) {
            return Ok(lease);
        }
        let opts = CreateOptions {
            actor: actor(),
            ..CreateOptions::default()
        };
        self.wait_ready(id, &opts, creator, timeout).await
    }

    /// `offshoot_client_connections` of `source`, which a lease counts in.
    fn connection_gauge(&self, source: &SourceName) -> IntGauge {
        match self.connection_gauges.get(source) {
            Some(g) => g.clone(),
            None => self
                .metrics
                .client_connections
                .with_label_values(&[source.as_str()]),
        }
    }

    /// A lease on `id` if it is ready now (the common case of a connection);
    /// `None` for anything else, which [`Registry::wait_ready`] handles.
    fn lease_ready(&self, id: &BranchId) -> Option<Lease> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return None;
        }
        let source = self.sources.get(&id.source)?;
        let book = self.lock();
        let branch = book.branches.get(id)?;
        (branch.phase() == Phase::Ready).then(|| self.lease_of(source, branch))
    }

    /// A lease on `branch` of `source`, which is ready: its server's endpoint,
    /// counted in the source's connections.
    fn lease_of(&self, source: &Source, branch: &Branch) -> Lease {
        branch.lease(
            source.engine.endpoint(&branch.record),
            self.connection_gauge(&source.name),
        )
    }

    /// Creates `id` ahead of time (admin API), or starts it when suspended. Returns
    /// whether it was created now.
    pub async fn ensure(
        self: &Arc<Self>,
        id: &BranchId,
        opts: &CreateOptions,
        timeout: Duration,
    ) -> Result<(BranchView, bool), ProvisionError> {
        let created = {
            let book = self.lock();
            match (book.branches.get(id), &opts.snapshot) {
                (Some(_), _) if opts.if_exists == IfExists::Fail => {
                    return Err(ProvisionError::Conflict(format!(
                        "branch {id} exists already (\"if_exists\": \"fail\")"
                    )));
                }
                (Some(b), Some(want)) if b.record.snapshot.as_ref().is_some_and(|s| s != want) => {
                    return Err(ProvisionError::Conflict(format!(
                        "branch {id} exists and was made from snapshot {}, not {want}; \
                         delete it first",
                        b.record.snapshot.as_deref().unwrap_or("?")
                    )));
                }
                (b, _) => b.is_none(),
            }
        };
        drop(self.wait_ready(id, opts, None, timeout).await?);
        let view = self
            .view(id)
            .ok_or_else(|| ProvisionError::Deleting(id.clone()))?;
        Ok((view, created))
    }

    /// The one wait loop: looks at the branch, and until it is Ready waits for what is
    /// in flight (a creation, a start, a suspension, a deletion), for at most
    /// `timeout` in all.
    async fn wait_ready(
        self: &Arc<Self>,
        id: &BranchId,
        opts: &CreateOptions,
        creator: Option<&Creator>,
        timeout: Duration,
    ) -> Result<Lease, ProvisionError> {
        let expired = tokio::time::sleep(timeout);
        tokio::pin!(expired);
        loop {
            let wait = match self.try_enter(id, opts, creator)? {
                Ok(lease) => return Ok(lease),
                Err(wait) => wait,
            };
            match wait {
                Wait::Outcome(mut rx) => {
                    let outcome = tokio::select! {
                        biased;
                        r = rx.wait_for(Option::is_some) => match r {
                            Ok(v) => v.clone(),
                            // The sender is gone only if the task died (panic or
                            // runtime shutdown): report it rather than wait again.
                            Err(_) => return Err(self.interrupted(id, "creation or start")),
                        },
                        _ = &mut expired => return Err(ProvisionError::Timeout(id.clone())),
                    };
                    if let Some(Err(e)) = outcome {
                        return Err(e);
                    }
                }
                Wait::Branch(mut rx) => {
                    tokio::select! {
                        biased;
                        r = rx.wait_for(|ended| *ended) => if r.is_err() {
                            return Err(self.interrupted(id, "suspension or deletion"));
                        },
                        _ = &mut expired => return Err(ProvisionError::Deleting(id.clone())),
                    }
                }
                Wait::Snapshot(mut rx) => {
                    tokio::select! {
                        biased;
                        // A deletion that died unannounced has released its hold.
                        _ = rx.wait_for(|ended| *ended) => {}
                        _ = &mut expired => return Err(ProvisionError::Timeout(id.clone())),
                    }
                }
            }
        }
    }

    /// A task that died without publishing its outcome (a panic, or the runtime
    /// shutting down). A creation or start that died is forgotten, so the next
    /// connection starts afresh (its record, if any, is settled at the next start).
    fn interrupted(&self, id: &BranchId, what: &str) -> ProvisionError {
        let mut book = self.lock();
        let dead = matches!(
            book.branches.get(id).map(Branch::state),
            Some(State::Provisioning { done } | State::Starting { done } | State::Resetting { done })
                if done.has_changed().is_err()
        );
        if dead {
            book.branches.remove(id);
        }
        ProvisionError::Engine {
            id: id.clone(),
            err: EngineError::failed(format!("the branch's {what} was interrupted; try again")),
        }
    }

    /// One look under the lock: a lease if Ready, else something to wait on
    /// (starting the creation, or the server of a suspended branch, if nobody has).
    fn try_enter(
        self: &Arc<Self>,
        id: &BranchId,
        opts: &CreateOptions,
        creator: Option<&Creator>,
    ) -> Result<Result<Lease, Wait>, ProvisionError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ProvisionError::ShuttingDown);
        }
        let source = self
            .sources
            .get(&id.source)
            .ok_or_else(|| ProvisionError::Engine {
                id: id.clone(),
                err: EngineError::NotFound("source is not configured".into()),
            })?;
        let mut book = self.lock();
        if let Some(branch) = book.branches.get_mut(id) {
            return Ok(match branch.enter() {
                Entry::Ready => Ok(self.lease_of(source, branch)),
                Entry::Wait(wait) => Err(wait),
                Entry::Start(tx, wait) => {
                    let record = branch.record.clone();
                    drop(book);
                    let this = self.clone();
                    let actor = opts.actor.clone();
                    self.runtime
                        .spawn(async move { this.resume(record, tx, actor).await });
                    Err(wait)
                }
            });
        }
        if let Err(e) = self.may_create(&book, id, source, creator) {
            self.audit.record(
                Event::new(Action::BranchRefused, opts.actor.clone())
                    .branch(id)
                    .reason(trail::refusal(&e))
                    .outcome(Outcome::Refused)
                    .error(e.client_message()),
            );
            return Err(e);
        }
        if let Some(done) = self.snapshot_hold(&book, id, opts) {
            return Ok(Err(Wait::Snapshot(done)));
        }
        let now = self.clock.unix_ms();
        let record = BranchRecord {
            source: id.source.clone(),
            branch: id.branch.clone(),
            engine: source.config.engine.kind(),
            clone_name: source.engine.clone_name(id),
            state: RecordState::Provisioning,
            created_at: now,
            last_active: now,
            persistent: opts.persistent,
            created_by: creator.map(|c| c.role.clone()),
            snapshot: opts.snapshot.clone(),
            copy_mode: None,
            born_at: Some(now),
            expires_at: opts.expires_at,
            protected: opts.protected,
            protected_until: opts.protected_until,
        };
        let (tx, rx) = watch::channel(None);
        let branch = self.branch(
            State::Provisioning { done: rx.clone() },
            record.clone(),
            now,
        );
        book.branches.insert(id.clone(), branch);
        drop(book);
        let this = self.clone();
        let actor = opts.actor.clone();
        self.runtime
            .spawn(async move { this.provision(record, tx, actor, false).await });
        Ok(Err(Wait::Outcome(rx)))
    }

    /// A branch entering the book, counted in its source's gauges.
    fn branch(&self, state: State, record: BranchRecord, last_active_ms: u64) -> Branch {
        let activity = Arc::new(Activity::new(self.clock.clone(), last_active_ms));
        let gauges = self.gauges[&record.source].clone();
        Branch::new(state, record, activity, gauges)
    }
}
