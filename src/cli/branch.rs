//! `offshoot branch list|show|create|suspend|reset|delete`.

use anyhow::{anyhow, Result};
use serde_json::Value;

use super::output::{self, cell, Align, OutputArg, Table};
use super::{api, call, split_name, AdminApi, ApiArgs, ApiRefusal};

/// List, show, create or delete branches through a running proxy's admin API.
#[derive(clap::Args, Debug)]
pub struct BranchArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(subcommand)]
    pub action: BranchAction,
}

#[derive(clap::Subcommand, Debug)]
pub enum BranchAction {
    /// Show every branch with its state, connections and last activity.
    List {
        #[command(flatten)]
        output: OutputArg,
    },
    /// Show one branch: its state, deadlines and connection strings.
    Show {
        /// `<source>.<branch>`, e.g. `shop.pr-42`.
        name: String,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Create a branch ahead of time (first connections then find it ready).
    Create {
        /// `<source>.<branch>`, e.g. `shop.pr-42`.
        name: String,
        /// Never expire this branch.
        #[arg(long)]
        persistent: bool,
        /// Snapshot to clone (`instance` sources); default the newest.
        #[arg(long)]
        snapshot: Option<String>,
    },
    /// Stop a branch's server now (`instance` sources); the next connection starts it.
    Suspend {
        /// `<source>.<branch>`, e.g. `shop.pr-42`.
        name: String,
    },
    /// Make a branch again from a snapshot, under the same name and address.
    /// Refused while clients are connected, unless --force.
    Reset {
        /// `<source>.<branch>`, e.g. `shop.qa`.
        name: String,
        /// Snapshot to make it from; default the newest (or the live source, where
        /// the source has no snapshots).
        #[arg(long)]
        snapshot: Option<String>,
        /// Terminate open sessions (they get 57P01) instead of refusing.
        #[arg(long)]
        force: bool,
    },
    /// Delete a branch. Refused while clients are connected, unless --force.
    Delete {
        /// `<source>.<branch>`, e.g. `shop.pr-42`.
        name: String,
        /// Terminate open sessions first.
        #[arg(long)]
        force: bool,
    },
}

impl BranchArgs {
    pub fn run(&self) -> Result<()> {
        let admin = &self.api.connect()?;
        match &self.action {
            BranchAction::List { output } => list(admin, output.output),
            BranchAction::Show { name, output } => {
                let (s, b) = split_name(name)?;
                show(admin, s, b, output.output)
            }
            BranchAction::Create {
                name,
                persistent,
                snapshot,
            } => {
                let (s, b) = split_name(name)?;
                create(admin, s, b, *persistent, snapshot.as_deref())
            }
            BranchAction::Suspend { name } => {
                let (s, b) = split_name(name)?;
                suspend(admin, s, b)
            }
            BranchAction::Reset {
                name,
                snapshot,
                force,
            } => {
                let (s, b) = split_name(name)?;
                super::reset::reset(admin, s, b, snapshot.as_deref(), *force)
            }
            BranchAction::Delete { name, force } => {
                let (s, b) = split_name(name)?;
                delete(admin, s, b, *force)
            }
        }
    }
}

/// The state, with `(keep)` for a branch that never expires.
fn state(b: &Value) -> String {
    if b["persistent"].as_bool() == Some(true) {
        format!("{} (keep)", cell(b, "state"))
    } else {
        cell(b, "state")
    }
}

/// The branches as a table, sorted by source and branch.
pub fn branch_table(v: &Value) -> Table {
    let mut rows = v.as_array().cloned().unwrap_or_default();
    rows.sort_by_key(|b| (cell(b, "source"), cell(b, "branch")));
    let mut t = Table::new(&[
        ("SOURCE", Align::Left),
        ("BRANCH", Align::Left),
        ("STATE", Align::Left),
        ("CONNS", Align::Right),
        ("LAST ACTIVE", Align::Left),
        ("SNAPSHOT", Align::Left),
        ("CLONE", Align::Left),
    ]);
    for b in &rows {
        t.row(vec![
            cell(b, "source"),
            cell(b, "branch"),
            state(b),
            cell(b, "connections"),
            cell(b, "last_active"),
            cell(b, "snapshot"),
            cell(b, "clone_name"),
        ]);
    }
    t
}

/// Prints the branches.
pub fn list(admin: &AdminApi, format: output::Format) -> Result<()> {
    let answer = call(admin, "GET", "/api/v1/branches", None)?;
    output::print(format, &answer, branch_table)
}

/// One branch as `field  value` lines: state, deadlines, connection strings.
pub fn detail_table(b: &Value) -> Table {
    let mut t = Table::new(&[("FIELD", Align::Left), ("VALUE", Align::Left)]);
    let mut add = |k: &str, v: String| {
        if !v.is_empty() {
            t.row(vec![k.to_owned(), v]);
        }
    };
    add(
        "branch",
        format!("{}.{}", cell(b, "source"), cell(b, "branch")),
    );
    add("state", state(b));
    add("engine", cell(b, "engine"));
    add("connections", cell(b, "connections"));
    add("created_at", cell(b, "created_at"));
    add("created_by", cell(b, "created_by"));
    add("last_active", cell(b, "last_active"));
    // Deadlines and protection, shown when the API gives them.
    for k in [
        "policy",
        "expires_at",
        "protected",
        "protected_until",
        "size_bytes",
    ] {
        add(k, cell(b, k));
    }
    add("snapshot", cell(b, "snapshot"));
    add("clone", cell(b, "clone_name"));
    add("psql", cell(&b["connection"], "url"));
    add("libpq", cell(&b["connection"], "libpq"));
    add("jdbc", cell(&b["connection"], "jdbc"));
    t
}

/// Prints one branch.
pub fn show(admin: &AdminApi, source: &str, branch: &str, format: output::Format) -> Result<()> {
    let answer = call(
        admin,
        "GET",
        &format!("/api/v1/branches/{source}/{branch}"),
        None,
    )?;
    output::print(format, &answer, detail_table)
}

/// Creates a branch ahead of time, from `snapshot` if given (else the newest).
pub fn create(
    admin: &AdminApi,
    source: &str,
    branch: &str,
    persistent: bool,
    snapshot: Option<&str>,
) -> Result<()> {
    let mut body =
        serde_json::json!({ "source": source, "branch": branch, "persistent": persistent });
    if let Some(s) = snapshot {
        body["snapshot"] = s.into();
    }
    let v = api(admin, "POST", "/api/v1/branches", Some(&body.to_string()))?;
    let from = match v["snapshot"].as_str() {
        Some(s) => format!(", snapshot {s}"),
        None => String::new(),
    };
    println!(
        "{}.{} is {} (clone {}{from})",
        source,
        branch,
        v["state"].as_str().unwrap_or("?"),
        v["clone_name"].as_str().unwrap_or("?")
    );
    Ok(())
}

/// Stops a branch's server now; the next connection starts it again.
pub fn suspend(admin: &AdminApi, source: &str, branch: &str) -> Result<()> {
    let path = format!("/api/v1/branches/{source}/{branch}/suspend");
    api(admin, "POST", &path, None)?;
    println!("{source}.{branch} suspended");
    Ok(())
}

/// Deletes a branch; `force` terminates its sessions first.
pub fn delete(admin: &AdminApi, source: &str, branch: &str, force: bool) -> Result<()> {
    let path = format!(
        "/api/v1/branches/{source}/{branch}{}",
        if force { "?force=true" } else { "" }
    );
    if let Err(e) = api(admin, "DELETE", &path, None) {
        return Err(match e.downcast::<ApiRefusal>() {
            // The API's advice names its query parameter; here the flag is --force.
            Ok(r) if r.status == 409 && r.message.contains("?force=true") => {
                let message = r
                    .message
                    .split("; delete with ?force=true")
                    .next()
                    .unwrap_or("");
                anyhow!(
                    "{message} (HTTP {}); use --force to terminate them",
                    r.status
                )
            }
            Ok(r) => r.into(),
            Err(e) => e,
        });
    }
    println!("{source}.{branch} deleted");
    Ok(())
}
