//! The snapshot being taken, as the API lists it and the log tells it: its phase
//! (copying, transforming, sealing) and the bytes copied so far, where the engine
//! can tell.
//!
//! An engine takes one snapshot at a time, so one [`Tracker`] per engine holds at
//! most one; the [`Taking`] guard clears it however the snapshot ends.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tracing::info;

use super::SnapshotInfo;

/// Where a snapshot in progress is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotPhase {
    /// The source's data is being copied.
    Copying,
    /// `snapshot_transform` files run on the copy.
    Transforming,
    /// The copy is made consistent and closed (a clean start and stop, or the
    /// marker and closing it to connections).
    Sealing,
}

impl SnapshotPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotPhase::Copying => "copying",
            SnapshotPhase::Transforming => "transforming",
            SnapshotPhase::Sealing => "sealing",
        }
    }
}

/// What the API shows of a snapshot in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Progress {
    pub phase: SnapshotPhase,
    /// Bytes copied so far; absent where the engine cannot tell (the `database`
    /// engine's copy is one statement on the server).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_copied: Option<u64>,
}

#[derive(Debug, Clone)]
struct Current {
    source: String,
    name: String,
    started: SystemTime,
    progress: Progress,
}

/// An engine's snapshot in progress, if any.
#[derive(Debug, Default, Clone)]
pub struct Tracker(Arc<Mutex<Option<Current>>>);

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Current>> {
        // One plain value, whole after any panic.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts tracking snapshot `name` of `source`, in phase Copying.
    pub fn begin(&self, source: &str, name: &str, now: SystemTime) -> Taking {
        info!(
            source,
            snapshot = name,
            phase = "copying",
            "snapshot progress"
        );
        *self.lock() = Some(Current {
            source: source.to_owned(),
            name: name.to_owned(),
            started: now,
            progress: Progress {
                phase: SnapshotPhase::Copying,
                bytes_copied: None,
            },
        });
        Taking(self.clone())
    }

    /// The snapshot in progress, as the API lists it.
    pub fn current(&self) -> Option<SnapshotInfo> {
        self.lock().as_ref().map(|c| SnapshotInfo {
            name: c.name.clone(),
            created_at: humantime::format_rfc3339_millis(c.started).to_string(),
            origin: String::new(),
            size_bytes: c.progress.bytes_copied.unwrap_or(0),
            branches: Vec::new(),
            progress: Some(c.progress.clone()),
        })
    }
}

/// Held while a snapshot is taken; dropping it clears the tracker.
pub struct Taking(Tracker);

impl Taking {
    /// Moves to `phase`, with a log line.
    pub fn phase(&self, phase: SnapshotPhase) {
        let mut cur = self.0.lock();
        if let Some(c) = cur.as_mut() {
            if c.progress.phase != phase {
                c.progress.phase = phase;
                info!(source = %c.source, snapshot = %c.name, phase = phase.as_str(),
                      bytes_copied = c.progress.bytes_copied, "snapshot progress");
            }
        }
    }

    /// Records the bytes copied so far.
    pub fn copied(&self, bytes: u64) {
        if let Some(c) = self.0.lock().as_mut() {
            c.progress.bytes_copied = Some(bytes);
        }
    }

    /// Measures the bytes copied with `measure` (blocking) every `every`, logging
    /// them every tenth time, until the snapshot ends or the returned task is
    /// aborted.
    pub fn watch(
        &self,
        every: Duration,
        measure: impl Fn() -> u64 + Send + Sync + 'static,
    ) -> tokio::task::AbortHandle {
        let tracker = self.0.clone();
        let measure = Arc::new(measure);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            for n in 0u64.. {
                tick.tick().await;
                let m = measure.clone();
                let bytes = tokio::task::spawn_blocking(move || m()).await.unwrap_or(0);
                let Some(c) = tracker.lock().as_mut().map(|c| {
                    c.progress.bytes_copied = Some(bytes);
                    c.clone()
                }) else {
                    return;
                };
                if n % 10 == 9 {
                    info!(source = %c.source, snapshot = %c.name, phase = c.progress.phase.as_str(),
                          bytes_copied = bytes, "snapshot progress");
                }
            }
        })
        .abort_handle()
    }
}

impl Drop for Taking {
    fn drop(&mut self) {
        *self.0.lock() = None;
    }
}
