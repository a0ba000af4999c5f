//! What a statement is, read from its first words: its command tag, the relation it
//! acts on, the lock level PostgreSQL documents for it (used when the sampler did
//! not see the statement's locks), and its effect on the transaction.
//!
//! A reading of the text, never a parser: it errs towards naming no relation
//! rather than a wrong one.

/// How a statement changes the session's transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxEffect {
    Begin,
    End,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// `ALTER TABLE`, `CREATE INDEX`, `INSERT` ...
    pub tag: String,
    /// The relation the command's lock is on, as written (unquoted, lowercased
    /// unless quoted, without `public.`).
    pub target: Option<String>,
    /// `pg_locks` name of the documented lock level on `target`.
    pub mode: Option<&'static str>,
    pub concurrently: bool,
    pub tx: TxEffect,
    /// `ADD CONSTRAINT ... CHECK/FOREIGN KEY` without `NOT VALID`: the whole table
    /// is checked under the statement's lock.
    pub adds_validated_constraint: bool,
    /// `VALIDATE CONSTRAINT`.
    pub validates_constraint: bool,
    /// `DROP TABLE`, `DROP COLUMN`, `TRUNCATE`, `DELETE`.
    pub removes_data: bool,
}

/// Words of `sql`, outside comments; quoted identifiers keep their quotes, string
/// literals become `'…'`.
fn words(sql: &str) -> Vec<String> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() && out.len() < 64 {
        let c = b[i];
        if c == b'-' && b.get(i + 1) == Some(&b'-') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                i += 1;
            }
            i += 2;
        } else if c == b'\'' {
            i += 1;
            while i < b.len() && b[i] != b'\'' {
                i += 1;
            }
            i += 1;
            out.push("'…'".to_owned());
        } else if c == b'"' {
            let s = i;
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += 1;
            }
            i = (i + 1).min(b.len());
            // A qualified name continues after the quote.
            while i < b.len() && (b[i] == b'.' || is_word(b[i]) || b[i] == b'"') {
                i += 1;
            }
            out.push(sql[s..i].to_owned());
        } else if is_word(c) {
            let s = i;
            while i < b.len() && (is_word(b[i]) || b[i] == b'.' || b[i] == b'"') {
                i += 1;
            }
            out.push(sql[s..i].to_ascii_lowercase());
        } else {
            if !c.is_ascii_whitespace() {
                out.push((c as char).to_string());
            }
            i += 1;
        }
    }
    out
}

fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

/// A relation name as written → the form the catalog prints (`public.` dropped,
/// quotes removed).
pub fn normalize(name: &str) -> String {
    let n = name.replace('"', "");
    n.strip_prefix("public.").map(str::to_owned).unwrap_or(n)
}

/// The name at `w[i]`, after optional `IF [NOT] EXISTS` and `ONLY`.
fn name_at(w: &[String], mut i: usize) -> Option<String> {
    loop {
        match w.get(i).map(String::as_str) {
            Some("if") => {
                i += if w.get(i + 1).map(String::as_str) == Some("not") {
                    3
                } else {
                    2
                }
            }
            Some("only") | Some("concurrently") => i += 1,
            Some(s)
                if s.chars()
                    .next()
                    .is_some_and(|c| c.is_alphanumeric() || c == '"' || c == '_') =>
            {
                return Some(normalize(s))
            }
            _ => return None,
        }
    }
}

fn pos(w: &[String], word: &str) -> Option<usize> {
    w.iter().position(|x| x == word)
}

fn has(w: &[String], word: &str) -> bool {
    pos(w, word).is_some()
}

fn has_seq(w: &[String], seq: &[&str]) -> bool {
    w.windows(seq.len())
        .any(|win| win.iter().zip(seq).all(|(a, b)| a == b))
}

pub fn classify(sql: &str) -> Command {
    let w = words(sql);
    let first = w.first().map(String::as_str).unwrap_or("");
    let second = w.get(1).map(String::as_str).unwrap_or("");
    let mut cmd = Command {
        tag: first.to_ascii_uppercase(),
        target: None,
        mode: None,
        concurrently: has(&w, "concurrently"),
        tx: TxEffect::None,
        adds_validated_constraint: false,
        validates_constraint: false,
        removes_data: false,
    };
    const SKIP: [&str; 8] = [
        "or",
        "replace",
        "unique",
        "temporary",
        "temp",
        "unlogged",
        "global",
        "local",
    ];
    if matches!(first, "create" | "alter" | "drop" | "comment" | "refresh") {
        let object: Vec<&str> = w[1..]
            .iter()
            .map(String::as_str)
            .skip_while(|x| SKIP.contains(x))
            .take_while(|x| !matches!(*x, "if" | "concurrently" | "on" | "only"))
            .take(2)
            .collect();
        let object = match object.as_slice() {
            ["materialized", "view"] => "MATERIALIZED VIEW".to_owned(),
            [o, ..] => o.to_ascii_uppercase(),
            [] => String::new(),
        };
        cmd.tag = format!("{} {object}", first.to_ascii_uppercase())
            .trim()
            .to_owned();
    }
    match (first, second) {
        ("begin", _) | ("start", "transaction") => cmd.tx = TxEffect::Begin,
        ("commit", _) | ("end", _) | ("abort", _) => cmd.tx = TxEffect::End,
        ("rollback", s) if s != "to" => cmd.tx = TxEffect::End,
        ("create", _) if has(&w, "index") => {
            cmd.target = pos(&w, "on").and_then(|i| name_at(&w, i + 1));
            cmd.mode = Some(if cmd.concurrently {
                "ShareUpdateExclusiveLock"
            } else {
                "ShareLock"
            });
        }
        ("create", _) if has(&w, "trigger") => {
            cmd.target = pos(&w, "on").and_then(|i| name_at(&w, i + 1));
            cmd.mode = Some("ShareRowExclusiveLock");
        }
        ("alter", "table") => {
            cmd.target = name_at(&w, 2);
            let add_constraint = has(&w, "add")
                && (has(&w, "check") || has_seq(&w, &["foreign", "key"]) || has(&w, "references"))
                && !has_seq(&w, &["not", "valid"]);
            cmd.adds_validated_constraint = add_constraint && !has(&w, "column");
            cmd.validates_constraint = has_seq(&w, &["validate", "constraint"]);
            cmd.removes_data = has_seq(&w, &["drop", "column"])
                || (w.get(3).map(String::as_str) == Some("drop")
                    && !matches!(
                        w.get(4).map(String::as_str),
                        Some("constraint" | "default" | "not" | "expression" | "identity")
                    ));
            let weaker = cmd.validates_constraint
                || has_seq(&w, &["set", "statistics"])
                || has_seq(&w, &["attach", "partition"])
                || has_seq(&w, &["detach", "partition", "concurrently"]);
            cmd.mode = Some(if weaker {
                "ShareUpdateExclusiveLock"
            } else if has_seq(&w, &["foreign", "key"])
                || has(&w, "references") && !has(&w, "column")
            {
                "ShareRowExclusiveLock"
            } else {
                "AccessExclusiveLock"
            });
        }
        ("alter", "index") | ("alter", "materialized") => {
            cmd.target = name_at(&w, if second == "index" { 2 } else { 3 });
            cmd.mode = Some("AccessExclusiveLock");
        }
        ("drop", "table") | ("drop", "materialized") => {
            cmd.target = name_at(&w, if second == "table" { 2 } else { 3 });
            cmd.mode = Some("AccessExclusiveLock");
            cmd.removes_data = true;
        }
        ("drop", "index") => {
            cmd.target = name_at(&w, 2);
            cmd.mode = Some(if cmd.concurrently {
                "ShareUpdateExclusiveLock"
            } else {
                "AccessExclusiveLock"
            });
        }
        ("truncate", _) => {
            cmd.target = name_at(&w, if second == "table" { 2 } else { 1 });
            cmd.mode = Some("AccessExclusiveLock");
            cmd.removes_data = true;
        }
        ("cluster", _) | ("vacuum", "full") => {
            cmd.target = name_at(&w, if second == "full" { 2 } else { 1 });
            cmd.mode = Some("AccessExclusiveLock");
        }
        ("vacuum", _) | ("analyze", _) => {
            cmd.target = name_at(&w, 1);
            cmd.mode = Some("ShareUpdateExclusiveLock");
        }
        ("reindex", _) => {
            cmd.target = name_at(&w, 2);
            cmd.mode = Some(if cmd.concurrently {
                "ShareUpdateExclusiveLock"
            } else {
                "ShareLock"
            });
        }
        ("refresh", _) => {
            cmd.target = name_at(&w, 3);
            cmd.mode = Some(if cmd.concurrently {
                "ExclusiveLock"
            } else {
                "AccessExclusiveLock"
            });
        }
        ("lock", _) => {
            cmd.target = name_at(&w, if second == "table" { 2 } else { 1 });
            let mode: Vec<&str> = pos(&w, "in")
                .map(|i| {
                    w[i + 1..]
                        .iter()
                        .map(String::as_str)
                        .take_while(|x| *x != "mode")
                        .collect()
                })
                .unwrap_or_default();
            cmd.mode = Some(match mode.as_slice() {
                ["access", "share"] => "AccessShareLock",
                ["row", "share"] => "RowShareLock",
                ["row", "exclusive"] => "RowExclusiveLock",
                ["share", "update", "exclusive"] => "ShareUpdateExclusiveLock",
                ["share"] => "ShareLock",
                ["share", "row", "exclusive"] => "ShareRowExclusiveLock",
                ["exclusive"] => "ExclusiveLock",
                _ => "AccessExclusiveLock",
            });
        }
        ("insert", _) => {
            cmd.target = name_at(&w, 2);
            cmd.mode = Some("RowExclusiveLock");
        }
        ("update", _) => {
            cmd.target = name_at(&w, 1);
            cmd.mode = Some("RowExclusiveLock");
        }
        ("delete", _) => {
            cmd.target = name_at(&w, 2);
            cmd.mode = Some("RowExclusiveLock");
            cmd.removes_data = true;
        }
        _ => {}
    }
    cmd
}

/// Lock modes that stop writers (INSERT, UPDATE, DELETE) but not readers.
pub fn blocks_writes(mode: &str) -> bool {
    matches!(
        mode,
        "ShareLock" | "ShareRowExclusiveLock" | "ExclusiveLock"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_their_targets_and_lock_levels() {
        let c = classify("ALTER TABLE public.orders ALTER COLUMN total TYPE numeric");
        assert_eq!(
            (c.tag.as_str(), c.target.as_deref(), c.mode),
            ("ALTER TABLE", Some("orders"), Some("AccessExclusiveLock"))
        );
        let c = classify(
            "create unique index concurrently if not exists o_idx on only \"Orders\" (id)",
        );
        assert_eq!(
            (c.tag.as_str(), c.target.as_deref(), c.mode, c.concurrently),
            (
                "CREATE INDEX",
                Some("Orders"),
                Some("ShareUpdateExclusiveLock"),
                true
            )
        );
        let c = classify("-- why\nCREATE INDEX o_idx ON orders (id)");
        assert_eq!(
            (c.target.as_deref(), c.mode),
            (Some("orders"), Some("ShareLock"))
        );
        let c = classify("ALTER TABLE orders ADD CONSTRAINT pos CHECK (total > 0)");
        assert!(c.adds_validated_constraint);
        let c = classify("ALTER TABLE orders ADD CONSTRAINT pos CHECK (total > 0) NOT VALID");
        assert!(!c.adds_validated_constraint);
        let c = classify("ALTER TABLE orders VALIDATE CONSTRAINT pos");
        assert_eq!(c.mode, Some("ShareUpdateExclusiveLock"));
        assert!(c.validates_constraint);
        let c =
            classify("ALTER TABLE orders ADD CONSTRAINT fk FOREIGN KEY (c) REFERENCES customers");
        assert_eq!(c.mode, Some("ShareRowExclusiveLock"));
        assert!(classify("ALTER TABLE orders DROP COLUMN note").removes_data);
        assert!(!classify("ALTER TABLE orders ALTER COLUMN note DROP NOT NULL").removes_data);
        assert_eq!(
            classify("LOCK orders IN SHARE ROW EXCLUSIVE MODE").mode,
            Some("ShareRowExclusiveLock")
        );
        assert_eq!(classify("begin").tx, TxEffect::Begin);
        assert_eq!(classify("ROLLBACK TO SAVEPOINT a").tx, TxEffect::None);
        assert_eq!(classify("COMMIT").tx, TxEffect::End);
        assert_eq!(
            classify("CREATE OR REPLACE FUNCTION f() RETURNS int AS 'select 1' LANGUAGE sql").tag,
            "CREATE FUNCTION"
        );
        assert_eq!(
            classify("INSERT INTO t VALUES (1)").target.as_deref(),
            Some("t")
        );
        assert_eq!(classify("").tag, "");
    }
}
