//! The helper's side: read the proxy's requests from stdin, check each against the
//! bounds it was given at start, do the work, write the answer to stdout.
//!
//! Invariant: the helper acts only on absolute paths below its roots (no `..`),
//! gives files only to the servers' user or the proxy's, runs only PostgreSQL's
//! own binaries, and those only as the servers' user. It never opens a network
//! socket and reads nothing but its stdin.

use std::io::{BufRead, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use super::wire::{Op, Owner, Reply, Request, Response, WireError};

/// What the helper is told when it starts (its first line of input).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// Directories it may act in: the state directory, the storage of every
    /// `instance` source and the data directories snapshots are copied from.
    pub roots: Vec<PathBuf>,
    /// `embedded.bin_dir`, if configured.
    pub bin_dir: Option<PathBuf>,
    /// The user branch servers run as unless a source has its own.
    pub server_user: String,
    /// Every user branch servers may run as (`server_user` first).
    pub servers: Vec<Owner>,
    /// The user the proxy runs as.
    pub proxy: Owner,
}

/// PostgreSQL's binaries the helper runs for the proxy.
const PROGRAMS: [&str; 3] = ["initdb", "pg_ctl", "pg_basebackup"];

impl Hello {
    fn inside(&self, path: &Path) -> bool {
        path.is_absolute()
            && !path
                .components()
                .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
            && self.roots.iter().any(|r| path.starts_with(r))
    }

    /// Why `op` is refused, if it is.
    pub fn refuse(&self, op: &Op) -> Option<String> {
        if let Some(p) = op.paths().into_iter().find(|p| !self.inside(p)) {
            return Some(format!(
                "{} is outside the helper's storage roots",
                p.display()
            ));
        }
        if let Some(o) = op
            .owners()
            .into_iter()
            .find(|o| !self.servers.contains(o) && *o != self.proxy)
        {
            return Some(format!(
                "uid {} is neither a servers' user nor the proxy's",
                o.uid
            ));
        }
        if let Some(o) = op.run_as().filter(|o| !self.servers.contains(o)) {
            return Some(format!("uid {} is not a servers' user", o.uid));
        }
        if let Op::Run {
            program, args, env, ..
        } = op
        {
            if !PROGRAMS.contains(&program.as_str()) {
                return Some(format!("{program:?} is not a program the helper runs"));
            }
            if let Some(a) = args
                .iter()
                .find(|a| a.starts_with('/') && !self.inside(Path::new(a)))
            {
                return Some(format!("{a} is outside the helper's storage roots"));
            }
            if let Some((k, _)) = env.iter().find(|(k, _)| !k.starts_with("PG")) {
                return Some(format!(
                    "environment variable {k} is not one the helper sets"
                ));
            }
        }
        None
    }
}

/// Does the work of a request that passed the checks.
#[async_trait]
pub trait Executor: Send + Sync + 'static {
    async fn execute(&self, op: Op) -> Result<Reply, WireError>;
}

/// The helper's loop over `input` until it closes. Requests run concurrently;
/// answers are written whole, one line each.
pub async fn serve<E: Executor>(
    hello: Hello,
    executor: E,
    input: impl BufRead + Send + 'static,
    output: impl Write + Send + 'static,
) {
    let hello = Arc::new(hello);
    let executor = Arc::new(executor);
    let output = Arc::new(Mutex::new(output));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    // Reading stdin blocks: a thread of its own feeds the loop.
    std::thread::spawn(move || {
        for line in input.lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = rx.recv().await {
        let request: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "unreadable request to the privileged helper");
                continue;
            }
        };
        let (hello, executor, output) = (hello.clone(), executor.clone(), output.clone());
        tokio::spawn(async move {
            let Request { id, op } = request;
            let name = op.name();
            let result = match hello.refuse(&op) {
                Some(why) => {
                    warn!(op = name, why, "privileged helper refused a request");
                    Err(WireError::Refused(why))
                }
                None => executor.execute(op).await,
            };
            debug!(op = name, ok = result.is_ok(), "privileged helper answered");
            let Ok(mut line) = serde_json::to_vec(&Response { id, result }) else {
                return;
            };
            line.push(b'\n');
            let mut out = output.lock().unwrap_or_else(|p| p.into_inner());
            let _ = out.write_all(&line).and_then(|()| out.flush());
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            roots: vec![PathBuf::from("/srv/state"), PathBuf::from("/data/shop")],
            bin_dir: None,
            server_user: "postgres".into(),
            servers: vec![Owner { uid: 101, gid: 104 }],
            proxy: Owner { uid: 990, gid: 990 },
        }
    }

    #[test]
    fn requests_outside_the_roots_are_refused() {
        let h = hello();
        let remove = |p: &str| Op::RemoveTree { path: p.into() };
        assert!(h
            .refuse(&remove("/srv/state/instances/shop/branches/a"))
            .is_none());
        assert!(h.refuse(&remove("/data/shop/branches/a")).is_none());
        assert!(h.refuse(&remove("/etc")).is_some());
        assert!(h.refuse(&remove("/srv/state/../../etc")).is_some());
        assert!(h.refuse(&remove("srv/state/x")).is_some());
        assert!(h.refuse(&remove("/srv/statex")).is_some());
        let give = |uid| Op::HandOver {
            path: "/srv/state/x".into(),
            owner: Owner { uid, gid: uid },
            mode: None,
        };
        assert!(h.refuse(&give(0)).is_some());
        assert!(h
            .refuse(&Op::HandOver {
                path: "/srv/state/x".into(),
                owner: h.servers[0],
                mode: None
            })
            .is_none());
        let run = |program: &str, arg: &str, env: &str| Op::Run {
            program: program.into(),
            args: vec!["-D".into(), arg.into()],
            env: vec![(env.into(), None)],
            run_as: Some(h.servers[0]),
        };
        assert!(h
            .refuse(&run("initdb", "/srv/state/pg", "PGPASSWORD"))
            .is_none());
        assert!(h
            .refuse(&run("sh", "/srv/state/pg", "PGPASSWORD"))
            .is_some());
        assert!(h
            .refuse(&run("../initdb", "/srv/state/pg", "PGPASSWORD"))
            .is_some());
        assert!(h.refuse(&run("initdb", "/root", "PGPASSWORD")).is_some());
        assert!(h
            .refuse(&run("initdb", "/srv/state/pg", "LD_PRELOAD"))
            .is_some());
    }
}
