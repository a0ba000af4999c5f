//! The startup phase of one client connection, in the order PostgreSQL defines it:
//! SSLRequest / GSSENCRequest / CancelRequest / StartupMessage, then routing, the
//! branch, the server's own authentication, and the hand-off to the relay.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::server::TlsStream;
use tracing::{debug, info, warn, Instrument};

use super::backend::{self, ServerStream};
use super::protocol::{self, encode_negotiate_protocol, Initial, Startup};
use super::relay;
use super::route::{route, server_params};
use super::tls;
use super::Proxy;
use crate::error::{ClientError, ErrorKind};

/// A client connection before the relay: plain or TLS.
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

either_stream!(ClientStream { Plain, Tls });

/// What the first packets asked for.
enum Negotiated {
    Cancel { pid: u32, secret: u32 },
    Startup(ClientStream, Startup),
}

/// Reads one initial packet. `Ok(None)` when the client closed without a word.
async fn read_initial(stream: &mut ClientStream) -> Result<Option<Initial>, ClientError> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(_) => return Ok(None),
    }
    let body_len = protocol::initial_body_len(u32::from_be_bytes(len))?;
    let mut body = vec![0u8; body_len];
    if stream.read_exact(&mut body).await.is_err() {
        // Truncated packet: the client is gone, there is nobody to tell.
        return Ok(None);
    }
    protocol::parse_initial(&body).map(Some)
}

/// SSL and GSS negotiation up to the StartupMessage or CancelRequest.
async fn negotiate(
    proxy: &Proxy,
    tcp: TcpStream,
) -> Result<Option<Negotiated>, (Option<ClientStream>, ClientError)> {
    let mut stream = open(proxy, tcp).await?;
    loop {
        let initial = match read_initial(&mut stream).await {
            Ok(Some(i)) => i,
            Ok(None) => return Ok(None),
            Err(e) => return Err((Some(stream), e)),
        };
        let is_tls = matches!(stream, ClientStream::Tls(_));
        match initial {
            Initial::SslRequest | Initial::GssEncRequest if is_tls => {
                return Err((
                    Some(stream),
                    ClientError::Protocol("SSL or GSS negotiation repeated inside TLS".into()),
                ));
            }
            Initial::SslRequest => {
                let acceptor = proxy.tls.read().expect("tls lock").clone();
                let ClientStream::Plain(mut tcp) = stream else {
                    unreachable!("checked above")
                };
                match acceptor {
                    Some(acceptor) => {
                        if tcp.write_all(b"S").await.is_err() {
                            return Ok(None);
                        }
                        match acceptor.accept(tcp).await {
                            Ok(tls) => stream = ClientStream::Tls(Box::new(tls)),
                            Err(e) => {
                                debug!(error = %e, "TLS handshake failed");
                                return Ok(None);
                            }
                        }
                    }
                    None => {
                        if tcp.write_all(b"N").await.is_err() {
                            return Ok(None);
                        }
                        stream = ClientStream::Plain(tcp);
                    }
                }
            }
            Initial::GssEncRequest => {
                if stream.write_all(b"N").await.is_err() {
                    return Ok(None);
                }
            }
            Initial::Cancel { pid, secret } => return Ok(Some(Negotiated::Cancel { pid, secret })),
            Initial::Startup(s) => return Ok(Some(Negotiated::Startup(stream, s))),
        }
    }
}

/// Direct TLS (PostgreSQL 17 `sslnegotiation=direct`): the connection opens with a
/// TLS ClientHello rather than a length word. Accepted only when TLS is configured
/// and the client negotiated ALPN `postgresql`, as PostgreSQL requires. Any other
/// first byte leaves the connection plain, for the usual negotiation.
async fn open(
    proxy: &Proxy,
    tcp: TcpStream,
) -> Result<ClientStream, (Option<ClientStream>, ClientError)> {
    let mut first = [0u8; 1];
    let direct = matches!(tcp.peek(&mut first).await, Ok(1)) && first[0] == tls::TLS_HANDSHAKE;
    if !direct {
        return Ok(ClientStream::Plain(tcp));
    }
    let acceptor = proxy.tls.read().expect("tls lock").clone();
    let Some(acceptor) = acceptor else {
        // Nothing can be said in a protocol the client is not speaking: just close.
        return Err((
            None,
            ClientError::Protocol("direct TLS, but TLS is not configured".into()),
        ));
    };
    let tls = acceptor.accept(tcp).await.map_err(|e| {
        (
            None,
            ClientError::Protocol(format!("direct TLS handshake failed: {e}")),
        )
    })?;
    let alpn_ok = tls.get_ref().1.alpn_protocol() == Some(tls::ALPN_POSTGRESQL);
    let stream = ClientStream::Tls(Box::new(tls));
    if !alpn_ok {
        let err = ClientError::Protocol("direct TLS requires ALPN protocol \"postgresql\"".into());
        return Err((Some(stream), err));
    }
    Ok(stream)
}

/// Sends `err` to the client (best effort) and counts it.
async fn refuse(proxy: &Proxy, stream: &mut ClientStream, err: &ClientError) {
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

/// Serves one accepted client connection from its first byte to its last.
pub async fn serve(
    proxy: Arc<Proxy>,
    tcp: std::net::TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
) {
    let tcp = match TcpStream::from_std(tcp) {
        Ok(t) => t,
        Err(e) => return debug!(%peer, error = %e, "cannot register socket"),
    };
    let span = tracing::info_span!(
        "conn",
        %peer,
        source = tracing::field::Empty,
        branch = tracing::field::Empty
    );
    serve_inner(proxy, tcp, peer, span.clone(), permit)
        .instrument(span)
        .await
}

async fn serve_inner(
    proxy: Arc<Proxy>,
    tcp: TcpStream,
    peer: SocketAddr,
    span: tracing::Span,
    permit: OwnedSemaphorePermit,
) {
    let _ = tcp.set_nodelay(true);
    let negotiated =
        tokio::time::timeout(proxy.config.startup_timeout, negotiate(&proxy, tcp)).await;
    let (mut client, startup) = match negotiated {
        Err(_) => {
            debug!("startup timeout; dropping silent client");
            proxy
                .metrics
                .errors_total
                .with_label_values(&["startup_timeout"])
                .inc();
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Err((stream, err))) => {
            match stream {
                Some(mut s) => refuse(&proxy, &mut s, &err).await,
                None => debug!(error = %err, "refused"),
            }
            return;
        }
        Ok(Ok(Some(Negotiated::Cancel { pid, secret }))) => {
            // Rate-limited per address: guessing secrets costs a connection each.
            let outcome = if !proxy.cancel_limit.allow(peer.ip()) {
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
            return;
        }
        Ok(Ok(Some(Negotiated::Startup(client, startup)))) => (client, startup),
    };

    if proxy.tls_required && matches!(client, ClientStream::Plain(_)) {
        return refuse(&proxy, &mut client, &ClientError::TlsRequired).await;
    }
    let server_name = match &client {
        ClientStream::Tls(tls) => tls.get_ref().1.server_name().map(str::to_owned),
        ClientStream::Plain(_) => None,
    };
    let sni = match (&server_name, &proxy.sni_suffix) {
        (Some(name), Some(suffix)) => super::route::from_server_name(name, suffix),
        _ => None,
    };
    let route = match route(&startup, &proxy.config, &proxy.registry, sni) {
        Ok(r) => r,
        Err(e) => return refuse(&proxy, &mut client, &e.into()).await,
    };
    span.record("source", route.id.source.as_str());
    span.record("branch", route.id.branch.as_str());
    // Replication sessions would stream the clone's WAL and bypass its policies.
    let replication = startup.get("replication").is_some_and(|v| {
        !matches!(
            v.to_ascii_lowercase().as_str(),
            "false" | "off" | "no" | "0"
        )
    });
    let allowed = proxy
        .registry
        .source(route.id.source.as_str())
        .is_some_and(|s| s.config.allow_replication);
    if replication && !allowed {
        let err = ClientError::Replication(route.id.source.to_string());
        return refuse(&proxy, &mut client, &err).await;
    }

    // A client asking for a newer minor version or protocol options is told what is
    // served, once, before anything else (as PostgreSQL does); the server sees 3.0.
    let options = startup.protocol_options();
    if (startup.minor > 0 || !options.is_empty())
        && client
            .write_all(&encode_negotiate_protocol(&options))
            .await
            .is_err()
    {
        return;
    }

    let lease = match proxy
        .registry
        .acquire(&route.id, proxy.config.provision_timeout)
        .await
    {
        Ok(l) => l,
        Err(e) => return refuse(&proxy, &mut client, &e.into()).await,
    };
    let mut server = match ServerStream::connect(&lease.endpoint.addr).await {
        Ok(s) => s,
        Err(e) => {
            warn!(server = %lease.endpoint.addr, error = %e, "cannot reach branch server");
            let err = ClientError::Backend {
                id: route.id.clone(),
                reason: e.to_string(),
            };
            return refuse(&proxy, &mut client, &err).await;
        }
    };

    let params = server_params(&startup, &route.user, &lease.endpoint.database);
    let startup_msg = protocol::encode_startup(&params);
    let mut key_guard = None;
    let addr = lease.endpoint.addr.clone();
    let cancels = proxy.cancels.clone();
    let outcome = backend::authenticate(&mut client, &mut server, &startup_msg, |pid, secret| {
        let (ppid, psecret, guard) = cancels.issue(addr.clone(), pid, secret);
        key_guard = Some(guard);
        protocol::encode_backend_key(ppid, psecret)
    })
    .await;
    match outcome {
        Ok(backend::Outcome::Ready) => {}
        Ok(backend::Outcome::Refused) => {
            proxy
                .metrics
                .errors_total
                .with_label_values(&["server_refused"])
                .inc();
            debug!("server refused the session");
            return;
        }
        Ok(backend::Outcome::ClientGone) => {
            debug!("client left before the session opened");
            return;
        }
        Err(e) => {
            // The server closed or broke protocol mid-startup; tell the client why
            // its connection ends (it may already be gone, which is fine).
            warn!(server = %lease.endpoint.addr, error = %e, "server failed during startup");
            let err = ClientError::Backend {
                id: route.id.clone(),
                reason: format!("server ended the startup: {e}"),
            };
            return refuse(&proxy, &mut client, &err).await;
        }
    }
    debug!("session open");

    // Held until the session ends: the branch's connection count, the cancel key,
    // and the connection-limit permit.
    let _hold = (lease.guard, key_guard, permit);
    let counters = &proxy.counters;
    let result = match (client, server) {
        (ClientStream::Plain(c), ServerStream::Tcp(s)) => {
            relay::pump(&c, &s, counters.clone()).await
        }
        (ClientStream::Plain(c), ServerStream::Unix(s)) => {
            relay::pump(&c, &s, counters.clone()).await
        }
        (ClientStream::Tls(mut c), mut server) => relay::copy(&mut c, &mut server, counters).await,
    };
    match result {
        Ok(()) => debug!("connection closed"),
        Err(e) => debug!(error = %e, "connection ended"),
    }
}
