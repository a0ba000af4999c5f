//! SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it: the verifier format
//! stored in `pg_authid`, the messages of both sides, and the key arithmetic.
//!
//! Everything here is pure: bytes in, values out. The parsers take untrusted input
//! and never panic; `fuzz/` drives them with arbitrary bytes.
//!
//! The proxy is a verifier towards clients and a client towards branch servers. It
//! never learns a password under SCRAM: a valid proof yields the client's ClientKey
//! (`ClientProof XOR HMAC(StoredKey, AuthMessage)`), and the ClientKey is all a
//! client needs to answer a server that holds the same verifier.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::{digest, hmac, pbkdf2};
use subtle::ConstantTimeEq;

/// Length of SHA-256 output, and so of every key and proof.
pub const KEY_LEN: usize = 32;
/// Mechanism names, as advertised in AuthenticationSASL.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
pub const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";
/// The only channel binding type PostgreSQL implements.
pub const CB_TLS_SERVER_END_POINT: &str = "tls-server-end-point";
/// PostgreSQL's default iteration count (`scram_iterations`): what mock verifiers
/// use until a real verifier has been seen.
pub const DEFAULT_ITERATIONS: u32 = 4096;

pub type Key = [u8; KEY_LEN];

/// A parsed `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` verifier.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: Key,
    pub server_key: Key,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys are secrets: a verifier is enough to log in through this very proxy.
        f.debug_struct("Verifier")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

fn key(bytes: &[u8]) -> Option<Key> {
    bytes.try_into().ok()
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Key {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut ctx = hmac::Context::with_key(&k);
    for p in parts {
        ctx.update(p);
    }
    key_from(ctx.sign().as_ref())
}

fn sha256(data: &[u8]) -> Key {
    key_from(digest::digest(&digest::SHA256, data).as_ref())
}

fn key_from(bytes: &[u8]) -> Key {
    bytes.try_into().expect("SHA-256 output is 32 bytes")
}

fn xor(a: &Key, b: &Key) -> Key {
    std::array::from_fn(|i| a[i] ^ b[i])
}

/// Compares two secrets in time independent of where they differ.
pub fn secure_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// `Hi(password, salt, i)` of RFC 5802: PBKDF2-HMAC-SHA-256.
pub fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> Key {
    let mut out = [0u8; KEY_LEN];
    let iterations = std::num::NonZeroU32::new(iterations.max(1)).expect("at least one");
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        iterations,
        salt,
        password,
        &mut out,
    );
    out
}

/// ClientKey of a salted password.
pub fn client_key(salted: &Key) -> Key {
    hmac_sha256(salted, &[b"Client Key"])
}

impl Verifier {
    /// Parses PostgreSQL's stored form. `None` for anything else (md5, plain text).
    pub fn parse(s: &str) -> Option<Verifier> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        let iterations: u32 = iterations.parse().ok().filter(|&i| i > 0)?;
        let salt = B64.decode(salt).ok().filter(|s| !s.is_empty())?;
        Some(Verifier {
            iterations,
            salt,
            stored_key: key(&B64.decode(stored).ok()?)?,
            server_key: key(&B64.decode(server).ok()?)?,
        })
    }

    /// The verifier PostgreSQL would store for `password` with this salt.
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> Verifier {
        let salted = salted_password(password.as_bytes(), salt, iterations);
        Verifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&client_key(&salted)),
            server_key: hmac_sha256(&salted, &[b"Server Key"]),
        }
    }

    /// A plausible verifier for a role that does not exist, derived from a secret
    /// and the role name so that repeated attempts see the same salt (as PostgreSQL
    /// does): an unknown role looks like a known one until the proof fails.
    /// `iterations` should be what real verifiers use, so the count does not give
    /// an unknown role away either.
    pub fn mock(secret: &[u8], role: &str, iterations: u32) -> Verifier {
        let salt = hmac_sha256(secret, &[b"salt", role.as_bytes()])[..16].to_vec();
        Verifier {
            iterations,
            salt,
            stored_key: hmac_sha256(secret, &[b"stored", role.as_bytes()]),
            server_key: hmac_sha256(secret, &[b"server", role.as_bytes()]),
        }
    }

    /// Whether `password` is the one this verifier was made from.
    pub fn check_password(&self, password: &str) -> bool {
        self.keys_for_password(password).is_some()
    }

    /// The ClientKey of `password` when it is the one this verifier was made from:
    /// one PBKDF2 run both checks the password and yields the key.
    pub fn keys_for_password(&self, password: &str) -> Option<Key> {
        let salted = salted_password(password.as_bytes(), &self.salt, self.iterations);
        let key = client_key(&salted);
        secure_eq(&sha256(&key), &self.stored_key).then_some(key)
    }

    /// The ClientKey a client holds when `proof` is right for `auth_message`, or
    /// `None` when it is not.
    pub fn recover_client_key(&self, auth_message: &[u8], proof: &Key) -> Option<Key> {
        let signature = hmac_sha256(&self.stored_key, &[auth_message]);
        let client_key = xor(proof, &signature);
        secure_eq(&sha256(&client_key), &self.stored_key).then_some(client_key)
    }

    /// ServerSignature for `auth_message`: the server-final-message's `v=`.
    pub fn server_signature(&self, auth_message: &[u8]) -> Key {
        hmac_sha256(&self.server_key, &[auth_message])
    }
}

/// Why a SCRAM message was refused. The text is for logs; clients only ever learn
/// that authentication failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed SCRAM message: {0}")]
pub struct ScramError(pub &'static str);

/// The gs2 channel-binding flag of a client-first-message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelBinding {
    /// `n`: the client does not support binding.
    NotSupported,
    /// `y`: the client supports it but thinks the server does not.
    NotOffered,
    /// `p=<type>`: the client binds with this type.
    Required(String),
}

/// A client-first-message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFirst<'a> {
    pub binding: ChannelBinding,
    /// `gs2-cbind-flag "," [authzid] ","`: echoed inside the final message's `c=`.
    pub gs2_header: &'a str,
    /// client-first-message-bare: part of the AuthMessage.
    pub bare: &'a str,
    pub nonce: &'a str,
}

fn printable_nonce(n: &str) -> bool {
    !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

/// Parses a client-first-message as PostgreSQL does: no authzid, no mandatory
/// extensions, the user name ignored (the startup packet's user counts).
pub fn parse_client_first(msg: &str) -> Result<ClientFirst<'_>, ScramError> {
    let (flag, rest) = msg
        .split_once(',')
        .ok_or(ScramError("missing gs2 header"))?;
    let binding = match flag {
        "n" => ChannelBinding::NotSupported,
        "y" => ChannelBinding::NotOffered,
        _ => match flag.strip_prefix("p=") {
            Some(t) if !t.is_empty() => ChannelBinding::Required(t.to_owned()),
            _ => return Err(ScramError("bad channel binding flag")),
        },
    };
    let (authzid, bare) = rest
        .split_once(',')
        .ok_or(ScramError("missing gs2 header"))?;
    if !authzid.is_empty() {
        return Err(ScramError("authorization identity is not supported"));
    }
    let gs2_header = &msg[..flag.len() + 1 + authzid.len() + 1];
    let mut attrs = bare.split(',');
    match attrs.next() {
        Some(a) if a.starts_with("n=") => {}
        Some(a) if a.starts_with("m=") => return Err(ScramError("mandatory extension")),
        _ => return Err(ScramError("missing user name")),
    }
    let nonce = attrs
        .next()
        .and_then(|a| a.strip_prefix("r="))
        .ok_or(ScramError("missing nonce"))?;
    if !printable_nonce(nonce) {
        return Err(ScramError("bad nonce"));
    }
    Ok(ClientFirst {
        binding,
        gs2_header,
        bare,
        nonce,
    })
}

/// A client-final-message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFinal<'a> {
    /// Decoded `c=`: the gs2 header, then the channel binding data if any.
    pub channel_binding: Vec<u8>,
    pub nonce: &'a str,
    /// client-final-message-without-proof: part of the AuthMessage.
    pub without_proof: &'a str,
    pub proof: Key,
}

pub fn parse_client_final(msg: &str) -> Result<ClientFinal<'_>, ScramError> {
    let cut = msg.rfind(",p=").ok_or(ScramError("missing proof"))?;
    let (without_proof, proof) = (&msg[..cut], &msg[cut + 3..]);
    let proof = B64
        .decode(proof)
        .ok()
        .and_then(|p| key(&p))
        .ok_or(ScramError("bad proof"))?;
    let mut attrs = without_proof.split(',');
    let channel_binding = attrs
        .next()
        .and_then(|a| a.strip_prefix("c="))
        .and_then(|c| B64.decode(c).ok())
        .ok_or(ScramError("bad channel binding attribute"))?;
    let nonce = attrs
        .next()
        .and_then(|a| a.strip_prefix("r="))
        .ok_or(ScramError("missing nonce"))?;
    Ok(ClientFinal {
        channel_binding,
        nonce,
        without_proof,
        proof,
    })
}

/// `r=<nonce>,s=<salt>,i=<iterations>`.
pub fn server_first(nonce: &str, verifier: &Verifier) -> String {
    format!(
        "r={nonce},s={},i={}",
        B64.encode(&verifier.salt),
        verifier.iterations
    )
}

/// `v=<ServerSignature>`.
pub fn server_final(signature: &Key) -> String {
    format!("v={}", B64.encode(signature))
}

/// A fresh nonce: 18 random bytes in base64 (as PostgreSQL makes them).
pub fn new_nonce() -> String {
    B64.encode(rand::random::<[u8; 18]>())
}

/// The `AuthMessage` both sides sign.
pub fn auth_message(client_first_bare: &str, server_first: &str, final_no_proof: &str) -> String {
    format!("{client_first_bare},{server_first},{final_no_proof}")
}

/// A server-first-message as a client reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFirst<'a> {
    pub nonce: &'a str,
    pub salt: Vec<u8>,
    pub iterations: u32,
}

pub fn parse_server_first(msg: &str) -> Result<ServerFirst<'_>, ScramError> {
    let mut attrs = msg.split(',');
    let nonce = attrs
        .next()
        .and_then(|a| a.strip_prefix("r="))
        .filter(|n| printable_nonce(n))
        .ok_or(ScramError("bad server nonce"))?;
    let salt = attrs
        .next()
        .and_then(|a| a.strip_prefix("s="))
        .and_then(|s| B64.decode(s).ok())
        .ok_or(ScramError("bad salt"))?;
    let iterations = attrs
        .next()
        .and_then(|a| a.strip_prefix("i="))
        .and_then(|i| i.parse().ok())
        .filter(|&i: &u32| i > 0)
        .ok_or(ScramError("bad iteration count"))?;
    Ok(ServerFirst {
        nonce,
        salt,
        iterations,
    })
}

/// The client side of one exchange, for logging in to a branch's server.
pub struct ClientExchange {
    client_key: Key,
    /// The key that checks the server's signature, when known: a server that
    /// proves it holds the same verifier is the server the credentials are for.
    server_key: Option<Key>,
    nonce: String,
    bare: String,
    auth_message: String,
}

impl ClientExchange {
    /// Starts with a known ClientKey (recovered from a client's proof).
    pub fn with_client_key(client_key: Key, server_key: Option<Key>) -> Self {
        let nonce = new_nonce();
        Self {
            client_key,
            server_key,
            bare: format!("n=,r={nonce}"),
            nonce,
            auth_message: String::new(),
        }
    }

    /// The client-first-message (no channel binding: `n,,`).
    pub fn client_first(&self) -> String {
        format!("n,,{}", self.bare)
    }

    /// Answers the server-first-message. `password`, when the proxy knows it, is used
    /// with the server's own salt and iteration count.
    pub fn client_final(
        &mut self,
        server_first: &str,
        password: Option<&str>,
    ) -> Result<String, ScramError> {
        let sf = parse_server_first(server_first)?;
        if !sf.nonce.starts_with(&self.nonce) || sf.nonce.len() == self.nonce.len() {
            return Err(ScramError("server nonce does not extend the client's"));
        }
        if let Some(pw) = password {
            let salted = salted_password(pw.as_bytes(), &sf.salt, sf.iterations);
            self.client_key = client_key(&salted);
            self.server_key = Some(hmac_sha256(&salted, &[b"Server Key"]));
        }
        let without_proof = format!("c=biws,r={}", sf.nonce);
        self.auth_message = auth_message(&self.bare, server_first, &without_proof);
        let stored = sha256(&self.client_key);
        let signature = hmac_sha256(&stored, &[self.auth_message.as_bytes()]);
        let proof = xor(&self.client_key, &signature);
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks the server-final-message.
    pub fn verify_server(&self, server_final: &str) -> Result<(), ScramError> {
        if server_final.starts_with("e=") {
            return Err(ScramError("server reported an error"));
        }
        let sig = server_final
            .strip_prefix("v=")
            .and_then(|v| B64.decode(v).ok())
            .ok_or(ScramError("bad server signature"))?;
        match &self.server_key {
            Some(sk) => {
                let expected = hmac_sha256(sk, &[self.auth_message.as_bytes()]);
                if secure_eq(&sig, &expected) {
                    Ok(())
                } else {
                    Err(ScramError("server signature does not match"))
                }
            }
            None => Ok(()),
        }
    }
}

/// The `tls-server-end-point` channel binding data of a certificate (RFC 5929): its
/// hash with the certificate's signature hash, SHA-256 for MD5 and SHA-1. `None`
/// for signature algorithms without a hash (Ed25519), where PostgreSQL offers no
/// binding either.
pub fn tls_server_end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    let alg = match signature_oid(cert_der)? {
        // md5WithRSA, sha1WithRSA, sha256WithRSA, ecdsa-with-SHA1, ecdsa-with-SHA256, RSASSA-PSS
        // (PSS carries its hash in parameters; SHA-256 is what every issuer uses).
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x04 | 0x05 | 0x0b | 0x0a]
        | [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01]
        | [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02] => &digest::SHA256,
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c]
        | [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03] => &digest::SHA384,
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d]
        | [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04] => &digest::SHA512,
        _ => return None,
    };
    Some(digest::digest(alg, cert_der).as_ref().to_vec())
}

/// One DER element: (tag, contents, rest).
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | b as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The OID of `Certificate.signatureAlgorithm`.
fn signature_oid(cert: &[u8]) -> Option<&[u8]> {
    const SEQUENCE: u8 = 0x30;
    const OID: u8 = 0x06;
    let (SEQUENCE, body, _) = der(cert)? else {
        return None;
    };
    let (SEQUENCE, _tbs, rest) = der(body)? else {
        return None;
    };
    let (SEQUENCE, alg, _) = der(rest)? else {
        return None;
    };
    let (OID, oid, _) = der(alg)? else {
        return None;
    };
    Some(oid)
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 7677 section 3, the SCRAM-SHA-256 example.
    const SALT: &str = "W22ZaJ0SNY7soEsUEjb6gQ==";
    const CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                                p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn rfc_verifier() -> Verifier {
        Verifier::from_password("pencil", &B64.decode(SALT).unwrap(), 4096)
    }

    #[test]
    fn rfc7677_exchange_verifies_and_recovers_the_client_key() {
        let v = rfc_verifier();
        let first = parse_client_first(CLIENT_FIRST).unwrap();
        assert_eq!(first.binding, ChannelBinding::NotSupported);
        assert_eq!(first.gs2_header, "n,,");
        let fin = parse_client_final(CLIENT_FINAL).unwrap();
        assert_eq!(fin.channel_binding, b"n,,");
        let am = auth_message(first.bare, SERVER_FIRST, fin.without_proof);
        let ck = v.recover_client_key(am.as_bytes(), &fin.proof).unwrap();
        let salted = salted_password(b"pencil", &v.salt, 4096);
        assert_eq!(ck, client_key(&salted));
        assert_eq!(
            server_final(&v.server_signature(am.as_bytes())),
            SERVER_FINAL
        );
        // One flipped bit in the proof fails.
        let mut bad = fin.proof;
        bad[0] ^= 1;
        assert!(v.recover_client_key(am.as_bytes(), &bad).is_none());
    }

    #[test]
    fn verifier_round_trips_postgres_format() {
        let v = rfc_verifier();
        let text = format!(
            "SCRAM-SHA-256$4096:{SALT}${}:{}",
            B64.encode(v.stored_key),
            B64.encode(v.server_key)
        );
        assert_eq!(Verifier::parse(&text).unwrap(), v);
        assert!(v.check_password("pencil"));
        assert!(!v.check_password("pencil "));
        for bad in [
            "md5abc",
            "SCRAM-SHA-256$0:c2FsdA==$AAAA:AAAA",
            "SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA",
            "SCRAM-SHA-256$4096:$x:y",
            "",
        ] {
            assert!(Verifier::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn client_exchange_answers_a_server_holding_the_same_verifier() {
        let v = rfc_verifier();
        let ck = client_key(&salted_password(b"pencil", &v.salt, 4096));
        let mut c = ClientExchange::with_client_key(ck, Some(v.server_key));
        let cf = c.client_first();
        let first = parse_client_first(&cf).unwrap();
        let sf = server_first(&format!("{}abc", first.nonce), &v);
        let cfin = c.client_final(&sf, None).unwrap();
        let fin = parse_client_final(&cfin).unwrap();
        let am = auth_message(first.bare, &sf, fin.without_proof);
        assert!(v.recover_client_key(am.as_bytes(), &fin.proof).is_some());
        c.verify_server(&server_final(&v.server_signature(am.as_bytes())))
            .unwrap();
        assert!(c.verify_server("v=AAAA").is_err());
        // A server that does not extend the client's nonce is refused.
        let mut c2 = ClientExchange::with_client_key(ck, None);
        assert!(c2.client_final(&server_first("other", &v), None).is_err());
    }

    #[test]
    fn client_first_rules() {
        assert!(parse_client_first("n,a=admin,n=,r=abc").is_err());
        assert!(parse_client_first("n,,m=x,n=,r=abc").is_err());
        assert!(parse_client_first("x,,n=,r=abc").is_err());
        assert!(parse_client_first("n,,n=,r=a,b").is_ok());
        assert!(parse_client_first("n,,n=,r=").is_err());
        let p = parse_client_first("p=tls-server-end-point,,n=,r=abc").unwrap();
        assert_eq!(
            p.binding,
            ChannelBinding::Required(CB_TLS_SERVER_END_POINT.into())
        );
        assert_eq!(p.gs2_header, "p=tls-server-end-point,,");
        assert_eq!(
            parse_client_first("y,,n=,r=abc").unwrap().binding,
            ChannelBinding::NotOffered
        );
    }

    #[test]
    fn mock_verifiers_are_stable_per_role() {
        assert_eq!(
            Verifier::mock(b"k", "a", 4096),
            Verifier::mock(b"k", "a", 4096)
        );
        assert_eq!(Verifier::mock(b"k", "a", 10_000).iterations, 10_000);
        assert_ne!(
            Verifier::mock(b"k", "a", 4096).salt,
            Verifier::mock(b"k", "b", 4096).salt
        );
    }

    #[test]
    fn parsers_never_panic_on_prefixes() {
        for msg in [CLIENT_FIRST, CLIENT_FINAL, SERVER_FIRST] {
            for i in 0..=msg.len() {
                let _ = parse_client_first(&msg[..i]);
                let _ = parse_client_final(&msg[..i]);
                let _ = parse_server_first(&msg[..i]);
            }
        }
        for i in 0..64u8 {
            let _ = tls_server_end_point(&[0x30, 0x84, i, 0xff, 0xff, 0xff]);
        }
    }
}
