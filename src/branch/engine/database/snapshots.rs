//! Snapshots of a `database` source: template databases of the proxy's own,
//! `<db>@<UTC time>`, marked `offshoot-snapshot:<source>/<name>` and closed to
//! connections.
//!
//! Invariant: a database is a snapshot only if the proxy made it: marked, named by
//! the rule and owned by the proxy's role. Anything else carrying the marker is
//! reported and never cloned.

use tracing::warn;

use super::{DatabaseEngine, SNAPSHOT_PREFIX};
use crate::branch::engine::naming::{
    fit_ident, new_snapshot_name, snapshot_time, valid_snapshot_name,
};
use crate::branch::engine::progress::SnapshotPhase;
use crate::branch::engine::{snapshot_missing, transform, SnapshotInfo};
use crate::error::EngineError;
use crate::names::{quote_ident, quote_literal};

/// A snapshot database found on the server.
pub(super) struct SnapshotDb {
    pub name: String,
    pub datname: String,
    pub size_bytes: u64,
}

/// `<template>@<snapshot>`, the template shortened with a hash when the whole is over
/// PostgreSQL's 63 bytes.
fn snapshot_db_name(template: &str, name: &str) -> String {
    fit_ident(template, &format!("@{name}"), template)
}

impl DatabaseEngine {
    pub(super) fn snapshot_marker(&self, name: &str) -> String {
        format!("{SNAPSHOT_PREFIX}{}/{name}", self.source)
    }

    /// This source's snapshot databases, oldest first.
    pub(super) async fn snapshot_dbs(&self) -> Result<Vec<SnapshotDb>, EngineError> {
        Ok(self.marked_snapshots().await?.0)
    }

    /// Databases marked as snapshots of this source: those the proxy made (named by
    /// the rule, owned by its role, besides the marker), oldest first; and the others
    /// with the reason they are not snapshots. A role that may create databases
    /// can write any comment: the marker alone proves nothing.
    pub(super) async fn marked_snapshots(
        &self,
    ) -> Result<(Vec<SnapshotDb>, Vec<(String, String)>), EngineError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT d.datname::text, shobj_description(d.oid, 'pg_database'), \
                 pg_database_size(d.oid), \
                 d.datdba = (SELECT oid FROM pg_roles WHERE rolname = current_user) \
                 FROM pg_database d \
                 WHERE shobj_description(d.oid, 'pg_database') LIKE 'offshoot-snapshot:%'",
                &[],
            )
            .await?;
        let prefix = format!("{SNAPSHOT_PREFIX}{}/", self.source);
        let mut list = Vec::new();
        let mut impostors = Vec::new();
        for r in &rows {
            let comment: String = r.get(1);
            let Some(name) = comment.strip_prefix(&prefix) else {
                continue;
            };
            let datname: String = r.get(0);
            let named =
                valid_snapshot_name(name) && datname == snapshot_db_name(&self.template, name);
            let owned: bool = r.get(3);
            if named && owned {
                list.push(SnapshotDb {
                    name: name.to_owned(),
                    datname,
                    // NULL for a database dropped while this query ran.
                    size_bytes: r.get::<_, Option<i64>>(2).unwrap_or(0).max(0) as u64,
                });
            } else {
                let why = if named {
                    "marked as a snapshot of this source but owned by another role: never cloned"
                } else {
                    "marked as a snapshot of this source but not named like one: never cloned"
                };
                impostors.push((datname, why.to_owned()));
            }
        }
        list.sort_by(|a, b| a.name.cmp(&b.name));
        Ok((list, impostors))
    }

    pub(super) fn snapshot_info(&self, s: &SnapshotDb) -> SnapshotInfo {
        SnapshotInfo {
            name: s.name.clone(),
            created_at: snapshot_time(&s.name).unwrap_or_default(),
            origin: format!(
                "CREATE DATABASE ... TEMPLATE {}",
                quote_ident(&self.template)
            ),
            size_bytes: s.size_bytes,
            branches: Vec::new(),
            progress: None,
        }
    }

    /// Takes a snapshot: a marked copy of the source, transformed, closed to
    /// connections.
    pub(super) async fn take(&self) -> Result<SnapshotInfo, EngineError> {
        let _one = self.taking.lock().await;
        self.take_locked().await
    }

    /// Takes the first snapshot, unless one exists by the time it may.
    pub(super) async fn take_if_none(&self) -> Result<(), EngineError> {
        let _one = self.taking.lock().await;
        if self.snapshot_dbs().await?.is_empty() {
            tracing::info!(source = %self.source, "no snapshot yet, and the source has transforms: taking the first one");
            self.take_locked().await?;
        }
        Ok(())
    }

    /// [`DatabaseEngine::take`]; the caller holds `taking`.
    async fn take_locked(&self) -> Result<SnapshotInfo, EngineError> {
        let existing = self.snapshot_dbs().await?;
        let name = new_snapshot_name(self.clock.now(), |n| existing.iter().any(|s| s.name == n));
        let datname = snapshot_db_name(&self.template, &name);
        let db = quote_ident(&datname);
        let taking = self.progress.begin(&self.source, &name, self.clock.now());
        let (mode, client, _slot) = self.clone_session().await?;
        let copy = mode.create_options();
        client
            .batch_execute(&format!(
                "CREATE DATABASE {db} TEMPLATE {}{copy}",
                quote_ident(&self.template)
            ))
            .await?;
        // Unmarked until here, so never cloned: a transform that fails (or a crash)
        // leaves nothing a branch could be made from.
        let transformed = if self.transforms.is_empty() {
            Ok(())
        } else {
            taking.phase(SnapshotPhase::Transforming);
            self.transform(&datname).await
        };
        let sealed = match transformed {
            Ok(()) => {
                taking.phase(SnapshotPhase::Sealing);
                // Marked, and closed to clients: nobody's session can block a clone.
                let seal = format!(
                    "COMMENT ON DATABASE {db} IS {}; ALTER DATABASE {db} ALLOW_CONNECTIONS false",
                    quote_literal(&self.snapshot_marker(&name))
                );
                client.batch_execute(&seal).await.map_err(EngineError::from)
            }
            Err(e) => Err(e),
        };
        if let Err(e) = sealed {
            // WITH (FORCE): the transform's session may not have closed yet.
            if let Err(drop_err) = client
                .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                .await
            {
                warn!(database = %datname, error = %drop_err, "could not remove an unsealed snapshot");
            }
            return Err(e);
        }
        let size_bytes = client
            .query_one(
                "SELECT pg_database_size(oid) FROM pg_database WHERE datname = $1",
                &[&datname],
            )
            .await
            .map(|r| r.get::<_, i64>(0).max(0) as u64)
            .unwrap_or(0);
        tracing::info!(source = %self.source, snapshot = %name, database = %datname, "snapshot taken");
        Ok(self.snapshot_info(&SnapshotDb {
            name,
            datname,
            size_bytes,
        }))
    }

    /// Runs the source's transforms in snapshot database `datname`, as the proxy's
    /// role (its owner), on a session of their own.
    async fn transform(&self, datname: &str) -> Result<(), EngineError> {
        let mut config = self.admin.clone();
        config.dbname(datname);
        let client = self
            .upstream
            .pg_connect(&config, "snapshot transform")
            .await?;
        transform::run_all(&client, &self.transforms).await
    }

    /// Drops one of this source's snapshots.
    pub(super) async fn drop_snapshot(&self, name: &str) -> Result<(), EngineError> {
        let _one = self.taking.lock().await;
        let snapshots = self.snapshot_dbs().await?;
        let snap = snapshots
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| snapshot_missing(&self.source, name))?;
        let (client, _slot) = self.ddl_session().await?;
        client
            .batch_execute(&format!("DROP DATABASE {}", quote_ident(&snap.datname)))
            .await?;
        tracing::info!(source = %self.source, snapshot = name, "snapshot deleted");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::MAX_IDENT_LEN;

    #[test]
    fn snapshot_names_fit_postgres_limit() {
        assert_eq!(
            snapshot_db_name("shop", "20261125T031532Z"),
            "shop@20261125T031532Z"
        );
        let long = "t".repeat(60);
        let name = snapshot_db_name(&long, "20261125T031532Z-2");
        assert!(name.len() <= MAX_IDENT_LEN, "{name}");
        assert!(name.ends_with("@20261125T031532Z-2"), "{name}");
    }
}
