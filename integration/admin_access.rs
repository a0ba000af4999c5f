//! Who may use the admin API: the Host and cross-site checks, the bearer token,
//! JSON-only writes, `public_read`, and the token `serve` makes for the CLI.

use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// The request from the security report: what any web page can make a browser send.
fn the_cross_site_post(port: u16, path: &str, extra: &[(&str, &str)]) -> (u16, String) {
    let mut headers = vec![
        ("Origin", "http://evil"),
        ("Host", "evil:9187"),
        ("Content-Type", "text/plain"),
    ];
    headers.extend_from_slice(extra);
    http_exact(port, &format!("POST {path}"), &headers, "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_and_rebinding_requests_are_refused_and_change_nothing() {
    let pg = PgServer::start();
    pg.make_source("shop").await;
    let proxy = ProxyProc::start(&source("shop", &pg, ""));
    let token = admin_token(proxy.admin).expect("serve made a token");
    let auth = bearer(&token);
    let before = pg.databases().await;

    // Exactly the report's request, then the same with each part made "right" but
    // one: every variant is refused.
    let snapshots = "/api/v1/sources/shop/snapshots";
    let (status, text) = the_cross_site_post(proxy.admin, snapshots, &[]);
    assert_eq!(status, 421, "{text}");
    assert!(text.contains("admin.allowed_hosts"), "{text}");
    let (status, text) = http_exact(
        proxy.admin,
        &format!("POST {snapshots}"),
        &[
            ("Origin", "http://evil"),
            ("Host", &format!("127.0.0.1:{}", proxy.admin)),
            ("Content-Type", "application/json"),
            ("Authorization", &auth),
        ],
        "",
    );
    assert_eq!(status, 403, "a foreign Origin, even with the token: {text}");
    assert!(text.contains("cross-site"), "{text}");
    let (status, text) = http_exact(
        proxy.admin,
        &format!("POST {snapshots}"),
        &[
            ("Sec-Fetch-Site", "cross-site"),
            ("Host", "localhost"),
            ("Content-Type", "application/json"),
            ("Authorization", &auth),
        ],
        "",
    );
    assert_eq!(status, 403, "{text}");
    let (status, text) = http_exact(
        proxy.admin,
        &format!("POST {snapshots}"),
        &[
            ("Host", "localhost"),
            ("Content-Type", "text/plain"),
            ("Authorization", &auth),
        ],
        "",
    );
    assert_eq!(status, 415, "{text}");
    assert!(text.contains("application/json"), "{text}");
    let (status, text) = http_exact(
        proxy.admin,
        "POST /api/v1/branches",
        &[
            ("Host", "localhost"),
            ("Content-Type", "text/plain"),
            ("Authorization", &auth),
        ],
        r#"{"source":"shop","branch":"sneaky"}"#,
    );
    assert_eq!(status, 415, "{text}");

    // A DNS-rebound page reads with its own name as Host: refused, token or not.
    let (status, text) = http_exact(
        proxy.admin,
        "GET /api/v1/branches",
        &[
            ("Host", "rebind.attacker.example:9187"),
            ("Authorization", &auth),
        ],
        "",
    );
    assert_eq!(status, 421, "{text}");
    let (status, _) = http_exact(
        proxy.admin,
        "DELETE /api/v1/branches/shop/qa?force=true",
        &[
            ("Host", "rebind.attacker.example"),
            ("Content-Type", "application/json"),
            ("Authorization", &auth),
        ],
        "",
    );
    assert_eq!(status, 421);

    // Nothing was made: no snapshot, no branch, no database.
    let (status, text) = proxy.api("GET", snapshots, None);
    assert_eq!(status, 200, "{text}");
    assert_eq!(text.trim(), "[]", "{text}");
    assert!(proxy.branch_names().is_empty());
    assert_eq!(pg.databases().await, before);

    // The same write, made properly, works: the refusals above were the checks.
    let (status, text) = http_exact(
        proxy.admin,
        "POST /api/v1/branches",
        &[
            ("Host", &format!("127.0.0.1:{}", proxy.admin)),
            ("Origin", &format!("http://127.0.0.1:{}", proxy.admin)),
            ("Content-Type", "application/json; charset=utf-8"),
            ("Authorization", &auth),
        ],
        r#"{"source":"shop","branch":"proper"}"#,
    );
    assert_eq!(status, 201, "{text}");
    assert_eq!(proxy.branch_names(), ["proper"]);
    assert!(
        proxy.log().contains("admin request refused"),
        "refusals are logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_required_and_compared() {
    let pg = PgServer::start();
    pg.make_source("shop").await;
    let proxy = ProxyProc::start(&source("shop", &pg, ""));
    let token = admin_token(proxy.admin).unwrap();
    for path in [
        "/api/v1/branches",
        "/metrics",
        "/api/v1/sources",
        "/api/v1/orphans",
    ] {
        let (status, text) = http_exact(
            proxy.admin,
            &format!("GET {path}"),
            &[("Host", "localhost")],
            "",
        );
        assert_eq!(status, 401, "{path}: {text}");
        assert!(
            text.to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{text}"
        );
        assert!(
            text.contains("Authorization: Bearer"),
            "says what to send: {text}"
        );
        assert!(
            !text.contains(proxy.dir.path().to_str().unwrap()),
            "no server path: {text}"
        );
    }
    // Only the health probe (and the console's login page) answer without it.
    let (status, _) = http_exact(proxy.admin, "GET /healthz", &[("Host", "localhost")], "");
    assert_eq!(status, 200);
    // A console page sends a person to the login form instead.
    let (status, text) = http_exact(proxy.admin, "GET /branches", &[("Host", "localhost")], "");
    assert_eq!(status, 303, "{text}");
    assert!(text.contains("/login"), "{text}");
    let wrong = bearer(&format!("{}x", &token[..token.len() - 1]));
    for (line, headers) in [
        (
            "GET /api/v1/branches",
            vec![("Host", "localhost"), ("Authorization", wrong.as_str())],
        ),
        (
            "POST /api/v1/branches",
            vec![
                ("Host", "localhost"),
                ("Content-Type", "application/json"),
                ("Authorization", "Bearer"),
            ],
        ),
        (
            "POST /api/v1/branches",
            vec![
                ("Host", "localhost"),
                ("Content-Type", "application/json"),
                ("Authorization", token.as_str()),
            ],
        ),
    ] {
        let (status, text) = http_exact(
            proxy.admin,
            line,
            &headers,
            r#"{"source":"shop","branch":"x"}"#,
        );
        assert_eq!(status, 401, "{line} {headers:?}: {text}");
    }
    assert!(proxy.branch_names().is_empty());
    let (status, text) = http_exact(
        proxy.admin,
        "GET /api/v1/branches",
        &[("Host", "localhost"), ("Authorization", &bearer(&token))],
        "",
    );
    assert_eq!(status, 200, "{text}");
}

/// `offshoot serve` run the way the quick start runs it: from a directory holding
/// `conf/offshoot.toml` (here with no sources, so no PostgreSQL is needed) and a
/// relative `state.dir`.
struct Serve {
    child: Child,
    dir: tempfile::TempDir,
    admin: u16,
}

impl Serve {
    fn start(admin_section: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let admin = free_port();
        let config = format!(
            "[proxy]\nlisten = \"127.0.0.1:{}\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
             {admin_section}\n[state]\ndir = \".offshoot\"\n",
            free_port(),
        );
        std::fs::create_dir(dir.path().join("conf")).unwrap();
        std::fs::write(dir.path().join("conf/offshoot.toml"), config).unwrap();
        let child = Self::spawn(dir.path());
        let mut s = Self { child, dir, admin };
        s.wait_up();
        s
    }

    fn spawn(dir: &Path) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("serve.log"))
            .unwrap();
        Command::new(env!("CARGO_BIN_EXE_offshoot"))
            .current_dir(dir)
            .arg("serve")
            .env_remove("OFFSHOOT_CONFIG")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    /// Waits until the admin port answers at all (401 without a token).
    fn wait_up(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", self.admin)).is_err() {
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "serve exited: {}",
                self.log()
            );
            assert!(
                Instant::now() < deadline,
                "serve did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn restart(&mut self) {
        self.stop();
        self.child = Self::spawn(self.dir.path());
        self.wait_up();
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("conf/offshoot.toml")
    }

    fn token_path(&self) -> PathBuf {
        self.dir.path().join(".offshoot/admin.token")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `offshoot branch list` against this proxy, run from `cwd`.
    fn cli(&self, cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_offshoot"))
            .current_dir(cwd)
            .args([
                "branch",
                "list",
                "--admin",
                &format!("127.0.0.1:{}", self.admin),
            ])
            .args(args)
            .env_remove("OFFSHOOT_ADMIN_TOKEN")
            .env_remove("OFFSHOOT_CONFIG")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn serve_makes_a_private_token_that_the_cli_finds() {
    let mut serve = Serve::start("");
    let path = serve.token_path();
    let config = serve.config();
    let token = std::fs::read_to_string(&path).unwrap().trim().to_owned();
    assert!(token.len() >= 32, "{token}");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    // The banner comes once serve is ready, a little after its ports are bound.
    let banner = "admin API token: .offshoot/admin.token";
    let deadline = Instant::now() + Duration::from_secs(30);
    while !serve.log().contains(banner) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = serve.log();
    assert!(log.contains(banner), "serve says where the token is: {log}");

    // The quick start: the CLI run where serve runs, with no flag, finds it.
    let (ok, out) = serve.cli(serve.dir.path(), &[], &[]);
    assert!(ok, "{out}");
    assert!(out.contains("SOURCE"), "{out}");
    // The configuration named by --config or OFFSHOOT_CONFIG; its relative
    // state.dir is found from the same directory, as `serve` found it.
    let config = config.to_str().unwrap();
    let (ok, out) = serve.cli(serve.dir.path(), &["--config", config], &[]);
    assert!(ok, "{out}");
    let (ok, out) = serve.cli(serve.dir.path(), &[], &[("OFFSHOOT_CONFIG", config)]);
    assert!(ok, "{out}");
    // Elsewhere, with no configuration at hand: OFFSHOOT_ADMIN_TOKEN or --token-file.
    let elsewhere = tempfile::tempdir().unwrap();
    let (ok, out) = serve.cli(elsewhere.path(), &[], &[("OFFSHOOT_ADMIN_TOKEN", &token)]);
    assert!(ok, "{out}");
    let (ok, out) = serve.cli(
        elsewhere.path(),
        &["--token-file", path.to_str().unwrap()],
        &[],
    );
    assert!(ok, "{out}");
    // Without any of them the API says what it needs; a wrong token is named.
    let (ok, out) = serve.cli(elsewhere.path(), &[], &[]);
    assert!(
        !ok && out.contains("needs the admin token") && out.contains("401"),
        "{out}"
    );
    let (ok, out) = serve.cli(
        elsewhere.path(),
        &[],
        &[("OFFSHOOT_ADMIN_TOKEN", "0000000000000000000000")],
    );
    assert!(!ok && out.contains("admin token is wrong"), "{out}");

    // A restart keeps the token, so scripts and the CLI keep working.
    serve.restart();
    assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), token);
    let (ok, out) = serve.cli(serve.dir.path(), &[], &[]);
    assert!(ok, "{out}");
}

#[test]
fn public_read_lets_reads_through_but_not_writes() {
    let serve = Serve::start("public_read = true");
    for path in [
        "/healthz",
        "/metrics",
        "/api/v1/branches",
        "/api/v1/sources",
    ] {
        let (status, text) = http_exact(
            serve.admin,
            &format!("GET {path}"),
            &[("Host", "localhost")],
            "",
        );
        assert_eq!(status, 200, "{path}: {text}");
    }
    // Host and cross-site checks still apply to reads.
    let (status, _) = http_exact(serve.admin, "GET /api/v1/branches", &[("Host", "evil")], "");
    assert_eq!(status, 421);
    let (status, _) = http_exact(
        serve.admin,
        "GET /api/v1/branches",
        &[("Host", "localhost"), ("Origin", "http://evil")],
        "",
    );
    assert_eq!(status, 403);
    let (status, text) = http_exact(
        serve.admin,
        "POST /api/v1/branches",
        &[("Host", "localhost"), ("Content-Type", "application/json")],
        r#"{"source":"shop","branch":"x"}"#,
    );
    assert_eq!(status, 401, "{text}");
}

#[test]
fn a_reachable_listener_without_the_token_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("offshoot.toml");
    std::fs::write(
        &path,
        "[admin]\nlisten = \"0.0.0.0:9187\"\npublic_read = true\n",
    )
    .unwrap();
    for cmd in ["check", "serve"] {
        let out = Command::new(env!("CARGO_BIN_EXE_offshoot"))
            .args([cmd, "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd}: {err}");
        assert!(
            err.contains("admin.public_read") && err.contains("not a loopback"),
            "{err}"
        );
    }
    // The allowed names are checked too.
    std::fs::write(&path, "[admin]\nallowed_hosts = [\"evil:80\"]\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_offshoot"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin.allowed_hosts[0]"));
}
