//! A branch's state: one enum whose variants carry what only that state has, and the
//! transitions between them.
//!
//! | from         | event                                            | to           |
//! |--------------|--------------------------------------------------|--------------|
//! | (none)       | first connection, or `ensure` (API)              | Provisioning |
//! | Provisioning | clone made, engine runs a server per clone       | Starting     |
//! | Provisioning | clone made, no server to start                   | Ready        |
//! | Provisioning, Starting | creation, or the first start after it, failed | (none) |
//! | Starting     | server started                                   | Ready        |
//! | Starting     | server of a suspended branch did not start       | Suspended    |
//! | Ready        | suspension (idle or API), no connection open     | Suspending   |
//! | Ready        | its server was found dead by a connection        | Suspended    |
//! | Suspending   | server stopped / could not be stopped            | Suspended / Ready |
//! | Suspended    | first connection                                 | Starting     |
//! | Ready, Suspended | deletion (idle or API), unused or forced     | Expiring     |
//! | Expiring     | clone removed                                    | (none)       |
//! | Expiring     | removal failed                                   | Suspended (server engines) / Ready |
//! | Ready, Suspended | reset, unused or forced (sessions terminated)| Resetting    |
//! | Resetting    | old clone removed                                | Provisioning |
//! | Resetting    | old clone could not be removed                   | Suspended (server engines) / Ready |
//!
//! Invariants:
//! - A connection is granted only in `Ready`. In the states with a `done` receiver
//!   it waits on it; in `Suspended` the first connection starts the server.
//! - Every change of state goes through [`Branch::step`], which moves the
//!   `offshoot_branches{state}` gauges: a branch's state and the gauges cannot
//!   disagree, and no scan of all branches is needed to keep them right.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use prometheus::IntGauge;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Creator;
use crate::branch::engine::Endpoint;
use crate::branch::store::BranchRecord;
use crate::clock::Clock;
use crate::error::ProvisionError;
use crate::metrics::Metrics;
use crate::names::{BranchId, SourceName};

/// The phase a branch is in, as the API and the `offshoot_branches` gauge show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// The clone is being made.
    Provisioning,
    /// The clone exists; its server is starting (after a creation or a suspension).
    Starting,
    /// Connections are served.
    Ready,
    /// The clone's server is stopped (or stopping); the next connection starts it.
    Suspended,
    /// The clone is being removed.
    Expiring,
}

impl Phase {
    pub(super) const ALL: [Phase; 5] = [
        Phase::Provisioning,
        Phase::Starting,
        Phase::Ready,
        Phase::Suspended,
        Phase::Expiring,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Provisioning => "provisioning",
            Phase::Starting => "starting",
            Phase::Ready => "ready",
            Phase::Suspended => "suspended",
            Phase::Expiring => "expiring",
        }
    }
}

/// The outcome of a creation or a start, published to every waiting connection.
/// `None` until it is known.
pub(super) type Outcome = Option<Result<(), ProvisionError>>;

/// Published (`true`) when a suspension or a deletion has ended, whichever way.
pub(super) type Ended = watch::Receiver<bool>;

/// Where a branch is in its life. A waiting connection finds what it waits on inside
/// the variant, so a state that needs a waiter cannot be written without one.
pub(super) enum State {
    /// The clone is being made. `done` carries the outcome of the creation and of
    /// the first start of its server.
    Provisioning { done: watch::Receiver<Outcome> },
    /// The clone exists and its server is starting, after a creation (the same
    /// `done` as in Provisioning) or after a suspension.
    Starting { done: watch::Receiver<Outcome> },
    /// Connections are served.
    Ready,
    /// Its server is being stopped; connections look again when that has ended.
    Suspending { done: Ended },
    /// Its server is stopped; the next connection starts it.
    Suspended,
    /// The clone is being removed; connections look again when that has ended (and
    /// then make a fresh clone, or find the branch still there if the removal failed).
    Expiring { done: Ended },
    /// The branch is being made again under the same name (a reset): its old clone
    /// is being removed. Then it moves on to Provisioning with the same `done`, so a
    /// connection arriving at any point of a reset waits for the new clone.
    Resetting { done: watch::Receiver<Outcome> },
}

impl State {
    /// What the API shows. A suspension in progress already shows as `suspended`:
    /// the branch no longer serves, and the next connection will start it.
    pub(super) fn phase(&self) -> Phase {
        match self {
            // The clone is being made again: to a client, the same as a creation.
            State::Provisioning { .. } | State::Resetting { .. } => Phase::Provisioning,
            State::Starting { .. } => Phase::Starting,
            State::Ready => Phase::Ready,
            State::Suspending { .. } | State::Suspended => Phase::Suspended,
            State::Expiring { .. } => Phase::Expiring,
        }
    }

    /// Ready or Suspended: nothing is in flight, so a deletion may start.
    pub(super) fn settled(&self) -> bool {
        matches!(self, State::Ready | State::Suspended)
    }
}

/// What a connection waits on when the branch is not Ready.
pub(super) enum Wait {
    /// A creation or a start: its outcome is the connection's.
    Outcome(watch::Receiver<Outcome>),
    /// A suspension or a deletion of the branch: look again when it ends.
    Branch(Ended),
    /// A deletion of the snapshot this creation would be made from: look again when
    /// it ends.
    Snapshot(Ended),
}

/// The `offshoot_branches{source,state}` gauges of one source, one per [`Phase`].
#[derive(Clone)]
pub(super) struct PhaseGauges([IntGauge; 5]);

impl PhaseGauges {
    /// The source's gauges (created at 0, so every series exists from the first
    /// scrape).
    pub(super) fn new(metrics: &Metrics, source: &SourceName) -> Self {
        Self(Phase::ALL.map(|p| {
            metrics
                .branches
                .with_label_values(&[source.as_str(), p.as_str()])
        }))
    }

    fn of(&self, phase: Phase) -> &IntGauge {
        &self.0[phase as usize]
    }
}

/// Connection count and last activity, shared with the connections' guards.
#[derive(Debug)]
pub struct Activity {
    conns: AtomicUsize,
    last_active_ms: AtomicU64,
    dirty: AtomicBool,
    clock: Clock,
    /// Cancelled when the branch's open sessions must end (a forced reset); each
    /// lease holds the token current when it was granted, so sessions opened after
    /// a reset are not ended by it.
    sessions: Mutex<CancellationToken>,
}

impl Activity {
    pub(super) fn new(clock: Clock, last_active_ms: u64) -> Self {
        Self {
            conns: AtomicUsize::new(0),
            last_active_ms: AtomicU64::new(last_active_ms),
            dirty: AtomicBool::new(false),
            clock,
            sessions: Mutex::new(CancellationToken::new()),
        }
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, CancellationToken> {
        // The guarded value is one token, whole after any panic.
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells every open session of the branch to end; sessions leased from now on
    /// get a fresh token.
    pub(super) fn end_sessions(&self) {
        let old = std::mem::take(&mut *self.sessions());
        old.cancel();
    }

    fn touch(&self) {
        self.last_active_ms
            .store(self.clock.unix_ms(), Ordering::Relaxed);
        self.dirty.store(true, Ordering::Relaxed);
    }

    pub fn connections(&self) -> usize {
        self.conns.load(Ordering::Acquire)
    }

    pub(super) fn last_active_ms(&self) -> u64 {
        self.last_active_ms.load(Ordering::Relaxed)
    }

    /// Whether the stamp changed since the last call.
    pub(super) fn take_dirty(&self) -> bool {
        self.dirty.swap(false, Ordering::Relaxed)
    }
}

/// Held by a connection for its whole life: the branch counts it as open.
pub struct ConnGuard {
    activity: Arc<Activity>,
    gauge: IntGauge,
    ended: CancellationToken,
    branch: BranchId,
}

impl ConnGuard {
    /// The branch the session is on.
    pub fn branch(&self) -> &BranchId {
        &self.branch
    }

    /// Resolves when the registry ends the branch's sessions (a forced reset): the
    /// session must close, telling its client why.
    pub fn ended(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.ended.cancelled()
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.activity.touch();
        self.activity.conns.fetch_sub(1, Ordering::AcqRel);
        self.gauge.dec();
    }
}

/// What a connection gets: where to go, and its place in the branch's count.
pub struct Lease {
    pub endpoint: Endpoint,
    pub guard: ConnGuard,
}

/// One branch the registry knows: its state, its record and its activity.
pub(super) struct Branch {
    state: State,
    pub(super) record: BranchRecord,
    pub(super) activity: Arc<Activity>,
    gauges: PhaseGauges,
}

/// What a connection finds when it looks at a branch.
pub(super) enum Entry {
    /// Served now.
    Ready,
    /// Something is in flight: wait on it, then look again.
    Wait(Wait),
    /// The branch was suspended and this connection is the first: start its server,
    /// publish the outcome on the sender, and wait like the others.
    Start(watch::Sender<Outcome>, Wait),
}

/// Why a branch could not start being removed.
pub(super) enum Refusal {
    /// Something is in flight (a creation, a start, a suspension, a deletion).
    Busy,
    /// Connections are open and the deletion is not forced.
    InUse(usize),
}

impl Branch {
    /// A branch entering the registry in `state`; it counts in the gauges until it
    /// is dropped.
    pub(super) fn new(
        state: State,
        record: BranchRecord,
        activity: Arc<Activity>,
        gauges: PhaseGauges,
    ) -> Self {
        gauges.of(state.phase()).inc();
        Self {
            state,
            record,
            activity,
            gauges,
        }
    }

    pub(super) fn state(&self) -> &State {
        &self.state
    }

    pub(super) fn phase(&self) -> Phase {
        self.state.phase()
    }

    /// The one place a state changes: `f` takes the old state and returns the new
    /// one, and the gauges follow.
    fn step<R>(&mut self, f: impl FnOnce(State) -> (State, R)) -> R {
        let before = self.state.phase();
        let (next, r) = f(std::mem::replace(&mut self.state, State::Ready));
        self.state = next;
        let after = self.state.phase();
        if before != after {
            self.gauges.of(before).dec();
            self.gauges.of(after).inc();
        }
        r
    }

    /// What a connection finds: Ready, something to wait on, or (in Suspended) a
    /// server to start: Suspended → Starting, and the caller publishes the outcome.
    pub(super) fn enter(&mut self) -> Entry {
        self.step(|old| match old {
            State::Ready => (State::Ready, Entry::Ready),
            State::Suspended => {
                let (tx, rx) = watch::channel(None);
                let wait = Wait::Outcome(rx.clone());
                (State::Starting { done: rx }, Entry::Start(tx, wait))
            }
            State::Provisioning { done } => {
                let wait = Wait::Outcome(done.clone());
                (State::Provisioning { done }, Entry::Wait(wait))
            }
            State::Starting { done } => {
                let wait = Wait::Outcome(done.clone());
                (State::Starting { done }, Entry::Wait(wait))
            }
            State::Suspending { done } => {
                let wait = Wait::Branch(done.clone());
                (State::Suspending { done }, Entry::Wait(wait))
            }
            State::Expiring { done } => {
                let wait = Wait::Branch(done.clone());
                (State::Expiring { done }, Entry::Wait(wait))
            }
            State::Resetting { done } => {
                let wait = Wait::Outcome(done.clone());
                (State::Resetting { done }, Entry::Wait(wait))
            }
        })
    }

    /// Counts a connection in (the caller has checked that the branch is Ready).
    pub(super) fn lease(&self, endpoint: Endpoint, gauge: IntGauge) -> Lease {
        self.activity.conns.fetch_add(1, Ordering::AcqRel);
        self.activity.touch();
        gauge.inc();
        Lease {
            endpoint,
            guard: ConnGuard {
                activity: self.activity.clone(),
                gauge,
                ended: self.activity.sessions().clone(),
                branch: self.record.id(),
            },
        }
    }

    /// Provisioning → Starting: the clone is made and recorded; its server starts.
    pub(super) fn made(&mut self, record: BranchRecord) {
        self.record = record;
        self.step(|old| match old {
            State::Provisioning { done } => (State::Starting { done }, ()),
            other => (other, ()),
        })
    }

    /// Provisioning or Starting → Ready: the clone serves. The start counts as
    /// activity, so the reaper cannot suspend the branch again before the
    /// connections that waited for it have taken their leases.
    pub(super) fn started(&mut self) {
        self.activity.touch();
        self.step(|old| match old {
            State::Provisioning { .. } | State::Starting { .. } => (State::Ready, ()),
            other => (other, ()),
        })
    }

    /// Starting → Ready when a suspended branch's server started (activity, as in
    /// [`Branch::started`]), back to Suspended when it did not (the next connection
    /// tries again).
    pub(super) fn resumed(&mut self, ok: bool) {
        if ok {
            self.activity.touch();
        }
        self.step(|old| match old {
            State::Starting { .. } if ok => (State::Ready, ()),
            State::Starting { .. } => (State::Suspended, ()),
            other => (other, ()),
        })
    }

    /// Ready and unused → Suspending. Returns where to announce the end, or `None`
    /// (and no change) in any other case.
    pub(super) fn suspend(&mut self) -> Option<watch::Sender<bool>> {
        let unused = self.activity.connections() == 0;
        self.step(|old| match old {
            State::Ready if unused => {
                let (tx, rx) = watch::channel(false);
                (State::Suspending { done: rx }, Some(tx))
            }
            other => (other, None),
        })
    }

    /// Suspending → Suspended when the server stopped, back to Ready when it may
    /// still run.
    pub(super) fn stopped(&mut self, ok: bool) {
        self.step(|old| match old {
            State::Suspending { .. } if ok => (State::Suspended, ()),
            State::Suspending { .. } => (State::Ready, ()),
            other => (other, ()),
        })
    }

    /// Ready → Suspended: its server was found dead (killed, or crashed); the next
    /// connection starts it again. Returns whether the state changed.
    pub(super) fn lost(&mut self) -> bool {
        self.step(|old| match old {
            State::Ready => (State::Suspended, true),
            other => (other, false),
        })
    }

    /// Ready or Suspended → Expiring, when unused or `force`d. Returns where to
    /// announce the end.
    pub(super) fn expire(&mut self, force: bool) -> Result<watch::Sender<bool>, Refusal> {
        let conns = self.activity.connections();
        self.step(|old| match old {
            s @ (State::Ready | State::Suspended) if conns > 0 && !force => {
                (s, Err(Refusal::InUse(conns)))
            }
            State::Ready | State::Suspended => {
                let (tx, rx) = watch::channel(false);
                (State::Expiring { done: rx }, Ok(tx))
            }
            other => (other, Err(Refusal::Busy)),
        })
    }

    /// Expiring → back to serving after a failed removal: Suspended for engines with
    /// a server per clone (the removal may have stopped it; the next connection
    /// starts it again), Ready otherwise.
    pub(super) fn expire_failed(&mut self, has_servers: bool) {
        self.step(|old| match old {
            State::Expiring { .. } if has_servers => (State::Suspended, ()),
            State::Expiring { .. } => (State::Ready, ()),
            other => (other, ()),
        })
    }

    /// Ready or Suspended → Resetting, when unused or `force`d; a forced reset tells
    /// the open sessions to end. Returns where to publish the new clone's outcome.
    pub(super) fn reset(&mut self, force: bool) -> Result<watch::Sender<Outcome>, Refusal> {
        let conns = self.activity.connections();
        let r = self.step(|old| match old {
            s @ (State::Ready | State::Suspended) if conns > 0 && !force => {
                (s, Err(Refusal::InUse(conns)))
            }
            State::Ready | State::Suspended => {
                let (tx, rx) = watch::channel(None);
                (State::Resetting { done: rx }, Ok(tx))
            }
            other => (other, Err(Refusal::Busy)),
        });
        if r.is_ok() {
            self.activity.end_sessions();
        }
        r
    }

    /// Resetting → Provisioning: the old clone is gone and the new one is being made
    /// from `record`; connections keep waiting on the same outcome.
    pub(super) fn remake(&mut self, record: BranchRecord) {
        self.record = record;
        self.step(|old| match old {
            State::Resetting { done } => (State::Provisioning { done }, ()),
            other => (other, ()),
        })
    }

    /// Resetting → back to serving the old clone, which could not be removed:
    /// Suspended for engines with a server per clone (the removal may have stopped
    /// it), Ready otherwise.
    pub(super) fn reset_failed(&mut self, has_servers: bool) {
        self.step(|old| match old {
            State::Resetting { .. } if has_servers => (State::Suspended, ()),
            State::Resetting { .. } => (State::Ready, ()),
            other => (other, ()),
        })
    }

    /// Whether `creator` made this branch.
    pub(super) fn made_by(&self, creator: &Creator) -> bool {
        self.record.created_by.as_deref() == Some(creator.role.as_str())
    }
}

impl Drop for Branch {
    fn drop(&mut self) {
        self.gauges.of(self.state.phase()).dec();
    }
}
