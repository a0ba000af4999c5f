//! The `offshoot` binary: argument parsing and logging set-up; the rest is the library.

use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};
use offshoot::cli::branch::BranchArgs;
use offshoot::cli::events::EventsArgs;
use offshoot::cli::snapshot::SnapshotArgs;
use offshoot::cli::ApiArgs;
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
    /// List, show, create or delete branches through a running proxy's admin API.
    Branch(BranchArgs),
    /// Take, list or delete snapshots of an `instance` source through a running
    /// proxy's admin API.
    Snapshot(SnapshotArgs),
    /// Print the audit trail of a running proxy (who made, suspended, expired or
    /// deleted which branch), or follow it with `--follow`.
    Events(EventsArgs),
    /// List the migration rehearsal reports a running proxy keeps, or show one as
    /// Markdown or JSON.
    Rehearsals(offshoot::cli::rehearsals::RehearsalsArgs),
    /// Print a shell completion script: `offshoot completions bash > /etc/bash_completion.d/offshoot`.
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Rehearse a migration on a fresh branch of SOURCE and report what it did:
    /// statements, locks, rewrites, hazards, schema diff, data checks.
    /// Exit code 0 passed, 1 migration failed, 2 data check failed, 3 hazard.
    Rehearse {
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        args: Box<offshoot::cli::rehearse::Args>,
    },
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
    // The privileged helper a proxy started as root runs (see `privsep`).
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == offshoot::privsep::HELPER_ARG)
    {
        return offshoot::app::helper_main();
    }
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
        Command::Branch(args) => return exit_code(args.run()),
        Command::Snapshot(args) => return exit_code(args.run()),
        Command::Events(args) => return exit_code(args.run()),
        Command::Rehearsals(args) => return exit_code(args.run()),
        Command::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "offshoot",
                &mut std::io::stdout(),
            );
            return std::process::ExitCode::SUCCESS;
        }
        Command::Rehearse { api, args } => {
            return match api.connect() {
                Ok(admin) => offshoot::cli::rehearse::main(&admin, args),
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
