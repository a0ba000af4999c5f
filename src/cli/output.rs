//! `--output table|json`: how a listing command prints what the API answered.
//!
//! `json` prints the API's answer exactly as it came (scripts get the same JSON
//! as from the API itself); `table` prints aligned columns for people. A listing
//! command takes an [`OutputArg`] and calls [`print`] with its table.

use anyhow::Result;
use serde_json::Value;

use super::Answer;

/// The form of a listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns, for people.
    #[default]
    Table,
    /// The admin API's JSON answer, unchanged, for scripts.
    Json,
}

/// The `--output` option of a listing command.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct OutputArg {
    /// Print an aligned table, or the API's JSON unchanged.
    #[arg(long, short, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

/// How a column lines up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    /// Numbers.
    Right,
}

/// A table: a header row, then rows of cells.
#[derive(Debug, Default)]
pub struct Table {
    columns: Vec<(String, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these columns.
    pub fn new(columns: &[(&str, Align)]) -> Self {
        Self {
            columns: columns
                .iter()
                .map(|(name, align)| (name.to_string(), *align))
                .collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are empty, extra ones dropped.
    pub fn row(&mut self, cells: Vec<String>) {
        let mut cells = cells;
        cells.resize(self.columns.len(), String::new());
        self.rows.push(cells);
    }

    /// The table as text: columns two spaces apart, each as wide as its widest
    /// cell, no trailing spaces.
    pub fn render(&self) -> String {
        let width = |i: usize| {
            self.rows
                .iter()
                .map(|r| r[i].chars().count())
                .chain([self.columns[i].0.chars().count()])
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..self.columns.len()).map(width).collect();
        let header: Vec<String> = self.columns.iter().map(|(n, _)| n.clone()).collect();
        let mut out = String::new();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = widths[i] - cell.chars().count();
                match self.columns[i].1 {
                    Align::Left => {
                        line.push_str(cell);
                        line.extend(std::iter::repeat_n(' ', pad));
                    }
                    Align::Right => {
                        line.extend(std::iter::repeat_n(' ', pad));
                        line.push_str(cell);
                    }
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Prints a listing: the API's JSON as it came, or the table `table` makes of it.
pub fn print(format: Format, answer: &Answer, table: impl FnOnce(&Value) -> Table) -> Result<()> {
    match format {
        Format::Json => {
            let text = answer.text.trim_end();
            println!("{text}");
        }
        Format::Table => print!("{}", table(&answer.value).render()),
    }
    Ok(())
}

/// A field of a JSON object as table text (`""` when absent or null).
pub fn cell(v: &Value, key: &str) -> String {
    match &v[key] {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up() {
        let mut t = Table::new(&[
            ("NAME", Align::Left),
            ("CONNS", Align::Right),
            ("STATE", Align::Left),
        ]);
        t.row(vec!["shop.pr-1".into(), "12".into(), "ready".into()]);
        t.row(vec!["a".into(), "3".into()]);
        assert_eq!(
            t.render(),
            "NAME       CONNS  STATE\nshop.pr-1     12  ready\na              3\n"
        );
    }

    #[test]
    fn cells_read_strings_numbers_and_lists() {
        let v = serde_json::json!({"s": "x", "n": 3, "l": ["a", "b"], "z": null});
        assert_eq!(cell(&v, "s"), "x");
        assert_eq!(cell(&v, "n"), "3");
        assert_eq!(cell(&v, "l"), "a,b");
        assert_eq!(cell(&v, "z"), "");
        assert_eq!(cell(&v, "missing"), "");
    }
}
