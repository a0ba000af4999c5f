//! The `instance` engine: every branch is a PostgreSQL instance of its own, running
//! on a copy-on-write copy of a sealed snapshot of the source's data directory.
//!
//! Storage (`sources.<name>.storage`, default `<state.dir>/instances/<source>`):
//!
//! ```text
//! snapshots/<name>/data            a sealed data directory (shut down cleanly)
//! snapshots/<name>/snapshot.json   its metadata; a snapshot exists once this does
//! snapshots/.partial-<name>/       a snapshot being taken (removed if interrupted)
//! branches/<branch>/branch.json    ownership and provenance, written first
//! branches/<branch>/data           the clone
//! branches/<branch>/postgres.log   the server's log since its last start
//! run/<hash>/                      the server's private socket directory (0700)
//! ```
//!
//! Invariants:
//! - A branch directory is removed only if its `branch.json` names that branch of this
//!   source; anything else under `branches/` is reported, never deleted.
//! - A snapshot is never changed after it is sealed, and is deleted only when no
//!   `branch.json` names it. Clones read a snapshot under a shared lock and deletions
//!   take it exclusively, so a clone in the making always counts as a user.
//! - Branch servers listen on their socket directory only (`listen_addresses = ''`),
//!   never archive WAL, and keep the snapshot's roles and `pg_hba.conf`.

mod copy;
pub mod postmaster;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, RwLock};
use tracing::{info, warn};

use self::copy::{copy_tree, CopyMode, CopyPlan};
use self::postmaster::{PidState, Server};
use super::{
    snapshot_name, valid_snapshot_name, Endpoint, Engine, Made, Recovered, ServerAddr, Servers,
    SnapshotError, SnapshotInfo,
};
use crate::branch::store::{unix_ms, BranchRecord};
use crate::config::InstanceConfig;
use crate::error::EngineError;
use crate::names::{BranchId, SourceName};
use crate::pg::PgBin;

/// Where a source's snapshots come from.
#[derive(Debug, Clone)]
pub enum Origin {
    /// A running server, copied with `pg_basebackup -X stream`.
    Upstream(String),
    /// A stopped data directory, copied file by file.
    DataDir(PathBuf),
}

impl Origin {
    fn describe(&self) -> String {
        match self {
            // The connection string may hold a password: name only host and port.
            Origin::Upstream(conn) => match conn.parse::<tokio_postgres::Config>() {
                Ok(c) => {
                    let host = match c.get_hosts().first() {
                        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
                        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
                        None => "localhost".into(),
                    };
                    let port = c.get_ports().first().copied().unwrap_or(5432);
                    format!("pg_basebackup of {host}:{port}")
                }
                Err(_) => "pg_basebackup".into(),
            },
            Origin::DataDir(d) => format!("copy of {}", d.display()),
        }
    }
}

/// `branch.json`: written before anything is copied, so the directory is provably
/// the proxy's from its first byte.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct BranchMeta {
    source: String,
    branch: String,
    snapshot: String,
    /// False until every file is copied.
    complete: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    copy_mode: Option<String>,
    created_at: u64,
}

/// `snapshot.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotMeta {
    source: String,
    name: String,
    created_at: u64,
    origin: String,
    size_bytes: u64,
}

const PARTIAL_PREFIX: &str = ".partial-";
const DELETING_PREFIX: &str = ".deleting-";
const PARTIAL_MARKER: &str = "offshoot-partial-snapshot";

/// Reflink support of the storage, learnt from the first clone.
const MODE_UNKNOWN: u8 = 0;
const MODE_REFLINK: u8 = 1;
const MODE_COPY: u8 = 2;

pub struct InstanceEngine {
    source: SourceName,
    /// The database clients of a branch land on.
    database: String,
    origin: Origin,
    bin: PgBin,
    root: PathBuf,
    /// `-c` settings of branch servers (the fixed ones last, so they win).
    config: InstanceConfig,
    /// Shared while cloning from a snapshot, exclusive while deleting one.
    snapshots: RwLock<()>,
    /// One snapshot is taken at a time.
    taking: Mutex<()>,
    mode: AtomicU8,
}

/// Writes `bytes` to `path` atomically (temp file, fsync, rename).
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().expect("file has a parent");
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

fn remove_tree(path: &Path) -> std::io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// FNV-1a, 64 bits: stable across versions, unlike std's hasher.
fn fnv64(text: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

fn err(e: impl std::fmt::Display) -> EngineError {
    EngineError::new(e.to_string())
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
    ) -> anyhow::Result<Self> {
        // A socket path is at most 107 bytes: `<root>/run/<16 hex>/.s.PGSQL.5432`.
        let longest = root.as_os_str().len() + "/run/".len() + 16 + "/.s.PGSQL.5432".len();
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
            root,
            config,
            snapshots: RwLock::new(()),
            taking: Mutex::new(()),
            mode: AtomicU8::new(MODE_UNKNOWN),
        };
        engine.clear_interrupted_snapshots();
        Ok(engine)
    }

    fn branch_dir(&self, rec: &BranchRecord) -> PathBuf {
        self.root.join("branches").join(rec.branch.as_str())
    }

    fn socket_dir(&self, rec: &BranchRecord) -> PathBuf {
        let h = fnv64(&format!("{}/{}", rec.source, rec.branch));
        self.root.join("run").join(format!("{h:016x}"))
    }

    fn snapshot_dir(&self, name: &str) -> PathBuf {
        self.root.join("snapshots").join(name)
    }

    /// Settings of a branch server: size, the source's extras, then what isolation
    /// needs (these win).
    fn branch_settings(&self, socket_dir: &Path, cluster_name: &str) -> Vec<(String, String)> {
        let mut s = vec![
            (
                "shared_buffers".to_owned(),
                self.config.shared_buffers.clone(),
            ),
            (
                "max_connections".to_owned(),
                self.config.max_connections.to_string(),
            ),
        ];
        s.extend(self.config.settings.clone());
        s.extend(self.fixed_settings(socket_dir, cluster_name));
        s
    }

    fn fixed_settings(&self, socket_dir: &Path, cluster_name: &str) -> Vec<(String, String)> {
        [
            ("port", postmaster::PORT.to_string()),
            ("listen_addresses", String::new()),
            ("unix_socket_directories", socket_dir.display().to_string()),
            // A clone must never push WAL into the source's archive.
            ("archive_mode", "off".into()),
            ("logging_collector", "off".into()),
            ("cluster_name", cluster_name.to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    fn server<'a>(
        &'a self,
        data: &'a Path,
        socket_dir: &'a Path,
        log: &'a Path,
        settings: &'a [(String, String)],
    ) -> Server<'a> {
        Server {
            bin: &self.bin,
            data,
            socket_dir,
            log,
            settings,
        }
    }

    /// Reads `branch.json` of `rec`'s directory if it names that branch.
    fn own_meta(&self, rec: &BranchRecord) -> Result<Option<BranchMeta>, EngineError> {
        let dir = self.branch_dir(rec);
        if !dir.exists() {
            return Ok(None);
        }
        match read_json::<BranchMeta>(&dir.join("branch.json")) {
            Some(m) if m.source == rec.source.as_str() && m.branch == rec.branch.as_str() => {
                Ok(Some(m))
            }
            _ => Err(EngineError::new(format!(
                "{} exists but has no offshoot metadata for branch {}; leaving it alone",
                dir.display(),
                rec.id()
            ))),
        }
    }

    /// Every branch directory's metadata (unreadable ones skipped).
    fn all_branch_meta(&self) -> Vec<BranchMeta> {
        let Ok(entries) = fs::read_dir(self.root.join("branches")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| read_json::<BranchMeta>(&e.path().join("branch.json")))
            .filter(|m| m.source == self.source.as_str())
            .collect()
    }

    fn snapshot_metas(&self) -> Vec<SnapshotMeta> {
        let Ok(entries) = fs::read_dir(self.root.join("snapshots")) else {
            return Vec::new();
        };
        let mut list: Vec<SnapshotMeta> = entries
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|e| read_json::<SnapshotMeta>(&e.path().join("snapshot.json")))
            .collect();
        list.sort_by(|a, b| (a.created_at, &a.name).cmp(&(b.created_at, &b.name)));
        list
    }

    fn info(&self, m: &SnapshotMeta, users: &[BranchMeta]) -> SnapshotInfo {
        let ms = std::time::Duration::from_millis(m.created_at);
        let mut branches: Vec<String> = users
            .iter()
            .filter(|b| b.snapshot == m.name)
            .map(|b| b.branch.clone())
            .collect();
        branches.sort();
        SnapshotInfo {
            name: m.name.clone(),
            created_at: humantime::format_rfc3339_millis(SystemTime::UNIX_EPOCH + ms).to_string(),
            origin: m.origin.clone(),
            size_bytes: m.size_bytes,
            branches,
        }
    }

    /// Removes snapshot directories an interrupted `take_snapshot` or deletion left:
    /// provably ours by their prefix and, for partial ones, a marker file.
    fn clear_interrupted_snapshots(&self) {
        let Ok(entries) = fs::read_dir(self.root.join("snapshots")) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            let ours = name.starts_with(DELETING_PREFIX)
                || (name.starts_with(PARTIAL_PREFIX) && path.join(PARTIAL_MARKER).exists());
            if !ours {
                continue;
            }
            // A sealing server a killed proxy left behind is stopped first.
            if let Ok(PidState::Running { pid, .. }) = postmaster::inspect(&path.join("data")) {
                warn!(pid, dir = %path.display(), "stopping the server of an interrupted snapshot");
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGQUIT,
                );
                for _ in 0..2000 {
                    if !matches!(
                        postmaster::inspect(&path.join("data")),
                        Ok(PidState::Running { .. })
                    ) {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            }
            match remove_tree(&path) {
                Ok(()) => info!(dir = %path.display(), "removed an interrupted snapshot"),
                Err(e) => {
                    warn!(dir = %path.display(), error = %e, "cannot remove an interrupted snapshot")
                }
            }
        }
    }

    /// The snapshot to clone: `wanted`, or the newest, taking one if there is none.
    /// Returns it with the shared lock that keeps it from being deleted.
    async fn pick_snapshot(
        &self,
        wanted: Option<&str>,
    ) -> Result<(String, tokio::sync::RwLockReadGuard<'_, ()>), EngineError> {
        loop {
            let guard = self.snapshots.read().await;
            let metas = self.snapshot_metas();
            if let Some(want) = wanted {
                if metas.iter().any(|m| m.name == want) {
                    return Ok((want.to_owned(), guard));
                }
                return Err(EngineError::new(format!(
                    "snapshot {want} of source {} does not exist",
                    self.source
                )));
            }
            if let Some(newest) = metas.last() {
                return Ok((newest.name.clone(), guard));
            }
            drop(guard);
            info!(source = %self.source, "no snapshot yet: taking the first one");
            self.take_snapshot_if_none().await?;
        }
    }

    async fn take_snapshot_if_none(&self) -> Result<(), EngineError> {
        let _one = self.taking.lock().await;
        if self.snapshot_metas().is_empty() {
            self.take_locked().await?;
        }
        Ok(())
    }

    /// Takes and seals a snapshot; the caller holds `taking`.
    async fn take_locked(&self) -> Result<SnapshotMeta, EngineError> {
        let now = SystemTime::now();
        let mut name = snapshot_name(now);
        let mut n = 2;
        while self.snapshot_dir(&name).exists() {
            name = format!("{}-{n}", snapshot_name(now));
            n += 1;
        }
        let partial = self
            .root
            .join("snapshots")
            .join(format!("{PARTIAL_PREFIX}{name}"));
        let started = std::time::Instant::now();
        let result = self.fill_and_seal(&partial, &name, now).await;
        match result {
            Ok(meta) => {
                fs::remove_file(partial.join(PARTIAL_MARKER))?;
                fs::rename(&partial, self.snapshot_dir(&name))?;
                fs::File::open(self.root.join("snapshots"))?.sync_all()?;
                info!(source = %self.source, snapshot = %name, bytes = meta.size_bytes,
                      ms = started.elapsed().as_millis() as u64, "snapshot taken and sealed");
                Ok(meta)
            }
            Err(e) => {
                let data = partial.join("data");
                let _ = postmaster::stop(&data, &self.root.join("run").join(".seal")).await;
                if let Err(rm) = remove_tree(&partial) {
                    warn!(dir = %partial.display(), error = %rm, "cannot remove a failed snapshot");
                }
                Err(e)
            }
        }
    }

    async fn fill_and_seal(
        &self,
        partial: &Path,
        name: &str,
        now: SystemTime,
    ) -> Result<SnapshotMeta, EngineError> {
        fs::create_dir_all(partial)?;
        fs::write(partial.join(PARTIAL_MARKER), self.source.as_str())?;
        self.bin.hand_over(partial).map_err(err)?;
        let data = partial.join("data");
        match &self.origin {
            Origin::Upstream(conn) => {
                let mut cmd = self.bin.command("pg_basebackup");
                cmd.arg("-D")
                    .arg(&data)
                    .args(["-X", "stream", "-c", "fast", "--no-password", "-d"])
                    .arg(conn);
                let out = tokio::process::Command::from(cmd)
                    .output()
                    .await
                    .map_err(|e| EngineError::new(format!("cannot run pg_basebackup: {e}")))?;
                if !out.status.success() {
                    return Err(EngineError::new(format!(
                        "pg_basebackup failed ({}): {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
            }
            Origin::DataDir(dir) => {
                match postmaster::inspect(dir)? {
                    PidState::Running { pid, .. } => {
                        return Err(EngineError::new(format!(
                            "data_dir {} is in use by a running server (pid {pid}); stop it, \
                             or copy from it with `upstream`",
                            dir.display()
                        )))
                    }
                    PidState::Stale | PidState::Absent => {}
                }
                if !dir.join("PG_VERSION").exists() {
                    return Err(EngineError::new(format!(
                        "data_dir {} is not a PostgreSQL data directory",
                        dir.display()
                    )));
                }
                let (from, to, owner) = (dir.clone(), data.clone(), self.bin.owner());
                let try_reflink = self.mode.load(Ordering::Relaxed) != MODE_COPY;
                tokio::task::spawn_blocking(move || {
                    copy_tree(&CopyPlan {
                        from: &from,
                        to: &to,
                        try_reflink,
                        owner,
                        follow_links: true,
                        skip: &["postmaster.pid", "postmaster.opts"],
                    })
                })
                .await
                .map_err(err)??;
            }
        }
        if !data.join("postgresql.conf").exists() {
            // Debian keeps it under /etc; the settings that matter are passed at start.
            fs::write(data.join("postgresql.conf"), "")?;
            self.bin
                .hand_over(&data.join("postgresql.conf"))
                .map_err(err)?;
        }
        if !data.join("pg_hba.conf").exists() {
            return Err(EngineError::new(
                "the copied data directory has no pg_hba.conf (Debian keeps it under \
                 /etc/postgresql); copy it into the data directory first",
            ));
        }
        // Seal: run recovery to its end and shut down cleanly, so clones start
        // without replaying WAL.
        let socket_dir = self.root.join("run").join(".seal");
        let log = partial.join("seal.log");
        let mut settings = vec![
            (
                "shared_buffers".to_owned(),
                self.config.shared_buffers.clone(),
            ),
            (
                "max_connections".to_owned(),
                self.config.max_connections.to_string(),
            ),
        ];
        settings
            .extend(self.fixed_settings(&socket_dir, &format!("offshoot/{}/seal", self.source)));
        let server = self.server(&data, &socket_dir, &log, &settings);
        server
            .start()
            .await
            .map_err(|e| EngineError::new(format!("sealing the snapshot: {e}")))?;
        postmaster::stop(&data, &socket_dir).await?;
        let _ = fs::remove_file(data.join("postmaster.opts"));
        let meta = SnapshotMeta {
            source: self.source.to_string(),
            name: name.to_owned(),
            created_at: unix_ms(now),
            origin: self.origin.describe(),
            size_bytes: copy::tree_size(&data),
        };
        write_atomic(
            &partial.join("snapshot.json"),
            &serde_json::to_vec_pretty(&meta).map_err(err)?,
        )?;
        Ok(meta)
    }

    /// Notes the mode a copy used; warns the first time it was a plain copy.
    fn learn_mode(&self, mode: CopyMode) {
        let code = match mode {
            CopyMode::Reflink => MODE_REFLINK,
            CopyMode::Copy => MODE_COPY,
        };
        if self.mode.swap(code, Ordering::Relaxed) != code && mode == CopyMode::Copy {
            warn!(
                source = %self.source,
                storage = %self.root.display(),
                "this filesystem has no reflinks: every clone copies all of the snapshot's \
                 bytes; put the storage on XFS or Btrfs for clones that cost milliseconds"
            );
        }
    }

    async fn make_clone(
        &self,
        rec: &BranchRecord,
        dir: &Path,
        snapshot: &str,
    ) -> Result<CopyMode, EngineError> {
        fs::create_dir(dir)?;
        fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        self.bin.hand_over(dir).map_err(err)?;
        let mut meta = BranchMeta {
            source: rec.source.to_string(),
            branch: rec.branch.to_string(),
            snapshot: snapshot.to_owned(),
            complete: false,
            copy_mode: None,
            created_at: unix_ms(SystemTime::now()),
        };
        let meta_path = dir.join("branch.json");
        write_atomic(&meta_path, &serde_json::to_vec_pretty(&meta).map_err(err)?)?;
        let from = self.snapshot_dir(snapshot).join("data");
        let to = dir.join("data");
        let owner = self.bin.owner();
        let try_reflink = self.mode.load(Ordering::Relaxed) != MODE_COPY;
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
        .map_err(err)??;
        self.learn_mode(mode);
        meta.complete = true;
        meta.copy_mode = Some(mode.as_str().to_owned());
        write_atomic(&meta_path, &serde_json::to_vec_pretty(&meta).map_err(err)?)?;
        Ok(mode)
    }
}

#[async_trait]
impl Engine for InstanceEngine {
    fn clone_name(&self, id: &BranchId) -> String {
        id.branch.to_string()
    }

    async fn create(&self, rec: &BranchRecord) -> Result<Made, EngineError> {
        let dir = self.branch_dir(rec);
        match self.own_meta(rec)? {
            None => {}
            Some(m) if !m.complete => {
                // Left by a creation that failed or was killed: ours, and unusable.
                remove_tree(&dir)?;
            }
            Some(_) => {
                return Err(EngineError::new(format!(
                    "a clone for branch {} already exists at {} without a record; see \
                     /api/v1/orphans",
                    rec.id(),
                    dir.display()
                )))
            }
        }
        let (snapshot, _in_use) = self.pick_snapshot(rec.snapshot.as_deref()).await?;
        let started = std::time::Instant::now();
        match self.make_clone(rec, &dir, &snapshot).await {
            Ok(mode) => {
                info!(branch = %rec.id(), snapshot = %snapshot, mode = mode.as_str(),
                      ms = started.elapsed().as_millis() as u64, "clone made");
                Ok(Made {
                    snapshot: Some(snapshot),
                    copy_mode: Some(mode.as_str().to_owned()),
                })
            }
            Err(e) => {
                if let Err(rm) = remove_tree(&dir) {
                    warn!(dir = %dir.display(), error = %rm, "cannot remove a failed clone");
                }
                Err(e)
            }
        }
    }

    async fn recover(&self, rec: &BranchRecord) -> Result<Recovered, EngineError> {
        match self.own_meta(rec)? {
            None => Ok(Recovered::Absent),
            Some(m) if m.complete => Ok(Recovered::Complete),
            Some(_) => {
                remove_tree(&self.branch_dir(rec))?;
                Ok(Recovered::Absent)
            }
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
        let dir = self.branch_dir(rec);
        let socket_dir = self.socket_dir(rec);
        postmaster::stop(&dir.join("data"), &socket_dir).await?;
        remove_tree(&dir)?;
        remove_tree(&socket_dir)?;
        Ok(())
    }

    fn endpoint(&self, rec: &BranchRecord) -> Endpoint {
        Endpoint {
            addr: ServerAddr::Unix(postmaster::socket_path(&self.socket_dir(rec))),
            database: self.database.clone(),
        }
    }

    async fn list_marked(&self) -> Result<Vec<(String, String)>, EngineError> {
        Ok(self
            .all_branch_meta()
            .into_iter()
            .map(|m| (m.branch.clone(), format!("{}/{}", m.source, m.branch)))
            .collect())
    }

    fn servers(&self) -> Option<&dyn Servers> {
        Some(self)
    }

    async fn strays(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Ok(entries) = fs::read_dir(self.root.join("branches")) {
            for e in entries.flatten() {
                let path = e.path();
                match read_json::<BranchMeta>(&path.join("branch.json")) {
                    Some(m) if m.source == self.source.as_str() => {}
                    Some(m) => out.push((
                        path.display().to_string(),
                        format!("belongs to source {}", m.source),
                    )),
                    None => out.push((
                        path.display().to_string(),
                        "no offshoot branch.json: not made by this proxy".into(),
                    )),
                }
            }
        }
        if let Ok(entries) = fs::read_dir(self.root.join("snapshots")) {
            for e in entries.flatten() {
                let path = e.path();
                if !path.join("snapshot.json").exists() {
                    out.push((
                        path.display().to_string(),
                        "no snapshot.json: not a sealed snapshot".into(),
                    ));
                }
            }
        }
        out
    }

    async fn snapshots(&self) -> Result<Vec<SnapshotInfo>, SnapshotError> {
        let users = self.all_branch_meta();
        Ok(self
            .snapshot_metas()
            .iter()
            .map(|m| self.info(m, &users))
            .collect())
    }

    async fn take_snapshot(&self) -> Result<SnapshotInfo, SnapshotError> {
        let _one = self.taking.lock().await;
        let meta = self.take_locked().await?;
        Ok(self.info(&meta, &[]))
    }

    async fn delete_snapshot(&self, name: &str) -> Result<(), SnapshotError> {
        if !valid_snapshot_name(name) {
            return Err(SnapshotError::NotFound(name.to_owned()));
        }
        let _exclusive = self.snapshots.write().await;
        if !self.snapshot_metas().iter().any(|m| m.name == name) {
            return Err(SnapshotError::NotFound(name.to_owned()));
        }
        let users: Vec<String> = self
            .all_branch_meta()
            .into_iter()
            .filter(|m| m.snapshot == name)
            .map(|m| m.branch)
            .collect();
        if !users.is_empty() {
            return Err(SnapshotError::InUse {
                name: name.to_owned(),
                branches: users.join(", "),
            });
        }
        // Renamed first, so an interrupted removal is recognised and finished later.
        let doomed = self
            .root
            .join("snapshots")
            .join(format!("{DELETING_PREFIX}{name}"));
        fs::rename(self.snapshot_dir(name), &doomed).map_err(EngineError::from)?;
        remove_tree(&doomed).map_err(EngineError::from)?;
        info!(source = %self.source, snapshot = name, "snapshot deleted");
        Ok(())
    }

    fn source_label(&self) -> String {
        self.source.to_string()
    }
}

#[async_trait]
impl Servers for InstanceEngine {
    async fn start(&self, rec: &BranchRecord) -> Result<(), EngineError> {
        let dir = self.branch_dir(rec);
        if !self.own_meta(rec)?.is_some_and(|m| m.complete) {
            return Err(EngineError::new(format!(
                "the clone of branch {} is gone",
                rec.id()
            )));
        }
        let socket_dir = self.socket_dir(rec);
        let settings = self.branch_settings(
            &socket_dir,
            &format!("offshoot/{}/{}", rec.source, rec.branch),
        );
        let (data, log) = (dir.join("data"), dir.join("postgres.log"));
        self.server(&data, &socket_dir, &log, &settings)
            .start()
            .await
    }

    async fn stop(&self, rec: &BranchRecord) -> Result<(), EngineError> {
        postmaster::stop(&self.branch_dir(rec).join("data"), &self.socket_dir(rec)).await
    }

    async fn running(&self, rec: &BranchRecord) -> Result<bool, EngineError> {
        let data = self.branch_dir(rec).join("data");
        match postmaster::inspect(&data)? {
            PidState::Running { pid, ready } => {
                info!(branch = %rec.id(), pid, ready, "found the branch's server still running; reusing it");
                Ok(ready)
            }
            PidState::Stale => {
                info!(branch = %rec.id(), "the branch's server died; clearing its postmaster.pid");
                postmaster::stop(&data, &self.socket_dir(rec)).await?;
                Ok(false)
            }
            PidState::Absent => Ok(false),
        }
    }
}

/// Builds the engine of an `instance` source. Blocking (it may clear leftovers).
pub fn build(
    name: &SourceName,
    database: &str,
    config: &InstanceConfig,
    embedded_conn: Option<String>,
    bin: PgBin,
    state_dir: &Path,
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
    Ok(Arc::new(InstanceEngine::open(
        name.clone(),
        database.to_owned(),
        config.clone(),
        origin,
        bin,
        root,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_never_show_passwords() {
        let o = Origin::Upstream("postgres://rep:secret@db.internal:5433/postgres".into());
        assert_eq!(o.describe(), "pg_basebackup of db.internal:5433");
    }
}
