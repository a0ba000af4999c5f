//! The embedded server: a managed local PostgreSQL under `<state.dir>/pg`, so the
//! shipped configuration works with no database set up by hand.
//!
//! It listens only on a Unix socket in `<state.dir>/run` (private to the service
//! user) and trusts local connections there. A second start reuses the data
//! directory, and a server left running by a killed proxy is reused.

use std::path::Path;

use anyhow::{Context, Result};
use tokio_postgres::NoTls;
use tracing::info;

use crate::config::EmbeddedConfig;
use crate::names::{quote_ident, quote_literal};
use crate::pg::{Cluster, PgBin};

/// The seed of the demo `shop` database.
pub const DEMO_SQL: &str = include_str!("../conf/demo-shop.sql");

pub struct Embedded {
    pub cluster: Cluster,
    pub user: String,
    /// Whether this process started the server (false: one left running by an
    /// earlier proxy was reused).
    pub started_here: bool,
}

impl Embedded {
    /// Initialises (first time) and starts the server. Blocking.
    pub fn start(cfg: &EmbeddedConfig, state_dir: &Path) -> Result<Self> {
        let bin = PgBin::find(cfg.bin_dir.as_deref())?;
        let cluster = Cluster {
            bin,
            data: state_dir.join("pg"),
            socket_dir: state_dir.join("run"),
            port: cfg.port,
            listen: String::new(),
            settings: cfg
                .settings
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        if cluster.init(&cfg.user, true)? {
            info!(data = %cluster.data.display(), bin = %cluster.bin.dir().display(), "initialised embedded PostgreSQL");
        }
        let started_here = cluster.start()?;
        info!(
            socket = %cluster.socket_dir.display(),
            reused = !started_here,
            "embedded PostgreSQL running"
        );
        Ok(Self {
            cluster,
            user: cfg.user.clone(),
            started_here,
        })
    }

    /// Connection string of the embedded superuser.
    pub fn server_string(&self) -> String {
        self.cluster.conn_string(&self.user, "postgres")
    }

    /// Creates `db` if missing, seeding it with the demo schema when `seed` is set.
    /// Leaves no session open on it (it is a template).
    pub async fn ensure_database(&self, db: &str, seed: bool) -> Result<()> {
        let (client, conn) = tokio_postgres::connect(&self.server_string(), NoTls)
            .await
            .context("connecting to the embedded server")?;
        let task = tokio::spawn(conn);
        let exists = client
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&db])
            .await?
            .is_some();
        if !exists {
            client
                .batch_execute(&format!("CREATE DATABASE {}", quote_ident(db)))
                .await?;
            if seed {
                let (seeder, conn) =
                    tokio_postgres::connect(&self.cluster.conn_string(&self.user, db), NoTls)
                        .await?;
                let t = tokio::spawn(conn);
                let seeded = seeder.batch_execute(DEMO_SQL).await;
                drop(seeder);
                let _ = t.await;
                if let Err(e) = seeded {
                    // Never leave a half-seeded template behind.
                    client
                        .batch_execute(&format!("DROP DATABASE {}", quote_ident(db)))
                        .await?;
                    return Err(e).context("seeding the demo database");
                }
                client
                    .batch_execute(&format!(
                        "COMMENT ON DATABASE {} IS {}",
                        quote_ident(db),
                        quote_literal("offshoot demo source")
                    ))
                    .await?;
                info!(database = db, "seeded demo database");
            } else {
                info!(database = db, "created empty source database");
            }
        }
        drop(client);
        let _ = task.await;
        Ok(())
    }

    /// Stops the server, including one reused from an earlier run: the data
    /// directory is the proxy's own. Blocking.
    pub fn stop(&self) -> Result<()> {
        self.cluster.stop()?;
        info!("embedded PostgreSQL stopped");
        Ok(())
    }
}
