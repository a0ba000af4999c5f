//! The version matrix: `.ci/run` runs a part of this suite once per PostgreSQL major,
//! with `OFFSHOOT_TEST_PG_BIN` naming that major's binaries and
//! `OFFSHOOT_TEST_PG_MAJOR` the major it expects. This test proves the run really
//! talked to that major, both directly and through the proxy (a clone is made on
//! the server under test).

use crate::harness::*;

#[tokio::test]
async fn the_servers_under_test_are_the_expected_major() {
    let Fixture { pg, proxy } = Fixture::start(Engine::Database, "").await;
    let direct = pg.direct("postgres").await;
    let via_proxy = proxy
        .connect("shop.pr-1")
        .await
        .expect("connect through the proxy");
    let num = |row: tokio_postgres::Row| row.get::<_, String>(0).parse::<u32>().unwrap();
    let direct_num = num(direct
        .query_one("SHOW server_version_num", &[])
        .await
        .unwrap());
    let proxied_num = num(via_proxy
        .query_one("SHOW server_version_num", &[])
        .await
        .unwrap());
    assert_eq!(
        direct_num, proxied_num,
        "the proxy routed to another server"
    );
    match std::env::var("OFFSHOOT_TEST_PG_MAJOR") {
        Ok(major) if !major.is_empty() => {
            let major: u32 = major.parse().expect("OFFSHOOT_TEST_PG_MAJOR is a number");
            assert_eq!(
                direct_num / 10_000,
                major,
                "server_version_num {direct_num}"
            );
        }
        // Without a pinned major, the default binaries are whatever is installed.
        _ => assert!(direct_num >= 150_000, "server_version_num {direct_num}"),
    }
}

/// The `instance` engine from a stopped data directory: the way it runs on majors
/// whose `pg_basebackup` is not installed. Each branch runs a server of the major
/// under test, on its own copy.
#[tokio::test]
async fn an_instance_source_copies_a_stopped_data_directory() {
    let pg = PgServer::start();
    pg.make_source("shop").await;
    let direct = pg.direct("shop").await;
    let rows = count(&direct).await;
    assert!(rows > 0, "the source has rows to tell branches apart by");
    let version: String = direct
        .query_one("SHOW server_version_num", &[])
        .await
        .unwrap()
        .get(0);
    drop(direct);
    pg.cluster.stop().expect("stop the source server");
    let proxy = ProxyProc::start(&format!(
        "[sources.shop]\nengine = \"instance\"\ndata_dir = \"{}\"\n\
         database = \"shop\"\nshared_buffers = \"16MB\"\n",
        pg.cluster.data.display()
    ));
    let a = proxy.connect("shop.a").await.expect("first branch");
    let b = proxy.connect("shop.b").await.expect("second branch");
    a.batch_execute("DELETE FROM items").await.unwrap();
    assert_eq!(count(&a).await, 0);
    assert_eq!(count(&b).await, rows, "branches share nothing");
    let branch_version: String = b
        .query_one("SHOW server_version_num", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        branch_version, version,
        "the branch runs the source's major"
    );
    let mut dirs = Vec::new();
    for c in [&a, &b] {
        let d: String = c
            .query_one("SHOW data_directory", &[])
            .await
            .unwrap()
            .get(0);
        dirs.push(std::path::PathBuf::from(d));
    }
    assert_ne!(dirs[0], dirs[1], "each branch has its own server");
    for d in &dirs {
        assert_ne!(
            d, &pg.cluster.data,
            "a branch never runs on the source's files"
        );
    }
}

/// `clone_strategy` on the server under test: `auto` clones files on 18 and later
/// (`STRATEGY FILE_COPY` with `file_copy_method = clone`) and copies them on 15–17;
/// `wal_log` is taken as asked. The mode is on each branch, in `/api/v1/sources`, and
/// in `offshoot_clones_total`.
#[tokio::test]
async fn database_clones_use_the_strategy_the_server_has() {
    let pg = PgServer::start();
    pg.make_source("shop").await;
    pg.make_source("logs").await;
    let proxy = ProxyProc::start(&format!(
        "{}{}",
        source("shop", &pg, ""),
        source("logs", &pg, "clone_strategy = \"wal_log\"")
    ));
    let version: String = pg
        .direct("postgres")
        .await
        .query_one("SHOW server_version_num", &[])
        .await
        .unwrap()
        .get(0);
    let version: u32 = version.parse().unwrap();
    let expected = if version >= 180_000 {
        "file_clone"
    } else {
        "file_copy"
    };
    for db in ["shop.a", "logs.a"] {
        let c = proxy.connect(db).await.expect("a new branch");
        c.query_one("SELECT 1", &[]).await.unwrap();
    }
    let branches = proxy.branches();
    let mode = |src: &str| {
        branches
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["source"] == src)
            .unwrap_or_else(|| panic!("no branch of {src} in {branches}"))["copy_mode"]
            .clone()
    };
    assert_eq!(mode("shop"), expected, "server_version_num {version}");
    assert_eq!(mode("logs"), "wal_log");
    let (status, body) = proxy.api("GET", "/api/v1/sources", None);
    assert_eq!(status, 200, "{body}");
    let sources: serde_json::Value = serde_json::from_str(&body).unwrap();
    let shop = sources
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "shop")
        .unwrap();
    assert_eq!(shop["clone_strategy"], "auto");
    assert_eq!(shop["copy_mode"], expected);
    assert_eq!(
        proxy.metric(&format!(
            "offshoot_clones_total{{mode=\"{expected}\",source=\"shop\"}}"
        )),
        1.0
    );
}
