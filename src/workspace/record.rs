//! Run records: what every gateway replica must know of a run lives on the
//! shared volume, beside the workspaces, not in the memory of the replica
//! that runs it:
//!
//! ```text
//! <root>/.runs/.admission.lock   the volume-wide admission lock
//! <root>/.runs/.live/<id>        the lease of a run not yet ended
//! <root>/.runs/<id>.journal      its encoded events, appended by the owner
//! <root>/.runs/<id>.lease        its lease, moved here when it ended
//! ```
//!
//! A lease (see [`lease`]) names the owner, an expiry, the space the run
//! reserved and, once written to the record, when it finished. Admission
//! across replicas takes [`Records::lock`] (an advisory `flock`, which
//! NFSv4 implements) while it counts the reservations of `.live/` and
//! writes its own, so that N replicas never book the same space twice; its
//! cost follows the runs in flight, not the ended ones kept for `Watch`.
//! Admitting writes one file (the live lease, made beforehand as
//! `.live/<id>.tmp` while the inputs are looked at); the end of a run
//! appends to the journal and renames the lease out of `.live/`, which is
//! what says it ended (at the journal's last write). Everything here is the
//! gateway's own (`0700`): prefabs share the workspace group, not this.

use std::{
    io::Read,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use rustix::fs::{FlockOperation, Mode, OFlags};

use super::{DirFd, RequestId, TMP_SUFFIX, WorkspaceRoot, lease, lease::Lease};

/// The folder of run records under the workspace root.
pub const RUNS_DIR: &str = ".runs";
/// The suffix of a record's journal file.
const JOURNAL: &str = ".journal";
/// The suffix of a record's last lease.
const LEASE: &str = ".lease";
/// The admission lock file in [`RUNS_DIR`].
const LOCK_FILE: &str = ".admission.lock";
/// The folder of live runs' leases in [`RUNS_DIR`].
const LIVE_DIR: &str = ".live";
/// Mode of the records folder and of each record: the gateway's only.
const PRIVATE_DIR: u32 = 0o700;
/// Mode of a journal.
const PRIVATE_FILE: u32 = 0o600;

/// The run records of one volume.
#[derive(Debug)]
pub struct Records {
    shared: Arc<Folders>,
}

/// The open records folders.
#[derive(Debug)]
struct Folders {
    runs: DirFd,
    live: DirFd,
    path: PathBuf,
    /// The admission lock file, open for the process's life: `flock`
    /// excludes other processes; the mutex, this one's threads (which
    /// share the open file, and so its lock).
    lock: Mutex<std::os::fd::OwnedFd>,
}

impl Folders {
    fn live_lease(&self, id: RequestId) -> PathBuf {
        self.path.join(LIVE_DIR).join(id.to_string())
    }

    fn record(&self, id: RequestId, suffix: &str) -> PathBuf {
        self.path.join(format!("{id}{suffix}"))
    }

    /// The lease of run `id`: its live one, else the one of its record,
    /// finished when its journal (or the lease) was last written.
    ///
    /// With neither, it looks for the live one again for a while: on a
    /// network or FUSE volume a lease being renewed as it is looked up can
    /// seem gone, and a live run must not look abandoned (to the janitor,
    /// to a sweep, to a replica following it).
    fn lease(&self, id: RequestId) -> Option<Lease> {
        if let Some(live) = lease::read_blocking(&self.live_lease(id)) {
            return Some(live);
        }
        self.ended_lease(id)
            .or_else(|| lease::read_expected(&self.live_lease(id)).or_else(|| self.ended_lease(id)))
    }

    /// The lease of run `id`'s record, once it ended.
    fn ended_lease(&self, id: RequestId) -> Option<Lease> {
        let mut ended = lease::read_blocking(&self.record(id, LEASE))?;
        let written = |path: PathBuf| std::fs::symlink_metadata(path).and_then(|m| m.modified()).ok();
        let at = written(self.record(id, JOURNAL)).or_else(|| written(self.record(id, LEASE)));
        let at = at.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok());
        ended.finished_unix_ms = Some(at.map_or(0, |d| d.as_millis() as u64));
        Some(ended)
    }
}

impl Records {
    /// Opens (creating if needed) the records folder of `root`. Blocking.
    pub fn open(root: &WorkspaceRoot) -> std::io::Result<Self> {
        let path = root.path().join(RUNS_DIR);
        let runs = open_or_create(&DirFd::open(root.path())?, RUNS_DIR)?;
        let live = open_or_create(&runs, LIVE_DIR)?;
        let flags = OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let lock = rustix::fs::openat(&runs, LOCK_FILE, flags, Mode::from_raw_mode(PRIVATE_FILE))?;
        Ok(Self {
            shared: Arc::new(Folders {
                runs,
                live,
                path,
                lock: Mutex::new(lock),
            }),
        })
    }

    /// The records folder.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Makes the file run `id`'s first lease will be written to
    /// (`.live/<id>.tmp`), so that admission, which holds the volume-wide
    /// lock, only fills and renames it. Blocking.
    pub fn prepare(&self, id: RequestId) -> std::io::Result<PendingRecord> {
        let file = self.shared.live.create_tmp(&id.to_string())?;
        Ok(PendingRecord {
            id,
            folders: Arc::clone(&self.shared),
            file: Some(file),
        })
    }

    /// Starts the record of the prepared run with its first lease.
    /// Blocking.
    pub fn create(&self, mut pending: PendingRecord, lease: Lease) -> std::io::Result<Record> {
        let id = pending.id;
        let file = pending.file.take().expect("a pending record is created once");
        let body = serde_json::to_vec(&lease).map_err(std::io::Error::other)?;
        let name = id.to_string();
        let written = self
            .shared
            .live
            .fill_and_rename(file, &tmp_name(id), &name, &body);
        if let Err(e) = written {
            let _ = self.shared.live.remove_file(&tmp_name(id));
            return Err(e);
        }
        Ok(Record {
            id,
            folders: Arc::clone(&self.shared),
            lease: Mutex::new(lease),
            finished: Default::default(),
        })
    }

    /// Opens the record of run `id` for reading, if there is one. Blocking.
    pub fn find(&self, id: RequestId) -> Option<RecordReader> {
        // An id without a single file is no run's: no looking again.
        let folders = &self.shared;
        let files = [
            folders.live_lease(id),
            folders.record(id, LEASE),
            folders.record(id, JOURNAL),
        ];
        if !files.iter().any(|f| std::fs::symlink_metadata(f).is_ok()) {
            return None;
        }
        let reader = RecordReader {
            id,
            folders: Arc::clone(&self.shared),
        };
        reader.lease().map(|_| reader)
    }

    /// Takes the volume-wide admission lock, waiting for it. Blocking.
    pub fn lock(&self) -> std::io::Result<AdmissionLock<'_>> {
        let file = self.shared.lock.lock().unwrap_or_else(|p| p.into_inner());
        rustix::fs::flock(&*file, FlockOperation::LockExclusive)?;
        Ok(AdmissionLock(file))
    }

    /// The leases of the runs not yet ended, by run (those of owners that
    /// died are left for the janitor). Blocking; call it holding the
    /// admission lock. On a network volume a lease being renewed as this
    /// reads it can be missed (see [`lease::read_expected`]), leaving its
    /// reservation out of this one admission: looking each one up again
    /// would hold the lock through every run that ends meanwhile.
    pub fn live_leases(&self) -> std::io::Result<Vec<(RequestId, Lease)>> {
        let mut leases = Vec::new();
        for entry in std::fs::read_dir(self.shared.path.join(LIVE_DIR))? {
            let Ok(entry) = entry else { continue };
            let Ok(id) = RequestId::parse(&entry.file_name().to_string_lossy()) else {
                continue;
            };
            if let Some(lease) = lease::read_blocking(&entry.path()).filter(Lease::live) {
                leases.push((id, lease));
            }
        }
        Ok(leases)
    }

    /// The lease of run `id`, if it has a record. Blocking.
    pub fn lease(&self, id: RequestId) -> Option<Lease> {
        self.shared.lease(id)
    }

    /// Removes the records that no reader needs any more: those of runs
    /// finished more than `retention` ago, of runs whose owner stopped
    /// renewing their lease more than `retention` ago, and leaseless ones
    /// older than `grace`. Returns how many went. Blocking.
    pub fn sweep(&self, retention: Duration, grace: Duration) -> u64 {
        let folders = &self.shared;
        let now = lease::now_ms();
        let retention_ms = retention.as_millis() as u64;
        let mut ids: Vec<(RequestId, PathBuf)> = Vec::new();
        for dir in [folders.path.join(LIVE_DIR), folders.path.clone()] {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                let id = name
                    .strip_suffix(JOURNAL)
                    .or(name.strip_suffix(LEASE))
                    .or(name.strip_suffix(TMP_SUFFIX))
                    .unwrap_or(&name);
                if let Ok(id) = RequestId::parse(id) {
                    ids.push((id, entry.path()));
                }
            }
        }
        ids.sort_by_key(|(id, _)| id.to_string());
        ids.dedup_by_key(|(id, _)| *id);
        let mut removed = 0;
        for (id, path) in ids {
            let stale = match folders.lease(id) {
                Some(Lease {
                    finished_unix_ms: Some(at),
                    ..
                }) => now > at.saturating_add(retention_ms),
                Some(lease) => now > lease.expires_unix_ms.saturating_add(retention_ms),
                None => std::fs::symlink_metadata(&path)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| SystemTime::now().duration_since(t).unwrap_or_default() > grace),
            };
            if !stale {
                continue;
            }
            let gone = [
                folders.record(id, JOURNAL),
                folders.record(id, LEASE),
                folders.live_lease(id),
                folders.live_lease(id).with_file_name(tmp_name(id)),
            ]
            .map(|path| std::fs::remove_file(path).is_ok());
            if gone.contains(&true) {
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
pub struct AdmissionLock<'a>(std::sync::MutexGuard<'a, std::os::fd::OwnedFd>);

impl Drop for AdmissionLock<'_> {
    fn drop(&mut self) {
        // Closing the file would release it too, but it stays open.
        let _ = rustix::fs::flock(&*self.0, FlockOperation::Unlock);
    }
}

/// The name of the file a lease is written through before its rename.
fn tmp_name(id: RequestId) -> String {
    super::tmp_name(&id.to_string())
}

/// The lease file of a run not admitted yet (see [`Records::prepare`]);
/// dropped unused, it is removed.
#[derive(Debug)]
pub struct PendingRecord {
    id: RequestId,
    folders: Arc<Folders>,
    file: Option<std::fs::File>,
}

impl Drop for PendingRecord {
    fn drop(&mut self) {
        if self.file.take().is_none() {
            return;
        }
        let (folders, name) = (Arc::clone(&self.folders), tmp_name(self.id));
        let remove = move || {
            if let Err(e) = folders.live.remove_file(&name) {
                tracing::warn!(file = name, error = %e, "could not remove an unused lease file");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(remove)),
            Err(_) => remove(),
        }
    }
}

/// The record of a run this replica owns: it writes the lease and the
/// journal.
#[derive(Debug)]
pub struct Record {
    id: RequestId,
    folders: Arc<Folders>,
    lease: Mutex<Lease>,
    finished: std::sync::atomic::AtomicBool,
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

    /// Stores the live lease. Blocking.
    pub fn write_lease(&self) -> std::io::Result<()> {
        let lease = self.current_lease();
        lease::write_blocking(&self.folders.live, &self.id.to_string(), &lease)
    }

    /// Says the run ended: its lease leaves `.live/` for the record, and
    /// stops counting for admission. Blocking.
    pub fn finish(&self) -> std::io::Result<()> {
        let name = self.id.to_string();
        let ended = format!("{name}{LEASE}");
        match rustix::fs::renameat(
            &self.folders.live,
            name.as_str(),
            &self.folders.runs,
            ended.as_str(),
        ) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Appends encoded journal entries. Blocking.
    pub fn append(&self, entries: &[u8]) -> std::io::Result<()> {
        let name = format!("{}{JOURNAL}", self.id);
        self.folders.runs.append(&name, entries, PRIVATE_FILE)
    }
}

impl Drop for Record {
    /// A record dropped unfinished (its run never started: the caller left
    /// during admission) ends its lease, one rename, so that its
    /// reservation stops counting at once rather than at its expiry.
    fn drop(&mut self) {
        if !self.finished.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = self.finish();
        }
    }
}

/// A run's record, opened for reading by any replica.
#[derive(Debug)]
pub struct RecordReader {
    id: RequestId,
    folders: Arc<Folders>,
}

impl RecordReader {
    /// The run's lease, if it can be read. Blocking.
    pub fn lease(&self) -> Option<Lease> {
        self.folders.lease(self.id)
    }

    /// Up to `max` journal bytes from `offset` on (fewer at its end, none
    /// before its first append). Each call opens the file anew: on a
    /// network volume that is what shows another host's appends. Blocking.
    pub fn read_journal(&self, offset: u64, max: usize) -> std::io::Result<Vec<u8>> {
        let Some(file) = self.folders.runs.open_file(&format!("{}{JOURNAL}", self.id))? else {
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
        let create = |id, lease| records.create(records.prepare(id).unwrap(), lease).unwrap();
        let record = create(live, Lease::new("a", ttl));
        let reader = again.find(live).expect("a record");
        assert!(reader.read_journal(0, 100).unwrap().is_empty(), "no journal yet");
        record.append(b"one").unwrap();
        record.append(b"two").unwrap();
        record.update_lease(|l| l.reserved_bytes = 7);
        record.write_lease().unwrap();
        let finished = create(done, Lease::new("a", ttl));
        finished.append(b"end").unwrap();
        finished.finish().unwrap();
        create(dead, Lease::new("b", Duration::ZERO));

        assert_eq!(reader.read_journal(0, 100).unwrap(), b"onetwo");
        assert_eq!(reader.read_journal(3, 2).unwrap(), b"tw");
        assert_eq!(reader.lease().unwrap().reserved_bytes, 7);
        assert!(again.find(RequestId::new()).is_none());
        assert!(
            again
                .find(done)
                .unwrap()
                .lease()
                .unwrap()
                .finished_unix_ms
                .is_some()
        );
        // Only the live run counts.
        std::thread::sleep(Duration::from_millis(5));
        let ids: Vec<_> = again
            .live_leases()
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids, [live]);

        // Finished and expired just now: kept for a retention of a minute;
        // the finished one goes 10 ms after its end with a retention of 5.
        assert_eq!(records.sweep(Duration::from_secs(60), Duration::ZERO), 0);
        std::thread::sleep(Duration::from_millis(10));
        assert_eq!(records.sweep(Duration::from_millis(5), Duration::ZERO), 2);
        assert!(records.find(done).is_none() && records.find(dead).is_none());
        assert!(records.find(live).is_some());
        let _lock = records.lock().unwrap();
    }

    #[test]
    fn a_lease_file_made_for_a_run_never_admitted_does_not_stay() {
        let tmp = tempfile::tempdir().unwrap();
        let root = WorkspaceRoot::new(tmp.path()).unwrap();
        let records = Records::open(&root).unwrap();
        let live = records.path().join(LIVE_DIR);
        let files = || std::fs::read_dir(&live).unwrap().count();
        // Refused (or its caller left): dropped, removed.
        drop(records.prepare(RequestId::new()).unwrap());
        assert_eq!(files(), 0);
        // Left by a replica that died before admitting: swept after the
        // grace, like any leaseless record.
        std::mem::forget(records.prepare(RequestId::new()).unwrap());
        assert_eq!(files(), 1);
        assert_eq!(records.sweep(Duration::ZERO, Duration::from_secs(60)), 0);
        std::thread::sleep(Duration::from_millis(10));
        assert_eq!(records.sweep(Duration::ZERO, Duration::from_millis(5)), 1);
        assert_eq!(files(), 0);
    }
}
