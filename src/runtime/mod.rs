//! The SDK for prefab authors: implement [`Prefab`] and hand it to
//! [`serve`]. The SDK resolves the workspace handle under its own root,
//! turns file parameters into absolute local paths, streams progress and
//! log lines, enforces time limits, and cancels the function when the
//! gateway goes away.
//!
//! ```no_run
//! use prefab::manifest::{FunctionSpec, Manifest, Param, ParamKind};
//! use prefab::runtime::{Invocation, Outputs, Prefab, PrefabError};
//!
//! struct Echo;
//!
//! impl Prefab for Echo {
//!     fn manifest(&self) -> Manifest {
//!         Manifest {
//!             id: "echo".into(),
//!             version: "1.0.0".into(),
//!             description: "Copies its input".into(),
//!             functions: vec![FunctionSpec::new("copy", "Copy a file")
//!                 .param(Param::new("src", ParamKind::InputFile))
//!                 .param(Param::new("dst", ParamKind::OutputFile).extension("bin"))],
//!         }
//!     }
//!
//!     async fn invoke(&self, call: Invocation) -> Result<Outputs, PrefabError> {
//!         let mut src = tokio::fs::File::open(call.input("src")?).await?;
//!         tokio::io::copy(&mut src, &mut call.create_output("dst").await?).await?;
//!         Ok(Outputs::new())
//!     }
//! }
//! ```

pub mod exec;
mod invocation;
mod service;

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

pub use invocation::{Invocation, Outputs};
pub use service::RuntimeService;
use tokio_util::sync::CancellationToken;

use crate::{manifest::Manifest, server::BoxError};

/// A prefab: a manifest and the functions it declares.
pub trait Prefab: Send + Sync + 'static {
    /// The manifest served by `Describe`; called once at start-up.
    fn manifest(&self) -> Manifest;

    /// Runs the function `call.function()`. File parameters are already
    /// local paths; the returned map holds the declared non-file outputs
    /// (output files are reported automatically).
    fn invoke(&self, call: Invocation) -> impl Future<Output = Result<Outputs, PrefabError>> + Send;
}

/// Why a function failed. The message reaches the gateway's caller, so say
/// what was wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum PrefabError {
    /// An argument is missing or unusable.
    #[error("{0}")]
    InvalidArgument(String),
    /// The function ran and failed.
    #[error("{0}")]
    Failed(String),
    /// The function stopped because it was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// The function ran past its time limit and was cancelled.
    #[error("the function ran past its time limit of {0:?} and was cancelled")]
    TimedOut(std::time::Duration),
    /// The workspace cannot be used by this runtime as deployed (user and
    /// group ids, volume mounts): for the operator to fix, not the caller.
    #[error("{0}")]
    Workspace(String),
    /// A local file operation failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl From<PrefabError> for tonic::Status {
    fn from(e: PrefabError) -> Self {
        match e {
            PrefabError::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            PrefabError::Failed(m) => tonic::Status::unknown(m),
            PrefabError::Cancelled => tonic::Status::cancelled("the function was cancelled"),
            e @ PrefabError::TimedOut(_) => tonic::Status::deadline_exceeded(e.to_string()),
            PrefabError::Workspace(m) => tonic::Status::failed_precondition(m),
            // Refused by file permissions: the runtime's user or groups do
            // not fit the volume's, which the caller cannot change.
            PrefabError::Io(e) if crate::workspace::access::is_denied(&e) => {
                tonic::Status::failed_precondition(format!(
                    "I/O error: {e} (this runtime runs as {}; it needs the workspace group among its groups)",
                    crate::workspace::access::Identity::current()
                ))
            }
            PrefabError::Io(e) => tonic::Status::internal(format!("I/O error: {e}")),
        }
    }
}

/// Settings shared by every runtime server.
#[derive(Debug, Clone, clap::Args)]
pub struct RuntimeArgs {
    /// Address to listen on when $PORT is not set.
    #[arg(long = "addr", default_value = "0.0.0.0:8080")]
    pub addr: SocketAddr,
    /// Port to listen on (Knative sets it); overrides the port of --addr.
    #[arg(long, env = "PORT")]
    pub port: Option<u16>,
    /// The shared volume, mounted at the same path as on the gateway.
    #[arg(long, env = "WORKSPACE_ROOT", default_value = "/mnt/prefab-workspace")]
    pub workspace_root: PathBuf,
    /// TLS of the listener.
    #[command(flatten)]
    pub tls: crate::tls::ServerTlsArgs,
}

impl RuntimeArgs {
    /// The address to bind.
    pub fn listen_addr(&self) -> SocketAddr {
        let mut addr = self.addr;
        if let Some(port) = self.port {
            addr.set_port(port);
        }
        addr
    }
}

/// Serves `prefab` on `listener` until `shutdown` is cancelled, with gRPC
/// health and reflection.
pub async fn serve<P: Prefab>(
    prefab: P,
    workspace_root: PathBuf,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<(), BoxError> {
    let service = RuntimeService::new(Arc::new(prefab), workspace_root)?;
    service.serve(listener, shutdown).await
}

/// Serves `prefab` as `prefab runtime …` does: on `$PORT` or `--addr`, with
/// TLS if configured, until SIGINT or SIGTERM cancels `shutdown`.
pub async fn serve_with_args<P: Prefab>(
    prefab: P,
    args: RuntimeArgs,
    shutdown: CancellationToken,
) -> Result<(), BoxError> {
    let addr = args.listen_addr();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let manifest = prefab.manifest();
    tracing::info!(%addr, prefab = %manifest.id, version = %manifest.version, tls = args.tls.tls_cert.is_some(), "runtime serving");
    let service = RuntimeService::new(Arc::new(prefab), args.workspace_root)?;
    service.serve_tls(listener, args.tls.config()?, shutdown).await
}
