//! Names both engines give what they make: snapshots (by their creation time) and,
//! where a name must fit a limit, a shortened form kept unique by a stable hash.

use std::time::SystemTime;

use crate::names::MAX_IDENT_LEN;

/// A snapshot's name: its creation time in UTC, `20261125T030559Z`. Names sort by
/// age.
fn stamp(t: SystemTime) -> String {
    let stamp = humantime::format_rfc3339_seconds(t).to_string();
    stamp.replace(['-', ':'], "")
}

/// The name of a snapshot taken at `t`: its time, with a `-2`, `-3` ... suffix
/// when `taken` says that name is already used (snapshots of the same second).
pub(crate) fn new_snapshot_name(t: SystemTime, taken: impl Fn(&str) -> bool) -> String {
    let base = stamp(t);
    let mut name = base.clone();
    let mut n = 2;
    while taken(&name) {
        name = format!("{base}-{n}");
        n += 1;
    }
    name
}

/// Whether `name` could be a snapshot name (checked before it reaches a path or
/// SQL).
pub(crate) fn valid_snapshot_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 40
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `2026-11-25T03:05:59Z` from a snapshot name; `None` if it is not one.
pub(crate) fn snapshot_time(name: &str) -> Option<String> {
    let stamp = name.split('-').next()?;
    let b = stamp.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(u8::is_ascii_digit));
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' || !digits(0..8) || !digits(9..15) {
        return None;
    }
    Some(format!(
        "{}-{}-{}T{}:{}:{}Z",
        &stamp[0..4],
        &stamp[4..6],
        &stamp[6..8],
        &stamp[9..11],
        &stamp[11..13],
        &stamp[13..15]
    ))
}

/// FNV-1a, 64 bits: stable across Rust versions and platforms, unlike std's hasher,
/// so a name derived from it today is the same name after an upgrade.
pub(crate) fn fnv64(text: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// `<head><tail>` if that fits PostgreSQL's 63-byte identifiers; else `head`
/// shortened and followed by `_<hash of key>`, then `tail`, so two long names stay
/// apart. `tail` must be short enough to fit with the hash.
pub(crate) fn fit_ident(head: &str, tail: &str, key: &str) -> String {
    let full = format!("{head}{tail}");
    if full.len() <= MAX_IDENT_LEN {
        return full;
    }
    let suffix = format!("_{:08x}{tail}", fnv64(key) as u32);
    let mut keep = MAX_IDENT_LEN.saturating_sub(suffix.len()).min(head.len());
    while !head.is_char_boundary(keep) {
        keep -= 1;
    }
    format!("{}{suffix}", &head[..keep])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn snapshot_names_sort_by_time_and_are_safe() {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let name = new_snapshot_name(t, |_| false);
        assert_eq!(name, "20231114T221320Z");
        assert!(valid_snapshot_name(&name));
        let taken = ["20231114T221320Z", "20231114T221320Z-2"];
        assert_eq!(
            new_snapshot_name(t, |n| taken.contains(&n)),
            "20231114T221320Z-3"
        );
        assert!(valid_snapshot_name("20231114T221320Z-2"));
        assert!(!valid_snapshot_name("../x"));
        assert!(!valid_snapshot_name(".partial-x"));
        assert_eq!(
            snapshot_time("20231114T221320Z-2").as_deref(),
            Some("2023-11-14T22:13:20Z")
        );
        assert_eq!(snapshot_time("nope"), None);
    }

    #[test]
    fn long_identifiers_are_shortened_apart() {
        assert_eq!(fit_ident("shop", "__pr-1", "shop/pr-1"), "shop__pr-1");
        let long = "t".repeat(70);
        let a = fit_ident(&long, "__b", "a");
        let b = fit_ident(&long, "__b", "b");
        assert!(a.len() <= MAX_IDENT_LEN && a.ends_with("__b"), "{a}");
        assert_ne!(a, b);
        assert_eq!(a, fit_ident(&long, "__b", "a"));
        // Multi-byte characters are never cut in half.
        let wide = "é".repeat(40);
        assert!(fit_ident(&wide, "@x", "k").len() <= MAX_IDENT_LEN);
        assert_eq!(fnv64(""), 0xcbf29ce484222325);
    }
}
