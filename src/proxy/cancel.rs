//! Proxy-issued cancel keys.
//!
//! Each client gets BackendKeyData with its server session's real pid (so
//! `pg_stat_activity`, `pg_terminate_backend` and NOTIFY's sender pid mean what the
//! client expects) and a secret issued by the proxy, unique among live sessions. The
//! server's own secret never leaves the proxy. A CancelRequest with a live secret and
//! the matching pid is forwarded to the one session it maps to; anything else is
//! dropped without a word, as PostgreSQL does. Keys are never logged.

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
    addr: ServerAddr,
    backend_pid: u32,
    backend_secret: u32,
}

/// The live keys by proxy-issued secret, shared by every connection.
#[derive(Default)]
pub struct CancelMap {
    keys: DashMap<u32, Target>,
}

/// Removes its key when the connection ends.
pub struct KeyGuard {
    map: Arc<CancelMap>,
    secret: u32,
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        self.map.keys.remove(&self.secret);
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

impl CancelMap {
    /// Issues the key a client sees for a server session: the server's pid and a
    /// fresh secret.
    pub fn issue(
        self: &Arc<Self>,
        addr: ServerAddr,
        backend_pid: u32,
        backend_secret: u32,
    ) -> (u32, u32, KeyGuard) {
        loop {
            let secret = rand::random::<u32>();
            if let Entry::Vacant(v) = self.keys.entry(secret) {
                v.insert(Target {
                    addr,
                    backend_pid,
                    backend_secret,
                });
                let guard = KeyGuard {
                    map: self.clone(),
                    secret,
                };
                return (backend_pid, secret, guard);
            }
        }
    }

    /// Forwards a cancel for (pid, secret) if the key is live; returns whether it was.
    pub async fn forward(&self, pid: u32, secret: u32) -> bool {
        let Some(target) = self.keys.get(&secret).map(|t| t.clone()) else {
            return false;
        };
        if target.backend_pid != pid {
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
        let (p2, s2, g2) = map.issue(addr, 10, 21);
        assert_eq!((p1, p2), (10, 10), "clients see the server's pid");
        assert_ne!(s1, s2);
        assert_ne!(s1, 20, "the server's secret stays inside");
        assert_eq!(map.len(), 2);
        // Wrong secret or wrong pid: refused before any connection is tried.
        assert!(!map.forward(p1, s1.wrapping_add(1)).await);
        assert!(!map.forward(p1 + 1, s1).await);
        drop(g1);
        drop(g2);
        assert!(map.is_empty());
    }
}
