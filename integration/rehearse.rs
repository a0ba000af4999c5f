//! Migration rehearsal: `offshoot rehearse` against a running proxy, on real
//! servers, reading the JSON report it writes.

use std::process::Command;

use serde_json::Value;

use crate::harness::*;

mod api;

/// What one `offshoot rehearse` run left: its exit code, JSON report (Null when
/// none was written), Markdown and output.
struct Run {
    code: i32,
    report: Value,
    markdown: String,
    output: String,
}

/// Runs `offshoot rehearse shop <args>` against `proxy`; `files` are written into a
/// directory first, and `{dir}` in the arguments names it.
fn rehearse(proxy: &ProxyProc, files: &[(&str, &str)], args: &[&str]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    let json = dir.path().join("report.json");
    let md = dir.path().join("report.md");
    let d = dir.path().display().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_offshoot"))
        .arg("rehearse")
        .arg("shop")
        .args(["--admin", &format!("127.0.0.1:{}", proxy.admin)])
        .arg("--token-file")
        .arg(proxy.dir.path().join("state/admin.token"))
        .args(["--proxy", &format!("127.0.0.1:{}", proxy.port)])
        .args(["--user", "postgres"])
        .arg("--report-json")
        .arg(&json)
        .arg("--report-md")
        .arg(&md)
        .args(args.iter().map(|a| a.replace("{dir}", &d)))
        .output()
        .unwrap();
    let output =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let report = std::fs::read_to_string(&json)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    Run {
        code: out.status.code().unwrap_or(-1),
        report,
        markdown: std::fs::read_to_string(&md).unwrap_or_default(),
        output,
    }
}

fn hazards(r: &Value, rule: &str) -> Vec<Value> {
    r["hazards"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["rule"] == rule)
        .cloned()
        .collect()
}

/// No branch is left, in the API or on the server.
async fn nothing_left(f: &Fixture) {
    assert!(f.proxy.branch_names().is_empty(), "{}", f.proxy.branches());
    assert!(clones(&f.pg).await.is_empty(), "{:?}", clones(&f.pg).await);
}

async fn safe_migration_passes(engine: Engine) {
    let f = Fixture::start(engine, "").await;
    let run = rehearse(
        &f.proxy,
        &[
            ("m/001_column.sql", "-- a nullable column is instant\nALTER TABLE items ADD COLUMN shipped_at timestamptz;"),
            (
                "m/002_index.sql",
                "CREATE INDEX CONCURRENTLY items_note_idx ON items (note);\n\
                 CREATE FUNCTION note_len(t text) RETURNS int AS $$ SELECT length(t); $$ LANGUAGE sql;",
            ),
        ],
        &["--sql", "{dir}/m", "--probe"],
    );
    let r = &run.report;
    assert_eq!(run.code, 0, "{}\n{r:#}", run.output);
    assert_eq!(r["report_version"], 1);
    assert_eq!(r["outcome"], "passed");
    let st = r["statements"].as_array().unwrap();
    assert_eq!(st.len(), 3, "{r:#}");
    assert_eq!(st[0]["tag"], "ALTER TABLE");
    assert!(
        st[0]["origin"]
            .as_str()
            .unwrap()
            .ends_with("001_column.sql:2"),
        "{}",
        st[0]
    );
    assert_eq!(st[1]["tag"], "CREATE INDEX");
    assert_eq!(st[1]["indexes_built"][0]["index"], "items_note_idx");
    assert_eq!(st[1]["indexes_built"][0]["concurrently"], true);
    assert!(st[1]["rewrites"].as_array().unwrap().is_empty());
    assert!(st[2]["sql"]
        .as_str()
        .unwrap()
        .contains("$$ SELECT length(t); $$"));
    // The column's statement took ACCESS EXCLUSIVE, seen or inferred, briefly.
    let lock = &st[0]["locks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "items")
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(lock["mode"], "AccessExclusiveLock", "{}", st[0]);
    assert!(hazards(r, "exclusive-lock").is_empty(), "{r:#}");
    assert!(hazards(r, "table-rewrite").is_empty(), "{r:#}");
    let added: Vec<(String, String)> = r["schema_diff"]["added"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["kind"].as_str().unwrap().to_owned(),
                o["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for want in [
        ("column", "items.shipped_at"),
        ("index", "items_note_idx"),
        ("function", "note_len(text)"),
    ] {
        assert!(
            added.contains(&(want.0.to_owned(), want.1.to_owned())),
            "{want:?} not in {added:?}"
        );
    }
    assert!(r["schema_diff"]["removed"].as_array().unwrap().is_empty());
    assert_eq!(r["row_counts"][0]["table"], "items");
    assert_eq!(r["row_counts"][0]["before"], 3);
    assert_eq!(r["row_counts"][0]["after"], 3);
    assert_eq!(r["probe"]["tables"][0]["table"], "items", "{r:#}");
    assert!(r["probe"]["tables"][0]["reads"].as_u64().unwrap() > 0);
    assert!(
        run.markdown
            .starts_with("## Migration rehearsal: ✅ passed"),
        "{}",
        run.markdown
    );
    assert!(
        run.markdown
            .contains("+ column items.shipped_at: timestamp with time zone"),
        "{}",
        run.markdown
    );
    // The proxy keeps the report, lists it, and the audit trail names it.
    let id = r["id"].as_str().unwrap();
    let (status, body) = f
        .proxy
        .api("GET", &format!("/api/v1/rehearsals/{id}"), None);
    assert_eq!(status, 200, "{body}");
    let stored: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(&stored, r);
    let (_, body) = f.proxy.api("GET", "/api/v1/rehearsals", None);
    let list: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list[0]["id"], id, "{list}");
    assert_eq!(list[0]["outcome"], "passed");
    assert_eq!(list[0]["statements"], 3);
    // The CLI lists the same reports (its JSON is the API's) and shows one as the
    // Markdown the run wrote.
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_offshoot"))
            .arg("rehearsals")
            .args(args)
            .args(["--admin", &format!("127.0.0.1:{}", f.proxy.admin)])
            .arg("--token-file")
            .arg(f.proxy.dir.path().join("state/admin.token"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let listed: Value = serde_json::from_str(&cli(&["list", "--output", "json"])).unwrap();
    assert_eq!(listed, list);
    let table = cli(&["list"]);
    assert!(
        table
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with(id) && l.contains("passed")),
        "{table}"
    );
    assert_eq!(cli(&["show", id]), run.markdown);
    let shown: Value = serde_json::from_str(&cli(&["show", id, "-o", "json"])).unwrap();
    assert_eq!(&shown, r);
    let reported = || {
        let (_, body) = f
            .proxy
            .api("GET", "/api/v1/events?action=rehearsal.reported", None);
        body.contains(id)
    };
    assert!(
        eventually(10, reported).await,
        "{}",
        f.proxy.api("GET", "/api/v1/events", None).1
    );
    for path in ["/api/v1/rehearsals/..%2fx", "/api/v1/rehearsals/00000000"] {
        assert_eq!(f.proxy.api("GET", path, None).0, 404, "{path}");
    }
    let (status, body) = f.proxy.api(
        "POST",
        "/api/v1/rehearsals/reports",
        Some(r#"{"report_version":9}"#),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("report_version"), "{body}");
    nothing_left(&f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_safe_migration_passes_on_the_database_engine() {
    safe_migration_passes(Engine::Database).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_safe_migration_passes_on_the_instance_engine() {
    safe_migration_passes(Engine::Instance).await;
}

async fn rewrite_is_a_hazard(engine: Engine) {
    let pg = PgServer::start();
    pg.make_source("shop").await;
    pg.direct("shop")
        .await
        .batch_execute(
            "CREATE TABLE orders (id int PRIMARY KEY, total int NOT NULL, note text); \
             INSERT INTO orders SELECT g, g % 1000, 'order ' || g FROM generate_series(1, 1500000) g;",
        )
        .await
        .unwrap();
    let f = Fixture::over(pg, engine, "", "");
    let run = rehearse(
        &f.proxy,
        &[(
            "change.sql",
            "ALTER TABLE orders ALTER COLUMN total TYPE bigint;",
        )],
        &[
            "--sql",
            "{dir}/change.sql",
            "--probe",
            "--max-lock",
            "200ms",
        ],
    );
    let r = &run.report;
    assert_eq!(run.code, 3, "{}\n{r:#}", run.output);
    assert_eq!(r["outcome"], "hazard_found");
    let st = &r["statements"][0];
    let took = st["duration_ms"].as_f64().unwrap();
    assert!(
        took >= 500.0,
        "the table must be big enough for a 0.5 s rewrite: {took} ms"
    );
    let lock = st["locks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "orders" && l["mode"] == "AccessExclusiveLock")
        .cloned()
        .unwrap_or_else(|| panic!("no ACCESS EXCLUSIVE on orders: {st:#}"));
    assert_eq!(lock["inferred"], false, "the sampler saw it: {lock}\n{r:#}");
    assert!(
        lock["held_ms"].as_f64().unwrap() >= 0.8 * took,
        "{lock} vs {took}"
    );
    assert_eq!(st["rewrites"][0]["relation"], "orders", "{st:#}");
    assert_eq!(st["rewrites"][0]["kind"], "table");
    assert!(st["wal_bytes"].as_u64().unwrap() > 10_000_000, "{st}");
    let h = hazards(r, "exclusive-lock");
    assert_eq!(h.len(), 1, "{r:#}");
    assert_eq!(h[0]["relation"], "orders");
    assert_eq!(h[0]["statement"], 1);
    assert_eq!(h[0]["fails"], true);
    assert!(h[0]["figure"]
        .as_str()
        .unwrap()
        .starts_with("ACCESS EXCLUSIVE on orders held"));
    assert_eq!(hazards(r, "table-rewrite").len(), 1, "{r:#}");
    let probe = r["probe"]["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == "orders")
        .cloned()
        .unwrap_or_else(|| panic!("orders not probed: {r:#}"));
    let stall = probe["max_read_stall_ms"].as_f64().unwrap();
    assert!(
        stall >= 0.5 * took,
        "reads stalled {stall} ms during a {took} ms rewrite: {probe:#}"
    );
    assert!(
        probe["max_write_stall_ms"].as_f64().unwrap() >= 0.5 * took,
        "{probe:#}"
    );
    assert!(
        run.markdown
            .contains("| ❌ | `exclusive-lock` | `orders` | #1 |"),
        "{}",
        run.markdown
    );
    assert!(
        run.markdown
            .contains("- column orders.total: integer NOT NULL"),
        "{}",
        run.markdown
    );
    assert!(
        run.markdown
            .contains("+ column orders.total: bigint NOT NULL"),
        "{}",
        run.markdown
    );
    nothing_left(&f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewrite_under_access_exclusive_fails_with_3_on_the_database_engine() {
    rewrite_is_a_hazard(Engine::Database).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewrite_under_access_exclusive_fails_with_3_on_the_instance_engine() {
    rewrite_is_a_hazard(Engine::Instance).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_data_check_exits_2_with_its_violations() {
    let f = Fixture::start(Engine::Database, "").await;
    let run = rehearse(
        &f.proxy,
        &[
            ("m.sql", "UPDATE items SET note = NULL WHERE id IN (2, 3);"),
            ("notes.sql", "-- every item has a note\nSELECT id, note FROM items WHERE note IS NULL ORDER BY id"),
            ("count.sql", "SELECT count(*) = 3 FROM items"),
        ],
        &["--sql", "{dir}/m.sql", "--check", "{dir}/notes.sql", "--check", "{dir}/count.sql"],
    );
    let r = &run.report;
    assert_eq!(run.code, 2, "{}\n{r:#}", run.output);
    assert_eq!(r["outcome"], "check_failed");
    assert_eq!(r["statements"][0]["rows"], 2);
    let notes = &r["checks"][0];
    assert_eq!(notes["before"]["passed"], true, "{notes:#}");
    assert_eq!(notes["after"]["passed"], false);
    assert_eq!(notes["after"]["violation_count"], 2);
    assert_eq!(notes["after"]["violations"][0]["id"], "2");
    assert_eq!(notes["after"]["violations"][1]["note"], Value::Null);
    assert_eq!(
        r["checks"][1]["after"]["passed"], true,
        "a single true passes"
    );
    assert!(
        run.markdown.contains("before passed, after 2 violations"),
        "{}",
        run.markdown
    );
    assert!(
        run.markdown.contains(r#"{"id":"3","note":null}"#),
        "{}",
        run.markdown
    );
    nothing_left(&f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_statement_exits_1_and_leaves_nothing_unless_kept() {
    let f = Fixture::start(Engine::Database, "").await;
    let files = [(
        "m.sql",
        "CREATE TABLE audit_log (id int);\nINSERT INTO items VALUES (1, 'dup');\nDROP TABLE items;",
    )];
    let run = rehearse(&f.proxy, &files, &["--sql", "{dir}/m.sql"]);
    let r = &run.report;
    assert_eq!(run.code, 1, "{}\n{r:#}", run.output);
    assert_eq!(r["outcome"], "migration_failed");
    let st = r["statements"].as_array().unwrap();
    assert_eq!(st.len(), 2, "the run stops at the failure: {r:#}");
    assert_eq!(st[1]["error"]["sqlstate"], "23505");
    assert!(
        r["migration"]["error"]
            .as_str()
            .unwrap()
            .contains("m.sql:2"),
        "{r:#}"
    );
    assert!(
        run.markdown.contains("❌ 23505 duplicate key value"),
        "{}",
        run.markdown
    );
    nothing_left(&f).await;

    let run = rehearse(
        &f.proxy,
        &files,
        &["--sql", "{dir}/m.sql", "--keep", "--name", "kept"],
    );
    assert_eq!(run.code, 1, "{}", run.output);
    assert_eq!(f.proxy.branch_names(), ["kept"]);
    assert!(
        run.output
            .contains("branch kept: postgresql://postgres@127.0.0.1:"),
        "{}",
        run.output
    );
    let c = f.proxy.connect("shop.kept").await.unwrap();
    assert_eq!(count(&c).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_data_and_bad_arguments() {
    let f = Fixture::start(Engine::Database, "").await;
    let run = rehearse(
        &f.proxy,
        &[(
            "m.sql",
            "BEGIN;\nALTER TABLE items DROP COLUMN note;\nDELETE FROM items WHERE id = 3;\nCOMMIT;",
        )],
        &["--sql", "{dir}/m.sql"],
    );
    let r = &run.report;
    assert_eq!(run.code, 3, "{}\n{r:#}", run.output);
    let dropped = hazards(r, "deletes-data");
    assert_eq!(dropped.len(), 2, "{r:#}");
    assert_eq!(dropped[0]["relation"], "items.note");
    assert_eq!(dropped[0]["statement"], 2);
    assert!(dropped[1]["figure"]
        .as_str()
        .unwrap()
        .contains("1 rows removed from items (3 → 2)"));
    // The column drop held its lock until COMMIT: through the DELETE that followed
    // and the COMMIT itself, however late the sampler first saw it (a lock first
    // seen during statement 2 is counted until its transaction's end).
    let st = &r["statements"][1];
    let lock = &st["locks"][0];
    assert_eq!(lock["mode"], "AccessExclusiveLock", "{st:#}");
    let tx_end = r["statements"][3]["started_ms"].as_f64().unwrap()
        + r["statements"][3]["duration_ms"].as_f64().unwrap();
    let next_started = r["statements"][2]["started_ms"].as_f64().unwrap();
    let held = lock["held_ms"].as_f64().unwrap();
    assert!(held + 1.0 >= tx_end - next_started, "{lock} until {tx_end}");
    nothing_left(&f).await;

    // With --fail-on none the same run passes.
    let run = rehearse(
        &f.proxy,
        &[("m.sql", "ALTER TABLE items DROP COLUMN note;")],
        &["--sql", "{dir}/m.sql", "--fail-on", "none"],
    );
    assert_eq!(run.code, 0, "{}", run.output);
    assert_eq!(hazards(&run.report, "deletes-data")[0]["fails"], false);

    for (args, words) in [
        (vec![], "nothing to rehearse"),
        (vec!["--sql", "{dir}/none.sql"], "cannot read"),
        (
            vec!["--sql", "{dir}/m.sql", "--fail-on", "slow"],
            "unknown hazard rule \"slow\"",
        ),
        (vec!["--sql", "{dir}/m.sql", "--", "true"], "not both"),
    ] {
        let run = rehearse(&f.proxy, &[("m.sql", "SELECT 1")], &args);
        assert_eq!(run.code, 1, "{args:?}: {}", run.output);
        assert!(run.output.contains(words), "{args:?}: {}", run.output);
    }
    let run = rehearse(
        &f.proxy,
        &[("m.sql", "SELECT 1")],
        &["--sql", "{dir}/m.sql", "--snapshot", "nope"],
    );
    assert_eq!(run.code, 1, "{}", run.output);
    assert!(
        run.output.contains("cannot create the rehearsal branch"),
        "{}",
        run.output
    );
    nothing_left(&f).await;
}

/// The venv `integration/rehearse/setup.sh` fills (`.ci/run` calls it).
fn alembic() -> Option<std::path::PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache")))?;
    let bin = cache.join("offshoot/rehearse-venv/bin/alembic");
    bin.exists().then_some(bin)
}

const ALEMBIC_ENV: &str = r#"
import os
from alembic import context
from sqlalchemy import create_engine

url = os.environ["DATABASE_URL"].replace("postgresql://", "postgresql+psycopg://", 1)
engine = create_engine(url)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=None, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()
"#;

const ALEMBIC_VERSION: &str = r#"
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None

def upgrade():
    op.add_column("items", sa.Column("price", sa.Integer(), nullable=True))
    op.execute("UPDATE items SET price = id * 100")
    op.create_index("items_price_idx", "items", ["price"])
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alembic_migration_shows_its_statements() {
    let Some(alembic) = alembic() else {
        return skip(
            "an_alembic_migration_shows_its_statements",
            "alembic is not installed (run integration/rehearse/setup.sh)",
        );
    };
    let f = Fixture::start(Engine::Database, "").await;
    let alembic = alembic.display().to_string();
    let run = rehearse(
        &f.proxy,
        &[
            (
                "alembic.ini",
                "[alembic]\nscript_location = %(here)s/migrations\n",
            ),
            ("migrations/env.py", ALEMBIC_ENV),
            ("migrations/script.py.mako", ""),
            ("migrations/versions/0001_price.py", ALEMBIC_VERSION),
        ],
        &[
            "--probe",
            "--",
            &alembic,
            "-c",
            "{dir}/alembic.ini",
            "upgrade",
            "head",
        ],
    );
    let r = &run.report;
    assert_eq!(run.code, 0, "{}\n{r:#}", run.output);
    assert_eq!(r["migration"]["kind"], "command");
    assert_eq!(r["migration"]["command_exit"], 0);
    let st = r["statements"].as_array().unwrap();
    let find = |start: &str| {
        st.iter()
            .find(|s| s["sql"].as_str().unwrap().starts_with(start))
            .cloned()
            .unwrap_or_else(|| panic!("no statement {start:?} in {r:#}"))
    };
    let add = find("ALTER TABLE items ADD COLUMN price INTEGER");
    assert_eq!(add["tag"], "ALTER TABLE");
    assert!(add["origin"].as_str().unwrap().starts_with("session "));
    let lock = add["locks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "items")
        .cloned();
    assert_eq!(
        lock.unwrap_or_default()["mode"],
        "AccessExclusiveLock",
        "{add:#}"
    );
    let update = find("UPDATE items SET price = id * 100");
    assert_eq!(
        (update["tag"].as_str(), update["rows"].as_u64()),
        (Some("UPDATE"), Some(3))
    );
    let index = find("CREATE INDEX items_price_idx ON items (price)");
    assert_eq!(
        index["indexes_built"][0]["index"], "items_price_idx",
        "{index:#}"
    );
    assert_eq!(index["indexes_built"][0]["concurrently"], false);
    // SQLAlchemy's own queries go through the extended protocol: their parameters show.
    assert!(
        st.iter().any(|s| s["params"]
            .as_array()
            .is_some_and(|p| p.iter().any(|v| v == "alembic_version"))),
        "{r:#}"
    );
    // The statements run in order, within the run.
    let times: Vec<f64> = st
        .iter()
        .map(|s| s["started_ms"].as_f64().unwrap())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]) && times[0] >= 0.0,
        "{times:?}"
    );
    let added: Vec<&str> = r["schema_diff"]["added"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert!(
        added.contains(&"items.price") && added.contains(&"alembic_version"),
        "{added:?}"
    );
    nothing_left(&f).await;
}
