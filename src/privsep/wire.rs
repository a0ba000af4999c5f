//! What the proxy may ask of the helper, and what it answers: one JSON object per
//! line each way, matched by `id`. Plain data only; the work behind each request is
//! done by the functions the proxy would call itself when not separated.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// An owner to give a file or directory to: one of the users the helper was told
/// about at start (the servers' user or the proxy's), never anyone else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl Owner {
    pub fn pair(self) -> (u32, u32) {
        (self.uid, self.gid)
    }

    pub fn from_pair((uid, gid): (u32, u32)) -> Self {
        Self { uid, gid }
    }
}

/// One request. Every path must lie below one of the helper's roots.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Op {
    /// Start a server on `data` and wait until it accepts connections.
    StartServer {
        data: PathBuf,
        socket_dir: PathBuf,
        log: PathBuf,
        settings: Vec<(String, String)>,
        /// The servers' user it runs as (the source's own, or the default).
        run_as: Option<Owner>,
    },
    /// Fast shutdown of the server on `data`, if any.
    StopServer {
        data: PathBuf,
        socket_dir: PathBuf,
    },
    /// Immediate shutdown of a server an interrupted snapshot left behind.
    QuitServer {
        data: PathBuf,
    },
    /// What `data`'s `postmaster.pid` says, checked against the live process.
    Inspect {
        data: PathBuf,
    },
    /// Copy a data directory (reflinks where possible) into the new `to`.
    Copy {
        from: PathBuf,
        to: PathBuf,
        try_reflink: bool,
        owner: Option<Owner>,
        follow_links: bool,
        skip: Vec<String>,
    },
    /// Bytes of regular files below `path`.
    TreeSize {
        path: PathBuf,
    },
    /// Bytes of a clone's data directory it does not share with its snapshot.
    Usage {
        path: PathBuf,
    },
    RemoveTree {
        path: PathBuf,
    },
    RemoveFile {
        path: PathBuf,
    },
    Exists {
        path: PathBuf,
    },
    /// A file's bytes, never through a link.
    ReadFile {
        path: PathBuf,
    },
    /// Replace a file atomically (never writing through a link), given to `owner`.
    ReplaceFile {
        path: PathBuf,
        bytes: Vec<u8>,
        mode: u32,
        owner: Option<Owner>,
    },
    /// Give `path` (not what a link points to) to `owner`, with `mode` if set.
    HandOver {
        path: PathBuf,
        owner: Owner,
        mode: Option<u32>,
    },
    /// Create (if missing) a server's socket directory: the servers' user's, with
    /// the proxy's group, mode 0710, so only the two of them reach the socket.
    SocketDir {
        path: PathBuf,
        run_as: Option<Owner>,
    },
    /// Make a sealed data directory the proxy's: copied into fresh files owned by
    /// the proxy's user, so no descriptor the servers' user holds reaches it.
    Freeze {
        data: PathBuf,
    },
    /// Run a PostgreSQL binary (a bare name in the server binaries' directory) as
    /// the servers' user and collect its output.
    Run {
        program: String,
        args: Vec<String>,
        env: Vec<(String, Option<String>)>,
        run_as: Option<Owner>,
    },
}

impl Op {
    /// Every path the request names, for the helper's check.
    pub fn paths(&self) -> Vec<&Path> {
        match self {
            Op::StartServer {
                data,
                socket_dir,
                log,
                ..
            } => vec![data, socket_dir, log],
            Op::StopServer { data, socket_dir } => vec![data, socket_dir],
            Op::Copy { from, to, .. } => vec![from, to],
            Op::QuitServer { data } | Op::Inspect { data } | Op::Freeze { data } => vec![data],
            Op::TreeSize { path }
            | Op::Usage { path }
            | Op::RemoveTree { path }
            | Op::RemoveFile { path }
            | Op::Exists { path }
            | Op::ReadFile { path }
            | Op::ReplaceFile { path, .. }
            | Op::SocketDir { path, .. }
            | Op::HandOver { path, .. } => vec![path],
            // Paths in a command's arguments are checked one by one by the helper.
            Op::Run { .. } => vec![],
        }
        .into_iter()
        .map(PathBuf::as_path)
        .collect()
    }

    /// The servers' user the request runs something as, if it names one.
    pub fn run_as(&self) -> Option<Owner> {
        match self {
            Op::StartServer { run_as, .. }
            | Op::SocketDir { run_as, .. }
            | Op::Run { run_as, .. } => *run_as,
            _ => None,
        }
    }

    /// Every owner the request gives something to.
    pub fn owners(&self) -> Vec<Owner> {
        match self {
            Op::Copy { owner, .. } | Op::ReplaceFile { owner, .. } => {
                owner.iter().copied().collect()
            }
            Op::HandOver { owner, .. } => vec![*owner],
            _ => vec![],
        }
    }

    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Op::StartServer { .. } => "start_server",
            Op::StopServer { .. } => "stop_server",
            Op::QuitServer { .. } => "quit_server",
            Op::Inspect { .. } => "inspect",
            Op::Copy { .. } => "copy",
            Op::TreeSize { .. } => "tree_size",
            Op::Usage { .. } => "usage",
            Op::RemoveTree { .. } => "remove_tree",
            Op::RemoveFile { .. } => "remove_file",
            Op::Exists { .. } => "exists",
            Op::ReadFile { .. } => "read_file",
            Op::ReplaceFile { .. } => "replace_file",
            Op::HandOver { .. } => "hand_over",
            Op::SocketDir { .. } => "socket_dir",
            Op::Freeze { .. } => "freeze",
            Op::Run { .. } => "run",
        }
    }
}

/// A successful answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "reply")]
pub enum Reply {
    Done,
    /// `postmaster.pid`: absent, stale, or a live server.
    Pid {
        state: PidReply,
    },
    /// The copy used reflinks.
    Copied {
        reflink: bool,
    },
    Size {
        bytes: u64,
    },
    /// A clone's own bytes; `exact` false when shared blocks could not be told apart.
    Usage {
        bytes: u64,
        exact: bool,
    },
    Exists {
        exists: bool,
    },
    Bytes {
        bytes: Vec<u8>,
    },
    Output {
        code: Option<i32>,
        success: bool,
        stdout: Vec<u8>,
        stderr: Vec<u8>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PidReply {
    Absent,
    Stale,
    Running { pid: i32, ready: bool },
}

/// A failed request. Only what the engine needs to rebuild its own error kinds.
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case", tag = "error")]
pub enum WireError {
    /// An OS error; `errno` keeps a full disk a full disk.
    #[error("{message}")]
    Io { errno: Option<i32>, message: String },
    /// A server did not start: the telling line of its log.
    #[error("{fatal}")]
    StartFailed { fatal: String },
    /// Any other failure: `message` for people, `detail` for the log.
    #[error("{message}{}", .detail.as_ref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Failed {
        message: String,
        detail: Option<String>,
    },
    /// The helper refused the request (a path outside its roots, an unknown owner)
    /// or is gone.
    #[error("the privileged helper refused: {0}")]
    Refused(String),
}

impl From<io::Error> for WireError {
    fn from(e: io::Error) -> Self {
        WireError::Io {
            errno: e.raw_os_error(),
            message: e.to_string(),
        }
    }
}

impl From<WireError> for io::Error {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Io {
                errno: Some(errno),
                message,
            } => io::Error::new(io::Error::from_raw_os_error(errno).kind(), message),
            other => io::Error::other(other.to_string()),
        }
    }
}

/// A request line.
#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    #[serde(flatten)]
    pub op: Op,
}

/// An answer line.
#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub id: u64,
    pub result: Result<Reply, WireError>,
}
