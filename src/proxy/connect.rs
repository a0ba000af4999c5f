//! The branch and its server: the registry leases the branch (creating or waking it
//! first if needed, with progress notices to an authenticated client), then the
//! proxy connects to the branch's server and carries the startup through it.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tracing::{debug, warn};

use super::auth::Proven;
use super::backend::{self, ServerStream};
use super::cancel::KeyGuard;
use super::negotiate::ClientStream;
use super::pool::{Key, Ticket};
use super::protocol::{self, Startup};
use super::route::{server_params, Route};
use super::Proxy;
use crate::branch::registry::{ConnGuard, Creator};
use crate::branch::{Lease, Phase};
use crate::error::{ClientError, ProvisionError};

/// A server session ready for the relay.
pub(super) struct Session {
    pub server: ServerStream,
    /// Held until the session ends: the branch's connection count and the cancel key.
    pub hold: (ConnGuard, Option<KeyGuard>),
    /// Set when the server session may be kept for the next client once this one
    /// ends cleanly.
    pub reuse: Option<Ticket>,
    /// Set on rehearsal branches only: the relay records the session's statements.
    pub recorder: Option<super::record::Recorder>,
}

/// A server connection, new or kept from an earlier client.
enum Opened {
    New(ServerStream),
    Kept(Ticket, ServerStream),
}

/// Leases the branch and opens its server session, logged in as the route's role.
/// `proven`: what the client proved to the proxy (`None` under `trust`, where the
/// server's own authentication is relayed). `Ok(None)`: the session ended with
/// nothing left to tell the client.
pub(super) async fn connect(
    proxy: &Proxy,
    client: &mut ClientStream,
    startup: &Startup,
    route: &Route,
    creator: Option<&Creator>,
    proven: Option<&Proven>,
    key_len: usize,
) -> Result<Option<Session>, ClientError> {
    let params = |database: &str| server_params(startup, &route.user, database);
    let keep_as = |database: &str| match reusable(proxy, route) {
        true => Key::new(&route.id, &params(database)),
        false => None,
    };
    let reached = reach(proxy, client, route, creator, keep_as).await?;
    let Some((lease, opened, reuse_key)) = reached else {
        return Ok(None);
    };
    let upstream = proxy.access.upstream(route.id.source.as_str());
    let addr = lease.endpoint.addr.clone();
    let cancels = proxy.cancels.clone();
    let mut key_guard = None;
    let mut backend_key = None;
    let mut key = |pid, secret| {
        let (ppid, psecret, guard) =
            cancels.issue(addr.clone(), upstream.clone(), pid, secret, key_len);
        key_guard = Some(guard);
        backend_key = Some((pid, secret));
        protocol::encode_backend_key(ppid, &psecret)
    };
    let mut server = match opened {
        Opened::New(s) => s,
        Opened::Kept(ticket, server) => {
            // What a new session would have shown: AuthenticationOk (the proxy sent
            // it already to a client it authenticated), the login's
            // ParameterStatus values, a cancel key of the client's own, idle.
            let mut hello = BytesMut::with_capacity(ticket.greeting.params.len() + 64);
            if proven.is_none() {
                hello.extend_from_slice(&super::auth::auth_ok());
            }
            hello.extend_from_slice(&ticket.greeting.params);
            hello.extend_from_slice(&key(ticket.backend.0, ticket.backend.1));
            hello.extend_from_slice(b"Z\0\0\0\x05I");
            if client.write_all(&hello).await.is_err() || client.flush().await.is_err() {
                return Ok(None);
            }
            debug!("server session reused");
            return Ok(Some(Session {
                server,
                hold: (lease.guard, key_guard),
                reuse: Some(ticket),
                recorder: super::record::recorder(&route.id, startup),
            }));
        }
    };
    let startup_msg = protocol::encode_startup(&params(&lease.endpoint.database));
    let policy = backend::LoginPolicy {
        secure: !matches!(server, ServerStream::Tcp(_)),
        max_iterations: proxy.access.credentials.max_iterations(),
    };
    let outcome = match proven {
        None => backend::authenticate(client, &mut server, &startup_msg, &mut key).await,
        Some(p) => {
            let user = &route.user;
            backend::login(
                client,
                &mut server,
                &startup_msg,
                user,
                p,
                &policy,
                &mut key,
            )
            .await
        }
    };
    match outcome {
        Ok(backend::Outcome::Ready(greeting)) => {
            // Under `trust` only a session the server opened without any proof may
            // go to another client: any client would have been let in the same.
            let keep = proven.is_some() || !greeting.challenged;
            let reuse = match (reuse_key, backend_key) {
                (Some(key), Some(backend)) if keep => Some(Ticket {
                    key,
                    addr: addr.clone(),
                    backend,
                    greeting: Arc::new(greeting),
                }),
                _ => None,
            };
            Ok(Some(Session {
                server,
                hold: (lease.guard, key_guard),
                reuse,
                recorder: super::record::recorder(&route.id, startup),
            }))
        }
        Ok(backend::Outcome::Refused) => {
            proxy
                .metrics
                .errors_total
                .with_label_values(&["server_refused"])
                .inc();
            debug!("server refused the session");
            Ok(None)
        }
        Ok(backend::Outcome::ClientGone) => {
            debug!("client left before the session opened");
            Ok(None)
        }
        Err(e) => {
            // The server closed or broke protocol mid-startup; tell the client why
            // its connection ends (it may already be gone, which is fine).
            warn!(server = %addr, error = %e, "server failed during startup");
            Err(ClientError::Backend {
                id: route.id.clone(),
                reason: format!("server ended the startup: {e}"),
            })
        }
    }
}

/// Whether sessions of this route's source may be kept for reuse.
fn reusable(proxy: &Proxy, route: &Route) -> bool {
    proxy.pool.enabled()
        && proxy
            .registry
            .source(route.id.source.as_str())
            .is_some_and(|s| s.config.server_reuse)
}

/// Leases the branch and opens a connection to its server, or takes a session
/// kept for `key` (made from the branch's database; `None`: not to be kept). A
/// branch server found dead (killed, or crashed) is started again once, through
/// the registry. `Ok(None)`: the client left meanwhile.
async fn reach(
    proxy: &Proxy,
    client: &mut ClientStream,
    route: &Route,
    creator: Option<&Creator>,
    key: impl Fn(&str) -> Option<Key>,
) -> Result<Option<(Lease, Opened, Option<Key>)>, ClientError> {
    let upstream = proxy.access.upstream(route.id.source.as_str());
    let mut retried = false;
    loop {
        let Some(lease) = acquire(proxy, client, route, creator).await? else {
            return Ok(None);
        };
        let addr = lease.endpoint.addr.clone();
        let key = key(&lease.endpoint.database);
        if let Some(k) = &key {
            if let Some((ticket, server)) = proxy.pool.take(k, &addr) {
                return Ok(Some((lease, Opened::Kept(ticket, server), None)));
            }
        }
        match ServerStream::connect(&addr, upstream.as_ref()).await {
            Ok(server) => return Ok(Some((lease, Opened::New(server), key))),
            Err(e) => {
                warn!(server = %addr, error = %e, "cannot reach branch server");
                drop(lease);
                if !retried && proxy.registry.server_lost(&route.id).await {
                    retried = true;
                    continue;
                }
                return Err(ClientError::Backend {
                    id: route.id.clone(),
                    reason: e.to_string(),
                });
            }
        }
    }
}

/// Gets the branch from the registry. When it has to be made (or woken) first, a
/// client that is already authenticated is told so in NoticeResponses, and told
/// again when it is ready. `Ok(None)`: the client left meanwhile.
async fn acquire(
    proxy: &Proxy,
    client: &mut ClientStream,
    route: &Route,
    creator: Option<&Creator>,
) -> Result<Option<Lease>, ProvisionError> {
    let (branch, source) = (&route.id.branch, &route.id.source);
    // Notices only go to clients past AuthenticationOk: under `trust` the server's
    // own authentication is still to come, and nothing may precede it.
    let notice = match (creator, proxy.registry.phase(&route.id)) {
        (None, _) | (_, Some(Phase::Ready)) => None,
        (Some(c), None) if c.may_create => {
            Some(format!("creating branch {branch} of source {source}"))
        }
        (Some(_), None) => None,
        (Some(_), Some(Phase::Provisioning)) => Some(format!(
            "branch {branch} of source {source} is being created; waiting for it"
        )),
        (Some(_), Some(Phase::Suspended | Phase::Starting)) => Some(format!(
            "starting branch {branch} of source {source} (it was suspended)"
        )),
        (Some(_), Some(_)) => Some(format!("waiting for branch {branch} of source {source}")),
    };
    let announce = notice.is_some();
    let started = std::time::Instant::now();
    if let Some(msg) = notice {
        if client
            .write_all(&protocol::encode_notice(&msg))
            .await
            .is_err()
        {
            return Ok(None);
        }
    }
    // Who the audit trail names, if this connection makes, wakes or is refused
    // the branch (looked up only then).
    let peer = &*client;
    let actor = || {
        crate::audit::Actor::client(
            Some(route.user.clone()),
            peer.peer_addr().map(|a| a.to_string()),
        )
    };
    let lease = proxy
        .registry
        .acquire_by(&route.id, proxy.config.provision_timeout, creator, actor)
        .await?;
    if announce {
        let msg = format!(
            "branch {} ready in {} ms",
            route.id,
            started.elapsed().as_millis()
        );
        if client
            .write_all(&protocol::encode_notice(&msg))
            .await
            .is_err()
        {
            return Ok(None);
        }
    }
    Ok(Some(lease))
}
