//! Throw-away PostgreSQL clusters and proxy processes for the integration tests.
//!
//! Every test gets its own cluster (initdb into a temp dir, a free port) and its own
//! `offshoot` process, and talks to both with real clients. Most start from
//! [`Fixture`]: a server holding database `shop` and a proxy serving it as source
//! `shop` on either [`Engine`]. Nothing outlives the test process: each test's
//! directories go with it, the shared template when the process ends.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use offshoot::pg::{Cluster, PgBin};
use tempfile::TempDir;
use tokio_postgres::{Client, NoTls};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The PostgreSQL server binaries the tests run: `OFFSHOOT_TEST_PG_BIN` (the version
/// matrix in `.ci/run` points it at another major's `bin` directory), else the ones
/// the proxy itself would find.
pub fn pg_bin_dir() -> Option<PathBuf> {
    std::env::var_os("OFFSHOOT_TEST_PG_BIN")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

pub fn pg_bin() -> PgBin {
    PgBin::find(pg_bin_dir().as_deref()).expect("PostgreSQL server binaries")
}

/// An initdb'd data directory made once per test run and copied for each cluster.
///
/// A `static` is never dropped, so the directory cannot be removed by a `Drop`: a
/// small clean-up process removes it when the test process ends, however it ends
/// (see [`remove_at_exit`]).
fn template_data() -> &'static Path {
    static TEMPLATE: OnceLock<(TempDir, PathBuf, ChildStdin)> = OnceLock::new();
    &TEMPLATE
        .get_or_init(|| {
            let dir = world_readable_tempdir();
            let exit_guard = remove_at_exit(dir.path());
            let cluster = Cluster {
                bin: pg_bin(),
                data: dir.path().join("data"),
                socket_dir: dir.path().join("run"),
                port: 5432,
                listen: String::new(),
                settings: vec![],
            };
            cluster.init("postgres", false).expect("initdb");
            let data = cluster.data.clone();
            (dir, data, exit_guard)
        })
        .1
}

/// Removes `dir` once this process has ended. A child shell waits for the end of its
/// standard input, whose only writer is the returned handle: the kernel closes it
/// when the process exits, whether it returns, panics, aborts or is killed, and the
/// shell then removes the directory. The child has a process group of its own, so a
/// Ctrl-C aimed at the test run does not stop it before its work is done.
// The shell outlives this process by design (its parent becomes init), so it is
// never waited for.
#[allow(clippy::zombie_processes)]
fn remove_at_exit(dir: &Path) -> ChildStdin {
    let mut cleaner = Command::new("sh")
        .args(["-c", "cat >/dev/null; rm -rf -- \"$1\"", "sh"])
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("start the clean-up process");
    cleaner.stdin.take().expect("piped stdin")
}

/// The user a proxy started as root drops to (`process.user`'s default).
pub const PROXY_USER: &str = "offshoot";

/// Makes sure [`PROXY_USER`] exists when the tests run as root, so every proxy they
/// start runs the way a root-started deployment does: as that user, with a
/// privileged helper (`.ci/run` creates the user too).
pub fn ensure_proxy_user() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| ensure_user(PROXY_USER));
}

/// Creates system user `name` (with a group of its own) if it is missing and the
/// tests run as root.
pub fn ensure_user(name: &str) {
    static CREATING: Mutex<()> = Mutex::new(());
    let _one = CREATING.lock().unwrap_or_else(|p| p.into_inner());
    let exists = || nix::unistd::User::from_name(name).ok().flatten().is_some();
    if !nix::unistd::Uid::effective().is_root() || exists() {
        return;
    }
    let out = Command::new("useradd")
        .args(["--system", "--user-group", "--no-create-home"])
        .args(["--shell", "/usr/sbin/nologin", name])
        .output()
        .expect("run useradd");
    // Another test process may have created it in between.
    assert!(
        out.status.success() || exists(),
        "creating the {name} user: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `(uid, gid)` a proxy started by these tests serves as: [`PROXY_USER`]'s when the
/// tests run as root, else the tests' own.
pub fn proxy_owner() -> (u32, u32) {
    if nix::unistd::Uid::effective().is_root() {
        ensure_proxy_user();
        let u = nix::unistd::User::from_name(PROXY_USER)
            .unwrap()
            .expect("the proxy user");
        (u.uid.as_raw(), u.gid.as_raw())
    } else {
        (
            nix::unistd::Uid::effective().as_raw(),
            nix::unistd::Gid::effective().as_raw(),
        )
    }
}

/// Gives `path` to the proxy's user (what a test writes into a proxy's state
/// directory must stay the proxy's to replace).
pub fn give_to_proxy(path: &Path) {
    let (uid, gid) = proxy_owner();
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
}

/// A temp dir the `postgres` user can enter (tests run as root).
pub fn world_readable_tempdir() -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix("offshoot-it")
        .tempdir()
        .unwrap();
    // The server runs as `postgres` when the tests run as root.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    dir
}

/// A running throw-away PostgreSQL server on 127.0.0.1.
pub struct PgServer {
    pub cluster: Cluster,
    pub port: u16,
    _dir: TempDir,
}

impl PgServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// `hba` lines replace the default trust-everything pg_hba.conf.
    pub fn start_with(hba: &[&str]) -> Self {
        let dir = world_readable_tempdir();
        let data = dir.path().join("data");
        let status = Command::new("cp")
            .arg("-a")
            .arg(template_data())
            .arg(&data)
            .status()
            .unwrap();
        assert!(status.success(), "copying the template cluster");
        if !hba.is_empty() {
            std::fs::write(data.join("pg_hba.conf"), hba.join("\n") + "\n").unwrap();
        }
        let mut cluster = Cluster {
            bin: pg_bin(),
            data,
            socket_dir: dir.path().join("run"),
            port: 0,
            listen: "127.0.0.1".into(),
            settings: vec![
                ("fsync".into(), "off".into()),
                ("max_connections".into(), "100".into()),
                ("shared_buffers".into(), "16MB".into()),
            ],
        };
        // Another test may take the probed port before the server binds it.
        for attempt in 1.. {
            cluster.port = free_port();
            match cluster.start() {
                Ok(_) => break,
                Err(e) if attempt < 5 && e.to_string().contains("already in use") => continue,
                Err(e) => panic!("start PostgreSQL: {e:#}"),
            }
        }
        let port = cluster.port;
        Self {
            cluster,
            port,
            _dir: dir,
        }
    }

    pub fn url(&self, db: &str) -> String {
        format!(
            "host={} port={} user=postgres dbname={db}",
            self.cluster.socket_dir.display(),
            self.port
        )
    }

    /// A superuser session straight to the server (not through the proxy).
    pub async fn direct(&self, db: &str) -> Client {
        connect(&self.url(db)).await.expect("direct connection")
    }

    pub async fn databases(&self) -> Vec<String> {
        let c = self.direct("postgres").await;
        c.query(
            "SELECT datname::text FROM pg_database WHERE NOT datistemplate ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    }

    /// Creates database `name` with table `items(id int, note text)` holding 3 rows.
    pub async fn make_source(&self, name: &str) {
        let c = self.direct("postgres").await;
        c.batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap();
        drop(c);
        let c = self.direct(name).await;
        c.batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, note text); \
             INSERT INTO items VALUES (1, 'one'), (2, 'two'), (3, 'three');",
        )
        .await
        .unwrap();
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self
            .cluster
            .bin
            .command("pg_ctl")
            .args(["stop", "-m", "immediate", "-D"])
            .arg(&self.cluster.data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

pub async fn connect(conn: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conn, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A running `offshoot serve` process with its own config and state directory.
pub struct ProxyProc {
    pub port: u16,
    pub admin: u16,
    pub dir: TempDir,
    child: Option<Child>,
}

impl ProxyProc {
    /// Starts the proxy with `body` appended to a config that sets the listeners and
    /// state dir. `body` holds `[sources.*]` and any other sections. Without an
    /// `[auth]` section the proxy runs with `auth.method = "trust"` (the clusters
    /// trust local connections); the authentication tests set their own.
    pub fn start(body: &str) -> Self {
        let auth = if body.contains("[auth]") {
            ""
        } else {
            "[auth]\nmethod = \"trust\"\n"
        };
        // Servers the proxy starts itself (instance branches, the embedded server)
        // are of the version under test.
        let (embedded, body) = match pg_bin_dir() {
            Some(dir) if !body.contains("bin_dir") => {
                let line = format!("[embedded]\nbin_dir = \"{}\"\n", dir.display());
                if body.contains("[embedded]\n") {
                    (String::new(), body.replacen("[embedded]\n", &line, 1))
                } else {
                    (line, body.to_owned())
                }
            }
            _ => (String::new(), body.to_owned()),
        };
        let body = body.as_str();
        ensure_proxy_user();
        let dir = world_readable_tempdir();
        let mut p = Self {
            port: 0,
            admin: 0,
            dir,
            child: None,
        };
        // A free port can be taken by a parallel test between the probe and the bind:
        // pick new ones when that happens.
        for attempt in 1.. {
            p.port = free_port();
            p.admin = free_port();
            admin_token_at(p.admin, p.dir.path().join("state/admin.token"));
            let config = format!(
                "[proxy]\nlisten = \"127.0.0.1:{}\"\nrelay_threads = 2\n{}\n\
                 [admin]\nlisten = \"127.0.0.1:{}\"\n\
                 [state]\ndir = \"{}\"\n{auth}{embedded}{}",
                p.port,
                proxy_extra(body),
                p.admin,
                p.dir.path().join("state").display(),
                strip_proxy(body),
            );
            // Root's alone, as a deployment keeps it: the proxy reads it before it
            // drops root, and a branch server's user never can.
            let file = p.dir.path().join("offshoot.toml");
            std::fs::write(&file, config).unwrap();
            std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
            match p.try_spawn() {
                Ok(()) => break,
                Err(log) if attempt < 5 && log.contains("Address already in use") => continue,
                Err(log) => panic!("offshoot exited early:\n{log}"),
            }
        }
        p
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("offshoot.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn spawn(&mut self) {
        if let Err(log) = self.try_spawn() {
            panic!("offshoot exited early:\n{log}");
        }
    }

    /// Starts the process and waits for `/healthz`; `Err(log)` if it exited.
    fn try_spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_offshoot"))
            .arg("serve")
            .arg("--config")
            .arg(self.dir.path().join("offshoot.toml"))
            .env("RUST_LOG", "offshoot=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!("({status})\n{}", self.log()));
            }
            if http(self.admin, "GET", "/healthz", None).0 == 200 {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "offshoot did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The proxy's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Asks the running proxy to reload its TLS certificate.
    pub fn sighup(&self) {
        let pid = self.child.as_ref().expect("running").id() as i32;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGHUP,
        )
        .expect("SIGHUP sent");
    }

    /// SIGKILL, then start again on the same config and state.
    pub fn kill9_and_restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit status success.
    pub fn terminate(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_err() {
            return false;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match c.try_wait() {
                Ok(Some(status)) => return status.success(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    let _ = c.kill();
                    let _ = c.wait();
                    return false;
                }
            }
        }
    }

    pub fn url(&self, db: &str) -> String {
        self.url_as("postgres", db)
    }

    pub fn url_as(&self, user: &str, db: &str) -> String {
        format!("host=127.0.0.1 port={} user={user} dbname={db}", self.port)
    }

    pub async fn connect(&self, db: &str) -> Result<Client, tokio_postgres::Error> {
        connect(&self.url(db)).await
    }

    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        http(self.admin, method, path, body)
    }

    pub fn metric(&self, line_prefix: &str) -> f64 {
        let (_, text) = self.api("GET", "/metrics", None);
        text.lines()
            .find(|l| l.starts_with(line_prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    /// The branch names `/api/v1/branches` lists, in its order.
    pub fn branch_names(&self) -> Vec<String> {
        self.branches()
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["branch"].as_str().unwrap().to_owned())
            .collect()
    }

    pub fn branches(&self) -> serde_json::Value {
        let (status, body) = self.api("GET", "/api/v1/branches", None);
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Branch `name` (of any source) as `/api/v1/branches` lists it, if it is listed.
    pub fn branch(&self, name: &str) -> Option<serde_json::Value> {
        let list = self.branches();
        list.as_array()
            .unwrap()
            .iter()
            .find(|b| b["branch"] == name)
            .cloned()
    }
}

/// Lines of `body` that belong in the `[proxy]` section (before any other header).
fn proxy_extra(body: &str) -> String {
    body.lines()
        .take_while(|l| !l.trim_start().starts_with('['))
        .collect::<Vec<_>>()
        .join("\n")
}

fn strip_proxy(body: &str) -> String {
    body.lines()
        .skip_while(|l| !l.trim_start().starts_with('['))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Drop for ProxyProc {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("---- offshoot log ----\n{}", self.log());
        }
    }
}

/// Admin ports of the proxies started here, and the token file each one's `serve`
/// makes, so [`http`] can send the token.
static ADMIN_TOKENS: Mutex<Vec<(u16, PathBuf)>> = Mutex::new(Vec::new());

fn admin_token_at(port: u16, file: PathBuf) {
    let mut tokens = ADMIN_TOKENS.lock().unwrap();
    tokens.retain(|(p, _)| *p != port);
    tokens.push((port, file));
}

/// The admin token of the proxy on `port`, once its `serve` has written it.
pub fn admin_token(port: u16) -> Option<String> {
    let tokens = ADMIN_TOKENS.lock().unwrap();
    let (_, file) = tokens.iter().find(|(p, _)| *p == port)?;
    std::fs::read_to_string(file)
        .ok()
        .map(|t| t.trim().to_owned())
}

/// A bare HTTP/1.1 request (with the proxy's admin token); returns (status, body).
/// Status 0 if unreachable.
pub fn http(port: u16, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
    let body = body.unwrap_or("");
    let auth = admin_token(port)
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut resp = String::new();
    if s.read_to_string(&mut resp).is_err() {
        return (0, String::new());
    }
    (http_status(&resp), http_body(&resp).to_owned())
}

/// The status code of an HTTP/1.1 response (0 when there is none).
pub fn http_status(resp: &str) -> u16 {
    resp.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// The body of an HTTP/1.1 response (empty when there is none).
pub fn http_body(resp: &str) -> &str {
    resp.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

/// One HTTP/1.1 request with exactly the headers given (plus `Connection: close`
/// and `Content-Length`), and no token; returns the status and the whole
/// response, headers included.
pub fn http_exact(
    port: u16,
    request_line: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut req = format!("{request_line} HTTP/1.1\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    (http_status(&resp), resp)
}

/// Runs `offshoot <args> --admin <proxy's admin address> --config <its config>`
/// (the CLI finds the admin token through the configuration).
pub fn offshoot_cli(proxy: &ProxyProc, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_offshoot"))
        .args(args)
        .arg("--admin")
        .arg(format!("127.0.0.1:{}", proxy.admin))
        .arg("--config")
        .arg(proxy.dir.path().join("offshoot.toml"))
        .output()
        .unwrap()
}

/// The SQLSTATE of a failed connection or query.
pub fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.code().code().to_owned())
        .unwrap_or_else(|| format!("not a server error: {e}"))
}

/// (SQLSTATE, message) of a failed connection attempt; panics if it succeeds.
pub async fn refused(conn: &str) -> (String, String) {
    match connect(conn).await {
        Ok(_) => panic!("connected, but should have been refused: {conn}"),
        Err(e) => (
            sqlstate(&e),
            e.as_db_error()
                .map(|d| d.message().to_owned())
                .unwrap_or_default(),
        ),
    }
}

/// Polls `f` every 100 ms until it is true or `secs` pass.
pub async fn eventually(secs: u64, f: impl FnMut() -> bool) -> bool {
    eventually_every(secs, Duration::from_millis(100), f).await
}

/// Polls `f` every `every` until it is true or `secs` pass: for a state that lasts
/// only a moment (a clone being made), which a 100 ms poll can miss.
pub async fn eventually_every(secs: u64, every: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(every).await;
    }
    f()
}

/// A `[sources.<name>]` section for a source on `pg`.
pub fn source(name: &str, pg: &PgServer, extra: &str) -> String {
    format!(
        "[sources.{name}]\nserver = \"host=127.0.0.1 port={} user=postgres dbname=postgres\"\n\
         database = \"{name}\"\n{extra}\n",
        pg.port
    )
}

// Additions for the fault tests (`faults.rs`): a proxy process driven signal by signal.
impl ProxyProc {
    /// Sends SIGTERM and returns at once; [`ProxyProc::try_exit`] tells when it ends.
    pub fn sigterm(&self) {
        let child = self.child.as_ref().expect("offshoot is running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    }

    /// The exit status once the process has ended (reaping it); `None` while it runs.
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        let child = self
            .child
            .as_mut()
            .expect("offshoot was started and not yet reaped");
        let status = child.try_wait().unwrap()?;
        self.child = None;
        Some(status)
    }

    /// Starts the proxy again (after [`ProxyProc::kill9`]) on the same config and state.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "offshoot is still running");
        self.spawn();
    }
}

/// How a source makes its branches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// `CREATE DATABASE ... TEMPLATE` on the source's server.
    Database,
    /// A copy of the whole server, one postmaster per branch.
    Instance,
}

impl Engine {
    /// A `[sources.<name>]` section on this engine for database `<name>` on `pg`;
    /// `extra` goes inside the section and may end with further sections.
    pub fn source(self, name: &str, pg: &PgServer, extra: &str) -> String {
        match self {
            Engine::Database => source(name, pg, extra),
            Engine::Instance => instance_source(name, pg, extra),
        }
    }
}

/// A `[sources.<name>]` section on the `instance` engine, copying `pg` (database
/// `<name>` made with [`PgServer::make_source`]).
pub fn instance_source(name: &str, pg: &PgServer, extra: &str) -> String {
    format!(
        "[sources.{name}]\nengine = \"instance\"\n\
         upstream = \"host=127.0.0.1 port={} user=postgres\"\n\
         database = \"{name}\"\nshared_buffers = \"16MB\"\n{extra}\n",
        pg.port
    )
}

/// A source server holding database `shop` (table `items`, 3 rows) and a proxy
/// serving it as source `shop`: what most tests start from. The fields drop in
/// order, so the proxy stops before the server.
pub struct Fixture {
    pub proxy: ProxyProc,
    pub pg: PgServer,
}

impl Fixture {
    /// Source `shop` on `engine`; `extra` goes into its `[sources.shop]` section and
    /// may end with further sections (`[reaper]` ...).
    pub async fn start(engine: Engine, extra: &str) -> Self {
        Self::start_with(engine, "", extra).await
    }

    /// As [`Fixture::start`], with `head` before the source section: `[proxy]` keys
    /// first (`shutdown_grace = "2s"`), then whole sections.
    pub async fn start_with(engine: Engine, head: &str, extra: &str) -> Self {
        let pg = PgServer::start();
        pg.make_source("shop").await;
        Self::over(pg, engine, head, extra)
    }

    /// A proxy over `pg`, on which the caller made database `shop`.
    pub fn over(pg: PgServer, engine: Engine, head: &str, extra: &str) -> Self {
        let sep = if head.is_empty() || head.ends_with('\n') {
            ""
        } else {
            "\n"
        };
        let proxy = ProxyProc::start(&format!("{head}{sep}{}", engine.source("shop", &pg, extra)));
        Self { proxy, pg }
    }
}

/// The clones of source `shop` on `pg` (databases named `shop__*`), by name.
pub async fn clones(pg: &PgServer) -> Vec<String> {
    pg.databases()
        .await
        .into_iter()
        .filter(|d| d.starts_with("shop__"))
        .collect()
}

/// The ownership comment (marker) of database `name` on `pg`.
pub async fn db_comment(pg: &PgServer, name: &str) -> Option<String> {
    pg.direct("postgres")
        .await
        .query_one(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0)
}

/// Writes a record of branch `branch` of source `shop` into the stopped `proxy`'s
/// state, as the registry does: `state` is `provisioning` (written before a creation
/// starts) or `ready`.
pub fn write_record(proxy: &ProxyProc, engine: &str, branch: &str, clone: &str, state: &str) {
    let dir = proxy.dir.path().join("state/branches/shop");
    std::fs::create_dir_all(&dir).unwrap();
    give_to_proxy(dir.parent().unwrap());
    give_to_proxy(&dir);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let rec = format!(
        "{{\"source\":\"shop\",\"branch\":\"{branch}\",\"engine\":\"{engine}\",\
         \"clone_name\":\"{clone}\",\"state\":\"{state}\",\
         \"created_at\":{now},\"last_active\":{now}}}"
    );
    let file = dir.join(format!("{branch}.json"));
    std::fs::write(&file, rec).unwrap();
    give_to_proxy(&file);
}

/// Writes `note` as row 10 of `items`: a mark to recognise a branch's data by.
pub async fn mark(c: &Client, note: &str) {
    c.execute("INSERT INTO items VALUES (10, $1)", &[&note])
        .await
        .unwrap();
}

/// The note [`mark`] wrote on this branch.
pub async fn mark_of(c: &Client) -> String {
    c.query_one("SELECT note FROM items WHERE id = 10", &[])
        .await
        .unwrap()
        .get(0)
}

/// Rows in table `items` (3 in the source `make_source` made).
pub async fn count(c: &Client) -> i64 {
    try_count(c).await.expect("SELECT count(*) FROM items")
}

/// [`count`] for a session that may have been ended.
pub async fn try_count(c: &Client) -> Result<i64, tokio_postgres::Error> {
    Ok(c.query_one("SELECT count(*) FROM items", &[]).await?.get(0))
}

/// Where an `instance` source keeps its snapshots and branches.
pub fn instance_storage(proxy: &ProxyProc, source: &str) -> PathBuf {
    proxy.dir.path().join("state/instances").join(source)
}

/// The data directory of an `instance` branch.
pub fn branch_data(proxy: &ProxyProc, source: &str, branch: &str) -> PathBuf {
    instance_storage(proxy, source)
        .join("branches")
        .join(branch)
        .join("data")
}

/// Pids of live processes working below `dir` (a postmaster and its children
/// `chdir` into their data directory).
pub fn processes_in(dir: &Path) -> Vec<i32> {
    let Ok(dir) = dir.canonicalize() else {
        return Vec::new();
    };
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(&dir))
        })
        .collect()
}

/// The postmaster pid a data directory's `postmaster.pid` names.
pub fn postmaster_pid(data: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(data.join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// Whether this run must not skip a test: under CI (`CI=true`) every test runs, so
/// a missing prerequisite is a failure there, not a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Says loudly that `test` cannot run here and why; under CI it fails instead.
pub fn skip(test: &str, reason: &str) {
    assert!(
        !in_ci(),
        "{test} cannot run: {reason} (CI=true: every test must run; .ci/run installs what they need)"
    );
    eprintln!("SKIPPED {test}: {reason}");
}
