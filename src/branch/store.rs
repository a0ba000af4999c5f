//! Durable branch records: one JSON file per branch under `<state.dir>/branches`.
//!
//! A record is written before a clone is created (state `provisioning`), rewritten when
//! the clone is ready, and removed only after the clone is gone. Files are replaced
//! atomically (write, fsync, rename), so a crash leaves either the old or the new record,
//! and a restart can tell a finished clone from an interrupted one.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::config::EngineKind;
use crate::names::{BranchId, BranchName, SourceName};

/// Where a record says its clone is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordState {
    /// Creation started; the clone may or may not exist.
    Provisioning,
    /// The clone exists and is complete.
    Ready,
}

/// What survives a restart about one branch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchRecord {
    pub source: SourceName,
    pub branch: BranchName,
    pub engine: EngineKind,
    /// The engine's name for the clone (the database name for the `database` engine).
    pub clone_name: String,
    pub state: RecordState,
    /// Unix milliseconds.
    pub created_at: u64,
    /// Unix milliseconds of the last connect or disconnect.
    pub last_active: u64,
    /// Never expires, whatever the source's `persistent` list says.
    #[serde(default)]
    pub persistent: bool,
    /// The role whose connection made the branch (per-role quotas); `None` when it
    /// was made through the API or without authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// The snapshot the clone was made from (engines with snapshots). Before the
    /// creation it is the one asked for, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// How the clone's files were made (`reflink` or `copy`), when the engine copies
    /// files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_mode: Option<CopyMode>,
    /// Unix milliseconds of the creation or the last reset: where `max_lifetime`
    /// counts from. Unset (records written before resets existed): `created_at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub born_at: Option<u64>,
    /// Unix milliseconds at which the branch is removed, set by a TTL; it replaces
    /// the idle and lifetime deadlines of its policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// Set through the API: overrides the policy's `protected`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protected: Option<bool>,
    /// Unix milliseconds at which the protection ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protected_until: Option<u64>,
}

impl BranchRecord {
    pub fn id(&self) -> BranchId {
        BranchId {
            source: self.source.clone(),
            branch: self.branch.clone(),
        }
    }

    /// When the branch's lifetime started: its creation or its last reset.
    pub fn born_at(&self) -> u64 {
        self.born_at.unwrap_or(self.created_at)
    }

    /// Restarts the lifetime clock (a reset made the branch again at `now_ms`).
    pub fn reborn(&mut self, now_ms: u64) {
        self.born_at = Some(now_ms);
    }
}

/// How a clone's files were made: by the proxy (`instance` engine) or by the
/// server's `CREATE DATABASE` (`database` engine).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum CopyMode {
    /// Copy-on-write clones: no data is copied until one side writes.
    Reflink,
    /// Every byte copied (the filesystem has no reflinks).
    Copy,
    /// `STRATEGY FILE_COPY` with `file_copy_method = clone` (PostgreSQL 18+): the
    /// server clones files, copy-on-write where its filesystem can.
    FileClone,
    /// `STRATEGY FILE_COPY`: the server copies every file.
    FileCopy,
    /// `STRATEGY WAL_LOG`: the server copies block by block through the WAL.
    WalLog,
    /// Before PostgreSQL 15: the server's only way (a file copy).
    ServerDefault,
}

impl CopyMode {
    /// The name records, the API and the metric label use.
    pub fn as_str(self) -> &'static str {
        match self {
            CopyMode::Reflink => "reflink",
            CopyMode::Copy => "copy",
            CopyMode::FileClone => "file_clone",
            CopyMode::FileCopy => "file_copy",
            CopyMode::WalLog => "wal_log",
            CopyMode::ServerDefault => "server_default",
        }
    }
}

/// Milliseconds since the Unix epoch (the clock's own conversion).
pub use crate::clock::unix_ms;

/// A record file that could not be used, and why.
pub type Unreadable = (PathBuf, String);

/// The directory of records.
///
/// Writes go one at a time, in the order they take the store's write lock. A
/// caller that copies records under the registry lock and writes them after
/// releasing it takes a [`Writer`] before releasing it, so a later change (saved
/// under the registry lock) or removal can never be overwritten by the older copy.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    writes: Arc<Mutex<()>>,
}

/// The store's write lock, held: saves through it come before any save or removal
/// that asks for the lock after it was taken.
pub struct Writer<'a> {
    store: &'a Store,
    _turn: MutexGuard<'a, ()>,
}

impl Writer<'_> {
    /// Writes `rec` atomically.
    pub fn save(&self, rec: &BranchRecord) -> std::io::Result<()> {
        self.store.write(rec)
    }
}

impl Store {
    /// Opens (creating if needed) the record directory below `state_dir`.
    pub fn open(state_dir: &Path) -> std::io::Result<Self> {
        let root = state_dir.join("branches");
        fs::create_dir_all(&root)?;
        Ok(Self {
            root,
            writes: Arc::default(),
        })
    }

    /// Takes the write lock (see [`Writer`]).
    pub fn writer(&self) -> Writer<'_> {
        Writer {
            store: self,
            _turn: self.writes.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }

    fn path(&self, id: &BranchId) -> PathBuf {
        self.root
            .join(id.source.as_str())
            .join(format!("{}.json", id.branch))
    }

    /// Writes `rec` atomically.
    pub fn save(&self, rec: &BranchRecord) -> std::io::Result<()> {
        self.writer().save(rec)
    }

    fn write(&self, rec: &BranchRecord) -> std::io::Result<()> {
        let path = self.path(&rec.id());
        let dir = path.parent().expect("record path has a parent");
        fs::create_dir_all(dir)?;
        crate::fsutil::write_json_atomic(&path, rec)
    }

    /// Removes the record of `id`; a missing record is not an error.
    pub fn remove(&self, id: &BranchId) -> std::io::Result<()> {
        let _turn = self.writer();
        match fs::remove_file(self.path(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every readable record, plus the files that could not be read (reported, never
    /// deleted).
    pub fn load_all(&self) -> std::io::Result<(Vec<BranchRecord>, Vec<Unreadable>)> {
        let mut records = Vec::new();
        let mut unreadable = Vec::new();
        for source_dir in fs::read_dir(&self.root)? {
            let source_dir = source_dir?.path();
            if !source_dir.is_dir() {
                continue;
            }
            for file in fs::read_dir(&source_dir)? {
                let path = file?.path();
                if path.extension().and_then(|e| e.to_str()) != Some("json") {
                    continue;
                }
                let parsed = fs::read(&path).map_err(|e| e.to_string()).and_then(|b| {
                    serde_json::from_slice::<BranchRecord>(&b).map_err(|e| e.to_string())
                });
                match parsed {
                    Ok(rec) if self.path(&rec.id()) == path => records.push(rec),
                    Ok(_) => unreadable.push((path, "record does not match its file name".into())),
                    Err(e) => unreadable.push((path, e)),
                }
            }
        }
        records.sort_by(|a, b| (&a.source, &a.branch).cmp(&(&b.source, &b.branch)));
        Ok((records, unreadable))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(branch: &str) -> BranchRecord {
        BranchRecord {
            source: SourceName::new("shop").unwrap(),
            branch: BranchName::new(branch).unwrap(),
            engine: EngineKind::Database,
            clone_name: format!("shop__{branch}"),
            state: RecordState::Ready,
            created_at: 1,
            last_active: 2,
            persistent: false,
            created_by: None,
            snapshot: None,
            copy_mode: None,
            born_at: None,
            expires_at: None,
            protected: None,
            protected_until: None,
        }
    }

    #[test]
    fn saves_at_once_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..100 {
                        store.save(&rec("a")).unwrap();
                    }
                });
            }
        });
        assert_eq!(store.load_all().unwrap(), (vec![rec("a")], vec![]));
    }

    #[test]
    fn a_removal_asked_for_while_a_writer_is_held_comes_after_its_saves() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.save(&rec("a")).unwrap();
        let writer = store.writer();
        std::thread::scope(|s| {
            let removal = s.spawn(|| store.remove(&rec("a").id()).unwrap());
            // The removal waits for the writer, however long it is held.
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(!removal.is_finished());
            writer.save(&rec("a")).unwrap();
            drop(writer);
        });
        assert_eq!(store.load_all().unwrap().0, vec![]);
    }

    #[test]
    fn save_load_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.save(&rec("a")).unwrap();
        let mut b = rec("b");
        b.state = RecordState::Provisioning;
        store.save(&b).unwrap();
        store.save(&b).unwrap();
        fs::write(dir.path().join("branches/shop/junk.json"), b"{").unwrap();
        let (all, bad) = store.load_all().unwrap();
        assert_eq!(all, vec![rec("a"), b.clone()]);
        assert_eq!(bad.len(), 1);
        store.remove(&b.id()).unwrap();
        store.remove(&b.id()).unwrap();
        assert_eq!(store.load_all().unwrap().0, vec![rec("a")]);
    }

    #[test]
    fn lifecycle_fields_survive_a_restart_and_old_records_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut r = rec("pr-1");
        assert_eq!(
            r.born_at(),
            1,
            "without a reset, the lifetime starts at creation"
        );
        r.reborn(50);
        r.expires_at = Some(100);
        r.protected = Some(true);
        r.protected_until = Some(200);
        store.save(&r).unwrap();
        assert_eq!(store.load_all().unwrap().0, vec![r.clone()]);
        assert_eq!(r.born_at(), 50);

        let old = r#"{"source":"shop","branch":"old","engine":"database","clone_name":"c",
            "state":"ready","created_at":7,"last_active":8}"#;
        fs::write(dir.path().join("branches/shop/old.json"), old).unwrap();
        let (all, bad) = store.load_all().unwrap();
        assert!(bad.is_empty(), "{bad:?}");
        let old = all.iter().find(|r| r.branch.as_str() == "old").unwrap();
        assert_eq!(
            (old.born_at(), old.expires_at, old.protected),
            (7, None, None)
        );
    }
}
