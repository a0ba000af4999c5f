//! The first phase of a connection, in the order PostgreSQL defines it: direct TLS
//! or SSLRequest, GSSENCRequest, then a CancelRequest or a StartupMessage, and the
//! protocol version the session speaks.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tracing::debug;

use super::protocol::{self, encode_negotiate_protocol, Initial, Startup};
use super::tls;
use super::Proxy;
use crate::error::ClientError;

/// A client connection before the relay: plain or TLS.
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

either_stream!(ClientStream { Plain, Tls });

impl ClientStream {
    /// The server name a TLS client asked for (SNI).
    pub fn server_name(&self) -> Option<String> {
        match self {
            ClientStream::Tls(tls) => tls.get_ref().1.server_name().map(str::to_owned),
            ClientStream::Plain(_) => None,
        }
    }

    /// The client's address, for the audit trail.
    pub fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            ClientStream::Plain(tcp) => tcp.peer_addr().ok(),
            ClientStream::Tls(tls) => tls.get_ref().0.peer_addr().ok(),
        }
    }
}

/// What the first packets asked for.
pub(super) enum Negotiated {
    Cancel { pid: u32, secret: Vec<u8> },
    Startup(Hello),
}

/// A client that sent its StartupMessage.
pub(super) struct Hello {
    pub client: ClientStream,
    pub startup: Startup,
    /// The channel binding data of the certificate a TLS session was made with.
    pub end_point: Option<Arc<[u8]>>,
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
    match protocol::parse_initial(&body) {
        Ok(initial) => Ok(Some(initial)),
        // A CancelRequest is never answered, even a malformed one (as PostgreSQL).
        Err(_) if protocol::is_cancel_request(&body) => {
            debug!("malformed CancelRequest; closing without a word");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// SSL and GSS negotiation up to the StartupMessage or CancelRequest. `Ok(None)`:
/// the client left (or failed its TLS handshake) with nothing to be told.
pub(super) async fn negotiate(
    proxy: &Proxy,
    tcp: TcpStream,
) -> Result<Option<Negotiated>, (Option<ClientStream>, ClientError)> {
    let (mut stream, mut end_point) = open(proxy, tcp).await?;
    // Each request is answered once; asking again is a protocol violation, as in
    // PostgreSQL (a client may still try GSS and then SSL, as libpq does).
    let (mut ssl_answered, mut gss_answered) = (false, false);
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
            Initial::SslRequest if ssl_answered => {
                let err = ClientError::Protocol("SSLRequest repeated after it was answered".into());
                return Err((Some(stream), err));
            }
            Initial::GssEncRequest if gss_answered => {
                let err =
                    ClientError::Protocol("GSSENCRequest repeated after it was answered".into());
                return Err((Some(stream), err));
            }
            Initial::SslRequest => {
                ssl_answered = true;
                let loaded = proxy.tls.current();
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
                gss_answered = true;
                if stream.write_all(b"N").await.is_err() {
                    return Ok(None);
                }
            }
            Initial::Cancel { pid, secret } => return Ok(Some(Negotiated::Cancel { pid, secret })),
            Initial::Startup(startup) => {
                return Ok(Some(Negotiated::Startup(Hello {
                    client: stream,
                    startup,
                    end_point,
                })))
            }
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
    let loaded = proxy.tls.current();
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

/// Settles the protocol version: a client asking for a minor version not served, or
/// for protocol options, is told what is served, once, before anything else (as
/// PostgreSQL does). Towards the server the session is always 3.0: 3.2 differs only
/// in the length of cancel keys, and those are the proxy's own. Returns the length
/// of the cancel secrets this client takes; `None` when it is gone.
pub(super) async fn protocol_version(
    client: &mut ClientStream,
    startup: &Startup,
) -> Option<usize> {
    let options = startup.protocol_options();
    let minor = protocol::served_minor(startup.minor);
    if (startup.minor != minor || !options.is_empty())
        && client
            .write_all(&encode_negotiate_protocol(minor, &options))
            .await
            .is_err()
    {
        return None;
    }
    Some(if minor >= 2 {
        protocol::CANCEL_KEY_3_2
    } else {
        4
    })
}
