//! Routing, isolation, and the errors a client sees when a name does not resolve.

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branches_are_isolated_from_each_other_and_the_source() {
    let Fixture { pg, proxy } = Fixture::start(Engine::Database, "").await;

    let a = proxy.connect("shop.pr-1").await.unwrap();
    let b = proxy.connect("shop.pr-2").await.unwrap();
    a.execute("INSERT INTO items VALUES (4, 'only in pr-1')", &[])
        .await
        .unwrap();
    b.execute("DELETE FROM items WHERE id = 1", &[])
        .await
        .unwrap();

    assert_eq!(count(&a).await, 4);
    assert_eq!(count(&b).await, 2);
    let src = pg.direct("shop").await;
    assert_eq!(count(&src).await, 3, "the source is untouched");
    drop(src);

    // Each session really is on its own database.
    let db: String = a
        .query_one("SELECT current_database()::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(db, "shop__pr-1");
    let dbs = pg.databases().await;
    assert!(dbs.contains(&"shop__pr-1".to_string()), "{dbs:?}");
    assert!(dbs.contains(&"shop__pr-2".to_string()), "{dbs:?}");

    // A second connection to pr-1 sees pr-1's write: same branch, not a new clone.
    let a2 = proxy.connect("shop.pr-1").await.unwrap();
    assert_eq!(count(&a2).await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_do_not_resolve_are_refused_and_nothing_is_created() {
    let Fixture { pg, proxy } = Fixture::start(Engine::Database, "max_branches = 2").await;
    let before = pg.databases().await;

    let err = proxy.connect("nosuch.pr-1").await.unwrap_err();
    assert_eq!(sqlstate(&err), "3D000");
    let msg = err.as_db_error().unwrap().message().to_owned();
    assert!(msg.contains("nosuch") && msg.contains("shop"), "{msg}");

    for bad in [
        "shop.PR-1",
        "shop.-x",
        "shop.",
        "'shop.a b'",
        &format!("shop.{}", "x".repeat(41)),
    ] {
        let err = proxy.connect(bad).await.unwrap_err();
        assert_eq!(sqlstate(&err), "3D000", "{bad}");
        let msg = err.as_db_error().unwrap().message().to_owned();
        assert!(msg.contains("lowercase letters"), "{bad}: {msg}");
    }

    // The source itself is never reachable through the proxy.
    let err = proxy.connect("shop").await.unwrap_err();
    assert_eq!(sqlstate(&err), "3D000");
    assert!(err
        .as_db_error()
        .unwrap()
        .message()
        .contains("shop.<branch>"));

    assert_eq!(pg.databases().await, before, "no database was created");

    // Quota: the third branch is refused with 53400, naming the limit.
    proxy.connect("shop.q1").await.unwrap();
    proxy.connect("shop.q2").await.unwrap();
    let err = proxy.connect("shop.q3").await.unwrap_err();
    assert_eq!(sqlstate(&err), "53400");
    assert!(err
        .as_db_error()
        .unwrap()
        .message()
        .contains("max_branches"));
    assert!(!pg.databases().await.contains(&"shop__q3".to_string()));
    // The proxy still serves everyone else.
    proxy.connect("shop.q1").await.unwrap();
    assert!(proxy.metric("offshoot_errors_total{kind=\"routing\"}") >= 7.0);
    assert_eq!(proxy.metric("offshoot_errors_total{kind=\"quota\"}"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_branch_and_user_routing() {
    let Fixture { pg: _pg, proxy } = Fixture::start_with(
        Engine::Database,
        "route_by = \"user\"\nseparator = \"@\"\n",
        "default_branch = \"main\"",
    )
    .await;
    // user "postgres@pr-7" → role postgres on branch pr-7 of source shop.
    let c = connect(&proxy.url_as("postgres@pr-7", "shop"))
        .await
        .unwrap();
    let row = c
        .query_one("SELECT current_database()::text, current_user::text", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "shop__pr-7");
    assert_eq!(row.get::<_, String>(1), "postgres");
    // No branch in the user name: the source's default branch.
    let c = connect(&proxy.url_as("postgres", "shop")).await.unwrap();
    let db: String = c
        .query_one("SELECT current_database()::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(db, "shop__main");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_still_authenticates_every_client() {
    // The proxy checks nobody (`auth.method = "trust"`); the server asks `app` for
    // its SCRAM password.
    let Fixture { pg: _pg, proxy } =
        Fixture::over(crate::auth::scram_server().await, Engine::Database, "", "");

    let wrong = format!("{} password=wrong", proxy.url_as("app", "shop.auth"));
    let err = connect(&wrong).await.unwrap_err();
    assert_eq!(sqlstate(&err), "28P01");

    let right = format!("{} password=app-secret", proxy.url_as("app", "shop.auth"));
    let c = connect(&right).await.unwrap();
    let who: String = c
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, "app");
}
