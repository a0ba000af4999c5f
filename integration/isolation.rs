//! Isolation of branch servers from the proxy: a superuser in a clone can run
//! programs as the servers' OS user (`COPY ... TO PROGRAM`). Whatever that user
//! plants (links where the proxy writes, a forged `postmaster.pid`), the proxy never
//! writes through it, never gives a file away through it, never signals another
//! process because of it.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::harness::*;

/// Runs `cmd` as the branch server's user, in its data directory.
async fn run_program(c: &tokio_postgres::Client, cmd: &str) -> Result<u64, tokio_postgres::Error> {
    c.execute(
        &format!("COPY (SELECT 1) TO PROGRAM '{}'", cmd.replace('\'', "''")),
        &[],
    )
    .await
}

fn is_link(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

/// Suspends `branch` once the proxy has seen its last client leave.
async fn suspend(proxy: &ProxyProc, branch: &str) {
    let path = format!("/api/v1/branches/shop/{branch}/suspend");
    assert!(
        eventually(10, || proxy.api("POST", &path, None).0 == 200).await,
        "{}",
        proxy.branches()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_superuser_cannot_plant_links_where_the_proxy_writes() {
    let Fixture { pg: _pg, proxy } = Fixture::start(Engine::Instance, "").await;
    let canary = proxy.dir.path().join("canary");
    std::fs::write(&canary, b"precious").unwrap();
    let c = proxy.connect("shop.pr1").await.unwrap();
    let storage = instance_storage(&proxy, "shop");
    let dir = storage.join("branches/pr1");

    // The branch directory is the proxy's; the server's user only passes through.
    let meta = std::fs::metadata(&dir).unwrap();
    assert_eq!(meta.uid(), proxy_owner().0);
    assert_eq!(meta.permissions().mode() & 0o7777, 0o711);
    // So is a snapshot's directory (snapshot.json, seal.log).
    for e in std::fs::read_dir(storage.join("snapshots"))
        .unwrap()
        .flatten()
    {
        let meta = std::fs::metadata(e.path()).unwrap();
        assert_eq!(meta.uid(), proxy_owner().0);
        assert_eq!(meta.permissions().mode() & 0o7777, 0o711);
    }
    // The attack: links where the proxy writes next.
    for target in ["../postgres.log", "../branch.json", "../.branch.json.tmp"] {
        let cmd = format!("ln -sf {} {target}", canary.display());
        let refused = run_program(&c, &cmd).await;
        assert!(refused.is_err(), "planting {target} was allowed");
    }
    drop(c);
    suspend(&proxy, "pr1").await;

    // A forged postmaster.pid naming a root process that works in the data
    // directory: the proxy must neither reuse nor signal it.
    let data = dir.join("data");
    let mut decoy = Command::new("sleep")
        .arg("60")
        .current_dir(&data)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let forged = format!(
        "{}\n{}\n0\n5432\n/tmp\n\n0 0\nready   \n",
        decoy.id(),
        data.display()
    );
    std::fs::write(data.join("postmaster.pid"), forged).unwrap();

    let c = proxy.connect("shop.pr1").await.unwrap();
    assert_eq!(count(&c).await, 3, "the real server was started");
    drop(c);
    suspend(&proxy, "pr1").await;
    assert!(
        decoy.try_wait().unwrap().is_none(),
        "a process of another user was signalled"
    );
    let _ = decoy.kill();
    let _ = decoy.wait();

    assert_eq!(std::fs::read(&canary).unwrap(), b"precious");
    let log = dir.join("postgres.log");
    assert!(!is_link(&log));
    assert_eq!(std::fs::metadata(&log).unwrap().uid(), 0);
    // Socket directories are 128-bit hashes.
    let names: Vec<String> = std::fs::read_dir(storage.join("run"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert!(
        names
            .iter()
            .all(|n| n.len() == 32 && n.bytes().all(|b| b.is_ascii_hexdigit())),
        "{names:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_server_config_is_replaced_not_written_through() {
    let mut proxy =
        ProxyProc::start("[sources.shop]\n[embedded]\nsettings = { fsync = \"off\" }\n");
    let canary = proxy.dir.path().join("canary");
    std::fs::write(&canary, b"precious").unwrap();
    let data = proxy.dir.path().join("state/pg");
    let c = proxy.connect("shop.x").await.unwrap();
    // A superuser of the embedded server plants a link where its config is written.
    run_program(&c, &format!("ln -sf {} offshoot.conf", canary.display()))
        .await
        .unwrap();
    assert!(is_link(&data.join("offshoot.conf")));
    // The server log lives where that user cannot write.
    let cmd = format!("ln -sf {} ../pg.log", canary.display());
    assert!(run_program(&c, &cmd).await.is_err());
    drop(c);
    assert!(proxy.terminate());
    proxy.restart();
    let c = proxy.connect("shop.x").await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
    drop(c);
    assert!(!is_link(&data.join("offshoot.conf")));
    assert_eq!(std::fs::read(&canary).unwrap(), b"precious");
    assert!(proxy.terminate());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn superusers_are_refused_where_the_source_says_so() {
    // Under SCRAM: the right password of a superuser is not enough.
    let pg = crate::auth::scram_server().await;
    pg.direct("shop")
        .await
        .batch_execute("CREATE ROLE boss SUPERUSER LOGIN PASSWORD 'boss-secret'")
        .await
        .unwrap();
    let Fixture { pg, proxy } =
        Fixture::over(pg, Engine::Database, "[auth]\n", "allow_superuser = false");
    let url = |user: &str, password: &str| {
        format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname=shop.b1",
            proxy.port
        )
    };
    let (state, message) = refused(&url("boss", "boss-secret")).await;
    assert_eq!(state, "42501", "{message}");
    assert!(message.contains("allow_superuser = false"), "{message}");
    assert!(
        clones(&pg).await.is_empty(),
        "a refused superuser made a branch"
    );
    let c = connect(&url("app", "app-secret")).await.unwrap();
    assert_eq!(count(&c).await, 3);
    drop(c);
    drop(proxy);

    // Under trust, the role is read on the source's server before connecting.
    let Fixture { pg, proxy } = Fixture::start(Engine::Database, "allow_superuser = false").await;
    pg.direct("shop")
        .await
        .batch_execute("CREATE ROLE app LOGIN; GRANT SELECT ON items TO app")
        .await
        .unwrap();
    let (state, message) = refused(&proxy.url("shop.t1")).await;
    assert_eq!(state, "42501", "{message}");
    assert!(message.contains("superuser \"postgres\""), "{message}");
    let c = connect(&proxy.url_as("app", "shop.t1")).await.unwrap();
    assert_eq!(count(&c).await, 3);

    // The default lets superusers in.
    let Fixture { pg: _pg, proxy } = Fixture::start(Engine::Database, "").await;
    proxy.connect("shop.t2").await.unwrap();
}
