//! Splitting SQL text (a migration file, a snapshot transform) into statements, the
//! way the server would read them:
//! `;` ends a statement only outside strings (`'...'`, `E'...'` with backslash
//! escapes), quoted identifiers, dollar-quoted bodies (`$fn$ ... $fn$`) and comments
//! (`-- ...` and nested `/* ... */`).
//!
//! Total: any input gives a list of statements, never a panic; an unterminated
//! string or comment runs to the end of the text, where the server reports it.

/// One statement of a file: its text (trimmed, without the final `;`) and the line
/// it starts on (1-based), for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub sql: String,
    pub line: usize,
}

/// The statements of `text`, in order. Pieces holding only comments and blanks are
/// dropped.
pub fn split(text: &str) -> Vec<Statement> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    // Whether the current piece has anything but comments and blanks.
    let mut has_code = false;
    let mut code_start = None;
    while i < b.len() {
        let c = b[i];
        match c {
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0usize;
                while i < b.len() {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'\'' => {
                note_code(i, &mut has_code, &mut code_start);
                let escapes =
                    i > 0 && matches!(b[i - 1], b'E' | b'e') && !ident_byte_before(b, i - 1);
                i += 1;
                while i < b.len() {
                    if escapes && b[i] == b'\\' {
                        i += 2;
                        continue;
                    }
                    if b[i] == b'\'' {
                        if b.get(i + 1) == Some(&b'\'') {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
            }
            b'"' => {
                note_code(i, &mut has_code, &mut code_start);
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += 1;
                }
                i += 1;
            }
            b'$' if !ident_byte_before(b, i) => {
                note_code(i, &mut has_code, &mut code_start);
                match dollar_tag(&b[i..]) {
                    Some(tag_len) => {
                        let tag = &b[i..i + tag_len];
                        i += tag_len;
                        match find(&b[i..], tag) {
                            Some(at) => i += at + tag_len,
                            None => i = b.len(),
                        }
                    }
                    None => i += 1,
                }
            }
            b';' => {
                if let Some(cs) = code_start.take() {
                    out.push(piece(text, cs, i));
                }
                has_code = false;
                i += 1;
            }
            c if c.is_ascii_whitespace() => i += 1,
            _ => {
                note_code(i, &mut has_code, &mut code_start);
                i += 1;
            }
        }
    }
    if let Some(cs) = code_start {
        out.push(piece(text, cs, b.len()));
    }
    out
}

fn note_code(at: usize, has: &mut bool, start: &mut Option<usize>) {
    if !*has {
        *has = true;
        *start = Some(at);
    }
}

fn piece(text: &str, from: usize, to: usize) -> Statement {
    let to = to.min(text.len());
    Statement {
        sql: text.get(from..to).unwrap_or("").trim().to_owned(),
        line: text.as_bytes()[..from]
            .iter()
            .filter(|&&c| c == b'\n')
            .count()
            + 1,
    }
}

fn ident_byte_before(b: &[u8], i: usize) -> bool {
    i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_' || b[i - 1] >= 0x80)
}

/// The length of a dollar-quote opening tag at the start of `b` (`$$` or `$name$`).
fn dollar_tag(b: &[u8]) -> Option<usize> {
    let mut j = 1;
    while j < b.len() {
        match b[j] {
            b'$' => return Some(j + 1),
            c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => j += 1,
            c if c.is_ascii_digit() && j > 1 => j += 1,
            _ => return None,
        }
    }
    None
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sqls(text: &str) -> Vec<String> {
        split(text).into_iter().map(|s| s.sql).collect()
    }

    #[test]
    fn plain_statements_and_comments() {
        assert_eq!(
            sqls("-- head\nSELECT 1;\n/* a; /* nested; */ b */ SELECT 2 ; ;\n-- tail"),
            ["SELECT 1", "SELECT 2"]
        );
        assert_eq!(split("\n\nSELECT 1;")[0].line, 3);
    }

    #[test]
    fn strings_identifiers_and_dollar_quotes_hide_semicolons() {
        assert_eq!(
            sqls("SELECT 'a;''b'; SELECT E'x\\';y'; SELECT \"c;d\" FROM t"),
            [
                "SELECT 'a;''b'",
                "SELECT E'x\\';y'",
                "SELECT \"c;d\" FROM t"
            ]
        );
        let f = "CREATE FUNCTION f() RETURNS int AS $fn$ BEGIN RETURN 1; END $fn$ LANGUAGE plpgsql";
        assert_eq!(sqls(&format!("{f};SELECT $$;$$")), [f, "SELECT $$;$$"]);
        // `$1` is a parameter, not a quote; `a$b$` is an identifier.
        assert_eq!(
            sqls("SELECT $1; SELECT a$b$ FROM t;"),
            ["SELECT $1", "SELECT a$b$ FROM t"]
        );
    }

    #[test]
    fn the_shipped_examples_read_as_one_statement_each() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/migrations");
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        assert_eq!(names.len(), 3);
        for p in names {
            let st = split(&std::fs::read_to_string(&p).unwrap());
            assert_eq!(st.len(), 1, "{p:?}");
            assert!(
                st[0].sql.starts_with("ALTER") || st[0].sql.starts_with("CREATE"),
                "{p:?}"
            );
        }
    }

    #[test]
    fn unterminated_pieces_run_to_the_end() {
        assert_eq!(sqls("SELECT 'abc; SELECT 2"), ["SELECT 'abc; SELECT 2"]);
        assert_eq!(sqls("SELECT $x$ ;"), ["SELECT $x$ ;"]);
        assert_eq!(sqls("/* open"), Vec::<String>::new());
        for s in ["'", "\"", "$", "$a", "E'\\", "/*", "--", ";;;", "é'é;"] {
            let _ = split(s);
        }
    }

    #[test]
    fn statements_split_at_semicolons_outside_quotes_and_comments() {
        let sql = "-- header; not a statement\n\
                   UPDATE a SET x = 'semi;colon' , y = 'it''s;';\n\
                   /* block; /* nested; */ still; */ SELECT \"odd;name\" FROM t;\n\
                   DO $$ BEGIN PERFORM 1; END $$;\n\
                   CREATE FUNCTION f() RETURNS int AS $fn$ SELECT 1; $fn$ LANGUAGE sql;\n\
                   SELECT E'a\\';b', 'C:\\';\n\
                   ;  -- empty\n\
                   SELECT $1";
        let got = sqls(sql);
        assert_eq!(
            got,
            vec![
                "UPDATE a SET x = 'semi;colon' , y = 'it''s;'",
                "SELECT \"odd;name\" FROM t",
                "DO $$ BEGIN PERFORM 1; END $$",
                "CREATE FUNCTION f() RETURNS int AS $fn$ SELECT 1; $fn$ LANGUAGE sql",
                "SELECT E'a\\';b', 'C:\\'",
                "SELECT $1",
            ]
        );
        assert!(sqls("-- nothing\n /* at all */ ;\n").is_empty());
        // Unterminated input never panics.
        assert_eq!(
            sqls("SELECT a$b$ FROM t; SELECT 2"),
            vec!["SELECT a$b$ FROM t", "SELECT 2"]
        );
        for s in ["'abc", "$$ abc", "/* abc", "\"abc", "$x", "E'\\", "$é"] {
            let _ = sqls(s);
        }
    }
}
