//! The startup phase under bad and unusual input, cancellation, and TLS.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

/// Sends `bytes`, then reads until the proxy closes; returns what it sent back.
fn exchange(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// The SQLSTATE of an ErrorResponse at the start of `reply`.
fn error_code(reply: &[u8]) -> Option<String> {
    if reply.first() != Some(&b'E') {
        return None;
    }
    let body = &reply[5..];
    let mut i = 0;
    while i < body.len() && body[i] != 0 {
        let end = body[i + 1..].iter().position(|&b| b == 0)? + i + 1;
        if body[i] == b'C' {
            return Some(String::from_utf8_lossy(&body[i + 1..end]).into_owned());
        }
        i = end + 1;
    }
    None
}

pub fn startup_packet(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut pkt = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    pkt.extend(body);
    pkt
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_startup_packets_are_refused_and_others_still_served() {
    let Fixture { pg: _pg, proxy } =
        Fixture::start_with(Engine::Database, "startup_timeout = \"500ms\"\n", "").await;
    // Someone connected throughout: bad clients must not disturb them.
    let steady = proxy.connect("shop.steady").await.unwrap();

    let mut oversized = 10_001u32.to_be_bytes().to_vec();
    oversized.extend(vec![b'a'; 10_000]);
    let mut no_terminator = startup_packet(3 << 16, &[("user", "u")]);
    no_terminator.pop();
    let len = no_terminator.len() as u32;
    no_terminator[..4].copy_from_slice(&len.to_be_bytes());
    let cases: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        ("zero length", vec![0, 0, 0, 0], Some("08P01")),
        (
            "0xFFFFFFFF length",
            vec![0xff, 0xff, 0xff, 0xff],
            Some("08P01"),
        ),
        ("oversized", oversized, Some("08P01")),
        ("truncated", vec![0, 0, 0, 40, 0, 3, 0, 0, b'u'], None),
        (
            "garbage",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            Some("08P01"),
        ),
        (
            "protocol 2",
            startup_packet(2 << 16, &[("user", "u")]),
            Some("0A000"),
        ),
        ("no terminator", no_terminator, Some("08P01")),
        (
            "no user",
            startup_packet(3 << 16, &[("database", "shop.x")]),
            Some("28000"),
        ),
    ];
    for (what, bytes, want) in cases {
        let reply = exchange(proxy.port, &bytes);
        assert_eq!(error_code(&reply).as_deref(), want, "{what}: {reply:?}");
    }

    // A client that says nothing is dropped after startup_timeout.
    let mut silent = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 1];
    let n = silent.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "connection closed");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "dropped after the timeout"
    );

    // SSLRequest without TLS configured: 'N', then a normal startup works.
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"N");
    // GSSENCRequest: 'N' too.
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30]).unwrap();
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"N");
    s.write_all(&startup_packet(
        3 << 16,
        &[("user", "postgres"), ("database", "shop.steady")],
    ))
    .unwrap();
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"R", "authentication request follows");

    // Protocol 3.2 with an extension option: NegotiateProtocolVersion first.
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    s.write_all(&startup_packet(
        (3 << 16) | 2,
        &[
            ("user", "postgres"),
            ("database", "shop.steady"),
            ("_pq_.x", "1"),
        ],
    ))
    .unwrap();
    let mut head = [0u8; 17];
    s.read_exact(&mut head).unwrap();
    assert_eq!(head[0], b'v');
    assert_eq!(&head[5..9], &((3u32 << 16) | 2).to_be_bytes(), "serves 3.2");
    assert_eq!(&head[9..13], &1u32.to_be_bytes(), "one unrecognised option");

    steady
        .simple_query("SELECT 1")
        .await
        .expect("steady client unaffected");
    proxy
        .connect("shop.steady")
        .await
        .expect("new clients served");
}

/// Reads one backend message from a blocking socket: (type, body).
pub fn read_msg(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 5];
    s.read_exact(&mut head).expect("message header");
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize - 4;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).expect("message body");
    (head[0], body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_3_2_sessions_get_long_cancel_keys_that_work() {
    let Fixture { pg: _pg, proxy } = Fixture::start(Engine::Database, "").await;
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(&startup_packet(
        (3 << 16) | 2,
        &[("user", "postgres"), ("database", "shop.v32")],
    ))
    .unwrap();
    // 3.2 is served as asked: no NegotiateProtocolVersion, and a 32-byte key.
    let mut key = None;
    loop {
        let (tag, body) = read_msg(&mut s);
        assert_ne!(tag, b'v', "3.2 needs no negotiation");
        assert_ne!(tag, b'E', "{}", String::from_utf8_lossy(&body));
        if tag == b'K' {
            key = Some(body);
        }
        if tag == b'Z' {
            break;
        }
    }
    let key = key.expect("BackendKeyData");
    assert_eq!(key.len(), 4 + 32, "pid and a 256-bit secret");
    let mut query = b"SELECT pg_sleep(30)\0".to_vec();
    let mut q = vec![b'Q'];
    q.extend_from_slice(&((query.len() + 4) as u32).to_be_bytes());
    q.append(&mut query);
    s.write_all(&q).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let mut cancel = ((12 + 32) as u32).to_be_bytes().to_vec();
    cancel.extend_from_slice(&80_877_102u32.to_be_bytes());
    cancel.extend_from_slice(&key);
    let mut c = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    c.write_all(&cancel).unwrap();
    let _ = c.read_to_end(&mut Vec::new());
    // RowDescription comes before the statement runs; then the error.
    let (tag, body) = loop {
        let (tag, body) = read_msg(&mut s);
        if tag == b'E' || tag == b'Z' {
            break (tag, body);
        }
    };
    assert_eq!(tag, b'E');
    assert!(
        body.windows(6).any(|w| w == b"C57014"),
        "query_canceled: {}",
        String::from_utf8_lossy(&body)
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    // Newer than 3.2: told that 3.2 is served, then the session goes on.
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    s.write_all(&startup_packet(
        (3 << 16) | 7,
        &[("user", "postgres"), ("database", "shop.v32")],
    ))
    .unwrap();
    let (tag, body) = read_msg(&mut s);
    assert_eq!(tag, b'v');
    assert_eq!(&body[..8], &[0, 3, 0, 2, 0, 0, 0, 0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_requests_reach_the_right_backend() {
    let Fixture { pg: _pg, proxy } = Fixture::start(Engine::Database, "").await;
    let sleeper = proxy.connect("shop.c").await.unwrap();
    let other = proxy.connect("shop.c").await.unwrap();
    let token = sleeper.cancel_token();
    let started = Instant::now();
    let query = tokio::spawn(async move {
        let r = sleeper.simple_query("SELECT pg_sleep(30)").await;
        (r, sleeper)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The key the client holds is the proxy's: the cancel goes through the proxy.
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel sent");
    let (result, sleeper) = query.await.unwrap();
    let err = result.unwrap_err();
    assert_eq!(sqlstate(&err), "57014", "query_canceled");
    assert!(started.elapsed() < Duration::from_secs(10));
    // Only that session was cancelled, and it is still usable.
    other.simple_query("SELECT 1").await.unwrap();
    sleeper.simple_query("SELECT 1").await.unwrap();
    // Counted once handed over, which may be a moment after the client saw it work.
    assert!(
        eventually(10, || proxy
            .metric("offshoot_cancel_requests_total{outcome=\"forwarded\"}")
            == 1.0)
        .await,
        "the cancel is counted as forwarded"
    );
    // A made-up key is ignored: no answer (a cancel never gets one), counted as such.
    let ignored = "offshoot_cancel_requests_total{outcome=\"ignored\"}";
    assert_eq!(proxy.metric(ignored), 0.0);
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    s.write_all(&[0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e, 0, 0, 0, 1, 0, 0, 0, 2])
        .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(out.is_empty());
    assert!(
        eventually(5, || proxy.metric(ignored) == 1.0).await,
        "the made-up key is counted as ignored"
    );
    assert_eq!(
        proxy.metric("offshoot_cancel_requests_total{outcome=\"forwarded\"}"),
        1.0,
        "and not forwarded"
    );
    // Guessing keys at speed is rate-limited per address (cancel_rate = 10/s).
    for guess in 0..40u8 {
        let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
        s.write_all(&[
            0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e, 0, 0, 0, 1, 0, 0, 0, guess,
        ])
        .unwrap();
        let _ = s.read_to_end(&mut Vec::new());
    }
    assert!(
        eventually(5, || proxy
            .metric("offshoot_cancel_requests_total{outcome=\"rate_limited\"}")
            >= 10.0)
        .await,
        "bursts of cancels are limited"
    );
}

/// Makes a self-signed certificate for `cn` at `dir/{cert,key}.pem`.
pub fn make_cert(dir: &std::path::Path, cn: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
        ])
        .arg(format!("/CN={cn}"))
        .arg("-addext")
        .arg(format!("subjectAltName=DNS:{cn}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(out.status.success(), "made a test certificate");
    // The proxy's user reads them again on SIGHUP, after it dropped root.
    for path in [dir, &cert, &key] {
        give_to_proxy(path);
    }
    (cert, key)
}

/// The [`Fixture`] with TLS from a fresh certificate for `cn`; `tls_extra` holds
/// further `[tls]` lines. Returns the certificate's directory (keep it alive) and
/// path, for tests that rewrite it.
async fn tls_proxy(cn: &str, tls_extra: &str) -> (Fixture, tempfile::TempDir, std::path::PathBuf) {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = make_cert(certs.path(), cn);
    let tls = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n{tls_extra}",
        cert.display(),
        key.display(),
    );
    let fixture = Fixture::start_with(Engine::Database, &tls, "").await;
    (fixture, certs, cert)
}

/// The subject the proxy's certificate shows to a TLS client right now.
fn served_subject(port: u16) -> String {
    let out = Command::new("openssl")
        .args(["s_client", "-starttls", "postgres", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl s_client");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find(|l| l.starts_with("subject="))
        .unwrap_or_default()
        .to_owned()
}

pub fn psql(conninfo: &str, sql: &str) -> (bool, String) {
    let out = Command::new("psql")
        .arg(conninfo)
        .args(["-X", "-At", "-c", sql])
        .output()
        .expect("psql");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_handshake_with_a_test_certificate() {
    let (Fixture { pg: _pg, proxy }, _certs, _) = tls_proxy("localhost", "").await;
    let out = Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={} user=postgres dbname=shop.tls sslmode=require",
            proxy.port
        ))
        .args([
            "-X",
            "-c",
            "\\conninfo",
            "-c",
            "SELECT 'over-tls-' || count(*) FROM items",
        ])
        .output()
        .expect("psql");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("SSL connection"), "{stdout}");
    assert!(stdout.contains("over-tls-3"), "{stdout}");
    // Plain clients are still welcome when TLS is optional.
    let c = proxy.connect("shop.tls").await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_required_refuses_plaintext_and_certificates_reload_on_sighup() {
    let (Fixture { pg: _pg, proxy }, certs, cert) =
        tls_proxy("first.example", "mode = \"require\"\n").await;
    let base = format!(
        "host=127.0.0.1 port={} user=postgres dbname=shop.req",
        proxy.port
    );

    let err = proxy.connect("shop.req").await.unwrap_err();
    assert_eq!(sqlstate(&err), "28000");
    assert!(
        err.as_db_error()
            .unwrap()
            .message()
            .contains("sslmode=require"),
        "{err}"
    );
    let (ok, out) = psql(&format!("{base} sslmode=require"), "SELECT 'tls ok'");
    assert!(ok && out.contains("tls ok"), "{out}");

    // A new certificate is served after SIGHUP, without a restart.
    assert!(served_subject(proxy.port).contains("first.example"));
    make_cert(certs.path(), "second.example");
    proxy.sighup();
    assert!(
        eventually(10, || served_subject(proxy.port).contains("second.example")).await,
        "new certificate not served after SIGHUP:\n{}",
        proxy.log()
    );
    assert!(proxy.log().contains("TLS certificate reloaded"));
    // A broken file leaves the working certificate in place.
    std::fs::write(&cert, "not a certificate").unwrap();
    proxy.sighup();
    assert!(eventually(10, || proxy.log().contains("TLS reload failed")).await);
    assert!(served_subject(proxy.port).contains("second.example"));
    let (ok, out) = psql(&format!("{base} sslmode=require"), "SELECT 'still ok'");
    assert!(ok && out.contains("still ok"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_connections_are_refused_unless_allowed() {
    let pg = PgServer::start();
    pg.make_source("shop").await;
    pg.make_source("open").await;
    let proxy = ProxyProc::start(&format!(
        "{}{}",
        source("shop", &pg, ""),
        source("open", &pg, "allow_replication = true")
    ));
    let conn = |db: &str| {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={db} replication=database",
            proxy.port
        )
    };
    let (ok, out) = psql(&conn("shop.r"), "IDENTIFY_SYSTEM");
    assert!(!ok, "{out}");
    assert!(out.contains("allow_replication"), "{out}");
    let (ok, out) = psql(&conn("open.r"), "IDENTIFY_SYSTEM");
    assert!(ok, "allowed source passes replication through: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_names_the_branch() {
    let (Fixture { pg: _pg, proxy }, _certs, _) =
        tls_proxy("*.shop.db.example.com", "sni_suffix = \"db.example.com\"\n").await;
    // libpq sends the host name as SNI; hostaddr skips the DNS look-up.
    let conninfo = |host: &str| {
        format!(
            "host={host} hostaddr=127.0.0.1 port={} user=postgres dbname=shop sslmode=require",
            proxy.port
        )
    };
    let (ok, out) = psql(
        &conninfo("pr-42.shop.db.example.com"),
        "SELECT current_database()",
    );
    assert!(ok, "{out}");
    assert_eq!(out.trim(), "shop__pr-42");
    // A name outside the suffix routes by the database name as usual.
    let (ok, out) = psql(&conninfo("other.example.org"), "SELECT current_database()");
    assert!(!ok, "{out}");
    assert!(out.contains("names no branch"), "{out}");
    // Bad branch names in the server name get the usual 3D000 rule (TLS server
    // names arrive lowercased, so too long is what can still be wrong).
    let long = format!("{}.shop.db.example.com", "x".repeat(41));
    let (ok, out) = psql(&conninfo(&long), "SELECT 1");
    assert!(!ok && out.contains("at most 40 characters"), "{out}");
}

/// Opens a direct-TLS connection (no SSLRequest) offering `alpn`.
async fn direct_tls(
    port: u16,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(offshoot::upstream::NoVerification(
            provider,
        )))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
}

/// Reads backend messages until ReadyForQuery; returns (type, body) pairs.
async fn until_ready<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Vec<(u8, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    loop {
        let mut head = [0u8; 5];
        s.read_exact(&mut head).await.expect("message header");
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize - 4;
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await.expect("message body");
        let done = head[0] == b'Z' || head[0] == b'E';
        out.push((head[0], body));
        if done {
            return out;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_needs_alpn_postgresql() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (Fixture { pg: _pg, proxy }, _certs, _) = tls_proxy("localhost", "").await;

    let mut s = direct_tls(proxy.port, &[b"postgresql"])
        .await
        .expect("handshake");
    s.write_all(&startup_packet(
        3 << 16,
        &[("user", "postgres"), ("database", "shop.direct")],
    ))
    .await
    .unwrap();
    let msgs = until_ready(&mut s).await;
    assert_eq!(msgs.last().unwrap().0, b'Z', "{msgs:?}");
    let query = b"SELECT current_database()\0";
    let mut q = vec![b'Q'];
    q.extend(((query.len() + 4) as u32).to_be_bytes());
    q.extend(query);
    s.write_all(&q).await.unwrap();
    let msgs = until_ready(&mut s).await;
    let row = msgs.iter().find(|(t, _)| *t == b'D').expect("a data row");
    assert!(
        String::from_utf8_lossy(&row.1).contains("shop__direct"),
        "{msgs:?}"
    );

    // Without ALPN `postgresql` the session is refused, inside TLS, with 08P01.
    let mut s = direct_tls(proxy.port, &[]).await.expect("handshake");
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply).await;
    assert_eq!(error_code(&reply).as_deref(), Some("08P01"), "{reply:?}");
    // A client offering only another protocol fails the handshake itself.
    assert!(direct_tls(proxy.port, &[b"http/1.1"]).await.is_err());
    // Plain clients and SSLRequest clients are unaffected.
    proxy.connect("shop.direct").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_sent_with_an_sslrequest_is_never_used() {
    let (Fixture { pg, proxy }, _certs, _) = tls_proxy("localhost", "").await;
    // SSLRequest and a plaintext startup in one write (the CVE-2021-23214 pattern):
    // the bytes behind the SSLRequest must not be taken as the session's start.
    let mut bytes = vec![0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    bytes.extend(startup_packet(
        3 << 16,
        &[("user", "postgres"), ("database", "shop.injected")],
    ));
    let reply = exchange(proxy.port, &bytes);
    assert_eq!(reply.first(), Some(&b'S'), "{reply:?}");
    // After 'S' only a TLS alert record (0x15) may follow, never a protocol message.
    assert!(
        reply.len() == 1 || reply[1] == 0x15,
        "no session was opened: {reply:?}"
    );
    assert!(
        !pg.databases().await.contains(&"shop__injected".to_string()),
        "no branch was made from injected bytes"
    );
    proxy.connect("shop.ok").await.unwrap();
}
