//! The admin API's contract: one error shape for every failure, the OpenAPI
//! document served at `/api/v1/openapi.json` and covering every route, and the
//! CLI's `--output json` giving exactly the API's JSON.

use std::process::Command;

use serde_json::Value;

use crate::harness::*;

/// One request with exactly these headers; returns the status and the body.
fn raw(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    let (status, resp) = http_exact(port, &format!("{method} {path}"), headers, body);
    (status, http_body(&resp).to_owned())
}

/// Asserts `body` is the one error shape with `code`, and returns its message.
#[track_caller]
fn error_of(status: u16, body: &str, want_status: u16, code: &str) -> String {
    assert_eq!(status, want_status, "{body}");
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    let err = v["error"]
        .as_object()
        .unwrap_or_else(|| panic!("no error object: {body}"));
    assert_eq!(err["code"], code, "{body}");
    let message = err["message"].as_str().expect("a message").to_owned();
    assert!(!message.is_empty(), "{body}");
    for key in err.keys() {
        assert!(
            ["code", "message", "sqlstate"].contains(&key.as_str()),
            "{body}"
        );
    }
    assert_eq!(
        v.as_object().unwrap().len(),
        1,
        "only the error object: {body}"
    );
    message
}

fn cli(proxy: &ProxyProc, args: &[&str]) -> (bool, String, String) {
    let out = offshoot_cli(proxy, args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_has_the_one_shape() {
    let Fixture { pg: _pg, proxy } = Fixture::start(Engine::Database, "").await;
    let port = proxy.admin;
    let token = admin_token(port).expect("serve made a token");
    let auth = format!("Bearer {token}");
    let host = format!("127.0.0.1:{port}");
    let ok: [(&str, &str); 3] = [
        ("Host", &host),
        ("Authorization", &auth),
        ("Content-Type", "application/json"),
    ];

    // 404: an unknown source, a missing branch, a route that does not exist.
    let (s, b) = proxy.api("GET", "/api/v1/branches/nope/x", None);
    let m = error_of(s, &b, 404, "not_found");
    assert!(m.contains("configured sources: shop"), "{m}");
    let (s, b) = proxy.api("GET", "/api/v1/branches/shop/never", None);
    error_of(s, &b, 404, "not_found");
    assert!(b.contains(r#""sqlstate":"3D000""#), "{b}");
    let (s, b) = proxy.api("GET", "/api/v1/nothing-here", None);
    let m = error_of(s, &b, 404, "not_found");
    assert!(m.contains("openapi.json"), "{m}");

    // 400, 422, 415: bad bodies, axum's own rejections included.
    let (s, b) = proxy.api(
        "POST",
        "/api/v1/branches",
        Some(r#"{"source":"shop","branch":"Bad!"}"#),
    );
    error_of(s, &b, 400, "bad_request");
    let (s, b) = proxy.api("POST", "/api/v1/branches", Some("not json"));
    error_of(s, &b, 400, "bad_request");
    let (s, b) = proxy.api("POST", "/api/v1/branches", Some(r#"{"source":"shop"}"#));
    let m = error_of(s, &b, 422, "unprocessable_entity");
    assert!(m.contains("source") || m.contains("branch"), "{m}");
    let (s, b) = proxy.api(
        "POST",
        "/api/v1/branches",
        Some(r#"{"source":"shop","branch":"x","extra":1}"#),
    );
    error_of(s, &b, 422, "unprocessable_entity");
    let (s, b) = proxy.api("DELETE", "/api/v1/branches/shop/x?force=maybe", None);
    error_of(s, &b, 400, "bad_request");
    let (s, b) = raw(
        port,
        "POST",
        "/api/v1/branches",
        &[ok[0], ok[1], ("Content-Type", "text/plain")],
        "{}",
    );
    error_of(s, &b, 415, "unsupported_media_type");

    // 405: a method the route does not take.
    let (s, b) = proxy.api("PUT", "/api/v1/branches", Some("{}"));
    error_of(s, &b, 405, "method_not_allowed");

    // 401, 403, 421: the token, cross-site requests, a foreign Host.
    let (s, b) = raw(port, "GET", "/api/v1/branches", &[ok[0]], "");
    error_of(s, &b, 401, "unauthorized");
    let (s, b) = raw(
        port,
        "GET",
        "/api/v1/branches",
        &[ok[0], ("Authorization", "Bearer wrong")],
        "",
    );
    error_of(s, &b, 401, "unauthorized");
    let (s, b) = raw(
        port,
        "POST",
        "/api/v1/branches",
        &[ok[0], ok[1], ok[2], ("Origin", "http://evil")],
        "{}",
    );
    error_of(s, &b, 403, "forbidden");
    let (s, b) = raw(
        port,
        "GET",
        "/api/v1/branches",
        &[("Host", "evil:9187"), ok[1]],
        "",
    );
    error_of(s, &b, 421, "misdirected_request");

    // 409 with the failure's kind and SQLSTATE: deleting a branch in use.
    let (s, _) = proxy.api(
        "POST",
        "/api/v1/branches",
        Some(r#"{"source":"shop","branch":"busy"}"#),
    );
    assert_eq!(s, 201);
    let client = proxy.connect("shop.busy").await.unwrap();
    let (s, b) = proxy.api("DELETE", "/api/v1/branches/shop/busy", None);
    let m = error_of(s, &b, 409, "conflict");
    assert!(m.contains("?force=true"), "{m}");
    assert!(b.contains(r#""sqlstate":"55000""#), "{b}");
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_covers_every_served_route() {
    let Fixture { pg: _pg, proxy } = Fixture::start(Engine::Database, "").await;
    // Served without the token: it describes the API, not this deployment.
    let host = format!("127.0.0.1:{}", proxy.admin);
    let (status, body) = raw(
        proxy.admin,
        "GET",
        "/api/v1/openapi.json",
        &[("Host", &host)],
        "",
    );
    assert_eq!(status, 200, "{body}");
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1."),
        "{}",
        doc["openapi"]
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
    assert!(doc["components"]["schemas"]["BranchView"].is_object());

    // Every documented operation is served: none falls through to "no API route"
    // (405 would mean the path is served but not with that method).
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 10, "{paths:?}");
    for (path, ops) in paths {
        let concrete = path
            .replace("{source}", "shop")
            .replace("{branch}", "doc-probe")
            .replace("{name}", "20000101T000000Z");
        for method in ops.as_object().unwrap().keys() {
            let method = method.to_ascii_uppercase();
            let body = (method == "POST").then_some("{}");
            let (status, text) = proxy.api(&method, &concrete, body);
            assert_ne!(status, 405, "{method} {path}: {text}");
            assert!(!text.contains("no API route"), "{method} {path}: {text}");
            assert_ne!(status, 0, "{method} {path}: no answer");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_prints_the_apis_json_and_shows_a_branch() {
    let Fixture { pg: _pg, proxy } = Fixture::start(Engine::Database, "").await;
    let client = proxy.connect("shop.pr-7").await.unwrap();
    let _other = proxy.connect("shop.a-long-branch-name").await.unwrap();

    // --output json is the API's answer, unchanged.
    let (_, api_text) = proxy.api("GET", "/api/v1/branches", None);
    let (ok, out, err) = cli(&proxy, &["branch", "list", "--output", "json"]);
    assert!(ok, "{err}");
    let from_cli: Value = serde_json::from_str(&out).unwrap();
    let from_api: Value = serde_json::from_str(&api_text).unwrap();
    // Activity stamps move between the two requests; everything else is equal.
    let strip = |mut v: Value| {
        for b in v.as_array_mut().unwrap() {
            b.as_object_mut().unwrap().remove("last_active");
        }
        v
    };
    assert_eq!(strip(from_cli), strip(from_api));

    // The table lines up: every row's STATE column starts where the header's does.
    let (ok, out, err) = cli(&proxy, &["branch", "list"]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    let col = lines[0].find("STATE").unwrap();
    for line in &lines[1..] {
        assert_eq!(&line[col..col + 5], "ready", "{out}");
    }

    // `branch show`: state and the connection strings, which connect.
    let (ok, out, err) = cli(&proxy, &["branch", "show", "shop.pr-7"]);
    assert!(ok, "{err}");
    assert!(out.contains("ready"), "{out}");
    let url = out
        .lines()
        .find_map(|l| l.strip_prefix("psql"))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no psql line: {out}"));
    assert!(out.contains("jdbc:postgresql://"), "{out}");
    let via_url = connect(url).await.expect("the printed URL connects");
    let (_, api_text) = proxy.api("GET", "/api/v1/branches/shop/pr-7", None);
    let (ok, out, err) = cli(&proxy, &["branch", "show", "shop.pr-7", "-o", "json"]);
    assert!(ok, "{err}");
    let a: Value = serde_json::from_str(&api_text).unwrap();
    let c: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(a["connection"], c["connection"]);
    assert_eq!(c["connection"]["url"], url);
    drop((client, via_url));

    // A branch that does not exist: the API's words, no JSON on stdout.
    let (ok, out, err) = cli(&proxy, &["branch", "show", "shop.nope"]);
    assert!(!ok);
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn completions_are_printed_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(env!("CARGO_BIN_EXE_offshoot"))
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("snapshot"), "{shell}: {text}");
        assert!(text.contains("completions"), "{shell}");
    }
    // The bash script parses.
    let out = Command::new(env!("CARGO_BIN_EXE_offshoot"))
        .args(["completions", "bash"])
        .output()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("offshoot.bash");
    std::fs::write(&script, out.stdout).unwrap();
    let check = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

/// The validator `integration/openapi/install.sh` installs, if it is there.
fn validator() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("OFFSHOOT_OPENAPI_VALIDATOR") {
        return Some(p.into());
    }
    let venv = std::env::var_os("OFFSHOOT_OPENAPI_VENV")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| std::path::Path::new(&h).join(".cache/offshoot/openapi-venv"))
        })?;
    let bin = venv.join("bin/openapi-spec-validator");
    bin.exists().then_some(bin)
}

/// Runs the validator on `doc`; returns whether it passed, and what it said.
fn validate(bin: &std::path::Path, doc: &Value) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, serde_json::to_vec_pretty(doc).unwrap()).unwrap();
    let out = Command::new(bin).arg(&file).output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_document_passes_a_validator() {
    let Some(bin) = validator() else {
        return skip(
            "the_served_document_passes_a_validator",
            "openapi-spec-validator is not installed (run integration/openapi/install.sh)",
        );
    };
    let Fixture { pg: _pg, proxy } = Fixture::start(Engine::Database, "").await;
    let (status, body) = proxy.api("GET", "/api/v1/openapi.json", None);
    assert_eq!(status, 200, "{body}");
    let doc: Value = serde_json::from_str(&body).unwrap();
    let (ok, said) = validate(&bin, &doc);
    assert!(ok, "the served document is not valid OpenAPI: {said}");

    // The validator really checks: a document with a broken reference fails.
    let mut broken = doc.clone();
    broken["paths"]["/api/v1/branches"]["get"]["responses"]["200"]["content"]["application/json"]
        ["schema"] = serde_json::json!({"$ref": "#/components/schemas/Nope"});
    let (ok, said) = validate(&bin, &broken);
    assert!(!ok, "a broken reference passed: {said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_wrong_console_logins_gets_429() {
    let Fixture { pg: _pg, proxy } = Fixture::start(Engine::Database, "").await;
    let port = proxy.admin;
    let host = format!("127.0.0.1:{port}");
    let headers = [
        ("Host", host.as_str()),
        ("Content-Type", "application/json"),
    ];
    let wrong = r#"{"token":"not-it"}"#;
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let (s, b) = raw(port, "POST", "/login", &headers, wrong);
        statuses.push(s);
        if s == 429 {
            let m = error_of(s, &b, 429, "too_many_requests");
            assert!(m.contains("try again in"), "{m}");
        } else {
            error_of(s, &b, 401, "unauthorized");
        }
    }
    assert_eq!(statuses[..5], [401; 5], "{statuses:?}");
    assert_eq!(statuses[5..], [429; 3], "{statuses:?}");
    // The right token waits too, from this address, for a while ...
    let token = admin_token(port).expect("serve made a token");
    let right = format!(r#"{{"token":"{token}"}}"#);
    let (s, _) = raw(port, "POST", "/login", &headers, &right);
    assert_eq!(s, 429);
    // ... but the API with the bearer token is not held up.
    let (s, b) = proxy.api("GET", "/api/v1/branches", None);
    assert_eq!(s, 200, "{b}");
}
