//! Faults from outside the proxy: a backend killed mid-query, the server restarted,
//! the proxy killed in the middle of a creation, a full disk, a client that vanishes
//! mid-transaction, and SIGTERM with sessions still open.
//!
//! Real processes, real servers, real clients; every wait is bounded, so a fault the
//! proxy mishandles fails the test instead of hanging it.

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::{Pid, Uid, User};
use tempfile::TempDir;
use tokio_postgres::{Client, NoTls};

use crate::harness::*;

/// Polls `f` every 100 ms until it is true or `secs` pass: [`eventually`] for checks
/// that need a database round trip.
async fn until<F, Fut>(secs: u64, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if f().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The pid of the server session running exactly `query`; panics after 10 s.
async fn active_backend(pg: &PgServer, query: &str) -> i32 {
    let c = pg.direct("postgres").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let row = c
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE query = $1 AND state = 'active'",
                &[&query],
            )
            .await
            .unwrap();
        if let Some(row) = row {
            return row.get(0);
        }
        assert!(Instant::now() < deadline, "no session is running {query:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Server sessions whose `column` (of pg_stat_activity) is `value`.
async fn sessions(observer: &Client, column: &str, value: &str) -> i64 {
    observer
        .query_one(
            &format!(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE {column} = $1 AND pid <> pg_backend_pid()"
            ),
            &[&value],
        )
        .await
        .unwrap()
        .get(0)
}

/// Waits (at most 10 s) until nobody is connected to `db`: a session there makes
/// every clone of it fail with 55006.
async fn wait_until_unused(pg: &PgServer, db: &str) {
    let observer = pg.direct("postgres").await;
    let observer = &observer;
    assert!(
        until(10, || async move {
            sessions(observer, "datname", db).await == 0
        })
        .await,
        "sessions on {db} did not end"
    );
}

/// Open connections the proxy counts for `branch` of source `shop`.
fn connections(proxy: &ProxyProc, branch: &str) -> Option<u64> {
    proxy
        .branch(branch)
        .map(|b| b["connections"].as_u64().unwrap())
}

/// The proxy stops counting sessions that ended, whichever side ended them.
async fn assert_no_connections_counted(proxy: &ProxyProc) {
    assert!(
        eventually(10, || proxy
            .branches()
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["connections"] == 0))
        .await,
        "dead sessions still counted: {}",
        proxy.branches()
    );
}

/// Whether a fresh connection through the proxy to `db` can run a query.
async fn usable(proxy: &ProxyProc, db: &str) -> bool {
    match proxy.connect(db).await {
        Ok(c) => try_count(&c).await.is_ok(),
        Err(_) => false,
    }
}

/// Adds table `bulk` to the source: about 20 MB, so a clone is a real copy.
async fn add_bulk(pg: &PgServer, rows: i32, tablespace: Option<&str>) {
    let c = pg.direct("shop").await;
    let ts = tablespace.map_or(String::new(), |t| format!(" TABLESPACE {t}"));
    c.batch_execute(&format!(
        "CREATE TABLE bulk (id int, pad text){ts}; \
         INSERT INTO bulk SELECT g, md5(g::text) || repeat('x', 100) \
         FROM generate_series(1, {rows}) g;"
    ))
    .await
    .unwrap();
}

/// A digest of every row of the test tables, to compare a clone with its source.
async fn digest(c: &Client) -> String {
    c.query_one(
        "SELECT (SELECT md5(string_agg(id || ':' || pad, ',' ORDER BY id)) FROM bulk) \
         || '/' || (SELECT md5(string_agg(id || ':' || note, ',' ORDER BY id)) FROM items)",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

// ---------------------------------------------------------------------------------
// 1. A backend killed mid-query.

const VICTIM_QUERY: &str = "SELECT pg_sleep(30) /* victim */";

/// Three sessions through the proxy: the victim and its sibling on branch `a`, a
/// neighbour on branch `b`. The victim is running [`VICTIM_QUERY`].
struct Victim {
    /// The victim's query, still running.
    sleeping: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    /// The server process running it.
    pid: i32,
    sibling: Client,
    neighbour: Client,
}

impl Victim {
    async fn start(pg: &PgServer, proxy: &ProxyProc) -> Self {
        let victim = proxy.connect("shop.a").await.unwrap();
        let sibling = proxy.connect("shop.a").await.unwrap();
        let neighbour = proxy.connect("shop.b").await.unwrap();
        let sleeping =
            tokio::spawn(async move { victim.simple_query(VICTIM_QUERY).await.map(drop) });
        let pid = active_backend(pg, VICTIM_QUERY).await;
        Self {
            sleeping,
            pid,
            sibling,
            neighbour,
        }
    }
}

/// The error the victim's query ends with, within 5 s.
async fn victim_fails(
    sleeping: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) -> tokio_postgres::Error {
    tokio::time::timeout(Duration::from_secs(5), sleeping)
        .await
        .expect("the victim hears of it promptly")
        .unwrap()
        .expect_err("the victim's query cannot succeed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_backend_fails_only_its_own_client() {
    let Fixture { pg, proxy } = Fixture::start(Engine::Database, "").await;
    let v = Victim::start(&pg, &proxy).await;

    let admin = pg.direct("postgres").await;
    let signalled: bool = admin
        .query_one("SELECT pg_terminate_backend($1)", &[&v.pid])
        .await
        .unwrap()
        .get(0);
    assert!(signalled);
    let err = victim_fails(v.sleeping).await;
    // The server's own FATAL reaches the client through the relay.
    assert_eq!(sqlstate(&err), "57P01", "{err}");

    // Another session on the same branch and a session on another branch carry on.
    assert_eq!(count(&v.sibling).await, 3);
    assert_eq!(count(&v.neighbour).await, 3);
    let again = proxy.connect("shop.a").await.unwrap();
    assert_eq!(count(&again).await, 3);
    // The victim's connection is no longer counted (it would keep the branch alive).
    assert!(
        eventually(10, || connections(&proxy, "a") == Some(2)).await,
        "{}",
        proxy.branches()
    );
    assert_eq!(connections(&proxy, "b"), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_with_sigkill_ends_every_session_and_the_proxy_recovers() {
    let Fixture { pg, proxy } = Fixture::start(Engine::Database, "").await;
    let v = Victim::start(&pg, &proxy).await;

    kill(Pid::from_raw(v.pid), Signal::SIGKILL).unwrap();
    victim_fails(v.sleeping).await;

    // A crashed backend makes the postmaster end every session and reinitialize:
    // the other clients lose their sessions too, by PostgreSQL's doing.
    for (name, c) in [("sibling", &v.sibling), ("neighbour", &v.neighbour)] {
        assert!(
            until(
                10,
                || async move { c.simple_query("SELECT 1").await.is_err() }
            )
            .await,
            "{name}'s session should have been ended by the crash restart"
        );
    }
    // Once the server is back, the same proxy serves existing branches and makes new
    // ones (its administrative session reconnects).
    let proxy = &proxy;
    for db in ["shop.a", "shop.b", "shop.c"] {
        assert!(
            until(30, || usable(proxy, db)).await,
            "{db} unusable after the crash restart"
        );
    }
    drop((v.sibling, v.neighbour));
    assert_no_connections_counted(proxy).await;
}

// ---------------------------------------------------------------------------------
// 2. The server restarted under the proxy.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_branches_work_after_the_server_restarts() {
    let Fixture { pg, proxy } = Fixture::start(Engine::Database, "").await;
    let idle = proxy.connect("shop.a").await.unwrap();
    idle.batch_execute("INSERT INTO items VALUES (4, 'four')")
        .await
        .unwrap();
    let busy = proxy.connect("shop.b").await.unwrap();
    let sleeping = tokio::spawn(async move { busy.simple_query(VICTIM_QUERY).await.map(drop) });
    active_backend(&pg, VICTIM_QUERY).await;

    let mut restart = pg.cluster.bin.command("pg_ctl");
    restart
        .args(["restart", "-m", "fast", "-w", "-t", "60", "-D"])
        .arg(&pg.cluster.data)
        .arg("-l")
        .arg(pg.cluster.data.with_extension("log"));
    let restarted = tokio::task::spawn_blocking(move || restart.output());
    let err = tokio::time::timeout(Duration::from_secs(15), sleeping)
        .await
        .expect("the busy session hears of the shutdown promptly")
        .unwrap()
        .expect_err("a query cannot outlive a fast shutdown");
    assert_eq!(sqlstate(&err), "57P01", "{err}");
    let out = restarted.await.unwrap().unwrap();
    assert!(
        out.status.success(),
        "pg_ctl restart: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let idle = &idle;
    assert!(
        until(10, || async move {
            idle.simple_query("SELECT 1").await.is_err()
        })
        .await,
        "the idle session survived a server restart"
    );

    // Same proxy process, no restart: existing branches (with their data) and new ones.
    let proxy = &proxy;
    assert!(
        until(30, || usable(proxy, "shop.b")).await,
        "{}",
        proxy.log()
    );
    let a = proxy.connect("shop.a").await.unwrap();
    assert_eq!(count(&a).await, 4);
    let c = proxy.connect("shop.c").await.unwrap();
    assert_eq!(count(&c).await, 3);
    drop((a, c));
    assert_no_connections_counted(proxy).await;
}

// ---------------------------------------------------------------------------------
// 3. The proxy killed with -9 in the middle of a creation.

/// A creation of `shop.crash` caught in flight and interrupted by `kill -9`.
struct Interrupted {
    pg: PgServer,
    proxy: ProxyProc,
    /// Holds the lock that keeps the dead proxy's CREATE DATABASE waiting; ROLLBACK lets
    /// it finish.
    holder: Client,
    /// [`digest`] of the source.
    source_digest: String,
}

/// CREATE DATABASE sessions for clone `shop__crash`, as pg_stat_activity shows them.
async fn creating(pg: &PgServer) -> i64 {
    pg.direct("postgres")
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE query LIKE 'CREATE DATABASE %' AND position('shop__crash' in query) > 0",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

async fn interrupt_a_creation() -> Interrupted {
    let Fixture { pg, mut proxy } = Fixture::start(Engine::Database, "").await;
    add_bulk(&pg, 120_000, None).await;
    let source_digest = digest(&pg.direct("shop").await).await;
    wait_until_unused(&pg, "shop").await;

    // Timing cannot catch a creation reliably, a lock can: COMMENT ON DATABASE takes a
    // ShareUpdateExclusiveLock on the database until commit, and CREATE DATABASE waits
    // for its ShareLock on the template.
    let holder = pg.direct("postgres").await;
    holder
        .batch_execute("BEGIN; COMMENT ON DATABASE shop IS 'held by a fault test'")
        .await
        .unwrap();
    let url = proxy.url("shop.crash");
    let connecting = tokio::spawn(async move { connect(&url).await.map(drop) });
    let record = proxy.dir.path().join("state/branches/shop/crash.json");
    let pg_ref = &pg;
    let record_ref = &record;
    let caught = until(15, || async move {
        let provisioning =
            std::fs::read_to_string(record_ref).is_ok_and(|r| r.contains("\"provisioning\""));
        provisioning && creating(pg_ref).await == 1
    })
    .await;
    assert!(caught, "creation not caught in flight:\n{}", proxy.log());

    proxy.kill9();
    tokio::time::timeout(Duration::from_secs(5), connecting)
        .await
        .expect("the waiting client hears promptly that the proxy died")
        .unwrap()
        .expect_err("no session without a proxy");
    assert!(record.exists(), "the record outlives the crash");
    Interrupted {
        pg,
        proxy,
        holder,
        source_digest,
    }
}

/// The branch is adopted: one clone, carrying the marker, listed, with the source's
/// data, and nothing reported as an orphan.
async fn assert_adopted(f: &Interrupted) {
    let c = f
        .proxy
        .connect("shop.crash")
        .await
        .expect("the branch is usable on the next connect");
    assert_eq!(
        digest(&c).await,
        f.source_digest,
        "the clone equals the source"
    );
    assert_eq!(
        db_comment(&f.pg, "shop__crash").await.as_deref(),
        Some("offshoot:shop/crash"),
        "the proxy owns (marked) the clone"
    );
    assert_eq!(f.proxy.branch_names(), vec!["crash"]);
    assert_eq!(f.proxy.branches()[0]["state"], "ready");
    let (status, orphans) = f.proxy.api("GET", "/api/v1/orphans", None);
    assert_eq!((status, orphans.as_str()), (200, "[]"));
    assert_eq!(clones(&f.pg).await, vec!["shop__crash".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_killed_mid_creation_adopts_the_clone_the_server_finished() {
    let mut f = interrupt_a_creation().await;
    // The server carries on with the dead proxy's CREATE DATABASE once the lock goes.
    f.holder.batch_execute("ROLLBACK").await.unwrap();
    let pg = &f.pg;
    assert!(until(15, || async move { creating(pg).await == 0 }).await);
    assert_eq!(clones(&f.pg).await, vec!["shop__crash".to_string()]);
    assert_eq!(
        db_comment(&f.pg, "shop__crash").await,
        None,
        "not marked yet"
    );

    f.proxy.restart();
    assert_adopted(&f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_restarted_while_the_interrupted_creation_still_runs() {
    let mut f = interrupt_a_creation().await;
    assert_eq!(
        creating(&f.pg).await,
        1,
        "the dead proxy's CREATE DATABASE still runs on the server"
    );
    // The creation goes on for a while after the new proxy has started (a big source
    // copies for minutes; here the lock stays for 3 s). Released from a task, so a
    // proxy that waits for the creation during its start-up does not deadlock.
    let holder = f.holder;
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        holder.batch_execute("ROLLBACK").await.unwrap();
        holder
    });
    f.proxy.restart();
    f.holder = release.await.unwrap();
    let pg = &f.pg;
    assert!(until(15, || async move { creating(pg).await == 0 }).await);

    assert_adopted(&f).await;
}

// ---------------------------------------------------------------------------------
// 4. The disk fills up during a creation.

/// A tmpfs mounted for one test, owned by the `postgres` user; unmounted on drop.
struct Tmpfs {
    dir: TempDir,
}

impl Tmpfs {
    fn mount(size: &str, owner: &User) -> Result<Self, String> {
        let dir = world_readable_tempdir();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!(
                "size={size},mode=0700,uid={},gid={}",
                owner.uid, owner.gid
            ))
            .arg("tmpfs")
            .arg(dir.path())
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Inodes (files and directories) in use.
    fn inodes_used(&self) -> u64 {
        let out = std::process::Command::new("df")
            .args(["--output=iused"])
            .arg(self.path())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .expect("df --output=iused")
    }

    /// Caps the number of files and directories: creating one more fails with ENOSPC.
    fn cap_inodes(&self, n: u64) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,nr_inodes={n}")])
            .arg(self.path())
            .status()
            .unwrap();
        assert!(status.success(), "remount with nr_inodes={n}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let umount = |lazy: bool| {
            let mut cmd = std::process::Command::new("umount");
            if lazy {
                cmd.arg("-l");
            }
            cmd.arg(self.dir.path()).status().is_ok_and(|s| s.success())
        };
        // Lazily if something still has a file open there (a server that did not stop).
        if !umount(false) && !umount(true) {
            eprintln!("could not unmount {}", self.dir.path().display());
        }
    }
}

/// A 40 MB disk holding the source's 17 MB table `bulk` (tablespace `small`), a proxy,
/// and branch `fits`, whose copy of `bulk` just fitted beside it. Fields drop in
/// order: the disk is unmounted after the server has stopped.
struct SmallDisk {
    proxy: ProxyProc,
    fits: Client,
    admin: Client,
    pg: PgServer,
    disk: Tmpfs,
}

const BULK_ROWS: i64 = 100_000;

/// `None` where a tmpfs cannot be mounted, after [`skip`] said why (under CI that
/// fails the test instead).
async fn small_disk(test: &str) -> Option<SmallDisk> {
    if !Uid::effective().is_root() {
        skip(test, "mounting a small tmpfs needs root");
        return None;
    }
    let owner = User::from_name("postgres").unwrap().expect("postgres user");
    let disk = match Tmpfs::mount("40m", &owner) {
        Ok(d) => d,
        Err(e) => {
            skip(test, &format!("cannot mount a tmpfs here: {}", e.trim()));
            return None;
        }
    };
    let pg = PgServer::start();
    pg.make_source("shop").await;
    let admin = pg.direct("postgres").await;
    admin
        .batch_execute(&format!(
            "CREATE TABLESPACE small LOCATION '{}'",
            disk.path().display()
        ))
        .await
        .unwrap();
    add_bulk(&pg, BULK_ROWS as i32, Some("small")).await;
    wait_until_unused(&pg, "shop").await;
    // One copy of the source's table fits beside it on the 40 MB disk; two do not.
    let one = tablespace_size(&admin).await;
    let disk_size = 40 << 20;
    assert!(2 * one < disk_size && 3 * one > disk_size, "{one} bytes");

    let Fixture { proxy, pg } = Fixture::over(pg, Engine::Database, "", "");
    let fits = proxy.connect("shop.fits").await.unwrap();
    let rows: i64 = fits
        .query_one("SELECT count(*) FROM bulk", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, BULK_ROWS);
    Some(SmallDisk {
        proxy,
        fits,
        admin,
        pg,
        disk,
    })
}

async fn tablespace_size(admin: &Client) -> i64 {
    admin
        .query_one("SELECT pg_tablespace_size('small')", &[])
        .await
        .unwrap()
        .get(0)
}

/// What the proxy must leave after a failed creation of `shop.full`: no clone, no
/// record, the branch list as it was, no file of the failed copy (the tablespace
/// still holds `used` bytes, the disk `inodes` files); and `fits` still serves old
/// and new sessions.
async fn assert_nothing_left(d: &SmallDisk, used: i64, inodes: u64) {
    assert_eq!(clones(&d.pg).await, vec!["shop__fits".to_string()]);
    assert!(!d
        .proxy
        .dir
        .path()
        .join("state/branches/shop/full.json")
        .exists());
    assert_eq!(d.proxy.branch_names(), vec!["fits"]);
    assert_eq!(count(&d.fits).await, 3);
    let again = d.proxy.connect("shop.fits").await.unwrap();
    let rows: i64 = again
        .query_one("SELECT count(*) FROM bulk", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, BULK_ROWS);
    assert_eq!(tablespace_size(&d.admin).await, used, "no files left");
    assert_eq!(d.disk.inodes_used(), inodes, "no files left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_room_for_the_clones_files_fails_with_53100_and_leaves_nothing() {
    let Some(d) = small_disk("no_room_for_the_clones_files").await else {
        return;
    };
    // Bytes are left, but no file or directory can be created any more (ENOSPC).
    let inodes = d.disk.inodes_used();
    d.disk.cap_inodes(inodes);
    let used = tablespace_size(&d.admin).await;

    for attempt in 0..2 {
        let err = d
            .proxy
            .connect("shop.full")
            .await
            .expect_err("no room for another clone");
        let db = err.as_db_error().unwrap_or_else(|| panic!("{err}"));
        assert_eq!(db.code().code(), "53100", "attempt {attempt}: {err}");
        let msg = db.message();
        assert!(
            msg.contains("shop/full") && msg.contains("No space left on device"),
            "the server's reason, naming the branch: {msg}"
        );
        assert_nothing_left(&d, used, inodes).await;
    }
    assert_eq!(
        d.proxy.metric("offshoot_errors_total{kind=\"disk_full\"}"),
        2.0
    );

    // Once there is room again (here: `fits` deleted), the same branch is made.
    let SmallDisk {
        proxy, fits, pg, ..
    } = &d;
    let writes = fits
        .execute("INSERT INTO items VALUES (4, 'four')", &[])
        .await
        .unwrap();
    assert_eq!(writes, 1, "writes outside the full disk go on");
    let (status, body) = proxy.api("DELETE", "/api/v1/branches/shop/fits?force=true", None);
    assert_eq!(status, 204, "{body}");
    let full = proxy.connect("shop.full").await.unwrap();
    let rows: i64 = full
        .query_one("SELECT count(*) FROM bulk", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, BULK_ROWS);
    assert_eq!(clones(pg).await, vec!["shop__full".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_full_mid_copy_reports_the_servers_error_and_leaves_no_branch() {
    let Some(d) = small_disk("a_disk_full_mid_copy").await else {
        return;
    };
    let server_log = d.pg.cluster.data.with_extension("log");
    let used = tablespace_size(&d.admin).await;
    let inodes = d.disk.inodes_used();

    for attempt in 0..2 {
        let err = d
            .proxy
            .connect("shop.full")
            .await
            .expect_err("no room for another copy");
        let db = err.as_db_error().unwrap_or_else(|| panic!("{err}"));
        let msg = db.message();
        let reason = msg
            .strip_prefix("could not create branch shop/full: ")
            .unwrap_or_else(|| panic!("attempt {attempt}: names the branch: {msg}"));
        // The client gets the server's own error, SQLSTATE and words: disk full.
        let log = std::fs::read_to_string(&server_log).unwrap();
        assert!(
            log.contains(&format!("ERROR:  {reason}")),
            "attempt {attempt}: {reason:?} is not what the server said:\n{log}"
        );
        assert_eq!(db.code().code(), "53100", "attempt {attempt}: {err}");
        assert!(
            reason.contains("No space left on device") || reason.contains("wrote only"),
            "{reason}"
        );
        assert_nothing_left(&d, used, inodes).await;
    }
    assert_eq!(
        d.proxy.metric("offshoot_errors_total{kind=\"disk_full\"}"),
        2.0
    );
}

// ---------------------------------------------------------------------------------
// 5. A client that vanishes in the middle of a transaction.

/// Opens a session to `shop.v` on a socket the test controls, takes a row lock in an
/// open transaction, and goes without a Terminate: with a RST if `reset`, else a FIN.
async fn vanish_mid_transaction(reset: bool) {
    let Fixture { pg, proxy } = Fixture::start(Engine::Database, "").await;

    let socket = std::net::TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    socket.set_nonblocking(true).unwrap();
    // A second descriptor of the same socket: the test closes it, not the client.
    let raw = socket.try_clone().unwrap();
    let config: tokio_postgres::Config =
        format!("{} application_name=vanisher", proxy.url("shop.v"))
            .parse()
            .unwrap();
    let (client, connection) = config
        .connect_raw(tokio::net::TcpStream::from_std(socket).unwrap(), NoTls)
        .await
        .unwrap();
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    client
        .batch_execute("BEGIN; UPDATE items SET note = 'uncommitted' WHERE id = 1")
        .await
        .unwrap();

    // The lock is real: another session cannot take the row.
    let other = proxy.connect("shop.v").await.unwrap();
    other
        .batch_execute("SET lock_timeout = '200ms'")
        .await
        .unwrap();
    let err = other
        .execute("UPDATE items SET note = 'other' WHERE id = 1", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "55P03", "{err}");
    let observer = pg.direct("postgres").await;
    assert_eq!(sessions(&observer, "application_name", "vanisher").await, 1);

    // Gone: the socket closes under the client, which never sends Terminate.
    if reset {
        socket2::SockRef::from(&raw)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    }
    connection.abort();
    let _ = connection.await;
    drop(raw);

    let observer = &observer;
    assert!(
        until(10, || async move {
            sessions(observer, "application_name", "vanisher").await == 0
        })
        .await,
        "the vanished client's server session is still there"
    );
    // Its transaction was rolled back and its lock released.
    other
        .batch_execute("SET lock_timeout = '5s'")
        .await
        .unwrap();
    let note: String = other
        .query_one("SELECT note FROM items WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(note, "one");
    let n = other
        .execute("UPDATE items SET note = 'other' WHERE id = 1", &[])
        .await
        .expect("the row lock is released");
    assert_eq!(n, 1);
    assert!(
        eventually(10, || connections(&proxy, "v") == Some(1)).await,
        "the vanished client is still counted: {}",
        proxy.branches()
    );
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reset_mid_transaction_releases_its_session_and_locks() {
    vanish_mid_transaction(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_closed_mid_transaction_releases_its_session_and_locks() {
    vanish_mid_transaction(false).await;
}

// ---------------------------------------------------------------------------------
// 6. SIGTERM with sessions open.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_refuses_new_clients_and_exits_within_the_grace() {
    let Fixture { pg, mut proxy } =
        Fixture::start_with(Engine::Database, "shutdown_grace = \"2s\"\n", "").await;
    let busy = proxy.connect("shop.t").await.unwrap();
    let idle = proxy.connect("shop.t").await.unwrap();
    let sleeping =
        tokio::spawn(async move { busy.simple_query("SELECT pg_sleep(60)").await.map(drop) });
    active_backend(&pg, "SELECT pg_sleep(60)").await;

    let started = Instant::now();
    proxy.sigterm();
    // The listener closes at once: new clients get "connection refused" while the
    // open sessions drain.
    let deadline = started + Duration::from_millis(1500);
    let refused = loop {
        match std::net::TcpStream::connect(("127.0.0.1", proxy.port)) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break true,
            _ if Instant::now() >= deadline => break false,
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    assert!(refused, "new connections still accepted during the drain");
    assert!(
        proxy.try_exit().is_none(),
        "exited before the grace was over"
    );
    // Sessions already open keep working during the grace.
    idle.simple_query("SELECT 1")
        .await
        .expect("open sessions are served during the drain");
    assert!(started.elapsed() < Duration::from_secs(2));

    // The sleeping session outlasts the 2 s grace; the proxy does not wait for it.
    let status = loop {
        if let Some(status) = proxy.try_exit() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "still running 5 s after SIGTERM:\n{}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let took = started.elapsed();
    assert!(status.success(), "{status}\n{}", proxy.log());
    assert!(
        took >= Duration::from_millis(1900),
        "exited after {took:?}, before the 2 s grace, with a session open"
    );
    tokio::time::timeout(Duration::from_secs(3), sleeping)
        .await
        .expect("the remaining session is closed when the proxy exits")
        .unwrap()
        .expect_err("its query cannot complete without the proxy");
    let log = proxy.log();
    assert!(log.contains("shutting down"), "{log}");
    assert!(log.contains("grace period over"), "{log}");
    // The server-side statement is cancelled, not left running unattended.
    let pg = &pg;
    assert!(
        until(10, || async move {
            let c = pg.direct("postgres").await;
            c.query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' \
                 AND state = 'active'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
                == 0
        })
        .await,
        "the abandoned statement still runs"
    );
}
