//! The server of a branch: its settings, and the [`Servers`] capability the
//! registry starts, stops and finds it through.
//!
//! Invariant: branch servers listen on their socket directory only
//! (`listen_addresses = ''`), never archive WAL, and keep the snapshot's roles and
//! `pg_hba.conf`.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use async_trait::async_trait;
use tracing::info;

use super::layout::BRANCH_DIR_MODE;
use super::postmaster::{self, PidState, Server};
use super::InstanceEngine;
use crate::branch::engine::Servers;
use crate::branch::store::BranchRecord;
use crate::error::EngineError;

impl InstanceEngine {
    /// `-c` settings of a server on one of this source's data directories: size,
    /// then (for branch servers) the source's extras, then what isolation needs
    /// (these come last, so they win).
    pub(super) fn settings(
        &self,
        socket_dir: &Path,
        cluster_name: &str,
        extras: bool,
    ) -> Vec<(String, String)> {
        let mut s = vec![
            (
                "shared_buffers".to_owned(),
                self.config.shared_buffers.clone(),
            ),
            (
                "max_connections".to_owned(),
                self.config.max_connections.to_string(),
            ),
        ];
        if extras {
            s.extend(self.config.settings.clone());
        }
        let fixed = [
            ("port", postmaster::PORT.to_string()),
            ("listen_addresses", String::new()),
            ("unix_socket_directories", socket_dir.display().to_string()),
            // A clone must never push WAL into the source's archive.
            ("archive_mode", "off".into()),
            ("logging_collector", "off".into()),
            ("cluster_name", cluster_name.to_owned()),
        ];
        s.extend(fixed.into_iter().map(|(k, v)| (k.to_owned(), v)));
        s
    }

    pub(super) fn server<'a>(
        &'a self,
        data: &'a Path,
        socket_dir: &'a Path,
        log: &'a Path,
        settings: &'a [(String, String)],
    ) -> Server<'a> {
        Server {
            bin: &self.bin,
            data,
            socket_dir,
            log,
            settings,
        }
    }
}

/// Takes back a branch directory that an earlier version gave to the server's user,
/// so `postgres.log` is created where that user cannot plant a link.
fn reclaim(dir: &Path) -> Result<(), EngineError> {
    let meta = fs::symlink_metadata(dir)?;
    let me = nix::unistd::Uid::effective().as_raw();
    if meta.is_dir() && (meta.uid() != me || meta.mode() & 0o7777 != BRANCH_DIR_MODE) {
        super::privileged::reclaim(dir, BRANCH_DIR_MODE)?;
        info!(dir = %dir.display(), "took the branch directory back from the server's user");
    }
    Ok(())
}

#[async_trait]
impl Servers for InstanceEngine {
    async fn start(&self, rec: &BranchRecord) -> Result<(), EngineError> {
        let dir = self.layout.branch_dir(rec);
        if !self.own_meta(rec)?.is_some_and(|m| m.complete) {
            return Err(EngineError::NotFound(format!(
                "the clone of branch {} is gone",
                rec.id()
            )));
        }
        reclaim(&dir)?;
        let socket_dir = self.layout.socket_dir(rec);
        let settings = self.settings(
            &socket_dir,
            &format!("offshoot/{}/{}", rec.source, rec.branch),
            true,
        );
        let (data, log) = (dir.join("data"), dir.join("postgres.log"));
        self.server(&data, &socket_dir, &log, &settings)
            .start()
            .await
    }

    async fn stop(&self, rec: &BranchRecord) -> Result<(), EngineError> {
        postmaster::stop(
            &self.layout.branch_dir(rec).join("data"),
            &self.layout.socket_dir(rec),
        )
        .await
    }

    async fn running(&self, rec: &BranchRecord) -> Result<bool, EngineError> {
        let data = self.layout.branch_dir(rec).join("data");
        match postmaster::inspect(&data)? {
            PidState::Running { pid, ready } => {
                info!(branch = %rec.id(), pid, ready, "found the branch's server still running; reusing it");
                Ok(ready)
            }
            PidState::Stale => {
                info!(branch = %rec.id(), "the branch's server died; clearing its postmaster.pid");
                postmaster::stop(&data, &self.layout.socket_dir(rec)).await?;
                Ok(false)
            }
            PidState::Absent => Ok(false),
        }
    }
}
