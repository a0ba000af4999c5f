//! A client's first bytes: the length word, the initial packet (SSLRequest,
//! GSSENCRequest, CancelRequest or StartupMessage), and the parameters the proxy
//! forwards to the branch's server.
//!
//! The input is read twice: framed, the way `proxy::startup::read_initial` reads a
//! socket (length word, then exactly that many bytes), and whole, as a bare body, so
//! the fuzzer reaches `parse_initial` without first having to guess a valid length.

#![no_main]

use libfuzzer_sys::fuzz_target;
use offshoot::proxy::protocol::{
    encode_cancel, encode_startup, initial_body_len, parse_initial, Initial, Startup,
    CANCEL_REQUEST, GSSENC_REQUEST, MAX_STARTUP_LEN, PROTOCOL_3_0, SSL_REQUEST,
};
use offshoot::proxy::route::server_params;

fuzz_target!(|data: &[u8]| {
    if let Some(word) = data.get(..4) {
        let len = u32::from_be_bytes(word.try_into().unwrap());
        let valid = (8..=MAX_STARTUP_LEN).contains(&(len as usize));
        match initial_body_len(len) {
            Ok(n) => {
                assert!(valid, "length word {len} accepted");
                assert_eq!(n, len as usize - 4, "body length of length word {len}");
                if let Some(body) = data[4..].get(..n) {
                    check_body(body);
                }
            }
            Err(_) => assert!(!valid, "length word {len} refused"),
        }
    }
    check_body(data);
});

/// `body` is everything after the length word.
fn check_body(body: &[u8]) {
    let parsed = parse_initial(body);
    if body.len() < 4 {
        assert!(
            parsed.is_err(),
            "a body of {} bytes was accepted",
            body.len()
        );
        return;
    }
    let Ok(initial) = parsed else { return };
    let code = u32::from_be_bytes(body[..4].try_into().unwrap());
    match initial {
        // The special requests are exactly their code: nothing may follow it.
        Initial::SslRequest => assert_eq!(body, SSL_REQUEST.to_be_bytes()),
        Initial::GssEncRequest => assert_eq!(body, GSSENC_REQUEST.to_be_bytes()),
        Initial::Cancel { pid, secret } => {
            assert_eq!(code, CANCEL_REQUEST);
            assert_eq!(body, &encode_cancel(pid, &secret)[4..]);
        }
        Initial::Startup(s) => check_startup(body, code, &s),
    }
}

fn check_startup(body: &[u8], code: u32, s: &Startup) {
    // Only protocol 3.x gets this far; the minor version is the client's own.
    assert_eq!(s.major, 3);
    assert_eq!(code, (3 << 16) | u32::from(s.minor));
    assert!(![SSL_REQUEST, GSSENC_REQUEST, CANCEL_REQUEST].contains(&code));
    assert_eq!(
        body.last(),
        Some(&0),
        "startup body without final terminator"
    );

    // Keys are non-empty and NUL-free (NUL ends them); values are NUL-free. Both
    // are valid UTF-8: anything else is refused, never altered.
    for (k, v) in &s.params {
        assert!(!k.is_empty(), "empty parameter name in {:?}", s.params);
        assert!(!k.contains('\0') && !v.contains('\0'), "NUL in {k:?}={v:?}");
    }

    // Re-encoding: encode_startup always writes version 3.0, a correct length word,
    // and the parameters parse back unchanged (names and values are NUL-free UTF-8).
    let enc = encode_startup(&s.params);
    assert_eq!(
        u32::from_be_bytes(enc[..4].try_into().unwrap()) as usize,
        enc.len()
    );
    assert_eq!(enc[4..8], PROTOCOL_3_0.to_be_bytes());
    match parse_initial(&enc[4..]) {
        Ok(Initial::Startup(again)) => {
            assert_eq!((again.major, again.minor), (3, 0));
            assert_eq!(again.params, s.params, "parameters changed on re-encoding");
        }
        other => panic!("re-encoded startup does not parse: {other:?}"),
    }
    // When the client's bytes were valid UTF-8 nothing was replaced, so apart from
    // the version the re-encoding is byte for byte what the client sent.
    if std::str::from_utf8(body).is_ok() {
        assert_eq!(
            &enc[8..],
            &body[4..],
            "re-encoding differs from the client's bytes"
        );
        if s.minor == 0 {
            assert_eq!(&enc[4..], body);
        }
    }
    if enc.len() <= MAX_STARTUP_LEN {
        assert_eq!(initial_body_len(enc.len() as u32).ok(), Some(enc.len() - 4));
    }

    // Lookups: the first occurrence wins, and the protocol options are exactly the
    // `_pq_.` keys, in order.
    for key in ["user", "database", "options", "_pq_.x"] {
        let first = s
            .params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str());
        assert_eq!(s.get(key), first);
    }
    let options: Vec<&str> = s
        .params
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| k.starts_with("_pq_."))
        .collect();
    assert_eq!(s.protocol_options(), options);

    // What the branch's server sees. `route` needs a registry; it would pass the
    // (possibly rewritten) user and the branch's database, so use the client's.
    let user = s.get("user").unwrap_or("app");
    let database = s.get("database").unwrap_or("shop__pr-1");
    check_server_params(s, user, database);
    check_server_params(s, "app", "shop__pr-1");
}

fn check_server_params(s: &Startup, user: &str, database: &str) {
    let p = server_params(s, user, database);
    assert_eq!(p[0], ("user".to_owned(), user.to_owned()));
    assert_eq!(p[1], ("database".to_owned(), database.to_owned()));
    for (k, _) in &p[2..] {
        assert!(
            k != "user" && k != "database",
            "second {k:?} sent to the server"
        );
        assert!(
            !k.starts_with("_pq_."),
            "protocol option {k:?} sent to the server"
        );
    }
    // The rest is the client's parameters, in the client's order, none dropped
    // except the routing keys and protocol options.
    let kept: Vec<(String, String)> = s
        .params
        .iter()
        .filter(|(k, _)| k != "user" && k != "database" && !k.starts_with("_pq_."))
        .cloned()
        .collect();
    assert_eq!(p[2..], kept[..]);

    // The message sent to the server parses back to the same parameters.
    let enc = encode_startup(&p);
    match parse_initial(&enc[4..]) {
        Ok(Initial::Startup(again)) => {
            assert_eq!((again.major, again.minor), (3, 0));
            assert_eq!(again.params, p);
            assert!(again.protocol_options().is_empty());
        }
        other => panic!("server startup does not parse: {other:?}"),
    }
}
