//! The client's authentication, with the proxy as the verifier.
//!
//! Runs after routing has named a source and before the registry is asked for the
//! branch: a client that fails here never causes a clone to be made. Under SCRAM the
//! proxy never learns the password; the ClientKey recovered from the client's proof
//! is what [`super::backend::login`] answers the branch server's own SCRAM with.
//!
//! Invariants: an unknown role, a missing or expired password and a wrong password
//! fail at the same step with the same message; messages before authentication are
//! capped at [`MAX_AUTH_MESSAGE`]; secrets are compared in constant time.

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, warn};

use super::route::Names;
use super::{ClientStream, Proxy};
use crate::auth::scram::{self, ChannelBinding, Key, Verifier};
use crate::auth::{Credentials, LookupError, Role, Secret};
use crate::config::AuthMethod;
use crate::error::ClientError;

/// Largest message a client may send before it is authenticated. SCRAM messages
/// are around 100 bytes; PostgreSQL's own cap on passwords is 1,000.
pub const MAX_AUTH_MESSAGE: usize = 8 * 1024;

const AUTH_OK: u32 = 0;
const AUTH_CLEARTEXT: u32 = 3;
const AUTH_MD5: u32 = 5;
const AUTH_SASL: u32 = 10;
const AUTH_SASL_CONTINUE: u32 = 11;
const AUTH_SASL_FINAL: u32 = 12;

/// What a client proved, enough to log in to a branch server as the same role.
pub struct Proven {
    /// The SCRAM ClientKey: from the client's proof, or derived from its password.
    pub client_key: Option<Key>,
    /// The ServerKey of the verifier the client was checked against: a branch
    /// server signing with it holds the same verifier.
    pub server_key: Option<Key>,
    /// The password, under `password`: answers cleartext and md5 servers too.
    pub password: Option<String>,
    /// The role's stored md5 hash, after an md5 exchange: answers the branch
    /// server's md5 challenge.
    pub md5_hash: Option<String>,
}

impl std::fmt::Debug for Proven {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys and passwords are secrets: say which are held, never what they are.
        f.debug_struct("Proven")
            .field("client_key", &self.client_key.is_some())
            .field("password", &self.password.is_some())
            .field("md5_hash", &self.md5_hash.is_some())
            .finish_non_exhaustive()
    }
}

/// An Authentication message with `code` and `data`.
pub fn encode_auth(code: u32, data: &[u8]) -> BytesMut {
    let mut buf = BytesMut::with_capacity(9 + data.len());
    buf.put_u8(b'R');
    buf.put_u32((8 + data.len()) as u32);
    buf.put_u32(code);
    buf.put_slice(data);
    buf
}

/// AuthenticationOk.
pub fn auth_ok() -> BytesMut {
    encode_auth(AUTH_OK, &[])
}

fn protocol(msg: &str) -> ClientError {
    ClientError::Protocol(msg.to_owned())
}

/// Reads one password-family ('p') message body, capped at [`MAX_AUTH_MESSAGE`].
async fn read_password_message<C: AsyncRead + Unpin>(
    client: &mut C,
) -> Result<Vec<u8>, ClientError> {
    let mut header = [0u8; 5];
    client
        .read_exact(&mut header)
        .await
        .map_err(|_| protocol("the client closed during authentication"))?;
    if header[0] != b'p' {
        return Err(ClientError::Protocol(format!(
            "expected a password message, got message type {:?}",
            header[0] as char
        )));
    }
    let (_, len) = super::protocol::message_header(header, MAX_AUTH_MESSAGE)
        .map_err(|_| protocol("invalid authentication message length"))?;
    let mut body = vec![0u8; len];
    client
        .read_exact(&mut body)
        .await
        .map_err(|_| protocol("the client closed during authentication"))?;
    Ok(body)
}

/// Splits a SASLInitialResponse into (mechanism, data).
pub fn parse_sasl_initial(body: &[u8]) -> Option<(&str, &[u8])> {
    let end = body.iter().position(|&b| b == 0)?;
    let mech = std::str::from_utf8(&body[..end]).ok()?;
    let rest = &body[end + 1..];
    let len = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
    let data = &rest[4..];
    (usize::try_from(len).ok()? == data.len()).then_some((mech, data))
}

async fn send<C: AsyncWrite + Unpin>(client: &mut C, msg: &[u8]) -> Result<(), ClientError> {
    client
        .write_all(msg)
        .await
        .map_err(|_| protocol("the client closed during authentication"))
}

/// The authentication phase: runs the exchange the source's method asks for
/// against the role's stored password. `Ok(None)`: the method is `trust`, and the
/// branch server's own exchange will be relayed instead.
pub(super) async fn authenticate(
    proxy: &Proxy,
    client: &mut ClientStream,
    names: &Names<'_>,
    binding: Option<&[u8]>,
) -> Result<Option<Proven>, ClientError> {
    let method = proxy.access.methods.for_name(names.source);
    if method == AuthMethod::Trust {
        return Ok(None);
    }
    let credentials = &proxy.access.credentials;
    let tls = matches!(client, ClientStream::Tls(_));
    let found = credentials.lookup(names.source, names.role).await;
    exchange(client, method, names.role, found, credentials, tls, binding)
        .await
        .map(Some)
}

/// Authenticates the client as `user` by `method` (not `trust`, which never gets
/// here). `role` is what the lookup found; `binding` is the channel binding data of
/// the TLS session, when it has one.
pub async fn exchange<C: AsyncRead + AsyncWrite + Unpin>(
    client: &mut C,
    method: AuthMethod,
    user: &str,
    role: Result<Option<Role>, LookupError>,
    credentials: &Credentials,
    tls: bool,
    binding: Option<&[u8]>,
) -> Result<Proven, ClientError> {
    let role = match role {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "credential lookup failed");
            return Err(ClientError::AuthUnavailable);
        }
    };
    let secret = role
        .as_ref()
        .and_then(|r| credentials.usable_secret(user, r));
    let proven = match method {
        AuthMethod::ScramSha256 => {
            scram_exchange(client, user, secret, credentials, tls, binding).await?
        }
        AuthMethod::Password => password_exchange(client, user, secret, credentials, tls).await?,
        // As PostgreSQL's `md5`: roles stored as md5 get its challenge; the others,
        // unknown roles included, SCRAM.
        AuthMethod::Md5 => match secret {
            Some(Secret::Md5(hash)) => md5_exchange(client, user, hash).await?,
            _ => scram_exchange(client, user, secret, credentials, tls, binding).await?,
        },
        AuthMethod::Trust => unreachable!("trust is relayed, not checked"),
    };
    match (proven, &role) {
        (Some(p), Some(r)) if r.can_login => Ok(p),
        (Some(_), _) => Err(ClientError::NoLogin(user.to_owned())),
        (None, _) => {
            debug!(
                known = role.is_some(),
                has_secret = secret.is_some(),
                "authentication failed"
            );
            Err(ClientError::AuthFailed(user.to_owned()))
        }
    }
}

/// Cleartext password (TLS only). `Ok(None)`: the password is wrong.
async fn password_exchange<C: AsyncRead + AsyncWrite + Unpin>(
    client: &mut C,
    user: &str,
    secret: Option<&Secret>,
    credentials: &Credentials,
    tls: bool,
) -> Result<Option<Proven>, ClientError> {
    if !tls {
        return Err(ClientError::CleartextNeedsTls);
    }
    send(client, &encode_auth(AUTH_CLEARTEXT, &[])).await?;
    let body = read_password_message(client).await?;
    let password = body
        .strip_suffix(&[0])
        .filter(|p| !p.contains(&0))
        .and_then(|p| std::str::from_utf8(p).ok())
        .ok_or_else(|| protocol("invalid password packet"))?;
    // An unknown role costs the same work as a known one, so timing does not tell
    // them apart.
    let known = secret.is_some();
    let secret = match secret {
        Some(s) => s.clone(),
        None => Secret::Scram(credentials.mock(user)),
    };
    let (pw, role) = (password.to_owned(), user.to_owned());
    // PBKDF2 runs off the relay thread: the sessions sharing it carry on meanwhile.
    let checked = off_thread(move || match &secret {
        Secret::Scram(v) => v
            .keys_for_password(&pw)
            .map(|key| (Some(key), Some(v.server_key))),
        Secret::Md5(_) => secret.check_password(&role, &pw).then_some((None, None)),
    })
    .await?;
    let Some((client_key, server_key)) = checked.filter(|_| known && !password.is_empty()) else {
        return Ok(None);
    };
    Ok(Some(Proven {
        client_key,
        server_key,
        password: Some(password.to_owned()),
        md5_hash: None,
    }))
}

/// PostgreSQL's md5 challenge for a role stored as `hash`. `Ok(None)`: the answer
/// is wrong.
async fn md5_exchange<C: AsyncRead + AsyncWrite + Unpin>(
    client: &mut C,
    user: &str,
    hash: &str,
) -> Result<Option<Proven>, ClientError> {
    let salt: [u8; 4] = rand::random();
    send(client, &encode_auth(AUTH_MD5, &salt)).await?;
    let body = read_password_message(client).await?;
    let answer = body
        .strip_suffix(&[0])
        .ok_or_else(|| protocol("invalid password packet"))?;
    let expected = crate::auth::md5_challenge_from_hash(hash, salt);
    if !scram::secure_eq(answer, expected.as_bytes()) {
        debug!(role = user, "md5 answer does not match");
        return Ok(None);
    }
    Ok(Some(Proven {
        client_key: None,
        server_key: None,
        password: None,
        md5_hash: Some(hash.to_owned()),
    }))
}

/// Runs CPU-heavy work (PBKDF2) on tokio's blocking pool, so no relay thread, and
/// no session on it, waits for it.
async fn off_thread<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ClientError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|_| ClientError::AuthUnavailable)
}

/// SCRAM-SHA-256[-PLUS]. `Ok(None)`: the proof is wrong (or the role cannot log in
/// with SCRAM); the exchange ran to its end either way.
async fn scram_exchange<C: AsyncRead + AsyncWrite + Unpin>(
    client: &mut C,
    user: &str,
    secret: Option<&Secret>,
    credentials: &Credentials,
    tls: bool,
    binding: Option<&[u8]>,
) -> Result<Option<Proven>, ClientError> {
    let binding = binding.filter(|_| tls);
    let mut mechanisms = Vec::new();
    if binding.is_some() {
        mechanisms.extend_from_slice(scram::SCRAM_SHA_256_PLUS.as_bytes());
        mechanisms.push(0);
    }
    mechanisms.extend_from_slice(scram::SCRAM_SHA_256.as_bytes());
    mechanisms.extend_from_slice(&[0, 0]);
    send(client, &encode_auth(AUTH_SASL, &mechanisms)).await?;

    let body = read_password_message(client).await?;
    let (mechanism, data) = parse_sasl_initial(&body)
        .ok_or_else(|| protocol("malformed SASLInitialResponse message"))?;
    let plus = match mechanism {
        scram::SCRAM_SHA_256 => false,
        scram::SCRAM_SHA_256_PLUS if binding.is_some() => true,
        _ => {
            return Err(protocol(
                "client selected an invalid SASL authentication mechanism",
            ))
        }
    };
    let first = std::str::from_utf8(data)
        .ok()
        .and_then(|d| scram::parse_client_first(d).ok())
        .ok_or_else(|| protocol("malformed SCRAM message"))?;
    match (&first.binding, plus) {
        (ChannelBinding::Required(t), true) if t == scram::CB_TLS_SERVER_END_POINT => {}
        (ChannelBinding::Required(_), _) => {
            return Err(protocol(
                "SCRAM channel binding negotiation error: unsupported binding or mechanism",
            ))
        }
        (_, true) => {
            return Err(protocol(
                "SCRAM channel binding negotiation error: SCRAM-SHA-256-PLUS without binding",
            ))
        }
        // The client supports binding and believes the server does not, while it was
        // offered: someone removed PLUS from the list on the way.
        (ChannelBinding::NotOffered, false) if binding.is_some() => {
            return Err(protocol(
                "SCRAM channel binding negotiation error: the client supports channel binding \
                 but thinks the server does not; this server does support it",
            ))
        }
        _ => {}
    }

    let verifier: Verifier = match secret {
        Some(Secret::Scram(v)) => v.clone(),
        _ => credentials.mock(user),
    };
    let nonce = format!("{}{}", first.nonce, scram::new_nonce());
    let server_first = scram::server_first(&nonce, &verifier);
    send(
        client,
        &encode_auth(AUTH_SASL_CONTINUE, server_first.as_bytes()),
    )
    .await?;

    let body = read_password_message(client).await?;
    let fin = std::str::from_utf8(&body)
        .ok()
        .and_then(|d| scram::parse_client_final(d).ok())
        .ok_or_else(|| protocol("malformed SCRAM message"))?;
    if fin.nonce != nonce {
        return Err(protocol("malformed SCRAM message: nonce mismatch"));
    }
    let mut expected = first.gs2_header.as_bytes().to_vec();
    if plus {
        expected.extend_from_slice(binding.expect("checked above"));
    }
    if !scram::secure_eq(&fin.channel_binding, &expected) {
        return Err(ClientError::Protocol(
            "SCRAM channel binding check failed".into(),
        ));
    }
    let auth_message = scram::auth_message(first.bare, &server_first, fin.without_proof);
    let client_key = verifier.recover_client_key(auth_message.as_bytes(), &fin.proof);
    let (Some(client_key), Some(Secret::Scram(_))) = (client_key, secret) else {
        return Ok(None);
    };
    let signature = verifier.server_signature(auth_message.as_bytes());
    send(
        client,
        &encode_auth(AUTH_SASL_FINAL, scram::server_final(&signature).as_bytes()),
    )
    .await?;
    Ok(Some(Proven {
        client_key: Some(client_key),
        server_key: Some(verifier.server_key),
        password: None,
        md5_hash: None,
    }))
}

#[cfg(test)]
mod tests;
