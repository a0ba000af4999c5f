// pgjdbc through Offshoot: every check the driver suite makes, on one branch.
//
// Connection parameters come from PGHOST, PGPORT, PGUSER and PGDATABASE; EXPECT_DB
// is the clone the branch must land on. Prints one line per check and exits
// non-zero with the reason at the first mismatch. run.sh compiles it against
// Debian's pgjdbc (/usr/share/java/postgresql.jar).

import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.nio.charset.StandardCharsets;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.Arrays;
import java.util.Properties;
import org.postgresql.PGConnection;
import org.postgresql.PGNotification;
import org.postgresql.copy.CopyManager;

public class Driver {
    static final String EXPECT_DB = System.getenv("EXPECT_DB");

    static class Mismatch extends Exception {
        Mismatch(String what) {
            super(what);
        }
    }

    static void check(boolean cond, String what) throws Mismatch {
        if (!cond) {
            throw new Mismatch(what);
        }
    }

    static void ok(String what) {
        System.out.println("ok " + what);
    }

    static Connection connect() throws SQLException {
        String url = "jdbc:postgresql://" + System.getenv("PGHOST") + ":" + System.getenv("PGPORT")
                + "/" + System.getenv("PGDATABASE");
        Properties p = new Properties();
        p.setProperty("user", System.getenv("PGUSER"));
        if (System.getenv("PGPASSWORD") != null) {
            p.setProperty("password", System.getenv("PGPASSWORD"));
        }
        // Server-side prepared statements from the first execution on.
        p.setProperty("prepareThreshold", "1");
        p.setProperty("connectTimeout", "30");
        return DriverManager.getConnection(url, p);
    }

    static long count(Connection c, String sql) throws SQLException {
        try (Statement s = c.createStatement(); ResultSet r = s.executeQuery(sql)) {
            r.next();
            return r.getLong(1);
        }
    }

    static String text(Connection c, String sql) throws SQLException {
        try (Statement s = c.createStatement(); ResultSet r = s.executeQuery(sql)) {
            r.next();
            return r.getString(1);
        }
    }

    static void exec(Connection c, String sql) throws SQLException {
        try (Statement s = c.createStatement()) {
            s.execute(sql);
        }
    }

    static byte[] copyRows() {
        // 5,000 rows (about 155 kB) of COPY text format, with escapes, non-ASCII text
        // and a NULL: enough to span many protocol messages and relay reads.
        StringBuilder sb = new StringBuilder();
        for (int i = 1000; i < 6000; i++) {
            String name = i == 1042 ? "\\N" : "row-" + i + "-\u00e9\\ttab\\\\slash";
            sb.append(i).append('\t').append(name).append('\t').append(i % 7).append('\n');
        }
        return sb.toString().getBytes(StandardCharsets.UTF_8);
    }

    static void run() throws Exception {
        Connection conn = connect();

        long n = count(conn, "SELECT count(*) FROM items");
        check(n == 3, "source table items: expected 3 rows in the clone, got " + n);
        ok("clone has the source's rows");

        exec(conn, "DROP TABLE IF EXISTS drv_items");
        exec(conn, "CREATE TABLE drv_items (id int PRIMARY KEY, name text, qty int)");
        exec(conn, "INSERT INTO drv_items VALUES (1, 'one', 10), (2, 'two', 20), (3, 'three', 30)");
        n = count(conn, "SELECT count(*) FROM drv_items");
        check(n == 3, "after insert: expected 3 rows, got " + n);
        ok("create table and insert");

        try (PreparedStatement ins = conn.prepareStatement("INSERT INTO drv_items VALUES (?, ?, ?)")) {
            for (int i = 4; i <= 6; i++) {
                ins.setInt(1, i);
                ins.setString(2, "n" + i);
                ins.setInt(3, i * 10);
                check(ins.executeUpdate() == 1, "prepared insert id=" + i + " did not insert one row");
            }
        }
        try (PreparedStatement sel = conn.prepareStatement("SELECT name FROM drv_items WHERE id = ?")) {
            int[] ids = {1, 2, 5, 1, 2, 5};
            String[] want = {"one", "two", "n5", "one", "two", "n5"};
            for (int k = 0; k < ids.length; k++) {
                sel.setInt(1, ids[k]);
                try (ResultSet r = sel.executeQuery()) {
                    check(r.next(), "prepared select id=" + ids[k] + ": no row");
                    String got = r.getString(1);
                    check(want[k].equals(got),
                            "prepared select id=" + ids[k] + ": expected " + want[k] + ", got " + got);
                }
            }
        }
        long prepared = count(conn, "SELECT count(*) FROM pg_prepared_statements WHERE NOT from_sql");
        check(prepared >= 2, "expected >= 2 protocol-level prepared statements, got " + prepared);
        ok("prepared statements (" + prepared + " server-side)");

        conn.setAutoCommit(false);
        exec(conn, "INSERT INTO drv_items VALUES (100, 'tx', 1)");
        n = count(conn, "SELECT count(*) FROM drv_items");
        check(n == 7, "inside transaction: expected 7 rows, got " + n);
        conn.rollback();
        conn.setAutoCommit(true);
        n = count(conn, "SELECT count(*) FROM drv_items WHERE id = 100");
        check(n == 0, "row inserted in a rolled-back transaction is still there");
        n = count(conn, "SELECT count(*) FROM drv_items");
        check(n == 6, "after rollback: expected 6 rows, got " + n);
        ok("transaction rollback");

        byte[] data = copyRows();
        CopyManager cm = conn.unwrap(PGConnection.class).getCopyAPI();
        long copied = cm.copyIn("COPY drv_items (id, name, qty) FROM STDIN", new ByteArrayInputStream(data));
        check(copied == 5000, "COPY FROM STDIN: expected 5000 rows, got " + copied);
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        cm.copyOut("COPY (SELECT id, name, qty FROM drv_items WHERE id >= 1000 ORDER BY id) TO STDOUT", out);
        check(Arrays.equals(out.toByteArray(), data),
                "COPY round trip differs: sent " + data.length + " bytes, got " + out.size());
        n = count(conn, "SELECT count(*) FROM drv_items WHERE name IS NULL");
        check(n == 1, "COPY NULL: expected 1 NULL name, got " + n);
        ok("COPY FROM STDIN / TO STDOUT round trip");

        Connection listener = connect();
        exec(listener, "LISTEN drv_chan");
        String payload = "payload-java-\u00e9";
        try (PreparedStatement s = conn.prepareStatement("SELECT pg_notify('drv_chan', ?)")) {
            s.setString(1, payload);
            s.executeQuery().close();
        }
        PGNotification[] got = listener.unwrap(PGConnection.class).getNotifications(5000);
        check(got != null && got.length == 1, "LISTEN/NOTIFY: expected one notification within 5s, got "
                + (got == null ? 0 : got.length));
        check(got[0].getName().equals("drv_chan") && got[0].getParameter().equals(payload),
                "LISTEN/NOTIFY: expected " + payload + " on drv_chan, got " + got[0].getParameter()
                        + " on " + got[0].getName());
        ok("LISTEN/NOTIFY");

        // Statement.cancel() sends a protocol CancelRequest with the key the proxy issued.
        Connection victim = connect();
        Statement sleeper = victim.createStatement();
        Thread canceller = new Thread(() -> {
            try {
                long deadline = System.nanoTime() + 10_000_000_000L;
                while (System.nanoTime() < deadline) {
                    long running = count(listener, "SELECT count(*) FROM pg_stat_activity WHERE"
                            + " datname = current_database() AND state = 'active'"
                            + " AND query = 'SELECT pg_sleep(30)'");
                    if (running > 0) {
                        sleeper.cancel();
                        return;
                    }
                    Thread.sleep(50);
                }
            } catch (Exception e) {
                System.err.println("canceller: " + e);
            }
        });
        long start = System.nanoTime();
        canceller.start();
        String state = null;
        try {
            sleeper.execute("SELECT pg_sleep(30)");
        } catch (SQLException e) {
            state = e.getSQLState();
            check("57014".equals(state), "cancel: expected SQLSTATE 57014, got " + state + ": " + e.getMessage());
        }
        double elapsed = (System.nanoTime() - start) / 1e9;
        canceller.join();
        check(state != null, "cancel: pg_sleep(30) finished without being cancelled");
        check(elapsed < 10, String.format("cancel took %.1fs (limit 10s)", elapsed));
        check(count(victim, "SELECT 1") == 1, "session unusable after cancel");
        ok(String.format("cancel (57014 after %.1fs)", elapsed));

        String db = text(conn, "SELECT current_database()");
        check(EXPECT_DB.equals(db), "current_database(): expected " + EXPECT_DB + ", got " + db);
        ok("current_database() = " + db);

        victim.close();
        listener.close();
        conn.close();
    }

    public static void main(String[] args) {
        try {
            run();
        } catch (Mismatch e) {
            System.err.println("FAIL: " + e.getMessage());
            System.exit(1);
        } catch (SQLException e) {
            System.err.println("FAIL: SQLSTATE " + e.getSQLState() + ": " + e.getMessage());
            System.exit(1);
        } catch (Exception e) {
            System.err.println("FAIL: " + e);
            System.exit(1);
        }
    }
}
