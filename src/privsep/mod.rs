//! Privilege separation: a proxy started as root keeps root only in a small helper
//! process and serves the network as an unprivileged user.
//!
//! At start, as root: the state directory is given to the proxy's user
//! (`process.user`, default `offshoot`), the helper is started (this binary again,
//! with [`HELPER_ARG`]) with a pipe each way, the listeners are bound and the keys
//! read; then the process drops to the proxy's user ([`Plan::drop_privileges`]:
//! supplementary groups, gid, uid, no new privileges) and checks that root cannot
//! be regained. From then on every step that needs another user (starting,
//! stopping and signalling branch servers, copying a snapshot into a clone and
//! giving it to the servers' user, removing a clone, `initdb`/`pg_ctl`/
//! `pg_basebackup`, reading a file in a server's data directory) is one typed
//! request ([`wire::Op`]) over the pipe, answered by the helper, which checks every
//! path against its storage roots ([`serve::Hello`]).
//!
//! The functions that do such steps (`pg`, the `instance` engine's `postmaster`
//! and `copy`) look at [`channel`]: when it is set they send the request, else
//! they do the work themselves, as they always did. A proxy not started as root
//! has no helper and nothing changes.
//!
//! Invariant: once [`Plan::drop_privileges`] has returned, no thread of the
//! network-facing process runs as root, holds a root group or can regain either.

pub mod channel;
pub mod serve;
pub mod wire;

use std::io::Write;
use std::os::unix::fs::{lchown, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use nix::unistd::{Gid, Uid, User};
use tracing::{info, warn};

pub use channel::Channel;
pub use serve::{Executor, Hello};
pub use wire::{Op, Owner, PidReply, Reply, WireError};

/// The hidden first argument that makes the binary the helper.
pub const HELPER_ARG: &str = "__privsep-helper";

static CHANNEL: OnceLock<&'static Channel> = OnceLock::new();

/// The helper, once this process has started one (it was started as root).
pub fn channel() -> Option<&'static Channel> {
    CHANNEL.get().copied()
}

/// What a proxy started as root will do: the users it separates.
pub struct Plan {
    pub proxy: User,
    /// The servers' users: the default first, then the sources' own.
    pub servers: Vec<User>,
}

/// Decides from `process.*` whether to separate (`server_users`: every user branch
/// servers may run as, the default first). `Ok(None)`: not started as root
/// (nothing changes), or `process.user = "root"` (the explicit opt-out, warned
/// about). A missing user is an error that says how to create it.
pub fn plan(user: &str, server_users: &[&str]) -> Result<Option<Plan>> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    if user == "root" {
        warn!(
            "process.user = \"root\": the proxy keeps running as root, so a flaw in the code that \
             parses clients' bytes would run as root; create an unprivileged user for it \
             (`useradd --system --user-group --no-create-home --shell /usr/sbin/nologin offshoot`) \
             and remove that setting"
        );
        return Ok(None);
    }
    let proxy = User::from_name(user)
        .with_context(|| format!("process.user: looking up {user:?}"))?
        .ok_or_else(|| {
            anyhow!(
                "process.user: started as root, the proxy drops to the user {user:?}, which does \
                 not exist; create it (`useradd --system --user-group --no-create-home --shell \
                 /usr/sbin/nologin {user}`), name another user in process.user, or keep the proxy \
                 root with process.user = \"root\" (not recommended)"
            )
        })?;
    if proxy.uid.is_root() || proxy.gid.as_raw() == 0 {
        bail!("process.user: {user:?} has uid or gid 0; name an unprivileged user");
    }
    let mut servers = Vec::new();
    for name in server_users {
        let server = User::from_name(name)
            .with_context(|| format!("process.server_user: looking up {name:?}"))?
            .ok_or_else(|| {
                anyhow!(
                    "process.server_user: branch servers run as {name:?}, which does not \
                     exist; create it (the Debian postgresql package creates `postgres`)"
                )
            })?;
        if server.uid == proxy.uid || server.uid.is_root() {
            bail!(
                "the servers' user {name:?} is root or the proxy's own user (uid {})",
                server.uid
            );
        }
        servers.push(server);
    }
    if servers.is_empty() {
        bail!("process.server_user: no user for branch servers");
    }
    Ok(Some(Plan { proxy, servers }))
}

impl Plan {
    fn owner(user: &User) -> Owner {
        Owner {
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        }
    }

    /// Gives `dir` (created if missing) to the proxy's user, `mode` 0711: the
    /// servers' user may pass through it to its data directories, never list it.
    /// A link is given, never what it points at.
    pub fn own_dir(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        lchown(
            dir,
            Some(self.proxy.uid.as_raw()),
            Some(self.proxy.gid.as_raw()),
        )
        .with_context(|| format!("cannot give {} to {}", dir.display(), self.proxy.name))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))?;
        Ok(())
    }

    /// Gives the branch records an earlier proxy (running as root) wrote to the
    /// proxy's user: `<state.dir>/branches`, its source directories and their
    /// `.json` files, never following a link.
    pub fn own_records(&self, state_dir: &Path) -> Result<()> {
        let (uid, gid) = (self.proxy.uid.as_raw(), self.proxy.gid.as_raw());
        let records = state_dir.join("branches");
        let Ok(meta) = std::fs::symlink_metadata(&records) else {
            return Ok(());
        };
        if !meta.is_dir() {
            return Ok(());
        }
        lchown(&records, Some(uid), Some(gid))?;
        for source in std::fs::read_dir(&records)?.flatten() {
            if !source.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            lchown(source.path(), Some(uid), Some(gid))?;
            for rec in std::fs::read_dir(source.path())?.flatten() {
                if rec.file_type().is_ok_and(|t| t.is_file()) {
                    lchown(rec.path(), Some(uid), Some(gid))?;
                }
            }
        }
        Ok(())
    }

    /// Starts the helper (this binary, as root, in a process group of its own so a
    /// Ctrl-C meant for the proxy does not stop it first) and makes it the
    /// [`channel`] of this process.
    pub fn start_helper(&self, roots: Vec<PathBuf>, bin_dir: Option<PathBuf>) -> Result<()> {
        let hello = Hello {
            roots,
            bin_dir,
            server_user: self.servers[0].name.clone(),
            servers: self.servers.iter().map(Self::owner).collect(),
            proxy: Self::owner(&self.proxy),
        };
        // /proc/self/exe is this binary, whatever path started it.
        let mut child = Command::new("/proc/self/exe")
            .arg(HELPER_ARG)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .context("cannot start the privileged helper")?;
        let mut line = serde_json::to_vec(&hello)?;
        line.push(b'\n');
        child
            .stdin
            .as_mut()
            .context("the helper's stdin")?
            .write_all(&line)
            .context("cannot talk to the privileged helper")?;
        let pid = child.id();
        let channel = Channel::new(child).context("cannot read the privileged helper")?;
        CHANNEL
            .set(channel)
            .map_err(|_| anyhow!("a privileged helper was already started"))?;
        info!(pid, server_user = %self.servers[0].name, "privileged helper started");
        Ok(())
    }

    /// Becomes the proxy's user for good: only its primary group, then gid and uid
    /// (real, effective and saved), no new privileges through exec; then checks
    /// that root cannot be regained.
    pub fn drop_privileges(self) -> Result<()> {
        use nix::unistd::{
            getgroups, getresgid, getresuid, setgroups, setresgid, setresuid, setuid,
        };
        let (uid, gid) = (self.proxy.uid, self.proxy.gid);
        setgroups(&[gid]).context("setgroups")?;
        setresgid(gid, gid, gid).context("setresgid")?;
        setresuid(uid, uid, uid).context("setresuid")?;
        nix::sys::prctl::set_no_new_privs().context("PR_SET_NO_NEW_PRIVS")?;
        let ids = getresuid()?;
        let gids = getresgid()?;
        let groups = getgroups()?;
        if [ids.real, ids.effective, ids.saved] != [uid; 3]
            || [gids.real, gids.effective, gids.saved] != [gid; 3]
            || groups.iter().any(|g| *g == Gid::from_raw(0))
            || setuid(Uid::from_raw(0)).is_ok()
        {
            bail!("dropping privileges to {} did not hold", self.proxy.name);
        }
        info!(user = %self.proxy.name, uid = uid.as_raw(), "dropped root: serving as an unprivileged user");
        Ok(())
    }
}

/// The helper's `main`: reads its [`Hello`], builds the executor from it, and serves
/// requests on stdin until the proxy closes it.
pub fn helper_main<E: Executor>(make: impl FnOnce(&Hello) -> Result<E>) -> Result<()> {
    let mut stdin = std::io::BufReader::new(std::io::stdin());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stdin, &mut first)?;
    let hello: Hello = serde_json::from_str(&first).context("the helper's start message")?;
    let executor = make(&hello)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("offshoot-helper")
        .build()?;
    runtime.block_on(serve::serve(hello, executor, stdin, std::io::stdout()));
    // The proxy is gone (or stopping): work still running for it, such as a copy
    // for a creation it will clear on its next start, ends with this process.
    runtime.shutdown_background();
    Ok(())
}
