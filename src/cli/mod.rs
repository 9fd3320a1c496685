//! The `prefab` command line: one binary for the gateway, the runtimes and
//! the tools around them.

pub mod client;
mod render;

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use self::{
    client::{Connection, RunArgs},
    render::Render,
};
use crate::{
    config::GatewayArgs,
    deploy::{self, RenderArgs},
    dev::DevArgs,
    prefabs::hello::Hello,
    runtime::exec::{ExecArgs, ExecPrefab},
    runtime::{self, RuntimeArgs},
    server::{BoxError, cancel_on_signal},
    telemetry::{self, Exporter},
};

/// This build: the package version and the git revision it was built from.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("PREFAB_GIT_REVISION"), ")");

/// Run file-processing functions on files in S3-compatible storage.
#[derive(Debug, Parser)]
#[command(name = "prefab", version = VERSION)]
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
    /// Everything on this machine: embedded S3, gateway and example prefab.
    Dev(DevArgs),
    /// Upload a local file through the gateway; prints its s3:// URL.
    Put {
        /// The file.
        file: PathBuf,
        /// Gateway connection.
        #[command(flatten)]
        conn: Connection,
    },
    /// Download an object through the gateway.
    Get {
        /// The object, s3://bucket/key.
        url: String,
        /// Destination file, a folder to put it in, or - for standard
        /// output (default: the key's last component in the current folder).
        dest: Option<PathBuf>,
        /// Gateway connection.
        #[command(flatten)]
        conn: Connection,
    },
    /// Run a prefab function and print its outputs.
    Run {
        /// What to run.
        #[command(flatten)]
        args: RunArgs,
        /// Gateway connection.
        #[command(flatten)]
        conn: Connection,
    },
    /// Follow a run by its request id (from any gateway replica) to its
    /// end, e.g. one started with `run --detach`.
    Watch {
        /// The request id `run` printed as accepted.
        request_id: String,
        /// Show only the events after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Gateway connection.
        #[command(flatten)]
        conn: Connection,
    },
    /// Render (or apply) Kubernetes resources.
    #[command(subcommand)]
    Deploy(DeployCommand),
    /// Check the gateway's gRPC health.
    Health {
        /// Service to ask about ("" for the whole server).
        #[arg(long, default_value = crate::gateway::GATEWAY_SERVICE)]
        service: String,
        /// Gateway connection.
        #[command(flatten)]
        conn: Connection,
    },
}

/// Deployment helpers.
#[derive(Debug, Subcommand)]
pub enum DeployCommand {
    /// Print the Knative Service of a prefab (or apply it with --apply).
    Render(RenderArgs),
}

/// Runtimes this binary can serve.
#[derive(Debug, Subcommand)]
pub enum RuntimeCommand {
    /// The example prefab hello-world-prefab 1.0.0.
    Hello(RuntimeArgs),
    /// Any command-line program as a prefab, described by a TOML manifest.
    Exec(ExecArgs),
}

impl Command {
    /// The service name this command's spans are exported under, if it
    /// serves (client commands export nothing).
    fn service_name(&self) -> Option<&'static str> {
        match self {
            Command::Gateway(_) => Some("prefab-gateway"),
            Command::Runtime(_) => Some("prefab-runtime"),
            Command::Dev(_) => Some("prefab-dev"),
            _ => None,
        }
    }
}

/// Runs the parsed command line and returns the process exit code.
pub async fn run(cli: Cli) -> u8 {
    let client = |conn: &Connection| Render::new(conn.json);
    let outcome = match cli.command {
        Command::Put { file, conn } => {
            let mut render = client(&conn);
            client::put(&conn, &file, &mut render).await.map(|r| {
                render.finish();
                if render.is_json() {
                    render.json_line(
                        &serde_json::json!({"url": r.url, "size": r.size, "crc64nvme": r.crc64nvme}),
                    );
                } else {
                    println!("{}", r.url);
                }
            })
        }
        Command::Get { url, dest, conn } => {
            let mut render = client(&conn);
            let name = url
                .rsplit('/')
                .next()
                .filter(|n| !n.is_empty())
                .unwrap_or("download");
            let dest = match dest {
                // Into a folder, under the object's own name.
                Some(dir) if tokio::fs::metadata(&dir).await.is_ok_and(|m| m.is_dir()) => dir.join(name),
                Some(dest) => dest,
                None => PathBuf::from(name),
            };
            client::get(&conn, &url, &dest, &mut render).await.map(|n| {
                render.finish();
                // On standard output the object's bytes stand alone.
                if render.is_json() && dest != Path::new("-") {
                    render.json_line(&serde_json::json!({"url": url, "path": dest, "size": n}));
                }
            })
        }
        Command::Run { args, conn } => client::run(&conn, &args, &mut client(&conn)).await,
        Command::Watch {
            request_id,
            after,
            conn,
        } => client::watch(&conn, &request_id, after, &mut client(&conn)).await,
        Command::Health { service, conn } => client::health(&conn, &service, &client(&conn)).await,
        Command::Deploy(DeployCommand::Render(args)) => render_deployment(&args),
        command => {
            return match serve(command).await {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("error: {e}");
                    1
                }
            };
        }
    };
    match outcome {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {}", e.message);
            e.exit
        }
    }
}

fn render_deployment(args: &RenderArgs) -> Result<(), client::ClientError> {
    let fail = |message: String| client::ClientError { exit: 1, message };
    let service = deploy::knative_service(args).map_err(|e| client::ClientError {
        exit: 2,
        message: e.to_string(),
    })?;
    let yaml = deploy::to_yaml(&service);
    if !args.apply {
        print!("{yaml}");
        return Ok(());
    }
    let mut kubectl = std::process::Command::new("kubectl")
        .args(["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot run kubectl: {e}")))?;
    let mut stdin = kubectl.stdin.take().expect("stdin is piped");
    std::io::Write::write_all(&mut stdin, yaml.as_bytes()).map_err(|e| fail(format!("kubectl: {e}")))?;
    drop(stdin);
    let status = kubectl.wait().map_err(|e| fail(format!("kubectl: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(fail(format!("kubectl apply exited with {status}")))
    }
}

/// Runs a serving subcommand until SIGINT or SIGTERM.
async fn serve(command: Command) -> Result<(), BoxError> {
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    match command {
        Command::Gateway(args) => {
            let listener = tokio::net::TcpListener::bind(args.addr)
                .await
                .map_err(|e| format!("cannot listen on {}: {e}", args.addr))?;
            crate::gateway::serve(&args, listener, shutdown).await
        }
        Command::Runtime(RuntimeCommand::Hello(args)) => {
            runtime::serve_with_args(Hello, args, shutdown).await
        }
        Command::Runtime(RuntimeCommand::Exec(args)) => {
            let prefab = ExecPrefab::load(&args.manifest).await?;
            runtime::serve_with_args(prefab, args.runtime, shutdown).await
        }
        Command::Dev(args) => crate::dev::run(args, shutdown).await,
        Command::Put { .. }
        | Command::Get { .. }
        | Command::Run { .. }
        | Command::Watch { .. }
        | Command::Health { .. }
        | Command::Deploy(_) => {
            unreachable!("client commands are handled by run")
        }
    }
}

/// Sets up `tracing` output: `RUST_LOG` filters (default `info`); for the
/// servers, OpenTelemetry export when the `OTEL_*` variables ask for it
/// (see [`crate::telemetry`]). The exporter returned must be shut down at
/// the end, to send the last spans.
pub fn init_tracing(cli: &Cli) -> Option<Exporter> {
    use tracing_subscriber::{Layer as _, layer::SubscriberExt as _, util::SubscriberInitExt as _};
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let exporter = cli
        .command
        .service_name()
        .filter(|_| telemetry::export_configured())
        .and_then(|service| {
            Exporter::from_env(service)
                .inspect_err(|e| eprintln!("prefab: {e}; spans are not exported"))
                .ok()
        });
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt = match cli.log_json {
        true => fmt.json().boxed(),
        false => fmt.boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(exporter.as_ref().map(Exporter::layer))
        .with(fmt)
        .init();
    exporter
}
