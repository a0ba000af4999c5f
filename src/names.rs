//! Validated names, checked once at the edge and carried as types.
//!
//! A [`SourceName`] is a key of the `[sources]` table; a [`BranchName`] is what a
//! client asked for. Both are validated where they enter the process (config load,
//! startup packet, admin API) so that nothing deeper has to re-check them. Every SQL
//! identifier the proxy sends is quoted by [`quote_ident`], and nothing else builds
//! identifiers.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest branch name accepted.
pub const MAX_BRANCH_LEN: usize = 40;

/// PostgreSQL truncates identifiers beyond this many bytes (NAMEDATALEN - 1).
pub const MAX_IDENT_LEN: usize = 63;

/// The rule a branch name must follow, in words, for error messages.
pub const BRANCH_RULE: &str = "branch names use lowercase letters, digits, '-' and '_', \
     start with a letter or digit, and are at most 40 characters long";

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("invalid branch name {0:?}: {BRANCH_RULE}")]
    Branch(String),
    #[error(
        "invalid source name {0:?}: source names are 1 to 63 bytes of letters, digits, '-' and '_'"
    )]
    Source(String),
}

/// The name of a configured source (a key of `[sources]`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct SourceName(String);

impl SourceName {
    pub fn new(name: &str) -> Result<Self, NameError> {
        let ok = !name.is_empty()
            && name.len() <= MAX_IDENT_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(NameError::Source(name.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for SourceName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SourceName::new(&s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for SourceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The name of a branch: `[a-z0-9][a-z0-9_-]{0,39}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct BranchName(String);

impl BranchName {
    pub fn new(name: &str) -> Result<Self, NameError> {
        let bytes = name.as_bytes();
        let ok = !bytes.is_empty()
            && bytes.len() <= MAX_BRANCH_LEN
            && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
            && bytes
                .iter()
                .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(NameError::Branch(name.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for BranchName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        BranchName::new(&s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for BranchName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A branch of a source: the registry's key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BranchId {
    pub source: SourceName,
    pub branch: BranchName,
}

impl fmt::Display for BranchId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.source, self.branch)
    }
}

/// Quotes an SQL identifier: wraps it in double quotes and doubles embedded ones.
pub fn quote_ident(ident: &str) -> String {
    let mut out = String::with_capacity(ident.len() + 2);
    out.push('"');
    for c in ident.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Quotes an SQL string literal (standard_conforming_strings on).
pub fn quote_literal(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' {
            out.push('\'');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branch_names_follow_the_rule() {
        for ok in ["pr-42", "a", "0", "qa_long-lived", &"x".repeat(40)] {
            assert!(BranchName::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-x",
            "_x",
            "PR-1",
            "a.b",
            "a b",
            "é",
            &"x".repeat(41),
            "a\"b",
        ] {
            assert!(BranchName::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn source_names_are_identifier_safe() {
        assert!(SourceName::new("shop").is_ok());
        assert!(SourceName::new("shop-full_2").is_ok());
        assert!(SourceName::new("").is_err());
        assert!(SourceName::new("a.b").is_err());
        assert!(SourceName::new(&"s".repeat(64)).is_err());
    }

    #[test]
    fn quoting_doubles_quotes() {
        assert_eq!(quote_ident("pr-42"), "\"pr-42\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
