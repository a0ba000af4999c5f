//! SCRAM messages and stored passwords, as an unauthenticated client or a users file
//! may present them. Parsers must never panic, and what they accept must say what
//! the input said.
//!
//! The input is split at the first 0xFF byte: client-first-message, then
//! client-final-message, which are run through a whole server-side exchange
//! against a fixed verifier.

#![no_main]

use libfuzzer_sys::fuzz_target;
use offshoot::auth::scram::{self, Verifier};
use offshoot::auth::{parse_users, Secret};
use offshoot::proxy::auth::parse_sasl_initial;

fuzz_target!(|data: &[u8]| {
    // The SASLInitialResponse frame.
    if let Some((mech, payload)) = parse_sasl_initial(data) {
        let mut again = mech.as_bytes().to_vec();
        again.push(0);
        again.extend_from_slice(&(payload.len() as i32).to_be_bytes());
        again.extend_from_slice(payload);
        assert_eq!(again, data);
    }
    let _ = scram::tls_server_end_point(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Verifier::parse(text);
    let _ = Secret::parse(text);
    let _ = parse_users(text);
    let _ = scram::parse_server_first(text);

    let (first, fin) = text.split_once('\u{ff}').unwrap_or((text, ""));
    let Ok(cf) = scram::parse_client_first(first) else {
        return;
    };
    assert!(first.starts_with(cf.gs2_header) && first.ends_with(cf.bare));
    assert_eq!(cf.gs2_header.len() + cf.bare.len(), first.len());
    assert!(!cf.nonce.is_empty() && !cf.nonce.contains(','));

    let verifier = Verifier::from_password("pencil", b"fuzz-salt", 2);
    let server_first = scram::server_first(&format!("{}xyz", cf.nonce), &verifier);
    let Ok(cfin) = scram::parse_client_final(fin) else {
        return;
    };
    assert!(fin.starts_with(cfin.without_proof));
    assert!(fin[cfin.without_proof.len()..].starts_with(",p="));
    let am = scram::auth_message(cf.bare, &server_first, cfin.without_proof);
    // A proof is accepted only when it really is one: its key hashes to StoredKey.
    if let Some(key) = verifier.recover_client_key(am.as_bytes(), &cfin.proof) {
        let salted = scram::salted_password(b"pencil", b"fuzz-salt", 2);
        assert_eq!(key, scram::client_key(&salted));
    }
});
