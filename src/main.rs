//! The `offshoot` binary: argument parsing and logging set-up; the rest is the library.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use offshoot::config::Config;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// A PostgreSQL proxy that gives every test cycle its own database branch.
///
/// Clients connect to `<source>.<branch>` (for example
/// `postgres://app@127.0.0.1:6432/shop.pr-42`); the branch is cloned from the
/// source on first connect and dropped after it has been idle for the source's
/// `idle_expire`.
#[derive(Parser)]
#[command(name = "offshoot", version, about, long_about)]
struct Cli {
    /// Log lines as plain text, or as one JSON object per line (with the
    /// connection's fields: client address, source, branch).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "OFFSHOOT_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// Configuration file (TOML). Environment variables `OFFSHOOT__SECTION__KEY`
    /// override its values.
    #[arg(long, short, default_value = offshoot::config::DEFAULT_PATH, env = "OFFSHOOT_CONFIG")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (and the embedded PostgreSQL, if a source needs it).
    Serve(ConfigArg),
    /// Check a configuration file and exit.
    Check(ConfigArg),
    /// List, create or delete branches through a running proxy's admin API.
    Branch {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        action: BranchAction,
    },
    /// Take, list or delete snapshots of an `instance` source through a running
    /// proxy's admin API.
    Snapshot {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        action: SnapshotAction,
    },
    /// Rehearse a migration on a fresh branch of SOURCE and report what it did:
    /// statements, locks, rewrites, hazards, schema diff, data checks.
    /// Exit code 0 passed, 1 migration failed, 2 data check failed, 3 hazard.
    Rehearse {
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        args: Box<offshoot::rehearse::command::Args>,
    },
}

/// How the CLI reaches a running proxy's admin API.
#[derive(clap::Args)]
struct ApiArgs {
    /// The admin API address (`admin.listen` of the running proxy).
    #[arg(
        long,
        default_value = "127.0.0.1:9187",
        env = "OFFSHOOT_ADMIN",
        global = true
    )]
    admin: String,
    /// File holding the admin API token. Default: `OFFSHOOT_ADMIN_TOKEN`, else the
    /// token file of the configuration below (`admin.token_file`, or
    /// `<state.dir>/admin.token`).
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    /// The running proxy's configuration, read only to find its token file.
    #[arg(long, short, env = "OFFSHOOT_CONFIG", global = true)]
    config: Option<PathBuf>,
}

impl ApiArgs {
    fn connect(&self) -> anyhow::Result<offshoot::cli::AdminApi> {
        offshoot::cli::AdminApi::connect(
            &self.admin,
            self.token_file.as_deref(),
            self.config.as_deref(),
        )
    }
}

#[derive(Subcommand)]
enum SnapshotAction {
    /// Copy the source now and seal the copy; new branches start from it.
    Create {
        /// The source's name.
        source: String,
    },
    /// Show the source's snapshots and the branches made from each.
    List {
        /// The source's name.
        source: String,
    },
    /// Delete a snapshot; refused while a branch was made from it.
    Delete {
        /// The source's name.
        source: String,
        /// The snapshot's name (see `snapshot list`).
        name: String,
    },
}

#[derive(Subcommand)]
enum BranchAction {
    /// Show every branch with its state, connections and last activity.
    List,
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

fn split_name(name: &str) -> anyhow::Result<(&str, &str)> {
    name.rsplit_once('.')
        .ok_or_else(|| anyhow::anyhow!("{name:?}: expected <source>.<branch>, e.g. shop.pr-42"))
}

fn branch_command(api: &ApiArgs, action: &BranchAction) -> std::process::ExitCode {
    let admin = match api.connect() {
        Ok(a) => a,
        Err(e) => return exit_code(Err(e)),
    };
    let admin = &admin;
    let result = match action {
        BranchAction::List => offshoot::cli::list(admin),
        BranchAction::Create {
            name,
            persistent,
            snapshot,
        } => split_name(name).and_then(|(s, b)| {
            offshoot::cli::create(admin, s, b, *persistent, snapshot.as_deref())
        }),
        BranchAction::Suspend { name } => {
            split_name(name).and_then(|(s, b)| offshoot::cli::suspend(admin, s, b))
        }
        BranchAction::Reset {
            name,
            snapshot,
            force,
        } => split_name(name)
            .and_then(|(s, b)| offshoot::cli::reset(admin, s, b, snapshot.as_deref(), *force)),
        BranchAction::Delete { name, force } => {
            split_name(name).and_then(|(s, b)| offshoot::cli::delete(admin, s, b, *force))
        }
    };
    exit_code(result)
}

fn snapshot_command(api: &ApiArgs, action: &SnapshotAction) -> std::process::ExitCode {
    let admin = match api.connect() {
        Ok(a) => a,
        Err(e) => return exit_code(Err(e)),
    };
    let admin = &admin;
    exit_code(match action {
        SnapshotAction::Create { source } => offshoot::cli::snapshot_create(admin, source),
        SnapshotAction::List { source } => offshoot::cli::snapshot_list(admin, source),
        SnapshotAction::Delete { source, name } => {
            offshoot::cli::snapshot_delete(admin, source, name)
        }
    })
}

fn exit_code(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("offshoot: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
    let config = match &cli.command {
        Command::Serve(ConfigArg { config }) | Command::Check(ConfigArg { config }) => config,
        Command::Branch { api, action } => return branch_command(api, action),
        Command::Snapshot { api, action } => return snapshot_command(api, action),
        Command::Rehearse { api, args } => {
            return match api.connect() {
                Ok(admin) => offshoot::rehearse::command::main(&admin, args),
                Err(e) => exit_code(Err(e)),
            }
        }
    };
    let cfg = match Config::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("offshoot: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if let Command::Check(_) = cli.command {
        println!(
            "{}: configuration is valid ({} sources)",
            config.display(),
            cfg.sources.len()
        );
        return std::process::ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("offshoot")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("offshoot: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            trigger.cancel();
        });
        offshoot::app::run(cfg, matches!(cli.log_format, LogFormat::Text), shutdown).await
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("offshoot: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
