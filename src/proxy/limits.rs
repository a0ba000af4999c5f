//! What bounds the resources clients can hold: connections in all, connections per
//! address that have not authenticated yet, and cancel requests per address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use prometheus::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::cancel::CancelLimit;

/// A client connection's place under `proxy.max_connections`, counted in
/// `offshoot_connections_open` for as long as it is held.
pub(super) struct Slot {
    _permit: OwnedSemaphorePermit,
    open: IntGauge,
}

impl Slot {
    pub(super) fn new(permit: OwnedSemaphorePermit, open: &IntGauge) -> Self {
        open.inc();
        Self {
            _permit: permit,
            open: open.clone(),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

pub(super) struct Limits {
    /// One permit per open client connection (`proxy.max_connections`).
    pub connections: Arc<Semaphore>,
    /// `proxy.max_unauthenticated_per_address`.
    pub unauthenticated: Arc<Unauthenticated>,
    /// `proxy.cancel_rate`: CancelRequests per second per client address.
    pub cancels: CancelLimit,
}

/// Connections per client address that have not finished authenticating. Silent
/// sockets from one address fill only that address's share, so they cannot lock
/// out clients from elsewhere; the startup deadline then clears them.
pub(super) struct Unauthenticated {
    /// 0: no limit (still counted).
    max: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
    gauge: IntGauge,
}

/// One connection not yet authenticated; counted until dropped.
pub(super) struct Pending {
    limit: Arc<Unauthenticated>,
    ip: IpAddr,
}

impl Unauthenticated {
    pub fn new(max: usize, gauge: IntGauge) -> Arc<Self> {
        Arc::new(Self {
            max,
            counts: Mutex::new(HashMap::new()),
            gauge,
        })
    }

    /// Counts a new connection from `ip`; `None` when that address is at its limit.
    pub fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<Pending> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if self.max > 0 && *n >= self.max {
            return None;
        }
        *n += 1;
        self.gauge.inc();
        Some(Pending {
            limit: self.clone(),
            ip,
        })
    }

    #[cfg(test)]
    fn count(&self, ip: IpAddr) -> usize {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.get(&ip).copied().unwrap_or(0)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut counts = self.limit.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                // Addresses with nothing pending take no memory.
                counts.remove(&self.ip);
            }
        }
        self.limit.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_has_its_own_share() {
        let gauge = IntGauge::new("g", "g").unwrap();
        let limit = Unauthenticated::new(2, gauge.clone());
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap());
        let first = limit.enter(a).unwrap();
        let _second = limit.enter(a).unwrap();
        assert!(limit.enter(a).is_none(), "a third from the same address");
        let other = limit.enter(b);
        assert!(other.is_some(), "another address is not affected");
        assert_eq!(gauge.get(), 3);
        drop(first);
        assert_eq!(limit.count(a), 1);
        assert!(limit.enter(a).is_some(), "a slot freed is a slot again");
        drop(other);
        assert_eq!(limit.count(b), 0);
        assert!(limit.counts.lock().unwrap().get(&b).is_none());
        let unlimited = Unauthenticated::new(0, IntGauge::new("h", "h").unwrap());
        let held: Vec<_> = (0..100).map(|_| unlimited.enter(a).unwrap()).collect();
        assert_eq!(held.len(), 100);
    }
}
