//! Copying a data directory: reflinks (FICLONE) where the filesystem shares blocks,
//! a plain copy (`copy_file_range`) where it does not. Files are cloned in parallel
//! threads, in-process: on XFS or Btrfs a clone of a multi-gigabyte directory costs
//! one ioctl per file, so the time goes to the number of files, not their size.
//! A proxy that dropped root asks its privileged helper to copy (it alone may read
//! a server's files and give new ones to the servers' user).

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::branch::engine::CopyMode;
use crate::privsep::{self, Op, Owner, Reply};

use super::privileged::helper_io;

/// What to copy and how.
pub struct CopyPlan<'a> {
    pub from: &'a Path,
    /// Created by the copy; must not exist.
    pub to: &'a Path,
    /// Try reflinks first (false once the filesystem is known not to have them).
    pub try_reflink: bool,
    /// `(uid, gid)` every new file and directory is given.
    pub owner: Option<(u32, u32)>,
    /// Copy what symbolic links point to (a data directory's `pg_wal` or tablespace
    /// links), instead of the links.
    pub follow_links: bool,
    /// Names skipped at the top level (e.g. `postmaster.pid`).
    pub skip: &'a [&'a str],
}

/// Threads cloning files at once: reflink ioctls are metadata work that overlaps
/// well; more threads than this stop helping.
const THREADS: usize = 8;

enum Item {
    Dir(PathBuf, u32),
    File(PathBuf, u64),
    Link(PathBuf, PathBuf),
}

fn walk(plan: &CopyPlan<'_>) -> io::Result<Vec<Item>> {
    let mut items = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in fs::read_dir(plan.from.join(&rel))? {
            let entry = entry?;
            let name = entry.file_name();
            if rel.as_os_str().is_empty() && plan.skip.iter().any(|s| name == **s) {
                continue;
            }
            let path = rel.join(&name);
            let full = plan.from.join(&path);
            let mut meta = fs::symlink_metadata(&full)?;
            if meta.file_type().is_symlink() {
                if plan.follow_links {
                    meta = fs::metadata(&full)?;
                } else {
                    items.push(Item::Link(path, fs::read_link(&full)?));
                    continue;
                }
            }
            if meta.is_dir() {
                items.push(Item::Dir(path.clone(), meta.mode() & 0o7777));
                stack.push(path);
            } else if meta.is_file() {
                items.push(Item::File(path, meta.len()));
            }
            // Sockets and FIFOs are not data.
        }
    }
    Ok(items)
}

fn give(path: &Path, owner: Option<(u32, u32)>) -> io::Result<()> {
    match owner {
        Some((u, g)) => std::os::unix::fs::lchown(path, Some(u), Some(g)),
        None => Ok(()),
    }
}

/// Whether an error from FICLONE means "this filesystem (pair) cannot share blocks".
fn no_reflink(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_errno::EOPNOTSUPP)
            | Some(libc_errno::ENOTTY)
            | Some(libc_errno::EXDEV)
            | Some(libc_errno::EINVAL)
            | Some(libc_errno::ENOSYS)
    ) || e.kind() == io::ErrorKind::Unsupported
}

/// The few errno values needed, without a libc dependency.
mod libc_errno {
    pub const ENOTTY: i32 = nix::errno::Errno::ENOTTY as i32;
    pub const EXDEV: i32 = nix::errno::Errno::EXDEV as i32;
    pub const EINVAL: i32 = nix::errno::Errno::EINVAL as i32;
    pub const ENOSYS: i32 = nix::errno::Errno::ENOSYS as i32;
    pub const EOPNOTSUPP: i32 = nix::errno::Errno::EOPNOTSUPP as i32;
}

/// A reflink when `mode` says the filesystem takes them, else a plain copy.
fn copy_file(from: &Path, to: &Path, mode: CopyMode) -> io::Result<()> {
    if mode == CopyMode::Reflink {
        reflink_copy::reflink(from, to)
    } else {
        // std's copy uses copy_file_range, which stays in the kernel.
        fs::copy(from, to).map(|_| ())
    }
}

/// Copies `plan.from` into the new directory `plan.to`. Returns the mode used. On
/// error the partial copy is left for the caller to remove.
pub fn copy_tree(plan: &CopyPlan<'_>) -> io::Result<CopyMode> {
    if let Some(ch) = privsep::channel() {
        let op = Op::Copy {
            from: plan.from.to_owned(),
            to: plan.to.to_owned(),
            try_reflink: plan.try_reflink,
            owner: plan.owner.map(Owner::from_pair),
            follow_links: plan.follow_links,
            skip: plan.skip.iter().map(|s| s.to_string()).collect(),
        };
        return match ch.call_blocking(op)? {
            Reply::Copied { reflink: true } => Ok(CopyMode::Reflink),
            Reply::Copied { reflink: false } => Ok(CopyMode::Copy),
            other => Err(helper_io(other)),
        };
    }
    let items = walk(plan)?;
    let top_mode = fs::metadata(plan.from)?.mode() & 0o7777;
    fs::DirBuilder::new().mode(0o700).create(plan.to)?;
    fs::set_permissions(plan.to, fs::Permissions::from_mode(top_mode))?;
    give(plan.to, plan.owner)?;
    let mut files = Vec::new();
    // Directories come before their contents in walk order.
    for item in items {
        match item {
            Item::Dir(rel, mode) => {
                let p = plan.to.join(&rel);
                fs::DirBuilder::new().mode(0o700).create(&p)?;
                fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
                give(&p, plan.owner)?;
            }
            Item::Link(rel, target) => {
                let p = plan.to.join(&rel);
                std::os::unix::fs::symlink(target, &p)?;
                give(&p, plan.owner)?;
            }
            Item::File(rel, len) => files.push((rel, len)),
        }
    }
    // Largest first: the first file decides the mode, and big files start early.
    files.sort_by_key(|f| std::cmp::Reverse(f.1));
    let mut mode = CopyMode::Copy;
    let mut start = 0;
    if plan.try_reflink {
        if let Some((rel, _)) = files.first() {
            let (from, to) = (plan.from.join(rel), plan.to.join(rel));
            match reflink_copy::reflink(&from, &to) {
                Ok(()) => mode = CopyMode::Reflink,
                Err(e) if no_reflink(&e) => copy_file(&from, &to, CopyMode::Copy)?,
                Err(e) => return Err(e),
            }
            give(&to, plan.owner)?;
            start = 1;
        }
    }
    let next = AtomicUsize::new(start);
    let failure: Mutex<Option<io::Error>> = Mutex::new(None);
    let threads = THREADS.min(files.len().saturating_sub(start)).max(1);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((rel, _)) = files.get(i) else { break };
                let to = plan.to.join(rel);
                let r =
                    copy_file(&plan.from.join(rel), &to, mode).and_then(|()| give(&to, plan.owner));
                if let Err(e) = r {
                    let mut slot = failure.lock().unwrap_or_else(|p| p.into_inner());
                    slot.get_or_insert(io::Error::new(
                        e.kind(),
                        format!("copying {}: {e}", rel.display()),
                    ));
                    // Stop the other threads early.
                    next.store(usize::MAX / 2, Ordering::Relaxed);
                    break;
                }
            });
        }
    });
    match failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(mode),
    }
}

/// Bytes in regular files below `dir` (not following links).
pub fn tree_size(dir: &Path) -> u64 {
    if let Some(ch) = privsep::channel() {
        return match ch.call_blocking(Op::TreeSize {
            path: dir.to_owned(),
        }) {
            Ok(Reply::Size { bytes }) => bytes,
            _ => 0,
        };
    }
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) if m.is_file() => total += m.len(),
                _ => {}
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_a_tree_with_modes_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir_all(src.join("base/1")).unwrap();
        fs::write(src.join("base/1/big"), vec![7u8; 100_000]).unwrap();
        fs::write(src.join("PG_VERSION"), "15\n").unwrap();
        fs::write(src.join("postmaster.pid"), "1\n").unwrap();
        fs::set_permissions(src.join("PG_VERSION"), fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink("base", src.join("link")).unwrap();
        let dst = dir.path().join("dst");
        let mode = copy_tree(&CopyPlan {
            from: &src,
            to: &dst,
            try_reflink: true,
            owner: None,
            follow_links: false,
            skip: &["postmaster.pid"],
        })
        .unwrap();
        // Reflink exactly where this filesystem can clone a file.
        let probe = dir.path().join("probe");
        fs::write(&probe, b"x").unwrap();
        let clones = reflink_copy::reflink(&probe, dir.path().join("probe.clone")).is_ok();
        let expected = if clones {
            CopyMode::Reflink
        } else {
            CopyMode::Copy
        };
        assert_eq!(mode, expected);
        assert_eq!(fs::read(dst.join("base/1/big")).unwrap().len(), 100_000);
        assert_eq!(fs::read_to_string(dst.join("PG_VERSION")).unwrap(), "15\n");
        let m = fs::metadata(dst.join("PG_VERSION")).unwrap().mode() & 0o777;
        assert_eq!(m, 0o600);
        assert!(!dst.join("postmaster.pid").exists());
        assert_eq!(fs::read_link(dst.join("link")).unwrap(), Path::new("base"));
        assert_eq!(tree_size(&dst), 100_003);
        // The destination must be new.
        assert!(copy_tree(&CopyPlan {
            from: &src,
            to: &dst,
            try_reflink: false,
            owner: None,
            follow_links: true,
            skip: &[],
        })
        .is_err());
    }
}
