//! Server sessions kept between clients ("parked"), so a client that connects per
//! request does not pay for a new server backend (fork, authentication, catalog
//! caches) each time.
//!
//! When a client ends cleanly (Terminate, idle, nothing unanswered: see
//! [`super::track`]), its server session is reset with `DISCARD ALL` and parked
//! under its [`Key`]: the branch, and the startup packet the proxy sent (role,
//! database and every startup parameter, `application_name` included). A later
//! client whose startup packet would be the same gets it instead of a new one,
//! shown the ParameterStatus values recorded when the session first opened, and a
//! cancel key of its own that reaches the same backend.
//!
//! Invariants:
//! - A parked session is handed only to a client the proxy authenticated as its
//!   role, or, under `trust` (where the server authenticates), only if the server
//!   opened it without asking for any proof: any client could have had a new
//!   one just the same.
//! - A parked session holds no lease: it is no branch activity, and the registry
//!   drains a branch's parked sessions before its server is stopped or its clone
//!   removed ([`Pool::drain`]).
//! - A session whose reset did not end exactly as a fresh one (an error, a
//!   ParameterStatus value other than the recorded one, anything but idle) is
//!   closed, never parked.
//!
//! Warm spares get sessions too, opened ahead of their first client with the
//! startup packets recently parked on their source ([`super::spare_sessions`]).

use std::collections::HashMap;
use std::io::{self, Write};
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Context;
use std::time::Duration;

use bytes::BytesMut;
use prometheus::{IntCounter, IntGauge};
use socket2::SockRef;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::backend::{read_message, Greeting, ServerStream};
use super::protocol::encode_startup;
use crate::branch::engine::ServerAddr;
use crate::metrics::Metrics;
use crate::names::BranchId;

/// `DISCARD ALL` as a simple query: closes cursors, resets the session
/// authorization and every setting, deallocates prepared statements, `UNLISTEN *`,
/// releases advisory locks, drops temporary tables, discards plans and sequences.
const DISCARD_ALL: &[u8] = b"Q\0\0\0\x10DISCARD ALL\0";
/// The answer that ends a reset well: CommandComplete `DISCARD ALL`.
const DISCARDED: &[u8] = b"DISCARD ALL\0";
/// Terminate, sent to a parked session before it is closed.
const TERMINATE: &[u8] = b"X\0\0\0\x04";
/// How long a reset may take before the session is closed instead.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);

/// Who a parked session is for: the same branch and the same startup packet.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub(super) id: BranchId,
    /// The startup packet with its parameters in name order.
    pub(super) startup: Box<[u8]>,
}

impl Key {
    /// The key for a session of branch `id` opened with `params` (what the proxy
    /// sends the server); `None` for replication sessions, which are never kept.
    pub fn new(id: &BranchId, params: &[(String, String)]) -> Option<Self> {
        if params.iter().any(|(k, _)| k == "replication") {
            return None;
        }
        let mut sorted: Vec<(&str, &str)> = params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        sorted.sort_unstable();
        Some(Self {
            id: id.clone(),
            startup: Box::from(&encode_startup(&sorted)[..]),
        })
    }
}

/// A server session that may be kept, and what handing it on needs.
pub struct Ticket {
    pub key: Key,
    /// The server it is connected to: a branch whose server moved has none parked.
    pub addr: ServerAddr,
    /// The server's own pid and cancel secret.
    pub backend: (u32, u32),
    /// The ParameterStatus messages of its login.
    pub greeting: Arc<Greeting>,
}

/// A parked socket, still registered with the event loop of the relay thread that
/// parked it (`home`): taken again on that thread, it is relayed as it is, with no
/// `epoll_ctl` calls to deregister and register it again.
pub(super) struct Socket {
    io: Io,
    home: Option<usize>,
}

enum Io {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl Socket {
    pub(super) fn park(server: ServerStream) -> Option<Self> {
        let io = match server {
            ServerStream::Tcp(s) => Io::Tcp(s),
            ServerStream::Unix(s) => Io::Unix(s),
            ServerStream::Tls(_) => return None,
        };
        let socket = Self {
            io,
            home: super::relay::current(),
        };
        // The event loop keeps the waker of the socket's last wait: that of the
        // client's task, which has nothing more to do with the session. A wait
        // with a waker that does nothing replaces it, so that the task's memory
        // is freed now rather than when the session is next used.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let _ = socket.poll_read_ready(&mut cx);
        Some(socket)
    }

    fn poll_read_ready(&self, cx: &mut Context<'_>) -> std::task::Poll<io::Result<()>> {
        match &self.io {
            Io::Tcp(s) => s.poll_read_ready(cx),
            Io::Unix(s) => s.poll_read_ready(cx),
        }
    }

    /// Whether this thread's event loop is the one the socket is registered with.
    fn at_home(&self) -> bool {
        self.home.is_some() && self.home == super::relay::current()
    }

    /// The session as a stream of the calling thread's runtime: registered with
    /// its event loop again when it was parked on another.
    fn unpark(self) -> io::Result<ServerStream> {
        if self.at_home() {
            return Ok(match self.io {
                Io::Tcp(s) => ServerStream::Tcp(s),
                Io::Unix(s) => ServerStream::Unix(s),
            });
        }
        Ok(match self.io {
            Io::Tcp(s) => ServerStream::Tcp(tokio::net::TcpStream::from_std(s.into_std()?)?),
            Io::Unix(s) => ServerStream::Unix(tokio::net::UnixStream::from_std(s.into_std()?)?),
        })
    }

    fn sock(&self) -> SockRef<'_> {
        match &self.io {
            Io::Tcp(s) => SockRef::from(s),
            Io::Unix(s) => SockRef::from(s),
        }
    }

    /// Whether the server still has the session open and has said nothing since
    /// it was parked (a session the server ended has an error or end of stream
    /// waiting). On its own thread, an event loop that has seen nothing to read
    /// since the reset's last read answers without a system call; otherwise (or
    /// when readiness is still set) the socket is peeked.
    fn alive(&self) -> bool {
        if self.at_home() {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            if self.poll_read_ready(&mut cx).is_pending() {
                return true;
            }
        }
        let mut byte = [MaybeUninit::uninit()];
        matches!(self.sock().peek(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Ends the session politely (the socket is non-blocking, and five bytes fit).
    pub(super) fn close(self) {
        let _ = (&*self.sock()).write(TERMINATE);
    }
}

pub(super) struct Parked {
    pub(super) ticket: Ticket,
    pub(super) socket: Socket,
    pub(super) since: Instant,
}

/// The parked sessions of every branch.
pub struct Pool {
    idle: Mutex<HashMap<BranchId, Vec<Parked>>>,
    /// `proxy.max_idle_per_branch`.
    max_per_branch: usize,
    /// `proxy.server_idle_timeout`.
    idle_timeout: Duration,
    hits: IntCounter,
    misses: IntCounter,
    discards: IntCounter,
    pub(super) gauge: IntGauge,
    /// Sessions on warm spares, and the startups they are opened with.
    pub(super) warm: Mutex<super::spare_sessions::Warm>,
}

impl Pool {
    pub fn new(max_per_branch: usize, idle_timeout: Duration, metrics: &Metrics) -> Self {
        let outcome = |o: &str| metrics.server_reuse_total.with_label_values(&[o]);
        Self {
            idle: Mutex::new(HashMap::new()),
            max_per_branch,
            idle_timeout,
            hits: outcome("hit"),
            misses: outcome("miss"),
            discards: outcome("discard"),
            gauge: metrics.server_sessions_idle.clone(),
            warm: Default::default(),
        }
    }

    /// Whether sessions are kept at all.
    pub fn enabled(&self) -> bool {
        self.max_per_branch > 0
    }

    /// `proxy.max_idle_per_branch`.
    pub(super) fn max_per_branch(&self) -> usize {
        self.max_per_branch
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<BranchId, Vec<Parked>>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn discard(&self, socket: Socket) {
        self.discards.inc();
        socket.close();
    }

    /// Takes the newest parked session for `key` on the server at `addr`, if one
    /// is alive. Must run inside the runtime that will relay it.
    pub fn take(&self, key: &Key, addr: &ServerAddr) -> Option<(Ticket, ServerStream)> {
        loop {
            let found = {
                let mut idle = self.lock();
                match idle.get_mut(&key.id) {
                    None => None,
                    Some(list) => {
                        let at = list.iter().rposition(|p| p.ticket.key == *key);
                        let found = at.map(|i| list.remove(i));
                        if list.is_empty() {
                            idle.remove(&key.id);
                        }
                        found
                    }
                }
            };
            let Some(p) = found else {
                self.misses.inc();
                return None;
            };
            self.gauge.dec();
            if p.ticket.addr != *addr || !p.socket.alive() {
                self.discard(p.socket);
                continue;
            }
            match p.socket.unpark() {
                Ok(server) => {
                    self.hits.inc();
                    return Some((p.ticket, server));
                }
                Err(e) => {
                    debug!(error = %e, "cannot take a parked server session");
                    self.discards.inc();
                }
            }
        }
    }

    /// Resets the session of a client that ended cleanly and parks it; closes it
    /// instead when the reset does not end as a fresh session would, or the branch
    /// has `max_idle_per_branch` parked already. Call it while the client's lease
    /// is still held, so a branch cannot be drained and stopped in between.
    pub async fn park(self: &Arc<Self>, mut server: ServerStream, ticket: Ticket) {
        let clean = tokio::time::timeout(RESET_TIMEOUT, reset(&mut server, &ticket.greeting)).await;
        let Some(socket) = Socket::park(server) else {
            self.discards.inc();
            return;
        };
        match clean {
            Ok(Ok(true)) => {}
            other => {
                debug!(outcome = ?other.map(|r| r.map_err(|e| e.kind())), "server session not kept after its reset");
                return self.discard(socket);
            }
        }
        if !ticket.greeting.challenged {
            self.learn(&ticket.key);
        }
        self.gauge.inc();
        self.put(Parked {
            ticket,
            socket,
            since: Instant::now(),
        });
    }

    /// Adds a session (already counted in the gauge) to its branch's parked ones,
    /// or closes it when the branch has `max_idle_per_branch` parked already.
    pub(super) fn put(&self, parked: Parked) {
        let mut idle = self.lock();
        let list = idle.entry(parked.ticket.key.id.clone()).or_default();
        if list.len() >= self.max_per_branch {
            drop(idle);
            self.gauge.dec();
            return self.discard(parked.socket);
        }
        list.push(parked);
    }

    /// Closes every parked session of branch `id` (before its server is stopped,
    /// reset or removed); returns how many.
    pub fn drain(&self, id: &BranchId) -> usize {
        let list = self.lock().remove(id).unwrap_or_default();
        let n = list.len();
        for p in list {
            self.gauge.dec();
            self.discard(p.socket);
        }
        n
    }

    /// Closes the sessions parked for longer than `server_idle_timeout` at `now`;
    /// returns how many.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut expired = Vec::new();
        {
            let mut idle = self.lock();
            idle.retain(|_, list| {
                let (old, keep): (Vec<Parked>, Vec<Parked>) = std::mem::take(list)
                    .into_iter()
                    .partition(|p| now.duration_since(p.since) >= self.idle_timeout);
                expired.extend(old);
                *list = keep;
                !list.is_empty()
            });
        }
        let n = expired.len();
        for p in expired {
            self.gauge.dec();
            self.discard(p.socket);
        }
        n
    }

    /// Sweeps until `shutdown`, often enough that no session outlives the timeout by
    /// more than a quarter of it.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let every =
            (self.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {
                    self.sweep(Instant::now());
                }
            }
        }
    }
}

/// The ParameterStatus messages in `params`, one by one.
fn messages(mut params: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let len = params.get(1..5)?;
        let len = 1 + u32::from_be_bytes(len.try_into().ok()?) as usize;
        let (msg, rest) = params.split_at_checked(len)?;
        params = rest;
        Some(msg)
    })
}

/// Runs `DISCARD ALL` on an idle session and checks it ends as a fresh session:
/// CommandComplete, every ParameterStatus back at a value of the login, idle, and
/// nothing more. Notices and notifications queued before the reset are dropped.
async fn reset(server: &mut ServerStream, greeting: &Greeting) -> io::Result<bool> {
    server.write_all(DISCARD_ALL).await?;
    server.flush().await?;
    let mut buf = BytesMut::with_capacity(512);
    let mut discarded = false;
    loop {
        let msg = read_message(server, &mut buf).await?;
        match msg[0] {
            b'C' => discarded = &msg[5..] == DISCARDED,
            b'S' if messages(&greeting.params).any(|m| m == &msg[..]) => {}
            b'N' | b'A' => {}
            b'Z' => return Ok(discarded && &msg[5..] == b"I" && buf.is_empty()),
            _ => return Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(name: &str, value: &str) -> Vec<u8> {
        let body = format!("{name}\0{value}\0");
        let mut m = vec![b'S'];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body.as_bytes());
        m
    }

    #[test]
    fn keys_ignore_parameter_order_and_refuse_replication() {
        let id = BranchId {
            source: crate::names::SourceName::new("shop").unwrap(),
            branch: crate::names::BranchName::new("pr-1").unwrap(),
        };
        let p = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let a = Key::new(&id, &p(&[("user", "app"), ("application_name", "x")]));
        let b = Key::new(&id, &p(&[("application_name", "x"), ("user", "app")]));
        let c = Key::new(&id, &p(&[("application_name", "y"), ("user", "app")]));
        assert!(a.is_some() && a == b);
        assert!(a != c, "application_name is part of the key");
        assert!(Key::new(&id, &p(&[("user", "app"), ("replication", "true")])).is_none());
    }

    #[test]
    fn recorded_parameter_statuses_are_split_back_into_messages() {
        let mut params = status("DateStyle", "ISO, MDY");
        params.extend(status("TimeZone", "UTC"));
        let all: Vec<&[u8]> = messages(&params).collect();
        assert_eq!(all.len(), 2);
        assert_eq!(all[1], &status("TimeZone", "UTC")[..]);
        assert_eq!(messages(&params[..7]).count(), 0, "a cut message is none");
    }
}
