//! Governed branches through the real proxy: policies by name pattern deciding
//! expiry and lifetime, TTLs set at creation and changed later, protection and
//! persistence refusing deletion until forced, and idempotent creation.
//!
//! The binary runs on the system clock, so the durations here are seconds long and
//! every wait is generous; the exact arithmetic is tested on the manual clock in the
//! registry's unit tests.

use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::harness::*;

/// Policies for the three shapes, with lifetimes short enough to watch.
const POLICIES: &str = r#"idle_expire = "1h"

[[sources.shop.policies]]
match = "qa*"
persistent = true

[[sources.shop.policies]]
match = "pr-*"
max_lifetime = "3s"

[[sources.shop.policies]]
match = "tmp-*"
idle_expire = "1s"

[[sources.shop.policies]]
match = "keep-*"
protected = true
"#;

async fn fixture() -> Fixture {
    Fixture::start_with(
        Engine::Database,
        "[reaper]\ninterval = \"100ms\"\n",
        POLICIES,
    )
    .await
}

fn view(proxy: &ProxyProc, branch: &str) -> Option<Value> {
    let (status, body) = proxy.api("GET", &format!("/api/v1/branches/shop/{branch}"), None);
    match status {
        200 => Some(serde_json::from_str(&body).unwrap()),
        404 => None,
        _ => panic!("GET {branch}: {status} {body}"),
    }
}

fn time(v: &Value) -> SystemTime {
    humantime::parse_rfc3339(v.as_str().expect("a time")).unwrap()
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn error_of(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    v["error"]["message"]
        .as_str()
        .or(v["error"].as_str())
        .unwrap_or(body)
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pattern_policy_decides_expiry_and_lifetime() {
    let Fixture { pg, proxy } = fixture().await;
    // pr-1 first: its lifetime starts now, so it is looked at straight away.
    let c = proxy.connect("shop.pr-1").await.unwrap();
    let pr = view(&proxy, "pr-1").unwrap();
    drop(c);
    assert_eq!(pr["policy"], "pr-*");
    assert_eq!(
        time(&pr["expires_at"])
            .duration_since(time(&pr["born_at"]))
            .unwrap(),
        Duration::from_secs(3),
        "the lifetime (3s) comes before the source's idle_expire (1h): {pr}"
    );
    for b in ["tmp-1", "other", "qa"] {
        let c = proxy.connect(&format!("shop.{b}")).await.unwrap();
        assert_eq!(count(&c).await, 3);
    }
    let other = view(&proxy, "other").unwrap();
    assert_eq!(other["policy"], Value::Null, "no pattern matches: {other}");
    let qa = view(&proxy, "qa").unwrap();
    assert_eq!(
        (&qa["policy"], &qa["persistent"]),
        (&"qa*".into(), &true.into())
    );
    assert_eq!(qa["expires_at"], Value::Null);

    // tmp-1 goes after a second unused; pr-1, though its idle deadline is an hour
    // away, goes when its lifetime of 3 s ends.
    assert!(
        eventually(30, || proxy.branch_names() == ["other", "qa"]).await,
        "{:?}",
        proxy.branch_names()
    );
    assert_eq!(
        proxy.metric("offshoot_branches_expired_total{reason=\"lifetime\",source=\"shop\"}"),
        1.0
    );
    assert_eq!(
        proxy.metric("offshoot_branches_expired_total{reason=\"idle\",source=\"shop\"}"),
        1.0
    );
    let dbs = pg.databases().await;
    assert!(
        !dbs.iter().any(|d| d == "shop__pr-1" || d == "shop__tmp-1"),
        "{dbs:?}"
    );
    let (_, body) = proxy.api("GET", "/api/v1/events?action=branch.expired", None);
    let expired: Value = serde_json::from_str(&body).unwrap();
    let reason = |b: &str| {
        expired
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["branch"] == b)
            .map(|e| e["reason"].clone())
    };
    assert_eq!(reason("pr-1"), Some("max_lifetime 3s".into()), "{body}");
    assert_eq!(reason("tmp-1"), Some("idle 1s".into()), "{body}");
    let log = proxy.log();
    assert!(
        log.contains("reason=\"lifetime\"") || log.contains("reason=lifetime"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_is_set_at_creation_and_changed_later() {
    let Fixture { proxy, pg: _pg } = fixture().await;
    let (status, body) = proxy.api(
        "POST",
        "/api/v1/branches",
        Some(r#"{"source":"shop","branch":"ci-1","ttl":"1h"}"#),
    );
    assert_eq!(status, 201, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let left = time(&v["expires_at"])
        .duration_since(SystemTime::now())
        .unwrap();
    assert!(left > Duration::from_secs(3000), "about an hour: {v}");

    // Bad values are refused by name; nothing changes.
    for (patch, word) in [
        (r#"{"ttl":"soon"}"#, "\"ttl\""),
        (r#"{"expires_at":"tomorrow"}"#, "\"expires_at\""),
        (
            r#"{"ttl":"1d","expires_at":"2030-01-01T00:00:00Z"}"#,
            "not both",
        ),
        (r#"{"expires_in":"1d"}"#, "expires_in"),
    ] {
        let (status, body) = proxy.api("PATCH", "/api/v1/branches/shop/ci-1", Some(patch));
        // A body that is not the shape the API reads is 422; a value it cannot use, 400.
        let want = if patch.contains("expires_in") {
            422
        } else {
            400
        };
        assert_eq!(status, want, "{patch}: {body}");
        assert!(error_of(&body).contains(word), "{patch}: {body}");
    }
    let (status, _) = proxy.api(
        "PATCH",
        "/api/v1/branches/shop/nope",
        Some(r#"{"ttl":"1d"}"#),
    );
    assert_eq!(status, 404);

    // Shortened to two seconds from now, it goes then, with reason ttl; a restart in
    // between forgets nothing.
    let at = rfc3339(SystemTime::now() + Duration::from_secs(4));
    let (status, body) = proxy.api(
        "PATCH",
        "/api/v1/branches/shop/ci-1",
        Some(&format!(r#"{{"expires_at":"{at}"}}"#)),
    );
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        time(&v["expires_at"]),
        humantime::parse_rfc3339(&at).unwrap()
    );
    // The audit trail has the change, by the API.
    let (status, body) = proxy.api(
        "GET",
        "/api/v1/events?branch=ci-1&action=branch.updated",
        None,
    );
    assert_eq!(status, 200, "{body}");
    let updates: Value = serde_json::from_str(&body).unwrap();
    let last = &updates.as_array().unwrap()[0];
    assert_eq!(last["actor"]["kind"], "api", "{last}");
    assert!(
        last["reason"].as_str().unwrap().contains(&at[..16]),
        "the new deadline: {last}"
    );
    let mut proxy = proxy;
    proxy.kill9_and_restart();
    let v = view(&proxy, "ci-1").expect("still there after the restart");
    assert_eq!(
        time(&v["expires_at"]),
        humantime::parse_rfc3339(&at).unwrap()
    );
    assert!(
        eventually(30, || view(&proxy, "ci-1").is_none()).await,
        "the TTL removes it"
    );
    assert_eq!(
        proxy.metric("offshoot_branches_expired_total{reason=\"ttl\",source=\"shop\"}"),
        1.0
    );
    let (_, body) = proxy.api(
        "GET",
        "/api/v1/events?branch=ci-1&action=branch.expired",
        None,
    );
    let expired: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(expired[0]["reason"], "ttl", "{body}");
    assert_eq!(expired[0]["actor"]["kind"], "reaper", "{body}");

    // A persistent branch takes no TTL, at creation or later.
    let (status, body) = proxy.api(
        "POST",
        "/api/v1/branches",
        Some(r#"{"source":"shop","branch":"qa","ttl":"1d"}"#),
    );
    assert_eq!(status, 400, "{body}");
    assert!(error_of(&body).contains("persistent"), "{body}");
    proxy.connect("shop.qa").await.unwrap();
    let (status, body) = proxy.api("PATCH", "/api/v1/branches/shop/qa", Some(r#"{"ttl":"1d"}"#));
    assert_eq!(status, 409, "{body}");
    assert!(error_of(&body).contains("persistent"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protection_refuses_deletion_until_forced_or_over() {
    let Fixture { pg, mut proxy } = fixture().await;
    // Protected by its policy.
    proxy.connect("shop.keep-1").await.unwrap();
    let v = view(&proxy, "keep-1").unwrap();
    assert_eq!(
        (&v["protected"], &v["expires_at"]),
        (&true.into(), &Value::Null)
    );
    let (status, body) = proxy.api("DELETE", "/api/v1/branches/shop/keep-1", None);
    assert_eq!(status, 409, "{body}");
    assert!(error_of(&body).contains("protected (its policy)"), "{body}");

    // Protected at creation; a restart keeps it so.
    let (status, body) = proxy.api(
        "POST",
        "/api/v1/branches",
        Some(r#"{"source":"shop","branch":"demo","protected":true}"#),
    );
    assert_eq!(status, 201, "{body}");
    proxy.kill9_and_restart();
    let (status, body) = proxy.api("DELETE", "/api/v1/branches/shop/demo", None);
    assert_eq!(status, 409, "{body}");
    assert!(error_of(&body).contains("protected"), "{body}");
    let (status, body) = proxy.api("DELETE", "/api/v1/branches/shop/demo?force=true", None);
    assert_eq!(status, 204, "{body}");
    assert!(!pg.databases().await.contains(&"shop__demo".to_string()));

    // tmp-* branches go after a second idle, but not while protected: protection
    // until a few seconds from now holds the reaper off until then.
    proxy.connect("shop.tmp-2").await.unwrap();
    let until = rfc3339(SystemTime::now() + Duration::from_secs(4));
    let (status, body) = proxy.api(
        "PATCH",
        "/api/v1/branches/shop/tmp-2",
        Some(&format!(r#"{{"protected_until":"{until}"}}"#)),
    );
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["protected"], true);
    assert_eq!(
        time(&v["protected_until"]),
        humantime::parse_rfc3339(&until).unwrap()
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(view(&proxy, "tmp-2").is_some(), "protected, it stays");
    assert!(
        eventually(30, || view(&proxy, "tmp-2").is_none()).await,
        "once the protection ends, the idle deadline applies"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_persistent_branch_needs_force() {
    let Fixture { pg, proxy } = fixture().await;
    proxy.connect("shop.qa").await.unwrap();
    let (status, body) = proxy.api("DELETE", "/api/v1/branches/shop/qa", None);
    assert_eq!(status, 409, "{body}");
    assert!(
        error_of(&body).contains("persistent (its policy)"),
        "{body}"
    );
    assert!(pg.databases().await.contains(&"shop__qa".to_string()));
    let (status, body) = proxy.api("DELETE", "/api/v1/branches/shop/qa?force=true", None);
    assert_eq!(status, 204, "{body}");
    assert!(!pg.databases().await.contains(&"shop__qa".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_is_idempotent_and_never_returns_another_branch() {
    let Fixture { proxy, pg: _pg } = fixture().await;
    let create = |body: &str| {
        let (status, body) = proxy.api("POST", "/api/v1/branches", Some(body));
        (
            status,
            serde_json::from_str::<Value>(&body).unwrap_or(Value::Null),
            body,
        )
    };
    let (status, v, body) = create(r#"{"source":"shop","branch":"ci-7","if_exists":"reuse"}"#);
    assert_eq!(status, 201, "{body}");
    assert_eq!(v["clone_name"], "shop__ci-7");
    let c = proxy.connect("shop.ci-7").await.unwrap();
    mark(&c, "ci-7's own").await;

    let (status, v, body) = create(r#"{"source":"shop","branch":"ci-7","if_exists":"reuse"}"#);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&v["branch"], &v["clone_name"]),
        (&"ci-7".into(), &"shop__ci-7".into())
    );
    let again = proxy.connect("shop.ci-7").await.unwrap();
    assert_eq!(
        mark_of(&again).await,
        "ci-7's own",
        "the same branch, not a new one"
    );

    let (status, _, body) = create(r#"{"source":"shop","branch":"ci-7","if_exists":"fail"}"#);
    assert_eq!(status, 409, "{body}");
    assert!(error_of(&body).contains("exists already"), "{body}");
    let (status, _, body) = create(r#"{"source":"shop","branch":"ci-8","if_exists":"maybe"}"#);
    assert_eq!(status, 422, "{body}");
    assert_eq!(proxy.branch_names(), ["ci-7"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branches_report_their_size_and_max_total_size_refuses_with_53400() {
    // A database clone of the test source is several MB: one fills a 1MB budget.
    let Fixture { proxy, pg: _pg } = Fixture::start_with(
        Engine::Database,
        "[reaper]\ninterval = \"100ms\"\nsize_interval = \"200ms\"\n",
        "max_total_size = \"1MB\"",
    )
    .await;
    let c = proxy.connect("shop.first").await.unwrap();
    assert_eq!(count(&c).await, 3);
    assert!(
        eventually(30, || view(&proxy, "first")
            .is_some_and(|v| v["size_bytes"].is_u64()))
        .await,
        "measured in the background"
    );
    let v = view(&proxy, "first").unwrap();
    let bytes = v["size_bytes"].as_u64().unwrap();
    let direct: i64 = c
        .query_one("SELECT pg_database_size(current_database())", &[])
        .await
        .unwrap()
        .get(0);
    assert!(bytes > 1 << 20, "{v}");
    // The clone's size as the server reports it, give or take what changed since.
    assert!(
        bytes.abs_diff(direct as u64) < 1 << 20,
        "{bytes} vs {direct}"
    );
    assert_eq!(v["size_exact"], true);

    let (state, msg) = refused(&proxy.url("shop.second")).await;
    assert_eq!(state, "53400", "{msg}");
    assert!(msg.contains("max_total_size of 1MB"), "{msg}");
    let (status, body) = proxy.api(
        "POST",
        "/api/v1/branches",
        Some(r#"{"source":"shop","branch":"third"}"#),
    );
    assert_eq!(status, 409, "{body}");
    assert!(error_of(&body).contains("max_total_size"), "{body}");
    assert!(
        proxy.metric("offshoot_policy_refusals_total{reason=\"max_total_size\",source=\"shop\"}")
            >= 2.0
    );
    let (_, body) = proxy.api(
        "GET",
        "/api/v1/events?branch=second&action=branch.refused",
        None,
    );
    let refusals: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(refusals[0]["reason"], "max_total_size 1MB", "{body}");
    assert_eq!(proxy.branch_names(), ["first"]);

    // Once the branch is gone there is room again.
    drop(c);
    assert!(
        eventually(30, || view(&proxy, "first").unwrap()["connections"] == 0).await,
        "the session ends"
    );
    let (status, body) = proxy.api("DELETE", "/api/v1/branches/shop/first", None);
    assert_eq!(status, 204, "{body}");
    proxy.connect("shop.second").await.expect("room again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_branch_reports_the_bytes_it_does_not_share() {
    let Fixture { proxy, pg: _pg } = Fixture::start_with(
        Engine::Instance,
        "[reaper]\nsize_interval = \"200ms\"\n",
        "",
    )
    .await;
    let c = proxy.connect("shop.big").await.unwrap();
    assert!(
        eventually(60, || view(&proxy, "big")
            .is_some_and(|v| v["size_bytes"].is_u64()))
        .await,
        "measured in the background"
    );
    let before = view(&proxy, "big").unwrap();
    assert!(before["size_exact"].is_boolean(), "{before}");
    // Writing 8MB of new rows adds at least that many bytes of the branch's own.
    c.batch_execute(
        "CREATE TABLE filler AS SELECT repeat('x', 1000) AS t FROM generate_series(1, 8000); \
         CHECKPOINT",
    )
    .await
    .unwrap();
    let first = before["size_bytes"].as_u64().unwrap();
    assert!(
        eventually(60, || {
            view(&proxy, "big").unwrap()["size_bytes"].as_u64().unwrap() >= first + (8 << 20)
        })
        .await,
        "{before} then {}",
        view(&proxy, "big").unwrap()
    );
}

/// Runs `offshoot branch <args>` against `proxy`; returns success and the output.
fn branch_cli(proxy: &ProxyProc, args: &[&str]) -> (bool, String) {
    let args: Vec<&str> = std::iter::once("branch")
        .chain(args.iter().copied())
        .collect();
    let out = offshoot_cli(proxy, &args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sets_ttl_and_protection() {
    let Fixture { proxy, pg: _pg } = fixture().await;
    let (ok, out) = branch_cli(
        &proxy,
        &[
            "create",
            "shop.pr-7",
            "--ttl",
            "3d",
            "--protected",
            "--if-exists",
            "reuse",
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("protected"), "{out}");
    // Protected with no end, nothing removes it: no deadline shows.
    let v = view(&proxy, "pr-7").unwrap();
    assert_eq!(
        (&v["protected"], &v["expires_at"]),
        (&true.into(), &Value::Null),
        "{v}"
    );
    let (ok, out) = branch_cli(&proxy, &["create", "shop.pr-7", "--if-exists", "fail"]);
    assert!(!ok && out.contains("exists already"), "{out}");

    let (ok, out) = branch_cli(&proxy, &["delete", "shop.pr-7"]);
    assert!(
        !ok && out.contains("protected") && out.contains("--force"),
        "{out}"
    );
    let (ok, out) = branch_cli(
        &proxy,
        &["update", "shop.pr-7", "--ttl", "1d", "--unprotected"],
    );
    assert!(ok, "{out}");
    let v = view(&proxy, "pr-7").unwrap();
    assert_eq!(v["protected"], false, "{v}");
    let left = time(&v["expires_at"])
        .duration_since(SystemTime::now())
        .unwrap();
    assert!(left < Duration::from_secs(86400 + 60), "{v}");
    let (ok, out) = branch_cli(&proxy, &["update", "shop.pr-7"]);
    assert!(!ok && out.contains("nothing to change"), "{out}");
    let (ok, out) = branch_cli(&proxy, &["delete", "shop.pr-7"]);
    assert!(ok, "{out}");

    proxy.connect("shop.qa").await.unwrap();
    let (ok, out) = branch_cli(&proxy, &["delete", "shop.qa"]);
    assert!(
        !ok && out.contains("persistent") && out.contains("--force"),
        "{out}"
    );
    let (ok, out) = branch_cli(&proxy, &["delete", "shop.qa", "--force"]);
    assert!(ok, "{out}");
}
