//! Typed message headers and authentication requests, as `proxy::backend` reads them
//! from the server and the client during authentication.
//!
//! Input: a 5-byte header (tag, length word), then 4 bytes for the limit (used when
//! present, otherwise `MAX_STARTUP_MESSAGE`), then the rest as an 'R' message body.

#![no_main]

use libfuzzer_sys::fuzz_target;
use offshoot::proxy::protocol::{auth_code, auth_needs_reply, message_header, MAX_STARTUP_MESSAGE};

fuzz_target!(|data: &[u8]| {
    if let Some(h) = data.get(..5) {
        let header: [u8; 5] = h.try_into().unwrap();
        check_header(header, MAX_STARTUP_MESSAGE);
        if let Some(m) = data.get(5..9) {
            check_header(header, u32::from_be_bytes(m.try_into().unwrap()) as usize);
        }
        check_header(header, usize::MAX);
        check_header(header, 0);
    }

    for body in [data, data.get(5..).unwrap_or_default()] {
        let code = auth_code(body);
        match body.get(..4) {
            Some(b) => assert_eq!(code, Some(u32::from_be_bytes(b.try_into().unwrap()))),
            None => assert_eq!(code, None),
        }
        // backend.rs reads a missing code as u32::MAX, which needs no reply.
        let _ = auth_needs_reply(code.unwrap_or(u32::MAX));
        assert!(!auth_needs_reply(u32::MAX));
    }
});

fn check_header(header: [u8; 5], max: usize) {
    let len = u32::from_be_bytes(header[1..].try_into().unwrap()) as usize;
    let valid = len >= 4 && len - 4 <= max;
    match message_header(header, max) {
        Ok((tag, n)) => {
            assert!(valid, "length {len} accepted with limit {max}");
            assert_eq!(tag, header[0]);
            assert_eq!(n + 4, len);
            assert!(n <= max);
        }
        Err(msg) => {
            assert!(!valid, "length {len} refused with limit {max}: {msg}");
            assert!(
                msg.contains(&len.to_string()),
                "error does not name the length: {msg}"
            );
        }
    }
}
