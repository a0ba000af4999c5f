//! The few file operations the control plane needs to be crash-safe: replacing a
//! file atomically, reading JSON that may be missing or torn, removing a tree that
//! may already be gone.
//!
//! Invariant: a file written with [`write_atomic`] is, after a crash at any point,
//! either its old content or its new one, never a mix (temp file, fsync, rename,
//! fsync of the directory).

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The temporary file [`write_atomic`] writes `path` through: `.<name>.tmp` beside it.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".{name}.tmp"))
}

/// Replaces `path` with `bytes` atomically (temp file, fsync, rename, fsync of the
/// directory).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = temp_path(path);
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    sync_dir(dir)
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
    fs::read(path)
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
}
