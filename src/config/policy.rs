//! Branch policies: `[[sources.<name>.policies]]`, each a glob on the branch name
//! and the lifecycle keys it sets. They are evaluated in order and the first match
//! wins; a key the matching policy does not set comes from the source.
//!
//! A policy that can never match (every name it matches is matched by an earlier one)
//! is a configuration error, found by [`Glob::covers`], so a reader of the file can
//! trust that each policy governs something.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::keys::invalid;
use super::values::{Limit, Refresh};
use super::{ConfigError, SourceConfig};
use crate::names::BranchName;

/// The longest pattern accepted: a branch name is at most 40 bytes, so this leaves
/// room for any number of wildcards that could still matter.
const MAX_PATTERN_LEN: usize = 100;

/// A glob on branch names: `*` matches any run of characters (also none), `?` one
/// character; every other character matches itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    pub fn new(pattern: &str) -> Result<Self, String> {
        if pattern.is_empty() || pattern.len() > MAX_PATTERN_LEN {
            return Err(format!("must be 1 to {MAX_PATTERN_LEN} characters"));
        }
        if let Some(c) = pattern
            .chars()
            .find(|&c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "-_*?".contains(c)))
        {
            return Err(format!(
                "{pattern:?}: {c:?} never appears in a branch name (lowercase letters, \
                 digits, '-' and '_'); patterns may add '*' and '?'"
            ));
        }
        Ok(Self(pattern.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn matches(&self, name: &str) -> bool {
        let accept = self.len();
        let mut states = self.start();
        for c in name.bytes() {
            states = self.step(states, Sym::Byte(c));
            if states == 0 {
                return false;
            }
        }
        states & (1 << accept) != 0
    }

    /// True when every name `other` matches is matched by `self` too, so a policy
    /// with `other` after one with `self` can never match.
    ///
    /// Both patterns are automata over positions; a character neither mentions
    /// behaves like any other such character, so the alphabet is the characters they
    /// mention plus one stand-in for the rest, and a search over pairs of state sets
    /// is exact.
    pub fn covers(&self, other: &Glob) -> bool {
        let mut alphabet: Vec<Sym> = self
            .0
            .bytes()
            .chain(other.0.bytes())
            .filter(|b| *b != b'*' && *b != b'?')
            .map(Sym::Byte)
            .collect();
        alphabet.sort_by_key(|s| match s {
            Sym::Byte(b) => *b,
            Sym::Other => 0,
        });
        alphabet.dedup();
        alphabet.push(Sym::Other);
        let start = (self.start(), other.start());
        let mut seen = vec![start];
        let mut todo = vec![start];
        while let Some((mine, theirs)) = todo.pop() {
            if theirs & (1 << other.len()) != 0 && mine & (1 << self.len()) == 0 {
                return false;
            }
            for &sym in &alphabet {
                let next = (self.step(mine, sym), other.step(theirs, sym));
                if next.1 != 0 && !seen.contains(&next) {
                    seen.push(next);
                    todo.push(next);
                }
            }
        }
        true
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    /// Positions reachable before reading anything: 0 and past any leading `*`s.
    fn start(&self) -> u128 {
        self.closure(1)
    }

    /// Adds the positions a `*` may be skipped to.
    fn closure(&self, mut set: u128) -> u128 {
        for (i, c) in self.0.bytes().enumerate() {
            if c == b'*' && set & (1 << i) != 0 {
                set |= 1 << (i + 1);
            }
        }
        set
    }

    fn step(&self, set: u128, sym: Sym) -> u128 {
        let mut next = 0u128;
        for (i, c) in self.0.bytes().enumerate() {
            if set & (1 << i) == 0 {
                continue;
            }
            match (c, sym) {
                (b'*', _) => next |= 1 << i,
                (b'?', _) => next |= 1 << (i + 1),
                (c, Sym::Byte(b)) if c == b => next |= 1 << (i + 1),
                _ => {}
            }
        }
        self.closure(next)
    }
}

/// One input symbol of [`Glob::covers`]'s search.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sym {
    Byte(u8),
    /// Any character neither pattern mentions.
    Other,
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Glob {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Glob::new(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// One `[[sources.<name>.policies]]` table. Every key but `match` is optional; an
/// unset key falls through to the source's own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// The branch names this policy governs.
    #[serde(rename = "match")]
    pub pattern: Glob,
    /// Idle time before a branch is removed; `"never"` lifts the source's.
    pub idle_expire: Option<Limit>,
    /// `instance` engine: idle time before a branch's server is stopped.
    pub suspend_after: Option<Limit>,
    /// Time after creation (or the last reset) at which a branch is removed, used or
    /// not.
    pub max_lifetime: Option<Limit>,
    /// Never expires (nor reaches its lifetime); deleting it needs `force`.
    pub persistent: Option<bool>,
    /// Delete and reset are refused unless forced.
    pub protected: Option<bool>,
    /// Whether a new snapshot of the source resets the branch.
    pub refresh: Option<Refresh>,
    /// Roles that may connect to these branches; empty: every role.
    pub connect_roles: Option<Vec<String>>,
    /// Roles that may cause one of these branches to be made; empty: every role
    /// allowed to connect.
    pub create_roles: Option<Vec<String>>,
    /// Most branches this policy may govern at once.
    pub max_branches: Option<usize>,
}

/// What governs one branch: its policy's keys over the source's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy<'a> {
    /// The `match` pattern of the governing policy; `None`: the source's own keys.
    pub name: Option<&'a str>,
    /// The index of that policy in `policies`.
    pub index: Option<usize>,
    pub idle_expire: Option<Duration>,
    pub suspend_after: Option<Duration>,
    pub max_lifetime: Option<Duration>,
    pub persistent: bool,
    pub protected: bool,
    pub refresh: Refresh,
    pub connect_roles: &'a [String],
    pub create_roles: &'a [String],
    /// The policy's own `max_branches`, counted over the branches it governs; the
    /// source's `max_branches` applies besides.
    pub max_branches: Option<usize>,
}

impl SourceConfig {
    /// The index of the first policy whose pattern matches `branch`.
    pub fn policy_index(&self, branch: &str) -> Option<usize> {
        self.policies.iter().position(|p| p.pattern.matches(branch))
    }

    /// The policy governing `branch`, resolved against the source's defaults.
    pub fn policy(&self, branch: &BranchName) -> Policy<'_> {
        let index = self.policy_index(branch.as_str());
        let p = index.map(|i| &self.policies[i]);
        let limit = |own: Option<Limit>, default: Option<Duration>| match own {
            Some(l) => l.duration(),
            None => default,
        };
        Policy {
            name: p.map(|p| p.pattern.as_str()),
            index,
            idle_expire: limit(p.and_then(|p| p.idle_expire), self.idle_expire),
            suspend_after: limit(p.and_then(|p| p.suspend_after), self.suspend_after()),
            max_lifetime: limit(p.and_then(|p| p.max_lifetime), self.max_lifetime),
            persistent: self.persistent.contains(branch)
                || p.and_then(|p| p.persistent).unwrap_or(false),
            protected: p.and_then(|p| p.protected).unwrap_or(false),
            refresh: p.and_then(|p| p.refresh).unwrap_or(self.refresh),
            connect_roles: p
                .and_then(|p| p.connect_roles.as_deref())
                .unwrap_or(&self.connect_roles),
            create_roles: p
                .and_then(|p| p.create_roles.as_deref())
                .unwrap_or(&self.create_roles),
            max_branches: p.and_then(|p| p.max_branches),
        }
    }

    /// Whether any policy restricts roles (refused under `trust`).
    pub(super) fn policies_restrict_roles(&self) -> bool {
        self.policies.iter().any(|p| {
            p.connect_roles.as_ref().is_some_and(|r| !r.is_empty())
                || p.create_roles.as_ref().is_some_and(|r| !r.is_empty())
        })
    }

    /// The checks of `policies`; `key` names a key of this source.
    pub(super) fn validate_policies(
        &self,
        key: &dyn Fn(&str) -> String,
    ) -> Result<(), ConfigError> {
        let servers = matches!(self.engine, super::EngineConfig::Instance(_));
        for (i, p) in self.policies.iter().enumerate() {
            let at = |field: &str| key(&format!("policies[{i}].{field}"));
            if let Some(j) = self.policies[..i]
                .iter()
                .position(|q| q.pattern.covers(&p.pattern))
            {
                let earlier = &self.policies[j].pattern;
                let why = if *earlier == p.pattern {
                    format!("policies[{j}] has the same pattern")
                } else {
                    format!("policies[{j}] (\"{earlier}\") matches every name it matches")
                };
                return Err(invalid(
                    at("match"),
                    format!(
                        "policy {i} (\"{}\") can never match: {why}, and the first match \
                         wins; remove it or move it before policies[{j}]",
                        p.pattern
                    ),
                ));
            }
            for (field, limit) in [
                ("idle_expire", p.idle_expire),
                ("suspend_after", p.suspend_after),
                ("max_lifetime", p.max_lifetime),
            ] {
                if limit == Some(Limit::After(Duration::ZERO)) {
                    return Err(invalid(
                        at(field),
                        "must be greater than zero (or \"never\")",
                    ));
                }
            }
            if p.suspend_after.is_some() && !servers {
                return Err(invalid(
                    at("suspend_after"),
                    "only `engine = \"instance\"` sources run a server per branch",
                ));
            }
            if p.max_branches == Some(0) {
                return Err(invalid(at("max_branches"), "must be at least 1"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(p: &str) -> Glob {
        Glob::new(p).unwrap()
    }

    #[test]
    fn globs_match_branch_names() {
        for (p, yes, no) in [
            ("*", &["a", "pr-1", "qa"][..], &[][..]),
            ("pr-*", &["pr-", "pr-42"], &["pr", "qa-pr-1"]),
            ("qa*", &["qa", "qa2", "qa-eu"], &["aqa"]),
            ("pr-?", &["pr-1"], &["pr-", "pr-12"]),
            ("*-tmp", &["x-tmp", "-tmp", "a-b-tmp"], &["tmp", "x-tmpx"]),
            ("a*b*c", &["abc", "axxbyyc", "abcbc"], &["acb", "ab"]),
            ("exact", &["exact"], &["exac", "exactly"]),
        ] {
            for n in yes {
                assert!(g(p).matches(n), "{p} should match {n}");
            }
            for n in no {
                assert!(!g(p).matches(n), "{p} should not match {n}");
            }
        }
    }

    #[test]
    fn patterns_that_no_branch_name_can_have_are_refused() {
        for bad in ["", "PR-*", "pr.*", "qa[12]", &"a".repeat(101)] {
            assert!(Glob::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn covering_is_exact() {
        for (a, b) in [
            ("*", "pr-*"),
            ("*", "*"),
            ("pr-*", "pr-*"),
            ("pr-*", "pr-1*"),
            ("pr-*", "pr-?"),
            ("*", "?"),
            ("??*", "pr-*"),
            ("*a*", "*a*a*"),
            ("a*", "a*b"),
            ("*-*", "pr-*-x"),
        ] {
            assert!(g(a).covers(&g(b)), "{a} should cover {b}");
        }
        for (a, b) in [
            ("pr-*", "*"),
            ("pr-*", "qa*"),
            ("pr-?", "pr-*"),
            ("*a*a*", "*a*"),
            ("a*b", "a*"),
            ("???", "??"),
            ("*x", "*"),
            ("pr-1*", "pr-*"),
        ] {
            assert!(!g(a).covers(&g(b)), "{a} should not cover {b}");
        }
    }
}
