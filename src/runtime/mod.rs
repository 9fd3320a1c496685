//! Runtimes built into the `prefab` binary: the exec runtime that wraps
//! any program ([`exec`]) and the example prefab, served as `prefab runtime
//! …` with the settings of [`RuntimeArgs`]. The SDK they are built on is
//! the `prefab-sdk` crate, re-exported here.

pub mod exec;

use std::{net::SocketAddr, path::PathBuf};

pub use prefab_sdk::{
    DEFAULT_ADDR, DEFAULT_WORKSPACE_ROOT, InputReader, Invocation, Outputs, Prefab, PrefabError,
    RUNTIME_SERVICE, RuntimeService, Settings, serve,
};
use tokio_util::sync::CancellationToken;

use crate::server::BoxError;

/// Settings shared by every runtime server.
#[derive(Debug, Clone, clap::Args)]
pub struct RuntimeArgs {
    /// Address to listen on when $PORT is not set.
    #[arg(long = "addr", default_value = DEFAULT_ADDR)]
    pub addr: SocketAddr,
    /// Port to listen on (Knative sets it); overrides the port of --addr.
    #[arg(long, env = "PORT")]
    pub port: Option<u16>,
    /// The shared volume, mounted at the same path as on the gateway.
    #[arg(long, env = "WORKSPACE_ROOT", default_value = DEFAULT_WORKSPACE_ROOT)]
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

    /// These settings as the SDK takes them.
    pub fn settings(&self) -> Settings {
        Settings {
            addr: self.listen_addr(),
            workspace_root: self.workspace_root.clone(),
            tls: self.tls.files(),
        }
    }
}

/// Serves `prefab` as `prefab runtime …` does: on `$PORT` or `--addr`, with
/// TLS if configured, until `shutdown` is cancelled.
pub async fn serve_with_args<P: Prefab>(
    prefab: P,
    args: RuntimeArgs,
    shutdown: CancellationToken,
) -> Result<(), BoxError> {
    prefab_sdk::serve_with(prefab, args.settings(), shutdown).await
}
