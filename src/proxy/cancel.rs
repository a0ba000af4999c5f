//! Proxy-issued cancel keys.
//!
//! Each client gets BackendKeyData with its server session's real pid (so
//! `pg_stat_activity`, `pg_terminate_backend` and NOTIFY's sender pid mean what the
//! client expects) and a secret issued by the proxy, unique among live sessions. The
//! server's own secret never leaves the proxy. A CancelRequest with a live secret and
//! the matching pid is forwarded to the one session it maps to; anything else is
//! dropped without a word, as PostgreSQL does. Keys are never logged.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use tokio::io::AsyncWriteExt;

use super::backend::ServerStream;
use super::protocol::encode_cancel;
use super::Proxy;
use crate::branch::engine::ServerAddr;

/// Where a proxy key leads.
#[derive(Clone)]
struct Target {
    addr: ServerAddr,
    /// `server_tls`: a cancel goes over TLS like the session did.
    tls: Option<Arc<rustls::ClientConfig>>,
    backend_pid: u32,
    backend_secret: u32,
}

/// The live keys by proxy-issued secret, shared by every connection. Secrets are 4
/// bytes for protocol 3.0 clients and 32 for 3.2 ones.
#[derive(Default)]
pub struct CancelMap {
    keys: DashMap<Box<[u8]>, Target>,
}

/// Removes its key when the connection ends.
pub struct KeyGuard {
    map: Arc<CancelMap>,
    secret: Box<[u8]>,
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        self.map.keys.remove(&self.secret);
    }
}

/// Delivers the server's own cancel key to the server, over a connection opened the
/// way sessions open theirs (TLS when the session used it).
async fn send(target: &Target) -> bool {
    let msg = encode_cancel(target.backend_pid, &target.backend_secret.to_be_bytes());
    let sent = match ServerStream::connect(&target.addr, target.tls.as_ref()).await {
        Ok(mut s) => s.write_all(&msg).await.is_ok() && s.flush().await.is_ok(),
        Err(_) => false,
    };
    if !sent {
        tracing::warn!(server = %target.addr, "could not deliver a cancel request");
    }
    sent
}

/// Answers a client's CancelRequest: forwarded when its key is live, otherwise
/// dropped; rate-limited per client address, since guessing secrets costs a
/// connection each. The client is never told which.
pub(super) async fn answer(proxy: &Proxy, ip: IpAddr, pid: u32, secret: &[u8]) {
    let outcome = if !proxy.limits.cancels.allow(ip) {
        "rate_limited"
    } else if proxy.cancels.forward(pid, secret).await {
        "forwarded"
    } else {
        "ignored"
    };
    proxy
        .metrics
        .cancel_requests_total
        .with_label_values(&[outcome])
        .inc();
}

impl CancelMap {
    /// Issues the key a client sees for a server session: the server's pid and a
    /// fresh secret of `len` bytes.
    pub fn issue(
        self: &Arc<Self>,
        addr: ServerAddr,
        tls: Option<Arc<rustls::ClientConfig>>,
        backend_pid: u32,
        backend_secret: u32,
        len: usize,
    ) -> (u32, Box<[u8]>, KeyGuard) {
        loop {
            let secret: Box<[u8]> = (0..len).map(|_| rand::random::<u8>()).collect();
            if let Entry::Vacant(v) = self.keys.entry(secret.clone()) {
                v.insert(Target {
                    addr,
                    tls,
                    backend_pid,
                    backend_secret,
                });
                let guard = KeyGuard {
                    map: self.clone(),
                    secret: secret.clone(),
                };
                return (backend_pid, secret, guard);
            }
        }
    }

    /// Forwards a cancel for (pid, secret) if the key is live; returns whether it was.
    pub async fn forward(&self, pid: u32, secret: &[u8]) -> bool {
        let Some(target) = self.keys.get(secret).map(|t| t.clone()) else {
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

/// A token bucket per client address for CancelRequests: `rate` per second, bursts
/// of up to `rate` more.
pub struct CancelLimit {
    rate: f64,
    buckets: DashMap<IpAddr, (f64, Instant)>,
}

/// Addresses tracked before idle buckets are swept.
const MAX_TRACKED: usize = 10_000;

impl CancelLimit {
    pub fn new(rate_per_second: u32) -> Self {
        Self {
            rate: f64::from(rate_per_second),
            buckets: DashMap::new(),
        }
    }

    /// Takes one token for `ip`; false when its bucket is empty.
    pub fn allow(&self, ip: IpAddr) -> bool {
        self.allow_at(ip, Instant::now())
    }

    fn allow_at(&self, ip: IpAddr, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        if self.buckets.len() > MAX_TRACKED {
            // Full buckets carry no information: forget them.
            let (rate, cap) = (self.rate, self.rate * 2.0);
            self.buckets.retain(|_, (tokens, last)| {
                *tokens + now.saturating_duration_since(*last).as_secs_f64() * rate < cap
            });
        }
        let cap = self.rate * 2.0;
        let mut entry = self.buckets.entry(ip).or_insert((cap, now));
        let (tokens, last) = &mut *entry;
        *tokens =
            (*tokens + now.saturating_duration_since(*last).as_secs_f64() * self.rate).min(cap);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
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
        let (p1, s1, g1) = map.issue(addr.clone(), None, 10, 20, 4);
        let (p2, s2, g2) = map.issue(addr.clone(), None, 10, 21, 4);
        let (_, s3, g3) = map.issue(addr, None, 10, 22, 32);
        assert_eq!((p1, p2), (10, 10), "clients see the server's pid");
        assert_ne!(s1, s2);
        assert_eq!((s1.len(), s3.len()), (4, 32));
        assert_ne!(*s1, 20u32.to_be_bytes(), "the server's secret stays inside");
        assert_eq!(map.len(), 3);
        // Wrong secret or wrong pid: refused before any connection is tried.
        let mut wrong = s1.to_vec();
        wrong[0] ^= 1;
        assert!(!map.forward(p1, &wrong).await);
        assert!(!map.forward(p1 + 1, &s1).await);
        assert!(
            !map.forward(p1, &s3[..4]).await,
            "a prefix of a long key is no key"
        );
        drop((g1, g2, g3));
        assert!(map.is_empty());
    }

    #[test]
    fn cancels_are_rate_limited_per_address() {
        let limit = CancelLimit::new(5);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        let allowed = (0..20).filter(|_| limit.allow_at(a, t0)).count();
        assert_eq!(allowed, 10, "a burst of twice the rate");
        assert!(limit.allow_at(b, t0), "other addresses are not affected");
        assert!(!limit.allow_at(a, t0));
        assert!(limit.allow_at(a, t0 + std::time::Duration::from_millis(250)));
        assert!(CancelLimit::new(0).allow(a), "0 turns the limit off");
    }
}
