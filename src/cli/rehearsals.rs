//! `offshoot rehearsals list|show`: the rehearsal reports a running proxy keeps
//! (`GET /api/v1/rehearsals[/{id}]`), as a table, as the API's JSON, or (one
//! report) as the same Markdown `offshoot rehearse --report-md` writes.

use anyhow::{anyhow, Result};
use serde_json::Value;

use super::output::{self, cell, Align, OutputArg, Table};
use super::{call, ApiArgs};
use crate::rehearsal_report::{markdown, Report};

/// List or show the migration rehearsal reports a running proxy keeps.
#[derive(clap::Args, Debug)]
pub struct RehearsalsArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(subcommand)]
    pub action: Action,
}

#[derive(clap::Subcommand, Debug)]
pub enum Action {
    /// The stored reports, newest first.
    List {
        #[command(flatten)]
        output: OutputArg,
    },
    /// One report: Markdown (as for a pull-request comment) or the API's JSON.
    Show {
        /// The report's id (8 hex digits, from `offshoot rehearsals list`).
        id: String,
        /// `markdown` (default) or `json`.
        #[arg(long, short, value_enum, default_value_t = ShowFormat::Markdown)]
        output: ShowFormat,
    },
}

/// How `show` prints a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ShowFormat {
    Markdown,
    Json,
}

impl RehearsalsArgs {
    pub fn run(&self) -> Result<()> {
        let admin = self.api.connect()?;
        match &self.action {
            Action::List { output } => {
                let answer = call(&admin, "GET", "/api/v1/rehearsals", None)?;
                output::print(output.output, &answer, table)
            }
            Action::Show { id, output } => {
                if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(anyhow!(
                        "{id:?} is not a report id (8 hex digits; see `offshoot rehearsals list`)"
                    ));
                }
                let answer = call(&admin, "GET", &format!("/api/v1/rehearsals/{id}"), None)?;
                match output {
                    ShowFormat::Json => println!("{}", answer.text.trim_end()),
                    ShowFormat::Markdown => {
                        let report: Report = serde_json::from_value(answer.value).map_err(|e| {
                            anyhow!("report {id} is not one this version reads ({e}); try --output json")
                        })?;
                        print!("{}", markdown(&report));
                    }
                }
                Ok(())
            }
        }
    }
}

/// The listing's table: one row a report.
fn table(list: &Value) -> Table {
    let mut t = Table::new(&[
        ("ID", Align::Left),
        ("SOURCE", Align::Left),
        ("BRANCH", Align::Left),
        ("STARTED", Align::Left),
        ("OUTCOME", Align::Left),
        ("EXIT", Align::Right),
        ("STATEMENTS", Align::Right),
        ("HAZARDS", Align::Right),
    ]);
    for r in list.as_array().into_iter().flatten() {
        t.row(
            [
                "id",
                "source",
                "branch",
                "started_at",
                "outcome",
                "exit_code",
                "statements",
                "hazards",
            ]
            .iter()
            .map(|k| cell(r, k))
            .collect(),
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listing_has_a_row_per_report() {
        let list = serde_json::json!([
            {"id": "0a1b2c3d", "source": "shop", "branch": "rehearse-1", "started_at": "2026-11-30T12:00:00Z",
             "outcome": "hazard_found", "exit_code": 3, "statements": 2, "hazards": 1},
            {"id": "00000001", "source": "shop", "branch": "rehearse-2", "started_at": "2026-11-30T11:00:00Z",
             "outcome": "passed", "exit_code": 0, "statements": 10, "hazards": 0},
        ]);
        let text = table(&list).render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("ID "), "{text}");
        assert!(
            lines[1].contains("hazard_found") && lines[1].ends_with(" 1"),
            "{text}"
        );
        assert!(
            lines[2].contains("passed") && lines[2].ends_with(" 0"),
            "{text}"
        );
    }
}
