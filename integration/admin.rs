//! The HTTP side: branch API, metrics, health, and configuration errors.

use std::process::Command;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branches_are_managed_through_the_api() {
    let Fixture { pg, proxy } = Fixture::start(Engine::Database, "").await;

    let (status, body) = proxy.api(
        "POST",
        "/api/v1/branches",
        Some(r#"{"source":"shop","branch":"ahead"}"#),
    );
    assert_eq!(status, 201, "{body}");
    let view: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(view["state"], "ready");
    assert_eq!(view["clone_name"], "shop__ahead");
    assert!(pg.databases().await.contains(&"shop__ahead".to_string()));
    // Asking again is not an error: it exists.
    let (status, _) = proxy.api(
        "POST",
        "/api/v1/branches",
        Some(r#"{"source":"shop","branch":"ahead"}"#),
    );
    assert_eq!(status, 200);

    for (body, want) in [
        (r#"{"source":"shop","branch":"Bad!"}"#, 400),
        (r#"{"source":"nope","branch":"x"}"#, 404),
        (r#"{"source":"shop"}"#, 422),
        ("not json", 400),
    ] {
        let (status, text) = proxy.api("POST", "/api/v1/branches", Some(body));
        assert_eq!(status, want, "{body}: {text}");
        assert!(text.contains("error"), "{text}");
    }

    // Deletion is refused while a client is connected, unless forced.
    let client = proxy.connect("shop.ahead").await.unwrap();
    let list = proxy.branches();
    assert_eq!(list[0]["connections"], 1);
    let (status, body) = proxy.api("DELETE", "/api/v1/branches/shop/ahead", None);
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("open connection"), "{body}");
    let (status, body) = proxy.api("DELETE", "/api/v1/branches/shop/ahead?force=true", None);
    assert_eq!(status, 204, "{body}");
    let err = client.simple_query("SELECT 1").await.unwrap_err();
    // The session was ended under the client: its next query finds it closed.
    assert!(err.is_closed(), "{err}");
    assert!(!pg.databases().await.contains(&"shop__ahead".to_string()));
    let (status, _) = proxy.api("DELETE", "/api/v1/branches/shop/ahead", None);
    assert_eq!(status, 404);
    assert_eq!(
        proxy.metric("offshoot_branches_expired_total{reason=\"api\",source=\"shop\"}"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_valid_prometheus_text() {
    let Fixture { pg: _pg, proxy } = Fixture::start(Engine::Database, "").await;
    let c = proxy.connect("shop.m").await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();

    let (status, text) = proxy.api("GET", "/metrics", None);
    assert_eq!(status, 200);
    let mut names = std::collections::BTreeSet::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# ") {
            assert!(
                rest.starts_with("HELP ") || rest.starts_with("TYPE "),
                "{line}"
            );
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("series and value");
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{line}"
        );
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
                assert!(!labels.contains("branch="), "no per-branch labels: {line}");
            }
        }
        names.insert(name.to_owned());
    }
    for want in [
        "offshoot_client_connections",
        "offshoot_connections_total",
        "offshoot_provision_seconds_bucket",
        "offshoot_branches",
        "offshoot_branches_expired_total",
        "offshoot_bytes_total",
    ] {
        assert!(names.contains(want), "missing {want} in\n{text}");
    }
    assert_eq!(
        proxy.metric("offshoot_client_connections{source=\"shop\"}"),
        1.0
    );
    assert!(proxy.metric("offshoot_bytes_total{direction=\"server_to_client\"}") > 0.0);
    assert_eq!(
        proxy.metric("offshoot_branches{source=\"shop\",state=\"ready\"}"),
        1.0
    );

    let (status, body) = proxy.api("GET", "/healthz", None);
    assert_eq!(status, 200);
    assert!(body.contains("\"ok\""));
}

fn check(config: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_offshoot"))
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout),
    )
}

#[test]
fn bad_configuration_names_the_key() {
    for (config, key) in [
        ("[proxy]\nlisten = \"not an address\"\n", "proxy.listen"),
        (
            "[proxy]\nstartup_timeout = \"ten\"\n",
            "proxy.startup_timeout",
        ),
        ("[proxy]\nseparator = \"x\"\n", "proxy.separator"),
        (
            "[sources.shop]\nidle_expire = \"2 fortnights\"\n",
            "sources.shop.idle_expire",
        ),
        (
            "[sources.shop]\npersistent = [\"QA\"]\n",
            "sources.shop.persistent",
        ),
        (
            "[sources.shop]\nserver = \"port=notanumber\"\n",
            "sources.shop.server",
        ),
        ("[sources.shop]\nmax_branch = 3\n", "max_branch"),
    ] {
        let (ok, out) = check(config);
        assert!(!ok, "{config} should be refused");
        assert!(out.contains(key), "{config}: {out}");
    }
    let (ok, out) = check("[sources.shop]\nidle_expire = \"30m\"\n");
    assert!(ok, "{out}");
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/offshoot.toml");
    let (ok, out) = check(&std::fs::read_to_string(shipped).unwrap());
    assert!(ok, "the shipped config is valid: {out}");

    // Environment overrides use OFFSHOOT__SECTION__KEY and are validated too.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_offshoot"))
        .args(["check", "--config"])
        .arg(&path)
        .env("OFFSHOOT__PROXY__SEPARATOR", "-")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("proxy.separator"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_drives_the_api() {
    let Fixture { pg, proxy } = Fixture::start(Engine::Database, "").await;
    let admin = format!("127.0.0.1:{}", proxy.admin);
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_offshoot"))
            .arg("branch")
            .args(args)
            .args(["--admin", &admin])
            .arg("--config")
            .arg(proxy.dir.path().join("offshoot.toml"))
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = cli(&["create", "shop.from-cli", "--persistent"]);
    assert!(ok, "{out}");
    assert!(out.contains("shop__from-cli"), "{out}");
    let (ok, out) = cli(&["list"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("from-cli") && out.contains("ready (keep)"),
        "{out}"
    );
    let (ok, out) = cli(&["create", "shop.Nope"]);
    assert!(!ok);
    assert!(out.contains("invalid branch name"), "{out}");
    let (ok, out) = cli(&["delete", "shop.from-cli"]);
    assert!(!ok && out.contains("persistent"), "{out}");
    let (ok, out) = cli(&["delete", "shop.from-cli", "--force"]);
    assert!(ok, "{out}");
    assert!(!pg.databases().await.contains(&"shop__from-cli".to_string()));
    let (ok, out) = cli(&["delete", "shop.from-cli"]);
    assert!(!ok && out.contains("does not exist"), "{out}");
}

/// Runs `offshoot <args> --admin <proxy's admin address>` with the proxy's
/// configuration (where the CLI finds the admin token); returns success and stderr.
fn cli(proxy: &ProxyProc, args: &[&str]) -> (bool, String) {
    let out = offshoot_cli(proxy, args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_written_for_people_in_the_cli_and_the_api() {
    let pg = PgServer::start();
    pg.make_source("shop").await;
    let proxy = ProxyProc::start(&source("shop", &pg, ""));

    // An unknown source is named as typed, never as Rust debug text.
    let (ok, err) = cli(&proxy, &["branch", "delete", "nope.x"]);
    assert!(!ok);
    assert!(err.contains(r#"source "nope" does not exist"#), "{err}");
    assert!(err.contains("configured sources: shop"), "{err}");
    assert!(!err.contains("SourceName"), "{err}");
    let (status, body) = proxy.api("DELETE", "/api/v1/branches/nope/x", None);
    assert_eq!(status, 404, "{body}");
    assert!(!body.contains("SourceName"), "{body}");

    // A branch in use: each interface names its own way to force.
    let client = proxy.connect("shop.busy").await.unwrap();
    let (status, body) = proxy.api("DELETE", "/api/v1/branches/shop/busy", None);
    assert_eq!(status, 409, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "conflict", "{body}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("?force=true"),
        "{body}"
    );
    let (ok, err) = cli(&proxy, &["branch", "delete", "shop.busy"]);
    assert!(!ok);
    assert!(err.contains("1 open connection(s)"), "{err}");
    assert!(err.contains("use --force"), "{err}");
    assert!(!err.contains("?force=true"), "{err}");

    // A `database` source has no server per branch to stop.
    let (status, body) = proxy.api("POST", "/api/v1/branches/shop/busy/suspend", None);
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("does not suspend branches"), "{body}");
    assert!(body.contains(r#""code":"unsupported""#), "{body}");
    let (ok, err) = cli(&proxy, &["branch", "suspend", "shop.busy"]);
    assert!(!ok);
    assert!(err.contains("does not suspend branches"), "{err}");
    assert!(!err.contains("instance source can be suspended"), "{err}");

    let (ok, err) = cli(&proxy, &["branch", "delete", "shop.busy", "--force"]);
    assert!(ok, "{err}");
    drop(client);
}
