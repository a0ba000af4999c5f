//! The file and process work of the `instance` engine (and of the embedded server)
//! as the privileged helper does it, and the few steps the engine routes to it.
//!
//! The helper runs [`Helper::execute`]: each request is carried out by the same
//! function the engine calls when it is not separated (`postmaster`, `copy`,
//! `fsutil`, `pg`), so both paths are one code. The engine's side of a request
//! is in those functions; the steps below are the ones with no such function.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::copy::{copy_tree, tree_size, CopyPlan};
use super::postmaster::{self, PidState, Server};
use crate::branch::engine::CopyMode;
use crate::error::EngineError;
use crate::fsutil::{read_nofollow, replace_file};
use crate::pg::{self, PgBin};
use crate::privsep::{self, Executor, Hello, Op, Owner, PidReply, Reply, WireError};

/// An answer of the wrong shape from the helper.
pub(super) fn helper_io(reply: Reply) -> io::Error {
    io::Error::other(format!(
        "unexpected answer from the privileged helper: {reply:?}"
    ))
}

/// The engine's error for a failed request.
pub(super) fn engine_error(e: WireError) -> EngineError {
    match e {
        WireError::StartFailed { fatal } => EngineError::StartFailed { fatal },
        WireError::Failed { message, detail } => EngineError::Failed { message, detail },
        WireError::Io { .. } => EngineError::io("working on the branch's storage", e.into()),
        WireError::Refused(why) => {
            EngineError::failed_with("the privileged helper refused a request", why)
        }
    }
}

fn wire_error(e: EngineError) -> WireError {
    match e {
        EngineError::StartFailed { fatal } => WireError::StartFailed { fatal },
        EngineError::Io { doing, source } | EngineError::DiskFull { doing, source } => {
            WireError::Io {
                errno: source.raw_os_error(),
                message: format!("{doing}: {source}"),
            }
        }
        other => WireError::Failed {
            message: other.client_message(),
            detail: Some(other.to_string()),
        },
    }
}

/// Removes `path` and everything below it (a clone's `data/` is the servers'
/// user's, so a separated proxy asks the helper); a missing path is no error.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    // Nothing there (the usual case on a creation's path): no round trip to the
    // helper. Any other answer, a refusal included, goes the usual way.
    if matches!(fs::symlink_metadata(path), Err(e) if e.kind() == io::ErrorKind::NotFound) {
        return Ok(());
    }
    match privsep::channel() {
        Some(ch) => ch
            .call_blocking(Op::RemoveTree {
                path: path.to_owned(),
            })
            .map(drop)
            .map_err(Into::into),
        None => crate::fsutil::remove_tree(path),
    }
}

/// After a snapshot is sealed: makes its data directory the proxy's, in fresh
/// files, so the servers' user can no longer change it (not even through a
/// descriptor it kept open). Nothing to do unless separated: otherwise one user
/// owns it all.
pub fn freeze(data: &Path) -> io::Result<()> {
    match privsep::channel() {
        Some(ch) => ch
            .call_blocking(Op::Freeze {
                data: data.to_owned(),
            })
            .map(drop)
            .map_err(Into::into),
        None => Ok(()),
    }
}

/// Gives `dir` (never what a link points to) back to this process's user with
/// `mode`: a branch directory an older version gave to the servers' user.
pub fn reclaim(dir: &Path, mode: u32) -> io::Result<()> {
    let me = Owner {
        uid: nix::unistd::Uid::effective().as_raw(),
        gid: nix::unistd::Gid::effective().as_raw(),
    };
    match privsep::channel() {
        Some(ch) => ch
            .call_blocking(Op::HandOver {
                path: dir.to_owned(),
                owner: me,
                mode: Some(mode),
            })
            .map(drop)
            .map_err(Into::into),
        None => hand_over(dir, me, Some(mode)),
    }
}

fn hand_over(path: &Path, owner: Owner, mode: Option<u32>) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(owner.uid), Some(owner.gid))?;
    if let Some(mode) = mode {
        // chmod follows links: only a directory or a file gets a mode.
        let meta = fs::symlink_metadata(path)?;
        if meta.is_dir() || meta.is_file() {
            fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
        }
    }
    Ok(())
}

/// The helper's side: it runs as root, servers and their files are the servers'
/// user's, sealed snapshots the proxy's.
pub struct Helper {
    bin: PgBin,
    proxy: Owner,
}

impl Helper {
    /// The binaries, running as `run_as` (a servers' user the request named; the
    /// helper's checks let no other through) or the default.
    fn bin_as(&self, run_as: Option<Owner>) -> PgBin {
        match run_as {
            Some(o) => self.bin.clone().with_run_as(o),
            None => self.bin.clone(),
        }
    }

    pub fn new(hello: &Hello) -> anyhow::Result<Self> {
        pg::set_server_user(&hello.server_user);
        pg::set_server_uids(hello.servers.iter().map(|o| o.uid).collect());
        Ok(Self {
            bin: PgBin::find(hello.bin_dir.as_deref())?.with_socket_group(hello.proxy.gid),
            proxy: hello.proxy,
        })
    }
}

/// Runs blocking work off the helper's async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, WireError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(WireError::from),
        Err(e) => Err(WireError::Failed {
            message: "a task of the privileged helper died".into(),
            detail: Some(e.to_string()),
        }),
    }
}

/// Copies a sealed data directory into fresh files of the proxy's user, then puts
/// the copy in its place.
fn freeze_here(data: &Path, proxy: Owner) -> io::Result<()> {
    let frozen: PathBuf = data.with_file_name(".frozen-data");
    crate::fsutil::remove_tree(&frozen)?;
    copy_tree(&CopyPlan {
        from: data,
        to: &frozen,
        try_reflink: true,
        owner: Some(proxy.pair()),
        follow_links: false,
        skip: &["postmaster.pid"],
    })?;
    crate::fsutil::remove_tree(data)?;
    fs::rename(&frozen, data)
}

#[async_trait]
impl Executor for Helper {
    async fn execute(&self, op: Op) -> Result<Reply, WireError> {
        match op {
            Op::StartServer {
                data,
                socket_dir,
                log,
                settings,
                run_as,
            } => {
                let bin = self.bin_as(run_as);
                let server = Server {
                    bin: &bin,
                    data: &data,
                    socket_dir: &socket_dir,
                    log: &log,
                    settings: &settings,
                };
                server.start().await.map_err(wire_error)?;
                Ok(Reply::Done)
            }
            Op::StopServer { data, socket_dir } => {
                postmaster::stop(&data, &socket_dir)
                    .await
                    .map_err(wire_error)?;
                Ok(Reply::Done)
            }
            Op::QuitServer { data } => {
                blocking(move || postmaster::quit(&data)).await?;
                Ok(Reply::Done)
            }
            Op::Inspect { data } => {
                let state = match postmaster::inspect(&data)? {
                    PidState::Absent => PidReply::Absent,
                    PidState::Stale => PidReply::Stale,
                    PidState::Running { pid, ready } => PidReply::Running { pid, ready },
                };
                Ok(Reply::Pid { state })
            }
            Op::Copy {
                from,
                to,
                try_reflink,
                owner,
                follow_links,
                skip,
            } => {
                let mode = blocking(move || {
                    let skip: Vec<&str> = skip.iter().map(String::as_str).collect();
                    copy_tree(&CopyPlan {
                        from: &from,
                        to: &to,
                        try_reflink,
                        owner: owner.map(Owner::pair),
                        follow_links,
                        skip: &skip,
                    })
                })
                .await?;
                Ok(Reply::Copied {
                    reflink: mode == CopyMode::Reflink,
                })
            }
            Op::TreeSize { path } => {
                let bytes = blocking(move || Ok(tree_size(&path))).await?;
                Ok(Reply::Size { bytes })
            }
            Op::Usage { path } => {
                let u = super::usage::usage(&path).await?;
                Ok(Reply::Usage {
                    bytes: u.bytes,
                    exact: u.exact,
                })
            }
            Op::RemoveTree { path } => {
                blocking(move || crate::fsutil::remove_tree(&path)).await?;
                Ok(Reply::Done)
            }
            Op::RemoveFile { path } => {
                match fs::remove_file(&path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
                    _ => {}
                }
                Ok(Reply::Done)
            }
            Op::Exists { path } => Ok(Reply::Exists {
                exists: path.try_exists().unwrap_or(false),
            }),
            Op::ReadFile { path } => Ok(Reply::Bytes {
                bytes: read_nofollow(&path)?,
            }),
            Op::ReplaceFile {
                path,
                bytes,
                mode,
                owner,
            } => {
                replace_file(&path, &bytes, mode, owner.map(Owner::pair))?;
                Ok(Reply::Done)
            }
            Op::HandOver { path, owner, mode } => {
                hand_over(&path, owner, mode)?;
                Ok(Reply::Done)
            }
            Op::SocketDir { path, run_as } => {
                self.bin_as(run_as)
                    .prepare_socket_dir(&path)
                    .map_err(|e| WireError::Failed {
                        message: "cannot prepare a server's socket directory".into(),
                        detail: Some(format!("{e:#}")),
                    })?;
                Ok(Reply::Done)
            }
            Op::Freeze { data } => {
                let proxy = self.proxy;
                blocking(move || freeze_here(&data, proxy)).await?;
                Ok(Reply::Done)
            }
            Op::Run {
                program,
                args,
                env,
                run_as,
            } => {
                let mut cmd = self.bin_as(run_as).command(&program);
                cmd.args(&args);
                for (k, v) in env {
                    match v {
                        Some(v) => cmd.env(k, v),
                        None => cmd.env_remove(k),
                    };
                }
                let out = tokio::process::Command::from(cmd).output().await?;
                Ok(Reply::Output {
                    code: out.status.code(),
                    success: out.status.success(),
                    stdout: out.stdout,
                    stderr: out.stderr,
                })
            }
        }
    }
}
