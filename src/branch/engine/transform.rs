//! Snapshot transforms (`snapshot_transform`): SQL files run once on each new
//! snapshot, as its superuser, before it is sealed and before any branch is made
//! from it (masking personal data, typically).
//!
//! Each file is split into statements (by [`crate::sqltext`], which knows what
//! PostgreSQL's own lexer does about `;`) and each statement is run on its own,
//! so a failure names the file, the statement's number and the server's message.
//!
//! Invariant: a snapshot whose transform failed is discarded by its engine; no
//! branch is ever made from it.

use std::path::{Path, PathBuf};

use tokio_postgres::Client;
use tracing::info;

use crate::error::EngineError;

/// One SQL file of a source's `snapshot_transform`, read when the engine is built.
#[derive(Debug, Clone)]
pub struct Transform {
    /// The path as configured, for messages.
    pub path: PathBuf,
    pub statements: Vec<String>,
}

impl Transform {
    /// Reads and splits `path`.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read snapshot_transform {}: {e}", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
            statements: crate::sqltext::split(&text)
                .into_iter()
                .map(|s| s.sql)
                .collect(),
        })
    }

    fn file_name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.path.display().to_string())
    }
}

/// Runs every statement of every transform, in order, on `client` (a session on
/// the snapshot). The error names the file, the statement's number (from 1) and
/// the server's message.
pub async fn run_all(client: &Client, transforms: &[Transform]) -> Result<(), EngineError> {
    for t in transforms {
        for (i, sql) in t.statements.iter().enumerate() {
            if let Err(e) = client.batch_execute(sql).await {
                let server = e
                    .as_db_error()
                    .map(|d| format!("{} (SQLSTATE {})", d.message(), d.code().code()))
                    .unwrap_or_else(|| e.to_string());
                return Err(EngineError::failed(format!(
                    "snapshot transform {} failed at statement {}: {server}; the snapshot \
                     was discarded",
                    t.file_name(),
                    i + 1
                )));
            }
        }
        info!(file = %t.path.display(), statements = t.statements.len(), "snapshot transform applied");
    }
    Ok(())
}
