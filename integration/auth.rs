//! Authentication at the proxy: SCRAM (with and without channel binding), cleartext
//! over TLS, the users file, authorization rules, and that a failed login never
//! makes a branch.

use crate::harness::*;
use crate::protocol::{make_cert, psql};

/// The source's server: `postgres` is trusted over TCP (the proxy's administrative
/// and auth-query connection, and the `instance` engine's base backups), every other
/// role must use SCRAM, as on a real server.
pub async fn scram_server() -> PgServer {
    let pg = PgServer::start_with(&[
        "local all all trust",
        "host all postgres 127.0.0.1/32 trust",
        "host replication postgres 127.0.0.1/32 trust",
        "host all all 127.0.0.1/32 scram-sha-256",
    ]);
    pg.make_source("shop").await;
    let c = pg.direct("shop").await;
    c.batch_execute(
        "SET password_encryption = 'scram-sha-256';
         CREATE ROLE app LOGIN PASSWORD 'app-secret';
         CREATE ROLE other LOGIN PASSWORD 'other-secret';
         CREATE ROLE nologin NOLOGIN PASSWORD 'nologin-secret';
         CREATE ROLE expired LOGIN PASSWORD 'expired-secret' VALID UNTIL '2001-01-01';
         CREATE ROLE nopass LOGIN;
         GRANT SELECT ON items TO app, other;",
    )
    .await
    .unwrap();
    pg
}

fn url(proxy: &ProxyProc, user: &str, password: &str, db: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user={user} password={password} dbname={db}",
        proxy.port
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_logs_in_as_the_same_role_and_every_failure_looks_alike() {
    let Fixture { pg, proxy } =
        Fixture::over(scram_server().await, Engine::Database, "[auth]\n", "");

    // The right password: the session on the clone runs as the client's own role,
    // which the proxy logged in as without knowing the password.
    let c = connect(&url(&proxy, "app", "app-secret", "shop.pr-1"))
        .await
        .expect("SCRAM through the proxy");
    let row = c
        .query_one(
            "SELECT current_user::text, current_database()::text, count(*) FROM items",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "app");
    assert_eq!(row.get::<_, String>(1), "shop__pr-1");
    assert_eq!(row.get::<_, i64>(2), 3);

    // Every failure is one message, so roles cannot be told apart.
    let before = pg.databases().await;
    let cases = [
        ("app", "wrong", "shop.pr-2"),
        ("ghost", "app-secret", "shop.pr-3"),
        ("nopass", "anything", "shop.pr-4"),
        ("expired", "expired-secret", "shop.pr-5"),
        // An unknown source or a bad branch name with a wrong password: the
        // authentication error, not the routing one.
        ("app", "wrong", "nosuch.pr-6"),
        ("app", "wrong", "shop.Bad_Name"),
    ];
    for (user, password, db) in cases {
        let (state, msg) = refused(&url(&proxy, user, password, db)).await;
        assert_eq!(state, "28P01", "{user}/{db}");
        assert_eq!(
            msg,
            format!("password authentication failed for user \"{user}\""),
            "{user}/{db}"
        );
    }
    // The right password for a role without LOGIN: refused as PostgreSQL does.
    let (state, msg) = refused(&url(&proxy, "nologin", "nologin-secret", "shop.pr-7")).await;
    assert_eq!(state, "28000");
    assert!(msg.contains("not permitted to log in"), "{msg}");
    // With the right password, routing errors are what they are.
    let (state, msg) = refused(&url(&proxy, "app", "app-secret", "nosuch.pr-8")).await;
    assert_eq!(state, "3D000", "{msg}");

    // No failed login made a branch: not on the server, not in the registry.
    assert_eq!(pg.databases().await, before);
    assert_eq!(proxy.branch_names(), vec!["pr-1".to_owned()]);
    assert!(proxy.metric("offshoot_errors_total{kind=\"auth_failed\"}") >= 6.0);

    // psql shows the progress notices of a branch made on connect.
    let (ok, out) = psql(
        &url(&proxy, "app", "app-secret", "shop.pr-9"),
        "SELECT count(*) FROM items",
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("NOTICE:  creating branch pr-9 of source shop"),
        "{out}"
    );
    assert!(out.contains("NOTICE:  branch shop/pr-9 ready in"), "{out}");
    assert!(out.contains('3'), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_binding_and_cleartext_over_tls() {
    let pg = scram_server().await;
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = make_cert(certs.path(), "localhost");
    let tls = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let Fixture { pg, proxy } = Fixture::over(pg, Engine::Database, &format!("{tls}[auth]\n"), "");
    let verify = format!(
        "host=localhost port={} user=app password=app-secret sslmode=verify-full sslrootcert={}",
        proxy.port,
        cert.display()
    );

    // SCRAM-SHA-256-PLUS bound to the proxy's certificate.
    let (ok, out) = psql(
        &format!("{verify} dbname=shop.cb channel_binding=require"),
        "SELECT current_user",
    );
    assert!(ok, "{out}");
    assert!(out.contains("app"), "{out}");
    // Without TLS there is nothing to bind to: libpq refuses to go on.
    let (ok, out) = psql(
        &format!(
            "host=127.0.0.1 port={} user=app password=app-secret dbname=shop.cb \
             sslmode=disable channel_binding=require",
            proxy.port
        ),
        "SELECT 1",
    );
    assert!(!ok, "{out}");
    assert!(out.contains("channel binding"), "{out}");
    // A wrong password over TLS with binding fails like any other.
    let (ok, out) = psql(
        &format!(
            "host=localhost port={} user=app password=nope sslmode=verify-full sslrootcert={} \
             dbname=shop.cb channel_binding=require",
            proxy.port,
            cert.display()
        ),
        "SELECT 1",
    );
    assert!(!ok);
    assert!(out.contains("password authentication failed"), "{out}");

    // Cleartext passwords: accepted over TLS only.
    let password = ProxyProc::start(&format!(
        "{tls}[auth]\nmethod = \"password\"\n{}",
        source("shop", &pg, "")
    ));
    let (ok, out) = psql(
        &format!(
            "host=localhost port={} user=app password=app-secret dbname=shop.pw \
             sslmode=verify-full sslrootcert={}",
            password.port,
            cert.display()
        ),
        "SELECT current_user",
    );
    assert!(ok, "{out}");
    assert!(out.contains("app"), "{out}");
    let (state, msg) = refused(&format!(
        "host=127.0.0.1 port={} user=app password=app-secret dbname=shop.pw sslmode=disable",
        password.port
    ))
    .await;
    assert_eq!(state, "28000", "{msg}");
    assert!(msg.contains("TLS"), "{msg}");
    let (ok, out) = psql(
        &format!(
            "host=localhost port={} user=app password=wrong dbname=shop.pw sslmode=require",
            password.port
        ),
        "SELECT 1",
    );
    assert!(!ok);
    assert!(out.contains("password authentication failed"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_quotas_and_the_users_file() {
    let pg = scram_server().await;
    let verifier: String = pg
        .direct("postgres")
        .await
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'other'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users.txt");
    // `other` comes from the file; its auth query is never needed.
    std::fs::write(&users, format!("; roles\n\"other\" \"{verifier}\"\n")).unwrap();
    let Fixture { pg, proxy } = Fixture::over(
        pg,
        Engine::Database,
        &format!("[auth]\nusers_file = \"{}\"\n", users.display()),
        "connect_roles = [\"app\", \"other\"]\ncreate_roles = [\"app\"]\n\
         max_branches_per_role = 2\n",
    );
    let app = |db: &str| url(&proxy, "app", "app-secret", db);

    // `app` may create, up to two branches.
    connect(&app("shop.a1")).await.expect("first branch");
    connect(&app("shop.a2")).await.expect("second branch");
    let (state, msg) = refused(&app("shop.a3")).await;
    assert_eq!(state, "53400", "{msg}");
    assert!(msg.contains("max_branches_per_role"), "{msg}");
    // `other` may connect to an existing branch, not make one.
    let c = connect(&url(&proxy, "other", "other-secret", "shop.a1"))
        .await
        .expect("other connects to an existing branch");
    let who: String = c
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, "other");
    let (state, msg) = refused(&url(&proxy, "other", "other-secret", "shop.o1")).await;
    assert_eq!(state, "42501", "{msg}");
    assert!(msg.contains("create_roles"), "{msg}");
    // A role outside connect_roles gets nothing, even with its right password.
    let c = pg.direct("postgres").await;
    c.batch_execute("CREATE ROLE third LOGIN PASSWORD 'third-secret'")
        .await
        .unwrap();
    let (state, msg) = refused(&url(&proxy, "third", "third-secret", "shop.a1")).await;
    assert_eq!(state, "42501", "{msg}");
    assert!(msg.contains("connect_roles"), "{msg}");

    assert_eq!(proxy.branch_names(), vec!["a1".to_owned(), "a2".to_owned()]);
    let (_, body) = proxy.api("GET", "/api/v1/branches/shop/a1", None);
    assert!(body.contains("\"created_by\":\"app\""), "{body}");
}

/// A CA, a certificate it signed for 127.0.0.1 in the server's data directory, and
/// TLS turned on. Returns the CA certificate.
async fn enable_server_tls(pg: &PgServer, dir: &std::path::Path) -> std::path::PathBuf {
    let ca = dir.join("ca.crt");
    let cert = dir.join("server.crt");
    let key = dir.join("server.key");
    let ext = dir.join("ext.cnf");
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.crt",
    ]);
    let data = &pg.cluster.data;
    for (from, name) in [(&cert, "server.crt"), (&key, "server.key")] {
        std::fs::copy(from, data.join(name)).unwrap();
        let mut perms = std::fs::metadata(data.join(name)).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o600);
        std::fs::set_permissions(data.join(name), perms).unwrap();
        // The server (run as `postgres` when the tests run as root) must own its key.
        let _ = std::process::Command::new("chown")
            .arg("--reference")
            .arg(data.join("PG_VERSION"))
            .arg(data.join(name))
            .status();
    }
    let c = pg.direct("postgres").await;
    c.batch_execute("ALTER SYSTEM SET ssl = on").await.unwrap();
    c.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    // The reload is asynchronous: wait until TLS is actually on.
    for _ in 0..100 {
        let on: String = c.query_one("SHOW ssl", &[]).await.unwrap().get(0);
        if on == "on" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    ca
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_source_server_is_verified() {
    // The server refuses every plaintext TCP connection: whatever works below went
    // over TLS (administration, the session, the cancel).
    let pg = PgServer::start_with(&["local all all trust", "hostssl all all 127.0.0.1/32 trust"]);
    pg.make_source("shop").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = enable_server_tls(&pg, dir.path()).await;
    let extra = format!(
        "server_tls = \"verify-full\"\nserver_ca = \"{}\"\n",
        ca.display()
    );
    let Fixture { pg, proxy } = Fixture::over(pg, Engine::Database, "", &extra);
    let c = proxy.connect("shop.tls").await.expect("session over TLS");
    let ssl: bool = c
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl, "the proxy's session to the server is encrypted");
    let token = c.cancel_token();
    let sleeper = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(30)").await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let err = sleeper.await.unwrap().unwrap_err();
    assert_eq!(
        sqlstate(&err),
        "57014",
        "the cancel reached the server over TLS"
    );

    // A CA that did not sign the server's certificate: nothing connects.
    let other = tempfile::tempdir().unwrap();
    let (wrong_ca, _) = crate::protocol::make_cert(other.path(), "elsewhere");
    let strict = ProxyProc::start(&source(
        "shop",
        &pg,
        &format!(
            "server_tls = \"verify-full\"\nserver_ca = \"{}\"\n",
            wrong_ca.display()
        ),
    ));
    let err = strict.connect("shop.tls2").await.unwrap_err();
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {err}"));
    // The source's server cannot be reached (its certificate is refused): a
    // connection failure, with the certificate's story in the log only.
    assert_eq!(db.code().code(), "08006", "{db:?}");
    assert!(!db.message().contains("certificate"), "{}", db.message());
    assert!(
        db.message().contains("tls2"),
        "names the branch: {}",
        db.message()
    );
    assert!(strict.log().contains("certificate"), "{}", strict.log());
    assert!(!pg.databases().await.contains(&"shop__tls2".to_owned()));
}
