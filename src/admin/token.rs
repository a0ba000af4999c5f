//! The admin API's bearer token: where it lives and how it is made (the console's
//! gate compares it).
//!
//! With `admin.token_file` the operator provides the token. Without it, `serve`
//! makes one at `<state.dir>/admin.token` on its first start (mode 0600, created
//! with `O_EXCL | O_NOFOLLOW`, so a planted file or link is never written through)
//! and reuses it afterwards, so the CLI run with the same configuration finds it.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::config::Config;

/// Name of the generated token file inside `state.dir`.
pub const FILE_NAME: &str = "admin.token";

/// Shortest token accepted from `admin.token_file` or the environment.
pub const MIN_LEN: usize = 16;

/// Where the token of `cfg` is: `admin.token_file`, or the generated one.
pub fn path(cfg: &Config) -> PathBuf {
    match &cfg.admin.token_file {
        Some(p) => p.clone(),
        None => cfg.state.dir.join(FILE_NAME),
    }
}

/// The token `serve` uses, and the file it came from. Reads `admin.token_file`, or
/// reads (making it first if needed) `<state.dir>/admin.token`. Blocking.
pub fn load_or_create(cfg: &Config) -> Result<(String, PathBuf)> {
    let path = path(cfg);
    if cfg.admin.token_file.is_some() {
        let token = read(&path).context("admin.token_file")?;
        return Ok((token, path));
    }
    match create(&path) {
        Ok(token) => Ok((token, path)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok((read_generated(&path)?, path))
        }
        Err(e) => Err(e).with_context(|| format!("cannot create {}", path.display())),
    }
}

/// Makes a new random token at `path`; fails if anything (a link too) is there.
fn create(path: &Path) -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| std::io::Error::other("no random bytes from the OS"))?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)?;
    f.write_all(token.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    Ok(token)
}

/// Reads a token the proxy made earlier, refusing a link, someone else's file or
/// one that others may read.
fn read_generated(path: &Path) -> Result<String> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("cannot open {} (a link is refused)", path.display()))?;
    let meta = f.metadata()?;
    if !meta.is_file() || meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o077 != 0
    {
        bail!(
            "{} is not a file of this user with mode 0600; delete it and start again to \
             make a new token",
            path.display()
        );
    }
    let mut text = String::new();
    f.read_to_string(&mut text)?;
    checked(text, path)
}

/// Reads a token file (the operator's `admin.token_file`, or for the CLI either kind).
pub fn read(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the admin token from {}", path.display()))?;
    checked(text, path)
}

fn checked(text: String, path: &Path) -> Result<String> {
    let token = text.trim();
    if token.len() < MIN_LEN || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bail!(
            "{} must hold one token of at least {MIN_LEN} characters, without spaces",
            path.display()
        );
    }
    Ok(token.to_owned())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn config(dir: &Path) -> Config {
        let mut cfg = Config::default();
        cfg.state.dir = dir.to_path_buf();
        cfg
    }

    #[test]
    fn the_generated_token_is_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let (token, path) = load_or_create(&cfg).unwrap();
        assert_eq!(path, dir.path().join(FILE_NAME));
        assert_eq!(token.len(), 64);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (again, _) = load_or_create(&cfg).unwrap();
        assert_eq!(again, token);
        assert_eq!(read(&path).unwrap(), token);

        // A token file others can read is not trusted.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_create(&cfg).unwrap_err().to_string();
        assert!(e.contains("mode 0600"), "{e}");
    }

    #[test]
    fn a_planted_link_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("victim");
        std::fs::write(&target, "keep me").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join(FILE_NAME)).unwrap();
        assert!(load_or_create(&config(dir.path())).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me");
    }

    #[test]
    fn a_configured_token_file_is_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tok");
        let mut cfg = config(dir.path());
        cfg.admin.token_file = Some(file.clone());
        assert!(load_or_create(&cfg).is_err(), "missing file");
        std::fs::write(&file, "short\n").unwrap();
        assert!(load_or_create(&cfg).is_err(), "too short");
        std::fs::write(&file, "0123456789abcdef0123\n").unwrap();
        assert_eq!(load_or_create(&cfg).unwrap().0, "0123456789abcdef0123");
        assert!(!dir.path().join(FILE_NAME).exists());
    }
}
