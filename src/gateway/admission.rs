//! Admission: before any byte is staged, a run reserves workspace space for
//! its inputs and an estimate of its outputs; it is refused with
//! RESOURCE_EXHAUSTED, with the numbers, when the reservation would pass
//! the volume's high-water mark or when too many runs are in flight here.
//!
//! The volume is shared by every gateway replica, so reservations are too:
//! each run's reservation is written in its lease on the volume (see
//! [`crate::workspace::record`]), and admission counts every live lease's,
//! under the volume's admission lock. Expired and finished leases stop
//! counting. The reservation is released when the run ends.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use super::GatewayError;
use crate::{
    metrics::Metrics,
    workspace::{
        janitor::disk_usage_blocking,
        lease::Lease,
        record::{PendingRecord, Record, Records},
    },
};

/// Admission limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most runs at once on this replica.
    pub max_runs: usize,
    /// Largest single input, in bytes.
    pub max_input_bytes: u64,
    /// Reservation per input byte (inputs plus outputs).
    pub reserve_factor: f64,
    /// Fraction of the volume runs may fill.
    pub high_water: f64,
    /// Size of the volume's budget in bytes, instead of measuring it.
    pub capacity_bytes: Option<u64>,
}

/// Who writes the leases of admitted runs, and for how long they hold.
#[derive(Debug, Clone)]
pub struct Owner {
    /// This replica's name.
    pub replica: String,
    /// How long a lease lasts unless renewed.
    pub ttl: Duration,
}

/// Admits runs against the limits and the volume's free space.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    root: PathBuf,
    records: Arc<Records>,
    owner: Owner,
    metrics: Arc<Metrics>,
    booked: Mutex<Booked>,
}

/// What this replica holds.
#[derive(Debug, Default)]
struct Booked {
    runs: usize,
    bytes: u64,
}

/// An admitted run's share and its record on the volume; released on drop.
#[derive(Debug)]
pub struct Reservation {
    admission: Arc<Admission>,
    record: Arc<Record>,
    bytes: std::sync::atomic::AtomicU64,
}

impl Reservation {
    /// The run's record on the volume.
    pub fn record(&self) -> Arc<Record> {
        Arc::clone(&self.record)
    }

    /// Notes that the run wrote `bytes` to the volume. Measured volumes
    /// count them in their usage from now on, so the reservation shrinks by
    /// as much instead of counting them twice; a configured capacity has
    /// no usage to count them, so the reservation stays.
    pub fn written(&self, bytes: u64) {
        if self.admission.limits.capacity_bytes.is_some() {
            return;
        }
        let mut booked = self.admission.lock();
        let held = self.bytes.load(std::sync::atomic::Ordering::SeqCst);
        let freed = bytes.min(held);
        self.bytes
            .store(held - freed, std::sync::atomic::Ordering::SeqCst);
        booked.bytes -= freed;
        self.admission.metrics.reserved_bytes.set(booked.bytes as i64);
        // Stored with the lease's next write.
        self.record.update_lease(|l| l.reserved_bytes = held - freed);
    }
}

const GIB: f64 = (1u64 << 30) as f64;

impl Admission {
    /// Admission for workspaces under `root`, whose run records are
    /// `records`, writing leases as `owner`.
    pub fn new(
        limits: Limits,
        root: PathBuf,
        records: Arc<Records>,
        owner: Owner,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            limits,
            root,
            records,
            owner,
            metrics,
            booked: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Booked> {
        self.booked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fails if this replica runs as many runs as it takes: checked before
    /// a run's workspace is made, so that a burst beyond the limit costs no
    /// disk work, and again on admission, which takes the run's place.
    pub fn has_room(&self) -> Result<(), GatewayError> {
        self.refuse_if_full(&self.lock())
    }

    fn refuse_if_full(&self, booked: &Booked) -> Result<(), GatewayError> {
        if booked.runs >= self.limits.max_runs {
            return Err(GatewayError::ResourceExhausted(format!(
                "{} runs are in flight, the most this gateway replica takes; retry later",
                booked.runs
            )));
        }
        Ok(())
    }

    /// Takes a place for a run among this replica's, if one is left.
    fn take_slot(&self) -> Result<Slot<'_>, GatewayError> {
        let mut booked = self.lock();
        self.refuse_if_full(&booked)?;
        booked.runs += 1;
        self.metrics.runs_in_flight.set(booked.runs as i64);
        Ok(Slot(self))
    }

    /// Workspace reserved per input byte: the input and the outputs made
    /// from it.
    pub fn reserve_factor(&self) -> f64 {
        self.limits.reserve_factor
    }

    /// Admits the `pending` run, calling `prefabs`, whose inputs have
    /// `sizes` (URL, bytes) and which needs `need` bytes of workspace (see
    /// [`Admission::reserve_factor`]), and creates its record.
    pub async fn admit(
        self: &Arc<Self>,
        pending: PendingRecord,
        prefabs: Vec<String>,
        sizes: &[(String, u64)],
        need: u64,
    ) -> Result<Reservation, GatewayError> {
        let limits = &self.limits;
        if let Some((url, size)) = sizes.iter().find(|(_, s)| *s > limits.max_input_bytes) {
            // Never admitted, however long the caller waits: not a
            // resource to retry for.
            return Err(GatewayError::invalid(
                url.as_str(),
                format!(
                    "input {url} has {size} bytes, more than the {} a single input may have here \
                     (PREFAB_MAX_INPUT_BYTES)",
                    limits.max_input_bytes
                ),
            ));
        }
        let inputs: u64 = sizes.iter().map(|(_, s)| s).sum();
        // This replica's slot for the run, given back unless admitted.
        let slot = self.take_slot()?;
        let mut lease = Lease::new(&self.owner.replica, self.owner.ttl);
        lease.reserved_bytes = need;
        lease.prefabs = prefabs;
        let (records, root, capacity) = (
            Arc::clone(&self.records),
            self.root.clone(),
            limits.capacity_bytes,
        );
        let (factor, high_water) = (limits.reserve_factor, limits.high_water);
        let booked_on_volume = tokio::task::spawn_blocking(move || {
            let (total, used) = match capacity {
                Some(capacity) => (capacity, 0),
                None => {
                    let usage = disk_usage_blocking(&root).map_err(|e| {
                        std::io::Error::new(e.kind(), format!("cannot read workspace volume usage: {e}"))
                    })?;
                    (usage.total, usage.used)
                }
            };
            let limit = (total as f64 * high_water) as u64;
            let _lock = records.lock()?;
            let live: Vec<Lease> = records.live_leases()?.into_iter().map(|(_, lease)| lease).collect();
            let reserved: u64 = live.iter().map(|l| l.reserved_bytes).sum();
            if used + reserved + need > limit {
                return Ok(Err(GatewayError::ResourceExhausted(format!(
                    "the run needs {:.2} GiB of workspace ({:.2} GiB of inputs, and outputs estimated at {} x \
                     each call's inputs), but only {:.2} GiB \
                     is left below the {:.0}% high-water mark of the {:.2} GiB volume ({:.2} GiB used, \
                     {:.2} GiB reserved by {} runs on this volume); retry later",
                    need as f64 / GIB,
                    inputs as f64 / GIB,
                    factor - 1.0,
                    limit.saturating_sub(used + reserved) as f64 / GIB,
                    high_water * 100.0,
                    total as f64 / GIB,
                    used as f64 / GIB,
                    reserved as f64 / GIB,
                    live.len(),
                ))));
            }
            records.create(pending, lease).map(Ok)
        })
        .await
        .map_err(|e| GatewayError::Internal(e.to_string()))?
        .map_err(|e| GatewayError::Internal(format!("cannot record the run on the workspace volume: {e}")))?;
        let record = booked_on_volume?;
        slot.keep();
        let mut booked = self.lock();
        booked.bytes += need;
        self.metrics.reserved_bytes.set(booked.bytes as i64);
        self.metrics.runs_in_flight.set(booked.runs as i64);
        Ok(Reservation {
            admission: Arc::clone(self),
            record: Arc::new(record),
            bytes: need.into(),
        })
    }
}

/// A run's place among a replica's, given back when dropped unless
/// [`Slot::keep`] hands it to the run's [`Reservation`].
struct Slot<'a>(&'a Admission);

impl Slot<'_> {
    fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut booked = self.0.lock();
        booked.runs -= 1;
        self.0.metrics.runs_in_flight.set(booked.runs as i64);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut booked = self.admission.lock();
        booked.runs -= 1;
        booked.bytes -= *self.bytes.get_mut();
        self.admission.metrics.reserved_bytes.set(booked.bytes as i64);
        self.admission.metrics.runs_in_flight.set(booked.runs as i64);
        // Stored with the lease's last write, when the run's journal ends.
        self.record.update_lease(|l| l.reserved_bytes = 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workspace::{RequestId, WorkspaceRoot};

    /// A volume's records in a temporary folder, and admission as a
    /// replica of it; more replicas with [`replica`].
    struct Volume {
        _tmp: tempfile::TempDir,
        root: WorkspaceRoot,
        records: Arc<Records>,
    }

    impl Volume {
        fn new() -> Self {
            let tmp = tempfile::tempdir().unwrap();
            let root = WorkspaceRoot::new(tmp.path()).unwrap();
            let records = Arc::new(Records::open(&root).unwrap());
            Self {
                _tmp: tmp,
                root,
                records,
            }
        }

        fn replica(&self, capacity: Option<u64>, max_runs: usize) -> Arc<Admission> {
            let limits = Limits {
                max_runs,
                max_input_bytes: 1000,
                reserve_factor: 2.0,
                // A measured volume is the machine's disk, which others
                // fill: there, only a full one may refuse these runs.
                high_water: if capacity.is_some() { 0.9 } else { 1.0 },
                capacity_bytes: capacity,
            };
            let owner = Owner {
                replica: "test".into(),
                ttl: Duration::from_secs(60),
            };
            let records = Arc::clone(&self.records);
            Admission::new(
                limits,
                self.root.path().to_owned(),
                records,
                owner,
                Arc::default(),
            )
        }
    }

    async fn admit(a: &Arc<Admission>, url: &str, size: u64) -> Result<Reservation, GatewayError> {
        let pending = a.records.prepare(RequestId::new()).unwrap();
        let need = (size as f64 * a.reserve_factor()) as u64;
        a.admit(pending, vec!["p".into()], &[(url.into(), size)], need)
            .await
    }

    #[tokio::test]
    async fn bytes_written_leave_the_reservation_only_where_the_volume_counts_them() {
        let volume = Volume::new();
        let measured = volume.replica(None, 10);
        let run = admit(&measured, "s3://b/a", 300).await.unwrap();
        assert_eq!(measured.lock().bytes, 600);
        run.written(300);
        assert_eq!(
            measured.lock().bytes,
            300,
            "staged inputs count in the volume's usage"
        );
        assert_eq!(run.record().current_lease().reserved_bytes, 300);
        run.written(1000);
        assert_eq!(measured.lock().bytes, 0);
        drop(run);
        {
            let booked = measured.lock();
            assert_eq!((booked.runs, booked.bytes), (0, 0));
        }

        let budgeted = volume.replica(Some(10_000), 10);
        let run = admit(&budgeted, "s3://b/a", 300).await.unwrap();
        run.written(300);
        assert_eq!(
            budgeted.lock().bytes,
            600,
            "a configured capacity counts no usage"
        );
        drop(run);
        assert_eq!(budgeted.lock().bytes, 0);
    }

    #[tokio::test]
    async fn reserves_until_the_high_water_mark_and_releases() {
        let volume = Volume::new();
        let a = volume.replica(Some(1000), 10);
        let first = admit(&a, "s3://b/a", 200).await.unwrap();
        let _second = admit(&a, "s3://b/b", 200).await.unwrap();
        let err = admit(&a, "s3://b/c", 100).await.unwrap_err().to_string();
        assert!(err.contains("needs") && err.contains("90%"), "{err}");
        // A run's reservation ends with its lease's last write.
        let record = first.record();
        drop(first);
        record.finish().unwrap();
        assert!(admit(&a, "s3://b/c", 100).await.is_ok());
    }

    #[tokio::test]
    async fn replicas_on_one_volume_count_each_others_reservations() {
        let volume = Volume::new();
        let (a, b) = (volume.replica(Some(1000), 10), volume.replica(Some(1000), 10));
        let held = admit(&a, "s3://b/a", 400).await.unwrap();
        let err = admit(&b, "s3://b/b", 100).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        let err = err.to_string();
        assert!(err.contains("reserved by 1 runs on this volume"), "{err}");
        // An expired lease stops counting.
        held.record().update_lease(|l| l.expires_unix_ms = 0);
        held.record().write_lease().unwrap();
        assert!(admit(&b, "s3://b/b", 100).await.is_ok());
    }

    #[tokio::test]
    async fn limits_runs_and_input_size() {
        let volume = Volume::new();
        let a = volume.replica(Some(1 << 40), 1);
        let err = admit(&a, "s3://b/huge", 5000).await.unwrap_err().to_string();
        assert!(err.contains("s3://b/huge"), "{err}");
        let _one = admit(&a, "s3://b/small", 10).await.unwrap();
        let err = admit(&a, "s3://b/small", 10).await.unwrap_err().to_string();
        assert!(err.contains("runs are in flight"), "{err}");
        let err = a.has_room().unwrap_err().to_string();
        assert!(err.contains("runs are in flight"), "{err}");
    }
}
