//! `ums`: PID 1 of an outer container, and the client of its control socket.

use clap::{Parser, Subcommand};
use ums::cli;

#[derive(Parser)]
#[command(name = "ums", version, about = "Run an OCI image as a nested container and live-migrate it to a peer")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once per process: the size of `init`'s arguments does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Be the outer container's PID 1: run and supervise the workload.
    Init(Box<cli::init::Args>),
    /// Show the workload, its state and the last operation.
    Status(cli::status::Args),
    /// Print the Prometheus metrics (the text --metrics-listen serves).
    Metrics(cli::metrics::Args),
    /// Checkpoint the workload into a directory.
    Checkpoint(cli::checkpoint::Args),
    /// Restore a checkpointed workload into this (standby) outer container.
    Restore(cli::restore::Args),
    /// Live-migrate the workload to a peer outer container.
    Migrate(cli::migrate::Args),
    /// Settle a migration in doubt: run the frozen copy here again, or end it.
    Resolve(cli::resolve::Args),
    /// Create the peer key set of a group of outer containers.
    Keys(cli::keys::Args),
}

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("UMS_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let result = match Cli::parse().cmd {
        Cmd::Init(a) => cli::init::run(*a),
        Cmd::Status(a) => cli::status::run(a),
        Cmd::Metrics(a) => cli::metrics::run(a),
        Cmd::Checkpoint(a) => cli::checkpoint::run(a),
        Cmd::Restore(a) => cli::restore::run(a),
        Cmd::Migrate(a) => cli::migrate::run(a),
        Cmd::Keys(a) => cli::keys::run(a),
        Cmd::Resolve(a) => cli::resolve::run(a),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("ums: {e:#}");
            std::process::exit(1);
        }
    }
}
