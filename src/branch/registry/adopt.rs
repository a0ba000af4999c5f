//! After a restart: re-adopting recorded branches, settling creations a crash
//! interrupted, and reporting what no record explains (orphans).
//!
//! Invariant: an orphan is reported, never deleted: the proxy cannot prove it made it.

use std::collections::HashSet;

use serde::Serialize;
use tracing::{info, warn};

use super::state::State;
use super::Registry;
use crate::branch::engine::Recovered;
use crate::branch::store::{BranchRecord, RecordState};

/// Something found on disk or on a server that no live record explains. Reported,
/// never deleted: the proxy cannot prove it made it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Orphan {
    pub source: Option<String>,
    pub location: String,
    pub reason: String,
}

impl Registry {
    pub fn orphans(&self) -> Vec<Orphan> {
        self.orphans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-adopts every recorded branch after a start, settles interrupted creations,
    /// and reports what no record explains. Errors reaching a server are logged; the
    /// records stay and are trusted.
    pub async fn adopt(&self) -> std::io::Result<()> {
        let (records, unreadable) = self.store.load_all()?;
        let mut orphans: Vec<Orphan> = unreadable
            .into_iter()
            .map(|(path, why)| {
                warn!(path = %path.display(), reason = %why, "unreadable branch record left in place");
                Orphan {
                    source: None,
                    location: path.display().to_string(),
                    reason: format!("unreadable record: {why}"),
                }
            })
            .collect();
        let mut adopted = Vec::new();
        for rec in records {
            if let Some(found) = self.settle(rec, &mut orphans).await? {
                adopted.push(found);
            }
        }
        let known: HashSet<(String, String)> = adopted
            .iter()
            .map(|(r, _)| (r.source.to_string(), r.clone_name.clone()))
            .collect();
        self.find_strays(&known, &mut orphans).await;
        let n = adopted.len();
        let mut book = self.lock();
        for (rec, running) in adopted {
            let state = if running {
                State::Ready
            } else {
                State::Suspended
            };
            let last_active = rec.last_active;
            let branch = self.branch(state, rec, last_active);
            book.branches.insert(branch.record.id(), branch);
        }
        drop(book);
        info!(branches = n, orphans = orphans.len(), "branches adopted");
        *self.orphans.lock().unwrap_or_else(|p| p.into_inner()) = orphans;
        Ok(())
    }

    /// One record: kept (with whether its server runs) or settled away.
    async fn settle(
        &self,
        mut rec: BranchRecord,
        orphans: &mut Vec<Orphan>,
    ) -> std::io::Result<Option<(BranchRecord, bool)>> {
        let id = rec.id();
        let Some(source) = self.sources.get(&rec.source) else {
            warn!(branch = %id, "record of a source no longer configured; left in place");
            orphans.push(Orphan {
                source: Some(rec.source.to_string()),
                location: rec.clone_name.clone(),
                reason: "source is no longer configured".into(),
            });
            return Ok(None);
        };
        let keep = match rec.state {
            RecordState::Provisioning => match source.engine.recover(&rec).await {
                Ok(Recovered::Complete {
                    snapshot,
                    copy_mode,
                }) => {
                    info!(branch = %id, "finished a creation interrupted by a restart");
                    rec.state = RecordState::Ready;
                    rec.snapshot = snapshot.or(rec.snapshot.take());
                    rec.copy_mode = copy_mode.or(rec.copy_mode);
                    self.store.save(&rec)?;
                    true
                }
                Ok(Recovered::Absent) => {
                    info!(branch = %id, "dropping the record of a creation that never finished");
                    self.store.remove(&id)?;
                    false
                }
                Err(e) => {
                    warn!(branch = %id, error = %e, "cannot settle an interrupted creation; record left in place");
                    orphans.push(Orphan {
                        source: Some(rec.source.to_string()),
                        location: rec.clone_name.clone(),
                        reason: format!("interrupted creation not settled: {e}"),
                    });
                    false
                }
            },
            RecordState::Ready => match source.engine.exists(&rec).await {
                Ok(true) => true,
                Ok(false) => {
                    warn!(branch = %id, clone = %rec.clone_name, "clone vanished outside the proxy; forgetting it");
                    self.store.remove(&id)?;
                    false
                }
                Err(e) => {
                    warn!(branch = %id, error = %e, "cannot check clone; keeping its record");
                    true
                }
            },
        };
        if !keep {
            return Ok(None);
        }
        // A server a killed proxy left running is reused; otherwise the branch
        // waits, suspended, for its next connection.
        let running = match source.engine.servers() {
            Some(servers) => match servers.running(&rec).await {
                Ok(r) => r,
                Err(e) => {
                    warn!(branch = %id, error = %e, "cannot tell whether the branch's server runs; treating it as suspended");
                    false
                }
            },
            None => true,
        };
        Ok(Some((rec, running)))
    }

    /// Reports what the engines hold that no adopted record explains: entries in
    /// their storage, and marked clones without a record (e.g. records deleted by
    /// hand).
    async fn find_strays(&self, known: &HashSet<(String, String)>, orphans: &mut Vec<Orphan>) {
        for src in self.sources.values() {
            for (location, reason) in src.engine.strays().await {
                warn!(source = %src.name, location = %location, reason = %reason, "unexplained entry in the engine's storage; left in place");
                orphans.push(Orphan {
                    source: Some(src.name.to_string()),
                    location,
                    reason,
                });
            }
            match src.engine.list_marked().await {
                Ok(marked) => {
                    for (clone, owner) in marked {
                        let owner_source = owner.split('/').next().unwrap_or_default();
                        if owner_source == src.name.as_str()
                            && !known.contains(&(src.name.to_string(), clone.clone()))
                        {
                            warn!(source = %src.name, clone = %clone, "marked clone without a record; left in place");
                            orphans.push(Orphan {
                                source: Some(src.name.to_string()),
                                location: clone,
                                reason: format!("marked as {owner} but has no record"),
                            });
                        }
                    }
                }
                Err(e) => warn!(source = %src.name, error = %e, "cannot list clones on the server"),
            }
        }
    }
}
