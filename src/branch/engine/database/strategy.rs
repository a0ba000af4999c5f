//! How `CREATE DATABASE` copies the template (`clone_strategy`), settled once per
//! source by asking its server.
//!
//! `auto` takes `STRATEGY FILE_COPY`: on failure (a full disk included) the server
//! removes what it copied, where the WAL_LOG strategy of 15 can leave files behind.
//! On PostgreSQL 18 and later it also sets `file_copy_method = clone`, once a probe
//! clone of an empty database has shown the server's filesystem takes it: on XFS or
//! Btrfs a clone then costs the same whatever the template's size.

use tokio::sync::SemaphorePermit;
use tokio_postgres::Client;
use tracing::{info, warn};

use super::DatabaseEngine;
use crate::branch::engine::naming::fit_ident;
use crate::branch::engine::CopyMode;
use crate::config::CloneStrategy;
use crate::error::EngineError;
use crate::names::{quote_ident, quote_literal};

/// Marks the probe database, so a probe left by a crash is known to be ours.
const PROBE_MARKER: &str = "offshoot-clone-probe";

impl CopyMode {
    /// What follows `TEMPLATE <db>` in `CREATE DATABASE` for this mode.
    pub(super) fn create_options(self) -> &'static str {
        match self {
            CopyMode::FileClone | CopyMode::FileCopy => " STRATEGY FILE_COPY",
            CopyMode::WalLog => " STRATEGY WAL_LOG",
            CopyMode::ServerDefault | CopyMode::Reflink | CopyMode::Copy => "",
        }
    }

    /// What the DDL session sets before `CREATE DATABASE` for this mode.
    pub(super) fn session_setting(self) -> Option<&'static str> {
        match self {
            CopyMode::FileClone => Some("SET file_copy_method = clone"),
            // The server's default (`copy`) on 18+, and no such setting before.
            _ => None,
        }
    }

    /// Whether `CREATE DATABASE` takes an `OID` (PostgreSQL 15 and later).
    pub(super) fn takes_oid(self) -> bool {
        !matches!(
            self,
            CopyMode::ServerDefault | CopyMode::Reflink | CopyMode::Copy
        )
    }
}

/// The mode a strategy gives on a server of `version` (`server_version_num`), before
/// any probe: `FileClone` means "if the probe works".
pub(super) fn planned(strategy: CloneStrategy, version: i32) -> CopyMode {
    match (strategy, version) {
        (_, v) if v < 150_000 => CopyMode::ServerDefault,
        (CloneStrategy::WalLog, _) => CopyMode::WalLog,
        (CloneStrategy::FileCopy, _) => CopyMode::FileCopy,
        (CloneStrategy::Auto, v) if v >= 180_000 => CopyMode::FileClone,
        (CloneStrategy::Auto, _) => CopyMode::FileCopy,
    }
}

impl DatabaseEngine {
    /// How this source's clones are made, settled on first use and logged once.
    pub(super) async fn copy_mode_now(&self) -> Result<CopyMode, EngineError> {
        self.mode
            .get_or_try_init(|| async {
                let client = self.client().await?;
                let row = client
                    .query_one("SELECT current_setting('server_version_num')::int", &[])
                    .await?;
                let version: i32 = row.get(0);
                let mut mode = planned(self.strategy, version);
                if mode == CopyMode::FileClone && !self.probe_clone().await? {
                    mode = CopyMode::FileCopy;
                }
                info!(
                    source = %self.source,
                    strategy = ?self.strategy,
                    server_version = version,
                    mode = mode.as_str(),
                    "database clones: CREATE DATABASE ... TEMPLATE{}",
                    mode.create_options()
                );
                Ok::<CopyMode, EngineError>(mode)
            })
            .await
            .copied()
    }

    /// A DDL session set up to copy a template the way this source's clones are
    /// made, with that way.
    pub(super) async fn clone_session(
        &self,
    ) -> Result<(CopyMode, Client, SemaphorePermit<'_>), EngineError> {
        let mode = self.copy_mode_now().await?;
        let (client, slot) = self.ddl_session().await?;
        if let Some(set) = mode.session_setting() {
            client.batch_execute(set).await?;
        }
        Ok((mode, client, slot))
    }

    /// Whether `file_copy_method = clone` works on the server's filesystem: one
    /// `CREATE DATABASE ... TEMPLATE template0 STRATEGY FILE_COPY` of an empty
    /// database, dropped again.
    async fn probe_clone(&self) -> Result<bool, EngineError> {
        let name = fit_ident("offshoot_clone_probe_", &self.source, &self.source);
        let db = quote_ident(&name);
        let (client, _slot) = self.ddl_session().await?;
        // A probe a crash left behind is ours only when it carries the marker.
        if let Some(comment) = self.lookup(&name).await? {
            if comment != PROBE_MARKER {
                warn!(database = %name, "a database has the clone probe's name; not probing");
                return Ok(false);
            }
            client
                .batch_execute(&format!("DROP DATABASE IF EXISTS {db}"))
                .await?;
        }
        // One statement per message: CREATE and DROP DATABASE refuse to run in the
        // implicit transaction of a multi-statement query.
        let set = CopyMode::FileClone
            .session_setting()
            .expect("file_clone has a session setting");
        if let Err(e) = client.batch_execute(set).await {
            warn!(source = %self.source, error = %e, "the server has no file_copy_method = clone");
            return Ok(false);
        }
        let made = client
            .batch_execute(&format!(
                "CREATE DATABASE {db} TEMPLATE template0 STRATEGY FILE_COPY"
            ))
            .await;
        match made {
            Ok(()) => {
                client
                    .batch_execute(&format!(
                        "COMMENT ON DATABASE {db} IS {}",
                        quote_literal(PROBE_MARKER)
                    ))
                    .await?;
                client.batch_execute(&format!("DROP DATABASE {db}")).await?;
                Ok(true)
            }
            Err(e) => {
                warn!(
                    source = %self.source,
                    error = %e,
                    "the server cannot clone files (file_copy_method = clone); its clones copy every byte"
                );
                Ok(false)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategies_map_to_what_each_server_version_has() {
        assert_eq!(
            planned(CloneStrategy::Auto, 140_010),
            CopyMode::ServerDefault
        );
        assert_eq!(
            planned(CloneStrategy::WalLog, 140_010),
            CopyMode::ServerDefault
        );
        assert_eq!(planned(CloneStrategy::Auto, 150_018), CopyMode::FileCopy);
        assert_eq!(planned(CloneStrategy::Auto, 170_010), CopyMode::FileCopy);
        assert_eq!(planned(CloneStrategy::Auto, 180_004), CopyMode::FileClone);
        assert_eq!(
            planned(CloneStrategy::FileCopy, 180_004),
            CopyMode::FileCopy
        );
        assert_eq!(planned(CloneStrategy::WalLog, 180_004), CopyMode::WalLog);
        assert_eq!(CopyMode::WalLog.create_options(), " STRATEGY WAL_LOG");
        assert_eq!(CopyMode::FileClone.create_options(), " STRATEGY FILE_COPY");
        assert_eq!(CopyMode::ServerDefault.create_options(), "");
        assert!(!CopyMode::ServerDefault.takes_oid());
        assert!(CopyMode::WalLog.takes_oid());
        assert_eq!(
            CopyMode::FileClone.session_setting(),
            Some("SET file_copy_method = clone")
        );
        assert_eq!(CopyMode::FileCopy.session_setting(), None);
    }
}
