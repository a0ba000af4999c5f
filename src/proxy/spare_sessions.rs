//! Sessions opened on warm spares before their first client comes, so that client
//! is served by a backend that is already logged in, as a client of a running
//! branch is by a parked session.
//!
//! Which sessions: the startup packets most recently parked on branches of the
//! spare's source (a source's clients are mostly the same program: the same role,
//! database and parameters). When a spare comes up, one session per such startup
//! is opened on it (at most [`STARTUPS`], and at most `max_idle_per_branch`); when
//! a new startup is parked, it is opened on the source's spares too. When the
//! spare is claimed its sessions become the branch's parked sessions, keyed by the
//! branch and their startup, and the first client whose startup is the same takes
//! one as it would a parked session.
//!
//! Invariants:
//! - Only a session the server opened without asking for any proof is kept: it
//!   is what any client claiming that role would be let in with, so handing it to
//!   a client the proxy authenticated as that role, or, under `trust`, to any
//!   client of that role, is what [`super::pool`] allows for parked sessions.
//! - The sessions of a spare close before its server stops (the engine says so
//!   first: [`SpareSessions::dropped`]); a session still being opened when its
//!   spare is claimed or dropped is closed when it is ready.
//! - They count as idle server sessions (`offshoot_server_sessions_idle`) and live
//!   as long as their spare; `server_idle_timeout` applies from the claim on.

use std::collections::HashMap;
use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tracing::debug;

use super::backend::{self, Greeting, ServerStream};
use super::pool::{Key, Parked, Pool, Socket, Ticket};
use crate::branch::engine::instance::SpareSessions;
use crate::branch::engine::ServerAddr;
use crate::names::{BranchId, SourceName};

/// How many recent startups of a source are opened on each of its spares.
pub const STARTUPS: usize = 2;

/// The longest opening a session on a spare may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Run once on each new session: opens the user relations (the largest
/// thousand), so the client's first query finds their descriptions in the
/// backend's caches as it would on a session that served a client before. It
/// leaves no state behind (a lock on each relation only while it runs).
const WARM_QUERY: &str = "SELECT count(pg_catalog.pg_relation_size(r.oid)) FROM \
    (SELECT c.oid FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n \
     ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'i', 'm', 'p', 'I') \
     AND n.nspname <> ALL (ARRAY['pg_catalog', 'information_schema']) \
     AND n.nspname !~ '^pg_(toast|temp_)' \
     ORDER BY c.relpages DESC LIMIT 1000) r";

/// The spares' sessions and the startups they are opened with.
#[derive(Default)]
pub struct Warm {
    /// For every source that has spares: the startups last parked on its
    /// branches, newest last.
    startups: HashMap<SourceName, Vec<Box<[u8]>>>,
    /// The spares that are up, by id.
    spares: HashMap<String, Spare>,
}

/// One spare's server and the sessions open (or being opened) on it.
struct Spare {
    source: SourceName,
    addr: ServerAddr,
    open: Vec<Open>,
    /// Startups being opened right now.
    opening: Vec<Box<[u8]>>,
}

impl Spare {
    fn has(&self, startup: &[u8]) -> bool {
        self.open.iter().any(|o| *o.startup == *startup)
            || self.opening.iter().any(|s| **s == *startup)
    }

    fn sessions(&self) -> usize {
        self.open.len() + self.opening.len()
    }
}

/// A session open on a spare.
struct Open {
    startup: Box<[u8]>,
    backend: (u32, u32),
    greeting: Arc<Greeting>,
    socket: Socket,
}

impl Pool {
    fn warm(&self) -> MutexGuard<'_, Warm> {
        self.warm.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many sessions a spare gets at most.
    fn per_spare(&self) -> usize {
        STARTUPS.min(self.max_per_branch())
    }

    /// Notes the startup of a session parked on `key`'s branch, when its source
    /// has spares, and opens it on those spares if it is new there.
    pub(super) fn learn(self: &Arc<Self>, key: &Key) {
        let todo: Vec<(String, ServerAddr)> = {
            let mut warm = self.warm();
            let Some(list) = warm.startups.get_mut(&key.id.source) else {
                return;
            };
            if list.last().is_some_and(|s| *s == key.startup) {
                return;
            }
            list.retain(|s| *s != key.startup);
            list.push(key.startup.clone());
            if list.len() > STARTUPS {
                list.remove(0);
            }
            let room = self.per_spare();
            warm.spares
                .iter_mut()
                .filter(|(_, s)| {
                    s.source == key.id.source && s.sessions() < room && !s.has(&key.startup)
                })
                .map(|(id, s)| {
                    s.opening.push(key.startup.clone());
                    (id.clone(), s.addr.clone())
                })
                .collect()
        };
        for (spare, addr) in todo {
            let (pool, startup) = (self.clone(), key.startup.clone());
            tokio::spawn(async move { pool.open_on(&spare, &addr, startup).await });
        }
    }

    /// Opens a session with `startup` on spare `spare` (marked as being opened
    /// there) and keeps it, unless the spare was claimed or dropped meanwhile.
    async fn open_on(&self, spare: &str, addr: &ServerAddr, startup: Box<[u8]>) {
        let opened = tokio::time::timeout(OPEN_TIMEOUT, async {
            let mut server = ServerStream::connect(addr, None).await?;
            let Some((greeting, backend)) = backend::open_unasked(&mut server, &startup).await?
            else {
                return std::io::Result::Ok(None);
            };
            Ok(warm_up(&mut server)
                .await?
                .then_some((server, greeting, backend)))
        })
        .await;
        let (server, greeting, backend) = match opened {
            Ok(Ok(Some(opened))) => opened,
            other => {
                let why = match other {
                    Ok(Ok(_)) => {
                        "the server asks for a password, refused, or failed the warm-up".to_owned()
                    }
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "timed out".to_owned(),
                };
                debug!(spare, reason = %why, "no session opened on a warm spare");
                if let Some(s) = self.warm().spares.get_mut(spare) {
                    s.opening.retain(|s| *s != startup);
                }
                return;
            }
        };
        let Some(socket) = Socket::park(server) else {
            return;
        };
        let mut warm = self.warm();
        match warm.spares.get_mut(spare) {
            Some(s) if s.addr == *addr => {
                s.opening.retain(|s| *s != startup);
                s.open.push(Open {
                    startup,
                    backend,
                    greeting: Arc::new(greeting),
                    socket,
                });
                self.gauge.inc();
                debug!(spare, "session opened on a warm spare");
            }
            _ => {
                drop(warm);
                socket.close();
            }
        }
    }
}

/// Runs [`WARM_QUERY`]; true when the session is idle after it, as it was (an
/// error in it, which the server logs, leaves it idle too: the session is kept,
/// just less warm).
async fn warm_up(server: &mut ServerStream) -> std::io::Result<bool> {
    let mut query = vec![b'Q'];
    query.extend_from_slice(&((4 + WARM_QUERY.len() + 1) as u32).to_be_bytes());
    query.extend_from_slice(WARM_QUERY.as_bytes());
    query.push(0);
    server.write_all(&query).await?;
    server.flush().await?;
    let mut buf = BytesMut::with_capacity(512);
    loop {
        let msg = backend::read_message(server, &mut buf).await?;
        if msg[0] == b'Z' {
            return Ok(&msg[5..] == b"I" && buf.is_empty());
        }
        // RowDescription, DataRow, CommandComplete, an error, notices.
    }
}

#[async_trait::async_trait]
impl SpareSessions for Pool {
    async fn ready(&self, source: &SourceName, spare: &str, addr: ServerAddr) -> bool {
        if !self.enabled() {
            return false;
        }
        let startups = {
            let mut warm = self.warm();
            let mut startups = warm.startups.entry(source.clone()).or_default().clone();
            let older = startups.len().saturating_sub(self.per_spare());
            startups.drain(..older);
            warm.spares.insert(
                spare.to_owned(),
                Spare {
                    source: source.clone(),
                    addr: addr.clone(),
                    open: Vec::new(),
                    opening: startups.clone(),
                },
            );
            startups
        };
        for startup in startups.into_iter().rev() {
            self.open_on(spare, &addr, startup).await;
        }
        self.warm()
            .spares
            .get(spare)
            .is_some_and(|s| !s.open.is_empty())
    }

    fn claimed(&self, spare: &str, id: &BranchId, addr: &ServerAddr) {
        let Some(s) = self.warm().spares.remove(spare) else {
            return;
        };
        let since = Instant::now();
        for o in s.open {
            self.put(Parked {
                ticket: Ticket {
                    key: Key {
                        id: id.clone(),
                        startup: o.startup,
                    },
                    addr: addr.clone(),
                    backend: o.backend,
                    greeting: o.greeting,
                },
                socket: o.socket,
                since,
            });
        }
    }

    fn dropped(&self, spare: &str) {
        let Some(s) = self.warm().spares.remove(spare) else {
            return;
        };
        for o in s.open {
            self.gauge.dec();
            self.discard(o.socket);
        }
    }
}
