//! Connecting to a branch's server and carrying the startup through it.
//!
//! The server authenticates the client itself (trust, password, md5, SCRAM without
//! channel binding): the proxy relays the exchange message by message and only
//! replaces BackendKeyData with its own key.

use std::io;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::protocol::{auth_code, auth_needs_reply, message_header, MAX_STARTUP_MESSAGE};
use crate::branch::engine::ServerAddr;

/// A connection to a branch's server.
pub enum ServerStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl ServerStream {
    pub async fn connect(addr: &ServerAddr) -> io::Result<Self> {
        Ok(match addr {
            ServerAddr::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port)).await?;
                s.set_nodelay(true)?;
                ServerStream::Tcp(s)
            }
            ServerAddr::Unix(path) => ServerStream::Unix(UnixStream::connect(path).await?),
        })
    }
}

either_stream!(ServerStream { Tcp, Unix });

/// How the startup through the server ended.
pub enum Outcome {
    /// ReadyForQuery was relayed; the session is open.
    Ready,
    /// The server refused (bad password, no such role...); its ErrorResponse was relayed.
    Refused,
    /// The client went away or broke protocol during authentication.
    ClientGone,
}

/// Reads one whole message from `stream` using `buf` (which may hold more).
async fn read_message<S: AsyncRead + Unpin>(
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

/// Sends `startup` to the server and relays authentication until ReadyForQuery or an
/// error. `key` makes the BackendKeyData the client sees, given the server's key.
pub async fn authenticate<C, S>(
    client: &mut C,
    server: &mut S,
    startup: &[u8],
    mut key: impl FnMut(u32, u32) -> [u8; 13],
) -> io::Result<Outcome>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    server.write_all(startup).await?;
    let mut buf = BytesMut::with_capacity(4096);
    let mut out = BytesMut::with_capacity(1024);
    loop {
        let msg = read_message(server, &mut buf).await?;
        let body = &msg[5..];
        match msg[0] {
            b'R' => {
                out.extend_from_slice(&msg);
                let code = auth_code(body).unwrap_or(u32::MAX);
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
            b'K' if body.len() == 8 => {
                let mut b = body;
                let pid = b.get_u32();
                let secret = b.get_u32();
                out.extend_from_slice(&key(pid, secret));
            }
            b'E' => {
                out.extend_from_slice(&msg);
                client.write_all(&out).await?;
                return Ok(Outcome::Refused);
            }
            b'Z' => {
                out.extend_from_slice(&msg);
                // Anything the server sent after ReadyForQuery belongs to the client too.
                out.extend_from_slice(&buf);
                client.write_all(&out).await?;
                client.flush().await?;
                return Ok(Outcome::Ready);
            }
            _ => out.extend_from_slice(&msg),
        }
    }
}
