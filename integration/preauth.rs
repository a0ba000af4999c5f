//! What a client can make the proxy do before it has authenticated: the attacks on
//! the startup (hashing cost, silent sockets, slow lookups, probing for sources and
//! roles, hostile branch servers, odd negotiation) and what stops each.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;
use crate::protocol::{make_cert, psql};

/// A source server where roles other than `postgres` must use SCRAM over TCP.
async fn scram_server(extra_hba: &[&str]) -> PgServer {
    let mut hba = vec![
        "local all all trust",
        "host all postgres 127.0.0.1/32 trust",
    ];
    hba.extend_from_slice(extra_hba);
    hba.push("host all all 127.0.0.1/32 scram-sha-256");
    let pg = PgServer::start_with(&hba);
    pg.make_source("shop").await;
    pg.direct("shop")
        .await
        .batch_execute(
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE app LOGIN PASSWORD 'app-secret';
             GRANT SELECT ON items TO app;",
        )
        .await
        .unwrap();
    pg
}

fn startup_packet(params: &[(&str, &str)]) -> Vec<u8> {
    crate::protocol::startup_packet(3 << 16, params)
}

/// Reads one backend message: (type, body).
fn read_message(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head).ok()?;
    let len = u32::from_be_bytes(head[1..5].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len.checked_sub(4)?];
    s.read_exact(&mut body).ok()?;
    Some((head[0], body))
}

/// A field of an ErrorResponse body (`C` for the SQLSTATE, `M` for the message).
fn error_field(body: &[u8], field: u8) -> String {
    body.split(|&b| b == 0)
        .find(|f| f.first() == Some(&field))
        .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
        .unwrap_or_default()
}

/// How the proxy opens the authentication of `user` on `database`: the code of
/// its Authentication request, or the SQLSTATE it refuses with.
fn first_answer(port: u16, user: &str, database: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(&startup_packet(&[("user", user), ("database", database)]))
        .unwrap();
    match read_message(&mut s) {
        Some((b'R', body)) => format!("auth {}", u32::from_be_bytes(body[..4].try_into().unwrap())),
        Some((b'E', body)) => format!("error {}", error_field(&body, b'C')),
        other => panic!("unexpected answer {other:?}"),
    }
}

/// The `s=` and `i=` of the server-first-message the proxy sends `user`.
fn server_first(port: u16, user: &str, database: &str) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(&startup_packet(&[("user", user), ("database", database)]))
        .unwrap();
    let (t, _) = read_message(&mut s).unwrap();
    assert_eq!(t, b'R');
    let first = b"n,,n=,r=abcdefghijkl";
    let mut body = b"SCRAM-SHA-256\0".to_vec();
    body.extend_from_slice(&(first.len() as i32).to_be_bytes());
    body.extend_from_slice(first);
    let mut msg = vec![b'p'];
    msg.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    msg.extend(body);
    s.write_all(&msg).unwrap();
    let (t, body) = read_message(&mut s).unwrap();
    assert_eq!(t, b'R');
    let text = String::from_utf8_lossy(&body[4..]).into_owned();
    let attr = |k: &str| {
        text.split(',')
            .find_map(|a| a.strip_prefix(k))
            .unwrap()
            .to_owned()
    };
    (attr("s="), attr("i="))
}

/// A stored verifier for `password` with `iterations`, as PostgreSQL writes it.
fn verifier(password: &str, iterations: u32) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let salt = b"0123456789abcdef";
    let v = offshoot::auth::scram::Verifier::from_password(password, salt, iterations);
    format!(
        "SCRAM-SHA-256${iterations}:{}${}:{}",
        b64.encode(salt),
        b64.encode(v.stored_key),
        b64.encode(v.server_key)
    )
}

/// Runs `SELECT 1` on `c` until `stop`, returning the slowest round trip and the
/// number of queries.
async fn probe(
    c: tokio_postgres::Client,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (Duration, u32) {
    let (mut worst, mut n) = (Duration::ZERO, 0);
    while !*stop.borrow() {
        let t = Instant::now();
        c.simple_query("SELECT 1")
            .await
            .expect("the other session works");
        worst = worst.max(t.elapsed());
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (worst, n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_iteration_counts_are_refused_and_hashing_never_stalls_other_sessions() {
    let pg = scram_server(&[]).await;
    pg.make_source("side").await;
    // Stored verifiers a role can set for itself: one far beyond any cap, one
    // within a raised cap but costly (seconds of PBKDF2).
    const COSTLY: u32 = 4_000_000;
    let costly = tokio::task::spawn_blocking(|| verifier("slow-secret", COSTLY))
        .await
        .unwrap();

    // Written to the catalog directly: CREATE ROLE would itself hash the huge
    // verifier once (to refuse an empty password), for hours.
    pg.direct("shop")
        .await
        .batch_execute(&format!(
            "CREATE ROLE huge LOGIN;
             CREATE ROLE slow LOGIN;
             UPDATE pg_authid SET rolpassword = '{}' WHERE rolname = 'huge';
             UPDATE pg_authid SET rolpassword = '{costly}' WHERE rolname = 'slow';
             GRANT SELECT ON items TO huge, slow;",
            verifier_text_huge()
        ))
        .await
        .unwrap();
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = make_cert(certs.path(), "localhost");
    let config = |cap: u32| {
        format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n[auth]\nmethod = \"password\"\n\
             max_scram_iterations = {cap}\n{}{}",
            cert.display(),
            key.display(),
            source("shop", &pg, ""),
            // Sessions on another source, trusted, to watch for stalls.
            source("side", &pg, "auth_method = \"trust\""),
        )
    };
    let login = |port: u16, user: &str, password: &str| {
        format!(
            "host=localhost port={port} user={user} password={password} dbname=shop.b \
             sslmode=require"
        )
    };

    // The default cap: the huge count is refused at once, like a wrong password,
    // and the log says why.
    let proxy = ProxyProc::start(&config(100_000));
    let t = Instant::now();
    let (ok, out) = psql(&login(proxy.port, "huge", "whatever"), "SELECT 1");
    let refused_in = t.elapsed();
    assert!(!ok, "{out}");
    assert!(out.contains("password authentication failed"), "{out}");
    assert!(refused_in < Duration::from_secs(10), "{refused_in:?}");
    assert!(proxy.log().contains("auth.max_scram_iterations"));
    drop(proxy);

    // A raised cap: the costly login is hashed off the relay threads. Two
    // sessions opened first sit on both relay threads (connections are dealt
    // round-robin), so the login shares a thread with one of them.
    let proxy = ProxyProc::start(&config(COSTLY + 1));
    let side = |i: u32| proxy.url(&format!("side.s{i}"));
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut probes = Vec::new();
    for i in 0..2 {
        let c = connect(&side(i)).await.expect("trusted session");
        probes.push(tokio::spawn(probe(c, stop.clone())));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let conn = login(proxy.port, "slow", "slow-secret");
    let t = Instant::now();
    let (ok, out) = tokio::task::spawn_blocking(move || psql(&conn, "SELECT current_user"))
        .await
        .unwrap();
    let login_took = t.elapsed();
    stop_tx.send(true).unwrap();
    assert!(ok, "{out}");
    assert!(out.contains("slow"), "{out}");
    let mut worst = Duration::ZERO;
    for p in probes {
        let (w, n) = p.await.unwrap();
        assert!(n > 0);
        worst = worst.max(w);
    }
    eprintln!(
        "a login hashing {COSTLY} iterations took {login_took:?}; the slowest query of the \
         concurrent sessions meanwhile took {worst:?}"
    );
    // The login hashes twice (the client's password, then the branch server's
    // challenge); a session sharing its thread would wait for either, about half
    // the login each.
    assert!(
        worst * 4 < login_took,
        "a concurrent session stalled {worst:?} during a {login_took:?} login"
    );
}

/// `SCRAM-SHA-256$2000000000:...`: PostgreSQL stores it as given.
fn verifier_text_huge() -> String {
    "SCRAM-SHA-256$2000000000:MDEyMzQ1Njc4OWFiY2RlZg==$\
     WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_deadline_covers_negotiation_and_authentication() {
    let pg = scram_server(&[]).await;
    let proxy = ProxyProc::start(&format!(
        "startup_timeout = \"3s\"\n[auth]\n{}",
        source("shop", &pg, "")
    ));
    // A client that spends most of the deadline before its StartupMessage, then
    // stays silent in the authentication exchange.
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let opened = Instant::now();
    std::thread::sleep(Duration::from_millis(2500));
    s.write_all(&startup_packet(&[("user", "app"), ("database", "shop.x")]))
        .unwrap();
    let (t, _) = read_message(&mut s).expect("the SASL request");
    assert_eq!(t, b'R');
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let held = opened.elapsed();
    eprintln!("a silent client held its connection for {held:?} (startup_timeout 3s)");
    // One deadline: closed at about 3 s, not 2.5 s + another 3 s.
    assert!(held < Duration::from_millis(4500), "{held:?}");
    assert!(held >= Duration::from_millis(2900), "{held:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_from_one_address_do_not_lock_out_another() {
    let pg = scram_server(&[]).await;
    let proxy = ProxyProc::start(&format!(
        "startup_timeout = \"60s\"\n[auth]\n{}",
        source("shop", &pg, "")
    ));
    // 1,000 sockets from 127.0.0.1 that never say a word.
    let mut silent = Vec::new();
    for _ in 0..1000 {
        let s = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
        s.set_nonblocking(true).unwrap();
        silent.push((s, false));
    }
    // Those past the per-address share are refused with 53300 at once.
    let mut refused = 0;
    assert!(
        eventually(30, || {
            for (s, seen) in silent.iter_mut().filter(|(_, seen)| !*seen) {
                let mut head = [0u8; 1];
                if matches!(s.peek(&mut head), Ok(1)) {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let (t, body) = read_message(s).expect("a whole message");
                    assert_eq!(t, b'E');
                    assert_eq!(error_field(&body, b'C'), "53300");
                    assert!(error_field(&body, b'M').contains("not finished authenticating"));
                    *seen = true;
                    refused += 1;
                }
            }
            refused == 1000 - 64
        })
        .await,
        "{refused} refused"
    );
    assert_eq!(proxy.metric("offshoot_connections_unauthenticated"), 64.0);

    // A real user from another address logs in and works.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let target: SocketAddr = format!("127.0.0.1:{}", proxy.port).parse().unwrap();
    let stream = socket.connect(target).await.unwrap();
    let mut config: tokio_postgres::Config = "user=app password=app-secret dbname=shop.real"
        .parse()
        .unwrap();
    config.connect_timeout(Duration::from_secs(30));
    let (client, conn) = config
        .connect_raw(stream, tokio_postgres::NoTls)
        .await
        .expect("a user from another address is let in");
    tokio::spawn(conn);
    let n: i64 = client
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3);
    drop(client);

    // When the silent sockets go, the address may connect again.
    drop(silent);
    assert!(
        eventually(20, || proxy.metric("offshoot_connections_unauthenticated")
            == 0.0)
        .await
    );
    connect(&format!(
        "host=127.0.0.1 port={} user=app password=app-secret dbname=shop.real",
        proxy.port
    ))
    .await
    .expect("127.0.0.1 is let in again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_credential_lookup_does_not_queue_other_logins() {
    let pg = scram_server(&[]).await;
    pg.direct("shop")
        .await
        .batch_execute(
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE sleepy LOGIN PASSWORD 'sleepy-secret';",
        )
        .await
        .unwrap();
    // The lookup of `sleepy` takes 6 s (a lock on the catalog, a slow function...).
    let query = "SELECT rolpassword, rolcanlogin, rolvaliduntil FROM pg_catalog.pg_authid \
                 WHERE rolname = $1 AND (SELECT true FROM pg_catalog.pg_sleep(CASE WHEN $1 = \
                 'sleepy' THEN 6 ELSE 0 END))";
    let proxy = ProxyProc::start(&format!(
        "[auth]\nquery = \"{query}\"\n{}",
        source("shop", &pg, "")
    ));
    let url = |user: &str, pw: &str| {
        format!(
            "host=127.0.0.1 port={} user={user} password={pw} dbname=shop.q",
            proxy.port
        )
    };
    // Warm the pool, so connecting to the auth server is not what is measured.
    connect(&url("app", "app-secret")).await.unwrap();
    let started = Instant::now();
    let slow = tokio::spawn({
        let u = url("sleepy", "sleepy-secret");
        async move {
            connect(&u).await.expect("the slow role logs in too");
            started.elapsed()
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..3 {
        connect(&url("app", "app-secret")).await.unwrap();
    }
    let others = started.elapsed();
    let slow = slow.await.unwrap();
    eprintln!("three logins took {others:?} while one lookup took {slow:?}");
    // Queued behind the slow lookup, they would end just before it does.
    assert!(
        others + Duration::from_secs(3) < slow,
        "the other logins waited for the slow lookup"
    );
    assert!(slow >= Duration::from_secs(6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_roles_and_sources_cannot_be_told_apart() {
    let pg = scram_server(&[]).await;
    pg.make_source("vault").await;
    let body = format!(
        "[auth]\n{}{}",
        source("shop", &pg, ""),
        source("vault", &pg, "auth_method = \"password\"")
    );
    let mut proxy = ProxyProc::start(&body);
    // The real sources: SCRAM for `shop`; `vault` wants cleartext, hence TLS.
    assert_eq!(first_answer(proxy.port, "app", "shop.x"), "auth 10");
    assert_eq!(first_answer(proxy.port, "app", "vault.x"), "error 28000");
    // Names that are no source look like one or the other, each always the same.
    let names: Vec<String> = (0..24).map(|i| format!("probe{i}.x")).collect();
    let answers: Vec<String> = names
        .iter()
        .map(|n| first_answer(proxy.port, "app", n))
        .collect();
    assert!(answers.iter().any(|a| a == "auth 10"), "{answers:?}");
    assert!(answers.iter().any(|a| a == "error 28000"), "{answers:?}");
    let probe = names
        .iter()
        .zip(&answers)
        .find(|(_, a)| *a == "auth 10")
        .map(|(n, _)| n.clone())
        .unwrap();
    // An unknown role gets the iteration count of real ones, and a salt of its own.
    let (real_salt, real_i) = server_first(proxy.port, "app", "shop.x");
    let (ghost_salt, ghost_i) = server_first(proxy.port, "ghost", "shop.x");
    assert_eq!(real_i, "4096");
    assert_eq!(ghost_i, real_i);
    assert_ne!(ghost_salt, real_salt);
    assert_eq!(server_first(proxy.port, "ghost", &probe).0, ghost_salt);

    // After a restart: the same salt for the unknown role, the same answers.
    proxy.kill9_and_restart();
    assert_eq!(server_first(proxy.port, "ghost", "shop.x").0, ghost_salt);
    let again: Vec<String> = names
        .iter()
        .map(|n| first_answer(proxy.port, "app", n))
        .collect();
    assert_eq!(again, answers);
    let key = proxy.dir.path().join("state/auth.key");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleartext_never_goes_to_a_server_over_plain_tcp() {
    // The branch server asks `app` for a cleartext password over TCP.
    let pg = scram_server(&["host all app 127.0.0.1/32 password"]).await;
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = make_cert(certs.path(), "localhost");
    let proxy = ProxyProc::start(&format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n[auth]\nmethod = \"password\"\n{}",
        cert.display(),
        key.display(),
        source("shop", &pg, "")
    ));
    let (ok, out) = psql(
        &format!(
            "host=localhost port={} user=app password=app-secret dbname=shop.clear \
             sslmode=require",
            proxy.port
        ),
        "SELECT 1",
    );
    assert!(!ok, "{out}");
    assert!(
        out.contains("cleartext password over an unencrypted connection"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_negotiation_is_answered_as_postgresql_does() {
    let pg = PgServer::start();
    pg.make_source("shop").await;
    let proxy = ProxyProc::start(&source("shop", &pg, ""));
    let ssl_request = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

    // A second SSLRequest after the first was answered: a protocol violation, not
    // another `N`.
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(&ssl_request).unwrap();
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"N");
    s.write_all(&ssl_request).unwrap();
    let (t, body) = read_message(&mut s).expect("an error");
    assert_eq!(t, b'E');
    assert_eq!(error_field(&body, b'C'), "08P01");
    assert!(error_field(&body, b'M').contains("SSLRequest repeated"));

    // GSS then SSL, as libpq tries them, is fine.
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30]).unwrap();
    s.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"N");
    s.write_all(&ssl_request).unwrap();
    s.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"N");

    // CancelRequests with a bad length: closed without a word.
    let cancel = 80_877_102u32.to_be_bytes();
    for body_len in [4usize, 8, 9, 12 + 300] {
        let mut pkt = ((body_len + 4) as u32).to_be_bytes().to_vec();
        pkt.extend_from_slice(&cancel);
        pkt.resize(body_len + 4, 7);
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
            .await
            .unwrap();
        s.write_all(&pkt).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut got))
            .await
            .expect("closed")
            .unwrap();
        assert!(got.is_empty(), "length {body_len}: answered {got:?}");
    }
    // Still serving.
    connect(&proxy.url("shop.ok")).await.unwrap();
}
