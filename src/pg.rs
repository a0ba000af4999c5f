//! Local PostgreSQL clusters: finding the binaries, initdb, start, stop.
//!
//! Used for the embedded server of the demo configuration and by the test harness
//! for throw-away clusters. PostgreSQL refuses to run as root, so when the proxy's
//! effective uid is 0 every server binary runs as the `postgres` system user, and
//! the directories it needs are handed to that user.

use std::fs;
use std::os::unix::fs::{lchown, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{anyhow, bail, Context, Result};
use nix::unistd::{Gid, Uid, User};

use crate::fsutil::{read_nofollow, replace_file, PRIVATE};

/// The directory holding initdb, postgres and pg_ctl.
#[derive(Debug, Clone)]
pub struct PgBin {
    dir: PathBuf,
    run_as: Option<(Uid, Gid)>,
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
        })
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

    /// Gives `path` to the service user (when we are root). A link is given, never
    /// what it points at (`lchown`).
    pub fn hand_over(&self, path: &Path) -> Result<()> {
        if let Some((uid, gid)) = self.run_as {
            lchown(path, Some(uid.as_raw()), Some(gid.as_raw()))
                .with_context(|| format!("cannot give {} to the postgres user", path.display()))?;
        }
        Ok(())
    }
}

/// The uid every server this process starts runs as: the `postgres` user when we
/// are root, else our own. Only processes of this uid are ever signalled.
pub fn server_uid() -> u32 {
    static UID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UID.get_or_init(|| match service_user() {
        Ok(Some((uid, _))) => uid.as_raw(),
        _ => Uid::effective().as_raw(),
    })
}

/// `Some(postgres user)` when running as root.
fn service_user() -> Result<Option<(Uid, Gid)>> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    let user = User::from_name("postgres")
        .context("looking up the postgres user")?
        .ok_or_else(|| {
            anyhow!(
                "running as root, and PostgreSQL refuses to run as root; create a `postgres` \
                 system user (the Debian package does) or run offshoot as another user"
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
        check(cmd.output().context("running initdb")?, "initdb")?;
        // The data directory is the server's: read without following a link, and
        // replace the file rather than write through whatever has its name.
        let conf = self.data.join("postgresql.conf");
        let mut text = read_nofollow(&conf).context("reading postgresql.conf")?;
        text.extend_from_slice(b"\ninclude_if_exists = 'offshoot.conf'\n");
        replace_file(&conf, &text, PRIVATE, self.bin.owner()).context("writing postgresql.conf")?;
        Ok(true)
    }

    fn write_settings(&self) -> Result<()> {
        fs::create_dir_all(&self.socket_dir)?;
        fs::set_permissions(&self.socket_dir, fs::Permissions::from_mode(0o700))?;
        self.bin.hand_over(&self.socket_dir)?;
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
        replace_file(
            &self.data.join("offshoot.conf"),
            text.as_bytes(),
            PRIVATE,
            self.bin.owner(),
        )
        .context("writing offshoot.conf")?;
        Ok(())
    }

    /// Whether a postmaster is running on this data directory.
    pub fn is_running(&self) -> bool {
        self.bin
            .command("pg_ctl")
            .arg("status")
            .arg("-D")
            .arg(&self.data)
            .output()
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
        replace_file(&log, b"", PRIVATE, self.bin.owner()).context("creating the server log")?;
        let out = self
            .bin
            .command("pg_ctl")
            .args(["start", "-w", "-t", "120", "-D"])
            .arg(&self.data)
            .arg("-l")
            .arg(&log)
            .output()
            .context("running pg_ctl start")?;
        if !out.status.success() {
            let tail = read_nofollow(&log).unwrap_or_default();
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
        let out = self
            .bin
            .command("pg_ctl")
            .args(["stop", "-m", "fast", "-w", "-t", "60", "-D"])
            .arg(&self.data)
            .output()
            .context("running pg_ctl stop")?;
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
