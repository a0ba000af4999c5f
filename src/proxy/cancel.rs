//! Proxy-issued cancel keys.
//!
//! Each client gets its own BackendKeyData from the proxy, never the server's. A
//! CancelRequest carrying a known key is forwarded to the one backend session it maps
//! to; an unknown key or a wrong secret is dropped without a word, as PostgreSQL does.
//! Keys are never logged.

use std::sync::Arc;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UnixStream};

use super::protocol::encode_cancel;
use crate::branch::engine::ServerAddr;

/// Where a proxy key leads.
#[derive(Clone)]
struct Target {
    secret: u32,
    addr: ServerAddr,
    backend_pid: u32,
    backend_secret: u32,
}

/// The live keys, shared by every connection.
#[derive(Default)]
pub struct CancelMap {
    keys: DashMap<u32, Target>,
}

/// Removes its key when the connection ends.
pub struct KeyGuard {
    map: Arc<CancelMap>,
    pid: u32,
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        self.map.keys.remove(&self.pid);
    }
}

/// Delivers the server's own cancel key to the server.
async fn send(target: &Target) -> bool {
    let msg = encode_cancel(target.backend_pid, target.backend_secret);
    let sent = match &target.addr {
        ServerAddr::Tcp { host, port } => match TcpStream::connect((host.as_str(), *port)).await {
            Ok(mut s) => s.write_all(&msg).await.is_ok(),
            Err(_) => false,
        },
        ServerAddr::Unix(path) => match UnixStream::connect(path).await {
            Ok(mut s) => s.write_all(&msg).await.is_ok(),
            Err(_) => false,
        },
    };
    if !sent {
        tracing::warn!(server = %target.addr, "could not deliver a cancel request");
    }
    sent
}

fn ct_eq(a: u32, b: u32) -> bool {
    // Compare every bit regardless of where the first difference is.
    let diff = a ^ b;
    std::hint::black_box(diff) == 0
}

impl CancelMap {
    /// Issues a fresh (pid, secret) for a backend session.
    pub fn issue(
        self: &Arc<Self>,
        addr: ServerAddr,
        backend_pid: u32,
        backend_secret: u32,
    ) -> (u32, u32, KeyGuard) {
        loop {
            // Positive 31-bit pids, as clients expect from PostgreSQL.
            let pid = rand::random::<u32>() & 0x7fff_ffff;
            if pid == 0 {
                continue;
            }
            let secret = rand::random::<u32>();
            if let Entry::Vacant(v) = self.keys.entry(pid) {
                v.insert(Target {
                    secret,
                    addr,
                    backend_pid,
                    backend_secret,
                });
                let guard = KeyGuard {
                    map: self.clone(),
                    pid,
                };
                return (pid, secret, guard);
            }
        }
    }

    /// Forwards a cancel for (pid, secret) if the key is live; returns whether it was.
    pub async fn forward(&self, pid: u32, secret: u32) -> bool {
        let Some(target) = self.keys.get(&pid).map(|t| t.clone()) else {
            return false;
        };
        if !ct_eq(target.secret, secret) {
            return false;
        }
        send(&target).await
    }

    /// Sends a cancel for every live session: used when the shutdown grace runs out,
    /// so statements of the sessions about to be cut do not run on unattended.
    pub async fn cancel_all(&self) -> usize {
        let targets: Vec<Target> = self.keys.iter().map(|t| t.value().clone()).collect();
        let mut sent = 0;
        for t in &targets {
            if send(t).await {
                sent += 1;
            }
        }
        sent
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keys_are_unique_and_released() {
        let map = Arc::new(CancelMap::default());
        let addr = ServerAddr::Tcp {
            host: "127.0.0.1".into(),
            port: 1,
        };
        let (p1, s1, g1) = map.issue(addr.clone(), 10, 20);
        let (p2, _, g2) = map.issue(addr, 11, 21);
        assert_ne!(p1, p2);
        assert_eq!(map.len(), 2);
        // Wrong secret: refused before any connection is tried.
        assert!(!map.forward(p1, s1.wrapping_add(1)).await);
        assert!(!map.forward(0, 0).await);
        drop(g1);
        drop(g2);
        assert!(map.is_empty());
    }
}
