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

use super::auth;
use super::backend::{self, ServerStream};
use super::protocol::{self, encode_negotiate_protocol, Initial, Startup};
use super::relay;
use super::route::{names, route, server_params};
use super::tls;
use super::Proxy;
use crate::branch::registry::{Creator, Lease};
use crate::config::AuthMethod;
use crate::error::{ClientError, ErrorKind, ProvisionError};

/// A client connection before the relay: plain or TLS.
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

either_stream!(ClientStream { Plain, Tls });

/// What the first packets asked for.
enum Negotiated {
    Cancel {
        pid: u32,
        secret: Vec<u8>,
    },
    /// The channel binding data of the certificate a TLS session was made with.
    Startup(ClientStream, Startup, Option<Arc<[u8]>>),
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
    let (mut stream, mut end_point) = open(proxy, tcp).await?;
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
                let loaded = proxy.tls.read().expect("tls lock").clone();
                let ClientStream::Plain(mut tcp) = stream else {
                    unreachable!("checked above")
                };
                match loaded {
                    Some(loaded) => {
                        if tcp.write_all(b"S").await.is_err() {
                            return Ok(None);
                        }
                        match loaded.acceptor.accept(tcp).await {
                            Ok(tls) => {
                                stream = ClientStream::Tls(Box::new(tls));
                                end_point = loaded.end_point.clone();
                            }
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
            Initial::Startup(s) => return Ok(Some(Negotiated::Startup(stream, s, end_point))),
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
) -> Result<(ClientStream, Option<Arc<[u8]>>), (Option<ClientStream>, ClientError)> {
    let mut first = [0u8; 1];
    let direct = matches!(tcp.peek(&mut first).await, Ok(1)) && first[0] == tls::TLS_HANDSHAKE;
    if !direct {
        return Ok((ClientStream::Plain(tcp), None));
    }
    let loaded = proxy.tls.read().expect("tls lock").clone();
    let Some(loaded) = loaded else {
        // Nothing can be said in a protocol the client is not speaking: just close.
        return Err((
            None,
            ClientError::Protocol("direct TLS, but TLS is not configured".into()),
        ));
    };
    let tls = loaded.acceptor.accept(tcp).await.map_err(|e| {
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
    Ok((stream, loaded.end_point.clone()))
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
    let (mut client, startup, end_point) = match negotiated {
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
            } else if proxy.cancels.forward(pid, &secret).await {
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
        Ok(Ok(Some(Negotiated::Startup(client, startup, end_point)))) => {
            (client, startup, end_point)
        }
    };

    if proxy.tls_required && matches!(client, ClientStream::Plain(_)) {
        return refuse(&proxy, &mut client, &ClientError::TlsRequired).await;
    }
    // A client asking for a minor version not served, or for protocol options, is
    // told what is served, once, before anything else (as PostgreSQL does). Towards
    // the server the session is always 3.0: 3.2 differs only in the length of cancel
    // keys, and those are the proxy's own.
    let options = startup.protocol_options();
    let minor = protocol::served_minor(startup.minor);
    if (startup.minor != minor || !options.is_empty())
        && client
            .write_all(&encode_negotiate_protocol(minor, &options))
            .await
            .is_err()
    {
        return;
    }
    let key_len = if minor >= 2 {
        protocol::CANCEL_KEY_3_2
    } else {
        4
    };
    let server_name = match &client {
        ClientStream::Tls(tls) => tls.get_ref().1.server_name().map(str::to_owned),
        ClientStream::Plain(_) => None,
    };
    let sni = match (&server_name, &proxy.sni_suffix) {
        (Some(name), Some(suffix)) => super::route::from_server_name(name, suffix),
        _ => None,
    };
    let names = match names(&startup, &proxy.config, sni) {
        Ok(n) => n,
        Err(e) => return refuse(&proxy, &mut client, &e.into()).await,
    };
    let method = proxy.auth_method_for(names.source);

    // Authentication comes before the name is checked any further: a client without
    // the right password learns nothing about sources or branches, and makes none.
    let proven = if method == AuthMethod::Trust {
        None
    } else {
        let role = names.role.to_owned();
        let source = names.source.to_owned();
        let tls = matches!(client, ClientStream::Tls(_));
        let exchange = async {
            let found = proxy.credentials.lookup(&source, &role).await;
            auth::authenticate(
                &mut client,
                method,
                &role,
                found,
                &proxy.credentials,
                tls,
                end_point.as_deref(),
            )
            .await
        };
        match tokio::time::timeout(proxy.config.startup_timeout, exchange).await {
            Ok(Ok(p)) => Some(p),
            Ok(Err(e)) => return refuse(&proxy, &mut client, &e).await,
            Err(_) => {
                let err = ClientError::Protocol("authentication timed out".into());
                return refuse(&proxy, &mut client, &err).await;
            }
        }
    };

    let route = match route(&startup, &proxy.config, &proxy.registry, sni) {
        Ok(r) => r,
        Err(e) => return refuse(&proxy, &mut client, &e.into()).await,
    };
    span.record("source", route.id.source.as_str());
    span.record("branch", route.id.branch.as_str());
    let source = proxy
        .registry
        .source(route.id.source.as_str())
        .expect("routing found the source");
    // Replication sessions would stream the clone's WAL and bypass its policies.
    let replication = startup.get("replication").is_some_and(|v| {
        !matches!(
            v.to_ascii_lowercase().as_str(),
            "false" | "off" | "no" | "0"
        )
    });
    if replication && !source.config.allow_replication {
        let err = ClientError::Replication(route.id.source.to_string());
        return refuse(&proxy, &mut client, &err).await;
    }

    let creator = match &proven {
        None => None,
        Some(_) => {
            let cfg = &source.config;
            let listed = |roles: &[String]| roles.is_empty() || roles.contains(&route.user);
            if !listed(&cfg.connect_roles) {
                let err = ClientError::Forbidden(format!(
                    "role \"{}\" may not connect to branches of source {} (sources.{}.connect_roles)",
                    route.user, route.id.source, route.id.source
                ));
                return refuse(&proxy, &mut client, &err).await;
            }
            Some(Creator {
                role: route.user.clone(),
                may_create: listed(&cfg.create_roles),
                max_branches: cfg.max_branches_per_role,
            })
        }
    };
    if proven.is_some() && client.write_all(&auth::auth_ok()).await.is_err() {
        return;
    }

    let lease = match acquire(&proxy, &mut client, &route, creator.as_ref()).await {
        Ok(Some(l)) => l,
        Ok(None) => return,
        Err(e) => return refuse(&proxy, &mut client, &e.into()).await,
    };
    let upstream = proxy
        .upstream
        .get(route.id.source.as_str())
        .and_then(|u| u.config.clone());
    let mut server = match ServerStream::connect(&lease.endpoint.addr, upstream.as_ref()).await {
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
    let key = |pid, secret| {
        let (ppid, psecret, guard) =
            cancels.issue(addr.clone(), upstream.clone(), pid, secret, key_len);
        key_guard = Some(guard);
        protocol::encode_backend_key(ppid, &psecret)
    };
    let outcome = match &proven {
        None => backend::authenticate(&mut client, &mut server, &startup_msg, key).await,
        Some(p) => {
            backend::login(&mut client, &mut server, &startup_msg, &route.user, p, key).await
        }
    };
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
        (mut client, mut server) => relay::copy(&mut client, &mut server, counters).await,
    };
    match result {
        Ok(()) => debug!("connection closed"),
        Err(e) => debug!(error = %e, "connection ended"),
    }
}

/// Gets the branch from the registry. When it has to be made (or woken) first, a
/// client that is already authenticated is told so in NoticeResponses, and told
/// again when it is ready. `Ok(None)`: the client left meanwhile.
async fn acquire(
    proxy: &Proxy,
    client: &mut ClientStream,
    route: &super::route::Route,
    creator: Option<&Creator>,
) -> Result<Option<Lease>, ProvisionError> {
    let timeout = proxy.config.provision_timeout;
    use crate::branch::registry::Phase;
    let (branch, source) = (&route.id.branch, &route.id.source);
    // Notices only go to clients past AuthenticationOk: under `trust` the server's
    // own authentication is still to come, and nothing may precede it.
    let notice = match (creator, proxy.registry.view(&route.id).map(|v| v.state)) {
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
    let lease = proxy
        .registry
        .acquire_as(&route.id, timeout, creator)
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
