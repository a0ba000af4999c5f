//! Creation, expiry and restart: the life of a branch through real servers.

use std::time::Duration;

use crate::harness::*;

/// Sixteen first connections to one new name at once, on either engine: one branch
/// is made, once, and every client is served by it.
async fn concurrent_first_connections_make_one_branch(engine: Engine) {
    let Fixture { pg, proxy } = Fixture::start(engine, "").await;
    let url = proxy.url("shop.race");
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let c = connect(&url).await?;
                let row = c
                    .query_one(
                        "SELECT count(*), current_database()::text, \
                         current_setting('data_directory') FROM items",
                        &[],
                    )
                    .await?;
                Ok::<_, tokio_postgres::Error>((row.get(0), row.get(1), row.get(2)))
            })
        })
        .collect();
    let mut served = std::collections::BTreeSet::new();
    for t in tasks {
        let (rows, db, dir): (i64, String, String) = t.await.unwrap().expect("served");
        assert_eq!(rows, 3, "a copy of the source");
        served.insert((db, dir));
    }
    assert_eq!(
        served.len(),
        1,
        "every client on the same branch: {served:?}"
    );
    let (db, dir) = served.pop_first().unwrap();
    assert_eq!(proxy.branch_names(), vec!["race"]);
    assert_eq!(
        proxy.metric("offshoot_branches_created_total{source=\"shop\"}"),
        1.0
    );
    let clones = clones(&pg).await;
    match engine {
        Engine::Database => {
            assert_eq!(db, "shop__race");
            assert_eq!(clones, vec!["shop__race".to_string()]);
        }
        Engine::Instance => {
            assert_eq!(db, "shop", "the whole server is copied");
            assert!(clones.is_empty(), "nothing made on the source: {clones:?}");
            let data = branch_data(&proxy, "shop", "race");
            assert_eq!(std::path::Path::new(&dir), data.canonicalize().unwrap());
            let entries = std::fs::read_dir(instance_storage(&proxy, "shop").join("branches"))
                .unwrap()
                .count();
            assert_eq!(entries, 1, "one branch directory");
            // One postmaster: every server process working there is the one the pid
            // file names, or one of its children.
            let pm = postmaster_pid(&data).expect("postmaster.pid");
            let pids = processes_in(&data);
            assert!(pids.contains(&pm), "postmaster {pm} not among {pids:?}");
            for pid in pids {
                let ppid = parent_pid(pid);
                assert!(
                    pid == pm || ppid == Some(pm),
                    "{pid} (parent {ppid:?}) is not of {pm}"
                );
            }
        }
    }
}

/// The parent of process `pid`, from `/proc/<pid>/stat`; `None` once it has gone.
fn parent_pid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count from the last ')'.
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_connections_make_one_database_clone() {
    concurrent_first_connections_make_one_branch(Engine::Database).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_connections_make_one_instance() {
    concurrent_first_connections_make_one_branch(Engine::Instance).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_creation_reports_the_reason_and_leaves_nothing() {
    let Fixture { pg, proxy } = Fixture::start(Engine::Database, "").await;
    // Someone is connected to the source: PostgreSQL cannot copy it (55006).
    let holder = pg.direct("shop").await;
    let url = proxy.url("shop.busy");
    let tasks: Vec<_> = (0..3)
        .map(|_| tokio::spawn(connect_owned(url.clone())))
        .collect();
    for t in tasks {
        let err = t.await.unwrap().unwrap_err();
        assert_eq!(sqlstate(&err), "55006");
        let msg = err.as_db_error().unwrap().message().to_owned();
        assert!(
            msg.contains("busy") && msg.contains("being accessed by other users"),
            "{msg}"
        );
    }
    assert!(!pg.databases().await.contains(&"shop__busy".to_string()));
    assert!(!proxy
        .dir
        .path()
        .join("state/branches/shop/busy.json")
        .exists());
    assert_eq!(proxy.branches().as_array().unwrap().len(), 0);
    // Once the source is free, the same branch is made.
    drop(holder);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let c = proxy.connect("shop.busy").await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
}

async fn connect_owned(url: String) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    connect(&url).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_branches_expire_but_not_while_connected_or_persistent() {
    let Fixture { pg, proxy } = Fixture::start_with(
        Engine::Database,
        "[reaper]\ninterval = \"100ms\"\n",
        "idle_expire = \"1s\"\npersistent = [\"qa\"]",
    )
    .await;
    let held = proxy.connect("shop.held").await.unwrap();
    let brief = proxy.connect("shop.brief").await.unwrap();
    let qa = proxy.connect("shop.qa").await.unwrap();
    drop(brief);
    drop(qa);

    // `brief` goes once idle for 1 s; `held` has an open connection; `qa` is persistent.
    let gone = eventually(15, || {
        !proxy
            .branches()
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["branch"] == "brief")
    })
    .await;
    assert!(gone, "idle branch did not expire");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let dbs = pg.databases().await;
    assert!(!dbs.contains(&"shop__brief".to_string()), "{dbs:?}");
    assert!(dbs.contains(&"shop__held".to_string()), "{dbs:?}");
    assert!(dbs.contains(&"shop__qa".to_string()), "{dbs:?}");
    held.simple_query("SELECT 1")
        .await
        .expect("held session still works");
    assert_eq!(
        proxy.metric("offshoot_branches_expired_total{reason=\"idle\",source=\"shop\"}"),
        1.0
    );
    assert!(proxy.log().contains("branch expired"));

    // Once the last connection closes, `held` expires too.
    drop(held);
    assert!(
        eventually(15, || proxy.branch_names() == ["qa"]).await,
        "only the persistent branch should remain: {:?}",
        proxy.branch_names()
    );
    // A new connection to an expired name makes a fresh clone from the source.
    let again = proxy.connect("shop.brief").await.unwrap();
    assert_eq!(count(&again).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_keeps_every_branch() {
    let Fixture { pg, mut proxy } = Fixture::start(Engine::Database, "").await;
    for b in ["k1", "k2"] {
        mark(&proxy.connect(&format!("shop.{b}")).await.unwrap(), b).await;
    }
    proxy.kill9_and_restart();
    assert_eq!(proxy.branch_names(), vec!["k1", "k2"]);
    for b in ["k1", "k2"] {
        let c = proxy.connect(&format!("shop.{b}")).await.unwrap();
        assert_eq!(mark_of(&c).await, b, "data survives the restart");
    }
    assert_eq!(
        clones(&pg).await.len(),
        2,
        "no duplicate clone after restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_creation_is_settled_on_restart() {
    let Fixture { pg, mut proxy } = Fixture::start(Engine::Database, "").await;
    proxy.kill9();
    // A `provisioning` record with an unmarked database under its clone's name, which
    // someone else made (a crash of the proxy's own creation in that window is in
    // faults.rs): nothing proves the proxy made it. Another crash came before
    // anything was made.
    let c = pg.direct("postgres").await;
    c.batch_execute("CREATE DATABASE \"shop__half\" TEMPLATE shop")
        .await
        .unwrap();
    let dir = proxy.dir.path().join("state/branches/shop");
    for b in ["half", "never"] {
        write_record(&proxy, "database", b, &format!("shop__{b}"), "provisioning");
    }
    // A database that merely looks like a clone, with no record: never touched.
    c.batch_execute("CREATE DATABASE \"shop__foreign\"")
        .await
        .unwrap();

    proxy.kill9_and_restart();
    // Neither is adopted; both records are settled; the database is left alone,
    // unmarked, and reported.
    assert!(proxy.branch_names().is_empty(), "{}", proxy.branches());
    assert!(!dir.join("never.json").exists());
    assert!(!dir.join("half.json").exists());
    assert!(pg.databases().await.contains(&"shop__half".to_string()));
    let comment: Option<String> = c
        .query_one(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database \
             WHERE datname = 'shop__half'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(comment, None, "never marked as the proxy's");
    let (_, orphans) = proxy.api("GET", "/api/v1/orphans", None);
    let orphans: serde_json::Value = serde_json::from_str(&orphans).unwrap();
    let locations: Vec<&str> = orphans
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o["location"].as_str())
        .collect();
    assert!(locations.contains(&"shop__half"), "{orphans}");
    // Its name stays refused, in words that say why, until a person settles it.
    let err = proxy.connect("shop.half").await.unwrap_err();
    assert_eq!(sqlstate(&err), "55000", "{err}");
    let msg = err.as_db_error().unwrap().message().to_owned();
    assert!(msg.contains("did not make it"), "{msg}");
    assert!(pg.databases().await.contains(&"shop__half".to_string()));
    c.batch_execute("DROP DATABASE \"shop__half\"")
        .await
        .unwrap();
    let s = proxy.connect("shop.half").await.unwrap();
    s.simple_query("SELECT 1").await.unwrap();
    drop(s);

    // A record pointing at a database the proxy did not make: deletion is refused.
    write_record(&proxy, "database", "foreign", "shop__foreign", "ready");
    proxy.kill9_and_restart();
    let (status, body) = proxy.api("DELETE", "/api/v1/branches/shop/foreign?force=true", None);
    assert_eq!(status, 409, "{body}");
    assert!(body.contains(r#""code":"conflict""#), "{body}");
    assert!(body.contains("marker"), "{body}");
    assert!(pg.databases().await.contains(&"shop__foreign".to_string()));
    let (status, _) = proxy.api("DELETE", "/api/v1/branches/shop/half", None);
    assert_eq!(status, 204);
    assert!(!pg.databases().await.contains(&"shop__half".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_cleanly() {
    let Fixture { pg: _pg, mut proxy } =
        Fixture::start_with(Engine::Database, "shutdown_grace = \"2s\"\n", "").await;
    let c = proxy.connect("shop.t").await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
    let started = std::time::Instant::now();
    assert!(proxy.terminate(), "clean exit on SIGTERM");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(proxy.log().contains("shutting down"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_past_the_provision_timeout_gets_57p03_and_creation_goes_on() {
    // No clone can be made in a millisecond: the client gives up, the creation does not.
    let Fixture { pg: _pg, proxy } =
        Fixture::start_with(Engine::Database, "provision_timeout = \"1ms\"\n", "").await;
    let err = proxy.connect("shop.slow").await.unwrap_err();
    assert_eq!(sqlstate(&err), "57P03");
    assert!(
        err.as_db_error()
            .unwrap()
            .message()
            .contains("still being created"),
        "{err}"
    );
    assert!(
        eventually(15, || proxy
            .branches()
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["state"] == "ready"))
        .await,
        "the creation finished in the background"
    );
    let c = proxy.connect("shop.slow").await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
    assert_eq!(
        proxy.metric("offshoot_branches_created_total{source=\"shop\"}"),
        1.0
    );
}
