//! Leases: a small file in each workspace saying which gateway replica owns
//! it and until when. The owner renews it while the run lives; any
//! replica's janitor may remove a workspace whose lease has expired.

use std::{
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

/// The lease file's name inside a workspace (hidden from runtimes, whose
/// paths may not start with a dot).
pub const LEASE_FILE: &str = ".lease";

/// The content of a lease file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The replica that owns the workspace.
    pub owner: String,
    /// Expiry, in milliseconds since the Unix epoch.
    pub expires_unix_ms: u64,
}

impl Lease {
    /// A lease for `owner` expiring `ttl` from now.
    pub fn new(owner: &str, ttl: Duration) -> Self {
        Self {
            owner: owner.to_owned(),
            expires_unix_ms: now_ms() + ttl.as_millis() as u64,
        }
    }

    /// Whether the lease has expired.
    pub fn expired(&self) -> bool {
        now_ms() > self.expires_unix_ms
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// Writes (or renews) the lease of the workspace at `dir`, atomically.
pub async fn write(dir: &Path, lease: &Lease) -> std::io::Result<()> {
    let tmp = dir.join(".lease.tmp");
    let body = serde_json::to_vec(lease).map_err(std::io::Error::other)?;
    tokio::fs::write(&tmp, body).await?;
    tokio::fs::rename(&tmp, dir.join(LEASE_FILE)).await
}

/// Reads the lease of the workspace at `dir`; `None` if it has none or it
/// is unreadable.
pub async fn read(dir: &Path) -> Option<Lease> {
    let body = tokio::fs::read(dir.join(LEASE_FILE)).await.ok()?;
    serde_json::from_slice(&body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn leases_round_trip_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).await, None);
        let lease = Lease::new("replica-a", Duration::from_secs(60));
        write(dir.path(), &lease).await.unwrap();
        assert_eq!(read(dir.path()).await, Some(lease.clone()));
        assert!(!lease.expired());
        assert!(Lease::new("b", Duration::ZERO).expires_unix_ms <= now_ms());
    }
}
