//! `offshoot snapshot create|list|delete`.

use anyhow::Result;
use serde_json::Value;

use super::output::{self, cell, Align, OutputArg, Table};
use super::progress::Spinner;
use super::{api, call, AdminApi, ApiArgs};

/// Take, list or delete snapshots of an `instance` source through a running
/// proxy's admin API.
#[derive(clap::Args, Debug)]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(subcommand)]
    pub action: SnapshotAction,
}

#[derive(clap::Subcommand, Debug)]
pub enum SnapshotAction {
    /// Copy the source now and seal the copy; new branches start from it.
    Create {
        /// The source's name.
        source: String,
    },
    /// Show the source's snapshots and the branches made from each.
    List {
        /// The source's name.
        source: String,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Delete a snapshot; refused while a branch was made from it.
    Delete {
        /// The source's name.
        source: String,
        /// The snapshot's name (see `snapshot list`).
        name: String,
    },
}

impl SnapshotArgs {
    pub fn run(&self) -> Result<()> {
        let admin = &self.api.connect()?;
        match &self.action {
            SnapshotAction::Create { source } => create(admin, source),
            SnapshotAction::List { source, output } => list(admin, source, output.output),
            SnapshotAction::Delete { source, name } => delete(admin, source, name),
        }
    }
}

/// Takes and seals a snapshot of `source`, with a spinner on a terminal.
pub fn create(admin: &AdminApi, source: &str) -> Result<()> {
    let path = format!("/api/v1/sources/{source}/snapshots");
    let spinner = Spinner::start(format!("taking a snapshot of {source}"));
    let v = api(admin, "POST", &path, None);
    spinner.finish();
    let v = v?;
    println!(
        "snapshot {} of {source} taken ({} MB, {})",
        v["name"].as_str().unwrap_or("?"),
        v["size_bytes"].as_u64().unwrap_or(0) / 1_000_000,
        v["origin"].as_str().unwrap_or("?")
    );
    Ok(())
}

/// The snapshots as a table, oldest first (as the API lists them).
pub fn snapshot_table(v: &Value) -> Table {
    let mut t = Table::new(&[
        ("NAME", Align::Left),
        ("CREATED", Align::Left),
        ("MB", Align::Right),
        ("ORIGIN", Align::Left),
        ("BRANCHES", Align::Left),
    ]);
    for s in v.as_array().into_iter().flatten() {
        t.row(vec![
            cell(s, "name"),
            cell(s, "created_at"),
            (s["size_bytes"].as_u64().unwrap_or(0) / 1_000_000).to_string(),
            cell(s, "origin"),
            cell(s, "branches"),
        ]);
    }
    t
}

/// Prints `source`'s snapshots.
pub fn list(admin: &AdminApi, source: &str, format: output::Format) -> Result<()> {
    let answer = call(
        admin,
        "GET",
        &format!("/api/v1/sources/{source}/snapshots"),
        None,
    )?;
    output::print(format, &answer, snapshot_table)
}

/// Deletes a snapshot no branch uses.
pub fn delete(admin: &AdminApi, source: &str, name: &str) -> Result<()> {
    let path = format!("/api/v1/sources/{source}/snapshots/{name}");
    api(admin, "DELETE", &path, None)?;
    println!("snapshot {name} of {source} deleted");
    Ok(())
}
