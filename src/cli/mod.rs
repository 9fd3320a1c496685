//! The `prefab` command line: one binary for the gateway, the runtimes and
//! the tools around them.

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::{
    config::GatewayArgs,
    prefabs::hello::Hello,
    runtime::{self, RuntimeArgs},
    server::{BoxError, cancel_on_signal},
};

/// Run file-processing functions on files in S3-compatible storage.
#[derive(Debug, Parser)]
#[command(name = "prefab", version)]
pub struct Cli {
    /// Log as JSON lines (for Kubernetes) instead of human-readable text.
    #[arg(long, global = true, env = "PREFAB_LOG_JSON")]
    pub log_json: bool,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the Gateway.
    Gateway(Box<GatewayArgs>),
    /// Serve a prefab runtime.
    #[command(subcommand)]
    Runtime(RuntimeCommand),
}

/// Runtimes this binary can serve.
#[derive(Debug, Subcommand)]
pub enum RuntimeCommand {
    /// The example prefab hello-world-prefab 1.0.0.
    Hello(RuntimeArgs),
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> Result<(), BoxError> {
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    match cli.command {
        Command::Gateway(args) => {
            let listener = tokio::net::TcpListener::bind(args.addr)
                .await
                .map_err(|e| format!("cannot listen on {}: {e}", args.addr))?;
            crate::gateway::serve(&args, listener, shutdown).await
        }
        Command::Runtime(RuntimeCommand::Hello(args)) => {
            let addr = args.listen_addr();
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            tracing::info!(%addr, prefab = crate::prefabs::hello::ID, "runtime serving");
            runtime::serve(Hello, args.workspace_root, listener, shutdown).await
        }
    }
}

/// Sets up `tracing` output: `RUST_LOG` filters (default `info`).
pub fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
