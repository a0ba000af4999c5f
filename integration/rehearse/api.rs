//! Rehearsals the proxy runs itself: `POST /api/v1/rehearsals`, polled with
//! `GET /api/v1/rehearsals/{id}`, on real servers.

use serde_json::{json, Value};

use super::nothing_left;
use crate::harness::*;

/// Starts a rehearsal; returns the status and the answer (with the `Location`
/// header checked on a 202).
fn start(proxy: &ProxyProc, body: &Value) -> (u16, Value) {
    let token = admin_token(proxy.admin).unwrap();
    let auth = format!("Bearer {token}");
    let text = body.to_string();
    let (status, resp) = http_exact(
        proxy.admin,
        "POST /api/v1/rehearsals",
        &[
            ("Host", "localhost"),
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        &text,
    );
    let answer: Value = serde_json::from_str(http_body(&resp)).unwrap_or(Value::Null);
    if status == 202 {
        let id = answer["id"].as_str().unwrap();
        let location = format!("location: /api/v1/rehearsals/{id}\r\n");
        assert!(resp.to_ascii_lowercase().contains(&location), "{resp}");
        assert_eq!(answer["status"], "running", "{answer}");
    } else {
        assert_eq!(
            answer["error"]["message"].as_str().map(str::is_empty),
            Some(false),
            "one error shape: {resp}"
        );
    }
    (status, answer)
}

/// Polls the rehearsal until it is no longer `running`.
async fn finished(proxy: &ProxyProc, id: &str) -> Value {
    let path = format!("/api/v1/rehearsals/{id}");
    let mut last = Value::Null;
    let done = eventually(180, || {
        let (status, body) = proxy.api("GET", &path, None);
        assert_eq!(status, 200, "{body}");
        last = serde_json::from_str(&body).unwrap();
        last["status"] != "running"
    })
    .await;
    assert!(done, "still running: {last:#}");
    last
}

fn events(proxy: &ProxyProc, action: &str) -> Vec<Value> {
    let (_, body) = proxy.api("GET", &format!("/api/v1/events?action={action}"), None);
    let v: Value = serde_json::from_str(&body).unwrap();
    v.as_array()
        .or_else(|| v["events"].as_array())
        .cloned()
        .unwrap_or_default()
}

async fn inline_sql_runs_on_the_server(engine: Engine) {
    let f = Fixture::start(engine, "").await;
    let (status, started) = start(
        &f.proxy,
        &json!({
            "source": "shop",
            "user": "postgres",
            "probe": true,
            "sql": [
                "ALTER TABLE items ADD COLUMN shipped_at timestamptz;",
                "CREATE INDEX CONCURRENTLY items_note_idx ON items (note);",
            ],
            "checks": "SELECT id FROM items WHERE note IS NULL",
        }),
    );
    assert_eq!(status, 202, "{started}");
    let id = started["id"].as_str().unwrap();
    assert!(started["branch"].as_str().unwrap().starts_with("rehearse-"));
    let r = finished(&f.proxy, id).await;
    assert_eq!(r["status"], "done", "{r:#}");
    assert_eq!(r["id"], id);
    assert_eq!(r["report_version"], 1);
    assert_eq!(r["outcome"], "passed", "{r:#}");
    assert_eq!(r["exit_code"], 0);
    let st = r["statements"].as_array().unwrap();
    assert_eq!(st.len(), 2, "{r:#}");
    assert_eq!(st[0]["origin"], "sql[0]:1");
    assert_eq!(st[1]["indexes_built"][0]["concurrently"], true);
    assert_eq!(r["checks"][0]["after"]["passed"], true, "{r:#}");
    assert!(r["probe"]["tables"]
        .as_array()
        .is_some_and(|t| !t.is_empty()));
    nothing_left(&f).await;
    // Listed with its status; the audit trail has its start and its end, by the
    // token that asked.
    let (_, body) = f.proxy.api("GET", "/api/v1/rehearsals", None);
    let list: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list[0]["id"], id, "{list}");
    assert_eq!(list[0]["status"], "done");
    for action in ["rehearsal.started", "rehearsal.reported"] {
        let got = events(&f.proxy, action);
        let e = got
            .iter()
            .find(|e| e["reason"].as_str().is_some_and(|r| r.contains(id)))
            .unwrap_or_else(|| panic!("no {action} event for {id}: {got:?}"));
        assert_eq!(e["actor"]["kind"], "api", "{e}");
        assert_eq!(e["actor"]["token_name"], "admin", "{e}");
    }

    // A failing statement: exit code 1, the statement's SQLSTATE, no branch left.
    let (status, started) = start(
        &f.proxy,
        &json!({
            "source": "shop",
            "user": "postgres",
            "name": "rehearse-dup",
            "sql": "CREATE TABLE audit_log (id int);\nINSERT INTO items VALUES (1, 'dup');\nDROP TABLE items;",
        }),
    );
    assert_eq!(status, 202, "{started}");
    let r = finished(&f.proxy, started["id"].as_str().unwrap()).await;
    assert_eq!(r["status"], "done", "{r:#}");
    assert_eq!(r["outcome"], "migration_failed", "{r:#}");
    assert_eq!(r["exit_code"], 1);
    assert_eq!(r["branch"], "rehearse-dup");
    let st = r["statements"].as_array().unwrap();
    assert_eq!(st.len(), 2, "{r:#}");
    assert_eq!(st[1]["error"]["sqlstate"], "23505");
    nothing_left(&f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_sql_runs_on_the_server_on_the_database_engine() {
    inline_sql_runs_on_the_server(Engine::Database).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_sql_runs_on_the_server_on_the_instance_engine() {
    inline_sql_runs_on_the_server(Engine::Instance).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_files_only_below_sql_dir_and_bad_requests_are_refused() {
    let files = tempfile::tempdir().unwrap();
    let root = files.path().join("sql");
    std::fs::create_dir_all(root.join("m")).unwrap();
    std::fs::write(
        root.join("m/001.sql"),
        "ALTER TABLE items ADD COLUMN shipped_at timestamptz;",
    )
    .unwrap();
    std::fs::write(root.join("m/002.sql"), "SELECT 1;").unwrap();
    std::fs::write(root.join("check.sql"), "SELECT count(*) = 3 FROM items").unwrap();
    std::fs::write(files.path().join("outside.sql"), "DROP TABLE items;").unwrap();
    std::os::unix::fs::symlink(files.path().join("outside.sql"), root.join("link.sql")).unwrap();
    // Readable by the proxy's user whatever it is.
    for p in [files.path(), &root, &root.join("m")] {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let head = format!("[rehearsal]\nsql_dir = \"{}\"\n", root.display());
    let f = Fixture::start_with(Engine::Database, &head, "").await;

    let (status, started) = start(
        &f.proxy,
        &json!({"source": "shop", "user": "postgres", "sql_files": ["m"], "check_files": ["check.sql"]}),
    );
    assert_eq!(status, 202, "{started}");
    let r = finished(&f.proxy, started["id"].as_str().unwrap()).await;
    assert_eq!(r["outcome"], "passed", "{r:#}");
    assert_eq!(r["migration"]["files"], json!(["m/001.sql", "m/002.sql"]));
    assert_eq!(r["checks"][0]["file"], "check.sql");
    nothing_left(&f).await;

    let refused = |body: Value, want: u16, words: &str| {
        let (status, answer) = start(&f.proxy, &body);
        assert_eq!(status, want, "{body} -> {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(words), "{body} -> {message}");
        // The caller's own path may be repeated; the directory's place is not.
        assert!(
            !message.contains(root.to_str().unwrap()),
            "no server path: {message}"
        );
    };
    let base = |extra: Value| {
        let mut b = json!({"source": "shop", "user": "postgres"});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        b
    };
    refused(
        base(json!({"sql_files": ["../outside.sql"]})),
        403,
        "not below rehearsal.sql_dir",
    );
    refused(
        base(json!({"sql_files": [files.path().join("outside.sql")]})),
        403,
        "not below rehearsal.sql_dir",
    );
    refused(
        base(json!({"sql_files": ["link.sql"]})),
        403,
        "not below rehearsal.sql_dir",
    );
    refused(
        base(json!({"check_files": ["../outside.sql"], "sql": "SELECT 1"})),
        403,
        "check_files",
    );
    refused(
        base(json!({"sql_files": ["none.sql"]})),
        404,
        "does not exist",
    );
    refused(
        base(json!({"sql": "SELECT 1", "sql_files": ["m"]})),
        400,
        "not both",
    );
    refused(base(json!({})), 400, "nothing to rehearse");
    refused(
        base(json!({"sql": "SELECT 1", "fail_on": "nonsense"})),
        400,
        "unknown hazard rule",
    );
    refused(
        base(json!({"sql": "SELECT 1", "max_lock": "soon"})),
        400,
        "max_lock",
    );
    refused(base(json!({"sql": "x".repeat(1_100_000)})), 413, "at most");
    refused(json!({"source": "shop", "sql": "SELECT 1"}), 422, "user");
    refused(
        base(json!({"sql": "SELECT 1", "color": "red"})),
        422,
        "color",
    );
    refused(
        json!({"source": "nope", "user": "postgres", "sql": "SELECT 1"}),
        404,
        "nope",
    );
    refused(
        base(json!({"sql": "SELECT 1", "name": "Bad Name"})),
        400,
        "",
    );
    refused(
        json!({"report_version": 1}),
        422,
        "/api/v1/rehearsals/reports",
    );
    // Nothing was started by any refusal.
    assert_eq!(
        f.proxy
            .api("GET", "/api/v1/rehearsals", None)
            .1
            .matches("\"id\"")
            .count(),
        1
    );
    // The API documents the request.
    let (_, doc) = f.proxy.api("GET", "/api/v1/openapi.json", None);
    let doc: Value = serde_json::from_str(&doc).unwrap();
    let post = &doc["paths"]["/api/v1/rehearsals"]["post"];
    assert_eq!(post["operationId"], "start_rehearsal", "{post:#}");
    assert!(post["responses"]["202"].is_object(), "{post:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_sql_dir_files_are_refused_naming_the_key() {
    let f = Fixture::start(Engine::Database, "").await;
    let (status, answer) = start(
        &f.proxy,
        &json!({"source": "shop", "user": "postgres", "sql_files": ["m"]}),
    );
    assert_eq!(status, 403, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("rehearsal.sql_dir"),
        "{answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_fails_the_running_rehearsal_and_removes_its_branch() {
    let mut f = Fixture::start_with(Engine::Database, "[rehearsal]\nmax_running = 1\n", "").await;
    let (status, started) = start(
        &f.proxy,
        &json!({"source": "shop", "user": "postgres", "keep": true, "sql": "SELECT pg_sleep(120)"}),
    );
    assert_eq!(status, 202, "{started}");
    let id = started["id"].as_str().unwrap().to_owned();
    let branch = started["branch"].as_str().unwrap().to_owned();
    assert!(
        eventually(120, || f.proxy.branch_names().contains(&branch)).await,
        "{}",
        f.proxy.branches()
    );
    let (_, body) = f
        .proxy
        .api("GET", &format!("/api/v1/rehearsals/{id}"), None);
    let r: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(r["status"], "running", "{r:#}");
    // One at a time here: a second is refused while the first runs.
    let (status, answer) = start(
        &f.proxy,
        &json!({"source": "shop", "user": "postgres", "sql": "SELECT 1"}),
    );
    assert_eq!(status, 429, "{answer}");
    assert!(answer["error"]["message"]
        .as_str()
        .unwrap()
        .contains("rehearsal.max_running"));

    f.proxy.kill9_and_restart();
    let r = finished(&f.proxy, &id).await;
    assert_eq!(r["status"], "failed", "{r:#}");
    assert_eq!(r["exit_code"], 1);
    assert!(
        r["error"].as_str().unwrap().contains("interrupted"),
        "{r:#}"
    );
    assert!(
        eventually(60, || f.proxy.branch_names().is_empty()).await,
        "{}",
        f.proxy.branches()
    );
    nothing_left(&f).await;
    let failed = events(&f.proxy, "rehearsal.failed");
    assert!(
        failed
            .iter()
            .any(|e| e["reason"].as_str().is_some_and(|r| r.contains(&id))),
        "{failed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_runs_it_on_the_proxy_with_remote() {
    let f = Fixture::start(Engine::Database, "").await;
    let run = super::rehearse(
        &f.proxy,
        &[
            (
                "m/001.sql",
                "ALTER TABLE items ADD COLUMN shipped_at timestamptz;",
            ),
            (
                "m/002.sql",
                "ALTER TABLE items ALTER COLUMN id TYPE bigint;",
            ),
        ],
        &["--remote", "--sql", "{dir}/m"],
    );
    let r = &run.report;
    assert_eq!(run.code, 3, "{}\n{r:#}", run.output);
    assert_eq!(r["outcome"], "hazard_found");
    assert_eq!(r["statements"].as_array().unwrap().len(), 2, "{r:#}");
    assert!(
        r["hazards"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["rule"] == "table-rewrite" && h["fails"] == true),
        "{r:#}"
    );
    assert!(run.markdown.contains("table-rewrite"), "{}", run.markdown);
    // The proxy ran it: its report is the one stored (with the run's status).
    let (_, body) = f.proxy.api(
        "GET",
        &format!("/api/v1/rehearsals/{}", r["id"].as_str().unwrap()),
        None,
    );
    let mut stored: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(stored["status"], "done", "{stored:#}");
    stored.as_object_mut().unwrap().remove("status");
    assert_eq!(&stored, r);
    nothing_left(&f).await;

    let run = super::rehearse(&f.proxy, &[], &["--remote", "--", "true"]);
    assert_eq!(run.code, 1, "{}", run.output);
    assert!(
        run.output.contains("--remote runs SQL only"),
        "{}",
        run.output
    );
}
