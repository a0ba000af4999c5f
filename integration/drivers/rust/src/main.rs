//! tokio-postgres through Offshoot: every check the driver suite makes, on one branch.
//!
//! Connection parameters come from PGHOST, PGPORT, PGUSER and PGDATABASE; EXPECT_DB
//! is the clone the branch must land on. Prints one line per check and exits
//! non-zero with the reason at the first mismatch.

use std::error::Error;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, TryStreamExt};
use tokio::sync::mpsc;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Client, Config, NoTls};

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

/// Fails the run with `what` unless `cond` holds.
macro_rules! check {
    ($cond:expr, $($what:tt)+) => {
        if !$cond {
            return Err(format!($($what)+).into());
        }
    };
}

fn ok(what: &str) {
    println!("ok {what}");
}

fn env(name: &str) -> Result<String> {
    std::env::var(name).map_err(|_| format!("environment variable {name} is not set").into())
}

fn config() -> Result<Config> {
    let mut cfg = Config::new();
    cfg.host(env("PGHOST")?)
        .port(env("PGPORT")?.parse()?)
        .user(env("PGUSER")?)
        .dbname(env("PGDATABASE")?)
        .connect_timeout(Duration::from_secs(30));
    if let Ok(pw) = std::env::var("PGPASSWORD") {
        cfg.password(pw);
    }
    Ok(cfg)
}

/// A client whose connection task forwards notifications to the returned channel.
async fn connect() -> Result<(Client, mpsc::UnboundedReceiver<(String, String)>)> {
    let (client, mut connection) = config()?.connect(NoTls).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Ok(Some(msg)) = messages.try_next().await {
            if let AsyncMessage::Notification(n) = msg {
                let _ = tx.send((n.channel().to_owned(), n.payload().to_owned()));
            }
        }
    });
    Ok((client, rx))
}

async fn count(c: &Client, sql: &str) -> Result<i64> {
    Ok(c.query_one(sql, &[]).await?.get(0))
}

/// 5,000 rows (about 155 kB) of COPY text format, with escapes, non-ASCII text and
/// a NULL: enough to span many protocol messages and relay reads.
fn copy_rows() -> Vec<u8> {
    let mut s = String::new();
    for i in 1000..6000 {
        let name = if i == 1042 {
            "\\N".to_owned()
        } else {
            format!("row-{i}-\u{e9}\\ttab\\\\slash")
        };
        s.push_str(&format!("{i}\t{name}\t{}\n", i % 7));
    }
    s.into_bytes()
}

async fn run() -> Result<()> {
    let expect_db = env("EXPECT_DB")?;
    let (mut conn, _) = connect().await?;

    let n = count(&conn, "SELECT count(*) FROM items").await?;
    check!(
        n == 3,
        "source table items: expected 3 rows in the clone, got {n}"
    );
    ok("clone has the source's rows");

    conn.batch_execute(
        "DROP TABLE IF EXISTS drv_items;
         CREATE TABLE drv_items (id int PRIMARY KEY, name text, qty int);
         INSERT INTO drv_items VALUES (1, 'one', 10), (2, 'two', 20), (3, 'three', 30);",
    )
    .await?;
    let n = count(&conn, "SELECT count(*) FROM drv_items").await?;
    check!(n == 3, "after insert: expected 3 rows, got {n}");
    ok("create table and insert");

    let ins = conn
        .prepare("INSERT INTO drv_items VALUES ($1, $2, $3)")
        .await?;
    for i in 4..=6i32 {
        let name = format!("n{i}");
        let done = conn.execute(&ins, &[&i, &name, &(i * 10)]).await?;
        check!(done == 1, "prepared insert id={i} inserted {done} rows");
    }
    let sel = conn
        .prepare("SELECT name FROM drv_items WHERE id = $1")
        .await?;
    for _ in 0..2 {
        for (i, want) in [(1i32, "one"), (2, "two"), (5, "n5")] {
            let got: String = conn.query_one(&sel, &[&i]).await?.get(0);
            check!(
                got == want,
                "prepared select id={i}: expected {want}, got {got}"
            );
        }
    }
    let prepared = count(
        &conn,
        "SELECT count(*) FROM pg_prepared_statements WHERE NOT from_sql",
    )
    .await?;
    check!(
        prepared >= 2,
        "expected >= 2 protocol-level prepared statements, got {prepared}"
    );
    ok(&format!("prepared statements ({prepared} server-side)"));

    let tx = conn.transaction().await?;
    tx.execute("INSERT INTO drv_items VALUES (100, 'tx', 1)", &[])
        .await?;
    let n: i64 = tx
        .query_one("SELECT count(*) FROM drv_items", &[])
        .await?
        .get(0);
    check!(n == 7, "inside transaction: expected 7 rows, got {n}");
    tx.rollback().await?;
    let n = count(&conn, "SELECT count(*) FROM drv_items WHERE id = 100").await?;
    check!(
        n == 0,
        "row inserted in a rolled-back transaction is still there"
    );
    let n = count(&conn, "SELECT count(*) FROM drv_items").await?;
    check!(n == 6, "after rollback: expected 6 rows, got {n}");
    ok("transaction rollback");

    let data = copy_rows();
    let sink = conn
        .copy_in::<_, Bytes>("COPY drv_items (id, name, qty) FROM STDIN")
        .await?;
    futures_util::pin_mut!(sink);
    sink.send(Bytes::from(data.clone())).await?;
    let copied = sink.finish().await?;
    check!(
        copied == 5000,
        "COPY FROM STDIN: expected 5000 rows, got {copied}"
    );
    let stream = conn
        .copy_out(
            "COPY (SELECT id, name, qty FROM drv_items WHERE id >= 1000 ORDER BY id) TO STDOUT",
        )
        .await?;
    futures_util::pin_mut!(stream);
    let mut out = Vec::new();
    while let Some(chunk) = stream.try_next().await? {
        out.extend_from_slice(&chunk);
    }
    check!(
        out == data,
        "COPY round trip differs: sent {} bytes, got {}",
        data.len(),
        out.len()
    );
    let n = count(&conn, "SELECT count(*) FROM drv_items WHERE name IS NULL").await?;
    check!(n == 1, "COPY NULL: expected 1 NULL name, got {n}");
    ok("COPY FROM STDIN / TO STDOUT round trip");

    let (listener, mut notes) = connect().await?;
    listener.batch_execute("LISTEN drv_chan").await?;
    let payload = "payload-rust-\u{e9}";
    conn.execute("SELECT pg_notify('drv_chan', $1)", &[&payload])
        .await?;
    let got = tokio::time::timeout(Duration::from_secs(5), notes.recv()).await;
    check!(
        matches!(&got, Ok(Some((ch, p))) if ch == "drv_chan" && p == payload),
        "LISTEN/NOTIFY: expected {payload:?} on drv_chan within 5s, got {got:?}"
    );
    ok("LISTEN/NOTIFY");

    // cancel_query sends a protocol CancelRequest with the key the proxy issued.
    let (victim, _) = connect().await?;
    let token = victim.cancel_token();
    let canceller = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let running = count(
                &listener,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND state = 'active' AND query = 'SELECT pg_sleep(30)'",
            )
            .await?;
            if running > 0 {
                token.cancel_query(NoTls).await?;
                return Ok(true);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Result::Ok(false)
    });
    let start = Instant::now();
    let res = victim.batch_execute("SELECT pg_sleep(30)").await;
    let elapsed = start.elapsed();
    let sent = canceller.await??;
    check!(
        sent,
        "cancel: pg_sleep(30) never showed up in pg_stat_activity"
    );
    match res {
        Ok(()) => check!(
            false,
            "cancel: pg_sleep(30) finished without being cancelled"
        ),
        Err(e) => check!(
            e.code() == Some(&SqlState::QUERY_CANCELED),
            "cancel: expected SQLSTATE 57014, got {e:?}"
        ),
    }
    check!(
        elapsed < Duration::from_secs(10),
        "cancel took {:.1}s (limit 10s)",
        elapsed.as_secs_f64()
    );
    let n = count(&victim, "SELECT 1::int8").await?;
    check!(n == 1, "session unusable after cancel");
    ok(&format!(
        "cancel (57014 after {:.1}s)",
        elapsed.as_secs_f64()
    ));

    let db: String = conn
        .query_one("SELECT current_database()::text", &[])
        .await?
        .get(0);
    check!(
        db == expect_db,
        "current_database(): expected {expect_db}, got {db}"
    );
    ok(&format!("current_database() = {db}"));
    Ok(())
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        match e.downcast_ref::<tokio_postgres::Error>() {
            Some(pg) => eprintln!(
                "FAIL: {pg} (SQLSTATE {})",
                pg.code().map(|c| c.code()).unwrap_or("none")
            ),
            None => eprintln!("FAIL: {e}"),
        }
        std::process::exit(1);
    }
}
