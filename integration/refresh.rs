//! Reset and refresh: a branch made again from a snapshot (or the live source)
//! under the same name and address, on real servers through the real proxy.

use std::time::Duration;

use serde_json::Value;

use crate::harness::*;

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or(Value::Null)
}

fn reset(proxy: &ProxyProc, branch: &str, body: &str) -> (u16, Value) {
    let path = format!("/api/v1/branches/shop/{branch}/reset");
    let (status, text) = proxy.api("POST", &path, Some(body));
    (status, json(&text))
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
    let (status, body) = tokio::task::spawn_blocking({
        let port = proxy.admin;
        move || {
            let (s, b) = http(
                port,
                "POST",
                "/api/v1/branches/shop/qa/reset",
                Some(r#"{"force":true}"#),
            );
            (s, json(&b))
        }
    })
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
    let port = proxy.admin;
    let resetting = tokio::task::spawn_blocking(move || {
        let (s, b) = http(
            port,
            "POST",
            "/api/v1/branches/shop/qa/reset",
            Some(r#"{"force":true}"#),
        );
        (s, json(&b))
    });
    // A connection arriving while the branch is made again waits for the new clone.
    assert!(
        eventually(30, || proxy.branches()[0]["state"] == "provisioning").await,
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
    let list = proxy.branches();
    let b = list
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["branch"] == branch)
        .unwrap_or_else(|| panic!("no branch {branch} in {list}"));
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
