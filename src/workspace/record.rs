//! Run records: what every gateway replica must know of a run lives on the
//! shared volume, beside the workspaces, not in the memory of the replica
//! that runs it. `<root>/.runs/<request_id>/` holds the run's lease (owner,
//! expiry, reservation, finished; see [`lease`]) and its journal (the
//! encoded events, appended in batches by the owner). The folder is the
//! gateway's own (`0700`): prefabs share the workspace group, not this.
//!
//! Admission across replicas takes [`Records::lock`] (an advisory `flock`,
//! which NFSv4 implements) while it counts the live leases' reservations
//! and writes its own, so that N replicas never book the same space twice.
//! It finds them through `.runs/.live/`, an empty file per run not yet
//! ended, so that its cost follows the runs in flight, not the thousands of
//! ended ones kept for `Watch`.

use std::{
    io::Read,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use rustix::fs::{AtFlags, FlockOperation, Mode, OFlags};

use super::{DirFd, RequestId, WorkspaceRoot, lease, lease::Lease};

/// The folder of run records under the workspace root.
pub const RUNS_DIR: &str = ".runs";
/// A record's journal file.
const JOURNAL_FILE: &str = "journal";
/// The admission lock file in [`RUNS_DIR`].
const LOCK_FILE: &str = ".admission.lock";
/// The folder of live-run markers in [`RUNS_DIR`].
const LIVE_DIR: &str = ".live";
/// Mode of the records folder and of each record: the gateway's only.
const PRIVATE_DIR: u32 = 0o700;
/// Mode of a journal.
const PRIVATE_FILE: u32 = 0o600;

/// The run records of one volume.
#[derive(Debug)]
pub struct Records {
    dir: DirFd,
    live: Arc<DirFd>,
    path: PathBuf,
}

impl Records {
    /// Opens (creating if needed) the records folder of `root`. Blocking.
    pub fn open(root: &WorkspaceRoot) -> std::io::Result<Self> {
        let path = root.path().join(RUNS_DIR);
        let dir = open_or_create(&DirFd::open(root.path())?, RUNS_DIR)?;
        let live = Arc::new(open_or_create(&dir, LIVE_DIR)?);
        Ok(Self { dir, live, path })
    }

    /// The records folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates the record of run `id` with its first lease. Blocking.
    pub fn create(&self, id: RequestId, lease: Lease) -> std::io::Result<Record> {
        let dir = self.dir.create_dir(&id.to_string(), None, PRIVATE_DIR)?;
        let record = Record {
            id,
            dir,
            live: Arc::clone(&self.live),
            lease: Mutex::new(lease),
        };
        record.write_lease()?;
        drop(self.live.create_new(&id.to_string(), PRIVATE_FILE)?);
        Ok(record)
    }

    /// Opens the record of run `id` for reading, if there is one. Blocking.
    pub fn find(&self, id: RequestId) -> std::io::Result<Option<RecordReader>> {
        match self.dir.subdir_existing(&id.to_string()) {
            Ok(Some(dir)) => Ok(Some(RecordReader {
                dir,
                path: self.path.join(id.to_string()),
            })),
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Takes the volume-wide admission lock, waiting for it. Blocking.
    pub fn lock(&self) -> std::io::Result<AdmissionLock> {
        let flags = OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&self.dir, LOCK_FILE, flags, Mode::from_raw_mode(PRIVATE_FILE))?;
        rustix::fs::flock(&fd, FlockOperation::LockExclusive)?;
        Ok(AdmissionLock(fd))
    }

    /// The leases of the runs not yet ended, by run. Markers left by runs
    /// whose lease expired or ended (an owner that died) are removed on
    /// the way. Blocking; call it holding the admission lock.
    pub fn live_leases(&self) -> std::io::Result<Vec<(RequestId, Lease)>> {
        let mut leases = Vec::new();
        for entry in std::fs::read_dir(self.path.join(LIVE_DIR))? {
            let Ok(entry) = entry else { continue };
            let name = entry.file_name();
            let Ok(id) = RequestId::parse(&name.to_string_lossy()) else {
                continue;
            };
            match self.lease(id) {
                Some(lease) if lease.live() => leases.push((id, lease)),
                _ => {
                    let _ = rustix::fs::unlinkat(&*self.live, name.as_os_str(), AtFlags::empty());
                }
            }
        }
        Ok(leases)
    }

    /// The lease of run `id`, if it has a record. Blocking.
    pub fn lease(&self, id: RequestId) -> Option<Lease> {
        lease::read_blocking(&self.path.join(id.to_string()))
    }

    /// Removes the records that no reader needs any more: those of runs
    /// finished more than `retention` ago, of runs whose owner stopped
    /// renewing their lease more than `retention` ago, and leaseless ones
    /// older than `grace`. Returns how many went. Blocking.
    pub fn sweep(&self, retention: Duration, grace: Duration) -> u64 {
        let Ok(entries) = std::fs::read_dir(&self.path) else {
            return 0;
        };
        let now = lease::now_ms();
        let retention_ms = retention.as_millis() as u64;
        let mut removed = 0;
        for entry in entries.flatten() {
            if RequestId::parse(&entry.file_name().to_string_lossy()).is_err() {
                continue;
            }
            let path = entry.path();
            let stale = match lease::read_blocking(&path) {
                Some(Lease {
                    finished_unix_ms: Some(at),
                    ..
                }) => now > at.saturating_add(retention_ms),
                Some(lease) => now > lease.expires_unix_ms.saturating_add(retention_ms),
                None => entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| SystemTime::now().duration_since(t).unwrap_or_default() > grace),
            };
            if stale && std::fs::remove_dir_all(&path).is_ok() {
                removed += 1;
            }
        }
        removed
    }
}

/// Opens the folder `name` in `parent`, creating it (private) if missing.
fn open_or_create(parent: &DirFd, name: &str) -> std::io::Result<DirFd> {
    match parent.create_dir(name, None, PRIVATE_DIR) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => parent
            .subdir_existing(name)?
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("{name} vanished"))),
        created => created,
    }
}

/// The admission lock; released when dropped.
#[derive(Debug)]
pub struct AdmissionLock(#[allow(dead_code)] std::os::fd::OwnedFd);

/// The record of a run this replica owns: it writes the lease and the
/// journal.
#[derive(Debug)]
pub struct Record {
    id: RequestId,
    dir: DirFd,
    live: Arc<DirFd>,
    lease: Mutex<Lease>,
}

impl Record {
    /// The run.
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// Changes the lease in memory; [`Record::write_lease`] stores it.
    pub fn update_lease(&self, change: impl FnOnce(&mut Lease)) {
        change(&mut self.lease.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// The lease as it is now in memory.
    pub fn current_lease(&self) -> Lease {
        self.lease.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stores the lease. Blocking.
    pub fn write_lease(&self) -> std::io::Result<()> {
        lease::write_blocking(&self.dir, &self.current_lease())
    }

    /// Takes the run off the live runs admission counts, once its lease
    /// says it ended. Blocking.
    pub fn retire(&self) -> std::io::Result<()> {
        match rustix::fs::unlinkat(&*self.live, self.id.to_string(), AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Appends encoded journal entries. Blocking.
    pub fn append(&self, entries: &[u8]) -> std::io::Result<()> {
        self.dir.append(JOURNAL_FILE, entries, PRIVATE_FILE)
    }
}

/// A run's record, opened for reading by any replica.
#[derive(Debug)]
pub struct RecordReader {
    dir: DirFd,
    path: PathBuf,
}

impl RecordReader {
    /// The run's lease, if it can be read. Blocking.
    pub fn lease(&self) -> Option<Lease> {
        lease::read_blocking(&self.path)
    }

    /// Up to `max` journal bytes from `offset` on (fewer at its end).
    /// Each call opens the file anew: on a network volume that is what
    /// shows another host's appends. Blocking.
    pub fn read_journal(&self, offset: u64, max: usize) -> std::io::Result<Vec<u8>> {
        let Some(file) = self.dir.open_file(JOURNAL_FILE)? else {
            return Ok(Vec::new());
        };
        let mut bytes = Vec::new();
        let mut file = std::io::BufReader::new(file);
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(offset))?;
        file.take(max as u64).read_to_end(&mut bytes)?;
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_hold_leases_and_journals_and_are_swept_after_retention() {
        let tmp = tempfile::tempdir().unwrap();
        let root = WorkspaceRoot::new(tmp.path()).unwrap();
        let records = Records::open(&root).unwrap();
        let again = Records::open(&root).unwrap();
        let (live, done, dead) = (RequestId::new(), RequestId::new(), RequestId::new());
        let ttl = Duration::from_secs(60);
        let record = records.create(live, Lease::new("a", ttl)).unwrap();
        record.append(b"one").unwrap();
        record.append(b"two").unwrap();
        record.update_lease(|l| l.reserved_bytes = 7);
        record.write_lease().unwrap();
        let finished = records.create(done, Lease::new("a", ttl)).unwrap();
        finished.update_lease(|l| l.finished_unix_ms = Some(lease::now_ms() - 10_000));
        finished.write_lease().unwrap();
        records.create(dead, Lease::new("b", Duration::ZERO)).unwrap();

        let reader = again.find(live).unwrap().expect("a record");
        assert_eq!(reader.read_journal(0, 100).unwrap(), b"onetwo");
        assert_eq!(reader.read_journal(3, 2).unwrap(), b"tw");
        assert_eq!(reader.lease().unwrap().reserved_bytes, 7);
        assert!(again.find(RequestId::new()).unwrap().is_none());
        // Only the live run counts; the others' markers go on the way.
        std::thread::sleep(Duration::from_millis(5));
        let ids: Vec<_> = again
            .live_leases()
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids, [live]);
        assert_eq!(
            std::fs::read_dir(records.path().join(LIVE_DIR)).unwrap().count(),
            1
        );
        record.retire().unwrap();
        assert!(again.live_leases().unwrap().is_empty());

        // Finished 10 s ago, expired just now: kept for a retention of a
        // minute, the finished one removed with a retention of a second.
        assert_eq!(records.sweep(Duration::from_secs(60), Duration::ZERO), 0);
        assert_eq!(records.sweep(Duration::from_secs(1), Duration::ZERO), 1);
        assert!(records.find(done).unwrap().is_none() && records.find(live).unwrap().is_some());
        assert_eq!(records.sweep(Duration::ZERO, Duration::ZERO), 1);
        assert!(records.find(dead).unwrap().is_none() && records.find(live).unwrap().is_some());
        let _lock = records.lock().unwrap();
    }
}
