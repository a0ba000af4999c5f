//! Snapshots of an `instance` source: a copy of the source's data directory
//! (`pg_basebackup`, or a stopped data directory copied file by file), sealed by one
//! clean start and stop so clones start without replaying WAL.
//!
//! Invariant: a snapshot is never changed after it is sealed, and is deleted only
//! when no `branch.json` names it. Clones read a snapshot under a shared lock and
//! deletions take it exclusively, so a clone in the making always counts as a user.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::sync::RwLockReadGuard;
use tracing::{info, warn};

use super::copy::{copy_tree, tree_size, CopyPlan};
use super::layout::{
    BranchMeta, SnapshotMeta, BRANCH_DIR_MODE, DELETING_PREFIX, PARTIAL_MARKER, PARTIAL_PREFIX,
    SNAPSHOT_META,
};
use super::postmaster::{self, PidState};
use super::privileged::{freeze, remove_tree};
use super::{join_failed, InstanceEngine};
use crate::branch::engine::naming::{new_snapshot_name, valid_snapshot_name};
use crate::branch::engine::progress::{SnapshotPhase, Taking};
use crate::branch::engine::{snapshot_in_use, snapshot_missing, transform, SnapshotInfo};
use crate::branch::store::unix_ms;
use crate::error::EngineError;
use crate::fsutil::{sync_dir, write_json_atomic};

/// Where a source's snapshots come from.
#[derive(Debug, Clone)]
pub enum Origin {
    /// A running server, copied with `pg_basebackup -X stream`.
    Upstream(String),
    /// A stopped data directory, copied file by file.
    DataDir(PathBuf),
}

impl Origin {
    pub(super) fn describe(&self) -> String {
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

/// A libpq connection string without its password, and the password. Both forms
/// are handled: `postgres://user:password@host/db?password=...` and
/// `host=... password='...'`.
pub(super) fn without_password(conn: &str) -> (String, Option<String>) {
    let password = conn.parse::<tokio_postgres::Config>().ok().and_then(|c| {
        c.get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
    });
    let stripped = if let Some(after) = ["postgresql://", "postgres://"]
        .iter()
        .find_map(|scheme| conn.strip_prefix(scheme).map(|rest| (*scheme, rest)))
    {
        let (scheme, rest) = after;
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let authority = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => {
                let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
                format!("{user}@{hosts}")
            }
            None => authority.to_owned(),
        };
        let tail = match tail.split_once('?') {
            Some((path, query)) => {
                let kept: Vec<&str> = query
                    .split('&')
                    .filter(|kv| kv.split('=').next() != Some("password"))
                    .collect();
                if kept.is_empty() {
                    path.to_owned()
                } else {
                    format!("{path}?{}", kept.join("&"))
                }
            }
            None => tail.to_owned(),
        };
        format!("{scheme}{authority}{tail}")
    } else {
        keyword_pairs(conn)
            .into_iter()
            .filter(|(key, _)| key != "password")
            .map(|(_, pair)| pair)
            .collect::<Vec<_>>()
            .join(" ")
    };
    (stripped, password)
}

/// The `key = value` pairs of a keyword/value connection string, each with its key
/// and its text as written (quotes and escapes kept).
fn keyword_pairs(conn: &str) -> Vec<(String, String)> {
    let chars: Vec<char> = conn.chars().collect();
    let mut pairs = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        let start = i;
        while i < chars.len() && chars[i] != '=' && !chars[i].is_whitespace() {
            i += 1;
        }
        let key: String = chars[start..i].iter().collect();
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        if i < chars.len() && chars[i] == '=' {
            i += 1;
        }
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        if i < chars.len() && chars[i] == '\'' {
            i += 1;
            while i < chars.len() && chars[i] != '\'' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else {
            while i < chars.len() && !chars[i].is_whitespace() {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
        }
        let end = i.min(chars.len());
        if !key.is_empty() {
            let value: String = chars[start..end].iter().collect();
            pairs.push((key, value));
        }
    }
    pairs
}

impl InstanceEngine {
    pub(super) fn info(&self, m: &SnapshotMeta, users: &[BranchMeta]) -> SnapshotInfo {
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
            progress: None,
        }
    }

    /// Removes snapshot directories an interrupted `take_snapshot` or deletion left:
    /// provably ours by their prefix and, for partial ones, a marker file.
    pub(super) fn clear_interrupted_snapshots(&self) {
        let Ok(entries) = fs::read_dir(self.layout.snapshots()) else {
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
            let _ = postmaster::quit(&path.join("data"));
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
    pub(super) async fn pick_snapshot(
        &self,
        wanted: Option<&str>,
    ) -> Result<(String, RwLockReadGuard<'_, ()>), EngineError> {
        loop {
            let guard = self.snapshot_lock.read().await;
            let metas = self.layout.snapshot_metas();
            if let Some(want) = wanted {
                if metas.iter().any(|m| m.name == want) {
                    return Ok((want.to_owned(), guard));
                }
                return Err(snapshot_missing(self.source.as_str(), want));
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
        if self.layout.snapshot_metas().is_empty() {
            self.take_locked().await?;
        }
        Ok(())
    }

    /// Takes and seals a snapshot; the caller holds `taking`.
    pub(super) async fn take_locked(&self) -> Result<SnapshotMeta, EngineError> {
        let now = self.clock.now();
        let name = new_snapshot_name(now, |n| self.layout.snapshot_dir(n).exists());
        let partial = self.layout.partial_snapshot_dir(&name);
        let started = self.clock.instant();
        let taking = self.progress.begin(self.source.as_str(), &name, now);
        let result = self.fill_and_seal(&partial, &name, now, &taking).await;
        match result {
            Ok(meta) => {
                let io = |e| EngineError::io("sealing the snapshot", e);
                fs::remove_file(partial.join(PARTIAL_MARKER)).map_err(io)?;
                fs::rename(&partial, self.layout.snapshot_dir(&name)).map_err(io)?;
                sync_dir(&self.layout.snapshots()).map_err(io)?;
                info!(source = %self.source, snapshot = %name, bytes = meta.size_bytes,
                      ms = started.elapsed().as_millis() as u64, "snapshot taken and sealed");
                // Spares of the older snapshot are replaced by ones of this one.
                self.spares.wake();
                Ok(meta)
            }
            Err(e) => {
                let data = partial.join("data");
                let _ = postmaster::stop(&data, &self.layout.seal_socket_dir()).await;
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
        taking: &Taking,
    ) -> Result<SnapshotMeta, EngineError> {
        let io = |e| EngineError::io("taking a snapshot", e);
        // The snapshot's directory stays the proxy's, like a branch's: only data/ is
        // the servers' user's, so snapshot.json and seal.log are out of its reach.
        fs::create_dir_all(partial).map_err(io)?;
        fs::set_permissions(partial, fs::Permissions::from_mode(BRANCH_DIR_MODE)).map_err(io)?;
        fs::write(partial.join(PARTIAL_MARKER), self.source.as_str()).map_err(io)?;
        let data = partial.join("data");
        // Bytes copied, measured on disk while the copy runs.
        let watching = {
            let data = data.clone();
            taking.watch(Duration::from_secs(1), move || tree_size(&data))
        };
        let copied = self.fill(&data).await;
        watching.abort();
        copied?;
        taking.copied(tree_size(&data));
        taking.phase(SnapshotPhase::Sealing);
        if !self.bin.exists(&data.join("postgresql.conf")) {
            // Debian keeps it under /etc; the settings that matter are passed at start.
            // Created by rename, given by descriptor: never through a planted link.
            let conf = data.join("postgresql.conf");
            self.bin.give_file(&conf, b"").map_err(io)?;
        }
        if !self.bin.exists(&data.join("pg_hba.conf")) {
            return Err(EngineError::failed(
                "the copied data directory has no pg_hba.conf (Debian keeps it under \
                 /etc/postgresql); copy it into the data directory first",
            ));
        }
        // Seal: run recovery to its end and shut down cleanly, so clones start
        // without replaying WAL.
        let socket_dir = self.layout.seal_socket_dir();
        let log = partial.join("seal.log");
        let settings = self.settings(
            &socket_dir,
            &format!("offshoot/{}/seal", self.source),
            false,
        );
        self.server(&data, &socket_dir, &log, &settings)
            .start()
            .await
            .map_err(|e| match e {
                EngineError::StartFailed { fatal } => EngineError::StartFailed {
                    fatal: format!("sealing the snapshot: {fatal}"),
                },
                other => other,
            })?;
        if !self.transforms.is_empty() {
            // On the snapshot's own server, before it is sealed; a failure discards
            // the snapshot (the caller stops the server and removes the directory).
            taking.phase(SnapshotPhase::Transforming);
            self.run_transforms(&socket_dir).await?;
            taking.phase(SnapshotPhase::Sealing);
        }
        postmaster::stop(&data, &socket_dir).await?;
        let _ = self.bin.remove_file(&data.join("postmaster.opts"));
        // Sealed (after its transforms): out of the servers' user's hands from now on.
        freeze(&data).map_err(io)?;
        let meta = SnapshotMeta {
            source: self.source.to_string(),
            name: name.to_owned(),
            created_at: unix_ms(now),
            origin: self.origin.describe(),
            size_bytes: tree_size(&data),
        };
        write_json_atomic(&partial.join(SNAPSHOT_META), &meta).map_err(io)?;
        Ok(meta)
    }

    /// Copies the source's data into `data` (an empty directory is made for
    /// `pg_basebackup`).
    async fn fill(&self, data: &Path) -> Result<(), EngineError> {
        let io = |e| EngineError::io("taking a snapshot", e);
        let data = data.to_path_buf();
        match &self.origin {
            Origin::Upstream(conn) => {
                // pg_basebackup runs as the servers' user and fills an empty directory.
                fs::create_dir(&data).map_err(io)?;
                fs::set_permissions(&data, fs::Permissions::from_mode(0o700)).map_err(io)?;
                self.bin.hand_over(&data).map_err(|e| {
                    EngineError::failed_with("cannot take a snapshot", format!("{e:#}"))
                })?;
                let mut cmd = self.bin.command("pg_basebackup");
                // The password goes through the environment (readable only by the
                // process's own user), never on a command line anyone can list.
                let (conninfo, password) = without_password(conn);
                cmd.arg("-D")
                    .arg(&data)
                    .args(["-X", "stream", "-c", "fast", "--no-password", "-d"])
                    .arg(conninfo)
                    .env_remove("PGPASSWORD");
                if let Some(password) = password {
                    cmd.env("PGPASSWORD", password);
                }
                let out = self.bin.output_async(cmd).await.map_err(|e| {
                    EngineError::failed_with("cannot run pg_basebackup", format!("{e}"))
                })?;
                if !out.status.success() {
                    // Its stderr may name paths and hosts: for the log only.
                    return Err(EngineError::failed_with(
                        "pg_basebackup of the source failed; the proxy's log has its output",
                        format!(
                            "{}: {}",
                            out.status,
                            String::from_utf8_lossy(&out.stderr).trim()
                        ),
                    ));
                }
            }
            Origin::DataDir(dir) => {
                match postmaster::inspect(dir).map_err(io)? {
                    PidState::Running { pid, .. } => {
                        return Err(EngineError::conflict(
                            format!(
                                "the source's data_dir is in use by a running server (pid \
                                 {pid}); stop it, or copy from it with `upstream`"
                            ),
                            Some(dir.display().to_string()),
                        ))
                    }
                    PidState::Stale | PidState::Absent => {}
                }
                if !self.bin.exists(&dir.join("PG_VERSION")) {
                    return Err(EngineError::failed_with(
                        "the source's data_dir is not a PostgreSQL data directory",
                        dir.display(),
                    ));
                }
                let (from, to, owner) = (dir.clone(), data.clone(), self.bin.owner());
                let try_reflink = self.try_reflink();
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
                .map_err(join_failed)?
                .map_err(|e| EngineError::io("copying the source's data_dir", e))?;
            }
        }
        Ok(())
    }

    /// Runs the source's transforms on the sealing server listening in
    /// `socket_dir` (see [`InstanceEngine::local_config`]).
    async fn run_transforms(&self, socket_dir: &Path) -> Result<(), EngineError> {
        let config = self.local_config(socket_dir, "offshoot snapshot transform");
        let (client, conn) = config.connect(tokio_postgres::NoTls).await.map_err(|e| {
            EngineError::failed_with(
                "cannot connect to the new snapshot's server to run its transforms",
                e,
            )
        })?;
        let session = tokio::spawn(conn);
        let result = transform::run_all(&client, &self.transforms).await;
        drop(client);
        let _ = session.await;
        result
    }

    /// A session on the server listening in `socket_dir` (one of this source's),
    /// in the branches' database, as the role snapshots are copied with (`postgres`
    /// for a `data_dir` source).
    pub(super) fn local_config(
        &self,
        socket_dir: &Path,
        application_name: &str,
    ) -> tokio_postgres::Config {
        let (user, password) = match &self.origin {
            Origin::Upstream(conn) => match conn.parse::<tokio_postgres::Config>() {
                Ok(c) => (
                    c.get_user().unwrap_or("postgres").to_owned(),
                    c.get_password().map(<[u8]>::to_vec),
                ),
                Err(_) => ("postgres".to_owned(), None),
            },
            Origin::DataDir(_) => ("postgres".to_owned(), None),
        };
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(socket_dir)
            .port(postmaster::PORT)
            .user(&user)
            .dbname(&self.database)
            .application_name(application_name);
        if let Some(p) = password {
            config.password(p);
        }
        config
    }

    /// Deletes a snapshot no branch uses.
    pub(super) async fn delete_unused_snapshot(&self, name: &str) -> Result<(), EngineError> {
        if !valid_snapshot_name(name) {
            return Err(snapshot_missing(self.source.as_str(), name));
        }
        let _exclusive = self.snapshot_lock.write().await;
        if !self.layout.snapshot_metas().iter().any(|m| m.name == name) {
            return Err(snapshot_missing(self.source.as_str(), name));
        }
        let users: Vec<String> = self
            .layout
            .all_branch_meta(self.source.as_str())
            .into_iter()
            .filter(|m| m.snapshot == name)
            .map(|m| m.branch)
            .collect();
        if !users.is_empty() {
            return Err(snapshot_in_use(name, &users));
        }
        self.recycle_spares_of(name).await;
        // Renamed first, so an interrupted removal is recognised and finished later.
        let doomed = self.layout.deleting_snapshot_dir(name);
        fs::rename(self.layout.snapshot_dir(name), &doomed)
            .map_err(|e| EngineError::io("deleting the snapshot", e))?;
        remove_tree(&doomed).map_err(|e| EngineError::io("deleting the snapshot", e))?;
        info!(source = %self.source, snapshot = name, "snapshot deleted");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_leave_the_connection_string() {
        let cases = [
            (
                "postgres://rep:s3cret@db.internal:5433/postgres?sslmode=require",
                "postgres://rep@db.internal:5433/postgres?sslmode=require",
            ),
            (
                "postgresql://rep@db/postgres?password=s3cret&sslmode=require",
                "postgresql://rep@db/postgres?sslmode=require",
            ),
            (
                "host=db port=5433 user=rep password='s3 cret\\' x' sslmode=require",
                "host=db port=5433 user=rep sslmode=require",
            ),
            ("host=db user=rep password = s3cret", "host=db user=rep"),
        ];
        for (conn, want) in cases {
            let (stripped, password) = without_password(conn);
            assert_eq!(stripped, want, "{conn}");
            assert!(!stripped.contains("s3"), "{stripped}");
            assert!(password.is_some_and(|p| p.starts_with("s3")), "{conn}");
        }
        let (stripped, password) = without_password("host=db user=rep");
        assert_eq!((stripped.as_str(), password), ("host=db user=rep", None));
    }

    #[test]
    fn origins_never_show_passwords() {
        let o = Origin::Upstream("postgres://rep:secret@db.internal:5433/postgres".into());
        assert_eq!(o.describe(), "pg_basebackup of db.internal:5433");
    }
}
