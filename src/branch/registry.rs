//! The one owner of branch state.
//!
//! Invariants:
//! - Only this module changes a branch's phase (Provisioning → Starting → Ready ⇄
//!   Suspended → Expiring → gone) and its record on disk.
//! - A branch has at most one creation (or start) in flight: the first connection
//!   starts it, every later one waits on the same result (single flight).
//! - A branch is deleted or suspended only when settled (Ready, or Suspended for a
//!   deletion) with no open connection (unless a deletion is forced); connections are
//!   counted under the same lock that starts a deletion or a suspension, so a
//!   connection is never granted a branch whose server is being stopped or removed.
//! - The record is written before the clone is created and removed after it is gone,
//!   so a crash at any point leaves something [`Registry::adopt`] can settle.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use prometheus::IntGauge;
use serde::Serialize;
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::engine::{Endpoint, Engine, Recovered};
use super::store::{unix_ms, BranchRecord, RecordState, Store};
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
        let persistent = config
            .persistent
            .iter()
            .filter_map(|b| BranchName::new(b).ok())
            .collect();
        Self {
            name,
            config,
            engine,
            persistent,
        }
    }
}

/// The phase a branch is in, as the API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// The clone is being made.
    Provisioning,
    /// The clone exists; its server is starting (after a creation or a suspension).
    Starting,
    /// Connections are served.
    Ready,
    /// The clone's server is stopped (or stopping); the next connection starts it.
    Suspended,
    /// The clone is being removed.
    Expiring,
}

impl Phase {
    const ALL: [Phase; 5] = [
        Phase::Provisioning,
        Phase::Starting,
        Phase::Ready,
        Phase::Suspended,
        Phase::Expiring,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Provisioning => "provisioning",
            Phase::Starting => "starting",
            Phase::Ready => "ready",
            Phase::Suspended => "suspended",
            Phase::Expiring => "expiring",
        }
    }
}

type Outcome = Option<Result<(), ProvisionError>>;

/// What a connection waits on when the branch is not Ready.
enum Waiter {
    /// A creation or a start; its outcome is the connection's.
    Provisioning(watch::Receiver<Outcome>),
    /// A suspension or a deletion; the connection looks again when it ends.
    Changing(watch::Receiver<bool>),
}

/// How a branch should be made, when a request creates it.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Never expires (it may still be suspended).
    pub persistent: bool,
    /// The snapshot to clone; unset: the newest.
    pub snapshot: Option<String>,
}

/// Connection count and last activity, shared with the connections' guards.
#[derive(Debug)]
pub struct Activity {
    conns: AtomicUsize,
    last_active_ms: AtomicU64,
    dirty: AtomicBool,
}

impl Activity {
    fn new(last_active_ms: u64) -> Self {
        Self {
            conns: AtomicUsize::new(0),
            last_active_ms: AtomicU64::new(last_active_ms),
            dirty: AtomicBool::new(false),
        }
    }

    fn touch(&self) {
        self.last_active_ms
            .store(unix_ms(SystemTime::now()), Ordering::Relaxed);
        self.dirty.store(true, Ordering::Relaxed);
    }

    pub fn connections(&self) -> usize {
        self.conns.load(Ordering::Acquire)
    }
}

struct Entry {
    phase: Phase,
    waiter: Option<Waiter>,
    record: BranchRecord,
    activity: Arc<Activity>,
}

/// Held by a connection for its whole life: the branch counts it as open.
pub struct ConnGuard {
    activity: Arc<Activity>,
    gauge: IntGauge,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.activity.touch();
        self.activity.conns.fetch_sub(1, Ordering::AcqRel);
        self.gauge.dec();
    }
}

/// What a connection gets: where to go, and its place in the branch's count.
pub struct Lease {
    pub endpoint: Endpoint,
    pub guard: ConnGuard,
}

/// A branch as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct BranchView {
    pub source: String,
    pub branch: String,
    pub state: Phase,
    pub engine: crate::config::EngineKind,
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
    pub copy_mode: Option<super::engine::CopyMode>,
}

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

/// Something found on disk or on a server that no live record explains. Reported,
/// never deleted: the proxy cannot prove it made it.
#[derive(Debug, Clone, Serialize)]
pub struct Orphan {
    pub source: Option<String>,
    pub location: String,
    pub reason: String,
}

/// Why a deletion was refused.
#[derive(Debug, thiserror::Error)]
pub enum DeleteError {
    #[error("branch {0} does not exist")]
    NotFound(BranchId),
    #[error("branch {id} has {conns} open connection(s); use force to terminate them")]
    InUse { id: BranchId, conns: usize },
    #[error("branch {0} is being created, started, suspended or deleted; try again")]
    Busy(BranchId),
    #[error("could not delete branch {id}: {err}")]
    Engine { id: BranchId, err: EngineError },
}

/// Why a branch was removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveReason {
    /// Nobody used it for the source's `idle_expire`.
    Idle,
    /// Deleted through the admin API.
    Api,
}

impl RemoveReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RemoveReason::Idle => "idle",
            RemoveReason::Api => "api",
        }
    }
}

pub struct Registry {
    sources: BTreeMap<SourceName, Source>,
    entries: Mutex<BTreeMap<BranchId, Entry>>,
    store: Store,
    metrics: Arc<Metrics>,
    orphans: Mutex<Vec<Orphan>>,
    shutting_down: AtomicBool,
    /// The control-plane runtime: creations run there, not on the relay thread of
    /// the connection that asked (their file and SQL work would stall its relays).
    runtime: tokio::runtime::Handle,
}

fn rfc3339(ms: u64) -> String {
    let t = SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

impl Registry {
    /// Must be called inside the control-plane runtime.
    pub fn new(sources: Vec<Source>, store: Store, metrics: Arc<Metrics>) -> Self {
        let sources = sources.into_iter().map(|s| (s.name.clone(), s)).collect();
        let reg = Self {
            sources,
            entries: Mutex::new(BTreeMap::new()),
            store,
            metrics,
            orphans: Mutex::new(Vec::new()),
            shutting_down: AtomicBool::new(false),
            runtime: tokio::runtime::Handle::current(),
        };
        // Every series exists from the first scrape, so rates and alerts work.
        for src in reg.sources.keys() {
            let s = src.as_str();
            reg.metrics.client_connections.with_label_values(&[s]);
            reg.metrics.provision_seconds.with_label_values(&[s]);
            reg.metrics.branches_created_total.with_label_values(&[s]);
            if reg.sources[src].engine.servers().is_some() {
                reg.metrics.start_seconds.with_label_values(&[s]);
                reg.metrics.suspensions_total.with_label_values(&[s]);
            }
            for reason in [RemoveReason::Idle, RemoveReason::Api] {
                reg.metrics
                    .branches_expired_total
                    .with_label_values(&[s, reason.as_str()]);
            }
        }
        reg.refresh_gauges(&reg.lock());
        reg
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<BranchId, Entry>> {
        // A panic while holding the lock leaves the map consistent (every mutation is
        // a single insert/remove/field store), so poisoning is not fatal.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
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

    fn refresh_gauges(&self, map: &BTreeMap<BranchId, Entry>) {
        for src in self.sources.keys() {
            for phase in Phase::ALL {
                let n = map
                    .iter()
                    .filter(|(id, e)| &id.source == src && e.phase == phase)
                    .count();
                self.metrics
                    .branches
                    .with_label_values(&[src.as_str(), phase.as_str()])
                    .set(n as i64);
            }
        }
    }

    fn is_persistent(&self, rec: &BranchRecord) -> bool {
        rec.persistent
            || self
                .sources
                .get(&rec.source)
                .is_some_and(|s| s.persistent.contains(&rec.branch))
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
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let waiter = match self.try_enter(id, &CreateOptions::default(), creator)? {
                Ok(lease) => return Ok(lease),
                Err(w) => w,
            };
            let waited = match waiter {
                Waiter::Provisioning(mut rx) => {
                    match tokio::time::timeout_at(deadline, rx.wait_for(Option::is_some)).await {
                        Err(_) => return Err(ProvisionError::Timeout(id.clone())),
                        // The sender is gone only if the creating task died (panic or
                        // runtime shutdown): report it rather than wait on it again.
                        Ok(Err(_)) => return Err(self.interrupted(id)),
                        Ok(Ok(v)) => v.clone(),
                    }
                }
                Waiter::Changing(mut rx) => {
                    match tokio::time::timeout_at(deadline, rx.wait_for(|done| *done)).await {
                        Err(_) => return Err(ProvisionError::Deleting(id.clone())),
                        Ok(_) => continue,
                    }
                }
            };
            if let Some(Err(e)) = waited {
                return Err(e);
            }
        }
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
            let map = self.lock();
            match (map.get(id), &opts.snapshot) {
                (Some(e), Some(want)) if e.record.snapshot.as_ref().is_some_and(|s| s != want) => {
                    return Err(ProvisionError::Conflict(format!(
                        "branch {id} exists and was made from snapshot {}, not {want}; \
                         delete it first",
                        e.record.snapshot.as_deref().unwrap_or("?")
                    )));
                }
                (e, _) => e.is_none(),
            }
        };
        let lease = loop {
            match self.try_enter(id, opts, None)? {
                Ok(lease) => break lease,
                Err(Waiter::Provisioning(mut rx)) => {
                    let r = tokio::time::timeout(timeout, rx.wait_for(Option::is_some))
                        .await
                        .map_err(|_| ProvisionError::Timeout(id.clone()))?;
                    match r {
                        Ok(v) => {
                            if let Some(Err(e)) = v.clone() {
                                return Err(e);
                            }
                        }
                        Err(_) => return Err(self.interrupted(id)),
                    }
                }
                Err(Waiter::Changing(mut rx)) => {
                    let _ = tokio::time::timeout(timeout, rx.wait_for(|d| *d))
                        .await
                        .map_err(|_| ProvisionError::Deleting(id.clone()))?;
                }
            }
        };
        drop(lease);
        let view = self
            .view(id)
            .ok_or_else(|| ProvisionError::Deleting(id.clone()))?;
        Ok((view, created))
    }

    /// A creation whose task died without an outcome: forget the entry so the next
    /// connection starts afresh (its record, if any, is settled at the next start).
    fn interrupted(&self, id: &BranchId) -> ProvisionError {
        let mut map = self.lock();
        let dead = matches!(
            map.get(id).and_then(|e| e.waiter.as_ref()),
            Some(Waiter::Provisioning(rx)) if rx.has_changed().is_err()
        );
        if dead {
            map.remove(id);
            self.refresh_gauges(&map);
        }
        ProvisionError::Engine {
            id: id.clone(),
            err: EngineError::failed("the creation was interrupted; try again"),
        }
    }

    /// One look under the lock: a lease if Ready, else something to wait on (starting
    /// the creation if nobody has).
    fn try_enter(
        self: &Arc<Self>,
        id: &BranchId,
        opts: &CreateOptions,
        creator: Option<&Creator>,
    ) -> Result<Result<Lease, Waiter>, ProvisionError> {
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
        let mut map = self.lock();
        if let Some(entry) = map.get_mut(id) {
            if entry.phase == Phase::Suspended && entry.waiter.is_none() {
                // The first connection to a suspended branch starts its server.
                let (tx, rx) = watch::channel(None);
                entry.phase = Phase::Starting;
                entry.waiter = Some(Waiter::Provisioning(rx.clone()));
                let record = entry.record.clone();
                self.refresh_gauges(&map);
                drop(map);
                let this = self.clone();
                self.runtime
                    .spawn(async move { this.resume(record, tx).await });
                return Ok(Err(Waiter::Provisioning(rx)));
            }
            return Ok(match (&entry.phase, &entry.waiter) {
                (Phase::Ready, _) => {
                    entry.activity.conns.fetch_add(1, Ordering::AcqRel);
                    entry.activity.touch();
                    let gauge = self
                        .metrics
                        .client_connections
                        .with_label_values(&[id.source.as_str()]);
                    gauge.inc();
                    Ok(Lease {
                        endpoint: source.engine.endpoint(&entry.record),
                        guard: ConnGuard {
                            activity: entry.activity.clone(),
                            gauge,
                        },
                    })
                }
                (_, Some(Waiter::Provisioning(rx))) => Err(Waiter::Provisioning(rx.clone())),
                (_, Some(Waiter::Changing(rx))) => Err(Waiter::Changing(rx.clone())),
                (_, None) => unreachable!("non-ready entries always carry a waiter"),
            });
        }
        if let Some(c) = creator {
            if !c.may_create {
                return Err(ProvisionError::CreateForbidden {
                    role: c.role.clone(),
                    source_name: id.source.to_string(),
                });
            }
            let mine = map
                .iter()
                .filter(|(k, e)| {
                    k.source == id.source && e.record.created_by.as_deref() == Some(&c.role)
                })
                .count();
            if c.max_branches > 0 && mine >= c.max_branches {
                return Err(ProvisionError::RoleQuota {
                    role: c.role.clone(),
                    source_name: id.source.to_string(),
                    limit: c.max_branches,
                });
            }
        }
        let count = map.keys().filter(|k| k.source == id.source).count();
        if count >= source.config.max_branches {
            return Err(ProvisionError::Quota {
                source_name: id.source.to_string(),
                limit: source.config.max_branches,
            });
        }
        let now = unix_ms(SystemTime::now());
        let record = BranchRecord {
            source: id.source.clone(),
            branch: id.branch.clone(),
            engine: source.config.engine,
            clone_name: source.engine.clone_name(id),
            state: RecordState::Provisioning,
            created_at: now,
            last_active: now,
            persistent: opts.persistent,
            created_by: creator.map(|c| c.role.clone()),
            snapshot: opts.snapshot.clone(),
            copy_mode: None,
        };
        let (tx, rx) = watch::channel(None);
        map.insert(
            id.clone(),
            Entry {
                phase: Phase::Provisioning,
                waiter: Some(Waiter::Provisioning(rx.clone())),
                record: record.clone(),
                activity: Arc::new(Activity::new(now)),
            },
        );
        self.refresh_gauges(&map);
        drop(map);
        let this = self.clone();
        self.runtime
            .spawn(async move { this.provision(record, tx).await });
        Ok(Err(Waiter::Provisioning(rx)))
    }

    /// Runs one creation to its end and publishes the outcome.
    async fn provision(self: Arc<Self>, mut record: BranchRecord, tx: watch::Sender<Outcome>) {
        let id = record.id();
        let source = &self.sources[&id.source];
        let started = Instant::now();
        info!(branch = %id, clone = %record.clone_name, "creating branch");
        let result = match self.store.save(&record) {
            Err(e) => Err(EngineError::io("cannot write the branch record", e)),
            Ok(()) => source.engine.create(&record).await,
        };
        let mut made = false;
        let result = result.and_then(|m| {
            made = true;
            if let Some(mode) = &m.copy_mode {
                self.metrics
                    .clones_total
                    .with_label_values(&[id.source.as_str(), mode.as_str()])
                    .inc();
            }
            record.snapshot = m.snapshot;
            record.copy_mode = m.copy_mode;
            record.state = RecordState::Ready;
            self.store
                .save(&record)
                .map_err(|e| EngineError::io("cannot write the branch record", e))
        });
        // The clone exists: start its server (engines without one return at once).
        let result = match result {
            Ok(()) => match source.engine.servers() {
                None => Ok(()),
                Some(servers) => {
                    {
                        let mut map = self.lock();
                        if let Some(e) = map.get_mut(&id) {
                            e.phase = Phase::Starting;
                            e.record = record.clone();
                        }
                        self.refresh_gauges(&map);
                    }
                    servers.start(&record).await
                }
            },
            Err(e) => Err(e),
        };
        let outcome = match result {
            Ok(()) => {
                let secs = started.elapsed().as_secs_f64();
                self.metrics
                    .provision_seconds
                    .with_label_values(&[id.source.as_str()])
                    .observe(secs);
                self.metrics
                    .branches_created_total
                    .with_label_values(&[id.source.as_str()])
                    .inc();
                info!(branch = %id, ms = (secs * 1000.0) as u64, "branch ready");
                let mut map = self.lock();
                if let Some(e) = map.get_mut(&id) {
                    e.phase = Phase::Ready;
                    e.waiter = None;
                    e.record = record;
                }
                self.refresh_gauges(&map);
                Ok(())
            }
            Err(err) => {
                error!(branch = %id, error = %err, "branch creation failed");
                // If the clone was made but its record could not be marked ready or
                // its server did not start, take the clone down again: nothing
                // half-made stays behind.
                if made {
                    if let Err(e) = source.engine.destroy(&record, true).await {
                        error!(branch = %id, error = %e, "could not remove clone after failure");
                    }
                }
                if let Err(e) = self.store.remove(&id) {
                    error!(branch = %id, error = %e, "could not remove branch record");
                }
                let mut map = self.lock();
                map.remove(&id);
                self.refresh_gauges(&map);
                Err(ProvisionError::Engine {
                    id: id.clone(),
                    err,
                })
            }
        };
        let _ = tx.send(Some(outcome));
    }

    /// Starts the server of a suspended branch and publishes the outcome.
    async fn resume(self: Arc<Self>, record: BranchRecord, tx: watch::Sender<Outcome>) {
        let id = record.id();
        let source = &self.sources[&id.source];
        let started = Instant::now();
        let result = match source.engine.servers() {
            Some(servers) => servers.start(&record).await,
            None => Ok(()),
        };
        let mut map = self.lock();
        let outcome = match result {
            Ok(()) => {
                let secs = started.elapsed().as_secs_f64();
                self.metrics
                    .start_seconds
                    .with_label_values(&[id.source.as_str()])
                    .observe(secs);
                info!(branch = %id, ms = (secs * 1000.0) as u64, "branch resumed");
                if let Some(e) = map.get_mut(&id) {
                    e.phase = Phase::Ready;
                    e.waiter = None;
                }
                Ok(())
            }
            Err(err) => {
                error!(branch = %id, error = %err, "branch server did not start; it stays suspended");
                if let Some(e) = map.get_mut(&id) {
                    e.phase = Phase::Suspended;
                    e.waiter = None;
                }
                Err(ProvisionError::Start { id, err })
            }
        };
        self.refresh_gauges(&map);
        drop(map);
        let _ = tx.send(Some(outcome));
    }

    /// Stops the server of a Ready branch nobody is connected to; its data stays and
    /// the next connection starts it again. Returns false (and does nothing) when the
    /// branch is not in that state or its engine has no server to stop.
    pub async fn suspend(&self, id: &BranchId) -> Result<bool, EngineError> {
        let source = &self.sources[&id.source];
        let Some(servers) = source.engine.servers() else {
            return Ok(false);
        };
        let (record, tx) = {
            let mut map = self.lock();
            let Some(entry) = map.get_mut(id) else {
                return Ok(false);
            };
            if entry.phase != Phase::Ready || entry.activity.connections() > 0 {
                return Ok(false);
            }
            let (tx, rx) = watch::channel(false);
            entry.phase = Phase::Suspended;
            entry.waiter = Some(Waiter::Changing(rx));
            let record = entry.record.clone();
            self.refresh_gauges(&map);
            (record, tx)
        };
        let result = servers.stop(&record).await;
        let mut map = self.lock();
        let out = match result {
            Ok(()) => {
                self.metrics
                    .suspensions_total
                    .with_label_values(&[id.source.as_str()])
                    .inc();
                info!(branch = %id, "branch suspended");
                if let Some(e) = map.get_mut(id) {
                    e.waiter = None;
                }
                Ok(true)
            }
            Err(err) => {
                // The server may still run: keep serving it.
                warn!(branch = %id, error = %err, "could not stop the branch's server; it stays ready");
                if let Some(e) = map.get_mut(id) {
                    e.phase = Phase::Ready;
                    e.waiter = None;
                }
                Err(err)
            }
        };
        self.refresh_gauges(&map);
        drop(map);
        let _ = tx.send(true);
        out
    }

    /// Suspends every Ready branch with no connection (on shutdown), a few at once.
    pub async fn suspend_all(&self) {
        use futures_util::stream::{self, StreamExt};
        let ids: Vec<BranchId> = {
            let map = self.lock();
            map.iter()
                .filter(|(_, e)| e.phase == Phase::Ready)
                .map(|(id, _)| id.clone())
                .collect()
        };
        stream::iter(ids)
            .for_each_concurrent(8, |id| async move {
                if let Err(e) = self.suspend(&id).await {
                    warn!(branch = %id, error = %e, "left running");
                }
            })
            .await;
    }

    /// Removes a Ready branch. Connections are refused meanwhile and wait for the
    /// outcome; afterwards a new connection makes a fresh clone.
    pub async fn delete(
        &self,
        id: &BranchId,
        force: bool,
        reason: RemoveReason,
    ) -> Result<(), DeleteError> {
        let state = {
            let mut map = self.lock();
            let entry = map
                .get_mut(id)
                .ok_or_else(|| DeleteError::NotFound(id.clone()))?;
            let settled = entry.phase == Phase::Ready
                || (entry.phase == Phase::Suspended && entry.waiter.is_none());
            if !settled {
                return Err(DeleteError::Busy(id.clone()));
            }
            let conns = entry.activity.connections();
            if conns > 0 && !force {
                return Err(DeleteError::InUse {
                    id: id.clone(),
                    conns,
                });
            }
            let (tx, rx) = watch::channel(false);
            let before = entry.phase;
            entry.phase = Phase::Expiring;
            entry.waiter = Some(Waiter::Changing(rx));
            let record = entry.record.clone();
            self.refresh_gauges(&map);
            (record, tx, before)
        };
        let (record, tx, before) = state;
        let source = &self.sources[&id.source];
        let result = source.engine.destroy(&record, force).await;
        let mut map = self.lock();
        let out = match result {
            Ok(()) => {
                if let Err(e) = self.store.remove(id) {
                    error!(branch = %id, error = %e, "could not remove branch record");
                }
                map.remove(id);
                self.metrics
                    .branches_expired_total
                    .with_label_values(&[id.source.as_str(), reason.as_str()])
                    .inc();
                info!(branch = %id, reason = reason.as_str(), "branch removed");
                Ok(())
            }
            Err(err) => {
                warn!(branch = %id, error = %err, "branch removal failed; it stays");
                if let Some(e) = map.get_mut(id) {
                    // A server the failed removal stopped is started again on demand.
                    e.phase = if source.engine.servers().is_some() {
                        Phase::Suspended
                    } else {
                        before
                    };
                    e.waiter = None;
                }
                Err(DeleteError::Engine {
                    id: id.clone(),
                    err,
                })
            }
        };
        self.refresh_gauges(&map);
        drop(map);
        let _ = tx.send(true);
        out
    }

    /// Settled (Ready or Suspended), idle, unused, non-persistent branches past their
    /// source's `idle_expire` at `now`, with how long each has been idle.
    pub fn idle_candidates(&self, now: SystemTime) -> Vec<(BranchId, Duration)> {
        let now_ms = unix_ms(now);
        let map = self.lock();
        map.iter()
            .filter_map(|(id, e)| {
                let limit = self.sources.get(&id.source)?.config.idle_expire?;
                let settled =
                    e.phase == Phase::Ready || (e.phase == Phase::Suspended && e.waiter.is_none());
                if !settled || e.activity.connections() > 0 || self.is_persistent(&e.record) {
                    return None;
                }
                let last = e.activity.last_active_ms.load(Ordering::Relaxed);
                let idle = Duration::from_millis(now_ms.saturating_sub(last));
                (idle >= limit).then(|| (id.clone(), idle))
            })
            .collect()
    }

    /// Ready, unused branches (persistent ones too) whose server has been idle past
    /// their source's `suspend_after` at `now`, with how long each has been idle.
    pub fn suspend_candidates(&self, now: SystemTime) -> Vec<(BranchId, Duration)> {
        let now_ms = unix_ms(now);
        let map = self.lock();
        map.iter()
            .filter_map(|(id, e)| {
                let source = self.sources.get(&id.source)?;
                let limit = source.config.suspend_after?;
                if source.engine.servers().is_none()
                    || e.phase != Phase::Ready
                    || e.activity.connections() > 0
                {
                    return None;
                }
                let last = e.activity.last_active_ms.load(Ordering::Relaxed);
                let idle = Duration::from_millis(now_ms.saturating_sub(last));
                (idle >= limit).then(|| (id.clone(), idle))
            })
            .collect()
    }

    /// Writes changed activity stamps to the records, so a restart keeps them.
    pub fn flush_activity(&self) {
        let dirty: Vec<BranchRecord> = {
            let mut map = self.lock();
            map.values_mut()
                .filter(|e| matches!(e.phase, Phase::Ready | Phase::Suspended))
                .filter(|e| e.activity.dirty.swap(false, Ordering::Relaxed))
                .map(|e| {
                    e.record.last_active = e.activity.last_active_ms.load(Ordering::Relaxed);
                    e.record.clone()
                })
                .collect()
        };
        for rec in dirty {
            if let Err(e) = self.store.save(&rec) {
                warn!(branch = %rec.id(), error = %e, "could not save activity");
            }
        }
    }

    /// Branches of `source` made (or being made) from snapshot `name`.
    pub fn snapshot_users(&self, source: &SourceName, name: &str) -> Vec<String> {
        let map = self.lock();
        map.iter()
            .filter(|(id, e)| &id.source == source && e.record.snapshot.as_deref() == Some(name))
            .map(|(id, _)| id.branch.to_string())
            .collect()
    }

    pub fn view(&self, id: &BranchId) -> Option<BranchView> {
        let map = self.lock();
        map.get(id).map(|e| self.view_of(e))
    }

    fn view_of(&self, e: &Entry) -> BranchView {
        BranchView {
            source: e.record.source.to_string(),
            branch: e.record.branch.to_string(),
            state: e.phase,
            engine: e.record.engine,
            clone_name: e.record.clone_name.clone(),
            created_at: rfc3339(e.record.created_at),
            last_active: rfc3339(e.activity.last_active_ms.load(Ordering::Relaxed)),
            connections: e.activity.connections(),
            persistent: self.is_persistent(&e.record),
            created_by: e.record.created_by.clone(),
            snapshot: e.record.snapshot.clone(),
            copy_mode: e.record.copy_mode,
        }
    }

    pub fn list(&self) -> Vec<BranchView> {
        let map = self.lock();
        map.values().map(|e| self.view_of(e)).collect()
    }

    pub fn orphans(&self) -> Vec<Orphan> {
        self.orphans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-adopts every recorded branch after a start, settles interrupted creations,
    /// and reports what no record explains. Errors reaching a server are logged; the
    /// records stay and are trusted.
    pub async fn adopt(&self) -> std::io::Result<()> {
        let (records, unreadable) = self.store.load_all()?;
        let mut orphans: Vec<Orphan> = unreadable
            .into_iter()
            .map(|(path, why)| {
                warn!(path = %path.display(), reason = %why, "unreadable branch record left in place");
                Orphan {
                    source: None,
                    location: path.display().to_string(),
                    reason: format!("unreadable record: {why}"),
                }
            })
            .collect();
        let mut adopted = Vec::new();
        for mut rec in records {
            let id = rec.id();
            let Some(source) = self.sources.get(&rec.source) else {
                warn!(branch = %id, "record of a source no longer configured; left in place");
                orphans.push(Orphan {
                    source: Some(rec.source.to_string()),
                    location: rec.clone_name.clone(),
                    reason: "source is no longer configured".into(),
                });
                continue;
            };
            let keep = match rec.state {
                RecordState::Provisioning => match source.engine.recover(&rec).await {
                    Ok(Recovered::Complete) => {
                        info!(branch = %id, "finished a creation interrupted by a restart");
                        rec.state = RecordState::Ready;
                        self.store.save(&rec)?;
                        true
                    }
                    Ok(Recovered::Absent) => {
                        info!(branch = %id, "dropping the record of a creation that never finished");
                        self.store.remove(&id)?;
                        false
                    }
                    Err(e) => {
                        warn!(branch = %id, error = %e, "cannot settle an interrupted creation; record left in place");
                        orphans.push(Orphan {
                            source: Some(rec.source.to_string()),
                            location: rec.clone_name.clone(),
                            reason: format!("interrupted creation not settled: {e}"),
                        });
                        false
                    }
                },
                RecordState::Ready => match source.engine.exists(&rec).await {
                    Ok(true) => true,
                    Ok(false) => {
                        warn!(branch = %id, clone = %rec.clone_name, "clone vanished outside the proxy; forgetting it");
                        self.store.remove(&id)?;
                        false
                    }
                    Err(e) => {
                        warn!(branch = %id, error = %e, "cannot check clone; keeping its record");
                        true
                    }
                },
            };
            if !keep {
                continue;
            }
            // A server a killed proxy left running is reused; otherwise the branch
            // waits, suspended, for its next connection.
            let running = if let Some(servers) = source.engine.servers() {
                match servers.running(&rec).await {
                    Ok(r) => r,
                    Err(e) => {
                        warn!(branch = %id, error = %e, "cannot tell whether the branch's server runs; treating it as suspended");
                        false
                    }
                }
            } else {
                true
            };
            adopted.push((rec, running));
        }
        // Marked clones no record explains (e.g. records deleted by hand).
        let known: HashSet<(String, String)> = adopted
            .iter()
            .map(|(r, _)| (r.source.to_string(), r.clone_name.clone()))
            .collect();
        for src in self.sources.values() {
            for (location, reason) in src.engine.strays().await {
                warn!(source = %src.name, location = %location, reason = %reason, "unexplained entry in the engine's storage; left in place");
                orphans.push(Orphan {
                    source: Some(src.name.to_string()),
                    location,
                    reason,
                });
            }
            match src.engine.list_marked().await {
                Ok(marked) => {
                    for (clone, owner) in marked {
                        let owner_source = owner.split('/').next().unwrap_or_default();
                        if owner_source == src.name.as_str()
                            && !known.contains(&(src.name.to_string(), clone.clone()))
                        {
                            warn!(source = %src.name, clone = %clone, "marked clone without a record; left in place");
                            orphans.push(Orphan {
                                source: Some(src.name.to_string()),
                                location: clone,
                                reason: format!("marked as {owner} but has no record"),
                            });
                        }
                    }
                }
                Err(e) => warn!(source = %src.name, error = %e, "cannot list clones on the server"),
            }
        }
        let n = adopted.len();
        let mut map = self.lock();
        for (rec, running) in adopted {
            let activity = Arc::new(Activity::new(rec.last_active));
            map.insert(
                rec.id(),
                Entry {
                    phase: if running {
                        Phase::Ready
                    } else {
                        Phase::Suspended
                    },
                    waiter: None,
                    record: rec,
                    activity,
                },
            );
        }
        self.refresh_gauges(&map);
        drop(map);
        info!(branches = n, orphans = orphans.len(), "branches adopted");
        *self.orphans.lock().unwrap_or_else(|p| p.into_inner()) = orphans;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeSet;
    use std::sync::atomic::AtomicUsize;

    use async_trait::async_trait;

    use super::*;
    use crate::branch::engine::{CopyMode, Made, ServerAddr, Servers};
    use crate::config::SourceConfig;

    /// An engine that keeps its "clones" in a set: for the registry's own logic only.
    /// With `servers`, each clone has a "server" (in `running`) that can be stopped
    /// and started, like the `instance` engine's.
    #[derive(Default)]
    pub struct FakeEngine {
        pub clones: Mutex<BTreeSet<String>>,
        pub creates: AtomicUsize,
        pub fail_with: Mutex<Option<String>>,
        pub delay: Duration,
        pub servers: bool,
        pub running: Mutex<BTreeSet<String>>,
        pub starts: AtomicUsize,
        pub stops: AtomicUsize,
        pub start_delay: Duration,
        pub fail_start: Mutex<Option<String>>,
    }

    #[async_trait]
    impl Engine for FakeEngine {
        fn clone_name(&self, id: &BranchId) -> String {
            format!("{}__{}", id.source, id.branch)
        }
        async fn create(&self, rec: &BranchRecord) -> Result<Made, EngineError> {
            self.creates.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            if let Some(msg) = self.fail_with.lock().unwrap().clone() {
                return Err(EngineError::failed(msg));
            }
            self.clones.lock().unwrap().insert(rec.clone_name.clone());
            Ok(Made {
                snapshot: Some(rec.snapshot.clone().unwrap_or_else(|| "s1".into())),
                copy_mode: self.servers.then_some(CopyMode::Copy),
            })
        }
        fn servers(&self) -> Option<&dyn Servers> {
            self.servers.then_some(self as &dyn Servers)
        }
        async fn recover(&self, rec: &BranchRecord) -> Result<Recovered, EngineError> {
            Ok(if self.clones.lock().unwrap().contains(&rec.clone_name) {
                Recovered::Complete
            } else {
                Recovered::Absent
            })
        }
        async fn exists(&self, rec: &BranchRecord) -> Result<bool, EngineError> {
            Ok(self.clones.lock().unwrap().contains(&rec.clone_name))
        }
        async fn destroy(&self, rec: &BranchRecord, _force: bool) -> Result<(), EngineError> {
            self.running.lock().unwrap().remove(&rec.clone_name);
            self.clones.lock().unwrap().remove(&rec.clone_name);
            Ok(())
        }
        fn endpoint(&self, rec: &BranchRecord) -> Endpoint {
            Endpoint {
                addr: ServerAddr::Tcp {
                    host: "127.0.0.1".into(),
                    port: 1,
                },
                database: rec.clone_name.clone(),
            }
        }
        async fn list_marked(&self) -> Result<Vec<(String, String)>, EngineError> {
            Ok(vec![])
        }
    }

    #[async_trait]
    impl Servers for FakeEngine {
        async fn start(&self, rec: &BranchRecord) -> Result<(), EngineError> {
            self.starts.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.start_delay).await;
            if let Some(msg) = self.fail_start.lock().unwrap().clone() {
                return Err(EngineError::failed(msg));
            }
            self.running.lock().unwrap().insert(rec.clone_name.clone());
            Ok(())
        }
        async fn stop(&self, rec: &BranchRecord) -> Result<(), EngineError> {
            self.stops.fetch_add(1, Ordering::SeqCst);
            self.running.lock().unwrap().remove(&rec.clone_name);
            Ok(())
        }
        async fn running(&self, rec: &BranchRecord) -> Result<bool, EngineError> {
            Ok(self.running.lock().unwrap().contains(&rec.clone_name))
        }
    }

    pub fn id(b: &str) -> BranchId {
        BranchId {
            source: SourceName::new("shop").unwrap(),
            branch: BranchName::new(b).unwrap(),
        }
    }

    pub fn registry(
        engine: Arc<FakeEngine>,
        config: SourceConfig,
        dir: &std::path::Path,
    ) -> Arc<Registry> {
        let source = Source::new(SourceName::new("shop").unwrap(), config, engine);
        Arc::new(Registry::new(
            vec![source],
            Store::open(dir).unwrap(),
            Arc::new(Metrics::new()),
        ))
    }

    const WAIT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn concurrent_acquires_share_one_creation() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(FakeEngine {
            delay: Duration::from_millis(50),
            ..Default::default()
        });
        let reg = registry(engine.clone(), SourceConfig::default(), dir.path());
        let leases: Vec<_> = (0..20)
            .map(|_| {
                let reg = reg.clone();
                tokio::spawn(async move { reg.acquire(&id("a"), WAIT).await.map(|_| ()) })
            })
            .collect();
        for l in leases {
            l.await.unwrap().unwrap();
        }
        assert_eq!(engine.creates.load(Ordering::SeqCst), 1);
        assert_eq!(reg.list().len(), 1);
        assert_eq!(reg.list()[0].state, Phase::Ready);
    }

    #[tokio::test]
    async fn failures_reach_every_waiter_and_leave_no_record() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(FakeEngine {
            delay: Duration::from_millis(20),
            ..Default::default()
        });
        *engine.fail_with.lock().unwrap() = Some("disk full".into());
        let reg = registry(engine.clone(), SourceConfig::default(), dir.path());
        let x = id("x");
        let (a, b) = tokio::join!(reg.acquire(&x, WAIT), reg.acquire(&x, WAIT));
        for r in [a, b] {
            let Err(e) = r else { panic!("should fail") };
            assert!(e.to_string().contains("disk full"), "{e}");
        }
        assert_eq!(engine.creates.load(Ordering::SeqCst), 1);
        assert!(reg.list().is_empty());
        assert!(Store::open(dir.path())
            .unwrap()
            .load_all()
            .unwrap()
            .0
            .is_empty());
        // The next attempt tries again.
        *engine.fail_with.lock().unwrap() = None;
        reg.acquire(&id("x"), WAIT).await.map(|_| ()).unwrap();
        assert_eq!(engine.creates.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn quota_counts_every_branch_of_the_source() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(FakeEngine::default());
        let config = SourceConfig {
            max_branches: 2,
            ..Default::default()
        };
        let reg = registry(engine, config, dir.path());
        reg.acquire(&id("a"), WAIT).await.map(|_| ()).unwrap();
        reg.acquire(&id("b"), WAIT).await.map(|_| ()).unwrap();
        let Err(e) = reg.acquire(&id("c"), WAIT).await else {
            panic!("over quota")
        };
        assert!(matches!(e, ProvisionError::Quota { limit: 2, .. }), "{e}");
        // Existing branches are still served.
        reg.acquire(&id("a"), WAIT).await.map(|_| ()).unwrap();
    }

    #[tokio::test]
    async fn deletion_waits_for_connections_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(FakeEngine::default());
        let reg = registry(engine.clone(), SourceConfig::default(), dir.path());
        let lease = reg.acquire(&id("d"), WAIT).await.unwrap();
        let err = reg
            .delete(&id("d"), false, RemoveReason::Api)
            .await
            .unwrap_err();
        assert!(matches!(err, DeleteError::InUse { conns: 1, .. }), "{err}");
        drop(lease);
        reg.delete(&id("d"), false, RemoveReason::Api)
            .await
            .unwrap();
        assert!(engine.clones.lock().unwrap().is_empty());
        let _lease = reg.acquire(&id("d"), WAIT).await.unwrap();
        reg.delete(&id("d"), true, RemoveReason::Api).await.unwrap();
        assert!(reg.list().is_empty());
    }

    #[tokio::test]
    async fn a_restart_adopts_ready_and_settles_provisioning_records() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(FakeEngine::default());
        {
            let reg = registry(engine.clone(), SourceConfig::default(), dir.path());
            reg.acquire(&id("kept"), WAIT).await.map(|_| ()).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let mut rec = store.load_all().unwrap().0.remove(0);
        rec.branch = BranchName::new("lost").unwrap();
        rec.clone_name = "shop__lost".into();
        rec.state = RecordState::Provisioning;
        store.save(&rec).unwrap();

        let reg = registry(engine, SourceConfig::default(), dir.path());
        reg.adopt().await.unwrap();
        let names: Vec<String> = reg.list().into_iter().map(|b| b.branch).collect();
        assert_eq!(names, vec!["kept".to_string()]);
        assert_eq!(store.load_all().unwrap().0.len(), 1);
    }

    fn with_servers() -> FakeEngine {
        FakeEngine {
            servers: true,
            start_delay: Duration::from_millis(30),
            ..Default::default()
        }
    }

    fn phase(reg: &Registry, b: &str) -> Phase {
        reg.view(&id(b)).expect("branch exists").state
    }

    #[tokio::test]
    async fn creation_starts_the_server_and_suspension_stops_it() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(with_servers());
        let reg = registry(engine.clone(), SourceConfig::default(), dir.path());
        let lease = reg.acquire(&id("a"), WAIT).await.unwrap();
        assert_eq!(phase(&reg, "a"), Phase::Ready);
        assert_eq!(engine.starts.load(Ordering::SeqCst), 1);
        let view = reg.view(&id("a")).unwrap();
        assert_eq!(view.snapshot.as_deref(), Some("s1"));
        assert_eq!(view.copy_mode, Some(CopyMode::Copy));
        // Never while a connection is open.
        assert!(!reg.suspend(&id("a")).await.unwrap());
        drop(lease);
        assert!(reg.suspend(&id("a")).await.unwrap());
        assert_eq!(phase(&reg, "a"), Phase::Suspended);
        assert!(engine.running.lock().unwrap().is_empty());
        // Suspending twice is a no-op.
        assert!(!reg.suspend(&id("a")).await.unwrap());
        assert_eq!(engine.stops.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn concurrent_connections_to_a_suspended_branch_share_one_start() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(with_servers());
        let reg = registry(engine.clone(), SourceConfig::default(), dir.path());
        drop(reg.acquire(&id("a"), WAIT).await.unwrap());
        reg.suspend(&id("a")).await.unwrap();
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let reg = reg.clone();
                tokio::spawn(async move { reg.acquire(&id("a"), WAIT).await.map(|_| ()) })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(phase(&reg, "a"), Phase::Starting);
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(
            engine.starts.load(Ordering::SeqCst),
            2,
            "create + one resume"
        );
        assert_eq!(engine.creates.load(Ordering::SeqCst), 1);
        assert_eq!(phase(&reg, "a"), Phase::Ready);
    }

    #[tokio::test]
    async fn a_failed_resume_reaches_the_waiters_and_keeps_the_branch_suspended() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(with_servers());
        let reg = registry(engine.clone(), SourceConfig::default(), dir.path());
        drop(reg.acquire(&id("a"), WAIT).await.unwrap());
        reg.suspend(&id("a")).await.unwrap();
        *engine.fail_start.lock().unwrap() = Some("bad setting".into());
        let Err(e) = reg.acquire(&id("a"), WAIT).await else {
            panic!("start should fail")
        };
        assert!(matches!(e, ProvisionError::Start { .. }), "{e}");
        assert!(e.to_string().contains("bad setting"), "{e}");
        assert_eq!(phase(&reg, "a"), Phase::Suspended);
        *engine.fail_start.lock().unwrap() = None;
        reg.acquire(&id("a"), WAIT).await.map(|_| ()).unwrap();
        assert_eq!(phase(&reg, "a"), Phase::Ready);
    }

    #[tokio::test]
    async fn a_failed_first_start_removes_the_clone_and_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(with_servers());
        *engine.fail_start.lock().unwrap() = Some("bad setting".into());
        let reg = registry(engine.clone(), SourceConfig::default(), dir.path());
        let Err(e) = reg.acquire(&id("a"), WAIT).await else {
            panic!("start should fail")
        };
        assert!(e.to_string().contains("bad setting"), "{e}");
        assert!(reg.list().is_empty());
        assert!(engine.clones.lock().unwrap().is_empty());
        let store = Store::open(dir.path()).unwrap();
        assert!(store.load_all().unwrap().0.is_empty());
    }

    #[tokio::test]
    async fn suspended_branches_expire_but_persistent_ones_only_suspend() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(with_servers());
        let config = SourceConfig {
            idle_expire: Some(Duration::from_secs(600)),
            suspend_after: Some(Duration::from_secs(60)),
            persistent: vec!["qa".into()],
            ..Default::default()
        };
        let reg = registry(engine.clone(), config, dir.path());
        for b in ["a", "qa"] {
            drop(reg.acquire(&id(b), WAIT).await.unwrap());
        }
        let now = SystemTime::now();
        assert!(reg.suspend_candidates(now).is_empty());
        let later = now + Duration::from_secs(61);
        let mut ids: Vec<_> = reg
            .suspend_candidates(later)
            .into_iter()
            .map(|c| c.0)
            .collect();
        ids.sort();
        assert_eq!(ids, vec![id("a"), id("qa")]);
        for i in &ids {
            assert!(reg.suspend(i).await.unwrap());
        }
        let much_later = now + Duration::from_secs(601);
        let expiring: Vec<_> = reg
            .idle_candidates(much_later)
            .into_iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(expiring, vec![id("a")]);
        reg.delete(&id("a"), false, RemoveReason::Idle)
            .await
            .unwrap();
        assert_eq!(phase(&reg, "qa"), Phase::Suspended);
        assert_eq!(reg.list().len(), 1);
    }

    #[tokio::test]
    async fn a_restart_finds_running_and_stopped_servers() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(with_servers());
        {
            let reg = registry(engine.clone(), SourceConfig::default(), dir.path());
            drop(reg.acquire(&id("up"), WAIT).await.unwrap());
            drop(reg.acquire(&id("down"), WAIT).await.unwrap());
            reg.suspend(&id("down")).await.unwrap();
        }
        let reg = registry(engine.clone(), SourceConfig::default(), dir.path());
        reg.adopt().await.unwrap();
        assert_eq!(phase(&reg, "up"), Phase::Ready);
        assert_eq!(phase(&reg, "down"), Phase::Suspended);
        let view = reg.view(&id("down")).unwrap();
        assert_eq!(view.snapshot.as_deref(), Some("s1"));
        reg.acquire(&id("down"), WAIT).await.map(|_| ()).unwrap();
        assert_eq!(phase(&reg, "down"), Phase::Ready);
    }
}
