//! Leases: a small file in each run's record (see [`super::record`]) saying
//! which gateway replica owns the run and until when, what it reserved of
//! the volume, and whether it finished. The owner renews it while the run
//! lives; any replica's janitor may remove a workspace whose lease has
//! expired, and any replica's `Watch` reports a run whose lease expired
//! unfinished as aborted.

use std::{
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use super::{DirFd, open_replaced};

/// The content of a lease file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The replica that owns the run and its workspace.
    pub owner: String,
    /// Expiry, in milliseconds since the Unix epoch.
    pub expires_unix_ms: u64,
    /// Workspace bytes the run holds reserved (see admission).
    #[serde(default)]
    pub reserved_bytes: u64,
    /// The prefab ids the run calls, for checking who may follow it.
    #[serde(default)]
    pub prefabs: Vec<String>,
    /// When the run ended, if it has.
    #[serde(default)]
    pub finished_unix_ms: Option<u64>,
}

impl Lease {
    /// A lease for `owner` expiring `ttl` from now.
    pub fn new(owner: &str, ttl: Duration) -> Self {
        Self {
            owner: owner.to_owned(),
            expires_unix_ms: now_ms() + ttl.as_millis() as u64,
            ..Self::default()
        }
    }

    /// The same lease, renewed to expire `ttl` from now.
    pub fn renewed(&self, ttl: Duration) -> Self {
        Self {
            expires_unix_ms: now_ms() + ttl.as_millis() as u64,
            ..self.clone()
        }
    }

    /// Whether the lease has expired.
    pub fn expired(&self) -> bool {
        now_ms() > self.expires_unix_ms
    }

    /// Whether it is the lease of a run still going: not finished, not
    /// expired. Only those hold reservations.
    pub fn live(&self) -> bool {
        self.finished_unix_ms.is_none() && !self.expired()
    }
}

/// Now, in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// Writes (or renews) the lease `name` in the open folder `dir`,
/// atomically and without following anything planted in it (not synced:
/// see [`DirFd::replace`]). On a full volume, where the atomic write's new
/// file finds no space, a lease is renewed in place instead: a run must not
/// lose its workspace to the janitor for that. Blocking.
pub fn write_blocking(dir: &DirFd, name: &str, lease: &Lease) -> std::io::Result<()> {
    let body = serde_json::to_vec(lease).map_err(std::io::Error::other)?;
    dir.replace(name, &body).or_else(|e| match e.raw_os_error() {
        Some(code) if full(code) => dir.overwrite(name, &body).map_err(|_| e),
        _ => Err(e),
    })
}

/// Whether `errno` says the volume (or the quota) is full.
fn full(errno: i32) -> bool {
    let errno = rustix::io::Errno::from_raw_os_error(errno);
    errno == rustix::io::Errno::NOSPC || errno == rustix::io::Errno::DQUOT
}

/// Reads the lease at `path`; `None` if there is none, it is unreadable,
/// or it is a symlink (a planted lease does not count). Blocking.
pub fn read_blocking(path: &Path) -> Option<Lease> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32)
        .open(path)
        .ok()?;
    parse(file)
}

/// Reads the lease at `path`, which should be there: as [`read_blocking`],
/// but one being renewed as it is looked up is looked up again (see
/// [`open_replaced`]). Blocking.
pub fn read_expected(path: &Path) -> Option<Lease> {
    parse(open_replaced(rustix::fs::CWD, path).ok()??)
}

fn parse(mut file: std::fs::File) -> Option<Lease> {
    use std::io::Read;
    // A FIFO or device planted as the lease is not a lease.
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut body = Vec::new();
    file.by_ref().take(64 << 10).read_to_end(&mut body).ok()?;
    serde_json::from_slice(&body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_round_trip_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lease");
        assert_eq!(read_blocking(&path), None);
        let lease = Lease::new("replica-a", Duration::from_secs(60));
        let fd = DirFd::open(dir.path()).unwrap();
        write_blocking(&fd, "lease", &lease).unwrap();
        assert_eq!(read_blocking(&path), Some(lease.clone()));
        assert!(!lease.expired());
        assert!(Lease::new("b", Duration::ZERO).expires_unix_ms <= now_ms());
    }

    #[test]
    fn a_lease_is_renewed_on_a_full_volume() {
        use std::process::Command;
        let dir = tempfile::tempdir().unwrap();
        // A file system of two pages, to fill; mounting needs root (CI
        // runs as root), so without it there is nothing to check.
        let mount = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=8k", "tmpfs"])
            .arg(dir.path())
            .output();
        if !mount.is_ok_and(|m| m.status.success()) {
            eprintln!("skipped: cannot mount a tmpfs here");
            return;
        }
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let unmounted = Command::new("umount").arg("--lazy").arg(self.0).status();
                if !unmounted.is_ok_and(|s| s.success()) {
                    eprintln!("could not unmount the test's tmpfs");
                }
            }
        }
        let _unmount = Unmount(dir.path());
        let fd = DirFd::open(dir.path()).unwrap();
        write_blocking(&fd, "lease", &Lease::new("replica-a", Duration::from_secs(60))).unwrap();
        let mut filler = std::fs::File::create(dir.path().join("filler")).unwrap();
        let filled = std::io::Write::write_all(&mut filler, &[0; 64 << 10]).unwrap_err();
        assert_eq!(
            filled.raw_os_error(),
            Some(rustix::io::Errno::NOSPC.raw_os_error())
        );
        assert!(fd.replace("other", b"{}").is_err(), "the volume is not full");
        let renewed = Lease::new("replica-a", Duration::from_secs(120));
        write_blocking(&fd, "lease", &renewed).unwrap();
        assert_eq!(read_blocking(&dir.path().join("lease")), Some(renewed));
    }
}
