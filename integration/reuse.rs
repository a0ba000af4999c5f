//! Server sessions kept between clients: a clean end parks the session, the next
//! client of the same role, database and startup parameters gets it back, reset,
//! with nothing of the previous client left and a cancel key of its own.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::NoTls;

use crate::harness::*;

const IDLE: &str = "offshoot_server_sessions_idle";
const HITS: &str = "offshoot_server_reuse_total{outcome=\"hit\"}";
const DISCARDS: &str = "offshoot_server_reuse_total{outcome=\"discard\"}";

/// Waits until the proxy holds `n` parked sessions.
async fn parked(proxy: &ProxyProc, n: f64) -> bool {
    eventually(20, || proxy.metric(IDLE) == n).await
}

async fn pid(c: &tokio_postgres::Client) -> i32 {
    c.query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

async fn one_i64(c: &tokio_postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

/// A session spoken by hand, to see exactly what the proxy sends.
struct Raw {
    s: TcpStream,
    params: Vec<(String, String)>,
    pid: u32,
    secret: Vec<u8>,
}

async fn read_msg(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 5];
    s.read_exact(&mut head).await.unwrap();
    let len = u32::from_be_bytes(head[1..].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len - 4];
    s.read_exact(&mut body).await.unwrap();
    (head[0], body)
}

fn cstrings(body: &[u8]) -> Vec<String> {
    body.split(|&b| b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

impl Raw {
    async fn login(port: u16, db: &str) -> Self {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut pkt = vec![0, 0, 0, 0, 0, 3, 0, 0];
        // What tokio-postgres sends too, so both kinds of client share a key.
        let params = format!("user\0postgres\0database\0{db}\0client_encoding\0UTF8\0\0");
        pkt.extend_from_slice(params.as_bytes());
        let len = (pkt.len() as u32).to_be_bytes();
        pkt[..4].copy_from_slice(&len);
        s.write_all(&pkt).await.unwrap();
        let (mut params, mut pid, mut secret) = (Vec::new(), 0, Vec::new());
        loop {
            let (kind, body) = read_msg(&mut s).await;
            match kind {
                b'R' => assert_eq!(body, [0, 0, 0, 0], "trust: AuthenticationOk at once"),
                b'S' => {
                    let kv = cstrings(&body);
                    params.push((kv[0].clone(), kv[1].clone()));
                }
                b'K' => {
                    pid = u32::from_be_bytes(body[..4].try_into().unwrap());
                    secret = body[4..].to_vec();
                }
                b'Z' => {
                    assert_eq!(body, b"I");
                    break;
                }
                b'N' => {}
                other => panic!("unexpected message {:?} in the startup", other as char),
            }
        }
        Self {
            s,
            params,
            pid,
            secret,
        }
    }

    /// Runs `sql` and returns the first column of each row.
    async fn query(&mut self, sql: &str) -> Vec<String> {
        let mut q = vec![b'Q'];
        q.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
        q.extend_from_slice(sql.as_bytes());
        q.push(0);
        self.s.write_all(&q).await.unwrap();
        let mut rows = Vec::new();
        loop {
            let (kind, body) = read_msg(&mut self.s).await;
            match kind {
                b'D' => {
                    let len = i32::from_be_bytes(body[2..6].try_into().unwrap()) as usize;
                    rows.push(String::from_utf8_lossy(&body[6..6 + len]).into_owned());
                }
                b'E' => panic!("{sql}: {:?}", cstrings(&body)),
                b'Z' => return rows,
                _ => {}
            }
        }
    }

    async fn terminate(mut self) {
        self.s.write_all(b"X\0\0\0\x04").await.unwrap();
        let _ = self.s.read(&mut [0u8; 16]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_session_carries_nothing_from_the_previous_client() {
    let Fixture { pg: _pg, proxy } = Fixture::start(Engine::Database, "").await;
    let a = proxy.connect("shop.r").await.unwrap();
    let first = pid(&a).await;
    a.batch_execute(
        "SET work_mem = '7MB';
         PREPARE p AS SELECT 1;
         CREATE TEMP TABLE scratch (x int);
         SELECT pg_advisory_lock(42);
         LISTEN channel;",
    )
    .await
    .unwrap();
    drop(a);
    assert!(parked(&proxy, 1.0).await, "the session was parked");

    let b = proxy.connect("shop.r").await.unwrap();
    assert_eq!(pid(&b).await, first, "the same server backend, reused");
    assert_eq!(proxy.metric(HITS), 1.0);
    assert_eq!(proxy.metric(IDLE), 0.0);
    let work_mem: String = b.query_one("SHOW work_mem", &[]).await.unwrap().get(0);
    assert_eq!(work_mem, "4MB", "the setting is back at its default");
    assert_eq!(
        one_i64(
            &b,
            "SELECT count(*) FROM pg_prepared_statements WHERE name = 'p'"
        )
        .await,
        0
    );
    let temp: Option<String> = b
        .query_one("SELECT to_regclass('scratch')::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(temp, None, "the temporary table is gone");
    assert_eq!(
        one_i64(
            &b,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
        )
        .await,
        0
    );
    assert_eq!(
        one_i64(&b, "SELECT count(*) FROM pg_listening_channels()").await,
        0
    );
    // Another session can take the lock the first client held.
    let other = proxy.connect("shop.r").await.unwrap();
    assert_ne!(pid(&other).await, first);
    assert!(other
        .query_one("SELECT pg_try_advisory_lock(42)", &[])
        .await
        .unwrap()
        .get::<_, bool>(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_session_shows_the_parameters_of_a_fresh_one_and_its_own_cancel_key() {
    let Fixture { pg: _pg, proxy } = Fixture::start(Engine::Database, "").await;
    let mut a = Raw::login(proxy.port, "shop.p").await;
    assert!(a.params.iter().any(|(k, _)| k == "DateStyle"));
    a.query("SET DateStyle = 'German'").await;
    a.query("SET TimeZone = 'Asia/Tokyo'").await;
    let (params, pid, secret) = (a.params.clone(), a.pid, a.secret.clone());
    a.terminate().await;
    assert!(parked(&proxy, 1.0).await);

    let mut b = Raw::login(proxy.port, "shop.p").await;
    assert_eq!(b.pid, pid, "reused");
    assert_eq!(
        b.params, params,
        "the same ParameterStatus values, in order"
    );
    assert_ne!(b.secret, secret, "a cancel key of its own");
    assert_eq!(b.query("SHOW DateStyle").await, ["ISO, MDY"]);
    let tz = b.query("SHOW TimeZone").await;
    let fresh_tz = &params.iter().find(|(k, _)| k == "TimeZone").unwrap().1;
    assert_eq!(&tz[0], fresh_tz);
    b.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_reused_backend_and_the_old_key_is_dead() {
    let Fixture { pg, proxy } = Fixture::start(Engine::Database, "").await;
    let a = Raw::login(proxy.port, "shop.c").await;
    let (old_pid, old_secret) = (a.pid, a.secret.clone());
    a.terminate().await;
    assert!(parked(&proxy, 1.0).await);

    let b = proxy.connect("shop.c").await.unwrap();
    assert_eq!(pid(&b).await as u32, old_pid);
    let token = b.cancel_token();
    let sleeper = tokio::spawn(async move {
        let r = b.batch_execute("SELECT pg_sleep(60)").await;
        (b, r)
    });
    let direct = pg.direct("postgres").await;
    let running = "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' \
                   AND state = 'active'";
    let mut seen = false;
    for _ in 0..100 {
        if one_i64(&direct, running).await == 1 {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen, "the statement runs");

    // The previous client's key names the same backend but is no longer live.
    let mut cancel = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    let mut pkt = Vec::new();
    pkt.extend_from_slice(&((12 + old_secret.len()) as u32).to_be_bytes());
    pkt.extend_from_slice(&80877102u32.to_be_bytes());
    pkt.extend_from_slice(&old_pid.to_be_bytes());
    pkt.extend_from_slice(&old_secret);
    cancel.write_all(&pkt).await.unwrap();
    let _ = cancel.read(&mut [0u8; 1]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(one_i64(&direct, running).await, 1, "still running");
    assert!(!sleeper.is_finished());

    token.cancel_query(NoTls).await.unwrap();
    let (_b, r) = tokio::time::timeout(Duration::from_secs(30), sleeper)
        .await
        .expect("cancelled in time")
        .unwrap();
    assert_eq!(sqlstate(&r.unwrap_err()), "57014");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_transaction_is_never_reused() {
    let Fixture { pg, proxy } = Fixture::start(Engine::Database, "").await;
    let mut a = Raw::login(proxy.port, "shop.t").await;
    a.query("BEGIN").await;
    a.query("SELECT 1").await;
    let first = a.pid;
    a.terminate().await;
    // Neither is a client whose last request went unanswered.
    let mut q = Raw::login(proxy.port, "shop.t").await;
    let second = q.pid;
    assert_ne!(second, first);
    q.s.write_all(b"Q\0\0\0\x0dSELECT 1\0X\0\0\0\x04")
        .await
        .unwrap();
    let _ = q.s.read(&mut [0u8; 256]).await;
    drop(q);

    let direct = pg.direct("postgres").await;
    let alive = |pid: u32| {
        let direct = &direct;
        async move {
            one_i64(
                direct,
                &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"),
            )
            .await
        }
    };
    let mut gone = false;
    for _ in 0..100 {
        if alive(first).await == 0 && alive(second).await == 0 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "both server sessions ended with their clients");
    assert_eq!(proxy.metric(IDLE), 0.0);
    let c = proxy.connect("shop.t").await.unwrap();
    let third = pid(&c).await as u32;
    assert!(third != first && third != second);
    assert_eq!(proxy.metric(HITS), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_sessions_do_not_delay_expiry_and_close_with_their_branch() {
    let Fixture { pg, proxy } = Fixture::start(
        Engine::Database,
        "idle_expire = \"1s\"\n[reaper]\ninterval = \"100ms\"",
    )
    .await;
    let c = proxy.connect("shop.gone").await.unwrap();
    let first = pid(&c).await;
    drop(c);
    assert!(
        eventually(20, || proxy.branch_names().is_empty()).await,
        "expired with its session parked: {}",
        proxy.branches()
    );
    assert_eq!(proxy.metric(IDLE), 0.0, "drained with the branch");
    assert_eq!(proxy.metric(DISCARDS), 1.0, "the parked session was closed");
    assert!(clones(&pg).await.is_empty(), "the clone database is gone");
    let direct = pg.direct("postgres").await;
    assert_eq!(
        one_i64(
            &direct,
            &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {first}")
        )
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_sessions_do_not_keep_an_instance_server_awake() {
    let Fixture { pg: _pg, proxy } = Fixture::start(
        Engine::Instance,
        "suspend_after = \"1s\"\n[reaper]\ninterval = \"200ms\"",
    )
    .await;
    let c = proxy.connect("shop.s").await.unwrap();
    let first = pid(&c).await;
    drop(c);
    let data = branch_data(&proxy, "shop", "s");
    let state = || {
        proxy
            .branch("s")
            .map(|b| b["state"].as_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    assert!(
        eventually(30, || state() == "suspended").await,
        "{}",
        proxy.branches()
    );
    assert_eq!(proxy.metric(IDLE), 0.0);
    assert_eq!(proxy.metric(DISCARDS), 1.0, "the parked session was closed");
    assert!(eventually(10, || processes_in(&data).is_empty()).await);
    // The next client starts the server again and gets a new backend.
    let c = proxy.connect("shop.s").await.unwrap();
    assert_ne!(pid(&c).await, first);
    assert_eq!(proxy.metric(HITS), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_trust_a_session_the_server_asked_a_password_for_is_never_reused() {
    let pg = crate::auth::scram_server().await;
    let Fixture { pg: _pg, proxy } = Fixture::over(pg, Engine::Database, "", "");
    let url = |password: &str| {
        format!(
            "host=127.0.0.1 port={} user=app password={password} dbname=shop.trust",
            proxy.port
        )
    };
    let a = connect(&url("app-secret")).await.unwrap();
    let first = pid(&a).await;
    drop(a);
    // Roles the server trusts are kept (postgres), so the proxy had time to park.
    let p = proxy.connect("shop.trust").await.unwrap();
    drop(p);
    assert!(
        parked(&proxy, 1.0).await,
        "the trusted role's session is kept"
    );
    let Err(err) = connect(&url("wrong")).await else {
        panic!("a wrong password is refused")
    };
    assert_eq!(sqlstate(&err), "28P01", "the server's own check ran: {err}");
    let b = connect(&url("app-secret")).await.unwrap();
    assert_ne!(
        pid(&b).await,
        first,
        "a new backend for the role with a password"
    );
    assert_eq!(proxy.metric(HITS), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_authenticated_by_the_proxy_are_reused_and_reuse_can_be_turned_off() {
    let pg = crate::auth::scram_server().await;
    let Fixture { pg, proxy } = Fixture::over(pg, Engine::Database, "[auth]\n", "");
    let proxy_port = proxy.port;
    let url = |port: u16, password: &str| {
        // Each proxy its own branch: the other's clone is not its to take.
        let db = if port == proxy_port {
            "shop.scram"
        } else {
            "shop.off"
        };
        format!("host=127.0.0.1 port={port} user=app password={password} dbname={db}")
    };
    let a = connect(&url(proxy.port, "app-secret")).await.unwrap();
    let first = pid(&a).await;
    drop(a);
    assert!(parked(&proxy, 1.0).await);
    let Err(err) = connect(&url(proxy.port, "wrong")).await else {
        panic!("a wrong password is refused")
    };
    assert_eq!(sqlstate(&err), "28P01");
    let b = connect(&url(proxy.port, "app-secret")).await.unwrap();
    assert_eq!(
        pid(&b).await,
        first,
        "reused after the proxy's own SCRAM check"
    );
    let user: String = b
        .query_one("SELECT current_user", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, "app");
    drop((b, proxy));

    let off = ProxyProc::start(&format!(
        "[auth]\n{}",
        source("shop", &pg, "server_reuse = false")
    ));
    let a = connect(&url(off.port, "app-secret")).await.unwrap();
    let first = pid(&a).await;
    drop(a);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = connect(&url(off.port, "app-secret")).await.unwrap();
    assert_ne!(pid(&b).await, first);
    assert_eq!(off.metric(IDLE), 0.0);
    assert_eq!(off.metric(HITS), 0.0);
}
