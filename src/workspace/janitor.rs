//! The janitor: removes workspaces nobody owns any more and run records
//! nobody needs any more, and reports disk usage. Any number of gateway
//! replicas may run it on the same volume: it removes only workspaces whose
//! run's lease has expired or ended, or that have no lease and are older
//! than the grace period. Each workspace is handled on its own; an error on
//! one is logged and the sweep goes on.

use std::{
    path::Path,
    time::{Duration, SystemTime},
};

use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use super::{REMOVING_PREFIX, RequestId, WorkspaceRoot, record::Records};

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sweep {
    /// Workspaces removed.
    pub removed: u64,
    /// Bytes those workspaces held.
    pub freed_bytes: u64,
}

/// Space on the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskUsage {
    /// Size of the file system in bytes.
    pub total: u64,
    /// Bytes in use.
    pub used: u64,
}

impl DiskUsage {
    /// Used fraction in [0, 1].
    pub fn ratio(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.used as f64 / self.total as f64
        }
    }
}

/// `statvfs` of the volume holding `path`.
pub async fn disk_usage(path: &Path) -> std::io::Result<DiskUsage> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || disk_usage_blocking(&path))
        .await
        .map_err(std::io::Error::other)?
}

/// [`disk_usage`], blocking.
pub fn disk_usage_blocking(path: &Path) -> std::io::Result<DiskUsage> {
    let s = rustix::fs::statvfs(path)?;
    let total = s.f_blocks * s.f_frsize;
    let free = s.f_bavail * s.f_frsize;
    Ok(DiskUsage {
        total,
        used: total.saturating_sub(free),
    })
}

/// Removes every abandoned workspace under `root` once.
pub async fn sweep(root: &WorkspaceRoot, grace: Duration) -> Sweep {
    let mut report = Sweep::default();
    let opened = root.clone();
    let records = match tokio::task::spawn_blocking(move || Records::open(&opened)).await {
        Ok(Ok(records)) => Some(Arc::new(records)),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "janitor cannot read the run records; only leaseless workspaces count");
            None
        }
        Err(_) => None,
    };
    let mut entries = match tokio::fs::read_dir(root.path()).await {
        Ok(entries) => entries,
        Err(e) => {
            tracing::error!(root = %root.path().display(), error = %e, "janitor cannot list the workspace root");
            return report;
        }
    };
    loop {
        let entry = match entries.next_entry().await {
            Ok(Some(entry)) => entry,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "janitor: listing failed part-way");
                break;
            }
        };
        let name = entry.file_name();
        let text = name.to_string_lossy();
        // Only folders named like a request id are workspaces; those renamed
        // aside for removal are abandoned by definition.
        let removing = text.strip_prefix(REMOVING_PREFIX);
        if RequestId::parse(removing.unwrap_or(&text)).is_err() {
            continue;
        }
        let dir = entry.path();
        if removing.is_none() {
            match abandoned(&dir, records.as_ref(), removing.unwrap_or(&text), grace).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::debug!(dir = %dir.display(), error = %e, "janitor: skipped");
                    continue;
                }
            }
        }
        let size = dir_size(&dir).await;
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => {
                report.removed += 1;
                report.freed_bytes += size;
                tracing::info!(workspace = %name.to_string_lossy(), bytes = size, "janitor removed an abandoned workspace");
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "janitor could not remove a workspace")
            }
        }
    }
    report
}

/// Whether the workspace `dir` of run `name` is abandoned: its run's lease
/// expired or ended, or it has none and is older than `grace`.
async fn abandoned(
    dir: &Path,
    records: Option<&Arc<Records>>,
    name: &str,
    grace: Duration,
) -> std::io::Result<bool> {
    let meta = tokio::fs::symlink_metadata(dir).await?;
    if !meta.is_dir() {
        return Ok(false);
    }
    let lease = match (records, RequestId::parse(name)) {
        (Some(records), Ok(id)) => {
            let records = Arc::clone(records);
            tokio::task::spawn_blocking(move || records.lease(id))
                .await
                .ok()
                .flatten()
        }
        _ => None,
    };
    if let Some(lease) = lease {
        return Ok(!lease.live());
    }
    let age = SystemTime::now()
        .duration_since(meta.modified()?)
        .unwrap_or_default();
    Ok(age > grace)
}

/// Bytes under `dir`, not following symlinks.
async fn dir_size(dir: &Path) -> u64 {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut total = 0;
        let mut stack = vec![dir];
        while let Some(d) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for entry in entries.flatten() {
                match entry.metadata() {
                    Ok(m) if m.is_dir() => stack.push(entry.path()),
                    Ok(m) => total += m.len(),
                    Err(_) => {}
                }
            }
        }
        total
    })
    .await
    .unwrap_or_default()
}

/// How often and how patiently the janitor works.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// Time between sweeps.
    pub interval: Duration,
    /// Age after which a workspace without a lease is abandoned.
    pub grace: Duration,
    /// How long the records of ended runs are kept for `Watch`.
    pub retention: Duration,
}

/// Sweeps at once, then every `interval`, until `shutdown`; logs the
/// operators' summary lines and hands each sweep and usage to `report`.
pub async fn run(
    root: WorkspaceRoot,
    schedule: Schedule,
    shutdown: CancellationToken,
    report: impl Fn(Sweep, Option<DiskUsage>) + Send,
) {
    let Schedule {
        interval,
        grace,
        retention,
    } = schedule;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let done = sweep(&root, grace).await;
        let records = root.clone();
        let swept =
            tokio::task::spawn_blocking(move || Records::open(&records).map(|r| r.sweep(retention, grace)))
                .await;
        match swept {
            Ok(Ok(n)) if n > 0 => tracing::info!(records = n, "janitor removed the records of ended runs"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "janitor cannot read the run records"),
            Err(e) => tracing::warn!(error = %e, "janitor's record sweep failed"),
        }
        tracing::info!(
            "Cleanup summary: removed {} workspaces, freed {:.2} MB",
            done.removed,
            done.freed_bytes as f64 / 1e6
        );
        let usage = match disk_usage(root.path()).await {
            Ok(u) => {
                tracing::info!("Workspace disk usage: {:.1}%", u.ratio() * 100.0);
                Some(u)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read workspace disk usage");
                None
            }
        };
        report(done, usage);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sweep_removes_only_expired_or_old_unleased_workspaces() {
        let tmp = tempfile::tempdir().unwrap();
        let root = WorkspaceRoot::new(tmp.path()).unwrap();
        let records = super::super::record::Records::open(&root).unwrap();
        let lease = |id, owner, ttl| {
            let pending = records.prepare(id).unwrap();
            records
                .create(pending, super::super::lease::Lease::new(owner, ttl))
                .unwrap()
        };
        let live = root.create(RequestId::new()).await.unwrap();
        // Held: a record dropped unfinished ends its lease.
        let _lease = lease(live.id(), "me", Duration::from_secs(60));
        let expired = root.create(RequestId::new()).await.unwrap();
        lease(expired.id(), "dead", Duration::ZERO);
        tokio::fs::write(expired.dir().join("inputs/big"), vec![0u8; 4096])
            .await
            .unwrap();
        let young = root.create(RequestId::new()).await.unwrap();
        std::fs::create_dir(tmp.path().join("not-a-workspace")).unwrap();

        tokio::time::sleep(Duration::from_millis(5)).await;
        let report = sweep(&root, Duration::from_secs(3600)).await;
        assert_eq!(report.removed, 1);
        assert!(report.freed_bytes >= 4096);
        assert!(live.dir().exists() && young.dir().exists() && !expired.dir().exists());
        assert!(tmp.path().join("not-a-workspace").exists());

        // With no grace, a workspace without a lease is abandoned.
        let report = sweep(&root, Duration::ZERO).await;
        assert_eq!(report.removed, 1);
        assert!(live.dir().exists() && !young.dir().exists());
        std::mem::forget(expired);
        std::mem::forget(young);
    }

    #[tokio::test]
    async fn workspaces_left_half_removed_are_swept() {
        let tmp = tempfile::tempdir().unwrap();
        let root = WorkspaceRoot::new(tmp.path()).unwrap();
        let aside = tmp.path().join(format!("{REMOVING_PREFIX}{}", RequestId::new()));
        std::fs::create_dir_all(aside.join("outputs")).unwrap();
        std::fs::create_dir(tmp.path().join(format!("{REMOVING_PREFIX}not-an-id"))).unwrap();
        let report = sweep(&root, Duration::from_secs(3600)).await;
        assert_eq!(report.removed, 1);
        assert!(!aside.exists());
        assert!(tmp.path().join(format!("{REMOVING_PREFIX}not-an-id")).exists());
    }

    #[tokio::test]
    async fn disk_usage_reads_the_volume() {
        let tmp = tempfile::tempdir().unwrap();
        let u = disk_usage(tmp.path()).await.unwrap();
        assert!(u.total > 0 && u.used <= u.total);
    }
}
