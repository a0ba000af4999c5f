//! Warm spares (`warm_spares = N`): clones of the newest snapshot kept copied and
//! started under `spares/`, so the first connection to a new branch takes one
//! ready-made instead of waiting for a copy and a server start.
//!
//! A claim renames the spare's socket directory and then its directory into the
//! branch's (after writing the branch's `branch.json` into it); the server keeps
//! running through both renames, because it works relative to its data directory
//! and clients find its socket by path. The pool is filled by one background task
//! per source ([`InstanceEngine::run_spares`]): after start, after each claim and
//! after each new snapshot, when spares of an older snapshot are removed.
//!
//! A spare's server may also hold client sessions opened ahead of its first client
//! ([`SpareSessions`], the proxy's pool of kept server sessions): the engine tells
//! it when a spare is up (before it can be claimed), when one becomes a branch,
//! and before a spare's server stops.
//!
//! Invariant: a spare is never handed out twice (it leaves the ready list under its
//! lock before anything else happens to it), never handed out for another snapshot
//! than the one a branch asks for, and never shown as a branch: it lives outside
//! `branches/`, so records, orphans, quotas, sizes and snapshot users never see it.

use std::fs;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus::{IntCounter, IntGauge};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::layout::{BranchMeta, SpareMeta, BRANCH_META, SPARE_META, STAGING_PREFIX};
use super::postmaster;
use super::privileged::remove_tree;
use super::{create_clone_dir, InstanceEngine};
use crate::branch::engine::CopyMode;
use crate::branch::engine::ServerAddr;
use crate::branch::store::{unix_ms, BranchRecord};
use crate::error::EngineError;
use crate::fsutil::{read_json, sync_dir, write_json_atomic};
use crate::metrics::Metrics;
use crate::names::{BranchId, SourceName};

/// How often the pool is looked at when nothing wakes it: a failed fill is tried
/// again after this long.
const RETRY: Duration = Duration::from_secs(30);

/// How long the refill waits after a claim: the claiming client's first queries
/// go first, instead of competing with a copy and a server start for the CPU.
const SETTLE: Duration = Duration::from_secs(1);

/// The longest a spare's warm-up session may take.
const WARM_UP: Duration = Duration::from_secs(10);

/// What keeps client sessions open on warm spares, so that the first client of a
/// claimed spare need not wait for a new server backend.
#[async_trait::async_trait]
pub trait SpareSessions: Send + Sync {
    /// Spare `spare` of `source` is up at `addr` and about to be offered: opens
    /// the sessions wanted on it. Its server keeps running until [`Self::dropped`]
    /// or [`Self::claimed`]. True when a session is open on it now.
    async fn ready(&self, source: &SourceName, spare: &str, addr: ServerAddr) -> bool;
    /// Spare `spare` became branch `id`, whose server is reached at `addr` now.
    fn claimed(&self, spare: &str, id: &BranchId, addr: &ServerAddr);
    /// Spare `spare`'s server is about to stop: closes its sessions.
    fn dropped(&self, spare: &str);
}

/// One spare, started and ready to be claimed.
#[derive(Debug, Clone)]
pub(super) struct Spare {
    id: String,
    snapshot: String,
    copy_mode: Option<CopyMode>,
}

/// The pool of one source.
pub(super) struct Spares {
    /// `warm_spares`.
    want: usize,
    ready: std::sync::Mutex<Vec<Spare>>,
    /// Wakes the filling task: a claim, a new snapshot.
    wake: Notify,
    counters: Option<Counters>,
    /// Told about spares' servers (set once, by the proxy).
    sessions: OnceLock<Arc<dyn SpareSessions>>,
}

/// `offshoot_spares_ready` and `offshoot_spare_claims_total` of one source.
struct Counters {
    ready: IntGauge,
    hit: IntCounter,
    miss: IntCounter,
}

impl Spares {
    pub fn new(want: u32) -> Self {
        Self {
            want: want as usize,
            ready: Default::default(),
            wake: Notify::new(),
            counters: None,
            sessions: OnceLock::new(),
        }
    }

    pub fn with_metrics(mut self, metrics: &Metrics, source: &str) -> Self {
        if self.want > 0 {
            let claims = |o| metrics.spare_claims_total.with_label_values(&[source, o]);
            self.counters = Some(Counters {
                ready: metrics.spares_ready.with_label_values(&[source]),
                hit: claims("hit"),
                miss: claims("miss"),
            });
        }
        self
    }

    fn list(&self) -> std::sync::MutexGuard<'_, Vec<Spare>> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, ready: usize) {
        if let Some(c) = &self.counters {
            c.ready.set(ready as i64);
        }
    }

    /// Takes a ready spare of `snapshot` out of the pool; counts a hit or a miss.
    fn claim(&self, snapshot: &str) -> Option<Spare> {
        if self.want == 0 {
            return None;
        }
        let taken = {
            let mut list = self.list();
            let taken = list
                .iter()
                .position(|s| s.snapshot == snapshot)
                .map(|i| list.remove(i));
            self.publish(list.len());
            taken
        };
        if let Some(c) = &self.counters {
            match taken {
                Some(_) => c.hit.inc(),
                None => c.miss.inc(),
            }
        }
        self.wake.notify_one();
        taken
    }

    /// Takes every ready spare `pick` selects out of the pool.
    fn take_where(&self, pick: impl Fn(&Spare) -> bool) -> Vec<Spare> {
        let mut list = self.list();
        let (taken, kept) = list.drain(..).partition(|s| pick(s));
        *list = kept;
        self.publish(list.len());
        taken
    }

    fn add(&self, spare: Spare) {
        let mut list = self.list();
        list.push(spare);
        self.publish(list.len());
    }

    fn count(&self) -> usize {
        self.list().len()
    }

    /// Wakes the filling task (after a new snapshot).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    fn sessions(&self) -> Option<&Arc<dyn SpareSessions>> {
        self.sessions.get()
    }
}

fn new_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl InstanceEngine {
    /// Sets what keeps sessions open on this source's spares; call before
    /// [`Self::run_spares`]. Set once.
    pub fn keep_spare_sessions(&self, sessions: Arc<dyn SpareSessions>) {
        let _ = self.spares.sessions.set(sessions);
    }

    fn spare_addr(&self, id: &str) -> ServerAddr {
        ServerAddr::Unix(postmaster::socket_path(&self.layout.spare_socket_dir(id)))
    }

    /// Offers spare `id`'s server to [`SpareSessions`], if any; true when a
    /// session was opened on it.
    async fn announce_spare(&self, id: &str) -> bool {
        match self.spares.sessions() {
            Some(s) => s.ready(&self.source, id, self.spare_addr(id)).await,
            None => false,
        }
    }

    /// Makes the clone of `rec` from a ready spare of `snapshot`, if there is one:
    /// `Ok(None)` when there is none, and also when the spare could not be taken
    /// (it is removed; the caller makes the clone by copying).
    pub(super) async fn claim_spare(&self, rec: &BranchRecord, snapshot: &str) -> Option<CopyMode> {
        let spare = self.spares.claim(snapshot)?;
        match self.rename_spare(rec, &spare) {
            Ok(()) => {
                if let Some(s) = self.spares.sessions() {
                    s.claimed(&spare.id, &rec.id(), &self.endpoint_addr(rec));
                }
                info!(branch = %rec.id(), snapshot, spare = %spare.id, "warm spare claimed");
                Some(spare.copy_mode.unwrap_or(CopyMode::Reflink))
            }
            Err(e) => {
                warn!(branch = %rec.id(), spare = %spare.id, error = %e,
                      "cannot claim a warm spare; copying instead");
                self.discard_spare(&spare.id).await;
                None
            }
        }
    }

    /// The claim proper: the spare becomes `rec`'s, the last step being the rename
    /// of its directory (until then a crash leaves a spare that is removed at start).
    fn rename_spare(&self, rec: &BranchRecord, spare: &Spare) -> std::io::Result<()> {
        let from = self.layout.spare_dir(&spare.id);
        let to = self.layout.branch_dir(rec);
        let meta = BranchMeta {
            source: rec.source.to_string(),
            branch: rec.branch.to_string(),
            snapshot: spare.snapshot.clone(),
            complete: true,
            copy_mode: spare.copy_mode,
            created_at: unix_ms(self.clock.now()),
        };
        write_json_atomic(&from.join(BRANCH_META), &meta)?;
        let socket_dir = self.layout.socket_dir(rec);
        remove_tree(&socket_dir)?;
        fs::rename(self.layout.spare_socket_dir(&spare.id), &socket_dir)?;
        fs::rename(&from, &to)?;
        sync_dir(&self.layout.branches())?;
        sync_dir(&self.layout.spares())?;
        // Only a leftover now: the directory is named by its branch.json.
        if let Err(e) = fs::remove_file(to.join(SPARE_META)) {
            warn!(dir = %to.display(), error = %e, "cannot remove a claimed spare's spare.json");
        }
        Ok(())
    }

    /// Stops a spare's server and removes it.
    async fn discard_spare(&self, id: &str) {
        if !self.stop_spare(id).await {
            return;
        }
        let (dir, socket_dir) = (self.layout.spare_dir(id), self.layout.spare_socket_dir(id));
        for path in [&dir, &socket_dir] {
            if let Err(e) = remove_tree(path) {
                warn!(dir = %path.display(), error = %e, "cannot remove a warm spare");
            }
        }
    }

    /// Copies `snapshot` into a new spare and starts its server. The caller holds
    /// the snapshot lock (shared). On error nothing is left behind.
    async fn make_spare(&self, snapshot: &str) -> Result<Spare, EngineError> {
        let id = new_id();
        let staging = self.layout.spare_staging_dir(&id);
        let made = self.copy_spare(&staging, snapshot).await;
        let made = match made {
            Ok(mode) => fs::rename(&staging, self.layout.spare_dir(&id))
                .map(|()| mode)
                .map_err(|e| EngineError::io("could not make a warm spare", e)),
            Err(e) => Err(e),
        };
        let copy_mode = match made {
            Ok(mode) => mode,
            Err(e) => {
                if let Err(rm) = remove_tree(&staging) {
                    warn!(dir = %staging.display(), error = %rm, "cannot remove a failed spare");
                }
                return Err(e);
            }
        };
        if let Err(e) = self.start_spare(&id).await {
            self.discard_spare(&id).await;
            return Err(e);
        }
        // A session opened ahead on the spare has done what the warm-up does.
        if !self.announce_spare(&id).await {
            self.warm_up(&id).await;
        }
        Ok(Spare {
            id,
            snapshot: snapshot.to_owned(),
            copy_mode: Some(copy_mode),
        })
    }

    async fn copy_spare(
        &self,
        dir: &std::path::Path,
        snapshot: &str,
    ) -> Result<CopyMode, EngineError> {
        let io = |e| EngineError::io("could not make a warm spare", e);
        fs::create_dir_all(self.layout.spares()).map_err(io)?;
        create_clone_dir(dir).map_err(io)?;
        let mut meta = SpareMeta {
            source: self.source.to_string(),
            snapshot: snapshot.to_owned(),
            complete: false,
            copy_mode: None,
            created_at: unix_ms(self.clock.now()),
        };
        let meta_path = dir.join(SPARE_META);
        write_json_atomic(&meta_path, &meta).map_err(io)?;
        let mode = self.copy_snapshot_data(snapshot, dir, io).await?;
        meta.complete = true;
        meta.copy_mode = Some(mode);
        write_json_atomic(&meta_path, &meta).map_err(io)?;
        Ok(mode)
    }

    /// Starts (or finds running) the server of spare `id`. Until it is claimed it
    /// shows as `offshoot/<source>/spare`.
    async fn start_spare(&self, id: &str) -> Result<(), EngineError> {
        let dir = self.layout.spare_dir(id);
        let socket_dir = self.layout.spare_socket_dir(id);
        let settings = self.settings(
            &socket_dir,
            &format!("offshoot/{}/spare", self.source),
            true,
        );
        let (data, log) = (dir.join("data"), dir.join("postgres.log"));
        self.server(&data, &socket_dir, &log, &settings)
            .start()
            .await
    }

    /// Opens and ends one session on a new spare's server, so the first client's
    /// session does not pay for what a server's first session builds (the
    /// relation cache's init files). Best effort: a spare that refuses it (its
    /// roles need a password the proxy does not have) is kept as it is.
    async fn warm_up(&self, id: &str) {
        let config = self.local_config(&self.layout.spare_socket_dir(id), "offshoot warm spare");
        let session = async {
            let (client, conn) = config.connect(tokio_postgres::NoTls).await?;
            let conn = tokio::spawn(conn);
            client.simple_query("SELECT 1").await?;
            drop(client);
            let _ = conn.await;
            Ok::<_, tokio_postgres::Error>(())
        };
        match tokio::time::timeout(WARM_UP, session).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!(spare = id, error = %e, "no warm-up session on a warm spare"),
            Err(_) => debug!(spare = id, "the warm-up session of a warm spare timed out"),
        }
    }

    /// One step of the filling task: removes spares of any snapshot but the newest,
    /// then makes spares until `warm_spares` are ready. Returns how many it made.
    pub async fn refill_spares(&self, shutdown: &CancellationToken) -> Result<usize, EngineError> {
        let mut made = 0;
        loop {
            if shutdown.is_cancelled() {
                return Ok(made);
            }
            let guard = self.snapshot_lock.read().await;
            let Some(newest) = self.layout.snapshot_metas().pop().map(|m| m.name) else {
                // No snapshot yet: the first branch takes one, and wakes the pool.
                return Ok(made);
            };
            let stale = self.spares.take_where(|s| s.snapshot != newest);
            if !stale.is_empty() {
                drop(guard);
                for s in stale {
                    info!(source = %self.source, spare = %s.id, snapshot = %s.snapshot,
                          "removing a warm spare of an older snapshot");
                    self.discard_spare(&s.id).await;
                }
                continue;
            }
            if self.spares.count() >= self.spares.want {
                return Ok(made);
            }
            let started = self.clock.instant();
            let spare = self.make_spare(&newest).await?;
            drop(guard);
            info!(source = %self.source, spare = %spare.id, snapshot = %newest,
                  ms = started.elapsed().as_millis() as u64, "warm spare ready");
            self.spares.add(spare);
            made += 1;
        }
    }

    /// After a start: the spares on disk are taken back into the pool when they are
    /// complete, of the newest snapshot and wanted; every other one (of an older
    /// snapshot, interrupted while being made or claimed) is stopped and removed.
    async fn recognise_spares(&self) {
        let Ok(entries) = fs::read_dir(self.layout.spares()) else {
            return;
        };
        let newest = self.layout.snapshot_metas().pop().map(|m| m.name);
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            let Some(meta) = read_json::<SpareMeta>(&path.join(SPARE_META))
                .filter(|m| m.source == self.source.as_str())
            else {
                continue; // not ours: reported by `strays`, never removed
            };
            if let Some(id) = name.strip_prefix(STAGING_PREFIX) {
                info!(
                    spare = id,
                    "removing a warm spare whose making was interrupted"
                );
                if let Err(err) = remove_tree(&path) {
                    warn!(dir = %path.display(), error = %err, "cannot remove a warm spare");
                }
                continue;
            }
            let usable = meta.complete
                && !path.join(BRANCH_META).exists()
                && newest.as_deref() == Some(meta.snapshot.as_str())
                && self.spares.count() < self.spares.want;
            if usable {
                match self.start_spare(&name).await {
                    Ok(()) => {
                        info!(source = %self.source, spare = %name, "warm spare found after a restart; kept");
                        self.announce_spare(&name).await;
                        self.spares.add(Spare {
                            id: name,
                            snapshot: meta.snapshot,
                            copy_mode: meta.copy_mode,
                        });
                        continue;
                    }
                    Err(e) => {
                        warn!(spare = %name, error = %e, "a warm spare's server does not start")
                    }
                }
            }
            info!(source = %self.source, spare = %name, "removing a warm spare left from before a restart");
            self.discard_spare(&name).await;
        }
    }

    /// Removes the ready spares of `snapshot` (before it is deleted). The caller
    /// holds the snapshot lock exclusively, so none is being made.
    pub(super) async fn recycle_spares_of(&self, snapshot: &str) {
        for s in self.spares.take_where(|s| s.snapshot == snapshot) {
            self.discard_spare(&s.id).await;
        }
    }

    /// The filling task of this source's pool, until `shutdown`. Spares found on
    /// disk are recognised first (and removed when the source wants none).
    pub async fn run_spares(self: Arc<Self>, shutdown: CancellationToken) {
        self.recognise_spares().await;
        if self.spares.want == 0 {
            return;
        }
        loop {
            if let Err(e) = self.refill_spares(&shutdown).await {
                warn!(source = %self.source, error = %e, "cannot make a warm spare; trying again later");
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.spares.wake.notified() => {}
                () = tokio::time::sleep(RETRY) => {}
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(SETTLE) => {}
            }
        }
    }

    /// Stops the servers of the ready spares (on shutdown; their data stays, and the
    /// next start takes them back). Call after the filling task has ended.
    pub async fn stop_spares(&self) {
        for s in self.spares.take_where(|_| true) {
            self.stop_spare(&s.id).await;
        }
    }

    /// Closes the sessions opened on spare `id` ([`SpareSessions::dropped`]), then
    /// stops its server; false (logged) when the server could not be stopped.
    async fn stop_spare(&self, id: &str) -> bool {
        if let Some(s) = self.spares.sessions() {
            s.dropped(id);
        }
        let data = self.layout.spare_dir(id).join("data");
        match postmaster::stop(&data, &self.layout.spare_socket_dir(id)).await {
            Ok(()) => true,
            Err(e) => {
                warn!(spare = id, error = %e, "cannot stop a warm spare's server");
                false
            }
        }
    }
}
