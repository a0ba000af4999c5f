//! Local PostgreSQL clusters: finding the binaries, initdb, start, stop.
//!
//! Used for the embedded server of the demo configuration and by the test harness
//! for throw-away clusters. PostgreSQL refuses to run as root, so when the proxy's
//! effective uid is 0 every server binary runs as the servers' user
//! (`process.server_user`, default `postgres`), and the directories it needs are
//! handed to that user. A proxy that dropped root (see `privsep`) asks its helper
//! for every such step: [`PgBin`]'s methods send the request when there is a
//! helper, and do the work themselves when there is none.

use std::fs;
use std::os::unix::fs::{lchown, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use nix::unistd::{Gid, Uid, User};

use crate::fsutil::{read_nofollow, replace_file, PRIVATE};
use crate::privsep::{self, Op, Owner, Reply};

static SERVER_USER: OnceLock<String> = OnceLock::new();

/// Names the user servers run as when this process is root or separated
/// (`process.server_user`); `postgres` unless set. Set once, before any [`PgBin`].
pub fn set_server_user(name: &str) {
    let _ = SERVER_USER.set(name.to_owned());
}

fn server_user_name() -> &'static str {
    SERVER_USER.get().map_or("postgres", String::as_str)
}

static SERVER_UIDS: OnceLock<Vec<u32>> = OnceLock::new();

/// Every uid a server of this process may run as (one per source, when sources
/// have users of their own). Set once at start; unset, only [`server_uid`].
pub fn set_server_uids(uids: Vec<u32>) {
    let _ = SERVER_UIDS.set(uids);
}

/// Whether `uid` is one branch servers run as: only such processes are signalled.
pub fn is_server_uid(uid: u32) -> bool {
    uid == server_uid() || SERVER_UIDS.get().is_some_and(|u| u.contains(&uid))
}

/// An answer of the wrong shape from the helper.
fn unexpected(reply: Reply) -> std::io::Error {
    std::io::Error::other(format!(
        "unexpected answer from the privileged helper: {reply:?}"
    ))
}

/// The `Run` request for a command built by [`PgBin::command`].
fn run_op(cmd: &Command, run_as: Option<Owner>) -> std::io::Result<Op> {
    let text = |s: &std::ffi::OsStr| {
        s.to_str()
            .map(str::to_owned)
            .ok_or_else(|| std::io::Error::other("a command argument is not UTF-8"))
    };
    let program = Path::new(cmd.get_program())
        .file_name()
        .map(text)
        .transpose()?
        .unwrap_or_default();
    let args = cmd.get_args().map(text).collect::<std::io::Result<_>>()?;
    let env = cmd
        .get_envs()
        .filter(|(k, _)| k.to_str().is_some_and(|k| k.starts_with("PG")))
        .map(|(k, v)| Ok((text(k)?, v.map(text).transpose()?)))
        .collect::<std::io::Result<_>>()?;
    Ok(Op::Run {
        program,
        args,
        env,
        run_as,
    })
}

fn output_of(reply: Reply) -> std::io::Result<Output> {
    use std::os::unix::process::ExitStatusExt;
    match reply {
        Reply::Output {
            code,
            stdout,
            stderr,
            ..
        } => Ok(Output {
            // A code of None means a signal ended it; 0x7f00 reads as "not success".
            status: std::process::ExitStatus::from_raw(code.map_or(0x7f00, |c| (c & 0xff) << 8)),
            stdout,
            stderr,
        }),
        other => Err(unexpected(other)),
    }
}

/// The directory holding initdb, postgres and pg_ctl.
#[derive(Debug, Clone)]
pub struct PgBin {
    dir: PathBuf,
    run_as: Option<(Uid, Gid)>,
    /// The group given servers' socket directories (the proxy's, when separated, so
    /// it can connect to them while nobody else can).
    socket_group: Option<u32>,
}

fn has_server(dir: &Path) -> bool {
    dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() && dir.join("postgres").is_file()
}

impl PgBin {
    /// `configured`, else `pg_config --bindir`, else PATH, else the newest
    /// `/usr/lib/postgresql/*/bin`.
    pub fn find(configured: Option<&Path>) -> Result<Self> {
        let dir = match configured {
            Some(d) if has_server(d) => d.to_path_buf(),
            Some(d) => bail!(
                "embedded.bin_dir: {} has no initdb/pg_ctl/postgres",
                d.display()
            ),
            None => Self::discover().ok_or_else(|| {
                anyhow!(
                    "PostgreSQL server binaries not found (looked at `pg_config --bindir`, PATH \
                     and /usr/lib/postgresql/*/bin); install them (Debian/Ubuntu: \
                     `apt-get install postgresql`) or set embedded.bin_dir"
                )
            })?,
        };
        Ok(Self {
            dir,
            run_as: service_user()?,
            socket_group: None,
        })
    }

    /// Servers run as the user `name` instead (a source with a user of its own),
    /// when servers run as another user at all (we are root, or separated).
    pub fn for_user(mut self, name: &str) -> Result<Self> {
        if self.run_as.is_none() {
            return Ok(self);
        }
        let user = User::from_name(name)
            .with_context(|| format!("looking up the {name} user"))?
            .ok_or_else(|| {
                anyhow!("the servers' user {name:?} does not exist; create it or name another")
            })?;
        self.run_as = Some((user.uid, user.gid));
        Ok(self)
    }

    /// Servers run as `owner` (the helper, for the user a request names).
    pub fn with_run_as(mut self, owner: Owner) -> Self {
        self.run_as = Some((Uid::from_raw(owner.uid), Gid::from_raw(owner.gid)));
        self
    }

    /// The user servers run as, when it is not this process's.
    pub fn run_as(&self) -> Option<Owner> {
        self.owner().map(Owner::from_pair)
    }

    /// Socket directories get `gid` as their group (mode 0710) instead of being
    /// private to the servers' user: what the privileged helper does, so the proxy's
    /// user may connect.
    pub fn with_socket_group(mut self, gid: u32) -> Self {
        self.socket_group = Some(gid);
        self
    }

    fn discover() -> Option<PathBuf> {
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if out.status.success() && has_server(&dir) {
                return Some(dir);
            }
        }
        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                if has_server(&dir) {
                    return Some(dir);
                }
            }
        }
        let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| {
                let e = e.ok()?;
                let v = e.file_name().to_str()?.parse::<u32>().ok()?;
                let bin = e.path().join("bin");
                has_server(&bin).then_some((v, bin))
            })
            .collect();
        versions.sort();
        versions.pop().map(|(_, b)| b)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A command for a server binary, run as the service user when we are root.
    pub fn command(&self, name: &str) -> Command {
        let mut cmd = Command::new(self.dir.join(name));
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid.as_raw()).gid(gid.as_raw());
            cmd.env("HOME", "/tmp");
        }
        cmd.env("LC_ALL", "C");
        cmd
    }

    /// `(uid, gid)` servers run as, when it differs from ours (we are root).
    pub fn owner(&self) -> Option<(u32, u32)> {
        self.run_as.map(|(u, g)| (u.as_raw(), g.as_raw()))
    }

    /// Gives `path` to the service user (when we are root or separated). A link is
    /// given, never what it points at (`lchown`).
    pub fn hand_over(&self, path: &Path) -> Result<()> {
        let Some((uid, gid)) = self.run_as else {
            return Ok(());
        };
        let given = match privsep::channel() {
            Some(ch) => ch
                .call_blocking(Op::HandOver {
                    path: path.to_owned(),
                    owner: Owner::from_pair((uid.as_raw(), gid.as_raw())),
                    mode: None,
                })
                .map(drop)
                .map_err(std::io::Error::from),
            None => lchown(path, Some(uid.as_raw()), Some(gid.as_raw())),
        };
        given.with_context(|| {
            format!(
                "cannot give {} to the {} user",
                path.display(),
                server_user_name()
            )
        })
    }

    /// Creates (if missing) a server's socket directory and gives it to the servers'
    /// user: private to it (0700), or shared with the socket group (0710).
    pub fn prepare_socket_dir(&self, dir: &Path) -> Result<()> {
        if let Some(ch) = privsep::channel() {
            return ch
                .call_blocking(Op::SocketDir {
                    path: dir.to_owned(),
                    run_as: self.run_as(),
                })
                .map(drop)
                .map_err(std::io::Error::from)
                .with_context(|| format!("cannot prepare the socket directory {}", dir.display()));
        }
        fs::create_dir_all(dir)?;
        let Some((uid, gid)) = self.run_as else {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
            return Ok(());
        };
        let (gid, mode) = match self.socket_group {
            Some(g) => (g, 0o710),
            None => (gid.as_raw(), 0o700),
        };
        lchown(dir, Some(uid.as_raw()), Some(gid))
            .with_context(|| format!("cannot give {} to the servers' user", dir.display()))?;
        if fs::symlink_metadata(dir)?.is_dir() {
            fs::set_permissions(dir, fs::Permissions::from_mode(mode))?;
        }
        Ok(())
    }

    /// Runs a command made by [`PgBin::command`] to its end (through the helper
    /// when separated). Blocking.
    pub fn output(&self, mut cmd: Command) -> std::io::Result<Output> {
        match privsep::channel() {
            Some(ch) => output_of(ch.call_blocking(run_op(&cmd, self.run_as())?)?),
            None => cmd.output(),
        }
    }

    /// [`PgBin::output`] for async callers.
    pub async fn output_async(&self, cmd: Command) -> std::io::Result<Output> {
        match privsep::channel() {
            Some(ch) => output_of(ch.call(run_op(&cmd, self.run_as())?).await?),
            None => tokio::process::Command::from(cmd).output().await,
        }
    }

    /// The bytes of a file the servers' user may own, never through a link.
    pub fn read_file(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        match privsep::channel() {
            Some(ch) => match ch.call_blocking(Op::ReadFile {
                path: path.to_owned(),
            })? {
                Reply::Bytes { bytes } => Ok(bytes),
                other => Err(unexpected(other)),
            },
            None => read_nofollow(path),
        }
    }

    /// Replaces `path` (in a directory the servers' user may write) with `bytes`,
    /// mode 0600, owned by that user; never writes through a link.
    pub fn give_file(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        match privsep::channel() {
            Some(ch) => ch
                .call_blocking(Op::ReplaceFile {
                    path: path.to_owned(),
                    bytes: bytes.to_vec(),
                    mode: PRIVATE,
                    owner: self.owner().map(Owner::from_pair),
                })
                .map(drop)
                .map_err(Into::into),
            None => replace_file(path, bytes, PRIVATE, self.owner()),
        }
    }

    /// Whether `path` exists, looked at as the helper when separated (the proxy's
    /// user cannot see into a server's data directory).
    pub fn exists(&self, path: &Path) -> bool {
        match privsep::channel() {
            Some(ch) => matches!(
                ch.call_blocking(Op::Exists {
                    path: path.to_owned()
                }),
                Ok(Reply::Exists { exists: true })
            ),
            None => path.exists(),
        }
    }

    /// Removes a file the servers' user may own; a missing one is not an error.
    pub fn remove_file(&self, path: &Path) -> std::io::Result<()> {
        match privsep::channel() {
            Some(ch) => ch
                .call_blocking(Op::RemoveFile {
                    path: path.to_owned(),
                })
                .map(drop)
                .map_err(Into::into),
            None => match fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        }
    }
}

/// The uid every server this process starts runs as: the servers' user when we
/// are root (or separated), else our own. Only processes of this uid are ever
/// signalled.
pub fn server_uid() -> u32 {
    static UID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UID.get_or_init(|| match service_user() {
        Ok(Some((uid, _))) => uid.as_raw(),
        _ => Uid::effective().as_raw(),
    })
}

/// `Some(servers' user)` when running as root, or separated from a helper that is.
fn service_user() -> Result<Option<(Uid, Gid)>> {
    if !Uid::effective().is_root() && privsep::channel().is_none() {
        return Ok(None);
    }
    let name = server_user_name();
    let user = User::from_name(name)
        .with_context(|| format!("looking up the {name} user"))?
        .ok_or_else(|| {
            anyhow!(
                "running as root, and PostgreSQL refuses to run as root; create a `{name}` \
                 system user (the Debian package creates `postgres`), name another one in \
                 process.server_user, or run offshoot as another user"
            )
        })?;
    Ok(Some((user.uid, user.gid)))
}

fn check(out: Output, what: &str) -> Result<Output> {
    if out.status.success() {
        return Ok(out);
    }
    bail!(
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim(),
        String::from_utf8_lossy(&out.stdout).trim()
    )
}

/// Quotes a value for postgresql.conf.
fn conf_value(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "''"))
}

/// A cluster in a data directory, listening on a private Unix socket directory and,
/// optionally, on a TCP address.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub bin: PgBin,
    pub data: PathBuf,
    pub socket_dir: PathBuf,
    pub port: u16,
    /// `listen_addresses`; empty means Unix socket only.
    pub listen: String,
    pub settings: Vec<(String, String)>,
}

impl Cluster {
    fn log_file(&self) -> PathBuf {
        self.data.with_extension("log")
    }

    /// Runs initdb unless the data directory is already a cluster. Local connections
    /// are trusted: the socket directory is private to the service user.
    pub fn init(&self, superuser: &str, fsync: bool) -> Result<bool> {
        if self.data.join("PG_VERSION").exists() {
            return Ok(false);
        }
        let parent = self.data.parent().context("data directory has no parent")?;
        fs::create_dir_all(parent)?;
        fs::create_dir_all(&self.data)?;
        fs::set_permissions(&self.data, fs::Permissions::from_mode(0o700))?;
        self.bin.hand_over(&self.data)?;
        let mut cmd = self.bin.command("initdb");
        cmd.arg("-D").arg(&self.data).args([
            "-U",
            superuser,
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        if !fsync {
            cmd.arg("--no-sync");
        }
        check(self.bin.output(cmd).context("running initdb")?, "initdb")?;
        // The data directory is the server's: read without following a link, and
        // replace the file rather than write through whatever has its name.
        let conf = self.data.join("postgresql.conf");
        let mut text = self
            .bin
            .read_file(&conf)
            .context("reading postgresql.conf")?;
        text.extend_from_slice(b"\ninclude_if_exists = 'offshoot.conf'\n");
        self.bin
            .give_file(&conf, &text)
            .context("writing postgresql.conf")?;
        Ok(true)
    }

    fn write_settings(&self) -> Result<()> {
        self.bin.prepare_socket_dir(&self.socket_dir)?;
        let mut text = String::from("# Written by offshoot at every start.\n");
        let mut all = vec![
            ("port".to_owned(), self.port.to_string()),
            ("listen_addresses".to_owned(), self.listen.clone()),
            (
                "unix_socket_directories".to_owned(),
                self.socket_dir.display().to_string(),
            ),
        ];
        all.extend(self.settings.iter().cloned());
        for (k, v) in all {
            text.push_str(&format!("{k} = {}\n", conf_value(&v)));
        }
        self.bin
            .give_file(&self.data.join("offshoot.conf"), text.as_bytes())
            .context("writing offshoot.conf")?;
        Ok(())
    }

    /// Whether a postmaster is running on this data directory.
    pub fn is_running(&self) -> bool {
        let mut cmd = self.bin.command("pg_ctl");
        cmd.arg("status").arg("-D").arg(&self.data);
        self.bin
            .output(cmd)
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// Starts the server (waiting until it accepts connections), or reuses one
    /// already running on this data directory. Returns whether it was started now.
    pub fn start(&self) -> Result<bool> {
        if self.socket_dir.as_os_str().len() + 16 > 107 {
            bail!(
                "socket directory {} is too long for a Unix socket path; use a shorter state.dir",
                self.socket_dir.display()
            );
        }
        if self.is_running() {
            return Ok(false);
        }
        self.write_settings()?;
        let log = self.log_file();
        self.bin
            .give_file(&log, b"")
            .context("creating the server log")?;
        let mut cmd = self.bin.command("pg_ctl");
        cmd.args(["start", "-w", "-t", "120", "-D"])
            .arg(&self.data)
            .arg("-l")
            .arg(&log);
        let out = self.bin.output(cmd).context("running pg_ctl start")?;
        if !out.status.success() {
            let tail = self.bin.read_file(&log).unwrap_or_default();
            let tail = String::from_utf8_lossy(&tail);
            let tail: Vec<&str> = tail.lines().rev().take(5).collect();
            bail!(
                "PostgreSQL did not start (data {}): {}",
                self.data.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            );
        }
        Ok(true)
    }

    /// Fast shutdown: sessions are ended, the server stops cleanly.
    pub fn stop(&self) -> Result<()> {
        if !self.is_running() {
            return Ok(());
        }
        let mut cmd = self.bin.command("pg_ctl");
        cmd.args(["stop", "-m", "fast", "-w", "-t", "60", "-D"])
            .arg(&self.data);
        let out = self.bin.output(cmd).context("running pg_ctl stop")?;
        check(out, "pg_ctl stop").map(|_| ())
    }

    /// A key=value connection string over the Unix socket.
    pub fn conn_string(&self, user: &str, dbname: &str) -> String {
        format!(
            "host={} port={} user={user} dbname={dbname}",
            self.socket_dir.display(),
            self.port
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conf_values_are_quoted() {
        assert_eq!(conf_value("a'b"), "'a''b'");
        assert_eq!(conf_value("c:\\x"), "'c:\\\\x'");
    }
}
