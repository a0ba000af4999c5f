//! One PostgreSQL server on one data directory: started by running `postgres`
//! directly (no `pg_ctl`), watched through its `postmaster.pid`, and stopped with a
//! signal only once the process is proven to be the server of that directory.
//!
//! Invariant: a signal is only ever sent to a process that runs as the branch
//! servers' uid and whose working directory is the data directory it is supposed to
//! serve (a postmaster `chdir`s into its data directory). A pid read from a stale or
//! forged `postmaster.pid` that belongs to some other process is never signalled.
//! Files in the data directory (the server user's) are read without following links.
//!
//! A proxy that dropped root does none of this itself: [`Server::start`], [`stop`],
//! [`quit`] and [`inspect`] send their request to the privileged helper, which
//! runs these same functions.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tracing::{debug, info, warn};

use crate::error::EngineError;
use crate::fsutil::{create_fresh, read_nofollow, PRIVATE};
use crate::pg::{is_server_uid, PgBin};
use crate::privsep::{self, Op, PidReply, Reply};

use super::privileged::{engine_error, helper_io};

/// The port every branch server uses: each has its own socket directory and no TCP
/// listener, so the number only names the socket file.
pub const PORT: u16 = 5432;

/// How often the pid file is read while a server starts or stops.
const POLL: Duration = Duration::from_millis(5);

/// How long a start (including crash recovery) or a fast shutdown may take.
const START_TIMEOUT: Duration = Duration::from_secs(120);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// The socket file clients of a server in `socket_dir` connect to.
pub fn socket_path(socket_dir: &Path) -> PathBuf {
    socket_dir.join(format!(".s.PGSQL.{PORT}"))
}

/// What a data directory's `postmaster.pid` says, checked against the live process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PidState {
    /// No `postmaster.pid`: no server runs here.
    Absent,
    /// A `postmaster.pid` whose process is gone, or is not a server of this
    /// directory: left by a server that died.
    Stale,
    /// A live server of this directory; `ready` once it accepts connections.
    Running { pid: i32, ready: bool },
}

/// The fields of `postmaster.pid` used here.
struct PidFile {
    pid: i32,
    ready: bool,
}

fn read_pid_file(data: &Path) -> io::Result<Option<PidFile>> {
    let text = match read_nofollow(&data.join("postmaster.pid")) {
        Ok(t) => String::from_utf8_lossy(&t).into_owned(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let lines: Vec<&str> = text.lines().collect();
    // A negative pid marks a single-user backend.
    let pid = lines
        .first()
        .and_then(|l| l.trim().parse::<i32>().ok())
        .map(i32::abs)
        .unwrap_or(0);
    // Line 8 is the postmaster's status: "starting", "stopping", "ready" or "standby".
    let ready = lines.get(7).is_some_and(|l| l.trim() == "ready");
    Ok(Some(PidFile { pid, ready }))
}

/// Whether process `pid` is alive, runs as a branch servers' uid and works in
/// `data` (what every postmaster does).
fn serves(pid: i32, data: &Path) -> bool {
    if pid <= 0 {
        return false;
    }
    // `/proc/<pid>` belongs to the process's effective uid.
    match fs::metadata(format!("/proc/{pid}")) {
        Ok(m) if is_server_uid(m.uid()) => {}
        _ => return false,
    }
    let Ok(cwd) = fs::read_link(format!("/proc/{pid}/cwd")) else {
        // Gone, or a zombie (which has no working directory).
        return false;
    };
    let want = data.canonicalize().unwrap_or_else(|_| data.to_path_buf());
    cwd == want
}

/// Looks at `data`'s `postmaster.pid` and the process it names.
pub fn inspect(data: &Path) -> io::Result<PidState> {
    if let Some(ch) = privsep::channel() {
        let reply = ch.call_blocking(Op::Inspect {
            data: data.to_owned(),
        })?;
        return match reply {
            Reply::Pid { state } => Ok(match state {
                PidReply::Absent => PidState::Absent,
                PidReply::Stale => PidState::Stale,
                PidReply::Running { pid, ready } => PidState::Running { pid, ready },
            }),
            other => Err(helper_io(other)),
        };
    }
    Ok(match read_pid_file(data)? {
        None => PidState::Absent,
        Some(f) if serves(f.pid, data) => PidState::Running {
            pid: f.pid,
            ready: f.ready,
        },
        Some(_) => PidState::Stale,
    })
}

/// Removes what a dead server left behind: its `postmaster.pid` and the socket lock
/// file (PostgreSQL refuses to start while a lock file's pid is alive, whoever it now
/// belongs to).
fn clear_stale(data: &Path, socket_dir: &Path) -> io::Result<()> {
    for path in [
        data.join("postmaster.pid"),
        socket_path(socket_dir),
        socket_dir.join(format!(".s.PGSQL.{PORT}.lock")),
    ] {
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// How to run one server.
pub struct Server<'a> {
    pub bin: &'a PgBin,
    pub data: &'a Path,
    pub socket_dir: &'a Path,
    /// The server's stderr; truncated at each start.
    pub log: &'a Path,
    /// `postgres -c name=value`, in order (later ones win).
    pub settings: &'a [(String, String)],
}

impl Server<'_> {
    /// Starts the server and returns once it accepts connections. A server already
    /// running on the directory is waited for and reused.
    pub async fn start(&self) -> Result<(), EngineError> {
        if let Some(ch) = privsep::channel() {
            let op = Op::StartServer {
                data: self.data.to_owned(),
                socket_dir: self.socket_dir.to_owned(),
                log: self.log.to_owned(),
                settings: self.settings.to_vec(),
                run_as: self.bin.run_as(),
            };
            return ch.call(op).await.map(drop).map_err(engine_error);
        }
        match inspect(self.data)? {
            PidState::Running { ready: true, .. } => return Ok(()),
            PidState::Running { pid, ready: false } => {
                debug!(pid, data = %self.data.display(), "waiting for a server that is starting");
                return self.wait_ready(pid, None).await;
            }
            PidState::Stale => {
                info!(data = %self.data.display(), "removing a stale postmaster.pid");
                clear_stale(self.data, self.socket_dir)?;
            }
            PidState::Absent => clear_stale(self.data, self.socket_dir)?,
        }
        self.bin.prepare_socket_dir(self.socket_dir).map_err(|e| {
            EngineError::failed_with(
                "cannot prepare the server's socket directory",
                format!("{e:#}"),
            )
        })?;
        // The log is opened here and inherited: the server never opens it by name.
        let log = create_fresh(self.log, PRIVATE)?;
        let mut cmd = self.bin.command("postgres");
        cmd.arg("-D").arg(self.data);
        for (k, v) in self.settings {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: a Ctrl-C meant for the proxy does not reach it.
            .process_group(0);
        let mut child = tokio::process::Command::from(cmd)
            .spawn()
            .map_err(|e| EngineError::failed_with("cannot run postgres", e))?;
        let pid = child.id().map(|p| p as i32).unwrap_or(0);
        let result = self.wait_ready(pid, Some(&mut child)).await;
        if result.is_err() {
            // A server that is up but too slow is stopped, not left behind.
            if serves(pid, self.data) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGQUIT);
            }
            let _ = child.wait().await;
            let _ = clear_stale(self.data, self.socket_dir);
            return result;
        }
        // Reap the process whenever it ends (a suspension, or a crash).
        let data = self.data.display().to_string();
        tokio::spawn(async move {
            match child.wait().await {
                Ok(status) => debug!(pid, data, %status, "postgres exited"),
                Err(e) => warn!(pid, data, error = %e, "cannot wait for postgres"),
            }
        });
        Ok(())
    }

    /// Polls the pid file until `pid` reports ready; with `child`, fails as soon as
    /// the process exits.
    async fn wait_ready(
        &self,
        pid: i32,
        mut child: Option<&mut tokio::process::Child>,
    ) -> Result<(), EngineError> {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if let Some(c) = child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    debug!(%status, data = %self.data.display(), "postgres exited while starting");
                    return Err(EngineError::StartFailed {
                        fatal: log_reason(self.log),
                    });
                }
            } else if !serves(pid, self.data) {
                debug!(pid, data = %self.data.display(), "postgres stopped while starting");
                return Err(EngineError::StartFailed {
                    fatal: log_reason(self.log),
                });
            }
            if let Some(f) = read_pid_file(self.data)? {
                if f.pid == pid && f.ready {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(EngineError::StartFailed {
                    fatal: format!(
                        "no connections accepted within {}s; last log line: {}",
                        START_TIMEOUT.as_secs(),
                        log_reason(self.log)
                    ),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// Fast shutdown of the server running on `data`, if any; returns once it is gone.
/// Stale leftovers are cleared.
pub async fn stop(data: &Path, socket_dir: &Path) -> Result<(), EngineError> {
    if let Some(ch) = privsep::channel() {
        let op = Op::StopServer {
            data: data.to_owned(),
            socket_dir: socket_dir.to_owned(),
        };
        return ch.call(op).await.map(drop).map_err(engine_error);
    }
    let pid = match inspect(data)? {
        PidState::Absent => return Ok(()),
        PidState::Stale => {
            clear_stale(data, socket_dir)?;
            return Ok(());
        }
        PidState::Running { pid, .. } => pid,
    };
    // Fast shutdown: sessions are ended, a shutdown checkpoint is written.
    match kill(Pid::from_raw(pid), Signal::SIGINT) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => {
            return Err(EngineError::failed_with(
                "cannot stop the branch's server",
                format!("signal to pid {pid}: {e}"),
            ))
        }
    }
    let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
    while serves(pid, data) {
        if tokio::time::Instant::now() >= deadline {
            return Err(EngineError::failed_with(
                format!(
                    "the branch's server did not stop within {}s",
                    STOP_TIMEOUT.as_secs()
                ),
                format!("pid {pid}"),
            ));
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

/// Immediate shutdown (SIGQUIT) of a server found running on `data`, waiting up to
/// 10 s for it to go: for what an interrupted snapshot left. Blocking.
pub fn quit(data: &Path) -> io::Result<()> {
    if let Some(ch) = privsep::channel() {
        return ch
            .call_blocking(Op::QuitServer {
                data: data.to_owned(),
            })
            .map(drop)
            .map_err(Into::into);
    }
    if let PidState::Running { pid, .. } = inspect(data)? {
        warn!(pid, data = %data.display(), "stopping the server of an interrupted snapshot");
        let _ = kill(Pid::from_raw(pid), Signal::SIGQUIT);
        for _ in 0..2000 {
            if !matches!(inspect(data), Ok(PidState::Running { .. })) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    Ok(())
}

/// The most telling line of a server log: the last FATAL/PANIC/ERROR message,
/// without the timestamp prefix; else the last line.
pub fn log_reason(log: &Path) -> String {
    let text = read_nofollow(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let pick = text
        .lines()
        .rev()
        .find_map(|l| {
            ["FATAL:", "PANIC:", "ERROR:"]
                .iter()
                .find_map(|tag| l.find(tag).map(|i| &l[i..]))
        })
        .or_else(|| text.lines().rev().find(|l| !l.trim().is_empty()));
    match pick {
        Some(line) => line.split_whitespace().collect::<Vec<_>>().join(" "),
        None => "no log output".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_files_are_checked_against_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path();
        assert_eq!(inspect(data).unwrap(), PidState::Absent);
        // Our own pid, but we do not work in `data`: stale, never signalled.
        let me = std::process::id();
        let text = format!("{me}\n{}\n1\n5432\n/tmp\n\n0 0\nready   \n", data.display());
        fs::write(data.join("postmaster.pid"), text).unwrap();
        assert_eq!(inspect(data).unwrap(), PidState::Stale);
        fs::write(data.join("postmaster.pid"), "garbage").unwrap();
        assert_eq!(inspect(data).unwrap(), PidState::Stale);
    }

    #[test]
    fn log_reason_finds_the_fatal_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("pg.log");
        fs::write(
            &log,
            "2026-01-01 00:00:00 UTC [9] LOG:  starting\n\
             2026-01-01 00:00:00 UTC [9] FATAL:  unrecognized configuration parameter \"x\"\n\
             2026-01-01 00:00:00 UTC [9] LOG:  database system is shut down\n",
        )
        .unwrap();
        assert_eq!(
            log_reason(&log),
            "FATAL: unrecognized configuration parameter \"x\""
        );
        assert_eq!(log_reason(&dir.path().join("none")), "no log output");
    }
}
