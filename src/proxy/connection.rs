//! One client connection from its first byte to its last: the phases in order.
//!
//! Each phase lives in its own module and returns what the next one needs; this
//! file only sequences them, holds the one startup deadline, and turns a phase's
//! error into the client's ErrorResponse.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, info, Instrument};

use super::limits::Pending;
use super::limits::Slot;
use super::negotiate::{self, ClientStream, Hello};
use super::{auth, authorize, connect, relay, route, Proxy};
use crate::error::{ClientError, ErrorKind};

/// Serves one accepted client connection from its first byte to its last.
pub(super) async fn serve(
    proxy: Arc<Proxy>,
    tcp: TcpStream,
    peer: SocketAddr,
    slot: Slot,
    pending: Pending,
) {
    let span = tracing::info_span!(
        "conn",
        %peer,
        source = tracing::field::Empty,
        branch = tracing::field::Empty
    );
    // The phases up to the relay are boxed, here and below: their state is large
    // (several kilobytes), and a future held inline is copied whole each time the
    // one around it moves (into its task, into the next phase's state).
    let opened = Box::pin(open(&proxy, tcp, peer, span.clone(), pending))
        .instrument(span.clone())
        .await;
    if let Some((client, session)) = opened {
        relay(&proxy, client, session, slot, &span).await;
    }
}

/// The phases up to an open server session. `None`: the connection ended (the
/// client was told why, where there was something to tell).
async fn open(
    proxy: &Proxy,
    tcp: TcpStream,
    peer: SocketAddr,
    span: tracing::Span,
    pending: Pending,
) -> Option<(ClientStream, connect::Session)> {
    let _ = tcp.set_nodelay(true);
    // One deadline for everything before authentication is settled: TLS, the
    // negotiation and the authentication exchange together.
    let deadline = Instant::now() + proxy.config.startup_timeout;
    let negotiated = Box::pin(negotiate::negotiate(proxy, tcp));
    let hello = match tokio::time::timeout_at(deadline, negotiated).await {
        Err(_) => {
            timed_out(proxy);
            return None;
        }
        Ok(Ok(None)) => return None,
        Ok(Err((stream, err))) => {
            match stream {
                Some(mut s) => refuse(proxy, &mut s, &err).await,
                None => debug!(error = %err, "refused"),
            }
            return None;
        }
        Ok(Ok(Some(negotiate::Negotiated::Cancel { pid, secret }))) => {
            super::cancel::answer(proxy, peer.ip(), pid, &secret).await;
            return None;
        }
        Ok(Ok(Some(negotiate::Negotiated::Startup(hello)))) => hello,
    };
    let Hello {
        mut client,
        startup,
        end_point,
    } = hello;
    let opened = Box::pin(startup_phases(
        proxy,
        &mut client,
        pending,
        &startup,
        end_point,
        deadline,
        &span,
    ))
    .await;
    match opened {
        Ok(Some(s)) => {
            debug!("session open");
            Some((client, s))
        }
        Ok(None) => None,
        Err(e) => {
            refuse(proxy, &mut client, &e).await;
            None
        }
    }
}

/// Relays an open session to its end, and parks its server session when the
/// client ended cleanly. The relay runs outside the connection's span, which
/// would otherwise be entered and left at every wake-up of the pump; what is
/// logged at the end is logged inside it.
async fn relay(
    proxy: &Proxy,
    mut client: ClientStream,
    session: connect::Session,
    slot: Slot,
    span: &tracing::Span,
) {
    // Held until the session ends: the branch's connection count, the cancel key,
    // and the connection's slot under the connection limit.
    let (lease, key) = session.hold;
    let keep = session.reuse.is_some();
    let relay = async {
        match session.recorder {
            // A recorded session is closed at its end, never kept.
            Some(r) => super::record::run(&mut client, session.server, &proxy.counters, r)
                .await
                .map(|()| relay::End::Closed),
            None => relay::run(&mut client, session.server, &proxy.counters, keep).await,
        }
    };
    // The branch's "sessions ended" token is polled again only once it has woken
    // the task, not at every wake-up of the pump.
    let relayed = {
        let ended = std::pin::pin!(lease.ended());
        tokio::select! {
            biased;
            r = relay => Some(r),
            () = relay::WhenWoken::new(ended) => None,
        }
    };
    match relayed {
        Some(Ok(relay::End::Idle(server))) => {
            // The client's cancel key dies with it; the lease is held until the
            // session is parked, so the branch cannot be drained in between.
            drop(key);
            if let Some(ticket) = session.reuse {
                proxy
                    .pool
                    .park(server, ticket)
                    .instrument(span.clone())
                    .await;
            }
            span.in_scope(|| debug!("connection closed; server session kept"));
        }
        Some(Ok(relay::End::Closed)) => span.in_scope(|| debug!("connection closed")),
        Some(Err(e)) => span.in_scope(|| debug!(error = %e, "connection ended")),
        // A forced reset: the relay has stopped and the server session is closed;
        // the client is told why, as PostgreSQL does when a session is ended.
        None => {
            let err = ClientError::BranchReset(lease.branch().clone());
            refuse(proxy, &mut client, &err)
                .instrument(span.clone())
                .await;
        }
    }
    drop((lease, slot));
}

/// From the StartupMessage to an open server session: version, authentication,
/// routing, authorization, the branch and its server. `pending` counts the
/// connection as unauthenticated until the client has proven itself. `Ok(None)`:
/// the connection ended with nothing more to tell the client (it left, or the
/// server's own refusal was relayed).
async fn startup_phases(
    proxy: &Proxy,
    client: &mut ClientStream,
    pending: Pending,
    startup: &super::protocol::Startup,
    end_point: Option<Arc<[u8]>>,
    deadline: Instant,
    span: &tracing::Span,
) -> Result<Option<connect::Session>, ClientError> {
    if proxy.tls.required && matches!(client, ClientStream::Plain(_)) {
        return Err(ClientError::TlsRequired);
    }
    let Some(key_len) = negotiate::protocol_version(client, startup).await else {
        return Ok(None);
    };
    let server_name = client.server_name();
    let sni = match (&server_name, &proxy.tls.sni_suffix) {
        (Some(name), Some(suffix)) => route::from_server_name(name, suffix),
        _ => None,
    };
    let names = route::names(startup, &proxy.config, sni)?;

    // Authentication comes before the names are checked any further: a client
    // without the right password learns nothing about sources or branches, and
    // makes none.
    let proven = match tokio::time::timeout_at(
        deadline,
        Box::pin(auth::authenticate(
            proxy,
            client,
            &names,
            end_point.as_deref(),
        )),
    )
    .await
    {
        Ok(p) => p?,
        Err(_) => return Err(ClientError::Protocol("authentication timed out".into())),
    };

    let route = route::route(startup, &proxy.config, &proxy.registry, sni)?;
    span.record("source", route.id.source.as_str());
    span.record("branch", route.id.branch.as_str());
    if proven.is_some() {
        // Under `trust` the server's own authentication is still to come.
        drop(pending);
    }
    let creator = authorize::authorize(proxy, startup, &route, proven.is_some())?;
    tokio::time::timeout_at(deadline, authorize::refuse_superuser(proxy, &route))
        .await
        .map_err(|_| ClientError::Protocol("authentication timed out".into()))??;
    if proven.is_some() && client.write_all(&auth::auth_ok()).await.is_err() {
        return Ok(None);
    }
    Box::pin(connect::connect(
        proxy,
        client,
        startup,
        &route,
        creator.as_ref(),
        proven.as_ref(),
        key_len,
    ))
    .await
}

/// A client that said too little before the startup deadline: dropped without a
/// word, as PostgreSQL does.
fn timed_out(proxy: &Proxy) {
    debug!("startup timeout; dropping silent client");
    proxy
        .metrics
        .errors_total
        .with_label_values(&["startup_timeout"])
        .inc();
}

/// Sends `err` to the client (best effort) and counts it.
pub(super) async fn refuse(proxy: &Proxy, stream: &mut ClientStream, err: &ClientError) {
    proxy
        .metrics
        .errors_total
        .with_label_values(&[err.kind().as_str()])
        .inc();
    match err.kind() {
        ErrorKind::Protocol => debug!(error = %err, "refused"),
        _ => info!(sqlstate = err.sqlstate(), error = %err, "refused"),
    }
    let _ = stream.write_all(&err.response()).await;
    let _ = stream.flush().await;
    let _ = stream.shutdown().await;
}
