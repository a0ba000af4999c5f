//! The few pieces of the PostgreSQL protocol the proxy reads or writes itself.
//!
//! Everything here is pure: bytes in, values out. Parsers take untrusted input and
//! must never panic; `fuzz/` drives them with arbitrary bytes.

use bytes::{BufMut, BytesMut};

use crate::error::ClientError;

/// PostgreSQL refuses startup packets longer than this (MAX_STARTUP_PACKET_LENGTH).
pub const MAX_STARTUP_LEN: usize = 10_000;
/// Largest message the proxy accepts from either side during startup and
/// authentication (SASL messages are small; this is generous).
pub const MAX_STARTUP_MESSAGE: usize = 64 * 1024;

pub const SSL_REQUEST: u32 = 80_877_103;
pub const GSSENC_REQUEST: u32 = 80_877_104;
pub const CANCEL_REQUEST: u32 = 80_877_102;
pub const PROTOCOL_3_0: u32 = 3 << 16;
/// The newest minor version served: 3.2 (PostgreSQL 18) differs from 3.0 only in
/// its longer cancel keys, which the proxy issues itself.
pub const NEWEST_MINOR: u16 = 2;
/// Longest cancel key protocol 3.2 allows.
pub const MAX_CANCEL_KEY: usize = 256;
/// Length of the cancel keys the proxy issues to protocol 3.2 clients (as
/// PostgreSQL 18 does); 3.0 clients get 4 bytes.
pub const CANCEL_KEY_3_2: usize = 32;

/// The minor version a session runs: 3.2 when asked for it or anything newer,
/// else 3.0 (3.1 was never used).
pub fn served_minor(requested: u16) -> u16 {
    if requested >= NEWEST_MINOR {
        NEWEST_MINOR
    } else {
        0
    }
}

/// The first packet a client sends (and the one after an SSL/GSS refusal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Initial {
    SslRequest,
    GssEncRequest,
    /// The secret is 4 bytes from protocol 3.0 clients, up to 256 from 3.2 ones.
    Cancel {
        pid: u32,
        secret: Vec<u8>,
    },
    Startup(Startup),
}

/// A StartupMessage: protocol version and parameters, in the client's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Startup {
    pub major: u16,
    pub minor: u16,
    pub params: Vec<(String, String)>,
}

impl Startup {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Protocol extension options (`_pq_.*`), which this proxy recognises none of.
    pub fn protocol_options(&self) -> Vec<&str> {
        self.params
            .iter()
            .filter(|(k, _)| k.starts_with("_pq_."))
            .map(|(k, _)| k.as_str())
            .collect()
    }
}

fn protocol_violation(msg: &str) -> ClientError {
    ClientError::Protocol(msg.to_owned())
}

/// Checks the length word of an initial packet (it counts itself) and returns the
/// body length.
pub fn initial_body_len(len: u32) -> Result<usize, ClientError> {
    let len = len as usize;
    if !(8..=MAX_STARTUP_LEN).contains(&len) {
        return Err(protocol_violation("invalid length of startup packet"));
    }
    Ok(len - 4)
}

/// Whether an initial packet's body carries the CancelRequest code, whatever its
/// length: such a packet is never answered, even when malformed.
pub fn is_cancel_request(body: &[u8]) -> bool {
    body.get(..4) == Some(&CANCEL_REQUEST.to_be_bytes()[..])
}

/// Parses the body of an initial packet (everything after the length word).
pub fn parse_initial(body: &[u8]) -> Result<Initial, ClientError> {
    if body.len() < 4 {
        return Err(protocol_violation("invalid length of startup packet"));
    }
    let code = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    let rest = &body[4..];
    match code {
        SSL_REQUEST | GSSENC_REQUEST if !rest.is_empty() => {
            Err(protocol_violation("invalid length of SSL/GSS request"))
        }
        SSL_REQUEST => Ok(Initial::SslRequest),
        GSSENC_REQUEST => Ok(Initial::GssEncRequest),
        CANCEL_REQUEST => {
            if !(8..=4 + MAX_CANCEL_KEY).contains(&rest.len()) {
                return Err(protocol_violation("invalid length of cancel request"));
            }
            Ok(Initial::Cancel {
                pid: u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]),
                secret: rest[4..].to_vec(),
            })
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != 3 {
                return Err(ClientError::UnsupportedProtocol { major, minor });
            }
            let params = parse_params(rest)?;
            Ok(Initial::Startup(Startup {
                major,
                minor,
                params,
            }))
        }
    }
}

/// `key\0value\0 ... \0`, as PostgreSQL's ProcessStartupPacket reads it.
fn parse_params(mut rest: &[u8]) -> Result<Vec<(String, String)>, ClientError> {
    let mut params = Vec::new();
    if rest.last() != Some(&0) {
        return Err(protocol_violation(
            "invalid startup packet layout: expected terminator as last byte",
        ));
    }
    loop {
        let Some(kend) = rest.iter().position(|&b| b == 0) else {
            return Err(protocol_violation("invalid startup packet layout"));
        };
        if kend == 0 {
            if rest.len() != 1 {
                return Err(protocol_violation(
                    "invalid startup packet layout: expected terminator as last byte",
                ));
            }
            break;
        }
        let key = &rest[..kend];
        rest = &rest[kend + 1..];
        let Some(vend) = rest.iter().position(|&b| b == 0) else {
            return Err(protocol_violation(
                "invalid startup packet layout: parameter without value",
            ));
        };
        let value = &rest[..vend];
        rest = &rest[vend + 1..];
        // Parameters are forwarded as they came; refusing what is not UTF-8 is
        // clearer than passing on an altered value.
        let key = std::str::from_utf8(key)
            .map_err(|_| protocol_violation("startup parameter name is not valid UTF-8"))?;
        let value = std::str::from_utf8(value).map_err(|_| {
            ClientError::Protocol(format!("startup parameter {key:?} is not valid UTF-8"))
        })?;
        params.push((key.to_owned(), value.to_owned()));
        if rest.is_empty() {
            return Err(protocol_violation(
                "invalid startup packet layout: expected terminator as last byte",
            ));
        }
    }
    Ok(params)
}

/// Encodes a protocol 3.0 StartupMessage with `params`.
pub fn encode_startup<K: AsRef<str>, V: AsRef<str>>(params: &[(K, V)]) -> BytesMut {
    let mut buf = BytesMut::with_capacity(256);
    buf.put_u32(0);
    buf.put_u32(PROTOCOL_3_0);
    for (k, v) in params {
        buf.put_slice(k.as_ref().as_bytes());
        buf.put_u8(0);
        buf.put_slice(v.as_ref().as_bytes());
        buf.put_u8(0);
    }
    buf.put_u8(0);
    let len = buf.len() as u32;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    buf
}

/// Encodes a CancelRequest.
pub fn encode_cancel(pid: u32, secret: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + secret.len());
    out.extend_from_slice(&((12 + secret.len()) as u32).to_be_bytes());
    out.extend_from_slice(&CANCEL_REQUEST.to_be_bytes());
    out.extend_from_slice(&pid.to_be_bytes());
    out.extend_from_slice(secret);
    out
}

/// NegotiateProtocolVersion: the minor version served and the options not
/// recognised.
pub fn encode_negotiate_protocol(minor: u16, options: &[&str]) -> BytesMut {
    let mut buf = BytesMut::new();
    buf.put_u8(b'v');
    buf.put_u32(0);
    buf.put_u32(PROTOCOL_3_0 | u32::from(minor));
    buf.put_u32(options.len() as u32);
    for o in options {
        buf.put_slice(o.as_bytes());
        buf.put_u8(0);
    }
    let len = (buf.len() - 1) as u32;
    buf[1..5].copy_from_slice(&len.to_be_bytes());
    buf
}

/// BackendKeyData as the client sees it (server pid, proxy-issued secret).
pub fn encode_backend_key(pid: u32, secret: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + secret.len());
    out.push(b'K');
    out.extend_from_slice(&((8 + secret.len()) as u32).to_be_bytes());
    out.extend_from_slice(&pid.to_be_bytes());
    out.extend_from_slice(secret);
    out
}

/// A NoticeResponse (severity NOTICE, SQLSTATE 00000) with `message`: shown by psql
/// and passed to drivers' notice handlers.
pub fn encode_notice(message: &str) -> BytesMut {
    let mut buf = BytesMut::with_capacity(32 + message.len());
    buf.put_u8(b'N');
    buf.put_u32(0);
    for (code, value) in [
        (b'S', "NOTICE"),
        (b'V', "NOTICE"),
        (b'C', "00000"),
        (b'M', message),
    ] {
        buf.put_u8(code);
        buf.put_slice(value.as_bytes());
        buf.put_u8(0);
    }
    buf.put_u8(0);
    let len = (buf.len() - 1) as u32;
    buf[1..5].copy_from_slice(&len.to_be_bytes());
    buf
}

/// A typed message header: tag and body length, checked against `max`.
pub fn message_header(header: [u8; 5], max: usize) -> Result<(u8, usize), String> {
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len < 4 || len - 4 > max {
        return Err(format!(
            "invalid message length {len} for message type {:?}",
            header[0] as char
        ));
    }
    Ok((header[0], len - 4))
}

/// The authentication request code of an 'R' message body.
pub fn auth_code(body: &[u8]) -> Option<u32> {
    body.get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Whether the client must answer an authentication request with this code
/// (cleartext, MD5, GSS, GSS continue, SASL, SASL continue).
pub fn auth_needs_reply(code: u32) -> bool {
    matches!(code, 3 | 5 | 7 | 8 | 10 | 11)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup_body(params: &[(&str, &str)]) -> Vec<u8> {
        let p: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        encode_startup(&p)[4..].to_vec()
    }

    #[test]
    fn parses_startup() {
        let body = startup_body(&[("user", "app"), ("database", "shop.pr-1")]);
        let Initial::Startup(s) = parse_initial(&body).unwrap() else {
            panic!()
        };
        assert_eq!((s.major, s.minor), (3, 0));
        assert_eq!(s.get("user"), Some("app"));
        assert_eq!(s.get("database"), Some("shop.pr-1"));
    }

    #[test]
    fn parses_special_requests() {
        assert_eq!(
            parse_initial(&SSL_REQUEST.to_be_bytes()).unwrap(),
            Initial::SslRequest
        );
        assert_eq!(
            parse_initial(&GSSENC_REQUEST.to_be_bytes()).unwrap(),
            Initial::GssEncRequest
        );
        let c = encode_cancel(7, &9u32.to_be_bytes());
        assert_eq!(
            parse_initial(&c[4..]).unwrap(),
            Initial::Cancel {
                pid: 7,
                secret: vec![0, 0, 0, 9]
            }
        );
        // Protocol 3.2 keys: up to 256 bytes.
        let long = encode_cancel(7, &[5u8; 256]);
        assert!(
            matches!(parse_initial(&long[4..]), Ok(Initial::Cancel { secret, .. }) if secret.len() == 256)
        );
        let too_long = encode_cancel(7, &[5u8; 257]);
        assert!(parse_initial(&too_long[4..]).is_err());
        assert!(is_cancel_request(&too_long[4..]));
        assert!(
            is_cancel_request(&c[4..8]),
            "no pid, no secret: still a cancel"
        );
        assert!(!is_cancel_request(&SSL_REQUEST.to_be_bytes()));
        assert!(!is_cancel_request(&[]));
    }

    #[test]
    fn refuses_bad_packets() {
        for len in [0u32, 4, 7, 10_001, u32::MAX] {
            assert!(initial_body_len(len).is_err(), "{len}");
        }
        assert_eq!(initial_body_len(8).unwrap(), 4);
        // Missing final terminator, value without terminator, key without value.
        let mut body = PROTOCOL_3_0.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0app");
        assert!(parse_initial(&body).is_err());
        let mut body = PROTOCOL_3_0.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0");
        assert!(parse_initial(&body).is_err());
        let mut body = PROTOCOL_3_0.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0app\0\0junk\0");
        assert!(parse_initial(&body).is_err());
        // Protocol 2 and 4 are refused with 0A000.
        let body = (2u32 << 16).to_be_bytes();
        assert!(matches!(
            parse_initial(&body),
            Err(ClientError::UnsupportedProtocol { major: 2, .. })
        ));
        let mut cancel = CANCEL_REQUEST.to_be_bytes().to_vec();
        cancel.extend_from_slice(&[1, 2, 3]);
        assert!(parse_initial(&cancel).is_err());
    }

    #[test]
    fn minor_versions_are_negotiated_not_refused() {
        let mut body = ((3u32 << 16) | 2).to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0u\0_pq_.x\0\x31\0\0");
        let Initial::Startup(s) = parse_initial(&body).unwrap() else {
            panic!()
        };
        assert_eq!(s.minor, 2);
        assert_eq!(s.protocol_options(), vec!["_pq_.x"]);
        let v = encode_negotiate_protocol(served_minor(s.minor), &["_pq_.x"]);
        assert_eq!(&v[5..9], &((3u32 << 16) | 2).to_be_bytes());
        assert_eq!(
            (served_minor(1), served_minor(2), served_minor(9)),
            (0, 2, 2)
        );
        assert_eq!(v[0], b'v');
        assert_eq!(
            u32::from_be_bytes([v[1], v[2], v[3], v[4]]) as usize,
            v.len() - 1
        );
    }

    #[test]
    fn non_utf8_values_are_refused_not_altered() {
        let mut body = PROTOCOL_3_0.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0u\0application_name\0\xff\0\0");
        let err = parse_initial(&body).unwrap_err();
        assert!(err.to_string().contains("application_name"), "{err}");
    }

    #[test]
    fn parser_never_panics_on_prefixes() {
        let body = startup_body(&[("user", "app"), ("database", "d")]);
        for i in 0..body.len() {
            let _ = parse_initial(&body[..i]);
        }
    }

    #[test]
    fn message_headers_are_bounded() {
        assert_eq!(message_header([b'R', 0, 0, 0, 8], 100).unwrap(), (b'R', 4));
        assert!(message_header([b'R', 0, 0, 0, 3], 100).is_err());
        assert!(message_header([b'R', 0xff, 0xff, 0xff, 0xff], 100).is_err());
    }
}
