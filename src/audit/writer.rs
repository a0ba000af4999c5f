//! The thread that owns `audit.jsonl`: it appends a batch of lines, fsyncs once per
//! batch, answers the syncs that waited for them, and rotates the file by size.
//!
//! Rotation renames `audit.jsonl.<n>` to `.<n+1>` (the oldest, `.<keep>`, is
//! replaced), then `audit.jsonl` to `.1`, and starts a new file; a line is never
//! split across two files.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::error;

use super::{Event, Msg, Webhooks, FILE};
use crate::metrics::Metrics;

/// When the file is rotated, and how many rotated files are kept.
#[derive(Debug, Clone, Copy)]
pub struct Rotation {
    /// A file is rotated before a line would take it past this size.
    pub max_bytes: u64,
    /// Rotated files kept (`audit.jsonl.1` .. `audit.jsonl.<keep>`).
    pub keep: usize,
}

impl Default for Rotation {
    /// 16 MiB per file, 8 rotated files: about 150 MB of history at most, some
    /// hundreds of thousands of events.
    fn default() -> Self {
        Self {
            max_bytes: 16 << 20,
            keep: 8,
        }
    }
}

/// Events written in one batch (one write and one fsync) at most.
const BATCH: usize = 256;

/// The path of rotated file `n` (0: the current file).
pub(super) fn path_of(dir: &Path, n: usize) -> PathBuf {
    match n {
        0 => dir.join(FILE),
        n => dir.join(format!("{FILE}.{n}")),
    }
}

pub(super) struct Writer {
    dir: PathBuf,
    rotation: Rotation,
    file: Option<File>,
    size: u64,
    hooks: Webhooks,
    metrics: Arc<Metrics>,
    /// When the last write error was logged (a full disk would log every batch).
    last_error: Option<Instant>,
}

fn open(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(crate::fsutil::PRIVATE)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
}

fn ends_with_newline(path: &Path, size: u64) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = crate::fsutil::open_nofollow(path)?;
    f.seek(SeekFrom::Start(size - 1))?;
    let mut last = [0u8];
    f.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

impl Writer {
    /// Opens (or creates) the current file, so a state directory the proxy cannot
    /// write fails the start rather than every event.
    pub(super) fn open(
        dir: &Path,
        rotation: Rotation,
        hooks: Webhooks,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let mut file = open(&path_of(dir, 0))?;
        let mut size = file.metadata()?.len();
        if size > 0 && !ends_with_newline(&path_of(dir, 0), size)? {
            // A crash tore the last line: the next one starts on a line of its own.
            file.write_all(b"\n")?;
            size += 1;
        }
        for outcome in ["written", "dropped", "failed"] {
            metrics.audit_lines_total.with_label_values(&[outcome]);
        }
        Ok(Self {
            dir: dir.to_owned(),
            rotation,
            file: Some(file),
            size,
            hooks,
            metrics,
            last_error: None,
        })
    }

    /// Serves the queue until every sender is gone.
    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let mut events: Vec<Box<Event>> = Vec::new();
        let mut syncs: Vec<oneshot::Sender<()>> = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Event(e) => events.push(e),
                    Msg::Sync(tx) => syncs.push(tx),
                }
                if events.len() < BATCH {
                    next = rx.try_recv().ok();
                }
            }
            self.write(&events);
            for event in events.drain(..) {
                self.hooks.dispatch(&event);
            }
            for tx in syncs.drain(..) {
                let _ = tx.send(());
            }
        }
    }

    fn write(&mut self, events: &[Box<Event>]) {
        if events.is_empty() {
            return;
        }
        let mut buf = Vec::new();
        let mut lines = 0u64;
        for event in events {
            let mut line = match serde_json::to_vec(event) {
                Ok(l) => l,
                Err(e) => {
                    self.failed(1, &e);
                    continue;
                }
            };
            line.push(b'\n');
            let len = line.len() as u64;
            if self.size + buf.len() as u64 + len > self.rotation.max_bytes
                && self.size + buf.len() as u64 > 0
            {
                let n = lines;
                if let Err(e) = self.append(&buf).and_then(|()| self.rotate()) {
                    self.failed(n, &e);
                } else {
                    self.written(n);
                }
                buf.clear();
                lines = 0;
            }
            buf.extend_from_slice(&line);
            lines += 1;
        }
        match self.append(&buf) {
            Ok(()) => self.written(lines),
            Err(e) => self.failed(lines, &e),
        }
    }

    /// Appends and fsyncs.
    fn append(&mut self, buf: &[u8]) -> std::io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        if self.file.is_none() {
            let file = open(&path_of(&self.dir, 0))?;
            self.size = file.metadata()?.len();
            self.file = Some(file);
        }
        let file = self.file.as_mut().expect("opened above");
        let result = file.write_all(buf).and_then(|()| file.sync_data());
        match &result {
            Ok(()) => self.size += buf.len() as u64,
            // A partial write may have left part of a line: start the next batch
            // on a fresh line, and reopen the file (it may have been replaced).
            Err(_) => {
                let _ = file.write_all(b"\n");
                self.file = None;
            }
        }
        result
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.file = None;
        for n in (1..self.rotation.keep).rev() {
            let from = path_of(&self.dir, n);
            if from.exists() {
                std::fs::rename(&from, path_of(&self.dir, n + 1))?;
            }
        }
        if self.rotation.keep == 0 {
            std::fs::remove_file(path_of(&self.dir, 0))?;
        } else {
            std::fs::rename(path_of(&self.dir, 0), path_of(&self.dir, 1))?;
        }
        let file = open(&path_of(&self.dir, 0))?;
        crate::fsutil::sync_dir(&self.dir)?;
        self.file = Some(file);
        self.size = 0;
        Ok(())
    }

    fn written(&self, lines: u64) {
        self.metrics
            .audit_lines_total
            .with_label_values(&["written"])
            .inc_by(lines);
    }

    fn failed(&mut self, lines: u64, err: &dyn std::fmt::Display) {
        self.metrics
            .audit_lines_total
            .with_label_values(&["failed"])
            .inc_by(lines);
        let quiet = self
            .last_error
            .is_some_and(|t| t.elapsed() < Duration::from_secs(60));
        if !quiet {
            self.last_error = Some(Instant::now());
            error!(error = %err, lines, "cannot write the audit trail; events lost");
        }
    }
}
