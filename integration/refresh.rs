//! Reset and refresh: a branch made again from a snapshot (or the live source)
//! under the same name and address, on real servers through the real proxy.

use std::time::Duration;

use serde_json::Value;

use crate::harness::*;

/// One test per engine of `async fn $body(engine: Engine)`, in a module named
/// after the body: `refresh::$body::database` and `refresh::$body::instance`, so
/// a failure names its engine.
macro_rules! per_engine {
    ($body:ident) => {
        mod $body {
            use super::Engine;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn database() {
                super::$body(Engine::Database).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn instance() {
                super::$body(Engine::Instance).await;
            }
        }
    };
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or(Value::Null)
}

/// `POST /api/v1/branches/shop/{branch}/reset` with `body`.
fn reset(proxy: &ProxyProc, branch: &str, body: &str) -> (u16, Value) {
    reset_at(proxy.admin, branch, body)
}

fn reset_at(admin_port: u16, branch: &str, body: &str) -> (u16, Value) {
    let path = format!("/api/v1/branches/shop/{branch}/reset");
    let (status, text) = http(admin_port, "POST", &path, Some(body));
    (status, json(&text))
}

/// [`reset`] on a blocking thread, so the test's own sessions go on meanwhile.
fn reset_in_background(
    proxy: &ProxyProc,
    branch: &str,
    body: &str,
) -> tokio::task::JoinHandle<(u16, Value)> {
    let (port, branch, body) = (proxy.admin, branch.to_owned(), body.to_owned());
    tokio::task::spawn_blocking(move || reset_at(port, &branch, &body))
}

/// The audit events `/api/v1/events` returns for `query`, newest first.
fn events(proxy: &ProxyProc, query: &str) -> Vec<Value> {
    let (status, body) = proxy.api("GET", &format!("/api/v1/events{query}"), None);
    assert_eq!(status, 200, "{body}");
    json(&body).as_array().unwrap().clone()
}

fn take_snapshot(proxy: &ProxyProc) -> String {
    let (status, body) = proxy.api("POST", "/api/v1/sources/shop/snapshots", None);
    assert_eq!(status, 201, "{body}");
    json(&body)["name"].as_str().unwrap().to_owned()
}

/// Runs a statement that lasts until its session is ended; returns its error.
fn long_query(c: tokio_postgres::Client) -> tokio::task::JoinHandle<tokio_postgres::Error> {
    tokio::spawn(async move {
        c.batch_execute("SELECT pg_sleep(120)")
            .await
            .expect_err("the session should have been ended")
    })
}

async fn ended_by_reset(query: tokio::task::JoinHandle<tokio_postgres::Error>) {
    let err = tokio::time::timeout(Duration::from_secs(60), query)
        .await
        .expect("the session ended")
        .unwrap();
    assert_eq!(sqlstate(&err), "57P01", "{err}");
    let msg = err.as_db_error().unwrap().message().to_owned();
    assert_eq!(
        msg, "terminating connection because branch shop.qa was reset",
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_reset_refuses_open_sessions_unless_forced() {
    let Fixture { pg, proxy } = Fixture::start(Engine::Database, "").await;
    let a = proxy.connect("shop.qa").await.unwrap();
    mark(&a, "mine").await;
    assert_eq!(count(&a).await, 4);
    // The source moves on; the source has no snapshots, so a reset clones it live.
    pg.direct("shop")
        .await
        .batch_execute("INSERT INTO items VALUES (4, 'four'), (5, 'five')")
        .await
        .unwrap();

    let (status, body) = reset(&proxy, "qa", "{}");
    assert_eq!(status, 409, "{body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("1 open connection"), "{body}");
    assert!(msg.contains("force"), "{body}");
    assert_eq!(body["error"]["code"], "conflict", "{body}");
    assert_eq!(count(&a).await, 4, "a refused reset changes nothing");
    // Every write takes a JSON body.
    let (status, _) = proxy.api("POST", "/api/v1/branches/shop/qa/reset", None);
    assert_eq!(status, 400);
    let (status, body) = reset(&proxy, "qa", r#"{"forse":true}"#);
    assert_eq!(status, 422, "{body}");
    let (status, body) = reset(&proxy, "nobody", "{}");
    assert_eq!(status, 404, "{body}");
    let (status, body) = reset(&proxy, "qa", r#"{"snapshot":"19990101T000000Z"}"#);
    assert_eq!(status, 404, "{body}");

    let clone = proxy.branches()[0]["clone_name"]
        .as_str()
        .unwrap()
        .to_owned();
    let query = long_query(a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, body) = reset_in_background(&proxy, "qa", r#"{"force":true}"#)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "ready", "{body}");
    assert_eq!(
        body["clone_name"],
        clone.as_str(),
        "same name, same database"
    );
    ended_by_reset(query).await;

    // Same address, the source's data, the branch's own write gone.
    let b = proxy.connect("shop.qa").await.unwrap();
    assert_eq!(count(&b).await, 5);
    let marks = b
        .query("SELECT 1 FROM items WHERE id = 10", &[])
        .await
        .unwrap();
    assert!(marks.is_empty());
    assert_eq!(clones(&pg).await, vec![clone]);
    assert_eq!(
        proxy.metric("offshoot_resets_total{outcome=\"ok\",source=\"shop\"}"),
        1.0
    );
    assert_eq!(proxy.metric("offshoot_errors_total{kind=\"reset\"}"), 1.0);
    // One audit line for the reset (by the API), none for a creation.
    let trail = events(&proxy, "?branch=qa");
    let resets: Vec<&Value> = trail
        .iter()
        .filter(|e| e["action"] == "branch.reset")
        .collect();
    assert_eq!(resets.len(), 1, "{trail:#?}");
    assert_eq!(resets[0]["actor"]["kind"], "api");
    assert_eq!(resets[0]["outcome"], "ok", "{trail:#?}");
    let created = trail
        .iter()
        .filter(|e| e["action"] == "branch.created")
        .count();
    assert_eq!(created, 1, "{trail:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_reset_takes_the_newest_snapshot_and_arrivals_wait_for_it() {
    let Fixture { pg, proxy } = Fixture::start(Engine::Instance, "").await;
    let a = proxy.connect("shop.qa").await.unwrap();
    mark(&a, "mine").await;
    let first = proxy.branches()[0]["snapshot"].as_str().unwrap().to_owned();
    pg.direct("shop")
        .await
        .batch_execute("INSERT INTO items VALUES (4, 'four')")
        .await
        .unwrap();
    let newest = take_snapshot(&proxy);
    assert_ne!(first, newest);

    let (status, body) = reset(&proxy, "qa", "{}");
    assert_eq!(status, 409, "{body}");

    let query = long_query(a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let resetting = reset_in_background(&proxy, "qa", r#"{"force":true}"#);
    // A connection arriving while the branch is made again waits for the new clone.
    assert!(
        eventually_every(30, Duration::from_millis(5), || proxy.branches()[0]
            ["state"]
            == "provisioning")
        .await,
        "the reset shows as the branch being made"
    );
    let arrival = proxy.connect("shop.qa").await.unwrap();
    assert_eq!(count(&arrival).await, 4, "the new snapshot's data");
    let (status, body) = resetting.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["snapshot"], newest.as_str(), "{body}");
    ended_by_reset(query).await;
    drop(arrival);

    // A named snapshot, with nobody connected: no force needed.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, body) = reset(&proxy, "qa", &format!(r#"{{"snapshot":"{first}"}}"#));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["snapshot"], first.as_str(), "{body}");
    assert_eq!(count(&proxy.connect("shop.qa").await.unwrap()).await, 3);
    assert_eq!(
        proxy.metric("offshoot_resets_total{outcome=\"ok\",source=\"shop\"}"),
        2.0
    );
}

fn snapshot_names(proxy: &ProxyProc) -> Vec<String> {
    let (status, body) = proxy.api("GET", "/api/v1/sources/shop/snapshots", None);
    assert_eq!(status, 200, "{body}");
    json(&body)
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect()
}

fn snapshot_of(proxy: &ProxyProc, branch: &str) -> String {
    let b = proxy
        .branch(branch)
        .unwrap_or_else(|| panic!("no branch {branch} in {}", proxy.branches()));
    b["snapshot"].as_str().unwrap_or("").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_snapshot_refreshes_an_idle_qa_branch_while_a_busy_one_waits() {
    let extra = "snapshot_every = \"1m\"\nkeep_snapshots = 1\n\
                 [[sources.shop.policies]]\nmatch = \"qa*\"\npersistent = true\n\
                 protected = true\nrefresh = \"on_snapshot\"\n";
    let Fixture { pg, proxy } = Fixture::start(Engine::Database, extra).await;
    let first = take_snapshot(&proxy);
    let idle = proxy.connect("shop.qa-idle").await.unwrap();
    mark(&idle, "idle").await;
    drop(idle);
    let busy = proxy.connect("shop.qa-busy").await.unwrap();
    mark(&busy, "busy").await;
    // Protected by its policy: a person needs force.
    let (status, body) = reset(&proxy, "qa-idle", "{}");
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("is protected (its policy)"),
        "{body}"
    );
    {
        let source = pg.direct("shop").await;
        source
            .batch_execute("INSERT INTO items VALUES (4, 'four')")
            .await
            .unwrap();
    }

    // The schedule takes its first snapshot a minute after the start.
    assert!(
        eventually(180, || snapshot_names(&proxy).iter().any(|n| *n != first)).await,
        "a scheduled snapshot was taken: {:?}",
        snapshot_names(&proxy)
    );
    assert!(
        eventually(60, || snapshot_of(&proxy, "qa-idle") != first).await,
        "the idle QA branch was refreshed"
    );
    let fresh = proxy.connect("shop.qa-idle").await.unwrap();
    assert_eq!(
        count(&fresh).await,
        4,
        "the new snapshot's data, without its mark"
    );
    drop(fresh);
    // The busy one keeps its session and its data meanwhile.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(snapshot_of(&proxy, "qa-busy"), first);
    assert_eq!(mark_of(&busy).await, "busy");
    drop(busy);
    assert!(
        eventually(60, || snapshot_of(&proxy, "qa-busy") != first).await,
        "the busy QA branch was refreshed once its session closed"
    );
    assert_eq!(
        count(&proxy.connect("shop.qa-busy").await.unwrap()).await,
        4
    );
    // The first snapshot, no longer used, is beyond keep_snapshots = 1.
    assert!(
        eventually(60, || !snapshot_names(&proxy).contains(&first)).await,
        "{:?}",
        snapshot_names(&proxy)
    );
    assert!(
        proxy.metric("offshoot_scheduled_snapshots_total{outcome=\"ok\",source=\"shop\"}") >= 1.0
    );
    assert!(proxy.log().contains("scheduled snapshot taken"));
    // The schedule's work is audited as the scheduler's.
    let trail = events(&proxy, "");
    for (action, branch) in [
        ("branch.reset", Some("qa-idle")),
        ("branch.reset", Some("qa-busy")),
        ("snapshot.taken", None),
        ("snapshot.deleted", None),
    ] {
        assert!(
            trail.iter().any(|e| e["action"] == action
                && e["actor"]["kind"] == "scheduler"
                && branch.is_none_or(|b| e["branch"] == b)),
            "{action} {branch:?} by the scheduler in {trail:#?}"
        );
    }
}

/// The demo schema (`conf/demo-shop.sql`) loaded into database `shop` of `pg`.
async fn load_demo_shop(pg: &PgServer) {
    let seed = std::fs::read_to_string(repo_file("conf/demo-shop.sql")).unwrap();
    pg.direct("shop").await.batch_execute(&seed).await.unwrap();
}

fn repo_file(rel: &str) -> String {
    format!("{}/{rel}", env!("CARGO_MANIFEST_DIR"))
}

/// Emails of `customers` as the source has them, and as branch `branch` has them.
async fn emails(c: &tokio_postgres::Client) -> Vec<String> {
    c.query("SELECT email FROM customers ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn masking_hides_every_original_email(engine: Engine) {
    let extra = format!(
        "snapshot_transform = [\"{}\"]\n",
        repo_file("conf/mask.sql")
    );
    let pg = PgServer::start();
    pg.make_source("shop").await;
    load_demo_shop(&pg).await;
    let originals = emails(&pg.direct("shop").await).await;
    assert_eq!(originals.len(), 2000);
    let joined = "SELECT count(*) FROM orders o JOIN customers c ON c.id = o.customer_id";
    let source_orders: i64 = pg
        .direct("shop")
        .await
        .query_one(joined, &[])
        .await
        .unwrap()
        .get(0);
    let Fixture { pg, proxy } = Fixture::over(pg, engine, "", &extra);

    // No snapshot yet: the first branch takes (and masks) one, never the live source.
    for branch in ["shop.a", "shop.b"] {
        let c = proxy.connect(branch).await.unwrap();
        let masked = emails(&c).await;
        assert_eq!(masked.len(), originals.len());
        for e in &masked {
            assert!(!originals.contains(e), "original email {e} in {branch}");
            assert!(e.ends_with("@example.invalid"), "{e}");
        }
        let names: i64 = c
            .query_one(
                "SELECT count(*) FROM customers WHERE name LIKE 'Customer %'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(names, 2000);
        let orders: i64 = c.query_one(joined, &[]).await.unwrap().get(0);
        assert_eq!(orders, source_orders, "joins still hold");
    }
    let snaps = snapshot_names(&proxy);
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    // Deterministic: the next snapshot masks the same way.
    let second = take_snapshot(&proxy);
    let body = format!(r#"{{"source":"shop","branch":"c","snapshot":"{second}"}}"#);
    let (status, text) = proxy.api("POST", "/api/v1/branches", Some(&body));
    assert_eq!(status, 201, "{text}");
    let c = proxy.connect("shop.c").await.unwrap();
    let a = proxy.connect("shop.a").await.unwrap();
    assert_eq!(emails(&c).await, emails(&a).await);
    // The source itself is untouched.
    assert_eq!(emails(&pg.direct("shop").await).await, originals);
    assert!(proxy.log().contains("snapshot transform applied"));
}

per_engine!(masking_hides_every_original_email);

async fn a_failing_transform_discards_the_snapshot(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("mask-bad.sql");
    std::fs::write(
        &bad,
        "-- two statements; the second names a table that is not there\n\
         UPDATE items SET note = 'masked; ' || md5(note);\n\
         UPDATE nosuchtable SET x = 1;\n",
    )
    .unwrap();
    let extra = format!("snapshot_transform = [\"{}\"]\n", bad.display());
    let Fixture { pg, proxy } = Fixture::start(engine, &extra).await;
    let (status, body) = proxy.api("POST", "/api/v1/sources/shop/snapshots", None);
    assert!(status >= 400, "{status} {body}");
    let msg = json(&body)["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    for part in [
        "mask-bad.sql",
        "statement 2",
        "relation \"nosuchtable\" does not exist",
        "discarded",
    ] {
        assert!(msg.contains(part), "{part:?} in {msg}");
    }
    assert!(
        !msg.contains(&dir.path().display().to_string()),
        "no paths: {msg}"
    );
    assert!(snapshot_names(&proxy).is_empty());
    if matches!(engine, Engine::Database) {
        let left: Vec<String> = pg
            .databases()
            .await
            .into_iter()
            .filter(|d| d.starts_with("shop@"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    } else {
        let snaps = instance_storage(&proxy, "shop").join("snapshots");
        let left: Vec<_> = std::fs::read_dir(&snaps).unwrap().flatten().collect();
        assert!(left.is_empty(), "{left:?}");
    }
    // A branch is never made from the live source instead.
    let err = proxy.connect("shop.a").await.unwrap_err();
    let text = err
        .as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_default();
    assert!(text.contains("statement 2"), "{err}");
    assert!(proxy.branches().as_array().unwrap().is_empty());
}

per_engine!(a_failing_transform_discards_the_snapshot);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_in_progress_is_listed_with_its_phase() {
    let dir = tempfile::tempdir().unwrap();
    let slow = dir.path().join("slow.sql");
    std::fs::write(&slow, "SELECT pg_sleep(4);\n").unwrap();
    let extra = format!("snapshot_transform = [\"{}\"]\n", slow.display());
    let Fixture { pg: _pg, proxy } = Fixture::start(Engine::Database, &extra).await;
    let port = proxy.admin;
    let taking = tokio::task::spawn_blocking(move || {
        http(port, "POST", "/api/v1/sources/shop/snapshots", None)
    });
    let mut seen = Value::Null;
    assert!(
        eventually(30, || {
            let (_, body) = proxy.api("GET", "/api/v1/sources/shop/snapshots", None);
            let list = json(&body);
            match list
                .as_array()
                .and_then(|l| l.iter().find(|s| !s["progress"].is_null()))
            {
                Some(s) if s["progress"]["phase"] == "transforming" => {
                    seen = s.clone();
                    true
                }
                _ => false,
            }
        })
        .await,
        "the snapshot was listed while its transform ran"
    );
    let (status, body) = taking.await.unwrap();
    assert_eq!(status, 201, "{body}");
    assert_eq!(seen["name"], json(&body)["name"], "{seen}");
    let list = snapshot_names(&proxy);
    assert_eq!(list.len(), 1);
    let (_, body) = proxy.api("GET", "/api/v1/sources/shop/snapshots", None);
    assert!(json(&body)[0]["progress"].is_null(), "{body}");
    let log = proxy.log();
    for phase in [
        "phase=\"copying\"",
        "phase=\"transforming\"",
        "phase=\"sealing\"",
    ] {
        assert!(log.contains(phase), "{phase} in the log");
    }
}
