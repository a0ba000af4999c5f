//! Source and branch names from untrusted text (the database or user name of a
//! startup packet, the admin API, the config file), and identifier quoting.
//!
//! The rules are restated here independently of `src/names.rs`, from its docs:
//! a branch is `[a-z0-9][a-z0-9_-]{0,39}`; a source is 1 to 63 bytes of ASCII
//! letters, digits, '-' and '_'.

#![no_main]

use libfuzzer_sys::fuzz_target;
use offshoot::names::{
    quote_ident, quote_literal, BranchId, BranchName, NameError, SourceName, MAX_BRANCH_LEN,
    MAX_IDENT_LEN,
};

fuzz_target!(|s: &str| {
    check_branch(s);
    check_source(s);
    check_quoted(s, '"', quote_ident(s));
    check_quoted(s, '\'', quote_literal(s));
    // How routing splits `source.branch` (at the last separator).
    if let Some((source, branch)) = s.rsplit_once('.') {
        check_branch(branch);
        check_source(source);
    }
});

fn branch_rule(s: &str) -> bool {
    let mut chars = s.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    s.chars().count() <= 40
        && matches!(first, 'a'..='z' | '0'..='9')
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '-' | '_'))
}

fn source_rule(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.chars()
            .all(|c| matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '_'))
}

fn check_branch(s: &str) {
    let parsed = BranchName::new(s);
    assert_eq!(
        parsed.is_ok(),
        branch_rule(s),
        "BranchName::new({s:?}) = {parsed:?}"
    );
    // Deserialising (config, admin API bodies) applies the same rule.
    let json = serde_json::to_string(s).unwrap();
    let de = serde_json::from_str::<BranchName>(&json);
    assert_eq!(de.is_ok(), parsed.is_ok(), "deserialising {json} = {de:?}");
    match parsed {
        Ok(b) => {
            assert_eq!(b.as_str(), s);
            assert_eq!(b.to_string(), s);
            assert!(s.len() <= MAX_BRANCH_LEN);
            assert_eq!(de.unwrap(), b);
            assert_eq!(serde_json::to_string(&b).unwrap(), json);
            // Nothing to escape: the quoted form is the name in plain quotes.
            assert_eq!(quote_ident(s), format!("\"{s}\""));
            // Every branch name is also a valid source name (a subset of its rule).
            let source = SourceName::new(s).expect("a branch name is a valid source name");
            // `source/branch` is unambiguous: neither may contain '/'.
            let id = BranchId { source, branch: b };
            let shown = id.to_string();
            assert_eq!(shown.split_once('/'), Some((s, s)));
        }
        Err(e) => {
            assert_eq!(e, NameError::Branch(s.to_owned()));
        }
    }
}

fn check_source(s: &str) {
    let parsed = SourceName::new(s);
    assert_eq!(
        parsed.is_ok(),
        source_rule(s),
        "SourceName::new({s:?}) = {parsed:?}"
    );
    let json = serde_json::to_string(s).unwrap();
    let de = serde_json::from_str::<SourceName>(&json);
    assert_eq!(de.is_ok(), parsed.is_ok(), "deserialising {json} = {de:?}");
    match parsed {
        Ok(n) => {
            assert_eq!(n.as_str(), s);
            assert_eq!(n.to_string(), s);
            assert!(s.len() <= MAX_IDENT_LEN);
            assert_eq!(de.unwrap(), n);
            assert_eq!(quote_ident(s), format!("\"{s}\""));
        }
        Err(e) => assert_eq!(e, NameError::Source(s.to_owned())),
    }
}

/// `quoted` starts and ends with `q`, and removing those and un-doubling `qq` gives
/// back `s`; a lone `q` inside would end the identifier or literal early.
fn check_quoted(s: &str, q: char, quoted: String) {
    assert!(quoted.len() >= 2, "{quoted:?}");
    assert!(quoted.starts_with(q) && quoted.ends_with(q), "{quoted:?}");
    let inner = &quoted[1..quoted.len() - 1];
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == q {
            assert_eq!(chars.next(), Some(q), "lone {q} inside {quoted:?}");
        }
        out.push(c);
    }
    assert_eq!(out, s, "{quoted:?} does not unquote to the input");
    assert_eq!(quoted.len(), s.len() + 2 + s.matches(q).count());
}
