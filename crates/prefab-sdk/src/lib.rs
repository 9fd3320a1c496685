//! Write a prefab: implement [`Prefab`] (a [`Manifest`] and the functions
//! it declares) and hand it to [`run`]. The SDK serves the
//! `prefab.v1.PrefabRuntime` gRPC service the Prefab Gateway calls, with
//! gRPC health and reflection; it resolves the workspace handle the
//! gateway sends under its own mount of the shared volume, turns file
//! parameters into local paths, streams progress and log lines, enforces
//! time limits, masks secrets in what goes back, and cancels the function
//! when the gateway goes away.
//!
//! ```no_run
//! use prefab_sdk::manifest::{FunctionSpec, Manifest, Param, ParamKind};
//! use prefab_sdk::{Invocation, Outputs, Prefab, PrefabError};
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
//!                 .param(Param::new("src", ParamKind::InputFile).streaming())
//!                 .param(Param::new("dst", ParamKind::OutputFile).extension("bin"))],
//!         }
//!     }
//!
//!     async fn invoke(&self, call: Invocation) -> Result<Outputs, PrefabError> {
//!         // Read front to back, while the gateway is still staging it.
//!         let mut src = call.open_input("src").await?;
//!         tokio::io::copy(&mut src, &mut call.create_output("dst").await?).await?;
//!         Ok(Outputs::new())
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), prefab_sdk::server::BoxError> {
//!     prefab_sdk::run(Echo).await
//! }
//! ```
//!
//! # Layout
//!
//! - The crate root: [`Prefab`], [`PrefabError`], and serving it
//!   ([`run`], [`serve`], [`Settings`]); [`Invocation`] is one call as the
//!   function sees it, [`RuntimeService`] the gRPC service around a prefab.
//! - [`manifest`]: what a prefab declares (functions, parameters, the exec
//!   runtime's commands) and its checks; the gateway reads the same types.
//! - [`proto`]: the generated `runtime.proto` messages and stubs.
//! - [`workspace`]: the shared volume as both sides see it: handles,
//!   confined no-follow paths, who may use a workspace, the watermark of an
//!   input still being staged; [`InputReader`] reads one.
//! - [`secret`], [`telemetry`], [`server`], [`tls`]: secrets that never
//!   print, the W3C trace context, health and reflection, TLS from PEM.
//!
//! # How a call flows
//!
//! The gateway stages a run's inputs into `<volume>/<request id>/inputs/`
//! and sends `Invoke` with the request id as the workspace handle. The
//! service resolves the handle under [`Settings::workspace_root`], checks
//! every file parameter (inputs regular files inside `inputs/`, outputs not
//! yet existing inside `outputs/`), and calls [`Prefab::invoke`] with an
//! [`Invocation`] whose progress and log lines stream back as they come.
//! An input the function declares
//! [streaming](manifest::Param::streaming) may still be arriving then:
//! [`Invocation::open_input`] reads it as far as it is staged and waits
//! for the rest.
//! The function's result (or error, secrets masked) ends the stream; the
//! gateway then uploads the output files.

#![warn(missing_docs)]

mod input;
mod invocation;
pub mod manifest;
pub mod proto;
pub mod secret;
pub mod server;
mod service;
pub mod telemetry;
pub mod tls;
pub mod workspace;

use std::{ffi::OsString, net::SocketAddr, path::PathBuf, sync::Arc};

pub use input::InputReader;
pub use invocation::{Invocation, Outputs};
pub use manifest::Manifest;
use server::BoxError;
pub use service::{RUNTIME_SERVICE, RuntimeService};
use tokio_util::sync::CancellationToken;

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
            PrefabError::Io(e) if workspace::access::is_denied(&e) => {
                tonic::Status::failed_precondition(format!(
                    "I/O error: {e} (this runtime runs as {}; it needs the workspace group among its groups)",
                    workspace::access::Identity::current()
                ))
            }
            PrefabError::Io(e) => tonic::Status::internal(format!("I/O error: {e}")),
        }
    }
}

/// The address a runtime listens on when `$PORT` is not set.
pub const DEFAULT_ADDR: &str = "0.0.0.0:8080";
/// Where the shared volume is mounted unless `$WORKSPACE_ROOT` says.
pub const DEFAULT_WORKSPACE_ROOT: &str = "/mnt/prefab-workspace";

/// Where and how a runtime serves.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The address to listen on.
    pub addr: SocketAddr,
    /// The shared volume, mounted at the same path as on the gateway.
    pub workspace_root: PathBuf,
    /// TLS of the listener.
    pub tls: tls::ServerTls,
}

impl Settings {
    /// The settings a Knative service is given: `$PORT` (else
    /// [`DEFAULT_ADDR`]), `$WORKSPACE_ROOT` (else
    /// [`DEFAULT_WORKSPACE_ROOT`]), and TLS from `$PREFAB_TLS_CERT`,
    /// `$PREFAB_TLS_KEY` and `$PREFAB_TLS_CLIENT_CA` when set.
    pub fn from_env() -> Result<Self, BoxError> {
        Self::from_vars(|name| std::env::var_os(name))
    }

    fn from_vars(var: impl Fn(&str) -> Option<OsString>) -> Result<Self, BoxError> {
        let var = |name| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        let mut addr: SocketAddr = DEFAULT_ADDR.parse()?;
        if let Some(port) = var("PORT") {
            let port = port.to_str().and_then(|p| p.parse().ok());
            addr.set_port(port.ok_or("PORT must be a port number")?);
        }
        Ok(Self {
            addr,
            workspace_root: var("WORKSPACE_ROOT").unwrap_or_else(|| DEFAULT_WORKSPACE_ROOT.into()),
            tls: tls::ServerTls {
                cert: var("PREFAB_TLS_CERT"),
                key: var("PREFAB_TLS_KEY"),
                client_ca: var("PREFAB_TLS_CLIENT_CA"),
            },
        })
    }
}

/// Serves `prefab` as a Knative service runs it: with [`Settings::from_env`],
/// until SIGINT or SIGTERM, letting open calls finish.
pub async fn run<P: Prefab>(prefab: P) -> Result<(), BoxError> {
    let shutdown = CancellationToken::new();
    server::cancel_on_signal(shutdown.clone());
    serve_with(prefab, Settings::from_env()?, shutdown).await
}

/// Serves `prefab` with `settings` until `shutdown` is cancelled.
pub async fn serve_with<P: Prefab>(
    prefab: P,
    settings: Settings,
    shutdown: CancellationToken,
) -> Result<(), BoxError> {
    let addr = settings.addr;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let tls = settings.tls.config()?;
    let service = RuntimeService::new(Arc::new(prefab), settings.workspace_root)?;
    let manifest = service.manifest();
    tracing::info!(%addr, prefab = %manifest.id, version = %manifest.version, tls = tls.is_some(), "runtime serving");
    service.serve_tls(listener, tls, shutdown).await
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_come_from_the_knative_environment() {
        let settings = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, OsString)> = vars.iter().map(|(k, v)| (k.to_string(), v.into())).collect();
            Settings::from_vars(|name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
        };
        let defaults = settings(&[]).unwrap();
        assert_eq!(defaults.addr.to_string(), DEFAULT_ADDR);
        assert_eq!(defaults.workspace_root, PathBuf::from(DEFAULT_WORKSPACE_ROOT));
        assert!(defaults.tls.config().unwrap().is_none());

        let set = settings(&[
            ("PORT", "9123"),
            ("WORKSPACE_ROOT", "/ws"),
            ("PREFAB_TLS_CERT", ""),
        ])
        .unwrap();
        assert_eq!(set.addr.to_string(), "0.0.0.0:9123");
        assert_eq!(set.workspace_root, PathBuf::from("/ws"));
        assert!(set.tls.cert.is_none(), "an empty variable is unset");

        let error = settings(&[("PORT", "http")]).unwrap_err();
        assert!(error.to_string().contains("PORT"), "{error}");
        let half = settings(&[("PREFAB_TLS_CERT", "/cert.pem")]).unwrap();
        assert!(half.tls.config().unwrap_err().to_string().contains("key"));
    }
}
