//! Where each prefab runs, and what it offers: endpoints from static
//! overrides or the endpoint template, and manifests from `Describe`,
//! cached for a while with their connection.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::GatewayError;
use crate::{
    manifest::{Manifest, is_dns_label, is_version},
    proto::{self, prefab_runtime_client::PrefabRuntimeClient},
    storage::error_chain,
};

/// How long connecting and describing may take.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// A prefab ready to call.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// `id@version`, for messages.
    pub name: String,
    /// Where it runs.
    pub endpoint: String,
    /// Its manifest.
    pub manifest: Arc<Manifest>,
    /// A client on a shared connection.
    pub client: PrefabRuntimeClient<Channel>,
}

/// Prefab endpoints and a cache of their manifests.
#[derive(Debug)]
pub struct Registry {
    overrides: HashMap<(String, String), String>,
    template: String,
    ttl: Duration,
    tls: ClientTlsConfig,
    cache: Mutex<HashMap<(String, String), (Instant, Resolved)>>,
}

impl Registry {
    /// Builds a registry from `id@version=url` entries and a template.
    pub fn new(
        entries: &[String],
        template: String,
        ttl: Duration,
        tls: ClientTlsConfig,
    ) -> Result<Self, String> {
        let mut overrides = HashMap::new();
        for entry in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            let bad =
                || format!("PREFAB_ENDPOINTS entry {entry:?} must look like id@version=http://host:port");
            let (name, url) = entry.split_once('=').ok_or_else(bad)?;
            let (id, version) = name.split_once('@').ok_or_else(bad)?;
            if !is_dns_label(id) || !is_version(version) {
                return Err(bad());
            }
            Endpoint::from_shared(url.to_owned()).map_err(|_| bad())?;
            overrides.insert((id.to_owned(), version.to_owned()), url.to_owned());
        }
        Ok(Self {
            overrides,
            template,
            ttl,
            tls,
            cache: Mutex::default(),
        })
    }

    /// Finds, connects to and describes prefab `id@version`.
    pub async fn resolve(&self, id: &str, version: &str) -> Result<Resolved, GatewayError> {
        if !is_dns_label(id) {
            return Err(GatewayError::invalid(
                "prefab_id",
                format!("prefab id {id:?} is not valid: use lower-case letters, digits and '-'"),
            ));
        }
        if !is_version(version) {
            return Err(GatewayError::invalid(
                "version",
                format!(
                    "version {version:?} of prefab {id} is not valid: use letters, digits, '.', '_' and '-'"
                ),
            ));
        }
        let key = (id.to_owned(), version.to_owned());
        let name = format!("{id}@{version}");
        if let Some((at, hit)) = self.lock().get(&key)
            && at.elapsed() < self.ttl
        {
            return Ok(hit.clone());
        }
        let endpoint = match self.overrides.get(&key) {
            Some(url) => url.clone(),
            None if self.template.is_empty() => {
                return Err(GatewayError::NotFound(format!(
                    "prefab {name} is not registered with this gateway"
                )));
            }
            None => self.template.replace("{id}", id).replace("{version}", version),
        };
        let resolved = describe(name, endpoint, version, &self.tls).await?;
        self.lock().insert(key, (Instant::now(), resolved.clone()));
        Ok(resolved)
    }

    /// Forgets a cached prefab, e.g. after its runtime became unreachable.
    pub fn forget(&self, id: &str, version: &str) {
        self.lock().remove(&(id.to_owned(), version.to_owned()));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), (Instant, Resolved)>> {
        self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

async fn describe(
    name: String,
    endpoint: String,
    version: &str,
    tls: &ClientTlsConfig,
) -> Result<Resolved, GatewayError> {
    let mut channel = Endpoint::from_shared(endpoint.clone()).map_err(|e| {
        GatewayError::Internal(format!("endpoint {endpoint} of prefab {name} is not a URL: {e}"))
    })?;
    if endpoint.starts_with("https://") {
        // Without a CA file this reads the system's certificates.
        let tls = tls.clone();
        channel = tokio::task::spawn_blocking(move || channel.tls_config(tls))
            .await
            .map_err(|e| GatewayError::Internal(format!("TLS towards {endpoint}: {e}")))?
            .map_err(|e| GatewayError::Internal(format!("TLS towards {endpoint}: {e}")))?;
    }
    let channel = channel
        .connect_timeout(DESCRIBE_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
        .connect_lazy();
    let mut client = PrefabRuntimeClient::new(channel);
    let mut req = tonic::Request::new(proto::DescribeRequest {});
    req.set_timeout(DESCRIBE_TIMEOUT);
    let resp = client.describe(req).await.map_err(|status| {
        let detail = std::error::Error::source(&status)
            .map(error_chain)
            .unwrap_or_else(|| status.message().to_owned());
        if detail.contains("dns error") || detail.contains("failed to lookup address") {
            GatewayError::NotFound(format!(
                "prefab {name} is not deployed: no service answers at {endpoint}"
            ))
        } else {
            GatewayError::Unavailable(format!(
                "prefab {name} is unreachable at {endpoint}: {detail}; check that its runtime is running"
            ))
        }
    })?;
    let manifest = resp
        .into_inner()
        .manifest
        .ok_or_else(|| GatewayError::Contract {
            prefab: name.clone(),
            message: "Describe returned no manifest".into(),
        })
        .and_then(|m| {
            Manifest::try_from(m).map_err(|e| GatewayError::Contract {
                prefab: name.clone(),
                message: e.to_string(),
            })
        })?;
    let expected_id = name.split('@').next().unwrap_or_default();
    if manifest.id != expected_id || manifest.version != version {
        return Err(GatewayError::NotFound(format!(
            "prefab {name} is not deployed: {endpoint} serves {}@{}",
            manifest.id, manifest.version
        )));
    }
    Ok(Resolved {
        name,
        endpoint,
        manifest: Arc::new(manifest),
        client,
    })
}
