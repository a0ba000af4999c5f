//! The audit trail: one JSON line per branch or snapshot event in
//! `<state.dir>/audit.jsonl`, read back by `/api/v1/events`, and handed to the
//! configured webhooks.
//!
//! Layout:
//! - this file: [`Event`] (built by the registry where a transition happens),
//!   [`Actor`] (who caused it), [`Action`] and [`Outcome`], and [`Audit`], the cheap
//!   handle everything records through.
//! - `writer`: the thread that appends, fsyncs and rotates the file.
//! - `query`: reading the file and its rotated predecessors back, newest first.
//! - `webhook` (with `http`, its minimal client): each event POSTed, signed, to
//!   the hooks that subscribe to it, retried with backoff.
//!
//! Invariants:
//! - Recording never blocks the caller: events go through a bounded queue to a
//!   thread of their own; a full queue drops the event, counts it
//!   (`offshoot_audit_lines_total{outcome="dropped"}`) and logs it.
//! - A line is fsynced before [`Audit::sync`] returns; the admin API awaits it
//!   before answering a write, so what an API call did is on disk when it answers.
//! - The file is only appended to; rotation renames it whole (`audit.jsonl.1`, ...).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::clock::Clock;
use crate::metrics::Metrics;

mod http;
mod query;
mod webhook;
mod writer;

pub use query::{Filter, FilterError};
pub use webhook::{read_secret, signature, Webhooks, GIVE_UP_AFTER};
pub use writer::Rotation;

/// The file name of the current audit file under the state directory.
pub const FILE: &str = "audit.jsonl";

/// Events waiting for the writer at most; more are dropped (and counted).
const QUEUE: usize = 4096;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub enum Action {
    /// A branch was made (by a client's first connection or the API).
    #[serde(rename = "branch.created")]
    BranchCreated,
    /// A creation failed; nothing of the branch stays.
    #[serde(rename = "branch.create_failed")]
    BranchCreateFailed,
    /// A creation was refused by a quota or a role rule (`reason` says which).
    #[serde(rename = "branch.refused")]
    BranchRefused,
    /// A branch's server was stopped; its data stays.
    #[serde(rename = "branch.suspended")]
    BranchSuspended,
    /// A suspended branch's server was started again.
    #[serde(rename = "branch.resumed")]
    BranchResumed,
    /// The reaper removed a branch (`reason` says which limit).
    #[serde(rename = "branch.expired")]
    BranchExpired,
    /// A branch was removed on request.
    #[serde(rename = "branch.deleted")]
    BranchDeleted,
    /// A branch was made again from a snapshot under the same name.
    #[serde(rename = "branch.reset")]
    BranchReset,
    /// A branch's settings (TTL, protection) were changed.
    #[serde(rename = "branch.updated")]
    BranchUpdated,
    /// A snapshot of a source was taken.
    #[serde(rename = "snapshot.taken")]
    SnapshotTaken,
    /// A snapshot was deleted.
    #[serde(rename = "snapshot.deleted")]
    SnapshotDeleted,
    /// A migration rehearsal's report was stored (`reason`: outcome and report id).
    #[serde(rename = "rehearsal.reported")]
    RehearsalReported,
    /// The proxy started a migration rehearsal (`POST /api/v1/rehearsals`).
    #[serde(rename = "rehearsal.started")]
    RehearsalStarted,
    /// A rehearsal the proxy ran ended without a report (`reason` says why).
    #[serde(rename = "rehearsal.failed")]
    RehearsalFailed,
}

impl Action {
    /// Every action, for validating webhook subscriptions and filters.
    pub const ALL: [Action; 14] = [
        Action::BranchCreated,
        Action::BranchCreateFailed,
        Action::BranchRefused,
        Action::BranchSuspended,
        Action::BranchResumed,
        Action::BranchExpired,
        Action::BranchDeleted,
        Action::BranchReset,
        Action::BranchUpdated,
        Action::SnapshotTaken,
        Action::SnapshotDeleted,
        Action::RehearsalReported,
        Action::RehearsalStarted,
        Action::RehearsalFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::BranchCreated => "branch.created",
            Action::BranchCreateFailed => "branch.create_failed",
            Action::BranchRefused => "branch.refused",
            Action::BranchSuspended => "branch.suspended",
            Action::BranchResumed => "branch.resumed",
            Action::BranchExpired => "branch.expired",
            Action::BranchDeleted => "branch.deleted",
            Action::BranchReset => "branch.reset",
            Action::BranchUpdated => "branch.updated",
            Action::SnapshotTaken => "snapshot.taken",
            Action::SnapshotDeleted => "snapshot.deleted",
            Action::RehearsalReported => "rehearsal.reported",
            Action::RehearsalStarted => "rehearsal.started",
            Action::RehearsalFailed => "rehearsal.failed",
        }
    }

    /// Whether `pattern` names this action: the action itself, `*`, or a prefix
    /// ending in `.*` (`branch.*`).
    pub fn matches(self, pattern: &str) -> bool {
        match pattern.strip_suffix('*') {
            Some("") => true,
            Some(prefix) if prefix.ends_with('.') => self.as_str().starts_with(prefix),
            _ => self.as_str() == pattern,
        }
    }

    /// Whether `pattern` names at least one action (a typo names none).
    pub fn is_pattern(pattern: &str) -> bool {
        Action::ALL.iter().any(|a| a.matches(pattern))
    }
}

/// Who caused an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ActorKind {
    /// A client connection through the proxy.
    Client,
    /// A call of the admin API (the CLI and the console call it too).
    #[default]
    Api,
    /// The reaper: idle suspension and expiry.
    Reaper,
    /// Scheduled work (snapshots, refreshes).
    Scheduler,
    /// The proxy itself: suspension at shutdown, a branch server found gone.
    Proxy,
}

/// Who caused an event, with what is known of them.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Actor {
    pub kind: ActorKind,
    /// The database role of a client (authenticated, or claimed under `trust`).
    pub role: Option<String>,
    /// The peer address of a client or an API caller.
    pub addr: Option<String>,
    /// Which credential an API caller proved: `admin` (the bearer token) or
    /// `console` (a console session); `None` on a listener without a token.
    pub token_name: Option<String>,
}

impl Actor {
    pub fn client(role: Option<String>, addr: Option<String>) -> Self {
        Self {
            kind: ActorKind::Client,
            role,
            addr,
            token_name: None,
        }
    }

    pub fn api(addr: Option<String>, token_name: Option<String>) -> Self {
        Self {
            kind: ActorKind::Api,
            addr,
            token_name,
            role: None,
        }
    }

    fn of(kind: ActorKind) -> Self {
        Self {
            kind,
            ..Self::default()
        }
    }

    pub fn reaper() -> Self {
        Self::of(ActorKind::Reaper)
    }

    pub fn scheduler() -> Self {
        Self::of(ActorKind::Scheduler)
    }

    pub fn proxy() -> Self {
        Self::of(ActorKind::Proxy)
    }
}

/// How it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    #[default]
    Ok,
    Failed,
    Refused,
}

/// One line of the audit trail. Build with [`Event::new`] and the setters; `at` is
/// filled in from the audit's clock when it is recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    #[serde(with = "rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub at: SystemTime,
    pub action: Action,
    pub source: Option<String>,
    pub branch: Option<String>,
    pub snapshot: Option<String>,
    pub actor: Actor,
    /// Why, when a rule decided it: `idle 2h`, `quota`, `shutdown`.
    pub reason: Option<String>,
    pub duration_ms: Option<u64>,
    pub outcome: Outcome,
    /// What went wrong, as a client would be told it (never a path or OS error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// On `branch.created`: the clone was a warm spare, taken ready-made.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub from_spare: bool,
}

impl Event {
    pub fn new(action: Action, actor: Actor) -> Self {
        Self {
            at: SystemTime::UNIX_EPOCH,
            action,
            source: None,
            branch: None,
            snapshot: None,
            actor,
            reason: None,
            duration_ms: None,
            outcome: Outcome::Ok,
            error: None,
            from_spare: false,
        }
    }

    /// Source and branch from a branch id.
    pub fn branch(mut self, id: &crate::names::BranchId) -> Self {
        self.source = Some(id.source.to_string());
        self.branch = Some(id.branch.to_string());
        self
    }

    pub fn source(mut self, source: &str) -> Self {
        self.source = Some(source.to_owned());
        self
    }

    pub fn snapshot(mut self, name: Option<&str>) -> Self {
        self.snapshot = name.map(str::to_owned);
        self
    }

    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    pub fn duration(mut self, d: Duration) -> Self {
        self.duration_ms = Some(d.as_millis().try_into().unwrap_or(u64::MAX));
        self
    }

    pub fn outcome(mut self, outcome: Outcome) -> Self {
        self.outcome = outcome;
        self
    }

    /// What a client was told (a refusal's message, say).
    pub fn error(mut self, message: impl Into<String>) -> Self {
        self.error = Some(message.into());
        self
    }

    /// Marks a creation whose clone was a warm spare.
    pub fn from_spare(mut self, yes: bool) -> Self {
        self.from_spare = yes;
        self
    }

    /// A failure with the message a client would see.
    pub fn failed(self, message: impl Into<String>) -> Self {
        self.outcome(Outcome::Failed).error(message)
    }
}

/// `at` as RFC 3339 in UTC with milliseconds, the form `since` takes too.
mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_millis(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&text).map_err(serde::de::Error::custom)
    }
}

/// What the writer thread is sent.
enum Msg {
    Event(Box<Event>),
    /// Answered once every event sent before it is fsynced.
    Sync(oneshot::Sender<()>),
}

struct Inner {
    tx: mpsc::Sender<Msg>,
    dir: PathBuf,
    rotation: Rotation,
    clock: Clock,
    metrics: Arc<Metrics>,
}

/// The handle events are recorded through; clones share the writer. A disabled
/// handle (unit tests of other modules) records nothing.
#[derive(Clone, Default)]
pub struct Audit(Option<Arc<Inner>>);

impl Audit {
    /// Records nothing.
    pub fn disabled() -> Self {
        Self(None)
    }

    /// Starts the writer thread on `<dir>/audit.jsonl`; each event written is then
    /// handed to `hooks`.
    pub fn start(
        dir: &Path,
        rotation: Rotation,
        hooks: Webhooks,
        clock: Clock,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let file = writer::Writer::open(dir, rotation, hooks, metrics.clone())?;
        std::thread::Builder::new()
            .name("offshoot-audit".into())
            .spawn(move || file.run(rx))?;
        Ok(Self(Some(Arc::new(Inner {
            tx,
            dir: dir.to_owned(),
            rotation,
            clock,
            metrics,
        }))))
    }

    /// Queues `event`, stamped with the clock's time; never waits.
    pub fn record(&self, mut event: Event) {
        let Some(inner) = &self.0 else { return };
        event.at = inner.clock.now();
        if let Err(e) = inner.tx.try_send(Msg::Event(Box::new(event))) {
            inner
                .metrics
                .audit_lines_total
                .with_label_values(&["dropped"])
                .inc();
            let event = match e {
                mpsc::error::TrySendError::Full(Msg::Event(e))
                | mpsc::error::TrySendError::Closed(Msg::Event(e)) => e,
                _ => return,
            };
            warn!(action = event.action.as_str(), source = ?event.source, branch = ?event.branch, "audit queue full; event dropped");
        }
    }

    /// Returns once every event recorded before the call is on disk (or was
    /// dropped because writing failed).
    pub async fn sync(&self) {
        let Some(inner) = &self.0 else { return };
        let (tx, rx) = oneshot::channel();
        if inner.tx.send(Msg::Sync(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// The events `filter` selects, newest first, from the current file and its
    /// rotated predecessors. Waits for queued events first, so a caller sees what
    /// it has just done.
    pub async fn query(&self, filter: Filter) -> std::io::Result<Vec<Event>> {
        let Some(inner) = &self.0 else {
            return Ok(Vec::new());
        };
        self.sync().await;
        let (dir, keep) = (inner.dir.clone(), inner.rotation.keep);
        tokio::task::spawn_blocking(move || query::read(&dir, keep, &filter))
            .await
            .map_err(std::io::Error::other)?
    }
}

#[cfg(test)]
mod tests;
