//! Connecting to a branch's server and carrying the startup through it.
//!
//! Two ways: [`authenticate`] relays the server's own authentication exchange to the
//! client message by message (`trust` at the proxy); [`login`] answers it on behalf
//! of a client the proxy has already authenticated, with the ClientKey recovered
//! from that client's SCRAM proof (or its password). Either way the proxy replaces
//! BackendKeyData with its own key.

use std::io;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::auth::Proven;
use super::protocol::{auth_code, auth_needs_reply, message_header, MAX_STARTUP_MESSAGE};
use crate::auth::scram::{self, ClientExchange};
use crate::branch::engine::ServerAddr;

/// A connection to a branch's server.
pub enum ServerStream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl ServerStream {
    /// Connects to `addr`; over TLS when `tls` is set and the server is on TCP.
    pub async fn connect(
        addr: &ServerAddr,
        tls: Option<&Arc<rustls::ClientConfig>>,
    ) -> io::Result<Self> {
        Ok(match addr {
            ServerAddr::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port)).await?;
                s.set_nodelay(true)?;
                match tls {
                    Some(config) => ServerStream::Tls(Box::new(
                        crate::upstream::connect_server(config.clone(), host, s).await?,
                    )),
                    None => ServerStream::Tcp(s),
                }
            }
            ServerAddr::Unix(path) => ServerStream::Unix(UnixStream::connect(path).await?),
        })
    }
}

either_stream!(ServerStream { Tcp, Unix, Tls });

/// How the startup through the server ended.
pub enum Outcome {
    /// ReadyForQuery was relayed; the session is open.
    Ready(Greeting),
    /// The server refused (bad password, no such role...); its ErrorResponse was relayed.
    Refused,
    /// The client went away or broke protocol during authentication.
    ClientGone,
}

/// What a server said while a session opened that a later client of the same
/// session, reused, must be shown again.
#[derive(Default)]
pub struct Greeting {
    /// The ParameterStatus messages, as the server sent them.
    pub params: Vec<u8>,
    /// Whether the server asked for any proof (a password, SCRAM) before
    /// AuthenticationOk; under `trust` only sessions it opened without asking are
    /// reused.
    pub challenged: bool,
}

/// Reads one whole message from `stream` using `buf` (which may hold more).
pub(super) async fn read_message<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> io::Result<BytesMut> {
    while buf.len() < 5 {
        if stream.read_buf(buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    let header: [u8; 5] = buf[..5].try_into().expect("five bytes");
    let (_, len) = message_header(header, MAX_STARTUP_MESSAGE)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    while buf.len() < 5 + len {
        if stream.read_buf(buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(buf.split_to(5 + len))
}

/// Reads exactly one message from the client, never more: what follows belongs to
/// the relay.
async fn read_client_message<C: AsyncRead + Unpin>(client: &mut C) -> io::Result<BytesMut> {
    let mut header = [0u8; 5];
    client.read_exact(&mut header).await?;
    let (_, len) = message_header(header, MAX_STARTUP_MESSAGE)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut msg = BytesMut::zeroed(5 + len);
    msg[..5].copy_from_slice(&header);
    client.read_exact(&mut msg[5..]).await?;
    Ok(msg)
}

/// Handles one server message that is not an authentication request: BackendKeyData
/// becomes the proxy's key, everything else is queued for the client in `out`. At
/// ErrorResponse or ReadyForQuery the queue (and, after ReadyForQuery, whatever the
/// server sent beyond it, left in `rest`) goes to the client and the startup ends.
async fn forward<C: AsyncWrite + Unpin>(
    client: &mut C,
    msg: &[u8],
    rest: &[u8],
    out: &mut BytesMut,
    key: &mut impl FnMut(u32, u32) -> Vec<u8>,
    greeting: &mut Greeting,
) -> io::Result<Option<Outcome>> {
    let mut body = &msg[5..];
    match msg[0] {
        b'S' => {
            greeting.params.extend_from_slice(msg);
            out.extend_from_slice(msg);
            Ok(None)
        }
        b'K' if body.len() == 8 => {
            let pid = body.get_u32();
            let secret = body.get_u32();
            out.extend_from_slice(&key(pid, secret));
            Ok(None)
        }
        b'E' => {
            out.extend_from_slice(msg);
            client.write_all(out).await?;
            Ok(Some(Outcome::Refused))
        }
        b'Z' => {
            out.extend_from_slice(msg);
            out.extend_from_slice(rest);
            client.write_all(out).await?;
            client.flush().await?;
            Ok(Some(Outcome::Ready(std::mem::take(greeting))))
        }
        _ => {
            out.extend_from_slice(msg);
            Ok(None)
        }
    }
}

/// Sends `startup` to the server and relays authentication until ReadyForQuery or an
/// error. `key` makes the BackendKeyData the client sees, given the server's key.
pub async fn authenticate<C, S>(
    client: &mut C,
    server: &mut S,
    startup: &[u8],
    mut key: impl FnMut(u32, u32) -> Vec<u8>,
) -> io::Result<Outcome>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    server.write_all(startup).await?;
    let mut buf = BytesMut::with_capacity(4096);
    let mut out = BytesMut::with_capacity(1024);
    let mut greeting = Greeting::default();
    loop {
        let msg = read_message(server, &mut buf).await?;
        let body = &msg[5..];
        match msg[0] {
            b'R' => {
                out.extend_from_slice(&msg);
                let code = auth_code(body).unwrap_or(u32::MAX);
                if code != 0 {
                    greeting.challenged = true;
                }
                if auth_needs_reply(code) {
                    client.write_all(&out).await?;
                    out.clear();
                    let reply = match read_client_message(client).await {
                        Ok(r) => r,
                        Err(_) => return Ok(Outcome::ClientGone),
                    };
                    if reply[0] != b'p' {
                        return Ok(Outcome::ClientGone);
                    }
                    server.write_all(&reply).await?;
                }
            }
            _ => {
                let done = forward(client, &msg, &buf, &mut out, &mut key, &mut greeting).await?;
                if let Some(done) = done {
                    return Ok(done);
                }
            }
        }
    }
}

/// Opens a session with `startup` and no client behind it, as a server that asks
/// for no proof lets anyone: `None` when the server asks for any (or refuses).
/// Returns what the login said and the server's pid and cancel secret.
pub async fn open_unasked<S>(
    server: &mut S,
    startup: &[u8],
) -> io::Result<Option<(Greeting, (u32, u32))>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut backend = None;
    // Nobody to answer a challenge: a request for proof meets an ended stream.
    let mut nobody = tokio::io::join(tokio::io::empty(), tokio::io::sink());
    let outcome = authenticate(&mut nobody, server, startup, |pid, secret| {
        backend = Some((pid, secret));
        Vec::new()
    })
    .await?;
    Ok(match (outcome, backend) {
        (Outcome::Ready(g), Some(b)) if !g.challenged => Some((g, b)),
        _ => None,
    })
}

fn login_error(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// A password message ('p') with `body`.
fn password_message(body: &[u8]) -> BytesMut {
    let mut m = BytesMut::with_capacity(5 + body.len());
    m.extend_from_slice(b"p");
    m.extend_from_slice(&((4 + body.len()) as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// How the proxy logs in to a branch server.
pub struct LoginPolicy {
    /// The connection is encrypted or local (TLS, Unix socket): only then may a
    /// cleartext password be sent over it.
    pub secure: bool,
    /// `auth.max_scram_iterations`: the most PBKDF2 work a server may ask for.
    pub max_iterations: u32,
}

/// Logs in to the server as `user` with what the client proved, and forwards what
/// follows authentication (ParameterStatus, notices, the proxy's BackendKeyData,
/// ReadyForQuery) to the client, which has already been sent AuthenticationOk.
///
/// A server is believed only once it has proven itself: AuthenticationOk in the
/// middle of a SCRAM exchange the proxy started (before the server's signature was
/// checked) ends the login.
pub async fn login<C, S>(
    client: &mut C,
    server: &mut S,
    startup: &[u8],
    user: &str,
    proven: &Proven,
    policy: &LoginPolicy,
    mut key: impl FnMut(u32, u32) -> Vec<u8>,
) -> io::Result<Outcome>
where
    C: AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    server.write_all(startup).await?;
    let mut buf = BytesMut::with_capacity(4096);
    let mut out = BytesMut::with_capacity(1024);
    let mut greeting = Greeting::default();
    let mut exchange: Option<ClientExchange> = None;
    let mut server_verified = false;
    loop {
        let msg = read_message(server, &mut buf).await?;
        let body = &msg[5..];
        match msg[0] {
            b'R' => {
                let code = auth_code(body).ok_or_else(|| login_error("short auth request"))?;
                let data = &body[4..];
                match code {
                    0 if exchange.is_some() && !server_verified => {
                        return Err(login_error(
                            "the branch server sent AuthenticationOk before finishing the \
                             SCRAM exchange (it never proved it holds the role's verifier)",
                        ));
                    }
                    0 => {}
                    3 if !policy.secure => {
                        return Err(login_error(
                            "the branch server asks for a cleartext password over an \
                             unencrypted connection, which the proxy never sends; let the \
                             server use scram-sha-256, or set server_tls",
                        ));
                    }
                    3 => {
                        let pw = proven.password.as_deref().ok_or_else(|| {
                            login_error(
                                "the branch server asks for a cleartext password, which the \
                                 proxy does not know under SCRAM; let the server use \
                                 scram-sha-256 for these connections",
                            )
                        })?;
                        let mut b = pw.as_bytes().to_vec();
                        b.push(0);
                        server.write_all(&password_message(&b)).await?;
                    }
                    5 => {
                        let salt: [u8; 4] = data
                            .get(..4)
                            .and_then(|s| s.try_into().ok())
                            .ok_or_else(|| login_error("short md5 request"))?;
                        let answer = match (&proven.password, &proven.md5_hash) {
                            (Some(pw), _) => crate::auth::md5_challenge(pw, user, salt),
                            (None, Some(hash)) => crate::auth::md5_challenge_from_hash(hash, salt),
                            (None, None) => {
                                return Err(login_error(
                                    "the branch server asks for md5, which the proxy cannot \
                                     answer for a role that logged in with SCRAM; let the \
                                     server use scram-sha-256",
                                ))
                            }
                        };
                        let mut b = answer.into_bytes();
                        b.push(0);
                        server.write_all(&password_message(&b)).await?;
                    }
                    10 => {
                        let offered = data
                            .split(|&b| b == 0)
                            .any(|m| m == scram::SCRAM_SHA_256.as_bytes());
                        let client_key = match (proven.client_key, &proven.password) {
                            (Some(k), _) => k,
                            // A password with no SCRAM key: the server's salt decides.
                            (None, Some(_)) => [0u8; scram::KEY_LEN],
                            (None, None) => {
                                return Err(login_error("no SCRAM key for the branch server"))
                            }
                        };
                        if !offered {
                            return Err(login_error("the branch server offers no SCRAM-SHA-256"));
                        }
                        let ex = ClientExchange::with_client_key(client_key, proven.server_key);
                        let first = ex.client_first();
                        let mut b = scram::SCRAM_SHA_256.as_bytes().to_vec();
                        b.push(0);
                        b.extend_from_slice(&(first.len() as i32).to_be_bytes());
                        b.extend_from_slice(first.as_bytes());
                        server.write_all(&password_message(&b)).await?;
                        exchange = Some(ex);
                    }
                    11 => {
                        let mut ex = exchange
                            .take()
                            .ok_or_else(|| login_error("SASL continue without a SASL start"))?;
                        let sf = std::str::from_utf8(data)
                            .map_err(|_| login_error("server-first-message is not UTF-8"))?
                            .to_owned();
                        // With a known password the server's own salt and iteration
                        // count are used (bounded, and hashed off the relay thread);
                        // with a ClientKey the server must hold the verifier it came
                        // from.
                        let pw = proven.password.clone();
                        if pw.is_some() {
                            let asked = scram::parse_server_first(&sf)
                                .map_err(|e| login_error(e.to_string()))?
                                .iterations;
                            if asked > policy.max_iterations {
                                return Err(login_error(format!(
                                    "the branch server asks for {asked} SCRAM iterations, more \
                                     than auth.max_scram_iterations ({})",
                                    policy.max_iterations
                                )));
                            }
                        }
                        let (ex, fin) = tokio::task::spawn_blocking(move || {
                            let fin = ex.client_final(&sf, pw.as_deref());
                            (ex, fin)
                        })
                        .await
                        .map_err(|_| login_error("the SCRAM computation failed"))?;
                        let fin = fin.map_err(|e| login_error(e.to_string()))?;
                        exchange = Some(ex);
                        server.write_all(&password_message(fin.as_bytes())).await?;
                    }
                    12 => {
                        let ex = exchange
                            .as_ref()
                            .ok_or_else(|| login_error("SASL final without a SASL start"))?;
                        let sf = std::str::from_utf8(data)
                            .map_err(|_| login_error("server-final-message is not UTF-8"))?;
                        ex.verify_server(sf).map_err(|e| {
                            login_error(format!("the branch server failed SCRAM: {e}"))
                        })?;
                        server_verified = true;
                    }
                    other => {
                        return Err(login_error(format!(
                            "the branch server asks for authentication type {other}, which the \
                             proxy cannot answer"
                        )))
                    }
                }
            }
            _ => {
                let done = forward(client, &msg, &buf, &mut out, &mut key, &mut greeting).await?;
                if let Some(done) = done {
                    return Ok(done);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::DuplexStream;

    fn auth_request(code: u32, data: &[u8]) -> Vec<u8> {
        let mut m = vec![b'R'];
        m.extend_from_slice(&((8 + data.len()) as u32).to_be_bytes());
        m.extend_from_slice(&code.to_be_bytes());
        m.extend_from_slice(data);
        m
    }

    /// Reads one length-prefixed message (after an optional type byte).
    async fn read_frame(s: &mut DuplexStream, typed: bool) -> Option<Vec<u8>> {
        let mut head = vec![0u8; if typed { 5 } else { 4 }];
        s.read_exact(&mut head).await.ok()?;
        let len = u32::from_be_bytes(head[head.len() - 4..].try_into().unwrap()) as usize;
        let mut body = vec![0u8; len - 4];
        s.read_exact(&mut body).await.ok()?;
        head.extend(body);
        Some(head)
    }

    /// Runs `login` against a scripted server; returns its result and what the
    /// server received after the startup packet.
    async fn login_against(
        script: Vec<Vec<u8>>,
        proven: Proven,
        secure: bool,
    ) -> (io::Result<Outcome>, Vec<Vec<u8>>) {
        let (mut proxy_side, mut server) = tokio::io::duplex(64 * 1024);
        let server_task = tokio::spawn(async move {
            read_frame(&mut server, false).await.expect("startup");
            let mut received = Vec::new();
            for msg in script {
                server.write_all(&msg).await.unwrap();
                if msg[0] == b'R' && matches!(msg[8], 3 | 5 | 10 | 11) {
                    match read_frame(&mut server, true).await {
                        Some(m) => received.push(m),
                        None => break,
                    }
                }
            }
            received
        });
        let mut client = Vec::new();
        let policy = LoginPolicy {
            secure,
            max_iterations: 10_000,
        };
        let result = login(
            &mut client,
            &mut proxy_side,
            &[0, 0, 0, 8, 0, 3, 0, 0],
            "app",
            &proven,
            &policy,
            |_, _| Vec::new(),
        )
        .await;
        drop(proxy_side);
        (result, server_task.await.unwrap())
    }

    #[tokio::test]
    async fn authentication_ok_before_the_scram_exchange_ends_is_refused() {
        let proven = Proven {
            client_key: Some([1; scram::KEY_LEN]),
            server_key: Some([2; scram::KEY_LEN]),
            password: None,
            md5_hash: None,
        };
        let script = vec![
            auth_request(10, b"SCRAM-SHA-256\0\0"),
            auth_request(0, b""),
            b"Z\0\0\0\x05I".to_vec(),
        ];
        let (result, received) = login_against(script, proven, true).await;
        let err = result.err().expect("refused");
        assert!(err.to_string().contains("before finishing"), "{err}");
        assert_eq!(received.len(), 1, "only the SASLInitialResponse was sent");
    }

    #[tokio::test]
    async fn cleartext_goes_only_over_a_secure_connection() {
        let proven = || Proven {
            client_key: None,
            server_key: None,
            password: Some("app-secret".into()),
            md5_hash: None,
        };
        let script = || {
            vec![
                auth_request(3, b""),
                auth_request(0, b""),
                b"Z\0\0\0\x05I".to_vec(),
            ]
        };
        let (result, received) = login_against(script(), proven(), false).await;
        let err = result.err().expect("refused over plain TCP");
        assert!(err.to_string().contains("unencrypted"), "{err}");
        assert!(received.is_empty(), "the password was never sent");
        let (result, received) = login_against(script(), proven(), true).await;
        assert!(matches!(result, Ok(Outcome::Ready(_))));
        assert_eq!(received[0][5..], *b"app-secret\0");
    }

    #[tokio::test]
    async fn a_server_asking_for_too_many_iterations_is_refused() {
        let proven = Proven {
            client_key: None,
            server_key: None,
            password: Some("app-secret".into()),
            md5_hash: None,
        };
        // The nonce cannot be known in advance; the check comes before it is used.
        let script = vec![
            auth_request(10, b"SCRAM-SHA-256\0\0"),
            auth_request(11, b"r=x,s=c2FsdA==,i=2000000000"),
        ];
        let (result, _) = login_against(script, proven, true).await;
        let err = result.err().expect("refused");
        assert!(
            err.to_string().contains("2000000000 SCRAM iterations"),
            "{err}"
        );
    }
}
