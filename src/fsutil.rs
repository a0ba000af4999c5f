//! The few file operations the control plane needs to be crash-safe and safe in
//! directories another user can write: replacing a file atomically, creating a
//! file that is certainly new and ours, reading JSON that may be missing or torn,
//! removing a tree that may already be gone.
//!
//! Invariants:
//! - a file written with [`write_atomic`] or [`replace_file`] is, after a crash at
//!   any point, either its old content or its new one, never a mix (temp file,
//!   fsync, rename, fsync of the directory);
//! - nothing here follows a symbolic link at the last component of a path: files
//!   are created with `O_CREAT|O_EXCL|O_NOFOLLOW` and read with `O_NOFOLLOW`, and
//!   `rename` replaces a planted link instead of writing through it. A branch
//!   server's OS user (who can run programs through `COPY ... TO PROGRAM`) can
//!   plant links in its data directory; the proxy never writes through them.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Mode of files only the proxy (or the server they are given to) reads.
pub const PRIVATE: u32 = 0o600;

/// The temporary file [`write_atomic`] writes `path` through: `.<name>.tmp` beside it.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".{name}.tmp"))
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Creates `path` as a new regular file with `mode`: fails if anything (a file, a
/// link, a directory) already has the name, and never follows a link.
pub fn create_new(path: &Path, mode: u32) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(OFlag::O_NOFOLLOW.bits())
        .open(path)
}

/// Opens `path` for reading without following a link at its last component; a
/// link is an error (ELOOP), never its target's content.
pub fn open_nofollow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(OFlag::O_NOFOLLOW.bits())
        .open(path)
}

/// The bytes of `path`, read with [`open_nofollow`].
pub fn read_nofollow(path: &Path) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    open_nofollow(path)?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// A fresh, empty file at `path` owned by this process (a log a child writes
/// through an inherited descriptor): whatever had the name is unlinked first
/// (unlink never follows a link), then the file is created with `O_EXCL`. If
/// someone recreates the name in between, this fails instead of opening theirs.
pub fn create_fresh(path: &Path, mode: u32) -> io::Result<File> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let file = create_new(path, mode)?;
    let meta = file.metadata()?;
    if !meta.is_file() || meta.uid() != nix::unistd::Uid::effective().as_raw() {
        return Err(io::Error::other(format!(
            "{} is not a regular file of this process",
            path.display()
        )));
    }
    Ok(file)
}

/// Replaces `path` with `bytes` atomically, through a temp file with a random name
/// created `O_EXCL|O_NOFOLLOW` beside it, given to `owner` (by descriptor) before
/// the rename. Safe in a directory another user can write: the rename replaces
/// whatever has the name, a link included, and never writes through it.
pub fn replace_file(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> io::Result<()> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
    let written = (|| {
        let mut f = create_new(&tmp, mode)?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
        }
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    sync_dir(parent_of(path))
}

/// Replaces `path` with `bytes` atomically (temp file, fsync, rename, fsync of the
/// directory). The temp file is [`temp_path`]: one left by a crash is unlinked and
/// the new one created `O_EXCL|O_NOFOLLOW`, so a link planted there is never
/// written through.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = temp_path(path);
    {
        let mut f = create_fresh(&tmp, PRIVATE)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    sync_dir(parent_of(path))
}

/// [`write_atomic`] of `value` as pretty JSON.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let body = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    write_atomic(path, &body)
}

/// Makes a directory's entries (a rename, a new file) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// The JSON in `path`; `None` if it is missing or does not parse.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Option<T> {
    read_nofollow(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// Removes `path` and everything below it; a path that is already gone is not an
/// error.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_replace_and_leave_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.json");
        write_json_atomic(&path, &vec![1, 2]).unwrap();
        write_json_atomic(&path, &vec![3]).unwrap();
        assert_eq!(read_json::<Vec<u8>>(&path), Some(vec![3]));
        assert!(!temp_path(&path).exists());
        assert_eq!(temp_path(&path), dir.path().join(".x.json.tmp"));
        fs::write(&path, b"{").unwrap();
        assert_eq!(read_json::<Vec<u8>>(&path), None);
        remove_tree(&dir.path().join("nope")).unwrap();
    }

    #[test]
    fn planted_links_are_replaced_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let planted = |name: &str| {
            let p = dir.path().join(name);
            std::os::unix::fs::symlink(&victim, &p).unwrap();
            p
        };
        // The atomic JSON write's temp file, and its target.
        let json = dir.path().join("b.json");
        std::os::unix::fs::symlink(&victim, temp_path(&json)).unwrap();
        write_json_atomic(&json, &vec![1]).unwrap();
        assert_eq!(read_json::<Vec<u8>>(&json), Some(vec![1]));
        // A file replaced in a directory someone else can write.
        let conf = planted("offshoot.conf");
        replace_file(&conf, b"port = 1\n", PRIVATE, None).unwrap();
        assert!(!fs::symlink_metadata(&conf)
            .unwrap()
            .file_type()
            .is_symlink());
        // A log recreated at each start.
        let log = planted("postgres.log");
        create_fresh(&log, PRIVATE).unwrap();
        assert!(fs::symlink_metadata(&log).unwrap().is_file());
        // Reads refuse links.
        let read = planted("read");
        assert!(read_nofollow(&read).is_err());
        assert!(create_new(&read, PRIVATE).is_err());
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
    }
}
