//! A fake engine for the registry's unit tests (and the reaper's): "clones" are
//! names in a set, and every slow step can be held at a [`Gate`] so a test can look
//! at the registry mid-flight without sleeping.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use tokio::sync::watch;

use super::{Registry, Source};
use crate::branch::engine::{
    CopyMode, Endpoint, Engine, Made, Recovered, ServerAddr, Servers, SnapshotInfo, Usage,
};
use crate::branch::store::{BranchRecord, Store};
use crate::clock::Clock;
use crate::config::SourceConfig;
use crate::error::EngineError;
use crate::metrics::Metrics;
use crate::names::{BranchId, BranchName, SourceName};

/// A point an engine call stops at while the gate is closed.
pub struct Gate {
    closed: watch::Sender<bool>,
    /// How many calls have reached the gate, ever.
    arrivals: watch::Sender<usize>,
    /// `arrivals` when the gate was last closed.
    since: AtomicUsize,
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            closed: watch::channel(false).0,
            arrivals: watch::channel(0).0,
            since: AtomicUsize::new(0),
        }
    }
}

impl Gate {
    pub fn close(&self) {
        self.since.store(*self.arrivals.borrow(), Ordering::SeqCst);
        self.closed.send_replace(true);
    }

    pub fn open(&self) {
        self.closed.send_replace(false);
    }

    /// Returns once a call has reached the gate since it was closed.
    pub async fn reached(&self) {
        let since = self.since.load(Ordering::SeqCst);
        let mut rx = self.arrivals.subscribe();
        let _ = rx.wait_for(|n| *n > since).await;
    }

    async fn pass(&self) {
        self.arrivals.send_modify(|n| *n += 1);
        let mut rx = self.closed.subscribe();
        let _ = rx.wait_for(|closed| !*closed).await;
    }
}

/// An engine that keeps its "clones" in a set: for the registry's own logic only.
/// With `servers`, each clone has a "server" (in `running`) that can be stopped
/// and started, like the `instance` engine's. With `snapshots` non-empty, creations
/// pick from them (the newest, the last in order, unless one is named); otherwise
/// every clone is made from `s1`.
#[derive(Default)]
pub struct FakeEngine {
    pub clones: Mutex<BTreeSet<String>>,
    pub creates: AtomicUsize,
    pub fail_with: Mutex<Option<String>>,
    /// The next creation panics (a bug in an engine), dropping its outcome unsent.
    pub panic_create: std::sync::atomic::AtomicBool,
    pub servers: bool,
    pub running: Mutex<BTreeSet<String>>,
    pub starts: AtomicUsize,
    pub stops: AtomicUsize,
    pub fail_start: Mutex<Option<String>>,
    pub snapshots: Mutex<BTreeSet<String>>,
    pub snapshot_deletes: AtomicUsize,
    /// Snapshots taken through `take_snapshot`, named `t001`, `t002`, ...
    pub snapshots_taken: AtomicUsize,
    pub fail_snapshot: Mutex<Option<String>>,
    pub create_gate: Gate,
    pub start_gate: Gate,
    pub stop_gate: Gate,
    pub destroy_gate: Gate,
    pub snapshot_gate: Gate,
    /// What `usage` answers for every clone; `None`: it cannot tell.
    pub clone_bytes: Option<u64>,
}

#[async_trait]
impl Engine for FakeEngine {
    fn clone_name(&self, id: &BranchId) -> String {
        format!("{}__{}", id.source, id.branch)
    }
    async fn create(&self, rec: &BranchRecord) -> Result<Made, EngineError> {
        self.creates.fetch_add(1, Ordering::SeqCst);
        let snapshot = {
            let snaps = self.snapshots.lock().unwrap();
            match &rec.snapshot {
                _ if snaps.is_empty() => rec.snapshot.clone().unwrap_or_else(|| "s1".into()),
                Some(want) if snaps.contains(want) => want.clone(),
                Some(want) => {
                    return Err(EngineError::NotFound(format!(
                        "snapshot {want} does not exist"
                    )))
                }
                None => snaps.last().cloned().unwrap_or_default(),
            }
        };
        self.create_gate.pass().await;
        if self.panic_create.swap(false, Ordering::SeqCst) {
            panic!("engine bug");
        }
        if let Some(msg) = self.fail_with.lock().unwrap().clone() {
            return Err(EngineError::failed(msg));
        }
        self.clones.lock().unwrap().insert(rec.clone_name.clone());
        Ok(Made {
            snapshot: Some(snapshot),
            copy_mode: self.servers.then_some(CopyMode::Copy),
            spare: false,
        })
    }
    fn servers(&self) -> Option<&dyn Servers> {
        self.servers.then_some(self as &dyn Servers)
    }
    async fn usage(&self, rec: &BranchRecord) -> Result<Option<Usage>, EngineError> {
        let exists = self.clones.lock().unwrap().contains(&rec.clone_name);
        Ok(self
            .clone_bytes
            .filter(|_| exists)
            .map(|bytes| Usage { bytes, exact: true }))
    }
    async fn recover(&self, rec: &BranchRecord) -> Result<Recovered, EngineError> {
        Ok(if self.clones.lock().unwrap().contains(&rec.clone_name) {
            Recovered::Complete {
                snapshot: None,
                copy_mode: None,
            }
        } else {
            Recovered::Absent
        })
    }
    async fn exists(&self, rec: &BranchRecord) -> Result<bool, EngineError> {
        Ok(self.clones.lock().unwrap().contains(&rec.clone_name))
    }
    async fn destroy(&self, rec: &BranchRecord, _force: bool) -> Result<(), EngineError> {
        self.destroy_gate.pass().await;
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
    async fn snapshots(&self) -> Result<Vec<SnapshotInfo>, EngineError> {
        Ok(self
            .snapshots
            .lock()
            .unwrap()
            .iter()
            .map(|name| SnapshotInfo {
                name: name.clone(),
                created_at: String::new(),
                origin: "fake".into(),
                size_bytes: 0,
                branches: vec![],
                progress: None,
            })
            .collect())
    }
    async fn take_snapshot(&self) -> Result<SnapshotInfo, EngineError> {
        if let Some(msg) = self.fail_snapshot.lock().unwrap().clone() {
            return Err(EngineError::failed(msg));
        }
        let n = self.snapshots_taken.fetch_add(1, Ordering::SeqCst) + 1;
        // Named to sort after any snapshot a test put in by hand.
        let name = format!("t{n:03}");
        self.snapshots.lock().unwrap().insert(name.clone());
        Ok(SnapshotInfo {
            name,
            created_at: String::new(),
            origin: "fake".into(),
            size_bytes: 0,
            branches: vec![],
            progress: None,
        })
    }
    async fn delete_snapshot(&self, name: &str) -> Result<(), EngineError> {
        self.snapshot_deletes.fetch_add(1, Ordering::SeqCst);
        self.snapshot_gate.pass().await;
        if self.snapshots.lock().unwrap().remove(name) {
            Ok(())
        } else {
            Err(EngineError::NotFound(format!(
                "snapshot {name} does not exist"
            )))
        }
    }
}

#[async_trait]
impl Servers for FakeEngine {
    async fn start(&self, rec: &BranchRecord) -> Result<(), EngineError> {
        self.starts.fetch_add(1, Ordering::SeqCst);
        self.start_gate.pass().await;
        if let Some(msg) = self.fail_start.lock().unwrap().clone() {
            return Err(EngineError::failed(msg));
        }
        self.running.lock().unwrap().insert(rec.clone_name.clone());
        Ok(())
    }
    async fn stop(&self, rec: &BranchRecord) -> Result<(), EngineError> {
        self.stops.fetch_add(1, Ordering::SeqCst);
        self.stop_gate.pass().await;
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

/// A manual clock at a fixed start (2023-11-14T22:13:20Z).
pub fn clock() -> Clock {
    Clock::manual(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
}

/// A registry of one source, `shop`, on `engine`, with records under `dir`, on a
/// manual clock of its own.
pub fn registry(engine: Arc<FakeEngine>, config: SourceConfig, dir: &Path) -> Arc<Registry> {
    registry_on(engine, config, dir, clock())
}

/// [`registry`] on the given clock.
pub fn registry_on(
    engine: Arc<FakeEngine>,
    config: SourceConfig,
    dir: &Path,
    clock: Clock,
) -> Arc<Registry> {
    let source = Source::new(SourceName::new("shop").unwrap(), config, engine);
    Arc::new(Registry::new(
        vec![source],
        Store::open(dir).unwrap(),
        Arc::new(Metrics::new()),
        clock,
    ))
}
