//! The proxy killed (SIGKILL) at each step of a branch's creation, for both engines.
//! After the restart every interrupted creation is settled: adopted when the clone
//! is complete and provably the proxy's, otherwise removed (what the proxy made) or
//! left alone and reported (what it cannot prove it made); and every branch name
//! can be used again.

use std::path::Path;
use std::time::Duration;

use crate::harness::*;

/// A `provisioning` record, as the registry writes it before a creation starts.
fn provisioning_record(proxy: &ProxyProc, engine: &str, branch: &str, clone: &str) {
    write_record(proxy, engine, branch, clone, "provisioning");
}

fn cp_a(from: &Path, to: &Path) {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "cp -a {} {}",
        from.display(),
        to.display()
    );
}

/// Connects to `shop.<branch>` and reads the source's rows; the error, if any, must
/// not carry a path of the proxy's storage.
async fn usable(proxy: &ProxyProc, branch: &str) {
    let root = instance_storage(proxy, "shop");
    match proxy.connect(&format!("shop.{branch}")).await {
        Ok(c) => {
            let n: i64 = c
                .query_one("SELECT count(*) FROM items", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(n, 3, "{branch}");
        }
        Err(e) => {
            let msg = e.as_db_error().map(|d| d.message().to_owned());
            let msg = msg.unwrap_or_else(|| e.to_string());
            assert!(!msg.contains(&root.display().to_string()), "a path: {msg}");
            panic!("branch {branch} cannot be used after the restart: {msg}");
        }
    }
}

fn orphans(proxy: &ProxyProc) -> String {
    let (status, body) = proxy.api("GET", "/api/v1/orphans", None);
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_creation_killed_at_each_step_is_settled_on_restart() {
    let pg = PgServer::start();
    pg.make_source("shop").await;
    let mut proxy = ProxyProc::start(&instance_source("shop", &pg, ""));
    // A snapshot and a branch to imitate, its server stopped cleanly.
    drop(proxy.connect("shop.done").await.unwrap());
    assert!(
        eventually(10, || proxy
            .api("POST", "/api/v1/branches/shop/done/suspend", None)
            .0
            == 200)
        .await
    );
    proxy.kill9();

    // What a SIGKILL leaves at each step of a creation (the record comes first).
    let branches = instance_storage(&proxy, "shop").join("branches");
    let done = branches.join("done");
    // 1. Before anything was made.
    provisioning_record(&proxy, "instance", "none", "none");
    // 2. Its staging directory made, nothing in it yet.
    provisioning_record(&proxy, "instance", "empty", "empty");
    std::fs::create_dir(branches.join(".new-empty")).unwrap();
    // 3. Its metadata being written.
    provisioning_record(&proxy, "instance", "meta", "meta");
    std::fs::create_dir(branches.join(".new-meta")).unwrap();
    std::fs::write(branches.join(".new-meta/.branch.json.tmp"), "{\"sour").unwrap();
    // 4. Half of the files copied.
    provisioning_record(&proxy, "instance", "copying", "copying");
    let copying = branches.join(".new-copying");
    std::fs::create_dir_all(copying.join("data")).unwrap();
    std::fs::copy(
        done.join("data/PG_VERSION"),
        copying.join("data/PG_VERSION"),
    )
    .unwrap();
    let meta = std::fs::read_to_string(done.join("branch.json")).unwrap();
    let meta = meta
        .replace("\"done\"", "\"copying\"")
        .replace("\"complete\": true", "\"complete\": false");
    std::fs::write(copying.join("branch.json"), meta).unwrap();
    // 5. Renamed into place: complete, but the record not yet marked ready (nor the
    //    server started).
    provisioning_record(&proxy, "instance", "claimed", "claimed");
    let claimed = branches.join("claimed");
    cp_a(&done, &claimed);
    let meta = std::fs::read_to_string(claimed.join("branch.json")).unwrap();
    std::fs::write(
        claimed.join("branch.json"),
        meta.replace("\"done\"", "\"claimed\""),
    )
    .unwrap();
    // 6. What an older version left: the branch's own directory holding only the
    //    temporary metadata file.
    provisioning_record(&proxy, "instance", "legacy", "legacy");
    std::fs::create_dir(branches.join("legacy")).unwrap();
    std::fs::write(branches.join("legacy/.branch.json.tmp"), "").unwrap();

    proxy.restart();
    // Only the complete clone is adopted; what the others left is gone.
    assert_eq!(proxy.branch_names(), vec!["claimed", "done"]);
    let mut left: Vec<String> = std::fs::read_dir(&branches)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, vec!["claimed", "done"]);
    assert_eq!(orphans(&proxy), "[]");
    // The adopted clone is recorded as its creation would have: the snapshot and
    // copy mode its branch.json names.
    let entry = |b: &str| {
        let (status, body) = proxy.api("GET", &format!("/api/v1/branches/shop/{b}"), None);
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    let (claimed, done) = (entry("claimed"), entry("done"));
    assert!(done["snapshot"].is_string(), "{done}");
    assert_eq!(claimed["snapshot"], done["snapshot"], "{claimed}");
    assert_eq!(claimed["copy_mode"], done["copy_mode"], "{claimed}");
    for b in [
        "none", "empty", "meta", "copying", "claimed", "legacy", "done",
    ] {
        usable(&proxy, b).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_creations_killed_mid_copy_leave_every_name_usable() {
    let pg = PgServer::start();
    pg.make_source("shop").await;
    let mut proxy = ProxyProc::start(&instance_source("shop", &pg, ""));
    // The snapshot exists, so the kill lands in the copies and server starts.
    drop(proxy.connect("shop.first").await.unwrap());
    let names: Vec<String> = (0..16).map(|i| format!("crash-{i}")).collect();
    let tasks: Vec<_> = names
        .iter()
        .map(|b| {
            let url = proxy.url(&format!("shop.{b}"));
            tokio::spawn(async move { connect(&url).await.map(drop) })
        })
        .collect();
    let branches = instance_storage(&proxy, "shop").join("branches");
    // Killed once the first copies are under way.
    let staged = || {
        std::fs::read_dir(&branches)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(".new-"))
    };
    assert!(eventually(20, staged).await, "no creation caught in flight");
    tokio::time::sleep(Duration::from_millis(50)).await;
    proxy.kill9();
    for t in tasks {
        let _ = t.await.unwrap();
    }

    proxy.restart();
    assert!(!staged(), "staging directories left after the restart");
    assert_eq!(orphans(&proxy), "[]");
    for b in &names {
        usable(&proxy, b).await;
    }
    for b in &names {
        let data = branches.join(b).join("data");
        assert!(!processes_in(&data).is_empty(), "{b} has a server");
    }
}

/// Server sessions waiting for a lock while marking a clone.
async fn marking(pg: &PgServer) -> Vec<(i32, String)> {
    pg.direct("postgres")
        .await
        .query(
            "SELECT pid, query FROM pg_stat_activity \
             WHERE query LIKE 'COMMENT ON DATABASE %' AND wait_event_type = 'Lock'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_creation_killed_before_or_after_its_marker_is_adopted() {
    let pg = PgServer::start();
    pg.make_source("shop").await;
    let mut proxy = ProxyProc::start(&source("shop", &pg, ""));
    // A lock holds every creation between CREATE DATABASE and its ownership marker
    // (COMMENT ON DATABASE writes pg_shdescription).
    let holder = pg.direct("postgres").await;
    holder
        .batch_execute("BEGIN; LOCK TABLE pg_shdescription IN SHARE MODE")
        .await
        .unwrap();
    let tasks: Vec<_> = ["early", "late"]
        .iter()
        .map(|b| {
            let url = proxy.url(&format!("shop.{b}"));
            tokio::spawn(async move { connect(&url).await.map(drop) })
        })
        .collect();
    let mut held = Vec::new();
    for _ in 0..200 {
        held = marking(&pg).await;
        if held.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(held.len(), 2, "creations not caught before their marker");
    // 1. Before anything was made: only the record.
    proxy.kill9();
    provisioning_record(&proxy, "database", "none", "shop__none");
    for t in tasks {
        let _ = t.await.unwrap();
    }
    // 2. `early`: the marker never comes (its session dies with the proxy).
    // 3. `late`: the marker commits after the proxy died.
    let (early, _) = held
        .iter()
        .find(|(_, q)| q.contains("shop__early"))
        .unwrap();
    let admin = pg.direct("postgres").await;
    admin
        .query_one("SELECT pg_terminate_backend($1, 10000)", &[early])
        .await
        .unwrap();
    holder.batch_execute("ROLLBACK").await.unwrap();
    for _ in 0..200 {
        if marking(&pg).await.is_empty() && db_comment(&pg, "shop__late").await.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(db_comment(&pg, "shop__early").await, None);
    assert_eq!(
        db_comment(&pg, "shop__late").await.as_deref(),
        Some("offshoot:shop/late")
    );

    proxy.restart();
    // Both clones are provably the proxy's (the unmarked one by its OID): adopted and
    // marked; the record that made nothing is dropped.
    assert_eq!(proxy.branch_names(), vec!["early", "late"]);
    assert_eq!(
        db_comment(&pg, "shop__early").await.as_deref(),
        Some("offshoot:shop/early")
    );
    assert_eq!(orphans(&proxy), "[]");
    for b in ["early", "late", "none"] {
        usable(&proxy, b).await;
    }
}
