//! TLS of a gRPC listener from PEM files: a server identity and,
//! optionally, a client CA that turns on mutual TLS.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::server::BoxError;

/// The PEM files of a listener's TLS; off unless both `cert` and `key` are
/// given.
#[derive(Debug, Clone, Default)]
pub struct ServerTls {
    /// The certificate chain.
    pub cert: Option<PathBuf>,
    /// Its private key.
    pub key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

impl ServerTls {
    /// The listener's TLS configuration, if TLS is on.
    pub fn config(&self) -> Result<Option<ServerTlsConfig>, BoxError> {
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let mut config =
                    ServerTlsConfig::new().identity(Identity::from_pem(read_pem(cert)?, read_pem(key)?));
                if let Some(ca) = &self.client_ca {
                    config = config.client_ca_root(Certificate::from_pem(read_pem(ca)?));
                }
                Ok(Some(config))
            }
            (None, None) if self.client_ca.is_none() => Ok(None),
            _ => Err("TLS needs both a certificate and its key (a client CA needs both too)".into()),
        }
    }
}

/// Reads a PEM file, naming it in the error.
pub fn read_pem(path: &Path) -> Result<Vec<u8>, BoxError> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()).into())
}
