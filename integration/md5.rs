//! Roles whose stored password is an md5 hash (clusters upgraded from older
//! releases): they log in under a source's `auth_method = "md5"`, as with
//! PostgreSQL's own `md5` method, and the proxy answers the branch server's md5
//! challenge from the stored hash.

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_roles_log_in_where_the_source_opts_in() {
    let pg = PgServer::start_with(&[
        "local all all trust",
        "host all postgres 127.0.0.1/32 trust",
        // md5 in pg_hba also lets SCRAM-stored roles use SCRAM, as here.
        "host all all 127.0.0.1/32 md5",
    ]);
    pg.make_source("shop").await;
    pg.make_source("modern").await;
    for db in ["shop", "modern"] {
        pg.direct(db)
            .await
            .batch_execute("GRANT SELECT ON items TO PUBLIC")
            .await
            .unwrap();
    }
    pg.direct("postgres")
        .await
        .batch_execute(
            "SET password_encryption = 'md5';
             CREATE ROLE old LOGIN PASSWORD 'old-secret';
             SET password_encryption = 'scram-sha-256';
             CREATE ROLE app LOGIN PASSWORD 'app-secret';",
        )
        .await
        .unwrap();
    let proxy = ProxyProc::start(&format!(
        "[auth]\n{}{}",
        source("shop", &pg, "auth_method = \"md5\""),
        source("modern", &pg, "")
    ));
    let url = |user: &str, password: &str, db: &str| {
        format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname={db}",
            proxy.port
        )
    };

    // An md5 role: the md5 challenge at the proxy, then the branch server's own
    // md5 challenge answered from the stored hash.
    let c = connect(&url("old", "old-secret", "shop.m1"))
        .await
        .expect("an md5 role logs in");
    let row = c
        .query_one("SELECT current_user::text, count(*) FROM items", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "old");
    assert_eq!(row.get::<_, i64>(1), 3);
    // A SCRAM role on the same source still uses SCRAM.
    connect(&url("app", "app-secret", "shop.m1"))
        .await
        .expect("a SCRAM role on an md5 source");

    // Failures look like every other failure.
    for (user, password) in [("old", "wrong"), ("ghost", "old-secret")] {
        let e = connect(&url(user, password, "shop.m1"))
            .await
            .err()
            .unwrap();
        assert_eq!(sqlstate(&e), "28P01", "{user}");
    }
    // Where the source did not opt in, an md5 role cannot log in through SCRAM.
    let e = connect(&url("old", "old-secret", "modern.m1"))
        .await
        .err()
        .unwrap();
    assert_eq!(sqlstate(&e), "28P01");
}
