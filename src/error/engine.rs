//! [`EngineError`]: what a clone engine reports, by kind, with a message for
//! clients apart from the detail for the log.

use std::sync::Arc;

use super::{mapping, ErrorKind};

/// A failure reported by a clone engine, by kind.
///
/// Two audiences, two methods: `Display` is the full text for the log (paths, OS
/// errors, tool output); [`EngineError::client_message`] is what a client or the API
/// may be told, and never holds a path or an OS error text.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// What the request names does not exist (a snapshot, the source database).
    #[error("{0}")]
    NotFound(String),
    /// What exists is in the way (a snapshot in use, a clone without a record, a
    /// directory that is not the proxy's). `detail` (for the log) may name paths.
    #[error("{message}{}", detail_suffix(.detail))]
    Conflict {
        message: String,
        detail: Option<String>,
    },
    /// A snapshot still has branches made from it.
    #[error("snapshot {name} is used by branch(es) {}; delete them first", .branches.join(", "))]
    SnapshotInUse { name: String, branches: Vec<String> },
    /// The database server refused a statement: its SQLSTATE and its words.
    #[error("{message}")]
    Sql { code: String, message: String },
    /// The database server could not be reached; `detail` holds the cause chain.
    #[error("database server unreachable: {detail}")]
    Unreachable { detail: String },
    /// The proxy's own storage failed while `doing` something.
    #[error("{doing}: {source}")]
    Io {
        doing: String,
        source: Arc<std::io::Error>,
    },
    /// No space (or no inode) left on the proxy's storage while `doing` something.
    #[error("{doing}: {source}")]
    DiskFull {
        doing: String,
        source: Arc<std::io::Error>,
    },
    /// A server did not start; `fatal` is the telling line of its log.
    #[error("{fatal}")]
    StartFailed { fatal: String },
    /// This source's engine does not do that.
    #[error("{0}")]
    Unsupported(String),
    /// Any other failure of the proxy's machinery (a tool that failed, a task that
    /// died): `message` is for people, `detail` for the log.
    #[error("{message}{}", detail_suffix(.detail))]
    Failed {
        message: String,
        detail: Option<String>,
    },
}

fn detail_suffix(detail: &Option<String>) -> String {
    detail
        .as_ref()
        .map(|d| format!(" ({d})"))
        .unwrap_or_default()
}

impl EngineError {
    /// A failure of the proxy's own machinery with nothing more to tell the log.
    pub fn failed(message: impl Into<String>) -> Self {
        EngineError::Failed {
            message: message.into(),
            detail: None,
        }
    }

    /// A failure of the proxy's own machinery: `message` for people, `detail` (paths,
    /// tool output) for the log only.
    pub fn failed_with(message: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        EngineError::Failed {
            message: message.into(),
            detail: Some(detail.to_string()),
        }
    }

    pub fn conflict(message: impl Into<String>, detail: Option<String>) -> Self {
        EngineError::Conflict {
            message: message.into(),
            detail,
        }
    }

    /// An I/O error while `doing` something; a full disk is its own kind.
    pub fn io(doing: impl Into<String>, e: std::io::Error) -> Self {
        let doing = doing.into();
        if is_disk_full(&e) {
            EngineError::DiskFull {
                doing,
                source: Arc::new(e),
            }
        } else {
            EngineError::Io {
                doing,
                source: Arc::new(e),
            }
        }
    }

    /// The kind: the metric label and the key of [`mapping`].
    pub fn kind(&self) -> ErrorKind {
        match self {
            EngineError::NotFound(_) => ErrorKind::NotFound,
            EngineError::Conflict { .. } | EngineError::SnapshotInUse { .. } => ErrorKind::Conflict,
            EngineError::Sql { code, .. } if code == DISK_FULL => ErrorKind::DiskFull,
            EngineError::Sql { .. } => ErrorKind::ServerError,
            EngineError::Unreachable { .. } => ErrorKind::Unreachable,
            EngineError::Io { .. } => ErrorKind::Storage,
            EngineError::DiskFull { .. } => ErrorKind::DiskFull,
            EngineError::StartFailed { .. } => ErrorKind::ServerStart,
            EngineError::Unsupported(_) => ErrorKind::Unsupported,
            EngineError::Failed { .. } => ErrorKind::ProvisionFailed,
        }
    }

    /// The SQLSTATE a client sees: the server's own for a refused statement, else
    /// the one of the kind.
    pub fn sqlstate(&self) -> &str {
        match self {
            EngineError::Sql { code, .. } => code,
            _ => mapping(self.kind()).sqlstate,
        }
    }

    /// What a client (or the API) may be told: no path, no OS error text.
    pub fn client_message(&self) -> String {
        match self {
            EngineError::NotFound(m) | EngineError::Unsupported(m) => m.clone(),
            EngineError::Conflict { message, .. } | EngineError::Failed { message, .. } => {
                message.clone()
            }
            EngineError::Sql { message, .. } => message.clone(),
            EngineError::SnapshotInUse { .. } => self.to_string(),
            EngineError::Unreachable { .. } => {
                "the source's database server cannot be reached right now".into()
            }
            EngineError::Io { doing, .. } => {
                format!("{doing}: an I/O error on the proxy's storage")
            }
            EngineError::DiskFull { doing, .. } => {
                format!("{doing}: No space left on device (the proxy's storage is full)")
            }
            EngineError::StartFailed { fatal } => format!("its server did not start: {fatal}"),
        }
    }
}

/// SQLSTATE 53100, `disk_full`.
const DISK_FULL: &str = "53100";

/// Whether an I/O error means the filesystem is out of space or inodes.
fn is_disk_full(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull
        || e.raw_os_error() == Some(nix::errno::Errno::ENOSPC as i32)
        || e.raw_os_error() == Some(nix::errno::Errno::EDQUOT as i32)
}

impl From<tokio_postgres::Error> for EngineError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) => EngineError::Sql {
                code: db.code().code().to_owned(),
                message: db.message().to_owned(),
            },
            None => {
                // The cause (refused, TLS certificate, timeout) is in the source chain.
                let mut detail = e.to_string();
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    detail.push_str(&format!(": {c}"));
                    cause = c.source();
                }
                EngineError::Unreachable { detail }
            }
        }
    }
}

impl From<std::io::Error> for EngineError {
    fn from(e: std::io::Error) -> Self {
        EngineError::io("working in the engine's storage", e)
    }
}
