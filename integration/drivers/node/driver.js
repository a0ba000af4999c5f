// node-postgres through Offshoot: every check the driver suite makes, on one branch.
//
// Connection parameters come from PGHOST, PGPORT, PGUSER and PGDATABASE (pg reads
// them); EXPECT_DB is the clone the branch must land on. Prints one line per check
// and exits non-zero with the reason at the first mismatch. run.sh installs pg and
// pg-copy-streams outside the repository and points NODE_PATH at them.
"use strict";

const net = require("net");
const { pipeline } = require("stream/promises");
const { Readable, Writable } = require("stream");
const pg = require("pg");
const copyStreams = require("pg-copy-streams");

const EXPECT_DB = process.env.EXPECT_DB;

class Mismatch extends Error {}

function check(cond, what) {
  if (!cond) throw new Mismatch(what);
}

function ok(what) {
  console.log(`ok ${what}`);
}

async function connect() {
  const c = new pg.Client({ connectionTimeoutMillis: 30000 });
  await c.connect();
  return c;
}

async function one(client, text, values) {
  const r = await client.query({ text, values, rowMode: "array" });
  return r.rows.length ? r.rows[0][0] : undefined;
}

function copyRows() {
  // 5,000 rows (about 155 kB) of COPY text format, with escapes, non-ASCII text and
  // a NULL: enough to span many protocol messages and relay reads.
  let s = "";
  for (let i = 1000; i < 6000; i++) {
    const name = i === 1042 ? "\\N" : `row-${i}-\u00e9\\ttab\\\\slash`;
    s += `${i}\t${name}\t${i % 7}\n`;
  }
  return Buffer.from(s, "utf8");
}

// node-postgres has no public cancel API, and pg_cancel_backend from a second
// connection would bypass the proxy's cancel-key mapping (the point of this check).
// So this sends the protocol CancelRequest itself, on a new connection, with the
// key the client received in BackendKeyData (the proxy's own key, not the server's).
function sendCancelRequest(client) {
  return new Promise((resolve, reject) => {
    const buf = Buffer.alloc(16);
    buf.writeInt32BE(16, 0);
    buf.writeInt32BE(80877102, 4);
    buf.writeInt32BE(client.processID, 8);
    buf.writeInt32BE(client.secretKey, 12);
    const sock = net.connect(client.port, client.host, () => sock.end(buf));
    sock.on("error", reject);
    sock.on("close", resolve);
    sock.resume();
  });
}

async function main() {
  const conn = await connect();

  let n = await one(conn, "SELECT count(*)::int FROM items");
  check(n === 3, `source table items: expected 3 rows in the clone, got ${n}`);
  ok("clone has the source's rows");

  await conn.query("DROP TABLE IF EXISTS drv_items");
  await conn.query("CREATE TABLE drv_items (id int PRIMARY KEY, name text, qty int)");
  await conn.query("INSERT INTO drv_items VALUES (1, 'one', 10), (2, 'two', 20), (3, 'three', 30)");
  n = await one(conn, "SELECT count(*)::int FROM drv_items");
  check(n === 3, `after insert: expected 3 rows, got ${n}`);
  ok("create table and insert");

  // Named queries are parsed once per connection as server-side prepared statements.
  for (const i of [4, 5, 6]) {
    await conn.query({
      name: "drv_insert",
      text: "INSERT INTO drv_items VALUES ($1, $2, $3)",
      values: [i, `n${i}`, i * 10],
    });
  }
  for (let round = 0; round < 2; round++) {
    for (const [i, want] of [[1, "one"], [2, "two"], [5, "n5"]]) {
      const r = await conn.query({
        name: "drv_select",
        text: "SELECT name FROM drv_items WHERE id = $1",
        values: [i],
      });
      check(r.rows.length === 1 && r.rows[0].name === want,
        `prepared select id=${i}: expected ${want}, got ${JSON.stringify(r.rows)}`);
    }
  }
  const prepared = await one(conn,
    "SELECT count(*)::int FROM pg_prepared_statements WHERE name IN ('drv_insert', 'drv_select')");
  check(prepared === 2, `expected 2 server-side prepared statements, got ${prepared}`);
  ok(`prepared statements (${prepared} server-side)`);

  await conn.query("BEGIN");
  await conn.query("INSERT INTO drv_items VALUES (100, 'tx', 1)");
  n = await one(conn, "SELECT count(*)::int FROM drv_items");
  check(n === 7, `inside transaction: expected 7 rows, got ${n}`);
  await conn.query("ROLLBACK");
  n = await one(conn, "SELECT count(*)::int FROM drv_items WHERE id = 100");
  check(n === 0, "row inserted in a rolled-back transaction is still there");
  n = await one(conn, "SELECT count(*)::int FROM drv_items");
  check(n === 6, `after rollback: expected 6 rows, got ${n}`);
  ok("transaction rollback");

  const data = copyRows();
  await pipeline(Readable.from([data]),
    conn.query(copyStreams.from("COPY drv_items (id, name, qty) FROM STDIN")));
  const chunks = [];
  await pipeline(
    conn.query(copyStreams.to(
      "COPY (SELECT id, name, qty FROM drv_items WHERE id >= 1000 ORDER BY id) TO STDOUT")),
    new Writable({
      write(chunk, _enc, cb) {
        chunks.push(chunk);
        cb();
      },
    }));
  const out = Buffer.concat(chunks);
  check(out.equals(data), `COPY round trip differs: sent ${data.length} bytes, got ${out.length}`);
  n = await one(conn, "SELECT count(*)::int FROM drv_items WHERE name IS NULL");
  check(n === 1, `COPY NULL: expected 1 NULL name, got ${n}`);
  ok("COPY FROM STDIN / TO STDOUT round trip");

  const listener = await connect();
  const payload = "payload-node-\u00e9";
  const received = new Promise((resolve) => listener.on("notification", resolve));
  await listener.query("LISTEN drv_chan");
  await conn.query("SELECT pg_notify('drv_chan', $1)", [payload]);
  let timer;
  const msg = await Promise.race([
    received,
    new Promise((resolve) => { timer = setTimeout(() => resolve(null), 5000); }),
  ]);
  clearTimeout(timer);
  check(msg !== null, "LISTEN/NOTIFY: no notification within 5s");
  check(msg.channel === "drv_chan" && msg.payload === payload,
    `LISTEN/NOTIFY: expected ${payload} on drv_chan, got ${msg.payload} on ${msg.channel}`);
  ok("LISTEN/NOTIFY");

  const victim = await connect();
  const start = Date.now();
  const sleeping = victim.query("SELECT pg_sleep(30)").then(
    () => null, (e) => e);
  const deadline = Date.now() + 10000;
  let sent = false;
  while (Date.now() < deadline) {
    const running = await one(listener,
      "SELECT count(*)::int FROM pg_stat_activity WHERE datname = current_database()" +
      " AND state = 'active' AND query = 'SELECT pg_sleep(30)'");
    if (running) {
      await sendCancelRequest(victim);
      sent = true;
      break;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  check(sent, "cancel: pg_sleep(30) never showed up in pg_stat_activity");
  const err = await sleeping;
  const elapsed = (Date.now() - start) / 1000;
  check(err !== null, "cancel: pg_sleep(30) finished without being cancelled");
  check(err.code === "57014", `cancel: expected SQLSTATE 57014, got ${err.code}: ${err.message}`);
  check(elapsed < 10, `cancel took ${elapsed.toFixed(1)}s (limit 10s)`);
  n = await one(victim, "SELECT 1");
  check(n === 1, "session unusable after cancel");
  ok(`cancel (57014 after ${elapsed.toFixed(1)}s)`);

  const db = await one(conn, "SELECT current_database()");
  check(db === EXPECT_DB, `current_database(): expected ${EXPECT_DB}, got ${db}`);
  ok(`current_database() = ${db}`);

  await Promise.all([victim.end(), listener.end(), conn.end()]);
}

main().catch((e) => {
  if (e instanceof Mismatch) {
    console.error(`FAIL: ${e.message}`);
  } else {
    console.error(`FAIL: ${e.code ? `SQLSTATE ${e.code}: ` : ""}${e.stack || e}`);
  }
  process.exit(1);
});
