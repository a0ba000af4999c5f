//! The `instance` engine with real servers: snapshots by pg_basebackup, one
//! postmaster per branch, suspension, expiry and restarts. Data is kept small (a
//! fresh cluster), so plain copies on ext4 are fast enough.

use std::path::Path;

use serde_json::Value;

use crate::harness::*;

/// The copy mode the engine must choose for storage in `dir`: `reflink` where the
/// filesystem clones a file (`cp --reflink=always` succeeds), else `copy`.
fn reflink_or_copy(dir: &Path) -> &'static str {
    let (probe, clone) = (dir.join("reflink-probe"), dir.join("reflink-probe.clone"));
    std::fs::write(&probe, b"probe").unwrap();
    let cloned = std::process::Command::new("cp")
        .arg("--reflink=always")
        .arg(&probe)
        .arg(&clone)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    let _ = std::fs::remove_file(&probe);
    let _ = std::fs::remove_file(&clone);
    if cloned {
        "reflink"
    } else {
        "copy"
    }
}

fn branch<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|b| b["branch"] == name)
        .unwrap_or_else(|| panic!("branch {name} not listed: {list}"))
}

fn state(proxy: &ProxyProc, name: &str) -> String {
    branch(&proxy.branches(), name)["state"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_are_isolated_from_each_other_and_the_source() {
    let Fixture { pg, mut proxy } = Fixture::start(Engine::Instance, "").await;
    let a = proxy.connect("shop.a").await.unwrap();
    a.batch_execute("INSERT INTO items VALUES (4, 'four')")
        .await
        .unwrap();
    let b = proxy.connect("shop.b").await.unwrap();
    assert_eq!(count(&a).await, 4);
    assert_eq!(count(&b).await, 3);
    assert_eq!(count(&pg.direct("shop").await).await, 3);
    // Each branch is a server of its own, on its own copy.
    let da: String = a
        .query_one("SHOW data_directory", &[])
        .await
        .unwrap()
        .get(0);
    let db: String = b
        .query_one("SHOW data_directory", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(da, db);
    assert!(Path::new(&da).ends_with("branches/a/data"), "{da}");
    let listen: String = a
        .query_one("SHOW listen_addresses", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(listen, "", "branch servers have no TCP listener");

    let list = proxy.branches();
    let (va, vb) = (branch(&list, "a"), branch(&list, "b"));
    assert_eq!(va["engine"], "instance");
    assert_eq!(va["state"], "ready");
    let mode = va["copy_mode"].as_str().unwrap().to_owned();
    assert_eq!(
        mode,
        reflink_or_copy(proxy.dir.path()),
        "the copy mode fits the disk"
    );
    assert_eq!(va["snapshot"], vb["snapshot"]);
    assert_eq!(
        proxy.metric(&format!(
            "offshoot_clones_total{{mode=\"{mode}\",source=\"shop\"}}"
        )),
        2.0
    );
    // The first branch took the source's first snapshot.
    let (status, body) = proxy.api("GET", "/api/v1/sources/shop/snapshots", None);
    assert_eq!(status, 200, "{body}");
    let snaps: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(snaps.as_array().unwrap().len(), 1, "{snaps}");
    assert_eq!(snaps[0]["name"], va["snapshot"]);
    assert_eq!(snaps[0]["branches"], serde_json::json!(["a", "b"]));

    // A clean shutdown stops every branch server; the data stays.
    drop((a, b));
    assert!(proxy.terminate());
    assert!(processes_in(&instance_storage(&proxy, "shop")).is_empty());
    assert!(branch_data(&proxy, "shop", "a").join("PG_VERSION").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_branch_is_suspended_and_resumed_with_its_data() {
    let Fixture { pg: _pg, proxy } = Fixture::start(
        Engine::Instance,
        "suspend_after = \"1s\"\n[reaper]\ninterval = \"200ms\"",
    )
    .await;
    let c = proxy.connect("shop.s").await.unwrap();
    c.batch_execute("INSERT INTO items VALUES (4, 'four')")
        .await
        .unwrap();
    let data = branch_data(&proxy, "shop", "s");
    let pid = postmaster_pid(&data).unwrap();
    drop(c);
    assert!(
        eventually(20, || state(&proxy, "s") == "suspended").await,
        "{}",
        proxy.branches()
    );
    assert!(eventually(10, || processes_in(&data).is_empty()).await);
    assert!(!data.join("postmaster.pid").exists());
    assert_eq!(
        proxy.metric("offshoot_suspensions_total{source=\"shop\"}"),
        1.0
    );

    // The next client only waits.
    let c = proxy.connect("shop.s").await.unwrap();
    assert_eq!(count(&c).await, 4);
    assert_eq!(state(&proxy, "s"), "ready");
    assert_ne!(postmaster_pid(&data).unwrap(), pid);
    assert_eq!(
        proxy.metric("offshoot_start_seconds_count{source=\"shop\"}"),
        1.0
    );
    // Suspension on demand, through the API.
    drop(c);
    // The proxy sees the client's close a moment later; until then the branch is in
    // use and a suspension is refused.
    assert!(
        eventually(10, || proxy
            .api("POST", "/api/v1/branches/shop/s/suspend", None)
            .0
            == 200)
        .await,
        "suspended through the API once idle"
    );
    assert_eq!(state(&proxy, "s"), "suspended");
    let c = proxy.connect("shop.s").await.unwrap();
    assert_eq!(count(&c).await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_removes_the_directory_and_the_server() {
    let Fixture { pg: _pg, proxy } = Fixture::start(
        Engine::Instance,
        "idle_expire = \"2s\"\nsuspend_after = \"1h\"\n[reaper]\ninterval = \"200ms\"",
    )
    .await;
    let c = proxy.connect("shop.gone").await.unwrap();
    count(&c).await;
    let dir = instance_storage(&proxy, "shop").join("branches/gone");
    let pids = processes_in(&dir);
    assert!(!pids.is_empty());
    drop(c);
    assert!(eventually(20, || proxy.branch_names().is_empty()).await);
    assert!(!dir.exists());
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}/cwd")).exists() || {
                // A recycled pid would work somewhere else.
                std::fs::read_link(format!("/proc/{pid}/cwd"))
                    .map_or(true, |p| !p.starts_with(&dir))
            }
        );
    }
    assert!(processes_in(&instance_storage(&proxy, "shop")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_proxy_readopts_running_suspended_and_crashed_branches() {
    let Fixture { pg: _pg, mut proxy } = Fixture::start(Engine::Instance, "").await;
    for b in ["up", "down", "crashed"] {
        mark(&proxy.connect(&format!("shop.{b}")).await.unwrap(), b).await;
    }
    let (status, body) = proxy.api("POST", "/api/v1/branches/shop/down/suspend", None);
    assert_eq!(status, 200, "{body}");
    let up = branch_data(&proxy, "shop", "up");
    let up_pid = postmaster_pid(&up).unwrap();
    let crashed = branch_data(&proxy, "shop", "crashed");

    proxy.kill9();
    // The server of one branch dies too, leaving a stale postmaster.pid.
    let crashed_pid = postmaster_pid(&crashed).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(crashed_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(eventually(20, || processes_in(&crashed).is_empty()).await);
    assert!(crashed.join("postmaster.pid").exists());
    // Something the proxy did not make, next to its clones.
    let junk = instance_storage(&proxy, "shop").join("branches/junk");
    std::fs::create_dir_all(&junk).unwrap();

    proxy.restart();
    let list = proxy.branches();
    assert_eq!(branch(&list, "up")["state"], "ready");
    assert_eq!(branch(&list, "down")["state"], "suspended");
    assert_eq!(branch(&list, "crashed")["state"], "suspended");
    assert!(
        !crashed.join("postmaster.pid").exists(),
        "stale pid file left"
    );
    // The running server was reused, not restarted.
    assert_eq!(postmaster_pid(&up), Some(up_pid));
    for b in ["up", "down", "crashed"] {
        let c = proxy.connect(&format!("shop.{b}")).await.unwrap();
        assert_eq!(mark_of(&c).await, b, "data survives the restart");
    }
    assert_eq!(postmaster_pid(&up), Some(up_pid));
    // Unexplained directories are reported and left alone.
    let (_, body) = proxy.api("GET", "/api/v1/orphans", None);
    assert!(body.contains("branches/junk"), "{body}");
    assert!(junk.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_are_chosen_and_cannot_be_deleted_while_used() {
    let Fixture { pg, proxy } = Fixture::start(Engine::Instance, "").await;
    let take = || {
        let (status, body) = proxy.api("POST", "/api/v1/sources/shop/snapshots", None);
        assert_eq!(status, 201, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["name"].as_str().unwrap().to_owned()
    };
    let old = take();
    pg.direct("shop")
        .await
        .batch_execute("INSERT INTO items VALUES (4, 'four')")
        .await
        .unwrap();
    let new = take();
    assert_ne!(old, new);

    // An explicit snapshot, then the default (the newest).
    let body = format!(r#"{{"source":"shop","branch":"old","snapshot":"{old}"}}"#);
    let (status, text) = proxy.api("POST", "/api/v1/branches", Some(&body));
    assert_eq!(status, 201, "{text}");
    assert_eq!(count(&proxy.connect("shop.old").await.unwrap()).await, 3);
    assert_eq!(count(&proxy.connect("shop.new").await.unwrap()).await, 4);
    assert_eq!(branch(&proxy.branches(), "new")["snapshot"], new.as_str());
    let body = r#"{"source":"shop","branch":"x","snapshot":"20000101T000000Z"}"#;
    let (status, text) = proxy.api("POST", "/api/v1/branches", Some(body));
    assert_eq!(status, 404, "{text}");
    assert!(text.contains("does not exist"), "{text}");
    assert!(text.contains(r#""code":"not_found""#), "{text}");

    let path = format!("/api/v1/sources/shop/snapshots/{old}");
    let (status, text) = proxy.api("DELETE", &path, None);
    assert_eq!(status, 409, "{text}");
    assert!(text.contains("old"), "{text}");
    // The CLI shows the same.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_offshoot"))
        .args(["snapshot", "list", "shop", "--admin"])
        .arg(format!("127.0.0.1:{}", proxy.admin))
        .arg("--config")
        .arg(proxy.dir.path().join("offshoot.toml"))
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && listing.contains(&old), "{listing}");

    let (status, _) = proxy.api("DELETE", "/api/v1/branches/shop/old", None);
    assert_eq!(status, 204);
    let (status, text) = proxy.api("DELETE", &path, None);
    assert_eq!(status, 204, "{text}");
    let (status, _) = proxy.api("DELETE", &path, None);
    assert_eq!(status, 404);
    let (_, text) = proxy.api("GET", "/api/v1/sources/shop/snapshots", None);
    let left: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(left.as_array().unwrap().len(), 1);
    assert!(!instance_storage(&proxy, "shop")
        .join("snapshots")
        .join(&old)
        .exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_cannot_start_fails_clearly_and_leaves_nothing() {
    let Fixture { pg: _pg, proxy } = Fixture::start(
        Engine::Instance,
        "[sources.shop.settings]\nno_such_setting = \"1\"",
    )
    .await;
    for _ in 0..2 {
        let err = proxy.connect("shop.bad").await.unwrap_err();
        let msg = err
            .as_db_error()
            .expect("a server error")
            .message()
            .to_owned();
        assert!(
            msg.contains("bad") && msg.contains("unrecognized configuration parameter"),
            "{msg}"
        );
        assert!(msg.contains("no_such_setting"), "{msg}");
    }
    assert!(proxy.branch_names().is_empty());
    assert!(!proxy
        .dir
        .path()
        .join("state/branches/shop/bad.json")
        .exists());
    let branches = instance_storage(&proxy, "shop").join("branches");
    assert_eq!(std::fs::read_dir(&branches).unwrap().count(), 0);
    assert!(processes_in(&instance_storage(&proxy, "shop")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_server_that_dies_is_started_again_by_the_next_connection() {
    let Fixture { pg: _pg, proxy } = Fixture::start(Engine::Instance, "").await;
    let c = proxy.connect("shop.k").await.unwrap();
    c.batch_execute("INSERT INTO items VALUES (4, 'four')")
        .await
        .unwrap();
    drop(c);
    let data = branch_data(&proxy, "shop", "k");
    let pid = postmaster_pid(&data).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(eventually(20, || processes_in(&data).is_empty()).await);
    // Nothing has noticed yet.
    assert_eq!(state(&proxy, "k"), "ready");
    // The next connection finds the server gone and has it started again.
    let c = proxy.connect("shop.k").await.unwrap();
    assert_eq!(count(&c).await, 4);
    assert_eq!(state(&proxy, "k"), "ready");
    assert_ne!(postmaster_pid(&data).unwrap(), pid);
    assert_eq!(
        proxy.metric("offshoot_start_seconds_count{source=\"shop\"}"),
        1.0
    );
}
