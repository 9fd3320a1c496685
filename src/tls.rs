//! TLS for the gRPC listeners and for the gateway's calls to runtimes, from
//! PEM files: a server identity, optionally a client CA that turns on
//! mutual TLS, and on the client side a CA to trust and an identity to
//! present.

use std::path::{Path, PathBuf};

use prefab_sdk::tls::{ServerTls, read_pem as read};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::server::BoxError;

/// TLS of a gRPC listener.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerTlsArgs {
    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long = "tls-cert", env = "PREFAB_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key of --tls-cert (PEM).
    #[arg(long = "tls-key", env = "PREFAB_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mutual TLS).
    #[arg(long = "tls-client-ca", env = "PREFAB_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

impl ServerTlsArgs {
    /// The PEM files as the SDK takes them.
    pub fn files(&self) -> ServerTls {
        ServerTls {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            client_ca: self.tls_client_ca.clone(),
        }
    }

    /// The listener's TLS configuration, if TLS is on.
    pub fn config(&self) -> Result<Option<ServerTlsConfig>, BoxError> {
        self.files().config()
    }
}

/// TLS of the gateway's connections to runtimes served over `https://`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RuntimeTlsArgs {
    /// CA that signs the runtimes' certificates (PEM).
    #[arg(long = "runtime-tls-ca", env = "PREFAB_RUNTIME_TLS_CA")]
    pub runtime_tls_ca: Option<PathBuf>,
    /// Client certificate the gateway presents to runtimes (mutual TLS).
    #[arg(
        long = "runtime-tls-cert",
        env = "PREFAB_RUNTIME_TLS_CERT",
        requires = "runtime_tls_key"
    )]
    pub runtime_tls_cert: Option<PathBuf>,
    /// Private key of --runtime-tls-cert.
    #[arg(
        long = "runtime-tls-key",
        env = "PREFAB_RUNTIME_TLS_KEY",
        requires = "runtime_tls_cert"
    )]
    pub runtime_tls_key: Option<PathBuf>,
}

impl RuntimeTlsArgs {
    /// The client configuration for `https://` runtime endpoints.
    pub fn config(&self) -> Result<ClientTlsConfig, BoxError> {
        client_config(
            self.runtime_tls_ca.as_deref(),
            self.runtime_tls_cert
                .as_deref()
                .zip(self.runtime_tls_key.as_deref()),
        )
    }
}

/// A client configuration trusting `ca` (or, without one, the system's
/// certificate authorities) and presenting `identity` (cert, key) if given.
pub fn client_config(
    ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<ClientTlsConfig, BoxError> {
    let mut config = ClientTlsConfig::new();
    config = match ca {
        Some(ca) => config.ca_certificate(Certificate::from_pem(read(ca)?)),
        None => config.with_native_roots(),
    };
    if let Some((cert, key)) = identity {
        config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(config)
}
