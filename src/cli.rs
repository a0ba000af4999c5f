//! `offshoot branch ...` and `offshoot snapshot ...`: a small client of the admin API
//! for scripts and people.
//!
//! It speaks plain HTTP/1.1 over a TCP socket (the admin API is meant for loopback
//! or a private network), so the binary needs no HTTP client library. It sends the
//! API's bearer token, found by [`find_token`].

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde_json::Value;

mod reset;
pub use reset::reset;

use crate::admin::token;
use crate::config::Config;

/// Environment variable holding the admin token.
pub const TOKEN_ENV: &str = "OFFSHOOT_ADMIN_TOKEN";

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

/// A refusal from the admin API, in the words it gave.
#[derive(Debug)]
pub struct ApiRefusal {
    pub status: u16,
    pub message: String,
    /// The kind of failure (`not_found`, `conflict`, ...), when the API named one.
    pub kind: Option<String>,
    pub hint: Option<String>,
}

impl std::fmt::Display for ApiRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "; {hint}")?;
        }
        write!(f, " (HTTP {})", self.status)
    }
}

impl std::error::Error for ApiRefusal {}

fn api(admin: &AdminApi, method: &str, path: &str, body: Option<&str>) -> Result<Value> {
    let (status, text) = request(admin, method, path, body)?;
    let value: Value = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).with_context(|| format!("unexpected answer: {text}"))?
    };
    if !(200..300).contains(&status) {
        let field = |k: &str| value[k].as_str().map(str::to_owned);
        return Err(ApiRefusal {
            status,
            message: field("error").unwrap_or(text),
            kind: field("kind"),
            hint: field("hint"),
        }
        .into());
    }
    Ok(value)
}

/// Prints the branches as a table.
pub fn list(admin: &AdminApi) -> Result<()> {
    let v = api(admin, "GET", "/api/v1/branches", None)?;
    let rows = v.as_array().cloned().unwrap_or_default();
    println!(
        "{:<16} {:<40} {:<13} {:>5}  {:<24} CLONE",
        "SOURCE", "BRANCH", "STATE", "CONNS", "LAST ACTIVE"
    );
    for b in rows {
        let s = |k: &str| b[k].as_str().unwrap_or("").to_owned();
        let state = if b["persistent"].as_bool() == Some(true) {
            format!("{} (keep)", s("state"))
        } else {
            s("state")
        };
        println!(
            "{:<16} {:<40} {:<13} {:>5}  {:<24} {}",
            s("source"),
            s("branch"),
            state,
            b["connections"].as_u64().unwrap_or(0),
            s("last_active"),
            s("clone_name")
        );
    }
    Ok(())
}

/// Creates a branch ahead of time, from `snapshot` if given (else the newest).
pub fn create(
    admin: &AdminApi,
    source: &str,
    branch: &str,
    persistent: bool,
    snapshot: Option<&str>,
) -> Result<()> {
    let mut body =
        serde_json::json!({ "source": source, "branch": branch, "persistent": persistent });
    if let Some(s) = snapshot {
        body["snapshot"] = s.into();
    }
    let v = api(admin, "POST", "/api/v1/branches", Some(&body.to_string()))?;
    let from = match v["snapshot"].as_str() {
        Some(s) => format!(", snapshot {s}"),
        None => String::new(),
    };
    println!(
        "{}.{} is {} (clone {}{from})",
        source,
        branch,
        v["state"].as_str().unwrap_or("?"),
        v["clone_name"].as_str().unwrap_or("?")
    );
    Ok(())
}

/// Stops a branch's server now; the next connection starts it again.
pub fn suspend(admin: &AdminApi, source: &str, branch: &str) -> Result<()> {
    let path = format!("/api/v1/branches/{source}/{branch}/suspend");
    api(admin, "POST", &path, None)?;
    println!("{source}.{branch} suspended");
    Ok(())
}

/// Takes and seals a snapshot of `source`.
pub fn snapshot_create(admin: &AdminApi, source: &str) -> Result<()> {
    let path = format!("/api/v1/sources/{source}/snapshots");
    let v = api(admin, "POST", &path, None)?;
    println!(
        "snapshot {} of {source} taken ({} MB, {})",
        v["name"].as_str().unwrap_or("?"),
        v["size_bytes"].as_u64().unwrap_or(0) / 1_000_000,
        v["origin"].as_str().unwrap_or("?")
    );
    Ok(())
}

/// Prints `source`'s snapshots, oldest first.
pub fn snapshot_list(admin: &AdminApi, source: &str) -> Result<()> {
    let path = format!("/api/v1/sources/{source}/snapshots");
    let v = api(admin, "GET", &path, None)?;
    println!(
        "{:<22} {:<26} {:>9}  {:<30} BRANCHES",
        "NAME", "CREATED", "MB", "ORIGIN"
    );
    for s in v.as_array().cloned().unwrap_or_default() {
        let branches: Vec<&str> = s["branches"]
            .as_array()
            .map(|a| a.iter().filter_map(|b| b.as_str()).collect())
            .unwrap_or_default();
        println!(
            "{:<22} {:<26} {:>9}  {:<30} {}",
            s["name"].as_str().unwrap_or(""),
            s["created_at"].as_str().unwrap_or(""),
            s["size_bytes"].as_u64().unwrap_or(0) / 1_000_000,
            s["origin"].as_str().unwrap_or(""),
            branches.join(",")
        );
    }
    Ok(())
}

/// Deletes a snapshot no branch uses.
pub fn snapshot_delete(admin: &AdminApi, source: &str, name: &str) -> Result<()> {
    let path = format!("/api/v1/sources/{source}/snapshots/{name}");
    api(admin, "DELETE", &path, None)?;
    println!("snapshot {name} of {source} deleted");
    Ok(())
}

/// Deletes a branch; `force` terminates its sessions first.
pub fn delete(admin: &AdminApi, source: &str, branch: &str, force: bool) -> Result<()> {
    let path = format!(
        "/api/v1/branches/{source}/{branch}{}",
        if force { "?force=true" } else { "" }
    );
    match api(admin, "DELETE", &path, None) {
        Ok(_) => {}
        // The API's hint names its query parameter; here the flag is --force.
        Err(e) => {
            return Err(match e.downcast::<ApiRefusal>() {
                Ok(r)
                    if r.status == 409
                        && r.hint.as_deref().is_some_and(|h| h.contains("force")) =>
                {
                    anyhow!(
                        "{} (HTTP {}); use --force to terminate them",
                        r.message,
                        r.status
                    )
                }
                Ok(r) => r.into(),
                Err(e) => e,
            })
        }
    }
    println!("{source}.{branch} deleted");
    Ok(())
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
