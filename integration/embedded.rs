//! The shipped demo path: a managed local PostgreSQL, seeded, stopped on SIGTERM and
//! reused by the next start.

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_server_is_made_seeded_stopped_and_reused() {
    let mut proxy = ProxyProc::start(
        "[sources.shop]\nseed_demo = true\n[embedded]\nsettings = { fsync = \"off\" }\n",
    );
    let data = proxy.dir.path().join("state/pg");
    assert!(
        data.join("PG_VERSION").exists(),
        "initdb ran under state.dir"
    );
    assert!(proxy.log().contains("offshoot is ready"), "{}", proxy.log());

    let c = proxy.connect("shop.demo").await.unwrap();
    let orders: i64 = c
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(orders, 5000, "the demo shop is seeded");
    c.execute("DELETE FROM order_items", &[]).await.unwrap();
    drop(c);

    // SIGTERM stops the server too.
    assert!(proxy.terminate());
    let pid_file = data.join("postmaster.pid");
    assert!(!pid_file.exists(), "the embedded server was stopped");

    // The next start reuses the data directory: the branch and its write survive.
    proxy.restart();
    assert!(
        proxy
            .log()
            .matches("initialised embedded PostgreSQL")
            .count()
            == 1
    );
    let c = proxy.connect("shop.demo").await.unwrap();
    let items: i64 = c
        .query_one("SELECT count(*) FROM order_items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(items, 0, "the branch kept its own write");
    let other = proxy.connect("shop.other").await.unwrap();
    let items: i64 = other
        .query_one("SELECT count(*) FROM order_items", &[])
        .await
        .unwrap()
        .get(0);
    assert!(items > 10_000, "a new branch starts from the seeded source");
    assert!(proxy.terminate());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_source_copies_the_embedded_server() {
    let mut proxy = ProxyProc::start(
        "[sources.shop]\nseed_demo = true\n\
         [sources.shop_full]\nengine = \"instance\"\ndatabase = \"shop\"\nseed_demo = true\n\
         [embedded]\nsettings = { fsync = \"off\" }\n",
    );
    let c = proxy.connect("shop_full.demo").await.unwrap();
    let orders: i64 = c
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(orders, 5000, "the snapshot holds the seeded shop");
    let dir: String = c
        .query_one("SHOW data_directory", &[])
        .await
        .unwrap()
        .get(0);
    assert!(dir.contains("instances/shop_full/branches/demo"), "{dir}");
    assert!(proxy.terminate());
}
