//! Ways of making a clone. The registry decides *when*; an [`Engine`] knows *how*.
//!
//! Invariant: an engine never destroys a clone it cannot prove it made. The `database`
//! engine proves it with a marker comment written on the clone right after creation;
//! the `instance` engine with a metadata file written beside the clone's data
//! directory before anything is copied into it.

use std::path::PathBuf;

use async_trait::async_trait;

use crate::branch::store::BranchRecord;
pub use crate::branch::store::CopyMode;
use crate::error::EngineError;
use crate::names::BranchId;

pub mod database;
pub mod instance;
pub(crate) mod naming;
pub mod progress;
pub mod transform;

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovered {
    /// The clone exists and is complete; adopt it, with what the engine still
    /// knows of how it was made (what the interrupted creation would have
    /// recorded).
    Complete {
        snapshot: Option<String>,
        copy_mode: Option<CopyMode>,
    },
    /// Nothing was made (or what was made has been removed).
    Absent,
}

/// What a creation made, kept in the branch's record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Made {
    /// The snapshot the clone was made from.
    pub snapshot: Option<String>,
    /// How the files were made (engines that copy files).
    pub copy_mode: Option<CopyMode>,
    /// The clone was a warm spare, made and started before it was asked for.
    pub spare: bool,
}

/// A sealed snapshot of a source, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
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
    /// Set only on a snapshot still being taken: its phase and bytes copied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<progress::Progress>,
}

/// The one "snapshot does not exist" error.
pub(crate) fn snapshot_missing(source: &str, name: &str) -> EngineError {
    EngineError::NotFound(format!("snapshot {name} of source {source} does not exist"))
}

/// The one "snapshot is in use" error.
pub(crate) fn snapshot_in_use(name: &str, branches: &[String]) -> EngineError {
    EngineError::SnapshotInUse {
        name: name.to_owned(),
        branches: branches.to_vec(),
    }
}

fn no_snapshots(source: &str) -> EngineError {
    EngineError::Unsupported(format!(
        "source {source} has no snapshots: its engine clones the live source"
    ))
}

/// The disk a clone takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    /// The clone's own bytes: its database's size (`database` engine), or the bytes
    /// it does not share with its snapshot (`instance` engine).
    pub bytes: u64,
    /// False when blocks shared with the snapshot could not be told apart and are
    /// counted too (the apparent size).
    pub exact: bool,
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

    /// How much disk the clone of `rec` takes; `None` when the engine cannot tell.
    /// Called in the background, never on a connection's path.
    async fn usage(&self, rec: &BranchRecord) -> Result<Option<Usage>, EngineError> {
        let _ = rec;
        Ok(None)
    }

    /// The source's snapshots, oldest first.
    async fn snapshots(&self) -> Result<Vec<SnapshotInfo>, EngineError> {
        Err(no_snapshots(&self.source_label()))
    }

    /// Takes and seals a new snapshot of the source.
    async fn take_snapshot(&self) -> Result<SnapshotInfo, EngineError> {
        Err(no_snapshots(&self.source_label()))
    }

    /// The snapshot being taken now, if any, with its progress.
    fn snapshot_in_progress(&self) -> Option<SnapshotInfo> {
        None
    }

    /// Deletes a snapshot no branch uses.
    async fn delete_snapshot(&self, name: &str) -> Result<(), EngineError> {
        let _ = name;
        Err(no_snapshots(&self.source_label()))
    }

    /// How new clones are made, once the engine knows (the `instance` engine after
    /// its first copy, the `database` engine once it has asked the server).
    fn copy_mode(&self) -> Option<CopyMode> {
        None
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
    fn copy_modes_serialize_lowercase() {
        assert_eq!(
            serde_json::to_string(&CopyMode::Reflink).unwrap(),
            "\"reflink\""
        );
        let m: CopyMode = serde_json::from_str("\"copy\"").unwrap();
        assert_eq!(m, CopyMode::Copy);
        for mode in [
            CopyMode::Reflink,
            CopyMode::Copy,
            CopyMode::FileClone,
            CopyMode::FileCopy,
            CopyMode::WalLog,
            CopyMode::ServerDefault,
        ] {
            let text = serde_json::to_string(&mode).unwrap();
            assert_eq!(text, format!("\"{}\"", mode.as_str()));
            assert_eq!(serde_json::from_str::<CopyMode>(&text).unwrap(), mode);
        }
        assert!(serde_json::from_str::<CopyMode>("\"2\"").is_err());
    }
}
