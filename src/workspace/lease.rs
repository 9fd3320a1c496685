//! Leases: a small file in each workspace saying which gateway replica owns
//! it and until when. The owner renews it while the run lives; any
//! replica's janitor may remove a workspace whose lease has expired.

use std::{
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::DirFd;

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

/// Writes (or renews) the lease of the open workspace `dir`, atomically and
/// without following anything planted in it.
pub async fn write(dir: &Arc<DirFd>, lease: &Lease) -> std::io::Result<()> {
    let body = serde_json::to_vec(lease).map_err(std::io::Error::other)?;
    let dir = Arc::clone(dir);
    tokio::task::spawn_blocking(move || dir.replace(LEASE_FILE, &body))
        .await
        .map_err(std::io::Error::other)?
}

/// Reads the lease of the workspace at `dir`; `None` if it has none, it is
/// unreadable, or it is a symlink (a planted lease does not count).
pub async fn read(dir: &Path) -> Option<Lease> {
    let path = dir.join(LEASE_FILE);
    let body = tokio::task::spawn_blocking(move || {
        use std::{io::Read, os::unix::fs::OpenOptionsExt};
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags((rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32)
            .open(path)?;
        // A FIFO or device planted as the lease is not a lease.
        if !file.metadata()?.is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        let mut body = Vec::new();
        file.by_ref().take(4096).read_to_end(&mut body)?;
        Ok::<_, std::io::Error>(body)
    })
    .await
    .ok()?
    .ok()?;
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
        let fd = Arc::new(DirFd::open(dir.path()).unwrap());
        write(&fd, &lease).await.unwrap();
        assert_eq!(read(dir.path()).await, Some(lease.clone()));
        assert!(!lease.expired());
        assert!(Lease::new("b", Duration::ZERO).expires_unix_ms <= now_ms());
    }
}
