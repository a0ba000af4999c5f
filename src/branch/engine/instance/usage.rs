//! How many bytes a branch's data directory holds that it does not share with its
//! snapshot.
//!
//! A copy-on-write clone (XFS, Btrfs) shares its blocks with the snapshot until the
//! branch writes; FIEMAP flags each shared extent, and `filefrag -v` (e2fsprogs)
//! prints those flags, so the bytes in extents not flagged `shared` are the branch's
//! own. On a filesystem without FIEMAP, or without `filefrag`, the apparent size is
//! reported instead, marked as such. A plain copy shares nothing, so there every
//! byte counts, exactly.

use std::path::{Path, PathBuf};

use tokio::process::Command;

use crate::branch::engine::Usage;

/// Files per `filefrag` run: long enough to amortise the process, short enough for
/// any argument list.
const FILES_PER_RUN: usize = 256;

/// The branch's own bytes under `dir`.
pub(super) async fn usage(dir: &Path) -> std::io::Result<Usage> {
    let dir = dir.to_owned();
    let (files, apparent) = tokio::task::spawn_blocking(move || walk(&dir))
        .await
        .map_err(std::io::Error::other)??;
    let mut own = 0u64;
    for chunk in files.chunks(FILES_PER_RUN) {
        match unshared(chunk).await {
            Some(bytes) => own += bytes,
            None => {
                return Ok(Usage {
                    bytes: apparent,
                    exact: false,
                })
            }
        }
    }
    Ok(Usage {
        bytes: own,
        exact: true,
    })
}

/// Every regular file below `dir` (links are not followed), and their apparent size.
fn walk(dir: &Path) -> std::io::Result<(Vec<PathBuf>, u64)> {
    let mut files = Vec::new();
    let mut apparent = 0;
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                todo.push(entry.path());
            } else if kind.is_file() {
                apparent += entry.metadata()?.len();
                files.push(entry.path());
            }
        }
    }
    Ok((files, apparent))
}

/// Bytes in extents of `files` not flagged shared; `None` when `filefrag` is missing
/// or the filesystem cannot tell.
async fn unshared(files: &[PathBuf]) -> Option<u64> {
    let out = Command::new("filefrag")
        .arg("-v")
        .args(files)
        .env("LC_ALL", "C")
        .output()
        .await
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse(&String::from_utf8_lossy(&out.stdout))
}

/// Sums the extents of `filefrag -v` output not flagged `shared`, in each file's
/// block size.
fn parse(text: &str) -> Option<u64> {
    let mut block = 0u64;
    let mut total = 0u64;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("File size of ") {
            // "... is 100000 (25 blocks of 4096 bytes)"
            block = rest
                .rsplit_once(" blocks of ")?
                .1
                .trim_end_matches(" bytes)")
                .parse()
                .ok()?;
            continue;
        }
        if line.contains("FIBMAP") || line.contains("not supported") {
            return None;
        }
        // "   0:        0..      24:   44958976..  44959000:     25:             last,eof"
        let fields: Vec<&str> = line.split(':').collect();
        let is_extent = fields.len() >= 5
            && fields[0].trim().parse::<u64>().is_ok()
            && fields[1].contains("..");
        if !is_extent {
            continue;
        }
        let length: u64 = fields[3].trim().parse().ok()?;
        let flags = fields.last().unwrap_or(&"");
        if !flags.split(',').any(|f| f.trim() == "shared") {
            total += length * block;
        }
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_extents_are_left_out() {
        let text = "Filesystem type is: 58465342\n\
            File size of a is 40960 (10 blocks of 4096 bytes)\n \
            ext:     logical_offset:        physical_offset: length:   expected: flags:\n   \
            0:        0..       5:      100..       105:      6:             shared\n   \
            1:        6..       9:      300..       303:      4:        106: last,eof\n\
            a: 2 extents found\n\
            File size of b is 0 (0 blocks of 1024 bytes)\n\
            b: 0 extents found\n\
            File size of c is 2048 (2 blocks of 1024 bytes)\n \
            ext:     logical_offset:        physical_offset: length:   expected: flags:\n   \
            0:        0..       1:     7000..      7001:      2:             last,shared,eof\n";
        assert_eq!(parse(text), Some(4 * 4096));
    }

    #[test]
    fn a_filesystem_without_fiemap_gives_no_answer() {
        assert_eq!(
            parse("File size of a is 1 (1 blocks of 4096 bytes)\nFIBMAP fallback\n"),
            None
        );
    }

    #[tokio::test]
    async fn a_plain_copy_counts_every_block() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("base")).unwrap();
        std::fs::write(dir.path().join("base/1"), vec![7u8; 64 * 1024]).unwrap();
        std::fs::write(dir.path().join("PG_VERSION"), b"15\n").unwrap();
        let u = usage(dir.path()).await.unwrap();
        if u.exact {
            // Allocated blocks: at least the bytes written, in whole blocks.
            assert!(u.bytes >= 64 * 1024 + 3, "{u:?}");
        } else {
            assert_eq!(u.bytes, 64 * 1024 + 3);
        }
    }
}
