//! The import check: which top-level module may use which.
//!
//! The rules are the table under "## Layering" in `ARCHITECTURE.md`, so the page
//! and the check cannot disagree. Every `.rs` file under `src/` is read; comments,
//! strings and character literals are blanked out; then every path that reaches
//! another top-level module counts: `crate::x`, the groups of `use crate::{x, y}`,
//! and `super::` chains that climb out of their own module. A use of a module not
//! in its row, or a module with no row at all, fails the test with the file and
//! line.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The allowed imports: module → the modules it may use (`*`: any).
type Rules = BTreeMap<String, BTreeSet<String>>;

/// One use of another top-level module.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Use {
    target: String,
    line: usize,
}

/// Reads the table under "## Layering": rows of `| `module` | `a`, `b` |`, where
/// "—" (or "nothing") is no module and "everything" is any.
fn parse_rules(markdown: &str) -> Result<Rules, String> {
    let section = markdown
        .split("\n## ")
        .find(|s| s.starts_with("Layering"))
        .ok_or("ARCHITECTURE.md has no \"## Layering\" section")?;
    let mut rules = Rules::new();
    for line in section.lines().filter(|l| l.trim_start().starts_with('|')) {
        let cells: Vec<&str> = line.trim().trim_matches('|').split('|').collect();
        let [module, allowed, ..] = cells.as_slice() else {
            continue;
        };
        let Some(module) = backticked(module).into_iter().next() else {
            continue; // the header and the separator row
        };
        let mut set: BTreeSet<String> = backticked(allowed).into_iter().collect();
        if allowed.contains("everything") {
            set.insert("*".to_owned());
        }
        if rules.insert(module.clone(), set).is_some() {
            return Err(format!(
                "module `{module}` has two rows in the layering table"
            ));
        }
    }
    if rules.is_empty() {
        return Err("the layering table in ARCHITECTURE.md has no rows".into());
    }
    Ok(rules)
}

/// The words between backticks in a table cell.
fn backticked(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// `text` with comments, string literals and character literals replaced by
/// spaces (newlines kept, so line numbers stay right).
fn blank_out(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |out: &mut String, ch: char| out.push(if ch == '\n' { '\n' } else { ' ' });
    let is_ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    let mut i = 0;
    while i < c.len() {
        let next = c.get(i + 1).copied();
        if c[i] == '/' && next == Some('/') {
            while i < c.len() && c[i] != '\n' {
                blank(&mut out, c[i]);
                i += 1;
            }
        } else if c[i] == '/' && next == Some('*') {
            // Block comments nest in Rust.
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, c[i]);
                    i += 1;
                }
            }
        } else if c[i] == 'r'
            && (i == 0
                || !is_ident(c[i - 1])
                || (c[i - 1] == 'b' && (i < 2 || !is_ident(c[i - 2]))))
            && matches!(next, Some('"' | '#'))
        {
            // A raw string: r"..." or r#"..."#, any number of #.
            let mut j = i + 1;
            while c.get(j) == Some(&'#') {
                j += 1;
            }
            if c.get(j) != Some(&'"') {
                out.push(c[i]);
                i += 1;
                continue;
            }
            let hashes = j - i - 1;
            j += 1;
            while j < c.len() {
                if c[j] == '"' && (1..=hashes).all(|k| c.get(j + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            for &ch in &c[i..j.min(c.len())] {
                blank(&mut out, ch);
            }
            i = j;
        } else if c[i] == '"' {
            blank(&mut out, c[i]);
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' && i + 1 < c.len() {
                    blank(&mut out, c[i]);
                    i += 1;
                }
                blank(&mut out, c[i]);
                i += 1;
            }
            if i < c.len() {
                blank(&mut out, c[i]);
                i += 1;
            }
        } else if c[i] == '\'' {
            // A character literal ('x', '\n', '\u{1F600}'); otherwise a lifetime.
            let end = if next == Some('\\') {
                (i + 2..c.len()).find(|&j| c[j] == '\'')
            } else if c.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            match end {
                Some(end) => {
                    for &ch in &c[i..=end] {
                        blank(&mut out, ch);
                    }
                    i = end + 1;
                }
                None => {
                    out.push(c[i]);
                    i += 1;
                }
            }
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Ident(String),
    PathSep,
    Open,
    Close,
    Comma,
    Other,
}

fn tokens(code: &str) -> Vec<(Token, usize)> {
    let c: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    while i < c.len() {
        let ch = c[i];
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() {
            i += 1;
        } else if ch.is_alphabetic() || ch == '_' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            out.push((Token::Ident(c[start..i].iter().collect()), line));
        } else if ch == ':' && c.get(i + 1) == Some(&':') {
            out.push((Token::PathSep, line));
            i += 2;
        } else {
            let t = match ch {
                '{' => Token::Open,
                '}' => Token::Close,
                ',' => Token::Comma,
                _ => Token::Other,
            };
            out.push((t, line));
            i += 1;
        }
    }
    out
}

/// The first segments of the trees in a `{ ... }` group starting at `open`.
fn group_heads(toks: &[(Token, usize)], open: usize) -> Vec<(String, usize)> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut expect_head = true;
    for (t, line) in &toks[open..] {
        match t {
            Token::Open => {
                depth += 1;
                if depth == 1 {
                    expect_head = true;
                }
            }
            Token::Close => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            Token::Comma if depth == 1 => expect_head = true,
            Token::Ident(name) if depth == 1 && expect_head => {
                heads.push((name.clone(), *line));
                expect_head = false;
            }
            _ if depth == 1 => expect_head = false,
            _ => {}
        }
    }
    heads
}

/// The top-level modules a file uses. `path` is the file's module path inside the
/// crate (`["branch", "engine", "database"]`).
fn uses(source: &str, path: &[String]) -> Vec<Use> {
    let toks = tokens(&blank_out(source));
    let ident = |i: usize| match toks.get(i) {
        Some((Token::Ident(s), _)) => Some(s.as_str()),
        _ => None,
    };
    let sep = |i: usize| matches!(toks.get(i), Some((Token::PathSep, _)));
    let mut found = Vec::new();
    // Braces opened by an inline `mod name {`: each puts `super` one level further.
    let mut braces: Vec<bool> = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let line = toks[i].1;
        match &toks[i].0 {
            Token::Open => {
                let inline_mod = i >= 2 && ident(i - 2) == Some("mod") && ident(i - 1).is_some();
                braces.push(inline_mod);
            }
            Token::Close => {
                braces.pop();
            }
            Token::Ident(word) if (word == "crate" || word == "super") && sep(i + 1) => {
                // Where the path lands: how deep below the crate root, after the
                // `super`s (a `crate` lands at the root).
                let depth = path.len() + braces.iter().filter(|m| **m).count();
                let mut j = i;
                let mut level = depth;
                if word == "super" {
                    while ident(j) == Some("super") && sep(j + 1) {
                        level = level.saturating_sub(1);
                        j += 2;
                    }
                    j -= 2;
                } else {
                    level = 0;
                }
                // A path still inside its own top-level module is no import.
                if level == 0 {
                    match &toks.get(j + 2) {
                        Some((Token::Ident(target), _)) => found.push(Use {
                            target: target.clone(),
                            line,
                        }),
                        Some((Token::Open, _)) => {
                            found.extend(
                                group_heads(&toks, j + 2)
                                    .into_iter()
                                    .map(|(target, line)| Use { target, line }),
                            );
                        }
                        _ => {}
                    }
                }
                i = j + 2;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    found
}

/// The module path of a file under `src/`: `branch/engine/mod.rs` → `[branch, engine]`.
fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if let Some(last) = parts.pop() {
        let stem = last.trim_end_matches(".rs");
        if stem != "mod" {
            parts.push(stem.to_owned());
        }
    }
    parts
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// Every broken rule in `files` (`(path under src/, text)`), as readable lines.
fn violations(rules: &Rules, files: &[(PathBuf, String)]) -> Vec<String> {
    let modules: BTreeSet<String> = files
        .iter()
        .filter_map(|(rel, _)| module_path(rel).into_iter().next())
        .filter(|m| m != "lib" && m != "main")
        .collect();
    let mut problems = Vec::new();
    for m in &modules {
        if !rules.contains_key(m) {
            problems.push(format!(
                "module `{m}` has no row in ARCHITECTURE.md's layering table: add one"
            ));
        }
    }
    for (rel, text) in files {
        let path = module_path(rel);
        let Some(own) = path.first().filter(|m| modules.contains(*m)) else {
            continue; // lib.rs and main.rs sit above every module
        };
        let Some(allowed) = rules.get(own) else {
            continue;
        };
        for u in uses(text, &path) {
            let legal = u.target == *own
                || !modules.contains(&u.target)
                || allowed.contains("*")
                || allowed.contains(&u.target);
            if !legal {
                problems.push(format!(
                    "src/{}:{}: `{own}` may not import `{}` (ARCHITECTURE.md, Layering)",
                    rel.display(),
                    u.line,
                    u.target
                ));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        parse_rules(
            "# A\n\n## Layering\n\n| Module | May import |\n| --- | --- |\n\
             | `names` | — |\n| `branch` | `names`, `config` |\n| `proxy` | `branch`, `names` |\n\
             | `config` | `names` |\n| `app` | everything |\n\n## Next\n| `x` | `y` |\n",
        )
        .unwrap()
    }

    fn check(file: &str, text: &str) -> Vec<String> {
        let files = vec![
            (PathBuf::from("names.rs"), String::new()),
            (PathBuf::from("config.rs"), String::new()),
            (PathBuf::from("branch/mod.rs"), String::new()),
            (PathBuf::from("proxy/mod.rs"), String::new()),
            (PathBuf::from("app.rs"), String::new()),
            (PathBuf::from(file), text.to_owned()),
        ];
        violations(&rules(), &files)
    }

    #[test]
    fn the_table_is_read() {
        let r = rules();
        assert!(r["names"].is_empty());
        assert_eq!(r["branch"].len(), 2);
        assert!(r["app"].contains("*"));
        assert!(!r.contains_key("x"), "only the Layering section counts");
    }

    #[test]
    fn forbidden_paths_are_found() {
        let v = check("branch/registry.rs", "use crate::proxy::Proxy;\n");
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("src/branch/registry.rs:1") && v[0].contains("`proxy`"));
        // A path in an expression, not a `use`.
        assert_eq!(
            check("branch/x.rs", "fn f() { crate::proxy::go(); }").len(),
            1
        );
        // Groups, nested ones included.
        let v = check("config.rs", "use crate::{names::N, branch::{A, B}};");
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("`branch`"));
        // `super` chains that climb out of their module.
        assert_eq!(
            check("branch/engine/db.rs", "use super::super::super::proxy::X;").len(),
            1
        );
        assert_eq!(check("branch/mod.rs", "use super::proxy;").len(), 1);
        assert_eq!(
            check("branch/mod.rs", "use super::{names, proxy};").len(),
            1
        );
        // An inline module adds a level.
        let v = check(
            "branch/mod.rs",
            "mod tests {\n use super::super::proxy::P;\n}\n",
        );
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains(":2:"));
    }

    #[test]
    fn allowed_and_inert_paths_pass() {
        let ok = "use crate::names::N;\nuse crate::config::{self, C};\n\
                  use super::registry::R;\nuse super::super::branch::X;\n\
                  // use crate::proxy::Proxy;\n/* crate::proxy:: /* nested */ crate::proxy */\n\
                  const S: &str = \"crate::proxy::x\";\nconst R: &str = r#\"crate::proxy\"#;\n\
                  fn f<'a>(c: char) -> bool { c == '\"' || c == '\\'' }\nfn g() { crate::proxy_like(); }\n\
                  mod t { use super::super::names; }\n";
        assert_eq!(check("branch/engine.rs", ok), Vec::<String>::new());
        // The wiring module may use everything.
        assert!(check("app.rs", "use crate::proxy::P; use crate::branch::B;").is_empty());
    }

    #[test]
    fn a_module_without_a_row_is_reported() {
        let v = check("newleaf.rs", "");
        assert_eq!(v.len(), 1);
        assert!(v[0].contains("`newleaf` has no row"));
    }

    /// The real tree against the real table.
    #[test]
    fn the_crate_keeps_its_layers() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let doc = std::fs::read_to_string(root.join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
        let rules = parse_rules(&doc).unwrap_or_else(|e| panic!("{e}"));
        let src = root.join("src");
        let mut paths = Vec::new();
        rust_files(&src, &mut paths);
        let files: Vec<(PathBuf, String)> = paths
            .into_iter()
            .map(|p| {
                let text = std::fs::read_to_string(&p).expect("source file");
                (p.strip_prefix(&src).expect("under src").to_path_buf(), text)
            })
            .collect();
        assert!(files.len() > 20, "the walk found the sources");
        let problems = violations(&rules, &files);
        assert!(
            problems.is_empty(),
            "forbidden imports:\n{}",
            problems.join("\n")
        );
    }
}
