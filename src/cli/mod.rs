//! `offshoot branch ...`, `offshoot snapshot ...` and the other commands that talk to
//! a running proxy: a small client of the admin API for scripts and people.
//!
//! It speaks plain HTTP/1.1 over a TCP socket (the admin API is meant for loopback
//! or a private network), so the binary needs no HTTP client library. It sends the
//! API's bearer token, found by [`find_token`].
//!
//! - [`output`]: `--output table|json` for every listing (aligned tables; JSON is
//!   the API's own answer, byte for byte).
//! - [`progress`]: a spinner for long operations, shown only on a terminal.
//! - [`branch`], [`snapshot`], [`events`], [`rehearse`], [`rehearsals`]: the
//!   commands, each with its clap definitions.
//!
//! A new command goes in its own file here, with an `Args` struct `main.rs` flattens
//! into its subcommands and a `run` method.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde_json::Value;

use crate::admin::token;
use crate::config::Config;

pub mod branch;
pub mod events;
pub mod output;
pub mod progress;
pub mod rehearsals;
pub mod rehearse;
mod reset;
pub mod snapshot;

/// Environment variable holding the admin token.
pub const TOKEN_ENV: &str = "OFFSHOOT_ADMIN_TOKEN";

/// How the CLI reaches a running proxy's admin API.
#[derive(clap::Args, Debug, Clone)]
pub struct ApiArgs {
    /// The admin API address (`admin.listen` of the running proxy).
    #[arg(
        long,
        default_value = "127.0.0.1:9187",
        env = "OFFSHOOT_ADMIN",
        global = true
    )]
    pub admin: String,
    /// File holding the admin API token. Default: `OFFSHOOT_ADMIN_TOKEN`, else the
    /// token file of the configuration below (`admin.token_file`, or
    /// `<state.dir>/admin.token`).
    #[arg(long, global = true)]
    pub token_file: Option<PathBuf>,
    /// The running proxy's configuration, read only to find its token file.
    #[arg(long, short, env = "OFFSHOOT_CONFIG", global = true)]
    pub config: Option<PathBuf>,
}

impl ApiArgs {
    pub fn connect(&self) -> Result<AdminApi> {
        AdminApi::connect(
            &self.admin,
            self.token_file.as_deref(),
            self.config.as_deref(),
        )
    }
}

/// A running proxy's admin API: its address and the token to send.
pub struct AdminApi {
    pub addr: String,
    pub token: Option<String>,
}

impl AdminApi {
    /// The API at `addr`, with the token [`find_token`] finds; `config` is the
    /// configuration asked for (`--config`), else the default one if it exists.
    pub fn connect(addr: &str, token_file: Option<&Path>, config: Option<&Path>) -> Result<Self> {
        let default = Path::new(crate::config::DEFAULT_PATH);
        let token = find_token(token_file, config.unwrap_or(default), config.is_some())?;
        Ok(Self {
            addr: addr.to_owned(),
            token,
        })
    }
}

/// The token to send: from `--token-file`, else `OFFSHOOT_ADMIN_TOKEN`, else the
/// file `serve` uses with the configuration at `config` (`admin.token_file` or
/// `<state.dir>/admin.token`). `config_given`: the path was asked for, so a
/// configuration that does not load is an error rather than "no token".
pub fn find_token(
    token_file: Option<&Path>,
    config: &Path,
    config_given: bool,
) -> Result<Option<String>> {
    if let Some(path) = token_file {
        return token::read(path).map(Some);
    }
    if let Ok(t) = std::env::var(TOKEN_ENV) {
        let t = t.trim();
        if !t.is_empty() {
            return Ok(Some(t.to_owned()));
        }
    }
    if !config_given && !config.exists() {
        return Ok(None);
    }
    let cfg = Config::load(config)?;
    let path = token::path(&cfg);
    if cfg.admin.token_file.is_none() && !path.exists() {
        return Ok(None);
    }
    token::read(&path)
        .with_context(|| {
            format!("pass --token-file or set {TOKEN_ENV} if this user cannot read it")
        })
        .map(Some)
}

/// Sends one request; returns the status and the body.
pub fn request(
    admin: &AdminApi,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String)> {
    let addr = admin.addr.as_str();
    let mut s = TcpStream::connect(addr).with_context(|| {
        format!("cannot reach the admin API at {addr} (is `offshoot serve` running?)")
    })?;
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    let body = body.unwrap_or("");
    let auth = match &admin.token {
        Some(t) => format!("Authorization: Bearer {t}\r\n"),
        None => String::new(),
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP response from {addr}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("malformed HTTP status line from {addr}"))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(rest)?
    } else {
        rest.to_owned()
    };
    Ok((status, body))
}

fn dechunk(mut rest: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").context("truncated chunk")?;
        let size = usize::from_str_radix(size.trim(), 16).context("bad chunk size")?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(after.get(..size).context("truncated chunk")?);
        rest = after.get(size + 2..).context("truncated chunk")?;
    }
}

/// A refusal from the admin API, in the words it gave (the API's one error shape).
#[derive(Debug)]
pub struct ApiRefusal {
    pub status: u16,
    /// The kind of failure (`not_found`, `conflict`, ...).
    pub code: Option<String>,
    pub message: String,
    pub sqlstate: Option<String>,
}

impl std::fmt::Display for ApiRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (HTTP {})", self.message, self.status)
    }
}

impl std::error::Error for ApiRefusal {}

/// An answer of the API: its JSON, and the text exactly as sent (what
/// `--output json` prints).
pub struct Answer {
    pub value: Value,
    pub text: String,
}

/// Sends one request and reads the answer; an error status becomes an
/// [`ApiRefusal`].
pub fn call(admin: &AdminApi, method: &str, path: &str, body: Option<&str>) -> Result<Answer> {
    let (status, text) = request(admin, method, path, body)?;
    let value: Value = if text.trim().is_empty() {
        Value::Null
    } else {
        match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(_) if !(200..300).contains(&status) => Value::Null,
            Err(_) => return Err(anyhow!("unexpected answer from the admin API: {text}")),
        }
    };
    if !(200..300).contains(&status) {
        let detail = &value["error"];
        let field = |k: &str| detail[k].as_str().map(str::to_owned);
        return Err(ApiRefusal {
            status,
            code: field("code"),
            message: field("message").unwrap_or_else(|| text.trim().to_owned()),
            sqlstate: field("sqlstate"),
        }
        .into());
    }
    Ok(Answer { value, text })
}

/// Sends one request and returns the JSON answer.
pub fn api(admin: &AdminApi, method: &str, path: &str, body: Option<&str>) -> Result<Value> {
    call(admin, method, path, body).map(|a| a.value)
}

/// `<source>.<branch>` split at its last separator.
pub fn split_name(name: &str) -> Result<(&str, &str)> {
    name.rsplit_once('.')
        .ok_or_else(|| anyhow!("{name:?}: expected <source>.<branch>, e.g. shop.pr-42"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(
            dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap(),
            "abcde"
        );
        assert!(dechunk("5\r\nab").is_err());
    }
}
