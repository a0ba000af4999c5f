//! SQL files an admin API caller names (`sql_files`, `check_files` of a
//! server-side rehearsal): read only from below one configured directory
//! (`rehearsal.sql_dir`).
//!
//! A name is a relative path; an absolute one, one with `..`, or one whose
//! symbolic links lead out of the directory is refused, as is anything that is not
//! a regular file. A directory stands for its `*.sql` files in name order, as for
//! `--sql`. Every refusal speaks of the path as the caller gave it, never of the
//! directory's place on the server.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use super::SqlFile;

/// Why a named file was not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileRefusal {
    /// The path is absolute, climbs with `..`, or leads out through a link.
    Outside(String),
    /// Nothing by that name.
    NotFound(String),
    /// A device, a socket, a FIFO, or a directory holding no `.sql` files.
    NotUsable(String, &'static str),
    /// The files together are over the size limit.
    TooBig(String, u64),
    /// The directory itself, or a file, could not be read (the log has the detail).
    Unreadable(String),
}

impl FileRefusal {
    /// The words for the caller.
    pub fn message(&self) -> String {
        match self {
            FileRefusal::Outside(p) => format!(
                "{p:?} is not below rehearsal.sql_dir: give a path relative to it, without \"..\", \
                 that no link leads out of"
            ),
            FileRefusal::NotFound(p) => format!("{p:?} does not exist below rehearsal.sql_dir"),
            FileRefusal::NotUsable(p, why) => format!("{p:?} {why}"),
            FileRefusal::TooBig(p, limit) => format!(
                "{p:?}: the SQL files of one rehearsal may hold at most {limit} bytes together"
            ),
            FileRefusal::Unreadable(p) => format!("{p:?} cannot be read below rehearsal.sql_dir"),
        }
    }
}

/// Reads `name` below `root`: one file, or a directory's `*.sql` files in name
/// order. `budget` is the bytes still allowed; it is lowered by what is read.
pub fn read_below(root: &Path, name: &str, budget: &mut u64) -> Result<Vec<SqlFile>, FileRefusal> {
    let rel = Path::new(name);
    let plain = !name.is_empty()
        && rel
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !plain {
        return Err(FileRefusal::Outside(name.to_owned()));
    }
    let unreadable = |e: std::io::Error| {
        tracing::warn!(error = %e, name, "rehearsal.sql_dir: cannot read");
        FileRefusal::Unreadable(name.to_owned())
    };
    let root = root.canonicalize().map_err(unreadable)?;
    let path = inside(&root, &root.join(rel), name)?;
    let meta = std::fs::metadata(&path).map_err(unreadable)?;
    if meta.is_file() {
        return Ok(vec![read_file(&path, name, budget)?]);
    }
    if !meta.is_dir() {
        return Err(FileRefusal::NotUsable(
            name.to_owned(),
            "is not a regular file or a directory",
        ));
    }
    let mut entries: Vec<(String, PathBuf)> = std::fs::read_dir(&path)
        .map_err(unreadable)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let file = e.file_name().to_str()?.to_owned();
            file.ends_with(".sql").then(|| (file, e.path()))
        })
        .collect();
    entries.sort();
    if entries.is_empty() {
        return Err(FileRefusal::NotUsable(
            name.to_owned(),
            "is a directory holding no .sql files",
        ));
    }
    let mut out = Vec::new();
    for (file, p) in entries {
        let shown = format!("{}/{file}", name.trim_end_matches('/'));
        let p = inside(&root, &p, &shown)?;
        if !std::fs::metadata(&p).map_err(unreadable)?.is_file() {
            return Err(FileRefusal::NotUsable(shown, "is not a regular file"));
        }
        out.push(read_file(&p, &shown, budget)?);
    }
    Ok(out)
}

/// `path` with every link followed, if that is still below `root`.
fn inside(root: &Path, path: &Path, name: &str) -> Result<PathBuf, FileRefusal> {
    let real = path.canonicalize().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => FileRefusal::NotFound(name.to_owned()),
        _ => {
            tracing::warn!(error = %e, name, "rehearsal.sql_dir: cannot resolve");
            FileRefusal::Unreadable(name.to_owned())
        }
    })?;
    if real.starts_with(root) {
        Ok(real)
    } else {
        Err(FileRefusal::Outside(name.to_owned()))
    }
}

fn read_file(path: &Path, name: &str, budget: &mut u64) -> Result<SqlFile, FileRefusal> {
    let limit = *budget;
    let mut bytes = Vec::new();
    // One byte over the budget is enough to know it is too big.
    std::fs::File::open(path)
        .and_then(|f| f.take(limit + 1).read_to_end(&mut bytes))
        .map_err(|e| {
            tracing::warn!(error = %e, name, "rehearsal.sql_dir: cannot read");
            FileRefusal::Unreadable(name.to_owned())
        })?;
    if bytes.len() as u64 > limit {
        return Err(FileRefusal::TooBig(name.to_owned(), super::MAX_SQL_BYTES));
    }
    *budget -= bytes.len() as u64;
    let text = String::from_utf8(bytes)
        .map_err(|_| FileRefusal::NotUsable(name.to_owned(), "is not UTF-8 text"))?;
    Ok(SqlFile {
        name: name.to_owned(),
        text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget() -> u64 {
        super::super::MAX_SQL_BYTES
    }

    #[test]
    fn files_and_directories_below_the_root_are_read_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("m")).unwrap();
        std::fs::write(root.join("m/002_b.sql"), "SELECT 2;").unwrap();
        std::fs::write(root.join("m/001_a.sql"), "SELECT 1;").unwrap();
        std::fs::write(root.join("m/notes.txt"), "not SQL").unwrap();
        std::fs::write(root.join("one.sql"), "SELECT 3;").unwrap();
        let mut b = budget();
        let got = read_below(root, "m/", &mut b).unwrap();
        let names: Vec<&str> = got.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["m/001_a.sql", "m/002_b.sql"]);
        assert_eq!(got[0].text, "SELECT 1;");
        assert_eq!(b, budget() - 18);
        let one = read_below(root, "./one.sql", &mut b).unwrap();
        assert_eq!(one[0].text, "SELECT 3;");
    }

    #[test]
    fn paths_that_leave_the_root_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("sql");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(dir.path().join("secret.sql"), "SELECT 'x';").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret.sql"), root.join("link.sql")).unwrap();
        std::os::unix::fs::symlink(dir.path(), root.join("up")).unwrap();
        let mut b = budget();
        for name in [
            "../secret.sql",
            "/etc/passwd",
            "a/../../secret.sql",
            "link.sql",
            "up/secret.sql",
            "",
        ] {
            let e = read_below(&root, name, &mut b).unwrap_err();
            assert_eq!(e, FileRefusal::Outside(name.to_owned()), "{name}");
            assert!(!e.message().contains(dir.path().to_str().unwrap()));
        }
        // A directory whose .sql entry is a link out is refused as a whole.
        std::fs::create_dir(root.join("d")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret.sql"), root.join("d/1.sql")).unwrap();
        assert_eq!(
            read_below(&root, "d", &mut b).unwrap_err(),
            FileRefusal::Outside("d/1.sql".into())
        );
        assert_eq!(b, budget());
    }

    #[test]
    fn missing_odd_and_oversized_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut b = budget();
        assert_eq!(
            read_below(root, "none.sql", &mut b).unwrap_err(),
            FileRefusal::NotFound("none.sql".into())
        );
        std::fs::create_dir(root.join("empty")).unwrap();
        assert!(matches!(
            read_below(root, "empty", &mut b).unwrap_err(),
            FileRefusal::NotUsable(..)
        ));
        assert!(matches!(
            read_below(root, "/dev/null", &mut b).unwrap_err(),
            FileRefusal::Outside(_)
        ));
        let fifo = root.join("pipe.sql");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        assert!(matches!(
            read_below(root, "pipe.sql", &mut b).unwrap_err(),
            FileRefusal::NotUsable(_, "is not a regular file or a directory")
        ));
        std::fs::write(root.join("big.sql"), "x".repeat(100)).unwrap();
        let mut small = 99;
        assert!(matches!(
            read_below(root, "big.sql", &mut small).unwrap_err(),
            FileRefusal::TooBig(..)
        ));
        assert_eq!(small, 99);
        std::fs::write(root.join("bin.sql"), [0xff, 0xfe]).unwrap();
        assert!(matches!(
            read_below(root, "bin.sql", &mut b).unwrap_err(),
            FileRefusal::NotUsable(_, "is not UTF-8 text")
        ));
    }
}
