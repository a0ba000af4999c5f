//! The side sessions that watch a migration: the lock sampler (every
//! [`SAMPLE_EVERY`], the relation locks held by the migration's sessions) and the
//! probe (every [`PROBE_EVERY`], a read and a rolled-back write on each table the
//! migration touches, timing how long each waited).
//!
//! Both connect to the branch through the proxy, like the migration, with
//! `application_name` [`SIDE_APP`], which the sampler leaves out: everything else
//! in the branch's database is the migration.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

use crate::rehearsal_report::{LockSpan, ProbeTable, Stall};

/// `application_name` of the rehearsal's own side sessions.
pub const SIDE_APP: &str = "offshoot-rehearse-side";
/// How often the sampler reads `pg_locks`: twice within the 10 ms a lock must be
/// held to count.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(5);
/// How often the probe tries each table.
pub const PROBE_EVERY: Duration = Duration::from_millis(50);
/// How long one probe waits for its lock before counting the table as blocked.
const PROBE_LOCK_TIMEOUT_MS: u32 = 100;
/// At most this many tables are probed (each has a session of its own).
const MAX_PROBED: usize = 16;

/// Opens a side session to `conninfo` (the branch, through the proxy).
pub async fn connect(conninfo: &str, app: &str) -> Result<Client, tokio_postgres::Error> {
    let mut cfg: tokio_postgres::Config = conninfo.parse()?;
    cfg.application_name(app);
    cfg.connect_timeout(Duration::from_secs(60));
    let (client, conn) = cfg.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

fn ms_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1000.0
}

/// A lock as one sample saw it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct LockKey {
    pid: i32,
    relation: u32,
    mode: String,
    granted: bool,
}

/// What the sampler hands back.
pub struct Sampled {
    pub spans: Vec<(u32, LockSpan)>,
    pub samples: u64,
}

/// Starts the sampler; stops when `stop` is cancelled. Tables it sees locked are
/// sent on `touched` (for the probe).
pub fn start_sampler(
    client: Client,
    start: Instant,
    stop: CancellationToken,
    touched: Option<mpsc::UnboundedSender<String>>,
) -> JoinHandle<Result<Sampled, tokio_postgres::Error>> {
    tokio::spawn(async move {
        let stmt = client
            .prepare(&format!(
                "SELECT l.pid, l.relation, coalesce(c.oid::regclass::text, l.relation::text), \
                        l.mode, l.granted, coalesce(c.relkind::text, '') \
                 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                 LEFT JOIN pg_class c ON c.oid = l.relation \
                 LEFT JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE l.locktype = 'relation' AND l.pid <> pg_backend_pid() \
                   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                   AND a.application_name <> '{SIDE_APP}' \
                   AND (n.nspname IS NULL OR (n.nspname NOT IN ('pg_catalog', 'information_schema') \
                        AND n.nspname NOT LIKE 'pg\\_toast%'))"
            ))
            .await?;
        let mut open: HashMap<LockKey, LockSpan> = HashMap::new();
        let mut done: Vec<(u32, LockSpan)> = Vec::new();
        let mut seen_tables: HashSet<String> = HashSet::new();
        let mut samples = 0u64;
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // One more sample after the stop, so locks released at the very end close.
        let mut last = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled(), if !last => { last = true; }
            }
            let rows = client.query(&stmt, &[]).await?;
            // The answer's arrival: a lock in it was taken before then, so a lock is
            // never matched to a statement that started after it.
            let at = ms_since(start);
            samples += 1;
            let mut now: HashSet<LockKey> = HashSet::new();
            for r in rows {
                let key = LockKey {
                    pid: r.get(0),
                    relation: r.get(1),
                    mode: r.get(3),
                    granted: r.get(4),
                };
                let name: String = r.get(2);
                let kind: String = r.get(5);
                if (kind == "r" || kind == "p") && seen_tables.insert(name.clone()) {
                    if let Some(t) = &touched {
                        let _ = t.send(name.clone());
                    }
                }
                open.entry(key.clone())
                    .and_modify(|s| s.last_seen_ms = at)
                    .or_insert_with(|| LockSpan {
                        pid: key.pid,
                        relation: name,
                        mode: key.mode.clone(),
                        granted: key.granted,
                        first_seen_ms: at,
                        last_seen_ms: at,
                        statement: None,
                    });
                now.insert(key);
            }
            let gone: Vec<LockKey> = open.keys().filter(|k| !now.contains(k)).cloned().collect();
            for k in gone {
                if let Some(span) = open.remove(&k) {
                    done.push((k.relation, span));
                }
            }
            if last {
                break;
            }
        }
        done.extend(open.into_iter().map(|(k, s)| (k.relation, s)));
        done.sort_by(|a, b| a.1.first_seen_ms.total_cmp(&b.1.first_seen_ms));
        Ok(Sampled {
            spans: done,
            samples,
        })
    })
}

/// The probe: one task per touched table, started as tables become known.
pub struct Probe {
    tasks: BTreeMap<String, JoinHandle<ProbeTable>>,
}

/// Starts probing `initial` tables and every table sent on `touched` later.
pub fn start_probe(
    conninfo: String,
    start: Instant,
    stop: CancellationToken,
    initial: Vec<String>,
    mut touched: mpsc::UnboundedReceiver<String>,
) -> JoinHandle<Probe> {
    tokio::spawn(async move {
        let mut probe = Probe {
            tasks: BTreeMap::new(),
        };
        let add = |probe: &mut Probe, table: String| {
            if probe.tasks.len() < MAX_PROBED && !probe.tasks.contains_key(&table) {
                let task = tokio::spawn(probe_table(
                    conninfo.clone(),
                    table.clone(),
                    start,
                    stop.clone(),
                ));
                probe.tasks.insert(table, task);
            }
        };
        for t in initial {
            add(&mut probe, t);
        }
        loop {
            tokio::select! {
                t = touched.recv() => match t {
                    Some(t) => add(&mut probe, t),
                    None => break,
                },
                _ = stop.cancelled() => break,
            }
        }
        probe
    })
}

impl Probe {
    /// Waits for every table's task (they end with the stop) and returns their results.
    pub async fn finish(self) -> Vec<ProbeTable> {
        let mut out = Vec::new();
        for (_, task) in self.tasks {
            if let Ok(t) = task.await {
                out.push(t);
            }
        }
        out
    }
}

/// The open stall of one kind of probe and the record of all of them.
#[derive(Default)]
struct StallTrack {
    blocked_since: Option<f64>,
    stalls: Vec<Stall>,
    max: f64,
}

impl StallTrack {
    /// An attempt from `from` to `to` got its lock (or the table stopped existing).
    fn got(&mut self, kind: &str, from: f64, to: f64) {
        let since = self.blocked_since.take().unwrap_or(from);
        let waited = to - since;
        // A prompt answer is not a stall; the threshold is well above a round trip.
        if waited >= 20.0 {
            self.max = self.max.max(waited);
            self.stalls.push(Stall {
                kind: kind.to_owned(),
                start_ms: since,
                end_ms: to,
            });
        }
    }

    fn timed_out(&mut self, from: f64) {
        self.blocked_since.get_or_insert(from);
    }
}

/// Reads and writes `table` every [`PROBE_EVERY`] until `stop`.
async fn probe_table(
    conninfo: String,
    table: String,
    start: Instant,
    stop: CancellationToken,
) -> ProbeTable {
    let mut out = ProbeTable {
        table: table.clone(),
        reads: 0,
        writes: 0,
        max_read_stall_ms: 0.0,
        max_write_stall_ms: 0.0,
        stalls: Vec::new(),
    };
    let Ok(client) = connect(&conninfo, SIDE_APP).await else {
        return out;
    };
    if client
        .batch_execute(&format!(
            "SET lock_timeout = '{PROBE_LOCK_TIMEOUT_MS}ms'; SET statement_timeout = '5s'"
        ))
        .await
        .is_err()
    {
        return out;
    }
    // `table` is regclass output or a name from the migration's text; either way it
    // is used as an identifier, quoted as needed by regclass itself.
    let read = format!("SELECT 1 FROM {table} LIMIT 1");
    let write = format!("BEGIN; LOCK TABLE {table} IN ROW EXCLUSIVE MODE");
    let (mut reads, mut writes) = (StallTrack::default(), StallTrack::default());
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        let from = ms_since(start);
        let r = client.simple_query(&read).await;
        let to = ms_since(start);
        out.reads += 1;
        match r {
            Err(e) if e.code().is_some_and(|c| c.code() == "55P03") => reads.timed_out(from),
            _ => reads.got("read", from, to),
        }
        let from = ms_since(start);
        let w = client.batch_execute(&write).await;
        let to = ms_since(start);
        let _ = client.batch_execute("ROLLBACK").await;
        out.writes += 1;
        match w {
            Err(e) if e.code().is_some_and(|c| c.code() == "55P03") => writes.timed_out(from),
            _ => writes.got("write", from, to),
        }
    }
    let end = ms_since(start);
    for (track, kind) in [(&mut reads, "read"), (&mut writes, "write")] {
        if let Some(since) = track.blocked_since {
            track.got(kind, since, end);
        }
    }
    out.max_read_stall_ms = reads.max;
    out.max_write_stall_ms = writes.max;
    out.stalls = reads.stalls;
    out.stalls.extend(writes.stalls);
    out.stalls.sort_by(|a, b| a.start_ms.total_cmp(&b.start_ms));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stalls_run_from_the_first_blocked_attempt_to_the_lock() {
        let mut t = StallTrack::default();
        t.got("read", 0.0, 2.0);
        assert!(t.stalls.is_empty(), "a prompt read is no stall");
        t.timed_out(50.0);
        t.timed_out(200.0);
        t.got("read", 350.0, 420.0);
        assert_eq!(t.stalls.len(), 1);
        assert_eq!((t.stalls[0].start_ms, t.stalls[0].end_ms), (50.0, 420.0));
        assert_eq!(t.max, 370.0);
        t.got("read", 500.0, 560.0);
        assert_eq!(t.max, 370.0);
        assert_eq!(t.stalls.len(), 2);
    }
}
