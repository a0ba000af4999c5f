//! After the run: matching the sampled locks to statements by time, adding the
//! documented lock of statements the sampler did not catch, and the facts the
//! hazard rules read (transactions, constraints validated under one lock, row
//! counts before and after).

use std::collections::{BTreeMap, HashMap, HashSet};

use super::classify::{normalize, TxEffect};
use super::observe::SAMPLE_EVERY;
use super::run::Ran;
use crate::rehearsal_report::{self as report, RowCount, StatementLock, StatementReport};

/// Matches sampled locks to the statements running when they were first seen, and
/// adds the documented lock of a statement the sampler did not catch.
pub fn attribute(
    ran: &[Ran],
    spans: &mut [report::LockSpan],
    names: &HashMap<u32, String>,
) -> Vec<StatementReport> {
    let slack = SAMPLE_EVERY.as_secs_f64() * 1000.0;
    let mut out: Vec<StatementReport> = Vec::new();
    for span in spans.iter_mut() {
        span.statement = ran
            .iter()
            .rposition(|r| r.started_ms <= span.first_seen_ms)
            .map(|i| i + 1);
    }
    let known: HashSet<String> = names.values().map(|n| normalize(n)).collect();
    for (i, r) in ran.iter().enumerate() {
        let n = i + 1;
        let mut locks: BTreeMap<(String, String), StatementLock> = BTreeMap::new();
        for s in spans.iter().filter(|s| s.statement == Some(n) && s.granted) {
            let held =
                (s.last_seen_ms - s.first_seen_ms + slack).max(r.tx_end_ms - s.first_seen_ms);
            let e = locks
                .entry((s.relation.clone(), s.mode.clone()))
                .or_insert(StatementLock {
                    relation: s.relation.clone(),
                    mode: s.mode.clone(),
                    held_ms: 0.0,
                    inferred: false,
                });
            e.held_ms = e.held_ms.max(held);
        }
        if let (Some(mode), Some(target), None) = (r.command.mode, &r.command.target, &r.error) {
            let seen = locks
                .keys()
                .any(|(rel, m)| normalize(rel) == *target && m == mode);
            if !seen && (known.contains(target) || r.command.tx == TxEffect::None) {
                let relation = names
                    .values()
                    .find(|n| normalize(n) == *target)
                    .cloned()
                    .unwrap_or_else(|| target.clone());
                locks.insert(
                    (relation.clone(), mode.to_owned()),
                    StatementLock {
                        relation,
                        mode: mode.to_owned(),
                        held_ms: r.tx_end_ms - r.started_ms,
                        inferred: true,
                    },
                );
            }
        }
        out.push(StatementReport {
            n,
            origin: r.origin.clone(),
            sql: r.sql.clone(),
            params: r.params.clone(),
            started_ms: r.started_ms,
            duration_ms: r.duration_ms,
            tag: r.command.tag.clone(),
            rows: r.rows,
            error: r.error.clone(),
            locks: locks.into_values().collect(),
            rewrites: r.rewrites.clone(),
            indexes_built: r.indexes_built.clone(),
            wal_bytes: r.wal_bytes,
        });
    }
    out
}

/// Explicit transactions: (first statement, last statement, duration ms).
pub fn transactions(ran: &[Ran]) -> Vec<(usize, usize, f64)> {
    let mut out: Vec<(usize, usize, f64)> = Vec::new();
    let mut by_tx: BTreeMap<usize, (usize, usize, f64, f64)> = BTreeMap::new();
    for (i, r) in ran.iter().enumerate() {
        if let Some(t) = r.tx {
            let e = by_tx
                .entry(t)
                .or_insert((i + 1, i + 1, r.started_ms, r.tx_end_ms));
            e.1 = i + 1;
        }
    }
    for (_, (first, last, from, to)) in by_tx {
        out.push((first, last, to - from));
    }
    out
}

/// Constraints checked against every row under the lock that added them: added
/// without `NOT VALID` to a table that existed, or validated in the transaction
/// that added them.
pub fn validated_in_tx(
    ran: &[Ran],
    existed: &HashSet<String>,
    names: &HashMap<u32, String>,
) -> Vec<(usize, String)> {
    let existed_norm: HashSet<String> = existed.iter().map(|n| normalize(n)).collect();
    let display = |t: &str| {
        names
            .values()
            .find(|n| normalize(n) == t)
            .cloned()
            .unwrap_or_else(|| t.to_owned())
    };
    let mut out = Vec::new();
    for (i, r) in ran.iter().enumerate() {
        let Some(t) = &r.command.target else { continue };
        if r.error.is_some() || !existed_norm.contains(t) {
            continue;
        }
        let added_earlier_in_tx = r.tx.is_some()
            && ran[..i].iter().any(|p| {
                p.tx == r.tx
                    && p.command.target.as_deref() == Some(t.as_str())
                    && p.sql.to_ascii_lowercase().contains("not valid")
            });
        if r.command.adds_validated_constraint
            || (r.command.validates_constraint && added_earlier_in_tx)
        {
            out.push((i + 1, display(t)));
        }
    }
    out
}

pub fn merge_counts(
    before: &BTreeMap<String, i64>,
    after: &BTreeMap<String, i64>,
) -> Vec<RowCount> {
    let tables: std::collections::BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    tables
        .into_iter()
        .map(|t| RowCount {
            table: t.clone(),
            before: before.get(t).copied(),
            after: after.get(t).copied(),
        })
        .collect()
}
