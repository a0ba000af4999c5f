//! Where an `instance` source keeps things on disk, and the metadata that proves a
//! directory is the proxy's.
//!
//! ```text
//! snapshots/<name>/                the proxy's (0711), like a branch directory
//! snapshots/<name>/data            a sealed data directory (shut down cleanly)
//! snapshots/<name>/snapshot.json   its metadata; a snapshot exists once this does
//! snapshots/.partial-<name>/       a snapshot being taken (removed if interrupted)
//! snapshots/.deleting-<name>/      a snapshot being deleted (removal finished later)
//! branches/.new-<branch>/          a clone being made: branch.json first, then the
//!                                  copy; renamed to branches/<branch> once complete
//! branches/<branch>/               the proxy's (0711): the server's user passes through
//! branches/<branch>/branch.json    ownership and provenance
//! branches/<branch>/data           the clone: the only part the server's user owns
//! branches/<branch>/postgres.log   the server's log since its last start (the proxy's)
//! run/<hash>/                      the server's private socket directory (0700)
//! spares/.new-<id>/                a warm spare being made (removed if interrupted)
//! spares/<id>/                     a warm spare: spare.json, data, postgres.log;
//!                                  renamed to branches/<branch> when claimed
//! run/spare-<id>/                  a spare server's socket directory; renamed to
//!                                  run/<hash> with it
//! ```
//!
//! Spares live apart from `branches/`, so no spare name can clash with a branch
//! name and nothing that lists branches (records, orphans, snapshot users) sees
//! them.
//!
//! `<hash>` is the first 128 bits of SHA-256 of `source/branch`, in hex: short
//! enough for a Unix socket path, and no two branches share a socket directory
//! (a 64-bit non-cryptographic hash could be made to collide offline).

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::privileged::remove_tree;
use crate::branch::engine::CopyMode;
use crate::branch::store::BranchRecord;
use crate::fsutil::{read_json, temp_path};

pub(super) const PARTIAL_PREFIX: &str = ".partial-";
pub(super) const DELETING_PREFIX: &str = ".deleting-";
/// A file inside a partial snapshot naming its source: proof that the directory is
/// the proxy's before it is removed.
pub(super) const PARTIAL_MARKER: &str = "offshoot-partial-snapshot";
/// A clone in the making, named apart from any branch (branch names never start
/// with a dot): the name of a branch appears only with a complete clone behind it.
pub(super) const STAGING_PREFIX: &str = ".new-";
pub(super) const BRANCH_META: &str = "branch.json";
/// The metadata of a warm spare: its proof of ownership and its snapshot.
pub(super) const SPARE_META: &str = "spare.json";
pub(super) const SNAPSHOT_META: &str = "snapshot.json";
/// Mode of a branch directory: the proxy's; others (the server's user) may only
/// traverse it to reach `data/`.
pub(super) const BRANCH_DIR_MODE: u32 = 0o711;

/// `branch.json`: written before anything is copied, so the directory is provably
/// the proxy's from its first byte.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct BranchMeta {
    pub source: String,
    pub branch: String,
    pub snapshot: String,
    /// False until every file is copied.
    pub complete: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_mode: Option<CopyMode>,
    /// Unix milliseconds.
    pub created_at: u64,
}

/// `spare.json`: written before anything is copied, like `branch.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct SpareMeta {
    pub source: String,
    pub snapshot: String,
    /// False until every file is copied.
    pub complete: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_mode: Option<CopyMode>,
    /// Unix milliseconds.
    pub created_at: u64,
}

/// `snapshot.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct SnapshotMeta {
    pub source: String,
    pub name: String,
    /// Unix milliseconds.
    pub created_at: u64,
    pub origin: String,
    pub size_bytes: u64,
}

/// The storage root of one source and the paths below it.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn branches(&self) -> PathBuf {
        self.root.join("branches")
    }

    pub fn snapshots(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    pub fn branch_dir(&self, rec: &BranchRecord) -> PathBuf {
        self.branches().join(rec.branch.as_str())
    }

    /// Where the clone of `rec` is built before it is renamed into place.
    pub fn staging_dir(&self, rec: &BranchRecord) -> PathBuf {
        self.branches()
            .join(format!("{STAGING_PREFIX}{}", rec.branch))
    }

    /// The private socket directory of a branch's server: short, whatever the
    /// branch's name (a socket path is at most 107 bytes).
    pub fn socket_dir(&self, rec: &BranchRecord) -> PathBuf {
        let digest = ring::digest::digest(
            &ring::digest::SHA256,
            format!("{}/{}", rec.source, rec.branch).as_bytes(),
        );
        let hex: String = digest.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        self.root.join("run").join(hex)
    }

    /// Where warm spares are kept.
    pub fn spares(&self) -> PathBuf {
        self.root.join("spares")
    }

    pub fn spare_dir(&self, id: &str) -> PathBuf {
        self.spares().join(id)
    }

    /// Where a spare is built before it is renamed into place.
    pub fn spare_staging_dir(&self, id: &str) -> PathBuf {
        self.spares().join(format!("{STAGING_PREFIX}{id}"))
    }

    /// A spare server's socket directory (ids are 16 hex digits, so it is never a
    /// branch's 32-digit hash).
    pub fn spare_socket_dir(&self, id: &str) -> PathBuf {
        self.root.join("run").join(format!("spare-{id}"))
    }

    /// The socket directory of the server that seals a new snapshot.
    pub fn seal_socket_dir(&self) -> PathBuf {
        self.root.join("run").join(".seal")
    }

    pub fn snapshot_dir(&self, name: &str) -> PathBuf {
        self.snapshots().join(name)
    }

    pub fn partial_snapshot_dir(&self, name: &str) -> PathBuf {
        self.snapshots().join(format!("{PARTIAL_PREFIX}{name}"))
    }

    pub fn deleting_snapshot_dir(&self, name: &str) -> PathBuf {
        self.snapshots().join(format!("{DELETING_PREFIX}{name}"))
    }

    /// Every branch directory's metadata of `source` (unreadable ones skipped).
    pub fn all_branch_meta(&self, source: &str) -> Vec<BranchMeta> {
        let Ok(entries) = fs::read_dir(self.branches()) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| read_json::<BranchMeta>(&e.path().join(BRANCH_META)))
            .filter(|m| m.source == source)
            .collect()
    }

    /// Every sealed snapshot's metadata, oldest first.
    pub fn snapshot_metas(&self) -> Vec<SnapshotMeta> {
        let Ok(entries) = fs::read_dir(self.snapshots()) else {
            return Vec::new();
        };
        let mut list: Vec<SnapshotMeta> = entries
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|e| read_json::<SnapshotMeta>(&e.path().join(SNAPSHOT_META)))
            .collect();
        list.sort_by(|a, b| (a.created_at, &a.name).cmp(&(b.created_at, &b.name)));
        list
    }

    /// After a restart: removes what creations interrupted by a crash left under
    /// `branches/`, when it is provably the proxy's: a staging directory (its prefix,
    /// and nothing in it but a creation's files, with metadata of `source` if any),
    /// or a branch's directory holding only the temporary metadata file of an older
    /// version's creation. Returns what was removed; anything else stays (and is
    /// reported by [`Layout::strays`]). No creation is in flight while this runs.
    pub fn settle_interrupted_creations(&self, source: &str) -> Vec<PathBuf> {
        let Ok(entries) = fs::read_dir(self.branches()) else {
            return Vec::new();
        };
        let temp_meta = temp_path(Path::new(BRANCH_META));
        let temp_meta = temp_meta.to_string_lossy();
        let mut removed = Vec::new();
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(inside) = fs::read_dir(&path) else {
                continue;
            };
            let inside: Vec<String> = inside
                .flatten()
                .map(|f| f.file_name().to_string_lossy().into_owned())
                .collect();
            let ours = if name.starts_with(STAGING_PREFIX) {
                let only_creation_files = inside
                    .iter()
                    .all(|f| f == BRANCH_META || f == temp_meta.as_ref() || f == "data");
                let meta = read_json::<BranchMeta>(&path.join(BRANCH_META));
                only_creation_files && meta.is_none_or(|m| m.source == source)
            } else {
                inside.len() == 1 && inside[0] == temp_meta.as_ref()
            };
            if !ours {
                continue;
            }
            match remove_tree(&path) {
                Ok(()) => removed.push(path),
                Err(e) => {
                    tracing::warn!(dir = %path.display(), error = %e, "cannot remove an interrupted creation")
                }
            }
        }
        removed
    }

    /// What lies in storage that `source`'s metadata does not explain, as
    /// `(location, reason)`.
    pub fn strays(&self, source: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Ok(entries) = fs::read_dir(self.branches()) {
            for e in entries.flatten() {
                let path = e.path();
                match read_json::<BranchMeta>(&path.join(BRANCH_META)) {
                    Some(m) if m.source == source => {}
                    Some(m) => out.push((
                        path.display().to_string(),
                        format!("belongs to source {}", m.source),
                    )),
                    None => out.push((
                        path.display().to_string(),
                        "no offshoot branch.json: not made by this proxy".into(),
                    )),
                }
            }
        }
        if let Ok(entries) = fs::read_dir(self.spares()) {
            for e in entries.flatten() {
                let path = e.path();
                match read_json::<SpareMeta>(&path.join(SPARE_META)) {
                    Some(m) if m.source == source => {}
                    _ => out.push((
                        path.display().to_string(),
                        "no offshoot spare.json of this source: not a warm spare".into(),
                    )),
                }
            }
        }
        if let Ok(entries) = fs::read_dir(self.snapshots()) {
            for e in entries.flatten() {
                let path = e.path();
                if !path.join(SNAPSHOT_META).exists() {
                    out.push((
                        path.display().to_string(),
                        "no snapshot.json: not a sealed snapshot".into(),
                    ));
                }
            }
        }
        out
    }
}
