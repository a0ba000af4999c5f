//! The proxy's own recent past, kept in memory for the console's charts: branch
//! counts by state and how long creations and resumes took, one sample every few
//! seconds over the last hour. No Prometheus is needed to see a trend.
//!
//! A leaf: whoever samples (the console's recorder, started by `app`) hands in plain
//! numbers. Timings come in as the running totals of a histogram (count and sum);
//! the ring stores what happened between two samples, so a restart of the counters
//! is never drawn as a negative time.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use serde::Serialize;

/// A histogram's running totals: observations so far and the sum of their seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Totals {
    pub count: u64,
    pub sum_secs: f64,
}

/// What happened to one kind of timing between two samples.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Interval {
    /// Observations since the previous sample.
    pub count: u64,
    /// Their mean, in milliseconds (0 when there were none).
    pub mean_ms: f64,
}

/// One point of the history.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    /// When it was taken, in Unix seconds.
    pub at: u64,
    /// Branches by state name at that moment.
    pub states: BTreeMap<String, u64>,
    /// Branch creations (clone made and, where there is one, server started).
    pub cold_starts: Interval,
    /// Suspended branches started again.
    pub resumes: Interval,
}

/// What a sampler reads at one moment.
#[derive(Debug, Clone, Default)]
pub struct Reading {
    pub at: u64,
    pub states: BTreeMap<String, u64>,
    pub cold_starts: Totals,
    pub resumes: Totals,
}

/// A ring of the most recent samples.
pub struct History {
    capacity: usize,
    inner: Mutex<Inner>,
}

struct Inner {
    samples: VecDeque<Sample>,
    last_cold: Option<Totals>,
    last_resume: Option<Totals>,
}

impl History {
    /// Keeps at most `capacity` samples (360 at one every 10 s is an hour).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            inner: Mutex::new(Inner {
                samples: VecDeque::new(),
                last_cold: None,
                last_resume: None,
            }),
        }
    }

    /// Adds a reading; the oldest sample goes when the ring is full.
    pub fn record(&self, reading: Reading) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let cold_starts = interval(inner.last_cold, reading.cold_starts);
        let resumes = interval(inner.last_resume, reading.resumes);
        inner.last_cold = Some(reading.cold_starts);
        inner.last_resume = Some(reading.resumes);
        if inner.samples.len() == self.capacity {
            inner.samples.pop_front();
        }
        inner.samples.push_back(Sample {
            at: reading.at,
            states: reading.states,
            cold_starts,
            resumes,
        });
    }

    /// The samples, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.samples.iter().cloned().collect()
    }
}

/// The change between two running totals. The first reading has nothing to compare
/// with, and totals that went down (counters reset) count as a fresh start.
fn interval(prev: Option<Totals>, now: Totals) -> Interval {
    let base = match prev {
        Some(p) if p.count <= now.count && p.sum_secs <= now.sum_secs => p,
        Some(_) => Totals::default(),
        None => now,
    };
    let count = now.count - base.count;
    let mean_ms = if count == 0 {
        0.0
    } else {
        (now.sum_secs - base.sum_secs) / count as f64 * 1000.0
    };
    Interval { count, mean_ms }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(at: u64, ready: u64, cold: (u64, f64)) -> Reading {
        Reading {
            at,
            states: BTreeMap::from([("ready".to_owned(), ready)]),
            cold_starts: Totals {
                count: cold.0,
                sum_secs: cold.1,
            },
            resumes: Totals::default(),
        }
    }

    #[test]
    fn timings_are_per_interval() {
        let h = History::new(10);
        h.record(reading(0, 1, (2, 1.0)));
        h.record(reading(10, 2, (4, 1.5)));
        h.record(reading(20, 2, (4, 1.5)));
        let s = h.samples();
        assert_eq!(
            s[0].cold_starts.count, 0,
            "nothing to compare the first with"
        );
        assert_eq!(s[1].cold_starts.count, 2);
        assert!((s[1].cold_starts.mean_ms - 250.0).abs() < 1e-9);
        assert_eq!(s[2].cold_starts, Interval::default());
        assert_eq!(s[1].states["ready"], 2);
    }

    #[test]
    fn the_ring_drops_the_oldest() {
        let h = History::new(3);
        for at in 0..5 {
            h.record(reading(at, at, (0, 0.0)));
        }
        let at: Vec<u64> = h.samples().iter().map(|s| s.at).collect();
        assert_eq!(at, vec![2, 3, 4]);
    }

    #[test]
    fn totals_that_go_down_start_again() {
        let h = History::new(10);
        h.record(reading(0, 0, (5, 5.0)));
        h.record(reading(10, 0, (1, 0.2)));
        let s = h.samples();
        assert_eq!(s[1].cold_starts.count, 1);
        assert!((s[1].cold_starts.mean_ms - 200.0).abs() < 1e-9);
    }
}
