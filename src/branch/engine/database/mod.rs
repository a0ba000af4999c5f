//! The `database` engine: a branch is `CREATE DATABASE <clone> TEMPLATE <source>` on the
//! source's own server.
//!
//! Ownership is written into the clone itself (`COMMENT ON DATABASE ... IS
//! 'offshoot:<source>/<branch>'`), so the engine can refuse to drop any database that
//! does not carry its marker, whatever the record files say. The administrative session
//! never connects to the template (that would make every clone fail with 55006).
//!
//! Snapshots: `offshoot snapshot create` copies the source once into a template
//! database of the proxy's own, `<db>@<UTC time>`, marked `offshoot-snapshot:<source>/
//! <name>` and closed to connections (`ALLOW_CONNECTIONS false`). While a source has
//! snapshots, branches are cloned from the newest (or the one asked for), so a session
//! on the live source no longer blocks them; without any, they clone the live source.

mod snapshots;
mod strategy;

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::Mutex;
use tokio_postgres::config::Host;
use tokio_postgres::Client;
use tracing::warn;

use super::naming::{fit_ident, fnv64};
use super::{
    snapshot_missing, CopyMode, Endpoint, Engine, Made, Recovered, ServerAddr, SnapshotInfo,
};
use crate::branch::store::BranchRecord;
use crate::clock::Clock;
use crate::config::CloneStrategy;
use crate::error::EngineError;
use crate::names::{quote_ident, quote_literal, BranchId};

const MARKER_PREFIX: &str = "offshoot:";
const SNAPSHOT_PREFIX: &str = "offshoot-snapshot:";

/// CREATE/DROP DATABASE statements run at once per source. Each gets its own session:
/// on a shared one they would queue behind each other, and so would the marker
/// comment of a finished clone behind every later CREATE.
const PARALLEL_DDL: usize = 4;

pub struct DatabaseEngine {
    /// The source's name (in snapshot markers).
    source: String,
    /// The template database.
    template: String,
    admin: tokio_postgres::Config,
    addr: ServerAddr,
    /// TLS for the administrative sessions (`server_tls`).
    upstream: crate::upstream::Upstream,
    /// Shared session for quick catalog look-ups.
    client: Mutex<Option<Arc<Client>>>,
    ddl_slots: tokio::sync::Semaphore,
    /// One snapshot is taken at a time.
    taking: Mutex<()>,
    /// Snapshot names.
    clock: Clock,
    /// `clone_strategy`.
    strategy: CloneStrategy,
    /// How clones are made on this server, settled on first use.
    mode: tokio::sync::OnceCell<CopyMode>,
    /// `snapshot_transform`: run on each new snapshot before it is marked.
    transforms: Vec<super::transform::Transform>,
    /// The snapshot being taken, for the API.
    progress: super::progress::Tracker,
}

impl DatabaseEngine {
    /// `server` is a connection string for a role allowed to create databases.
    pub fn new(
        server: &str,
        template: &str,
        upstream: &crate::upstream::Upstream,
        clock: Clock,
    ) -> Result<Self, EngineError> {
        let mut admin: tokio_postgres::Config = server
            .parse()
            .map_err(|e| EngineError::failed(format!("bad server connection string: {e}")))?;
        // Never administer from inside the template: one session there blocks cloning.
        let dbname = match admin.get_dbname() {
            Some(db) if db != template => db.to_owned(),
            _ => "postgres".to_owned(),
        };
        admin.dbname(&dbname);
        upstream.apply(&mut admin);
        if admin.get_application_name().is_none() {
            admin.application_name("offshoot");
        }
        let port = admin.get_ports().first().copied().unwrap_or(5432);
        let addr = match admin.get_hosts().first() {
            Some(Host::Tcp(h)) => ServerAddr::Tcp {
                host: h.clone(),
                port,
            },
            Some(Host::Unix(dir)) => ServerAddr::Unix(dir.join(format!(".s.PGSQL.{port}"))),
            None => ServerAddr::Unix(format!("/var/run/postgresql/.s.PGSQL.{port}").into()),
        };
        Ok(Self {
            source: template.to_owned(),
            template: template.to_owned(),
            admin,
            addr,
            upstream: upstream.clone(),
            client: Mutex::new(None),
            ddl_slots: tokio::sync::Semaphore::new(PARALLEL_DDL),
            taking: Mutex::new(()),
            clock,
            strategy: CloneStrategy::default(),
            mode: tokio::sync::OnceCell::new(),
            transforms: Vec::new(),
            progress: Default::default(),
        })
    }

    /// Sets `snapshot_transform`. A source with transforms never clones its live
    /// database: a branch made before any snapshot exists takes one first.
    pub fn with_transforms(mut self, transforms: Vec<super::transform::Transform>) -> Self {
        self.transforms = transforms;
        self
    }

    /// Sets `clone_strategy` (default `auto`).
    pub fn with_strategy(mut self, strategy: CloneStrategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// Names the source in snapshot markers (defaults to the template's name).
    pub fn for_source(mut self, source: &str) -> Self {
        self.source = source.to_owned();
        self
    }

    /// The administrative session, reconnected when it has dropped.
    async fn client(&self) -> Result<Arc<Client>, EngineError> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref() {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        let client = self
            .upstream
            .pg_connect(&self.admin, "administrative")
            .await?;
        let client = Arc::new(client);
        *slot = Some(client.clone());
        Ok(client)
    }

    /// A session of its own for one slow statement (CREATE or DROP DATABASE), taken
    /// with one of the `PARALLEL_DDL` slots.
    async fn ddl_session(&self) -> Result<(Client, tokio::sync::SemaphorePermit<'_>), EngineError> {
        let permit = self
            .ddl_slots
            .acquire()
            .await
            .map_err(|_| EngineError::failed("the engine is shutting down"))?;
        let client = self.upstream.pg_connect(&self.admin, "DDL").await?;
        Ok((client, permit))
    }

    fn marker(id: &BranchId) -> String {
        format!("{MARKER_PREFIX}{id}")
    }

    /// `Some(comment)` when the database exists (comment may be empty).
    async fn lookup(&self, name: &str) -> Result<Option<String>, EngineError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT coalesce(shobj_description(oid, 'pg_database'), '') \
                 FROM pg_database WHERE datname = $1",
                &[&name],
            )
            .await?;
        Ok(row.map(|r| r.get::<_, String>(0)))
    }

    /// Terminates server sessions still running `CREATE DATABASE "<clone>"`, and
    /// waits until they are gone (the statement rolls back with its session).
    async fn stop_orphaned_create(&self, clone: &str) -> Result<(), EngineError> {
        let client = self.client().await?;
        let prefix = format!("CREATE DATABASE {} ", quote_ident(clone));
        let rows = client
            .query(
                "SELECT pid, query FROM pg_stat_activity \
                 WHERE pid <> pg_backend_pid() AND state = 'active' \
                 AND query LIKE 'CREATE DATABASE %'",
                &[],
            )
            .await?;
        for row in rows {
            let (pid, query): (i32, String) = (row.get(0), row.get(1));
            if !query.starts_with(&prefix) {
                continue;
            }
            warn!(
                clone,
                pid, "stopping a creation left running by an earlier proxy"
            );
            // Waits up to 10 s for the session to end.
            client
                .query_one("SELECT pg_terminate_backend($1, 10000)", &[&pid])
                .await?;
        }
        Ok(())
    }

    /// The OID of database `name`, if it exists.
    async fn oid_of(&self, name: &str) -> Result<Option<u32>, EngineError> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT oid FROM pg_database WHERE datname = $1", &[&name])
            .await?;
        Ok(row.map(|r| r.get::<_, u32>(0)))
    }

    /// A failed `CREATE DATABASE` of `rec`'s clone, in words for people.
    fn create_error(&self, rec: &BranchRecord, e: tokio_postgres::Error) -> EngineError {
        if e.as_db_error()
            .is_some_and(|db| db.code() == &tokio_postgres::error::SqlState::DUPLICATE_DATABASE)
        {
            return EngineError::conflict(
                format!(
                    "a database named \"{}\" already exists, and the proxy did not make it; \
                     drop or rename it to use branch {} (see /api/v1/orphans)",
                    rec.clone_name,
                    rec.id()
                ),
                None,
            );
        }
        e.into()
    }

    /// Ensures the template exists, so a missing source gives a clear error.
    pub async fn check_template(&self) -> Result<(), EngineError> {
        if self.lookup(&self.template).await?.is_none() {
            return Err(EngineError::NotFound(format!(
                "source database \"{}\" does not exist on the server",
                self.template
            )));
        }
        Ok(())
    }
}

/// The OIDs a creation of `rec` gives its clone, in the order tried: derived from
/// what the record held before `CREATE DATABASE` ran (the branch and the creation's
/// time), so after a crash an unmarked database under that name is provably the
/// proxy's exactly when its OID is one of these. Above the range initdb uses.
fn clone_oids(rec: &BranchRecord) -> [u32; 3] {
    const FIRST_NORMAL_OID: u64 = 16_384;
    let span = u64::from(u32::MAX) - FIRST_NORMAL_OID;
    let mut oids = [0; 3];
    for (k, oid) in oids.iter_mut().enumerate() {
        let h = fnv64(&format!(
            "{}/{}@{}#{k}",
            rec.source, rec.branch, rec.created_at
        ));
        *oid = (FIRST_NORMAL_OID + h % span) as u32;
    }
    oids
}

/// Whether a `CREATE DATABASE ... OID n` failed only because `n` is in use.
fn oid_taken(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        db.code() == &tokio_postgres::error::SqlState::INVALID_PARAMETER_VALUE
            && db.message().contains("OID")
    })
}

/// `<template>__<branch>`, shortened with a hash when over PostgreSQL's 63 bytes.
fn clone_db_name(template: &str, id: &BranchId) -> String {
    fit_ident(template, &format!("__{}", id.branch), &id.to_string())
}

#[async_trait]
impl Engine for DatabaseEngine {
    fn clone_name(&self, id: &BranchId) -> String {
        clone_db_name(&self.template, id)
    }

    async fn create(&self, rec: &BranchRecord) -> Result<Made, EngineError> {
        // The snapshot asked for, else the newest, else the live source (unless the
        // source has transforms: then a snapshot is taken first).
        let mut snapshots = self.snapshot_dbs().await?;
        if snapshots.is_empty() && !self.transforms.is_empty() {
            self.take_if_none().await?;
            snapshots = self.snapshot_dbs().await?;
        }
        let from = match &rec.snapshot {
            Some(want) => Some(
                snapshots
                    .iter()
                    .find(|s| &s.name == want)
                    .ok_or_else(|| snapshot_missing(&self.source, want))?,
            ),
            None => snapshots.last(),
        };
        let template = from.map_or(self.template.as_str(), |s| s.datname.as_str());
        let (mode, client, _slot) = self.clone_session().await?;
        let copy = mode.create_options();
        let clone = quote_ident(&rec.clone_name);
        let create = |oid: Option<u32>| {
            let oid = oid.map(|o| format!(" OID {o}")).unwrap_or_default();
            format!(
                "CREATE DATABASE {clone} TEMPLATE {}{copy}{oid}",
                quote_ident(template)
            )
        };
        // The OID is the proof of ownership until the marker is written: it is
        // derived from the record, which was saved before this statement.
        let mut made = false;
        if !mode.takes_oid() {
            client
                .batch_execute(&create(None))
                .await
                .map_err(|e| self.create_error(rec, e))?;
            made = true;
        } else {
            for oid in clone_oids(rec) {
                match client.batch_execute(&create(Some(oid))).await {
                    Ok(()) => {
                        made = true;
                        break;
                    }
                    // Taken by another database (or its leftover directory): the next.
                    Err(e) if oid_taken(&e) => continue,
                    Err(e) => return Err(self.create_error(rec, e)),
                }
            }
        }
        if !made {
            // Every derived OID is taken (vanishingly rare): made without one, the
            // clone is provably ours once marked, and left alone if a crash comes
            // first.
            warn!(clone = %rec.clone_name, "every derived OID is taken; creating without one");
            client
                .batch_execute(&create(None))
                .await
                .map_err(|e| self.create_error(rec, e))?;
        }
        let comment = format!(
            "COMMENT ON DATABASE {clone} IS {}",
            quote_literal(&Self::marker(&rec.id()))
        );
        if let Err(e) = client.batch_execute(&comment).await {
            // We made it a moment ago in this session; nobody else can own it yet.
            if let Err(drop_err) = client
                .batch_execute(&format!("DROP DATABASE IF EXISTS {clone}"))
                .await
            {
                warn!(clone = %rec.clone_name, error = %drop_err, "could not remove unmarked clone");
            }
            return Err(e.into());
        }
        Ok(Made {
            snapshot: from.map(|s| s.name.clone()),
            copy_mode: Some(mode),
            spare: false,
        })
    }

    async fn recover(&self, rec: &BranchRecord) -> Result<Recovered, EngineError> {
        // A CREATE DATABASE sent before the crash may still be running on the server
        // (a backend notices its vanished client only when the statement ends). Left
        // alone it would commit after this check and block the branch; stop it first.
        self.stop_orphaned_create(&rec.clone_name).await?;
        match self.lookup(&rec.clone_name).await? {
            None => Ok(Recovered::Absent),
            Some(comment) if comment == Self::marker(&rec.id()) => Ok(Recovered::Complete {
                snapshot: None,
                copy_mode: None,
            }),
            Some(comment) if comment.is_empty() => {
                // CREATE DATABASE is atomic: it exists, so it is complete. It is ours
                // only if it has an OID this record's creation would have given it;
                // a database someone else made under that name is left alone.
                let oid = self.oid_of(&rec.clone_name).await?;
                if !oid.is_some_and(|o| clone_oids(rec).contains(&o)) {
                    warn!(
                        clone = %rec.clone_name,
                        oid,
                        "an unmarked database holds the name of an interrupted creation, \
                         and nothing proves the proxy made it: leaving it alone"
                    );
                    return Ok(Recovered::Absent);
                }
                let client = self.client().await?;
                client
                    .batch_execute(&format!(
                        "COMMENT ON DATABASE {} IS {}",
                        quote_ident(&rec.clone_name),
                        quote_literal(&Self::marker(&rec.id()))
                    ))
                    .await?;
                Ok(Recovered::Complete {
                    snapshot: None,
                    copy_mode: None,
                })
            }
            Some(other) => Err(EngineError::conflict(
                format!(
                    "database \"{}\" exists but belongs to something else; leaving it alone",
                    rec.clone_name
                ),
                Some(format!("comment {other:?}")),
            )),
        }
    }

    async fn exists(&self, rec: &BranchRecord) -> Result<bool, EngineError> {
        Ok(self.lookup(&rec.clone_name).await?.is_some())
    }

    async fn usage(&self, rec: &BranchRecord) -> Result<Option<super::Usage>, EngineError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT pg_database_size(oid) FROM pg_database WHERE datname = $1",
                &[&rec.clone_name],
            )
            .await?;
        Ok(row.map(|r| super::Usage {
            bytes: u64::try_from(r.get::<_, i64>(0)).unwrap_or(0),
            exact: true,
        }))
    }

    async fn destroy(&self, rec: &BranchRecord, force: bool) -> Result<(), EngineError> {
        match self.lookup(&rec.clone_name).await? {
            None => return Ok(()),
            Some(c) if c == Self::marker(&rec.id()) => {}
            Some(c) => {
                return Err(EngineError::conflict(
                    format!(
                        "refusing to drop database \"{}\": it does not carry offshoot's marker",
                        rec.clone_name
                    ),
                    Some(format!("comment {c:?}")),
                ))
            }
        }
        let (client, _slot) = self.ddl_session().await?;
        let sql = if force {
            format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                quote_ident(&rec.clone_name)
            )
        } else {
            format!("DROP DATABASE IF EXISTS {}", quote_ident(&rec.clone_name))
        };
        client.batch_execute(&sql).await?;
        Ok(())
    }

    fn endpoint(&self, rec: &BranchRecord) -> Endpoint {
        Endpoint {
            addr: self.addr.clone(),
            database: rec.clone_name.clone(),
        }
    }

    async fn strays(&self) -> Vec<(String, String)> {
        // Databases named like this source's snapshots or clones whose marker never
        // got written (a proxy killed mid-creation, or someone else's): not provably
        // ours, so reported and left alone.
        let Ok(client) = self.client().await else {
            return Vec::new();
        };
        let rows = client
            .query(
                "SELECT datname::text, starts_with(datname::text, $1) FROM pg_database \
                 WHERE coalesce(shobj_description(oid, 'pg_database'), '') NOT LIKE 'offshoot%' \
                   AND (starts_with(datname::text, $1) OR starts_with(datname::text, $2))",
                &[
                    &format!("{}@", self.template),
                    &format!("{}__", self.template),
                ],
            )
            .await
            .unwrap_or_default();
        let impostors = match self.marked_snapshots().await {
            Ok((_, impostors)) => impostors,
            Err(_) => Vec::new(),
        };
        rows.iter()
            .map(|r| {
                let reason = if r.get::<_, bool>(1) {
                    "named like a snapshot of this source but not marked as one"
                } else {
                    "named like a clone of this source but not marked as one: the proxy \
                     cannot prove it made it"
                };
                (r.get::<_, String>(0), reason.to_owned())
            })
            .chain(impostors)
            .collect()
    }

    async fn snapshots(&self) -> Result<Vec<SnapshotInfo>, EngineError> {
        Ok(self
            .snapshot_dbs()
            .await?
            .iter()
            .map(|s| self.snapshot_info(s))
            .collect())
    }

    fn snapshot_in_progress(&self) -> Option<SnapshotInfo> {
        self.progress.current()
    }

    async fn take_snapshot(&self) -> Result<SnapshotInfo, EngineError> {
        self.take().await
    }

    async fn delete_snapshot(&self, name: &str) -> Result<(), EngineError> {
        self.drop_snapshot(name).await
    }

    fn copy_mode(&self) -> Option<CopyMode> {
        self.mode.get().copied()
    }

    fn source_label(&self) -> String {
        self.source.clone()
    }

    async fn list_marked(&self) -> Result<Vec<(String, String)>, EngineError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT datname::text, shobj_description(oid, 'pg_database') \
                 FROM pg_database WHERE shobj_description(oid, 'pg_database') LIKE 'offshoot:%'",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let comment: String = r.get(1);
                (
                    r.get(0),
                    comment.trim_start_matches(MARKER_PREFIX).to_owned(),
                )
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::{BranchName, SourceName, MAX_IDENT_LEN};
    use crate::upstream::Upstream;

    fn id(b: &str) -> BranchId {
        BranchId {
            source: SourceName::new("shop").unwrap(),
            branch: BranchName::new(b).unwrap(),
        }
    }

    #[test]
    fn clone_names_fit_postgres_limit() {
        assert_eq!(clone_db_name("shop", &id("pr-42")), "shop__pr-42");
        let long = "t".repeat(60);
        let name = clone_db_name(&long, &id(&"b".repeat(40)));
        assert!(name.len() <= MAX_IDENT_LEN, "{name}");
        assert_eq!(name, clone_db_name(&long, &id(&"b".repeat(40))));
        assert_ne!(name, clone_db_name(&long, &id(&"c".repeat(40))));
    }

    #[test]
    fn admin_session_avoids_template() {
        let e = DatabaseEngine::new(
            "postgres://u@127.0.0.1:5555/shop",
            "shop",
            &Upstream { config: None },
            Clock::system(),
        )
        .unwrap();
        assert_eq!(e.admin.get_dbname(), Some("postgres"));
        assert_eq!(
            e.addr,
            ServerAddr::Tcp {
                host: "127.0.0.1".into(),
                port: 5555
            }
        );
        let e = DatabaseEngine::new(
            "host=/tmp/s port=7 dbname=admin",
            "shop",
            &Upstream { config: None },
            Clock::system(),
        )
        .unwrap();
        assert_eq!(e.admin.get_dbname(), Some("admin"));
        assert_eq!(e.addr, ServerAddr::Unix("/tmp/s/.s.PGSQL.7".into()));
    }
}
