//! What the rehearsal reads from the branch's catalogs: the relations with their
//! storage (relfilenode) and size, the schema as comparable definitions, row counts
//! and the WAL position.

use std::collections::{BTreeMap, HashMap};

use tokio_postgres::Client;

use crate::rehearsal_report::{SchemaChange, SchemaDiff, SchemaObject};

/// Namespaces that belong to the server, never to the application.
const USER_NS: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema') \
     AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'";

/// One relation's identity and storage at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    pub name: String,
    /// `pg_class.relkind`: `r` table, `p` partitioned, `i`/`I` index, `m` matview.
    pub kind: char,
    pub filenode: u32,
    /// The table of an index.
    pub table: Option<u32>,
    pub size: u64,
}

impl Relation {
    pub fn is_table(&self) -> bool {
        matches!(self.kind, 'r' | 'p')
    }

    pub fn kind_word(&self) -> &'static str {
        match self.kind {
            'r' | 'p' => "table",
            'i' | 'I' => "index",
            'm' => "materialized view",
            _ => "relation",
        }
    }
}

/// The application's relations by OID.
pub type Relations = HashMap<u32, Relation>;

/// The relations of the database `c` is connected to, as `c` sees them (inside its
/// transaction, so a migration session sees its own uncommitted changes).
pub async fn relations(c: &Client) -> Result<Relations, tokio_postgres::Error> {
    let sql = format!(
        "SELECT c.oid, c.oid::regclass::text, c.relkind::text, c.relfilenode, i.indrelid, \
                pg_relation_size(c.oid) \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         LEFT JOIN pg_index i ON i.indexrelid = c.oid \
         WHERE c.relkind IN ('r', 'p', 'i', 'I', 'm') AND {USER_NS}"
    );
    let rows = c.query(&sql, &[]).await?;
    Ok(rows
        .iter()
        .map(|r| {
            let kind: String = r.get(2);
            let table: Option<u32> = r.get(4);
            (
                r.get::<_, u32>(0),
                Relation {
                    name: r.get(1),
                    kind: kind.chars().next().unwrap_or('?'),
                    filenode: r.get(3),
                    table,
                    size: r.get::<_, i64>(5).max(0) as u64,
                },
            )
        })
        .collect())
}

/// The current WAL insert position, in bytes.
pub async fn wal_position(c: &Client) -> Result<u64, tokio_postgres::Error> {
    let row = c
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await?;
    Ok(parse_lsn(row.get(0)).unwrap_or(0))
}

/// `16/B374D848` → bytes.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// The schema as `(kind, name) → definition`.
pub type Schema = BTreeMap<(String, String), String>;

/// Reads every kind of object the diff covers.
pub async fn schema(c: &Client) -> Result<Schema, tokio_postgres::Error> {
    let not_extension = |oid: &str, class: &str| {
        format!(
            "NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = '{class}'::regclass \
             AND d.objid = {oid} AND d.deptype = 'e')"
        )
    };
    let parts = [
        format!(
            "SELECT 'table', c.oid::regclass::text, \
                    CASE c.relkind WHEN 'p' THEN 'partitioned table' ELSE 'table' END \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND {USER_NS} AND {}",
            not_extension("c.oid", "pg_class")
        ),
        format!(
            "SELECT 'column', c.oid::regclass::text || '.' || quote_ident(a.attname), \
                    format_type(a.atttypid, a.atttypmod) \
                    || CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END \
                    || coalesce(' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid), '') \
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
             WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p') AND {USER_NS}"
        ),
        format!(
            "SELECT 'index', c.oid::regclass::text, pg_get_indexdef(c.oid) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('i', 'I') AND {USER_NS}"
        ),
        format!(
            "SELECT 'constraint', co.conrelid::regclass::text || '.' || quote_ident(co.conname), \
                    pg_get_constraintdef(co.oid) \
             FROM pg_constraint co JOIN pg_namespace n ON n.oid = co.connamespace \
             WHERE co.conrelid <> 0 AND {USER_NS}"
        ),
        format!(
            "SELECT CASE c.relkind WHEN 'm' THEN 'materialized view' ELSE 'view' END, \
                    c.oid::regclass::text, pg_get_viewdef(c.oid) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('v', 'm') AND {USER_NS} AND {}",
            not_extension("c.oid", "pg_class")
        ),
        format!(
            "SELECT 'function', p.oid::regprocedure::text, pg_get_functiondef(p.oid) \
             FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE p.prokind IN ('f', 'p') AND {USER_NS} AND {}",
            not_extension("p.oid", "pg_proc")
        ),
        format!(
            "SELECT 'trigger', c.oid::regclass::text || '.' || quote_ident(t.tgname), \
                    pg_get_triggerdef(t.oid) \
             FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE NOT t.tgisinternal AND {USER_NS}"
        ),
        format!(
            "SELECT 'enum', t.oid::regtype::text, \
                    string_agg(quote_literal(e.enumlabel), ', ' ORDER BY e.enumsortorder) \
             FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid \
             JOIN pg_namespace n ON n.oid = t.typnamespace \
             WHERE {USER_NS} GROUP BY t.oid"
        ),
        format!(
            "SELECT 'sequence', s.seqrelid::regclass::text, \
                    format_type(s.seqtypid, NULL) || ' increment ' || s.seqincrement \
                    || ' start ' || s.seqstart || CASE WHEN s.seqcycle THEN ' cycle' ELSE '' END \
             FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {USER_NS}"
        ),
        "SELECT 'extension', e.extname::text, e.extversion FROM pg_extension e".to_owned(),
    ];
    let mut out = Schema::new();
    for sql in parts {
        for r in c.query(&sql, &[]).await? {
            let def: Option<String> = r.get(2);
            out.insert((r.get(0), r.get(1)), def.unwrap_or_default());
        }
    }
    Ok(out)
}

/// Objects added, removed and changed between two readings.
pub fn diff(before: &Schema, after: &Schema) -> SchemaDiff {
    let mut d = SchemaDiff::default();
    for ((kind, name), def) in after {
        match before.get(&(kind.clone(), name.clone())) {
            None => d.added.push(SchemaObject {
                kind: kind.clone(),
                name: name.clone(),
                definition: def.clone(),
            }),
            Some(old) if old != def => d.changed.push(SchemaChange {
                kind: kind.clone(),
                name: name.clone(),
                before: old.clone(),
                after: def.clone(),
            }),
            Some(_) => {}
        }
    }
    for ((kind, name), def) in before {
        if !after.contains_key(&(kind.clone(), name.clone())) {
            d.removed.push(SchemaObject {
                kind: kind.clone(),
                name: name.clone(),
                definition: def.clone(),
            });
        }
    }
    d
}

/// Exact row counts of the application's tables (partitioned parents excluded:
/// their partitions are counted).
pub async fn row_counts(c: &Client) -> Result<BTreeMap<String, i64>, tokio_postgres::Error> {
    let sql = format!(
        "SELECT c.oid::regclass::text FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind = 'r' AND {USER_NS} ORDER BY 1"
    );
    let mut out = BTreeMap::new();
    for r in c.query(&sql, &[]).await? {
        let name: String = r.get(0);
        // The name comes from regclass output, which quotes what needs quoting.
        let n: i64 = c
            .query_one(&format!("SELECT count(*) FROM {name}"), &[])
            .await?
            .get(0);
        out.insert(name, n);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_and_diffs() {
        assert_eq!(parse_lsn("0/10"), Some(16));
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        assert_eq!(parse_lsn("x"), None);
        let k = |a: &str, b: &str| (a.to_owned(), b.to_owned());
        let before = Schema::from([
            (k("table", "t"), "table".into()),
            (k("column", "t.a"), "integer".into()),
            (k("column", "t.b"), "text".into()),
        ]);
        let after = Schema::from([
            (k("table", "t"), "table".into()),
            (k("column", "t.a"), "bigint".into()),
            (k("column", "t.c"), "text".into()),
        ]);
        let d = diff(&before, &after);
        assert_eq!(d.added[0].name, "t.c");
        assert_eq!(d.removed[0].name, "t.b");
        assert_eq!(
            (d.changed[0].before.as_str(), d.changed[0].after.as_str()),
            ("integer", "bigint")
        );
    }
}
