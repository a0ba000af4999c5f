//! The one clock of the control plane: the registry, the reaper and the engines ask
//! it for wall time (what records and the API show) and monotonic time (what
//! deadlines are measured with).
//!
//! Production code uses [`Clock::system`]. Tests use [`Clock::manual`], a clock that
//! moves only when [`Clock::advance`] is called, so expiry, suspension and quota
//! tests run without sleeping and cannot be made flaky by a slow machine.
//!
//! Invariant: nothing under `branch/` reads `SystemTime::now()` or
//! `Instant::now()` directly; it asks the `Clock` it was given.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A cheap handle to a clock; clones share it.
#[derive(Clone)]
pub struct Clock(Arc<Kind>);

enum Kind {
    System,
    Manual(Mutex<Manual>),
}

struct Manual {
    wall: SystemTime,
    mono: Instant,
}

impl Clock {
    /// The operating system's clocks.
    pub fn system() -> Self {
        Self(Arc::new(Kind::System))
    }

    /// A clock that reads `start` and moves only when advanced.
    pub fn manual(start: SystemTime) -> Self {
        Self(Arc::new(Kind::Manual(Mutex::new(Manual {
            wall: start,
            mono: Instant::now(),
        }))))
    }

    /// Wall-clock time: what records, the API and snapshot names show.
    pub fn now(&self) -> SystemTime {
        match &*self.0 {
            Kind::System => SystemTime::now(),
            Kind::Manual(m) => lock(m).wall,
        }
    }

    /// Monotonic time: what timeouts and durations are measured with.
    pub fn instant(&self) -> Instant {
        match &*self.0 {
            Kind::System => Instant::now(),
            Kind::Manual(m) => lock(m).mono,
        }
    }

    /// Wall-clock time in milliseconds since the Unix epoch.
    pub fn unix_ms(&self) -> u64 {
        unix_ms(self.now())
    }

    /// Moves a manual clock forward, both its wall and its monotonic time.
    ///
    /// # Panics
    /// On the system clock: real time cannot be moved, and a test that tries has a
    /// bug worth hearing about.
    pub fn advance(&self, by: Duration) {
        match &*self.0 {
            Kind::System => panic!("only a manual clock can be advanced"),
            Kind::Manual(m) => {
                let mut m = lock(m);
                m.wall += by;
                m.mono += by;
            }
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &*self.0 {
            Kind::System => f.write_str("Clock::system"),
            Kind::Manual(m) => write!(f, "Clock::manual({:?})", lock(m).wall),
        }
    }
}

fn lock(m: &Mutex<Manual>) -> std::sync::MutexGuard<'_, Manual> {
    // A panic while holding this lock leaves two plain values behind: still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Milliseconds since the Unix epoch (0 for times before it).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced() {
        let start = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let clock = Clock::manual(start);
        let mono = clock.instant();
        assert_eq!(clock.now(), start);
        assert_eq!(clock.instant(), mono);
        let shared = clock.clone();
        shared.advance(Duration::from_secs(90));
        assert_eq!(clock.now(), start + Duration::from_secs(90));
        assert_eq!(clock.instant() - mono, Duration::from_secs(90));
        assert_eq!(clock.unix_ms(), 1_700_000_090_000);
    }

    #[test]
    #[should_panic(expected = "only a manual clock")]
    fn the_system_clock_cannot_be_advanced() {
        Clock::system().advance(Duration::from_secs(1));
    }
}
