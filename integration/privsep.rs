//! Privilege separation: a proxy started as root serves as its own user
//! (`process.user`), branch servers run as another (`process.server_user`), and a
//! superuser in a clone, who can run programs as the servers' user, reaches none of
//! what the proxy keeps: its configuration, TLS key, users file, admin token,
//! records, nor a sealed snapshot.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::harness::*;

/// Whether this run can show the separation (it needs root), after saying why not.
fn as_root(test: &str) -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    skip(
        test,
        "privilege separation happens only when the proxy is started as root",
    );
    false
}

/// `(real, effective, saved, filesystem)` uids, the same for gids, and the
/// supplementary groups of process `pid`.
fn ids(pid: u32) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> Vec<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_default()
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect()
    };
    (field("Uid:"), field("Gid:"), field("Groups:"))
}

/// Processes whose parent is `pid`, with their command lines.
fn children(pid: u32) -> Vec<(u32, String)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/status")).is_ok_and(|s| {
                s.lines().any(|l| {
                    l.split_whitespace().collect::<Vec<_>>() == ["PPid:", &pid.to_string()]
                })
            })
        })
        .map(|p| {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            (p, String::from_utf8_lossy(&cmd).replace('\0', " "))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn started_as_root_the_proxy_serves_as_its_own_user() {
    if !as_root("privsep::started_as_root_the_proxy_serves_as_its_own_user") {
        return;
    }
    let Fixture { pg: _pg, proxy } = Fixture::start(Engine::Instance, "").await;
    let c = proxy.connect("shop.pr1").await.unwrap();
    assert_eq!(count(&c).await, 3);

    let (uid, gid) = proxy_owner();
    assert_ne!(uid, 0);
    let (uids, gids, groups) = ids(proxy.pid());
    assert_eq!(uids, [uid; 4], "the proxy's uids");
    assert_eq!(gids, [gid; 4], "the proxy's gids");
    assert_eq!(groups, [gid], "only its own group, no root group");
    assert!(proxy.log().contains("dropped root"), "{}", proxy.log());

    // Root stays only in the helper, the proxy's child.
    let helpers: Vec<u32> = children(proxy.pid())
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("__privsep-helper"))
        .map(|(p, _)| p)
        .collect();
    assert_eq!(helpers.len(), 1, "one helper");
    assert_eq!(ids(helpers[0]).0, [0; 4]);

    // The branch's server runs as the servers' user, apart from the proxy's.
    let postgres = nix::unistd::User::from_name("postgres").unwrap().unwrap();
    let data = branch_data(&proxy, "shop", "pr1");
    let server = postmaster_pid(&data).expect("the branch's server");
    assert_eq!(ids(server as u32).0, [postgres.uid.as_raw(); 4]);
    let who: String = c
        .query_one("SELECT pg_read_file('/proc/self/status')::text", &[])
        .await
        .unwrap()
        .get(0);
    let line = who.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        !line
            .split_whitespace()
            .skip(1)
            .any(|u| u == uid.to_string() || u == "0"),
        "{line}"
    );

    // The state directory is the proxy's; the servers' user may only pass through.
    let state = proxy.dir.path().join("state");
    let meta = std::fs::metadata(&state).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (uid, 0o711));
    let record = state.join("branches/shop/pr1.json");
    let meta = std::fs::metadata(&record).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (uid, 0o600));
}

/// Whether the branch's server (as its OS user) can read `path`, asked both ways a
/// superuser can: a program, and `pg_read_file`.
async fn server_reads(c: &tokio_postgres::Client, path: &Path) -> Vec<String> {
    let mut leaks = Vec::new();
    c.batch_execute("CREATE TEMP TABLE IF NOT EXISTS leak (line text)")
        .await
        .unwrap();
    let p = path.display().to_string().replace('\'', "''");
    let program = format!("COPY leak FROM PROGRAM 'cat {p}'");
    if c.batch_execute(&program).await.is_ok() {
        leaks.push(format!("cat {p}"));
    }
    if c.query_one(&format!("SELECT pg_read_file('{p}')"), &[])
        .await
        .is_ok()
    {
        leaks.push(format!("pg_read_file {p}"));
    }
    leaks
}

/// Keeps `path` for root and the proxy's group, as a deployment keeps a file the
/// proxy reads again on SIGHUP (TLS key, users file): 0640 root:<proxy group>.
fn for_proxy_only(path: &Path) {
    std::os::unix::fs::lchown(path, Some(0), Some(proxy_owner().1)).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o640)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_superuser_reads_none_of_the_proxys_secrets() {
    if !as_root("privsep::a_branch_superuser_reads_none_of_the_proxys_secrets") {
        return;
    }
    let secrets = world_readable_tempdir();
    let (cert, key) = crate::protocol::make_cert(secrets.path(), "privsep.example");
    let users = secrets.path().join("users.txt");
    std::fs::write(
        &users,
        "\"someone\" \"md5d41d8cd98f00b204e9800998ecf8427e\"\n",
    )
    .unwrap();
    for path in [&cert, &key, &users] {
        for_proxy_only(path);
    }
    let head = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n[auth]\nmethod = \"trust\"\nusers_file = \"{}\"\n",
        cert.display(),
        key.display(),
        users.display()
    );
    let Fixture { pg: _pg, proxy } = Fixture::start_with(Engine::Instance, &head, "").await;
    let c = proxy.connect("shop.pr1").await.unwrap();
    assert_eq!(count(&c).await, 3);
    let state = proxy.dir.path().join("state");
    let targets: Vec<PathBuf> = vec![
        proxy.dir.path().join("offshoot.toml"),
        key.clone(),
        users.clone(),
        state.join("admin.token"),
        state.join("auth.key"),
        state.join("branches/shop/pr1.json"),
    ];
    for t in &targets {
        assert!(t.exists(), "{} exists", t.display());
    }
    // The test is fair: the same server reads a file it may read.
    let readable = server_reads(&c, Path::new("/etc/passwd")).await;
    assert_eq!(readable.len(), 2, "the probe works: {readable:?}");
    let mut leaks = Vec::new();
    for t in &targets {
        leaks.extend(server_reads(&c, t).await);
    }
    assert!(leaks.is_empty(), "the servers' user read: {leaks:?}");
    // Nor can it list what the state directory holds (it may only pass through).
    let list = format!("COPY leak FROM PROGRAM 'ls {}'", state.display());
    assert!(
        c.batch_execute(&list).await.is_err(),
        "listed the state directory"
    );
    // While the proxy's user owns what it must rewrite.
    let (uid, _) = proxy_owner();
    let record = std::fs::metadata(state.join("branches/shop/pr1.json")).unwrap();
    assert_eq!((record.uid(), record.mode() & 0o777), (uid, 0o600));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_superuser_cannot_change_a_sealed_snapshot() {
    if !as_root("privsep::a_branch_superuser_cannot_change_a_sealed_snapshot") {
        return;
    }
    let Fixture { pg: _pg, proxy } = Fixture::start(Engine::Instance, "").await;
    let c = proxy.connect("shop.pr1").await.unwrap();
    let storage = instance_storage(&proxy, "shop");
    let snapshot = std::fs::read_dir(storage.join("snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .expect("the first snapshot");
    let data = snapshot.join("data");
    // Sealed data is the proxy's, in files the servers' user never held.
    let (uid, _) = proxy_owner();
    for path in [
        data.clone(),
        data.join("PG_VERSION"),
        data.join("global/pg_control"),
    ] {
        assert_eq!(
            std::fs::symlink_metadata(&path).unwrap().uid(),
            uid,
            "{}",
            path.display()
        );
    }
    let before = std::fs::read(data.join("PG_VERSION")).unwrap();
    let attempts = [
        format!("echo 99 > {}/PG_VERSION", data.display()),
        format!("touch {}/planted", data.display()),
        format!("rm -f {}/global/pg_control", data.display()),
        format!("touch {}/planted", storage.join("branches").display()),
        format!("touch {}/planted", proxy.dir.path().join("state").display()),
    ];
    for cmd in &attempts {
        let sql = format!("COPY (SELECT 1) TO PROGRAM '{}'", cmd.replace('\'', "''"));
        assert!(c.batch_execute(&sql).await.is_err(), "allowed: {cmd}");
    }
    assert_eq!(std::fs::read(data.join("PG_VERSION")).unwrap(), before);
    assert!(data.join("global/pg_control").exists());
    assert!(!data.join("planted").exists());
    // The clone made from it is intact and its own: a second branch starts from
    // the same snapshot.
    drop(c);
    let c2 = proxy.connect("shop.pr2").await.unwrap();
    assert_eq!(count(&c2).await, 3);
}

/// A second source whose servers run as a user of their own.
const OTHER_USER: &str = "offshoot-other";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_with_its_own_server_user_is_out_of_other_sources_reach() {
    if !as_root("privsep::a_source_with_its_own_server_user_is_out_of_other_sources_reach") {
        return;
    }
    ensure_user(OTHER_USER);
    let pg = PgServer::start();
    pg.make_source("shop").await;
    pg.make_source("other").await;
    let proxy = ProxyProc::start(&format!(
        "[process.server_users]\nother = \"{OTHER_USER}\"\n{}{}",
        instance_source("shop", &pg, ""),
        instance_source("other", &pg, "")
    ));
    let shop = proxy.connect("shop.b1").await.unwrap();
    let other = proxy.connect("other.b1").await.unwrap();
    assert_eq!(count(&shop).await, 3);
    assert_eq!(count(&other).await, 3);

    let other_user = nix::unistd::User::from_name(OTHER_USER).unwrap().unwrap();
    let other_data = branch_data(&proxy, "other", "b1");
    let server = postmaster_pid(&other_data).expect("other's branch server");
    assert_eq!(ids(server as u32).0, [other_user.uid.as_raw(); 4]);
    assert_eq!(
        std::fs::metadata(&other_data).unwrap().uid(),
        other_user.uid.as_raw()
    );

    // From a clone of `shop` (servers' user `postgres`): nothing of `other`.
    let attempts = [
        format!("cat {}/PG_VERSION", other_data.display()),
        format!("ls {}", other_data.display()),
        format!("touch {}/planted", other_data.display()),
    ];
    for cmd in &attempts {
        let sql = format!("COPY (SELECT 1) TO PROGRAM '{}'", cmd.replace('\'', "''"));
        assert!(shop.batch_execute(&sql).await.is_err(), "allowed: {cmd}");
    }
    // And the other way round.
    let shop_data = branch_data(&proxy, "shop", "b1");
    let sql = format!(
        "COPY (SELECT 1) TO PROGRAM 'touch {}/planted'",
        shop_data.display()
    );
    assert!(other.batch_execute(&sql).await.is_err());
    assert!(!other_data.join("planted").exists() && !shop_data.join("planted").exists());
    // The same probe works where the user may write: the test is fair.
    let own = format!(
        "COPY (SELECT 1) TO PROGRAM 'touch {}/planted'",
        other_data.display()
    );
    other.batch_execute(&own).await.unwrap();
    assert!(other_data.join("planted").exists());
}

#[test]
fn a_missing_proxy_user_stops_the_start_with_what_to_do() {
    if !as_root("privsep::a_missing_proxy_user_stops_the_start_with_what_to_do") {
        return;
    }
    let dir = world_readable_tempdir();
    let config = dir.path().join("offshoot.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:{}\"\n[admin]\nenabled = false\n[state]\ndir = \"{}\"\n\
             [process]\nuser = \"offshoot-nobody-here\"\n",
            free_port(),
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_offshoot"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("process.user"), "{err}");
    assert!(err.contains("useradd"), "{err}");
    assert!(err.contains("process.user = \"root\""), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staying_root_is_an_explicit_loud_choice() {
    if !as_root("privsep::staying_root_is_an_explicit_loud_choice") {
        return;
    }
    let pg = PgServer::start();
    pg.make_source("shop").await;
    let proxy = ProxyProc::start(&format!(
        "[process]\nuser = \"root\"\n{}",
        Engine::Database.source("shop", &pg, "")
    ));
    let c = proxy.connect("shop.a").await.unwrap();
    assert_eq!(count(&c).await, 3);
    assert_eq!(ids(proxy.pid()).0, [0; 4]);
    assert!(
        proxy.log().contains("keeps running as root"),
        "{}",
        proxy.log()
    );
    assert!(!children(proxy.pid())
        .iter()
        .any(|(_, cmd)| cmd.contains("__privsep-helper")));
}
