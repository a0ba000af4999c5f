//! The `database` engine: a branch is `CREATE DATABASE <clone> TEMPLATE <source>` on the
//! source's own server.
//!
//! Ownership is written into the clone itself (`COMMENT ON DATABASE ... IS
//! 'offshoot:<source>/<branch>'`), so the engine can refuse to drop any database that
//! does not carry its marker, whatever the record files say. The administrative session
//! never connects to the template (that would make every clone fail with 55006).

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::Mutex;
use tokio_postgres::config::Host;
use tokio_postgres::Client;
use tracing::warn;

use super::{Endpoint, Engine, Made, Recovered, ServerAddr};
use crate::branch::store::BranchRecord;
use crate::error::EngineError;
use crate::names::{quote_ident, quote_literal, BranchId, MAX_IDENT_LEN};

const MARKER_PREFIX: &str = "offshoot:";

/// CREATE/DROP DATABASE statements run at once per source. Each gets its own session:
/// on a shared one they would queue behind each other, and so would the marker
/// comment of a finished clone behind every later CREATE.
const PARALLEL_DDL: usize = 4;

pub struct DatabaseEngine {
    /// The template database.
    template: String,
    admin: tokio_postgres::Config,
    addr: ServerAddr,
    /// TLS for the administrative sessions (`server_tls`).
    upstream: crate::proxy::tls::Upstream,
    /// Shared session for quick catalog look-ups.
    client: Mutex<Option<Arc<Client>>>,
    ddl_slots: tokio::sync::Semaphore,
}

impl DatabaseEngine {
    /// `server` is a connection string for a role allowed to create databases.
    pub fn new(
        server: &str,
        template: &str,
        upstream: &crate::proxy::tls::Upstream,
    ) -> Result<Self, EngineError> {
        let mut admin: tokio_postgres::Config = server
            .parse()
            .map_err(|e| EngineError::new(format!("bad server connection string: {e}")))?;
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
            template: template.to_owned(),
            admin,
            addr,
            upstream: upstream.clone(),
            client: Mutex::new(None),
            ddl_slots: tokio::sync::Semaphore::new(PARALLEL_DDL),
        })
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
            .map_err(|_| EngineError::new("engine is shutting down"))?;
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

    /// Ensures the template exists, so a missing source gives a clear error.
    pub async fn check_template(&self) -> Result<(), EngineError> {
        if self.lookup(&self.template).await?.is_none() {
            return Err(EngineError {
                code: Some("3D000".into()),
                message: format!(
                    "source database \"{}\" does not exist on the server",
                    self.template
                ),
            });
        }
        Ok(())
    }
}

/// `<template>__<branch>`, shortened with a hash when over PostgreSQL's 63 bytes.
fn clone_db_name(template: &str, id: &BranchId) -> String {
    let full = format!("{template}__{}", id.branch);
    if full.len() <= MAX_IDENT_LEN {
        return full;
    }
    // FNV-1a: stable across versions and platforms, unlike std's hasher.
    let mut h: u32 = 0x811c9dc5;
    for b in format!("{id}").bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x01000193);
    }
    let suffix = format!("__{}_{h:08x}", id.branch);
    let mut keep = MAX_IDENT_LEN - suffix.len();
    while !template.is_char_boundary(keep) {
        keep -= 1;
    }
    format!("{}{suffix}", &template[..keep])
}

#[async_trait]
impl Engine for DatabaseEngine {
    fn clone_name(&self, id: &BranchId) -> String {
        clone_db_name(&self.template, id)
    }

    async fn create(&self, rec: &BranchRecord) -> Result<Made, EngineError> {
        let (client, _slot) = self.ddl_session().await?;
        let clone = quote_ident(&rec.clone_name);
        client
            .batch_execute(&format!(
                "CREATE DATABASE {clone} TEMPLATE {}",
                quote_ident(&self.template)
            ))
            .await?;
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
        Ok(Made::default())
    }

    async fn recover(&self, rec: &BranchRecord) -> Result<Recovered, EngineError> {
        // A CREATE DATABASE sent before the crash may still be running on the server
        // (a backend notices its vanished client only when the statement ends). Left
        // alone it would commit after this check and block the branch; stop it first.
        self.stop_orphaned_create(&rec.clone_name).await?;
        match self.lookup(&rec.clone_name).await? {
            None => Ok(Recovered::Absent),
            Some(comment) if comment == Self::marker(&rec.id()) => Ok(Recovered::Complete),
            Some(comment) if comment.is_empty() => {
                // CREATE DATABASE is atomic: it exists, so it is complete. The record
                // was written before it, under a name that did not exist then.
                let client = self.client().await?;
                client
                    .batch_execute(&format!(
                        "COMMENT ON DATABASE {} IS {}",
                        quote_ident(&rec.clone_name),
                        quote_literal(&Self::marker(&rec.id()))
                    ))
                    .await?;
                Ok(Recovered::Complete)
            }
            Some(other) => Err(EngineError::new(format!(
                "database \"{}\" exists but belongs to something else (comment {other:?}); \
                 leaving it alone",
                rec.clone_name
            ))),
        }
    }

    async fn exists(&self, rec: &BranchRecord) -> Result<bool, EngineError> {
        Ok(self.lookup(&rec.clone_name).await?.is_some())
    }

    async fn destroy(&self, rec: &BranchRecord, force: bool) -> Result<(), EngineError> {
        match self.lookup(&rec.clone_name).await? {
            None => return Ok(()),
            Some(c) if c == Self::marker(&rec.id()) => {}
            Some(c) => {
                return Err(EngineError::new(format!(
                    "refusing to drop database \"{}\": it does not carry offshoot's marker \
                     (comment {c:?})",
                    rec.clone_name
                )))
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
    use crate::names::{BranchName, SourceName};
    use crate::proxy::tls::Upstream;

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
        )
        .unwrap();
        assert_eq!(e.admin.get_dbname(), Some("admin"));
        assert_eq!(e.addr, ServerAddr::Unix("/tmp/s/.s.PGSQL.7".into()));
    }
}
