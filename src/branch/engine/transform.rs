//! Snapshot transforms (`snapshot_transform`): SQL files run once on each new
//! snapshot, as its superuser, before it is sealed and before any branch is made
//! from it (masking personal data, typically).
//!
//! Each file is split into statements here and each statement is run on its own,
//! so a failure names the file, the statement's number and the server's message.
//! The split knows what PostgreSQL's own lexer does about `;`: quoted strings and
//! identifiers, dollar quotes, and both kinds of comment.
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
            statements: split_statements(&text),
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

/// Splits SQL text into statements at each `;` outside quotes, dollar quotes and
/// comments. Statements that hold nothing but blanks and comments are dropped.
pub fn split_statements(sql: &str) -> Vec<String> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    // Where the current statement's first meaningful byte is, once seen.
    let mut start: Option<usize> = None;
    let mut i = 0;
    let ident = |k: usize| k > 0 && (b[k - 1].is_ascii_alphanumeric() || b[k - 1] == b'_');
    while i < b.len() {
        match b[i] {
            b'-' if b.get(i + 1) == Some(&b'-') => {
                i = sql[i..].find('\n').map_or(b.len(), |n| i + n + 1);
                continue;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                // Block comments nest in PostgreSQL.
                let mut depth = 0;
                while i < b.len() {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                continue;
            }
            q @ (b'\'' | b'"') => {
                start.get_or_insert(i);
                // Only E'...' strings escape with a backslash.
                let escapes =
                    q == b'\'' && i > 0 && matches!(b[i - 1], b'E' | b'e') && !ident(i - 1);
                i += 1;
                while i < b.len() {
                    if b[i] == q {
                        // A doubled quote is an escaped one.
                        if b.get(i + 1) == Some(&q) {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    if escapes && b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
                continue;
            }
            b'$' if !ident(i) => {
                start.get_or_insert(i);
                if let Some(tag_len) = dollar_tag(&sql[i..]) {
                    let tag = &sql[i..i + tag_len];
                    let body = i + tag_len;
                    i = sql[body..]
                        .find(tag)
                        .map_or(b.len(), |n| body + n + tag_len);
                    continue;
                }
            }
            b';' => {
                if let Some(from) = start.take() {
                    out.push(sql[from..i].trim_end().to_owned());
                }
            }
            c if c.is_ascii_whitespace() => {}
            _ => {
                start.get_or_insert(i);
            }
        }
        i += 1;
    }
    if let Some(from) = start {
        out.push(sql[from..].trim_end().to_owned());
    }
    out
}

/// The length of a dollar-quote opening tag (`$$`, `$body$`) at the start of `s`.
fn dollar_tag(s: &str) -> Option<usize> {
    let rest = &s[1..];
    let end = rest.find('$')?;
    let tag = &rest[..end];
    let ok = tag
        .chars()
        .enumerate()
        .all(|(k, c)| c == '_' || c.is_alphabetic() || (k > 0 && c.is_ascii_digit()));
    ok.then_some(end + 2)
}

#[cfg(test)]
mod tests {
    use super::split_statements;

    #[test]
    fn statements_split_at_semicolons_outside_quotes_and_comments() {
        let sql = "-- header; not a statement\n\
                   UPDATE a SET x = 'semi;colon' , y = 'it''s;';\n\
                   /* block; /* nested; */ still; */ SELECT \"odd;name\" FROM t;\n\
                   DO $$ BEGIN PERFORM 1; END $$;\n\
                   CREATE FUNCTION f() RETURNS int AS $fn$ SELECT 1; $fn$ LANGUAGE sql;\n\
                   SELECT E'a\\';b', 'C:\\';\n\
                   ;  -- empty\n\
                   SELECT $1";
        let got = split_statements(sql);
        assert_eq!(
            got,
            vec![
                "UPDATE a SET x = 'semi;colon' , y = 'it''s;'",
                "SELECT \"odd;name\" FROM t",
                "DO $$ BEGIN PERFORM 1; END $$",
                "CREATE FUNCTION f() RETURNS int AS $fn$ SELECT 1; $fn$ LANGUAGE sql",
                "SELECT E'a\\';b', 'C:\\'",
                "SELECT $1",
            ]
        );
        assert!(split_statements("-- nothing\n /* at all */ ;\n").is_empty());
        // Unterminated input never panics.
        assert_eq!(
            split_statements("SELECT a$b$ FROM t; SELECT 2"),
            vec!["SELECT a$b$ FROM t", "SELECT 2"]
        );
        for s in ["'abc", "$$ abc", "/* abc", "\"abc", "$x", "E'\\", "$é"] {
            let _ = split_statements(s);
        }
    }
}
