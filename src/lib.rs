//! Offshoot: a PostgreSQL wire-protocol routing proxy that gives every test cycle its
//! own database branch, cloned from a known source on first connect and removed when
//! it has been idle long enough.
//!
//! # Layout
//!
//! - [`config`]: the typed configuration tree; the only reader of files and env.
//! - [`app`]: builds everything from a config, supervises tasks, drains on shutdown.
//! - [`proxy`]: the connection path, one module per phase (listener, negotiate,
//!   auth, route, authorize, connect with backend, relay; cancel, limits).
//! - [`auth`]: roles' stored passwords and SCRAM; the proxy authenticates clients
//!   before any branch is looked up or made.
//! - [`branch`]: the life of a branch (registry, engines `database` and `instance`,
//!   records, reaper: suspension and expiry).
//! - [`admin`]: HTTP: metrics, health, the branch and snapshot API; [`cli`] is its
//!   client.
//! - [`console`]: the web console the admin listener serves at `/`, and the login
//!   that guards the listener; [`history`]: the in-memory samples its charts draw.
//! - [`recording`]: statements recorded on rehearsal branches' sessions, kept until
//!   the rehearsal takes them.
//! - [`sqltext`]: SQL text split into statements (migrations, snapshot transforms).
//! - [`rehearse`]: migration rehearsal on a branch, through the proxy: statements,
//!   locks, rewrites, hazards, the probe of concurrent traffic; run by the CLI
//!   (`offshoot rehearse`) and by the admin API (`POST /api/v1/rehearsals`).
//! - [`rehearsal_report`]: the rehearsal report's types, JSON and Markdown (a leaf
//!   the console reads too).
//! - [`embedded`] and [`pg`]: the managed local PostgreSQL of the demo (and tests).
//! - [`privsep`]: a proxy started as root drops to its own user; a small helper
//!   keeps root for the servers' file and process work, one typed request each.
//! - [`audit`]: the audit trail (`audit.jsonl`), read back by the events API, and
//!   the webhooks it feeds.
//! - [`error`]: error kinds and the one mapping to SQLSTATE.
//! - [`fsutil`]: atomic file replacement and the other crash-safe file helpers.
//! - [`names`]: validated source and branch names, identifier quoting.
//! - [`clock`]: the one clock (wall and monotonic) of the registry, reaper and
//!   engines; tests use a manual one.
//! - [`metrics`]: the Prometheus registry.
//! - [`upstream`]: TLS towards PostgreSQL servers, shared by the proxy and the
//!   engines.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod audit;
pub mod auth;
pub mod branch;
pub mod cli;
pub mod clock;
pub mod config;
pub mod console;
pub mod embedded;
pub mod error;
pub mod fsutil;
pub mod history;
#[cfg(test)]
mod layering;
pub mod metrics;
pub mod names;
pub mod pg;
pub mod privsep;
pub mod proxy;
pub mod recording;
pub mod rehearsal_report;
pub mod rehearse;
pub mod sqltext;
pub mod upstream;
