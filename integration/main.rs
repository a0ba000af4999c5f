//! End-to-end tests: real PostgreSQL servers, the real `offshoot` binary, real clients.
//! One test binary keeps build time down; modules group the tests by subject.

mod harness;

mod admin;
mod admin_access;
mod admin_api;
mod audit;
mod auth;
mod config;
mod crash;
mod embedded;
mod faults;
mod instance;
mod invariants;
mod isolation;
mod lifecycle;
mod md5;
mod parked;
mod policies;
mod preauth;
mod privsep;
mod protocol;
mod refresh;
mod rehearse;
mod reuse;
mod routing;
mod snapshots;
mod spares;
mod versions;
