//! Snapshots of `database` sources: template databases of the proxy's own, closed to
//! clients, that branches are cloned from instead of the live source.

use serde_json::Value;

use crate::harness::*;

fn take(proxy: &ProxyProc) -> (u16, Value) {
    let (status, body) = proxy.api("POST", "/api/v1/sources/shop/snapshots", None);
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_branches_clone_a_snapshot_not_the_live_source() {
    let Fixture { pg, proxy } = Fixture::start(Engine::Database, "").await;
    let (status, snap) = take(&proxy);
    assert_eq!(status, 201, "{snap}");
    let old = snap["name"].as_str().unwrap().to_owned();
    let datname = format!("shop@{old}");
    assert!(pg.databases().await.contains(&datname));
    // Nobody can open it, so nobody can block a clone of it.
    let err = connect(&pg.url(&datname)).await.unwrap_err();
    assert_eq!(sqlstate(&err), "55000", "{err}");

    // A session on the live source no longer stops branches.
    let holder = pg.direct("shop").await;
    holder
        .batch_execute("INSERT INTO items VALUES (4, 'four')")
        .await
        .unwrap();
    let a = proxy.connect("shop.a").await.unwrap();
    assert_eq!(count(&a).await, 3, "cloned from the snapshot");
    let list = proxy.branches();
    assert_eq!(list[0]["snapshot"], old.as_str());
    // ... but a new snapshot needs the source to itself.
    let (status, body) = take(&proxy);
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "server_error", "{body}");
    assert!(body.to_string().contains("being accessed"), "{body}");
    drop(holder);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let (status, snap) = take(&proxy);
    assert_eq!(status, 201, "{snap}");
    let new = snap["name"].as_str().unwrap().to_owned();
    assert_eq!(count(&proxy.connect("shop.b").await.unwrap()).await, 4);

    let (_, body) = proxy.api("GET", "/api/v1/sources/shop/snapshots", None);
    let snaps: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(snaps[0]["name"], old.as_str());
    assert_eq!(snaps[0]["branches"], serde_json::json!(["a"]));
    assert_eq!(snaps[1]["branches"], serde_json::json!(["b"]));

    let path = format!("/api/v1/sources/shop/snapshots/{old}");
    let (status, body) = proxy.api("DELETE", &path, None);
    assert_eq!(status, 409, "{body}");
    drop(a);
    let (status, _) = proxy.api("DELETE", "/api/v1/branches/shop/a?force=true", None);
    assert_eq!(status, 204);
    let (status, body) = proxy.api("DELETE", &path, None);
    assert_eq!(status, 204, "{body}");
    assert!(!pg.databases().await.contains(&datname));
    let (_, body) = proxy.api("GET", "/api/v1/sources/shop/snapshots", None);
    let snaps: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(snaps.as_array().unwrap().len(), 1);
    assert_eq!(snaps[0]["name"], new.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_marker_written_by_another_role_poisons_no_clone() {
    let mut f = Fixture::start(Engine::Database, "").await;
    // A role that may create databases can comment on its own: it writes the
    // proxy's snapshot marker on one database with a free name, and on one named
    // exactly by the snapshot rule. Neither holds the source's data.
    let admin = f.pg.direct("postgres").await;
    for sql in [
        "CREATE ROLE mallory LOGIN CREATEDB",
        "SET ROLE mallory",
        "CREATE DATABASE evil",
        "COMMENT ON DATABASE evil IS 'offshoot-snapshot:shop/29990101T000000Z'",
        "CREATE DATABASE \"shop@29990101T000001Z\"",
        "COMMENT ON DATABASE \"shop@29990101T000001Z\" \
         IS 'offshoot-snapshot:shop/29990101T000001Z'",
        "RESET ROLE",
    ] {
        admin.batch_execute(sql).await.unwrap();
    }
    f.proxy.kill9_and_restart();

    let (status, body) = f.proxy.api("GET", "/api/v1/sources/shop/snapshots", None);
    assert_eq!((status, body.as_str()), (200, "[]"));
    // Branches still clone the live source.
    assert_eq!(count(&f.proxy.connect("shop.a").await.unwrap()).await, 3);
    // Asked for by name, such a "snapshot" does not exist.
    let body = r#"{"source":"shop","branch":"b","snapshot":"29990101T000001Z"}"#;
    let (status, text) = f.proxy.api("POST", "/api/v1/branches", Some(body));
    assert_eq!(status, 404, "{text}");
    // Both are reported, and left alone.
    let (_, orphans) = f.proxy.api("GET", "/api/v1/orphans", None);
    assert!(orphans.contains("\"evil\""), "{orphans}");
    assert!(orphans.contains("shop@29990101T000001Z"), "{orphans}");
    let dbs = f.pg.databases().await;
    assert!(
        dbs.contains(&"evil".to_string()) && dbs.contains(&"shop@29990101T000001Z".to_string())
    );
}
