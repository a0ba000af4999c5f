//! Ways of making a clone. The registry decides *when*; an [`Engine`] knows *how*.
//!
//! Invariant: an engine never destroys a clone it cannot prove it made. The `database`
//! engine proves it with a marker comment written on the clone right after creation.

use std::path::PathBuf;

use async_trait::async_trait;

use crate::branch::store::BranchRecord;
use crate::error::EngineError;
use crate::names::BranchId;

pub mod database;

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

#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// The name the clone of `id` will have. Pure: the same id gives the same name.
    fn clone_name(&self, id: &BranchId) -> String;

    /// Makes the clone named in `rec`. On error nothing is left behind.
    async fn create(&self, rec: &BranchRecord) -> Result<(), EngineError>;

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
}
