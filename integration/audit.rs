//! The audit trail: one line in `<state.dir>/audit.jsonl` per transition, with who
//! caused it, read back through `/api/v1/events`.

use serde_json::Value;

use crate::harness::*;

/// The events `/api/v1/events` returns for `query` (newest first).
fn events(proxy: &ProxyProc, query: &str) -> Vec<Value> {
    let (status, body) = proxy.api("GET", &format!("/api/v1/events{query}"), None);
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<Value>(&body)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn actions(list: &[Value]) -> Vec<String> {
    list.iter()
        .map(|e| e["action"].as_str().unwrap().to_owned())
        .collect()
}

/// Every line of the audit file, oldest first, once every event so far is on
/// disk (a query waits for queued events).
fn lines(proxy: &ProxyProc) -> Vec<Value> {
    events(proxy, "?limit=1");
    let text = std::fs::read_to_string(proxy.dir.path().join("state/audit.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).expect("each line is one JSON object"))
        .collect()
}

fn only<'a>(list: &'a [Value], action: &str, branch: &str) -> &'a Value {
    let found: Vec<&Value> = list
        .iter()
        .filter(|e| e["action"] == action && e["branch"] == branch)
        .collect();
    assert_eq!(found.len(), 1, "one {action} of {branch} in {list:#?}");
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creations_refusals_deletions_expiry_and_snapshots_are_recorded() {
    let Fixture { pg: _pg, proxy } = Fixture::start_with(
        Engine::Database,
        "[reaper]\ninterval = \"100ms\"\n",
        "idle_expire = \"1s\"\nmax_branches = 2",
    )
    .await;
    // A client's first connection makes pr-1; it stays open, so pr-1 cannot expire.
    let held = proxy.connect("shop.pr-1").await.unwrap();
    // The API makes a persistent one.
    let (status, body) = proxy.api(
        "POST",
        "/api/v1/branches",
        Some(r#"{"source":"shop","branch":"api-1","persistent":true}"#),
    );
    assert_eq!(status, 201, "{body}");
    // A third is over max_branches.
    let (code, _) = refused(&proxy.url("shop.third")).await;
    assert_eq!(code, "53400");

    let file = lines(&proxy);
    for line in &file {
        for key in [
            "at",
            "action",
            "source",
            "branch",
            "snapshot",
            "actor",
            "reason",
            "duration_ms",
            "outcome",
        ] {
            assert!(line.get(key).is_some(), "{key} missing from {line}");
        }
        humantime::parse_rfc3339(line["at"].as_str().unwrap()).expect("at is RFC 3339");
    }
    let created = only(&file, "branch.created", "pr-1");
    assert_eq!(created["source"], "shop");
    assert_eq!(created["outcome"], "ok");
    assert_eq!(created["actor"]["kind"], "client");
    assert_eq!(created["actor"]["role"], "postgres");
    assert!(
        created["actor"]["addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{created}"
    );
    assert!(created["duration_ms"].as_u64().is_some(), "{created}");
    let by_api = only(&file, "branch.created", "api-1");
    assert_eq!(by_api["actor"]["kind"], "api");
    assert_eq!(by_api["actor"]["token_name"], "admin");
    assert!(by_api["actor"]["addr"].as_str().is_some(), "{by_api}");
    let refusal = only(&file, "branch.refused", "third");
    assert_eq!(refusal["outcome"], "refused");
    assert_eq!(refusal["reason"], "quota (max_branches 2)");
    assert_eq!(refusal["actor"]["kind"], "client");

    // Deletion by the API (a persistent branch: forced).
    let (status, _) = proxy.api("DELETE", "/api/v1/branches/shop/api-1?force=true", None);
    assert_eq!(status, 204);
    let deleted = events(&proxy, "?branch=api-1&limit=1");
    assert_eq!(actions(&deleted), ["branch.deleted"]);
    assert_eq!(deleted[0]["actor"]["kind"], "api");
    assert!(deleted[0]["reason"].is_null());

    // Snapshots taken and deleted, and a creation that fails (no such snapshot).
    let (status, body) = proxy.api("POST", "/api/v1/sources/shop/snapshots", None);
    assert_eq!(status, 201, "{body}");
    let snap: Value = serde_json::from_str(&body).unwrap();
    let name = snap["name"].as_str().unwrap();
    let (status, _) = proxy.api(
        "DELETE",
        &format!("/api/v1/sources/shop/snapshots/{name}"),
        None,
    );
    assert_eq!(status, 204);
    let (status, body) = proxy.api(
        "POST",
        "/api/v1/branches",
        Some(r#"{"source":"shop","branch":"bad","snapshot":"no-such-snapshot"}"#),
    );
    assert!(status >= 400, "{status} {body}");
    let snaps = events(&proxy, "?action=snapshot.*");
    assert_eq!(actions(&snaps), ["snapshot.deleted", "snapshot.taken"]);
    for e in &snaps {
        assert_eq!(e["snapshot"], name);
        assert_eq!(e["source"], "shop");
        assert!(e["branch"].is_null());
        assert_eq!(e["actor"]["kind"], "api");
    }
    let failed = events(&proxy, "?action=branch.create_failed");
    assert_eq!(failed.len(), 1, "{failed:#?}");
    assert_eq!(failed[0]["branch"], "bad");
    assert_eq!(failed[0]["outcome"], "failed");
    let message = failed[0]["error"].as_str().unwrap();
    assert!(message.contains("no-such-snapshot"), "{message}");
    assert!(!message.contains(proxy.dir.path().to_str().unwrap()));

    // Once its connection closes, pr-1 expires; the reaper is named, with the limit.
    drop(held);
    assert!(
        eventually(20, || {
            !events(&proxy, "?branch=pr-1&action=branch.expired").is_empty()
        })
        .await,
        "no expiry recorded: {:#?}",
        events(&proxy, "")
    );
    let history = events(&proxy, "?source=shop&branch=pr-1");
    assert_eq!(actions(&history), ["branch.expired", "branch.created"]);
    assert_eq!(history[0]["actor"]["kind"], "reaper");
    assert_eq!(history[0]["reason"], "idle 1s");
    assert_eq!(history[0]["outcome"], "ok");

    // Newest first, in the file's own order reversed.
    let all = events(&proxy, "?limit=1000");
    let file = lines(&proxy);
    assert_eq!(all.len(), file.len());
    let mut reversed = file.clone();
    reversed.reverse();
    assert_eq!(all, reversed);
    assert_eq!(events(&proxy, "?limit=2").len(), 2);
    assert!(events(&proxy, "?source=other").is_empty());
    // `since`: an RFC 3339 time (inclusive) or a duration back from now.
    let at = history[0]["at"].as_str().unwrap();
    let since = events(&proxy, &format!("?since={at}"));
    assert!(since.iter().all(|e| e["at"].as_str().unwrap() >= at));
    assert!(since.iter().any(|e| e["action"] == "branch.expired"));
    assert_eq!(events(&proxy, "?since=1h").len(), all.len().min(100));
    assert!(proxy.metric("offshoot_audit_lines_total{outcome=\"written\"}") >= file.len() as f64);
    assert_eq!(
        proxy.metric("offshoot_audit_lines_total{outcome=\"dropped\"}"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_event_queries_get_400_naming_the_parameter() {
    let Fixture { pg: _pg, proxy } = Fixture::start(Engine::Database, "").await;
    for (query, word) in [
        ("?limit=0", "limit"),
        ("?limit=lots", "limit"),
        ("?since=yesterday", "since"),
        ("?action=branch.made", "action"),
        ("?colour=red", "colour"),
    ] {
        let (status, body) = proxy.api("GET", &format!("/api/v1/events{query}"), None);
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body.contains(word), "{query}: {body}");
        assert!(!body.contains("Error("), "no debug text: {body}");
    }
    // Nothing happened yet: an empty list, not an error.
    assert!(events(&proxy, "").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspensions_and_resumes_name_who_caused_them() {
    let Fixture { pg: _pg, proxy } = Fixture::start(
        Engine::Instance,
        "suspend_after = \"4s\"\n[reaper]\ninterval = \"200ms\"",
    )
    .await;
    drop(proxy.connect("shop.s").await.unwrap());
    // Suspended through the API as soon as the session is gone (well before the
    // reaper's 4 s).
    assert!(
        eventually(10, || {
            proxy.api("POST", "/api/v1/branches/shop/s/suspend", None).0 == 200
        })
        .await
    );
    let by_api = events(&proxy, "?action=branch.suspended");
    assert_eq!(by_api.len(), 1, "{by_api:#?}");
    assert_eq!(by_api[0]["actor"]["kind"], "api");
    assert_eq!(by_api[0]["actor"]["token_name"], "admin");
    assert!(by_api[0]["reason"].is_null());

    // A connection starts it again.
    let c = proxy.connect("shop.s").await.unwrap();
    let resumed = events(&proxy, "?action=branch.resumed");
    assert_eq!(resumed.len(), 1, "{resumed:#?}");
    assert_eq!(resumed[0]["branch"], "s");
    assert_eq!(resumed[0]["actor"]["kind"], "client");
    assert_eq!(resumed[0]["actor"]["role"], "postgres");
    assert_eq!(resumed[0]["outcome"], "ok");
    assert!(resumed[0]["duration_ms"].as_u64().is_some());
    drop(c);

    // Idle for suspend_after, the reaper suspends it, and says why.
    assert!(
        eventually(30, || events(&proxy, "?action=branch.suspended").len() == 2).await,
        "{:#?}",
        events(&proxy, "")
    );
    let history = events(&proxy, "?branch=s");
    assert_eq!(
        actions(&history),
        [
            "branch.suspended",
            "branch.resumed",
            "branch.suspended",
            "branch.created"
        ]
    );
    assert_eq!(history[0]["actor"]["kind"], "reaper");
    assert_eq!(history[0]["reason"], "idle 4s");
}

/// One request a test receiver got.
#[derive(Debug, Clone)]
struct Received {
    headers: std::collections::HashMap<String, String>,
    body: Vec<u8>,
}

/// A webhook receiver on a free port: answers `statuses` in turn (then 200), and
/// keeps what it was sent.
async fn receiver(
    statuses: Vec<u16>,
) -> (
    u16,
    std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
    tokio::task::JoinHandle<()>,
) {
    receiver_with(statuses, None).await
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// [`receiver`], over TLS with `tls`. A failed handshake is counted as a request
/// with no headers.
async fn receiver_with(
    statuses: Vec<u16>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> (
    u16,
    std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
    tokio::task::JoinHandle<()>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = got.clone();
    let task = tokio::spawn(async move {
        let mut statuses = statuses.into_iter();
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut s: Box<dyn Stream> = match &tls {
                None => Box::new(tcp),
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(s) => Box::new(s),
                    Err(_) => {
                        log.lock().unwrap().push(Received {
                            headers: Default::default(),
                            body: Vec::new(),
                        });
                        continue;
                    }
                },
            };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let (head_end, length) = loop {
                let n = s.read(&mut chunk).await.unwrap();
                assert!(
                    n > 0,
                    "request cut short: {:?}",
                    String::from_utf8_lossy(&buf)
                );
                buf.extend_from_slice(&chunk[..n]);
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .map(|v| v.trim().parse::<usize>().unwrap())
                        .unwrap_or(0);
                    break (i + 4, len);
                }
            };
            while buf.len() < head_end + length {
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0);
                buf.extend_from_slice(&chunk[..n]);
            }
            let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
            let mut lines = head.lines();
            let request_line = lines.next().unwrap().to_owned();
            let mut headers: std::collections::HashMap<String, String> = lines
                .filter_map(|l| l.split_once(": "))
                .map(|(k, v)| (k.to_lowercase(), v.to_owned()))
                .collect();
            headers.insert(":request".into(), request_line);
            log.lock().unwrap().push(Received {
                headers,
                body: buf[head_end..head_end + length].to_vec(),
            });
            let status = statuses.next().unwrap_or(200);
            let answer =
                format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            let _ = s.write_all(answer.as_bytes()).await;
        }
    });
    (port, got, task)
}

fn verify(secret: &[u8], r: &Received) -> bool {
    let ts = &r.headers["x-offshoot-timestamp"];
    let Some(hex) = r.headers["x-offshoot-signature"].strip_prefix("sha256=") else {
        return false;
    };
    let Some(tag) = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()
    else {
        return false;
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut signed = format!("{ts}.").into_bytes();
    signed.extend_from_slice(&r.body);
    ring::hmac::verify(&key, &signed, &tag).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_retried_and_filtered_by_event() {
    use std::os::unix::fs::PermissionsExt;
    let (port, got, _server) = receiver(vec![500]).await;
    let secrets = tempfile::tempdir().unwrap();
    let secret_file = secrets.path().join("hook.secret");
    std::fs::write(&secret_file, "hook-secret\n").unwrap();
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    // A second hook whose receiver is down: it retries on its own, holding up
    // neither the first hook nor any client.
    let dead = free_port();
    let head = format!(
        "[[webhooks]]\nurl = \"http://127.0.0.1:{port}/hooks/offshoot\"\n\
         events = [\"branch.created\", \"branch.deleted\"]\nsecret_file = \"{}\"\n\
         [[webhooks]]\nurl = \"http://127.0.0.1:{dead}/\"\nevents = [\"*\"]\n",
        secret_file.display()
    );
    let Fixture { pg: _pg, proxy } = Fixture::start_with(Engine::Database, &head, "").await;
    let c = proxy.connect("shop.wh").await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();

    // The first attempt gets 500; the retry (about 1 s later) gets 200.
    assert!(
        eventually(20, || got.lock().unwrap().len() >= 2).await,
        "{:?}",
        got.lock().unwrap()
    );
    let first_two: Vec<Received> = got.lock().unwrap()[..2].to_vec();
    for r in &first_two {
        assert_eq!(r.headers[":request"], "POST /hooks/offshoot HTTP/1.1");
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(r.headers["x-offshoot-event"], "branch.created");
        assert!(verify(b"hook-secret", r), "signature checks out: {r:?}");
        assert!(!verify(b"another-secret", r));
        let event: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(event["action"], "branch.created");
        assert_eq!(event["source"], "shop");
        assert_eq!(event["branch"], "wh");
        assert_eq!(event["actor"]["kind"], "client");
        let ts: u64 = r.headers["x-offshoot-timestamp"].parse().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(ts.abs_diff(now) < 300, "{ts} vs {now}");
    }
    assert_eq!(
        first_two[0].headers["x-offshoot-delivery"], first_two[1].headers["x-offshoot-delivery"],
        "a retry is the same delivery"
    );
    assert_eq!(first_two[0].body, first_two[1].body);
    // A tampered body no longer matches its signature.
    let mut tampered = first_two[1].clone();
    tampered.body = String::from_utf8(tampered.body)
        .unwrap()
        .replacen("\"wh\"", "\"xx\"", 1)
        .into_bytes();
    assert!(!verify(b"hook-secret", &tampered));

    // Events the hook does not subscribe to are not sent to it.
    let (status, body) = proxy.api("POST", "/api/v1/sources/shop/snapshots", None);
    assert_eq!(status, 201, "{body}");
    drop(c);
    assert!(
        eventually(10, || {
            proxy.api("DELETE", "/api/v1/branches/shop/wh", None).0 == 204
        })
        .await
    );
    assert!(eventually(20, || got.lock().unwrap().len() >= 3).await);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let all = got.lock().unwrap().clone();
    assert_eq!(all.len(), 3, "{all:?}");
    assert_eq!(all[2].headers["x-offshoot-event"], "branch.deleted");
    assert!(verify(b"hook-secret", &all[2]));
    assert_ne!(
        all[2].headers["x-offshoot-delivery"],
        all[0].headers["x-offshoot-delivery"]
    );

    assert!(proxy.metric("offshoot_webhook_deliveries_total{outcome=\"ok\"}") >= 2.0);
    // One retry after the 500, and the dead hook's.
    assert!(proxy.metric("offshoot_webhook_deliveries_total{outcome=\"retried\"}") >= 2.0);
    assert!(proxy.log().contains("webhook delivery failed; retrying"));
    // A client is never held up by the dead hook.
    let again = proxy.connect("shop.wh2").await.unwrap();
    again.simple_query("SELECT 1").await.unwrap();
}

/// A TLS acceptor with a fresh certificate for `localhost` signed by a fresh CA;
/// returns the directory (keep it) and the CA's certificate.
fn tls_acceptor() -> (
    tokio_rustls::TlsAcceptor,
    tempfile::TempDir,
    std::path::PathBuf,
) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("ext.cnf"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    let openssl = |args: &str| {
        let out = std::process::Command::new("openssl")
            .current_dir(d)
            .args(args.split(' '))
            .output()
            .expect("openssl");
        assert!(out.status.success(), "openssl {args}: {out:?}");
    };
    openssl(
        "req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=hook-ca \
         -keyout ca.key -out ca.crt",
    );
    openssl("req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout server.key -out server.csr");
    openssl(
        "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
         -extfile ext.cnf -out server.crt",
    );
    let (cert, key, ca) = (d.join("server.crt"), d.join("server.key"), d.join("ca.crt"));
    let certs: Vec<_> = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(&cert).unwrap(),
    ))
    .collect::<Result<_, _>>()
    .unwrap();
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(&key).unwrap(),
    ))
    .unwrap()
    .unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    (
        tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)),
        dir,
        ca,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_webhooks_check_the_receivers_certificate() {
    let (acceptor, _certs, ca) = tls_acceptor();
    let (port, got, _server) = receiver_with(vec![], Some(acceptor.clone())).await;
    let (other, refused_got, _other) = receiver_with(vec![], Some(acceptor)).await;
    // The first hook trusts the receiver's CA; the second only the system's, which
    // never signed this certificate.
    let head = format!(
        "[[webhooks]]\nurl = \"https://localhost:{port}/tls\"\nca_file = \"{}\"\n\
         events = [\"branch.created\"]\n\
         [[webhooks]]\nurl = \"https://localhost:{other}/tls\"\nevents = [\"branch.created\"]\n",
        ca.display()
    );
    let Fixture { pg: _pg, proxy } = Fixture::start_with(Engine::Database, &head, "").await;
    proxy.connect("shop.tls").await.unwrap();
    assert!(eventually(20, || !got.lock().unwrap().is_empty()).await);
    let r = got.lock().unwrap()[0].clone();
    assert_eq!(r.headers[":request"], "POST /tls HTTP/1.1");
    assert_eq!(r.headers["host"], format!("localhost:{port}"));
    let event: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(event["branch"], "tls");
    // Unsigned: that hook has no secret_file.
    assert!(!r.headers.contains_key("x-offshoot-signature"));

    assert!(
        eventually(20, || proxy.log().contains("webhooks[1]")).await,
        "{}",
        proxy.log()
    );
    assert!(
        refused_got
            .lock()
            .unwrap()
            .iter()
            .all(|r| r.headers.is_empty()),
        "nothing was sent to a receiver whose certificate did not check out"
    );
}

/// `offshoot <args> --admin <address> --config <the proxy's>`: the command, ready
/// to run (the CLI finds the token through the configuration).
fn cli(proxy: &ProxyProc, args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_offshoot"));
    cmd.args(args)
        .arg("--admin")
        .arg(format!("127.0.0.1:{}", proxy.admin))
        .arg("--config")
        .arg(proxy.dir.path().join("offshoot.toml"));
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_prints_and_follows_the_trail() {
    use std::io::BufRead;
    let Fixture { pg: _pg, proxy } = Fixture::start(Engine::Database, "").await;
    drop(proxy.connect("shop.c1").await.unwrap());
    let (status, body) = proxy.api(
        "POST",
        "/api/v1/branches",
        Some(r#"{"source":"shop","branch":"c2"}"#),
    );
    assert_eq!(status, 201, "{body}");

    let out = cli(
        &proxy,
        &["events", "--branch", "shop.c1", "--output", "json"],
    )
    .output()
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let list: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(actions(&list), ["branch.created"]);
    assert_eq!(list[0]["branch"], "c1");

    // A table for people, oldest first.
    let out = cli(&proxy, &["events", "--source", "shop"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<&str> = text.lines().collect();
    assert_eq!(rows.len(), 3, "{text}");
    assert!(
        rows[0].starts_with("AT") && rows[0].contains("ACTION"),
        "{text}"
    );
    assert!(
        rows[1].contains("shop.c1") && rows[1].contains("client postgres@127.0.0.1"),
        "{text}"
    );
    assert!(
        rows[2].contains("shop.c2") && rows[2].contains("api (admin)"),
        "{text}"
    );

    let out = cli(&proxy, &["events", "--since", "yesterday"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("since") && err.contains("RFC 3339"), "{err}");

    // --follow prints what there is, then each new event once, as it comes.
    let mut child = cli(&proxy, &["events", "--follow", "--output", "json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(serde_json::from_str(&line).unwrap()).is_err() {
                break;
            }
        }
    });
    let next = || rx.recv_timeout(std::time::Duration::from_secs(30)).unwrap();
    assert_eq!(next()["branch"], "c1");
    assert_eq!(next()["branch"], "c2");
    let (status, _) = proxy.api("DELETE", "/api/v1/branches/shop/c2", None);
    assert_eq!(status, 204);
    let deleted = next();
    assert_eq!(deleted["action"], "branch.deleted");
    assert_eq!(deleted["branch"], "c2");
    drop(proxy.connect("shop.c3").await.unwrap());
    let created = next();
    assert_eq!(created["action"], "branch.created");
    assert_eq!(created["branch"], "c3");
    // Nothing is printed twice.
    assert!(rx.recv_timeout(std::time::Duration::from_secs(3)).is_err());
    child.kill().unwrap();
    child.wait().unwrap();
}
