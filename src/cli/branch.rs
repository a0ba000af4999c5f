//! `offshoot branch list|show|create|update|suspend|reset|delete`.

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
        /// Remove it this long after creation ("3d", "12h"), whatever its policy says.
        #[arg(long, conflicts_with = "expires_at")]
        ttl: Option<String>,
        /// Remove it at this time (RFC 3339, e.g. 2030-01-31T18:00:00Z).
        #[arg(long)]
        expires_at: Option<String>,
        /// Refuse its deletion and reset unless forced.
        #[arg(long)]
        protected: bool,
        /// Protected until this time (RFC 3339); implies --protected.
        #[arg(long)]
        protected_until: Option<String>,
        /// When it exists already: `reuse` it (the default) or `fail`.
        #[arg(long, value_parser = ["reuse", "fail"])]
        if_exists: Option<String>,
    },
    /// Change a branch's TTL or protection.
    Update {
        /// `<source>.<branch>`, e.g. `shop.pr-42`.
        name: String,
        /// Remove it this long from now ("1d").
        #[arg(long, conflicts_with_all = ["expires_at", "no_ttl"])]
        ttl: Option<String>,
        /// Remove it at this time (RFC 3339).
        #[arg(long, conflicts_with = "no_ttl")]
        expires_at: Option<String>,
        /// Drop its TTL: its policy's deadlines apply again.
        #[arg(long)]
        no_ttl: bool,
        /// Protect it (until --protected-until, if given).
        #[arg(long, conflicts_with = "unprotected")]
        protected: bool,
        /// Lift its protection, its policy's included.
        #[arg(long, conflicts_with = "protected_until")]
        unprotected: bool,
        /// Protected until this time (RFC 3339); implies --protected.
        #[arg(long)]
        protected_until: Option<String>,
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
    /// Delete a branch. Refused while clients are connected, or when it is protected
    /// or persistent, unless --force.
    Delete {
        /// `<source>.<branch>`, e.g. `shop.pr-42`.
        name: String,
        /// Terminate open sessions first, and delete it even if protected or
        /// persistent.
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
                ttl,
                expires_at,
                protected,
                protected_until,
                if_exists,
            } => {
                let (s, b) = split_name(name)?;
                let mut body = serde_json::json!({ "persistent": persistent });
                let mut set = |k: &str, v: &Option<String>| {
                    if let Some(v) = v {
                        body[k] = v.as_str().into();
                    }
                };
                set("snapshot", snapshot);
                set("ttl", ttl);
                set("expires_at", expires_at);
                set("protected_until", protected_until);
                set("if_exists", if_exists);
                if *protected {
                    body["protected"] = true.into();
                }
                create(admin, s, b, body)
            }
            BranchAction::Update {
                name,
                ttl,
                expires_at,
                no_ttl,
                protected,
                unprotected,
                protected_until,
            } => {
                let (s, b) = split_name(name)?;
                let mut body = serde_json::json!({});
                if let Some(t) = ttl {
                    body["ttl"] = t.as_str().into();
                }
                if let Some(t) = expires_at {
                    body["expires_at"] = t.as_str().into();
                }
                if *no_ttl {
                    body["ttl"] = Value::Null;
                }
                if *protected {
                    body["protected"] = true.into();
                }
                if *unprotected {
                    body["protected"] = false.into();
                }
                if let Some(t) = protected_until {
                    body["protected_until"] = t.as_str().into();
                }
                if body.as_object().is_some_and(|o| o.is_empty()) {
                    return Err(anyhow!(
                        "nothing to change: give --ttl, --expires-at, --no-ttl, --protected, \
                         --unprotected or --protected-until"
                    ));
                }
                update(admin, s, b, &body)
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

/// Creates a branch ahead of time; `body` holds the creation's options
/// (`persistent`, `snapshot`, `ttl`, `protected`, `if_exists` ...).
pub fn create(admin: &AdminApi, source: &str, branch: &str, mut body: Value) -> Result<()> {
    body["source"] = source.into();
    body["branch"] = branch.into();
    let v = api(admin, "POST", "/api/v1/branches", Some(&body.to_string()))?;
    let from = match v["snapshot"].as_str() {
        Some(s) => format!(", snapshot {s}"),
        None => String::new(),
    };
    println!(
        "{}.{} is {} (clone {}{from}){}",
        source,
        branch,
        v["state"].as_str().unwrap_or("?"),
        v["clone_name"].as_str().unwrap_or("?"),
        lifecycle(&v)
    );
    Ok(())
}

/// `, expires at T, protected until T`: what governs the branch's end, when set.
fn lifecycle(v: &Value) -> String {
    let mut out = String::new();
    if let Some(t) = v["expires_at"].as_str() {
        out.push_str(&format!(", expires at {t}"));
    }
    if v["protected"].as_bool() == Some(true) {
        match v["protected_until"].as_str() {
            Some(t) => out.push_str(&format!(", protected until {t}")),
            None => out.push_str(", protected"),
        }
    }
    out
}

/// Changes a branch's TTL or protection (`PATCH`).
pub fn update(admin: &AdminApi, source: &str, branch: &str, body: &Value) -> Result<()> {
    let path = format!("/api/v1/branches/{source}/{branch}");
    let v = api(admin, "PATCH", &path, Some(&body.to_string()))?;
    let now = lifecycle(&v);
    let now = now.strip_prefix(", ").unwrap_or("no TTL, not protected");
    println!("{source}.{branch}: {now}");
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
                let what = if r.message.contains("anyway") {
                    "delete it anyway"
                } else {
                    "terminate them"
                };
                anyhow!("{message} (HTTP {}); use --force to {what}", r.status)
            }
            Ok(r) => r.into(),
            Err(e) => e,
        });
    }
    println!("{source}.{branch} deleted");
    Ok(())
}
