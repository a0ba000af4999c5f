//! Ways of making a clone. The registry decides *when*; an [`Engine`] knows *how*.
//!
//! Invariant: an engine never destroys a clone it cannot prove it made. The `database`
//! engine proves it with a marker comment written on the clone right after creation;
//! the `instance` engine with a metadata file written beside the clone's data
//! directory before anything is copied into it.

use std::path::PathBuf;

use async_trait::async_trait;

use crate::branch::store::BranchRecord;
use crate::error::EngineError;
use crate::names::BranchId;

pub mod database;
pub mod instance;

/// Where the proxy connects for a branch's sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAddr {
    Tcp {
        host: String,
        port: u16,
    },
    /// Path of the socket file itself (`<dir>/.s.PGSQL.<port>`).
    Unix(PathBuf),
}

impl std::fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerAddr::Tcp { host, port } => write!(f, "{host}:{port}"),
            ServerAddr::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// A branch's server and the database name to put in the startup packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: ServerAddr,
    pub database: String,
}

/// What a restart finds for a record that was still `provisioning`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovered {
    /// The clone exists and is complete; adopt it.
    Complete,
    /// Nothing was made (or what was made has been removed).
    Absent,
}

/// A snapshot's name: its creation time in UTC, `20261125T030559Z` (a `-2`, `-3`
/// ... suffix tells apart snapshots of the same second). Names sort by age.
pub(crate) fn snapshot_name(t: std::time::SystemTime) -> String {
    let stamp = humantime::format_rfc3339_seconds(t).to_string();
    stamp.replace(['-', ':'], "")
}

/// Whether `name` could be a snapshot name (checked before it reaches a path or
/// SQL).
pub(crate) fn valid_snapshot_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 40
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `2026-11-25T03:05:59Z` from a snapshot name; `None` if it is not one.
pub(crate) fn snapshot_time(name: &str) -> Option<String> {
    let stamp = name.split('-').next()?;
    let b = stamp.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(u8::is_ascii_digit));
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' || !digits(0..8) || !digits(9..15) {
        return None;
    }
    Some(format!(
        "{}-{}-{}T{}:{}:{}Z",
        &stamp[0..4],
        &stamp[4..6],
        &stamp[6..8],
        &stamp[9..11],
        &stamp[11..13],
        &stamp[13..15]
    ))
}

/// What a creation made, kept in the branch's record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Made {
    /// The snapshot the clone was made from.
    pub snapshot: Option<String>,
    /// How the files were made: `reflink` or `copy`.
    pub copy_mode: Option<String>,
}

/// A sealed snapshot of a source, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotInfo {
    /// Named by its creation time (UTC), so names sort by age.
    pub name: String,
    pub created_at: String,
    /// Where the data came from (`pg_basebackup of ...`, `copy of <dir>`).
    pub origin: String,
    /// Bytes of the data directory (before any sharing by reflink).
    pub size_bytes: u64,
    /// Branches made from it that still exist.
    pub branches: Vec<String>,
}

/// Why a snapshot operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SnapshotError {
    #[error("source {0} has no snapshots: its engine clones the live source")]
    Unsupported(String),
    #[error("snapshot {0} does not exist")]
    NotFound(String),
    #[error("snapshot {name} is used by branch(es) {branches}; delete them first")]
    InUse { name: String, branches: String },
    #[error("{0}")]
    Engine(#[from] EngineError),
}

/// What an engine that runs a server per clone hands out: the only way the
/// registry starts, stops or finds those servers.
#[async_trait]
pub trait Servers: Send + Sync {
    /// Makes the clone's server accept connections; returns once it does. A server
    /// already running for this clone is reused.
    async fn start(&self, rec: &BranchRecord) -> Result<(), EngineError>;

    /// Stops the clone's server (fast shutdown: sessions end, data is kept).
    async fn stop(&self, rec: &BranchRecord) -> Result<(), EngineError>;

    /// After a restart: whether the clone's server is running and ready to be reused.
    /// Leftovers of a server that died (a stale `postmaster.pid`) are cleared.
    async fn running(&self, rec: &BranchRecord) -> Result<bool, EngineError>;
}

#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// The name the clone of `id` will have. Pure: the same id gives the same name.
    fn clone_name(&self, id: &BranchId) -> String;

    /// Makes the clone named in `rec` (from `rec.snapshot` when set). On error nothing
    /// is left behind.
    async fn create(&self, rec: &BranchRecord) -> Result<Made, EngineError>;

    /// Settles a record left `provisioning` by a crash.
    async fn recover(&self, rec: &BranchRecord) -> Result<Recovered, EngineError>;

    /// Whether the clone of a `ready` record still exists.
    async fn exists(&self, rec: &BranchRecord) -> Result<bool, EngineError>;

    /// Removes the clone. With `force`, sessions on it are terminated first; without,
    /// a clone in use is refused. A clone that is already gone is not an error.
    async fn destroy(&self, rec: &BranchRecord, force: bool) -> Result<(), EngineError>;

    /// Where clients of this clone connect.
    fn endpoint(&self, rec: &BranchRecord) -> Endpoint;

    /// Clones on the server that carry this engine's ownership marker, as
    /// `(clone name, branch id text)`: used to report clones no record explains.
    async fn list_marked(&self) -> Result<Vec<(String, String)>, EngineError>;

    /// The part that starts and stops a server per clone, for engines whose clones
    /// each run one (and so can be suspended when idle); `None` for engines whose
    /// clones live on the source's own server.
    fn servers(&self) -> Option<&dyn Servers> {
        None
    }

    /// What lies in the engine's storage that it cannot explain, as
    /// `(location, reason)`. Reported, never removed.
    async fn strays(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    /// The source's snapshots, oldest first.
    async fn snapshots(&self) -> Result<Vec<SnapshotInfo>, SnapshotError> {
        Err(SnapshotError::Unsupported(self.source_label()))
    }

    /// Takes and seals a new snapshot of the source.
    async fn take_snapshot(&self) -> Result<SnapshotInfo, SnapshotError> {
        Err(SnapshotError::Unsupported(self.source_label()))
    }

    /// Deletes a snapshot no branch uses.
    async fn delete_snapshot(&self, name: &str) -> Result<(), SnapshotError> {
        let _ = name;
        Err(SnapshotError::Unsupported(self.source_label()))
    }

    /// The source's name, for messages.
    fn source_label(&self) -> String {
        "this source".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_names_sort_by_time_and_are_safe() {
        let t = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let name = snapshot_name(t);
        assert_eq!(name, "20231114T221320Z");
        assert!(valid_snapshot_name(&name));
        assert!(valid_snapshot_name("20231114T221320Z-2"));
        assert!(!valid_snapshot_name("../x"));
        assert!(!valid_snapshot_name(".partial-x"));
        assert_eq!(
            snapshot_time("20231114T221320Z-2").as_deref(),
            Some("2023-11-14T22:13:20Z")
        );
        assert_eq!(snapshot_time("nope"), None);
    }
}
