//! Promises the README makes that no other test pins down: a suspended branch is
//! not woken for a client that has not authenticated, cancel keys stay out of the
//! log, and a connection that arrives while its branch is being deleted.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::harness::*;
use crate::protocol::{read_msg, startup_packet};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_branch_is_not_woken_before_authentication() {
    let Fixture { pg: _pg, proxy } = Fixture::over(
        crate::auth::scram_server().await,
        Engine::Instance,
        "[auth]\n",
        "",
    );
    let (status, body) = proxy.api(
        "POST",
        "/api/v1/branches",
        Some(r#"{"source":"shop","branch":"s"}"#),
    );
    assert_eq!(status, 201, "{body}");
    let (status, body) = proxy.api("POST", "/api/v1/branches/shop/s/suspend", None);
    assert_eq!(status, 200, "{body}");
    let data = branch_data(&proxy, "shop", "s");
    let state = || {
        proxy
            .branch("s")
            .map(|b| b["state"].as_str().unwrap().to_owned())
    };
    assert_eq!(state().as_deref(), Some("suspended"));
    assert!(processes_in(&data).is_empty(), "no server while suspended");
    let starts = "offshoot_start_seconds_count{source=\"shop\"}";
    assert_eq!(proxy.metric(starts), 0.0);

    let url = |user: &str, password: &str| {
        format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname=shop.s",
            proxy.port
        )
    };
    for (user, password) in [("app", "wrong"), ("ghost", "app-secret"), ("nopass", "x")] {
        let err = connect(&url(user, password)).await.unwrap_err();
        assert_eq!(sqlstate(&err), "28P01", "{user}: {err}");
    }
    // A client that sends its startup packet and never answers the challenge.
    let mut silent = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    silent
        .write_all(&startup(&[("user", "app"), ("database", "shop.s")]))
        .unwrap();
    let mut tag = [0u8; 1];
    silent.read_exact(&mut tag).unwrap();
    assert_eq!(&tag, b"R", "asked to authenticate");
    tokio::time::sleep(Duration::from_millis(500)).await;

    assert_eq!(state().as_deref(), Some("suspended"), "{}", proxy.log());
    assert!(processes_in(&data).is_empty(), "a server was started");
    assert!(!data.join("postmaster.pid").exists());
    assert_eq!(proxy.metric(starts), 0.0, "a server was started");
    drop(silent);

    // The right password does wake it: what the checks above look for can happen.
    let c = connect(&url("app", "app-secret")).await.expect("woken");
    assert_eq!(count(&c).await, 3);
    assert_eq!(state().as_deref(), Some("ready"));
    assert!(!processes_in(&data).is_empty());
    assert_eq!(proxy.metric(starts), 1.0);
}

fn startup(params: &[(&str, &str)]) -> Vec<u8> {
    startup_packet(3 << 16, params)
}

/// Opens a session to `db` speaking protocol `version`; returns the socket, ready
/// for a query, and the BackendKeyData body (pid, then the secret).
fn session_with_key(port: u16, version: u32, db: &str) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(&startup_packet(
        version,
        &[("user", "postgres"), ("database", db)],
    ))
    .unwrap();
    let mut key = None;
    loop {
        let (tag, body) = read_msg(&mut s);
        assert_ne!(tag, b'E', "{}", String::from_utf8_lossy(&body));
        match tag {
            b'K' => key = Some(body),
            b'Z' => break,
            _ => {}
        }
    }
    (s, key.expect("BackendKeyData"))
}

/// Starts `pg_sleep(30)` on `s`, cancels it through the proxy with `key`, and
/// checks that the statement was cancelled.
fn cancel_a_sleep(port: u16, s: &mut TcpStream, key: &[u8]) {
    let query = b"SELECT pg_sleep(30)\0";
    let mut q = vec![b'Q'];
    q.extend_from_slice(&((query.len() + 4) as u32).to_be_bytes());
    q.extend_from_slice(query);
    s.write_all(&q).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut cancel = ((8 + key.len()) as u32).to_be_bytes().to_vec();
    cancel.extend_from_slice(&80_877_102u32.to_be_bytes());
    cancel.extend_from_slice(key);
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.write_all(&cancel).unwrap();
    let _ = c.read_to_end(&mut Vec::new());
    let body = loop {
        let (tag, body) = read_msg(s);
        if tag == b'E' {
            break body;
        }
        assert_ne!(tag, b'Z', "the statement was not cancelled");
    };
    assert!(
        body.windows(6).any(|w| w == b"C57014"),
        "{}",
        String::from_utf8_lossy(&body)
    );
}

/// The ways a secret could be written into a log line: hex both cases, Rust's debug
/// form of the bytes, and (for a 4-byte secret) its decimal value, signed or not.
fn spellings(secret: &[u8]) -> Vec<String> {
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let mut out = vec![
        hex.clone(),
        hex.to_uppercase(),
        format!("{:?}", &secret[..4])
            .trim_matches(['[', ']'])
            .to_owned(),
    ];
    if let Ok(four) = <[u8; 4]>::try_from(secret) {
        // Short numbers occur in any log by chance; a random 32-bit secret is long.
        for n in [
            u32::from_be_bytes(four).to_string(),
            i32::from_be_bytes(four).to_string(),
        ] {
            if n.trim_start_matches('-').len() >= 6 {
                out.push(n);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_keys_never_reach_the_log() {
    let Fixture { pg: _pg, proxy } = Fixture::start(Engine::Database, "").await;
    // Protocol 3.0 (a 4-byte secret) and 3.2 (a 32-byte one), each used for a cancel.
    let mut secrets = Vec::new();
    for version in [3 << 16, (3 << 16) | 2] {
        let (mut s, key) = session_with_key(proxy.port, version, "shop.keys");
        cancel_a_sleep(proxy.port, &mut s, &key);
        secrets.push(key[4..].to_vec());
    }
    assert_eq!(secrets[0].len(), 4);
    assert_eq!(secrets[1].len(), 32);
    // The proxy counts a cancel once it has handed it over; the client may see its
    // query cancelled a moment before that.
    let forwarded = "offshoot_cancel_requests_total{outcome=\"forwarded\"}";
    assert!(
        eventually(10, || proxy.metric(forwarded) == 2.0).await,
        "{forwarded} = {}",
        proxy.metric(forwarded)
    );
    let log = proxy.log();
    assert!(
        log.contains("DEBUG"),
        "the proxy logs at debug level:\n{log}"
    );
    for secret in &secrets {
        for spelling in spellings(secret) {
            assert!(
                !log.contains(&spelling),
                "the cancel key appears in the log as {spelling}:\n{log}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_during_a_deletion_waits_and_gets_a_fresh_branch() {
    let Fixture { pg, proxy } = Fixture::start(Engine::Database, "").await;
    let c = proxy.connect("shop.gone").await.unwrap();
    c.batch_execute("INSERT INTO items VALUES (4, 'four')")
        .await
        .unwrap();
    drop(c);
    assert!(
        eventually(10, || proxy.branches()[0]["connections"] == 0).await,
        "{}",
        proxy.branches()
    );

    // DROP DATABASE waits for a lock held here, so the deletion is caught in flight
    // (COMMENT ON DATABASE locks the database until the transaction ends; the
    // comment is the proxy's own marker, unchanged).
    let holder = pg.direct("postgres").await;
    holder
        .batch_execute("BEGIN; COMMENT ON DATABASE \"shop__gone\" IS 'offshoot:shop/gone'")
        .await
        .unwrap();
    let admin = proxy.admin;
    let deleting = tokio::task::spawn_blocking(move || {
        http(admin, "DELETE", "/api/v1/branches/shop/gone", None)
    });
    let observer = pg.direct("postgres").await;
    let mut dropping = false;
    for _ in 0..100 {
        let n: i64 = observer
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'DROP DATABASE%' \
                 AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if n == 1 {
            dropping = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        dropping,
        "the deletion was not caught in flight:\n{}",
        proxy.log()
    );
    assert_eq!(proxy.branches()[0]["state"], "expiring");

    // A client arrives now: it is neither served by the clone being dropped nor
    // turned away; it waits for the outcome.
    let url = proxy.url("shop.gone");
    let arriving = tokio::spawn(async move {
        let c = connect(&url).await?;
        try_count(&c).await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!arriving.is_finished(), "answered during the deletion");

    holder.batch_execute("ROLLBACK").await.unwrap();
    let (status, body) = deleting.await.unwrap();
    assert_eq!(status, 204, "{body}");
    // ... then gets a fresh clone of the source, not the deleted branch's data.
    let rows = tokio::time::timeout(Duration::from_secs(30), arriving)
        .await
        .expect("the waiting client is served")
        .unwrap()
        .expect("a fresh branch");
    assert_eq!(rows, 3, "a fresh clone, not the deleted one");
    assert_eq!(proxy.branch_names(), vec!["gone"]);
    assert_eq!(
        proxy.metric("offshoot_branches_created_total{source=\"shop\"}"),
        2.0
    );
    assert_eq!(
        proxy.metric("offshoot_branches_expired_total{reason=\"api\",source=\"shop\"}"),
        1.0
    );
    assert_eq!(clones(&pg).await, vec!["shop__gone".to_string()]);
}
