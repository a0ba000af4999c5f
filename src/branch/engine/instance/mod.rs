//! The `instance` engine: every branch is a PostgreSQL instance of its own, running
//! on a copy-on-write copy of a sealed snapshot of the source's data directory.
//!
//! Storage (`sources.<name>.storage`, default `<state.dir>/instances/<source>`) is
//! laid out as [`layout`] describes; [`snapshots`] takes and seals snapshots;
//! [`server`] runs a branch's server; [`copy`] copies data directories,
//! [`postmaster`] watches one server and [`usage`] measures a branch's own bytes;
//! [`spares`] keeps warm spares a new branch takes ready-made.
//!
//! Invariant: a branch directory is removed only if its `branch.json` names that
//! branch of this source; anything else under `branches/` is reported, never
//! deleted.

mod copy;
mod layout;
pub mod postmaster;
pub mod privileged;
mod server;
mod snapshots;
mod spares;
mod usage;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::{Mutex, RwLock};
use tracing::{info, warn};

use self::copy::{copy_tree, CopyPlan};
use self::layout::{BranchMeta, Layout, BRANCH_DIR_MODE, BRANCH_META};
use self::privileged::remove_tree;
pub use self::snapshots::Origin;
pub use self::spares::SpareSessions;
use super::{CopyMode, Endpoint, Engine, Made, Recovered, ServerAddr, Servers, SnapshotInfo};
use crate::branch::store::{unix_ms, BranchRecord};
use crate::clock::Clock;
use crate::config::InstanceConfig;
use crate::error::EngineError;
use crate::fsutil::{read_json, sync_dir, write_json_atomic};
use crate::names::{BranchId, SourceName};
use crate::pg::PgBin;

pub struct InstanceEngine {
    source: SourceName,
    /// The database clients of a branch land on.
    database: String,
    origin: Origin,
    bin: PgBin,
    layout: Layout,
    /// Sizes and `-c` settings of branch servers.
    config: InstanceConfig,
    /// Snapshot names and metadata times.
    clock: Clock,
    /// Shared while cloning from a snapshot, exclusive while deleting one.
    snapshot_lock: RwLock<()>,
    /// One snapshot is taken at a time.
    taking: Mutex<()>,
    /// Whether the storage shares blocks, learnt from the first copy.
    mode: std::sync::Mutex<Option<CopyMode>>,
    /// `snapshot_transform`: run on each new snapshot's server before it is sealed.
    transforms: Vec<super::transform::Transform>,
    /// The snapshot being taken, for the API.
    progress: super::progress::Tracker,
    /// Warm spares (`warm_spares`).
    spares: spares::Spares,
}

/// Creates the directory of a clone (a branch or a warm spare), which must not
/// exist, with the mode that lets the server's user only pass through it.
fn create_clone_dir(dir: &Path) -> std::io::Result<()> {
    fs::create_dir(dir)?;
    fs::set_permissions(
        dir,
        std::os::unix::fs::PermissionsExt::from_mode(BRANCH_DIR_MODE),
    )
}

/// A blocking task that panicked or was cancelled.
fn join_failed(e: tokio::task::JoinError) -> EngineError {
    EngineError::failed_with("a copy task of the engine died", e)
}

impl InstanceEngine {
    /// Opens (creating) the source's storage and clears what an interrupted snapshot
    /// left. Blocking.
    pub fn open(
        source: SourceName,
        database: String,
        config: InstanceConfig,
        origin: Origin,
        bin: PgBin,
        root: PathBuf,
        clock: Clock,
    ) -> anyhow::Result<Self> {
        // A socket path is at most 107 bytes: `<root>/run/<32 hex>/.s.PGSQL.5432`.
        let longest = root.as_os_str().len() + "/run/".len() + 32 + "/.s.PGSQL.5432".len();
        if longest > 107 {
            anyhow::bail!(
                "sources.{source}.storage: {} is too long for the branch servers' Unix sockets \
                 (at most {} bytes); choose a shorter path",
                root.display(),
                107 - (longest - root.as_os_str().len())
            );
        }
        for sub in ["snapshots", "branches", "run"] {
            fs::create_dir_all(root.join(sub))?;
        }
        let engine = Self {
            database,
            source,
            origin,
            bin,
            layout: Layout { root },
            clock,
            snapshot_lock: RwLock::new(()),
            taking: Mutex::new(()),
            mode: std::sync::Mutex::new(None),
            transforms: Vec::new(),
            progress: Default::default(),
            spares: spares::Spares::new(config.warm_spares),
            config,
        };
        engine.clear_interrupted_snapshots();
        for dir in engine
            .layout
            .settle_interrupted_creations(engine.source.as_str())
        {
            info!(dir = %dir.display(), "removed what an interrupted creation left");
        }
        Ok(engine)
    }

    /// Where `rec`'s server takes connections.
    fn endpoint_addr(&self, rec: &BranchRecord) -> ServerAddr {
        ServerAddr::Unix(postmaster::socket_path(&self.layout.socket_dir(rec)))
    }

    /// Reads `branch.json` of `rec`'s directory if it names that branch.
    fn own_meta(&self, rec: &BranchRecord) -> Result<Option<BranchMeta>, EngineError> {
        let dir = self.layout.branch_dir(rec);
        if !dir.exists() {
            return Ok(None);
        }
        match read_json::<BranchMeta>(&dir.join(BRANCH_META)) {
            Some(m) if m.source == rec.source.as_str() && m.branch == rec.branch.as_str() => {
                Ok(Some(m))
            }
            _ => Err(EngineError::conflict(
                format!(
                    "the storage already holds a directory for branch {} that the proxy did \
                     not make; it is left alone (see /api/v1/orphans)",
                    rec.id()
                ),
                Some(dir.display().to_string()),
            )),
        }
    }

    /// Whether the next copy should try reflinks (not once the storage is known to
    /// have none).
    fn try_reflink(&self) -> bool {
        *self.mode.lock().unwrap_or_else(|p| p.into_inner()) != Some(CopyMode::Copy)
    }

    /// Notes the mode a copy used; warns the first time it was a plain copy.
    fn learn_mode(&self, mode: CopyMode) {
        let before = self
            .mode
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(mode);
        if before != Some(mode) && mode == CopyMode::Copy {
            warn!(
                source = %self.source,
                storage = %self.layout.root.display(),
                "this filesystem has no reflinks: every clone copies all of the snapshot's \
                 bytes; put the storage on XFS or Btrfs for clones that cost milliseconds"
            );
        }
    }

    /// Copies snapshot `snapshot`'s data directory to `dir/data` (reflinks where
    /// the filesystem has them), given to the server's user, and learns the copy
    /// mode. `io` words a failed copy.
    async fn copy_snapshot_data(
        &self,
        snapshot: &str,
        dir: &Path,
        io: impl FnOnce(std::io::Error) -> EngineError,
    ) -> Result<CopyMode, EngineError> {
        let from = self.layout.snapshot_dir(snapshot).join("data");
        let to = dir.join("data");
        let owner = self.bin.owner();
        let try_reflink = self.try_reflink();
        let mode = tokio::task::spawn_blocking(move || {
            copy_tree(&CopyPlan {
                from: &from,
                to: &to,
                try_reflink,
                owner,
                follow_links: false,
                skip: &["postmaster.pid"],
            })
        })
        .await
        .map_err(join_failed)?
        .map_err(io)?;
        self.learn_mode(mode);
        Ok(mode)
    }

    /// Builds the clone of `rec` in `dir` (which must not exist): `branch.json`
    /// first, so the directory is provably the proxy's, then the copy.
    async fn make_clone(
        &self,
        rec: &BranchRecord,
        dir: &Path,
        snapshot: &str,
    ) -> Result<CopyMode, EngineError> {
        // The branch directory stays the proxy's (the server's user may only pass
        // through it): branch.json and postgres.log live where that user cannot
        // plant links. Only data/ is given to it, by the copy.
        let io = |e| EngineError::io(format!("could not copy snapshot {snapshot}"), e);
        create_clone_dir(dir).map_err(io)?;
        let mut meta = BranchMeta {
            source: rec.source.to_string(),
            branch: rec.branch.to_string(),
            snapshot: snapshot.to_owned(),
            complete: false,
            copy_mode: None,
            created_at: unix_ms(self.clock.now()),
        };
        let meta_path = dir.join(BRANCH_META);
        write_json_atomic(&meta_path, &meta).map_err(io)?;
        let mode = self.copy_snapshot_data(snapshot, dir, io).await?;
        meta.complete = true;
        meta.copy_mode = Some(mode);
        write_json_atomic(&meta_path, &meta).map_err(io)?;
        Ok(mode)
    }
}

#[async_trait]
impl Engine for InstanceEngine {
    fn clone_name(&self, id: &BranchId) -> String {
        id.branch.to_string()
    }

    async fn create(&self, rec: &BranchRecord) -> Result<Made, EngineError> {
        let dir = self.layout.branch_dir(rec);
        match self.own_meta(rec)? {
            None => {}
            Some(m) if !m.complete => {
                // Left by a creation that failed or was killed: ours, and unusable.
                remove_tree(&dir)?;
            }
            Some(_) => {
                return Err(EngineError::conflict(
                    format!(
                        "a clone for branch {} already exists without a record; see \
                         /api/v1/orphans",
                        rec.id()
                    ),
                    Some(dir.display().to_string()),
                ))
            }
        }
        // Left by an earlier failed creation of this branch (one creation of a branch
        // runs at a time).
        let staging = self.layout.staging_dir(rec);
        remove_tree(&staging)
            .map_err(|e| EngineError::io("could not clear an earlier creation", e))?;
        let (snapshot, _in_use) = self.pick_snapshot(rec.snapshot.as_deref()).await?;
        if let Some(mode) = self.claim_spare(rec, &snapshot).await {
            return Ok(Made {
                snapshot: Some(snapshot),
                copy_mode: Some(mode),
                spare: true,
            });
        }
        let started = self.clock.instant();
        let made = match self.make_clone(rec, &staging, &snapshot).await {
            // Claim the branch's name in one rename: its directory appears complete
            // or not at all, whenever a crash comes.
            Ok(mode) => fs::rename(&staging, &dir)
                .and_then(|()| sync_dir(&self.layout.branches()))
                .map(|()| mode)
                .map_err(|e| EngineError::io(format!("could not claim branch {}", rec.id()), e)),
            Err(e) => Err(e),
        };
        match made {
            Ok(mode) => {
                info!(branch = %rec.id(), snapshot = %snapshot, mode = mode.as_str(),
                      ms = started.elapsed().as_millis() as u64, "clone made");
                Ok(Made {
                    snapshot: Some(snapshot),
                    copy_mode: Some(mode),
                    spare: false,
                })
            }
            Err(e) => {
                if let Err(rm) = remove_tree(&staging) {
                    warn!(dir = %staging.display(), error = %rm, "cannot remove a failed clone");
                }
                Err(e)
            }
        }
    }

    async fn recover(&self, rec: &BranchRecord) -> Result<Recovered, EngineError> {
        match self.own_meta(rec)? {
            None => Ok(Recovered::Absent),
            Some(m) if m.complete => Ok(Recovered::Complete {
                snapshot: Some(m.snapshot),
                copy_mode: m.copy_mode,
            }),
            Some(_) => {
                remove_tree(&self.layout.branch_dir(rec))?;
                Ok(Recovered::Absent)
            }
        }
    }

    async fn usage(&self, rec: &BranchRecord) -> Result<Option<super::Usage>, EngineError> {
        let data = self.layout.branch_dir(rec).join("data");
        match usage::usage(&data).await {
            Ok(u) => Ok(Some(u)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(EngineError::io("could not measure the branch's data", e)),
        }
    }

    async fn exists(&self, rec: &BranchRecord) -> Result<bool, EngineError> {
        Ok(self.own_meta(rec)?.is_some_and(|m| m.complete))
    }

    async fn destroy(&self, rec: &BranchRecord, _force: bool) -> Result<(), EngineError> {
        // The registry lets a deletion through only with no session (or forced), and
        // a fast shutdown ends whatever sessions remain.
        if self.own_meta(rec)?.is_none() {
            return Ok(());
        }
        let dir = self.layout.branch_dir(rec);
        let socket_dir = self.layout.socket_dir(rec);
        postmaster::stop(&dir.join("data"), &socket_dir).await?;
        remove_tree(&dir)?;
        remove_tree(&socket_dir)?;
        Ok(())
    }

    fn endpoint(&self, rec: &BranchRecord) -> Endpoint {
        Endpoint {
            addr: self.endpoint_addr(rec),
            database: self.database.clone(),
        }
    }

    async fn list_marked(&self) -> Result<Vec<(String, String)>, EngineError> {
        Ok(self
            .layout
            .all_branch_meta(self.source.as_str())
            .into_iter()
            .map(|m| (m.branch.clone(), format!("{}/{}", m.source, m.branch)))
            .collect())
    }

    fn servers(&self) -> Option<&dyn Servers> {
        Some(self)
    }

    async fn strays(&self) -> Vec<(String, String)> {
        self.layout.strays(self.source.as_str())
    }

    async fn snapshots(&self) -> Result<Vec<SnapshotInfo>, EngineError> {
        let users = self.layout.all_branch_meta(self.source.as_str());
        Ok(self
            .layout
            .snapshot_metas()
            .iter()
            .map(|m| self.info(m, &users))
            .collect())
    }

    fn snapshot_in_progress(&self) -> Option<SnapshotInfo> {
        self.progress.current()
    }

    async fn take_snapshot(&self) -> Result<SnapshotInfo, EngineError> {
        let _one = self.taking.lock().await;
        let meta = self.take_locked().await?;
        Ok(self.info(&meta, &[]))
    }

    async fn delete_snapshot(&self, name: &str) -> Result<(), EngineError> {
        self.delete_unused_snapshot(name).await
    }

    fn copy_mode(&self) -> Option<CopyMode> {
        *self.mode.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn source_label(&self) -> String {
        self.source.to_string()
    }
}

/// Builds the engine of an `instance` source, with its snapshot transforms.
/// Blocking (it may clear leftovers).
#[allow(clippy::too_many_arguments)]
pub fn build(
    name: &SourceName,
    database: &str,
    config: &InstanceConfig,
    embedded_conn: Option<String>,
    bin: PgBin,
    state_dir: &Path,
    clock: Clock,
    transforms: Vec<super::transform::Transform>,
    metrics: &crate::metrics::Metrics,
) -> anyhow::Result<Arc<InstanceEngine>> {
    let origin = match (&config.upstream, &config.data_dir, embedded_conn) {
        (Some(up), _, _) => Origin::Upstream(up.clone()),
        (None, Some(dir), _) => Origin::DataDir(dir.clone()),
        (None, None, Some(conn)) => Origin::Upstream(conn),
        (None, None, None) => {
            anyhow::bail!("sources.{name}: no upstream, data_dir or embedded server")
        }
    };
    let root = match &config.storage {
        Some(dir) => dir.clone(),
        None => state_dir.join("instances").join(name.as_str()),
    };
    let mut engine = InstanceEngine::open(
        name.clone(),
        database.to_owned(),
        config.clone(),
        origin,
        bin,
        root,
        clock,
    )?;
    engine.transforms = transforms;
    engine.spares = spares::Spares::new(config.warm_spares).with_metrics(metrics, name.as_str());
    Ok(Arc::new(engine))
}
