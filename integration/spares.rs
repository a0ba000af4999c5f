//! Warm spares of `instance` sources (`warm_spares`): claimed by new branches,
//! refilled, recycled when a newer snapshot is sealed, recognised after a restart;
//! on real servers through the real proxy.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::harness::*;

const READY: &str = "offshoot_spares_ready{source=\"shop\"} ";
const HITS: &str = "offshoot_spare_claims_total{outcome=\"hit\",source=\"shop\"} ";
const MISSES: &str = "offshoot_spare_claims_total{outcome=\"miss\",source=\"shop\"} ";

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or(Value::Null)
}

fn take_snapshot(proxy: &ProxyProc) -> String {
    let (status, body) = proxy.api("POST", "/api/v1/sources/shop/snapshots", None);
    assert_eq!(status, 201, "{body}");
    json(&body)["name"].as_str().unwrap().to_owned()
}

/// The spares on disk (their ids), sorted.
fn spare_ids(proxy: &ProxyProc) -> Vec<String> {
    let dir = instance_storage(proxy, "shop").join("spares");
    let mut ids: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

/// The snapshot a spare was made from (its `spare.json`).
fn spare_snapshot(proxy: &ProxyProc, id: &str) -> String {
    let path = instance_storage(proxy, "shop")
        .join("spares")
        .join(id)
        .join("spare.json");
    let meta = json(&std::fs::read_to_string(path).unwrap_or_default());
    meta["snapshot"].as_str().unwrap_or_default().to_owned()
}

/// Waits (generously) until `n` spares are ready by the metric and on disk.
async fn ready(proxy: &ProxyProc, n: usize) -> Vec<String> {
    let ok = eventually(120, || {
        proxy.metric(READY) == n as f64 && spare_ids(proxy).len() == n
    })
    .await;
    assert!(
        ok,
        "{n} spares ready: metric {}, on disk {:?}\n{}",
        proxy.metric(READY),
        spare_ids(proxy),
        proxy.log()
    );
    spare_ids(proxy)
}

async fn show(c: &tokio_postgres::Client, setting: &str) -> String {
    c.query_one(&format!("SHOW {setting}"), &[])
        .await
        .unwrap()
        .get(0)
}

fn orphans(proxy: &ProxyProc) -> String {
    let (status, body) = proxy.api("GET", "/api/v1/orphans", None);
    assert_eq!(status, 200, "{body}");
    body
}

/// The postmaster serving `data` (by its `postmaster.pid`).
fn server_of(data: &Path) -> i32 {
    postmaster_pid(data).unwrap_or_else(|| panic!("{} has a server", data.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_branch_claims_a_warm_spare_and_the_pool_refills() {
    let Fixture { pg: _pg, proxy } = Fixture::start(Engine::Instance, "warm_spares = 1").await;
    // No snapshot yet: nothing to make spares of.
    assert_eq!(proxy.metric(READY), 0.0);
    take_snapshot(&proxy);
    let ids = ready(&proxy, 1).await;
    let storage = instance_storage(&proxy, "shop");
    let spare_server = server_of(&storage.join("spares").join(&ids[0]).join("data"));
    // Spares are not branches: not listed, not orphans.
    assert!(
        proxy.branch_names().is_empty(),
        "{:?}",
        proxy.branch_names()
    );
    assert_eq!(orphans(&proxy), "[]");

    let c = proxy.connect("shop.pr-1").await.unwrap();
    assert_eq!(count(&c).await, 3);
    mark(&c, "pr-1").await;
    assert_eq!(proxy.metric(HITS), 1.0);
    assert_eq!(proxy.metric(MISSES), 0.0);
    // The spare's running server became the branch's: same postmaster, now in the
    // branch's directory, and the spare is gone from the spare area.
    let data = branch_data(&proxy, "shop", "pr-1");
    assert_eq!(server_of(&data), spare_server);
    assert!(processes_in(&data).contains(&spare_server));
    assert!(!spare_ids(&proxy).contains(&ids[0]));
    // The branch is a branch like any other: listed, its record and branch.json
    // name it, its audit event says it came from a spare.
    assert_eq!(proxy.branch_names(), ["pr-1"]);
    let (_, body) = proxy.api("GET", "/api/v1/branches/shop/pr-1", None);
    assert!(json(&body)["copy_mode"].as_str().is_some(), "{body}");
    let meta = json(&std::fs::read_to_string(data.parent().unwrap().join("branch.json")).unwrap());
    assert_eq!(meta["branch"], "pr-1", "{meta}");
    let (_, body) = proxy.api("GET", "/api/v1/events?action=branch.created", None);
    let events = json(&body);
    let created = events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["branch"] == "pr-1")
        .unwrap_or_else(|| panic!("a branch.created event: {body}"));
    assert_eq!(created["from_spare"], true, "{created}");

    // The pool refills with a new spare.
    let refilled = ready(&proxy, 1).await;
    assert_ne!(refilled, ids);
    assert_eq!(orphans(&proxy), "[]");

    // Two first connections at once, one spare: one claims it, the other is
    // copied; neither gets the other's server.
    let (a, b) = tokio::join!(proxy.connect("shop.pr-2"), proxy.connect("shop.pr-3"));
    let (a, b) = (a.unwrap(), b.unwrap());
    mark(&a, "pr-2").await;
    mark(&b, "pr-3").await;
    assert_eq!(mark_of(&a).await, "pr-2");
    assert_eq!(mark_of(&b).await, "pr-3");
    assert_eq!(mark_of(&c).await, "pr-1");
    assert_eq!(proxy.metric(HITS), 2.0);
    assert_eq!(proxy.metric(MISSES), 1.0);
    let (d2, d3) = (
        branch_data(&proxy, "shop", "pr-2"),
        branch_data(&proxy, "shop", "pr-3"),
    );
    assert_ne!(server_of(&d2), server_of(&d3));
    ready(&proxy, 1).await;
    let mut names = proxy.branch_names();
    names.sort();
    assert_eq!(names, ["pr-1", "pr-2", "pr-3"]);

    // A server's name (cluster_name) is fixed when it starts: the claimed server
    // shows the spare's until its next start, then the branch's own.
    assert_eq!(show(&c, "cluster_name").await, "offshoot/shop/spare");
    drop(c);
    // Once the session has ended (its close reaches the proxy a little later).
    let suspended = eventually(60, || {
        proxy
            .api("POST", "/api/v1/branches/shop/pr-1/suspend", None)
            .0
            < 300
    })
    .await;
    assert!(suspended, "pr-1 suspended");
    let c = proxy.connect("shop.pr-1").await.unwrap();
    assert_eq!(show(&c, "cluster_name").await, "offshoot/shop/pr-1");
    assert_eq!(mark_of(&c).await, "pr-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_snapshot_recycles_the_spares_of_the_old_one() {
    let Fixture { pg, proxy } = Fixture::start(Engine::Instance, "warm_spares = 1").await;
    let first = take_snapshot(&proxy);
    let old = ready(&proxy, 1).await;
    assert_eq!(spare_snapshot(&proxy, &old[0]), first);

    // The source moves on, a new snapshot is sealed: a new branch sees the row at
    // once (never a spare of the old snapshot), and the pool is rebuilt from it.
    pg.direct("shop")
        .await
        .batch_execute("INSERT INTO items VALUES (4, 'four')")
        .await
        .unwrap();
    let second = take_snapshot(&proxy);
    let c = proxy.connect("shop.after").await.unwrap();
    assert_eq!(count(&c).await, 4);
    let ok = eventually(120, || {
        let ids = spare_ids(&proxy);
        proxy.metric(READY) == 1.0
            && ids.len() == 1
            && ids != old
            && spare_snapshot(&proxy, &ids[0]) == second
    })
    .await;
    assert!(ok, "a spare of {second}: {:?}", spare_ids(&proxy));
    assert!(processes_in(
        &instance_storage(&proxy, "shop")
            .join("spares")
            .join(&old[0])
    )
    .is_empty());
    let d = proxy.connect("shop.later").await.unwrap();
    assert_eq!(count(&d).await, 4);

    // A snapshot spares are made from can be deleted: they are removed first.
    let spare = ready(&proxy, 1).await;
    let (status, body) = proxy.api(
        "DELETE",
        &format!("/api/v1/sources/shop/snapshots/{first}"),
        None,
    );
    assert!(status < 300, "{status} {body}");
    assert_eq!(spare_ids(&proxy), spare, "spares of the newest stay");
    drop((c, d));
    for b in ["after", "later"] {
        let path = format!("/api/v1/branches/shop/{b}?force=true");
        let (status, body) = proxy.api("DELETE", &path, None);
        assert!(status < 300, "{status} {body}");
    }
    let (status, body) = proxy.api(
        "DELETE",
        &format!("/api/v1/sources/shop/snapshots/{second}"),
        None,
    );
    assert!(status < 300, "{status} {body}");
    assert!(spare_ids(&proxy).is_empty(), "{:?}", spare_ids(&proxy));
    assert_eq!(proxy.metric(READY), 0.0);
    assert_eq!(orphans(&proxy), "[]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spares_are_recognised_after_a_restart() {
    let Fixture { pg: _pg, mut proxy } = Fixture::start(Engine::Instance, "warm_spares = 2").await;
    take_snapshot(&proxy);
    let ids = ready(&proxy, 2).await;
    let spares = instance_storage(&proxy, "shop").join("spares");

    // A clean stop stops the spares' servers; the next start takes them back.
    assert!(proxy.terminate(), "{}", proxy.log());
    for id in &ids {
        assert!(
            processes_in(&spares.join(id)).is_empty(),
            "spare {id} stopped"
        );
    }
    proxy.restart();
    assert_eq!(ready(&proxy, 2).await, ids);
    assert_eq!(orphans(&proxy), "[]");
    assert!(
        proxy.branch_names().is_empty(),
        "{:?}",
        proxy.branch_names()
    );

    // Killed: the spares' servers keep running and are reused as they are.
    let running: Vec<i32> = ids
        .iter()
        .map(|id| server_of(&spares.join(id).join("data")))
        .collect();
    proxy.kill9_and_restart();
    assert_eq!(ready(&proxy, 2).await, ids);
    let after: Vec<i32> = ids
        .iter()
        .map(|id| server_of(&spares.join(id).join("data")))
        .collect();
    assert_eq!(after, running);
    assert_eq!(orphans(&proxy), "[]");
    assert!(
        proxy.branch_names().is_empty(),
        "{:?}",
        proxy.branch_names()
    );

    // The pool is usable.
    let c = proxy.connect("shop.next").await.unwrap();
    assert_eq!(count(&c).await, 3);
    assert_eq!(proxy.metric(HITS), 1.0);
    assert!(running.contains(&server_of(&branch_data(&proxy, "shop", "next"))));
    ready(&proxy, 2).await;
}

/// The server's start time of the backend `c` talks to, in seconds since the epoch.
async fn backend_start(c: &tokio_postgres::Client) -> f64 {
    c.query_one(
        "SELECT extract(epoch FROM backend_start)::float8 FROM pg_stat_activity \
         WHERE pid = pg_backend_pid()",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimed_spare_serves_its_first_client_with_a_session_opened_ahead() {
    const IDLE: &str = "offshoot_server_sessions_idle ";
    const REUSED: &str = "offshoot_server_reuse_total{outcome=\"hit\"} ";
    // Sessions stay kept for the whole test.
    let head = "server_idle_timeout = \"1h\"\n";
    let Fixture { pg: _pg, proxy } =
        Fixture::start_with(Engine::Instance, head, "warm_spares = 1").await;
    take_snapshot(&proxy);
    ready(&proxy, 1).await;
    // No client has been seen yet: the spare has no session.
    assert_eq!(proxy.metric(IDLE), 0.0);

    // A client of the source ends cleanly: its session is parked on its branch,
    // and its startup is opened on the spare (made by the refill after the claim).
    let url = |db: &str, app: &str| format!("{} application_name={app}", proxy.url(db));
    let c = connect(&url("shop.first", "suite")).await.unwrap();
    c.batch_execute("SET work_mem = '7MB'").await.unwrap();
    drop(c);
    let ok = eventually(120, || {
        proxy.metric(IDLE) == 2.0 && proxy.metric(READY) == 1.0
    })
    .await;
    assert!(ok, "idle sessions {}\n{}", proxy.metric(IDLE), proxy.log());

    // The next new branch claims the spare, and its first client (the same
    // startup) gets the session opened ahead: its backend is older than the
    // connection, and it looks like a fresh session of this client.
    let hits = proxy.metric(REUSED);
    let before = now_secs();
    let d = connect(&url("shop.second", "suite")).await.unwrap();
    assert!(backend_start(&d).await < before, "a session opened ahead");
    assert_eq!(proxy.metric(REUSED), hits + 1.0);
    assert_eq!(show(&d, "application_name").await, "suite");
    assert_eq!(show(&d, "work_mem").await, "4MB");
    assert_eq!(count(&d).await, 3);
    mark(&d, "second").await;
    assert_eq!(
        show(&d, "cluster_name").await,
        "offshoot/shop/spare",
        "the claimed spare's server"
    );

    // Another startup (a different application_name) is not that session's: a
    // client of it gets a backend of its own.
    ready(&proxy, 1).await;
    let ok = eventually(120, || proxy.metric(IDLE) == 2.0).await;
    assert!(ok, "idle sessions {}", proxy.metric(IDLE));
    let before = now_secs();
    let e = connect(&url("shop.third", "other")).await.unwrap();
    assert!(backend_start(&e).await >= before - 0.5, "a new backend");
    assert_eq!(show(&e, "application_name").await, "other");

    // A spare recycled by a new snapshot closes its session with it; the new
    // spare gets its own. Kept: the one on `first`, the one `third` claimed and
    // did not use, and the spare's.
    ready(&proxy, 1).await;
    let ok = eventually(120, || proxy.metric(IDLE) == 3.0).await;
    assert!(ok, "idle sessions {}\n{}", proxy.metric(IDLE), proxy.log());
    let old = spare_ids(&proxy);
    take_snapshot(&proxy);
    let ok = eventually(120, || {
        let ids = spare_ids(&proxy);
        ids.len() == 1 && ids != old && proxy.metric(READY) == 1.0 && proxy.metric(IDLE) == 3.0
    })
    .await;
    assert!(ok, "idle sessions {}\n{}", proxy.metric(IDLE), proxy.log());
    // A client of the other startup ends cleanly: its startup is opened on the
    // spare too. Deleting the branch closes the sessions parked on it: left are
    // the one on `first` and the spare's two.
    drop(e);
    let ok = eventually(120, || proxy.metric(IDLE) == 5.0).await;
    assert!(ok, "idle sessions {}\n{}", proxy.metric(IDLE), proxy.log());
    let (status, body) = proxy.api("DELETE", "/api/v1/branches/shop/third", None);
    assert!(status < 300, "{status} {body}");
    let ok = eventually(120, || proxy.metric(IDLE) == 3.0).await;
    assert!(ok, "idle sessions {}", proxy.metric(IDLE));
    assert_eq!(mark_of(&d).await, "second");
}

#[test]
fn check_refuses_warm_spares_on_a_database_source() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("offshoot.toml");
    std::fs::write(
        &path,
        "[sources.shop]\nserver = \"host=127.0.0.1 user=postgres dbname=postgres\"\nwarm_spares = 2\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_offshoot"))
        .args(["check", "--config"])
        .arg(&path)
        .env_remove("OFFSHOOT_CONFIG")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("sources.shop.warm_spares"), "{text}");
    assert!(text.contains("engine = \"instance\""), "{text}");
}
