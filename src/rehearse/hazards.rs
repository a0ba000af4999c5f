//! The hazard rules: what in a rehearsal would hurt a live database, with the
//! figure measured and what to do instead.

use std::collections::HashSet;

use super::classify::blocks_writes;
use crate::rehearsal_report::{
    human_bytes, human_ms, mode_words, strength, Hazard, Rewrite, RowCount, SchemaDiff,
    StatementLock, StatementReport,
};

/// Every rule, in the order the report lists them.
pub const RULES: [&str; 7] = [
    "exclusive-lock",
    "blocks-writes",
    "table-rewrite",
    "index-not-concurrent",
    "deletes-data",
    "validate-in-same-tx",
    "long-transaction",
];

/// The rules that fail a run unless `--fail-on` says otherwise.
pub const DEFAULT_FAIL_ON: &str = "exclusive-lock,table-rewrite,deletes-data";

/// What the rules read besides the statements.
pub struct Inputs<'a> {
    pub statements: &'a [StatementReport],
    /// Locks no statement could be matched to (a command's sessions when no
    /// recording names its statements): (relation, mode, held ms).
    pub loose_locks: &'a [(String, String, f64)],
    /// Rewrites no statement could be matched to.
    pub loose_rewrites: &'a [Rewrite],
    /// Names of the relations that existed before the migration: locks and
    /// rewrites of relations it made itself hurt nobody.
    pub existed: &'a HashSet<String>,
    /// The tables and materialized views among them: the relations traffic reads
    /// and writes (an index's lock comes with its table's).
    pub existed_tables: &'a HashSet<String>,
    /// Sizes of the tables before the migration, by name.
    pub table_size: &'a dyn Fn(&str) -> u64,
    pub diff: &'a SchemaDiff,
    pub row_counts: &'a [RowCount],
    /// Explicit transactions: (first statement, last statement, duration ms).
    pub transactions: &'a [(usize, usize, f64)],
    /// Statements that ran `VALIDATE CONSTRAINT` in the transaction that added the
    /// constraint, or added a constraint validated at once: (statement, table).
    pub validated_in_tx: &'a [(usize, String)],
    pub max_lock_ms: f64,
    pub max_transaction_ms: f64,
    pub index_size_threshold: u64,
}

pub fn find(i: &Inputs<'_>) -> Vec<Hazard> {
    let mut out = Vec::new();
    let mut push =
        |rule: &str, relation: &str, statement: Option<usize>, figure: String, advice: &str| {
            out.push(Hazard {
                rule: rule.to_owned(),
                relation: relation.to_owned(),
                statement,
                figure,
                advice: advice.to_owned(),
                fails: false,
            })
        };
    let loose: Vec<StatementLock> = i
        .loose_locks
        .iter()
        .map(|(relation, mode, held_ms)| StatementLock {
            relation: relation.clone(),
            mode: mode.clone(),
            held_ms: *held_ms,
            inferred: false,
        })
        .collect();
    let locks = i
        .statements
        .iter()
        .flat_map(|s| s.locks.iter().map(move |l| (Some(s.n), l)))
        .chain(loose.iter().map(|l| (None, l)));
    // Per statement and table, only the strongest lock counts.
    let mut strongest: Vec<(Option<usize>, &StatementLock)> = Vec::new();
    for (n, l) in locks {
        if l.held_ms <= i.max_lock_ms || !i.existed_tables.contains(&l.relation) {
            continue;
        }
        match strongest
            .iter_mut()
            .find(|(m, s)| *m == n && s.relation == l.relation)
        {
            Some(slot) if strength(&slot.1.mode) < strength(&l.mode) => slot.1 = l,
            Some(_) => {}
            None => strongest.push((n, l)),
        }
    }
    for (n, l) in strongest {
        {
            let figure = format!(
                "{} on {} held {}{}",
                mode_words(&l.mode),
                l.relation,
                human_ms(l.held_ms),
                if l.inferred { " (inferred)" } else { "" }
            );
            if l.mode == "AccessExclusiveLock" {
                push(
                    "exclusive-lock",
                    &l.relation,
                    n,
                    figure,
                    "Every read and write of the table waits for this lock. Split the change: \
                     add new columns or tables, backfill in batches, switch over, then drop; \
                     set a short lock_timeout and retry.",
                );
            } else if blocks_writes(&l.mode) {
                push(
                    "blocks-writes",
                    &l.relation,
                    n,
                    figure,
                    "Writes to the table wait for this lock. Use CREATE INDEX CONCURRENTLY, \
                     NOT VALID constraints validated later, or a shorter transaction.",
                );
            }
        }
    }
    let rewrites = i
        .statements
        .iter()
        .flat_map(|s| s.rewrites.iter().map(move |w| (Some(s), w)))
        .chain(i.loose_rewrites.iter().map(|w| (None, w)));
    for (s, w) in rewrites {
        if i.existed.contains(&w.relation) && w.kind != "index" {
            let took = s
                .map(|s| format!(" in {}", human_ms(s.duration_ms)))
                .unwrap_or_default();
            push(
                "table-rewrite",
                &w.relation,
                s.map(|s| s.n),
                format!(
                    "{} ({}) rewritten{took}",
                    w.relation,
                    human_bytes(w.size_bytes)
                ),
                "The whole table is copied under an ACCESS EXCLUSIVE lock. Add a new column \
                     of the new type, backfill it in batches and swap it in, instead of \
                 changing the type in place.",
            );
        }
    }
    for s in i.statements {
        for ix in &s.indexes_built {
            let size = (i.table_size)(&ix.table);
            if !ix.concurrently && i.existed.contains(&ix.table) && size >= i.index_size_threshold {
                push(
                    "index-not-concurrent",
                    &ix.table,
                    Some(s.n),
                    format!(
                        "{} built on {} ({}) in {} without CONCURRENTLY",
                        ix.index,
                        ix.table,
                        human_bytes(size),
                        human_ms(s.duration_ms)
                    ),
                    "CREATE INDEX blocks writes to the table while it builds. Use CREATE INDEX \
                     CONCURRENTLY (outside a transaction block).",
                );
            }
        }
    }
    let dropping = |name: &str| {
        let bare = name.rsplit('.').next().unwrap_or(name).replace('"', "");
        i.statements
            .iter()
            .find(|s| {
                s.sql.to_ascii_lowercase().contains("drop")
                    && s.sql
                        .to_ascii_lowercase()
                        .contains(&bare.to_ascii_lowercase())
            })
            .map(|s| s.n)
    };
    for o in &i.diff.removed {
        if o.kind == "table" || o.kind == "column" {
            push(
                "deletes-data",
                &o.name,
                dropping(&o.name),
                format!("{} {} dropped", o.kind, o.name),
                "Dropped data cannot be read back. Stop reading and writing it in a release \
                 first, keep a backup, and drop it in a later migration.",
            );
        }
    }
    for c in i.row_counts {
        if let (Some(b), Some(a)) = (c.before, c.after) {
            if a < b {
                let n = i
                    .statements
                    .iter()
                    .find(|s| {
                        s.sql
                            .to_ascii_lowercase()
                            .contains(&c.table.to_ascii_lowercase())
                            && (s.tag == "DELETE" || s.tag == "TRUNCATE")
                    })
                    .map(|s| s.n);
                push(
                    "deletes-data",
                    &c.table,
                    n,
                    format!("{} rows removed from {} ({b} → {a})", b - a, c.table),
                    "Rows removed by a migration are gone for good. Archive them first, or \
                     delete in a job the application can pause.",
                );
            }
        }
    }
    for (n, table) in i.validated_in_tx {
        let held = i
            .statements
            .iter()
            .find(|s| s.n == *n)
            .map(|s| s.duration_ms)
            .unwrap_or(0.0);
        push(
            "validate-in-same-tx",
            table,
            Some(*n),
            format!(
                "constraint checked against every row of {table} under the statement's lock ({})",
                human_ms(held)
            ),
            "Add the constraint NOT VALID (a brief lock), then VALIDATE CONSTRAINT in a \
             separate transaction, which lets reads and writes go on.",
        );
    }
    for (first, last, ms) in i.transactions {
        if *ms > i.max_transaction_ms {
            push(
                "long-transaction",
                "",
                Some(*first),
                format!(
                    "statements #{first}–#{last} held one transaction open for {}",
                    human_ms(*ms)
                ),
                "Every lock taken in a transaction is held until it ends. Commit between \
                 steps, and batch long data changes.",
            );
        }
    }
    out
}

/// Marks the hazards whose rule is in `fail_on`.
pub fn mark_failing(hazards: &mut [Hazard], fail_on: &[String]) {
    for h in hazards {
        h.fails = fail_on.iter().any(|r| r == &h.rule);
    }
}

/// Parses `--fail-on` (`rule,rule`; `none` for no rule); names the unknown rule.
pub fn parse_fail_on(text: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for r in text.split(',').map(str::trim).filter(|r| !r.is_empty()) {
        if r == "none" {
            continue;
        }
        if !RULES.contains(&r) {
            return Err(format!(
                "unknown hazard rule {r:?} in --fail-on; the rules are {}",
                RULES.join(", ")
            ));
        }
        out.push(r.to_owned());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fail_on_names_unknown_rules() {
        assert_eq!(parse_fail_on(DEFAULT_FAIL_ON).unwrap().len(), 3);
        assert!(parse_fail_on("none").unwrap().is_empty());
        assert!(parse_fail_on("exclusive-lock,nope")
            .unwrap_err()
            .contains("\"nope\""));
    }
}
