//! Admission: before any byte is staged, a run reserves workspace space for
//! its inputs and an estimate of its outputs; it is refused with
//! RESOURCE_EXHAUSTED, with the numbers, when the reservation would pass
//! the volume's high-water mark or when too many runs are in flight. The
//! reservation is released when the run ends.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use super::GatewayError;
use crate::{metrics::Metrics, workspace::janitor::disk_usage};

/// Admission limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most runs at once.
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

/// Admits runs against the limits and the volume's free space.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    root: PathBuf,
    metrics: Arc<Metrics>,
    booked: Mutex<Booked>,
}

#[derive(Debug, Default)]
struct Booked {
    runs: usize,
    bytes: u64,
}

/// An admitted run's share; released on drop.
#[derive(Debug)]
pub struct Reservation {
    admission: Arc<Admission>,
    bytes: std::sync::atomic::AtomicU64,
}

impl Reservation {
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
    }
}

const GIB: f64 = (1u64 << 30) as f64;

impl Admission {
    /// Admission for workspaces under `root`.
    pub fn new(limits: Limits, root: PathBuf, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            limits,
            root,
            metrics,
            booked: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Booked> {
        self.booked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a run whose inputs have `sizes` (URL, bytes).
    pub async fn admit(self: &Arc<Self>, sizes: &[(String, u64)]) -> Result<Reservation, GatewayError> {
        let limits = &self.limits;
        if let Some((url, size)) = sizes.iter().find(|(_, s)| *s > limits.max_input_bytes) {
            // Never admitted, however long the caller waits: not a
            // resource to retry for.
            return Err(GatewayError::InvalidArgument(format!(
                "input {url} has {size} bytes, more than the {} a single input may have here \
                 (PREFAB_MAX_INPUT_BYTES)",
                limits.max_input_bytes
            )));
        }
        let inputs: u64 = sizes.iter().map(|(_, s)| s).sum();
        let need = (inputs as f64 * limits.reserve_factor).ceil() as u64;
        let (total, used) = match limits.capacity_bytes {
            Some(capacity) => (capacity, 0),
            None => {
                let usage = disk_usage(&self.root).await.map_err(|e| {
                    GatewayError::Internal(format!("cannot read workspace volume usage: {e}"))
                })?;
                (usage.total, usage.used)
            }
        };
        let limit = (total as f64 * limits.high_water) as u64;
        let mut booked = self.lock();
        if booked.runs >= limits.max_runs {
            return Err(GatewayError::ResourceExhausted(format!(
                "{} runs are in flight, the most this gateway takes; retry later",
                booked.runs
            )));
        }
        if used + booked.bytes + need > limit {
            return Err(GatewayError::ResourceExhausted(format!(
                "the run needs {:.2} GiB of workspace ({:.2} GiB of inputs x {}), but only {:.2} GiB is left below the \
                 {:.0}% high-water mark of the {:.2} GiB volume ({:.2} GiB used, {:.2} GiB reserved by {} runs); retry later",
                need as f64 / GIB,
                inputs as f64 / GIB,
                limits.reserve_factor,
                limit.saturating_sub(used + booked.bytes) as f64 / GIB,
                limits.high_water * 100.0,
                total as f64 / GIB,
                used as f64 / GIB,
                booked.bytes as f64 / GIB,
                booked.runs,
            )));
        }
        booked.runs += 1;
        booked.bytes += need;
        self.metrics.reserved_bytes.set(booked.bytes as i64);
        self.metrics.runs_in_flight.set(booked.runs as i64);
        Ok(Reservation {
            admission: Arc::clone(self),
            bytes: need.into(),
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut booked = self.admission.lock();
        booked.runs -= 1;
        booked.bytes -= *self.bytes.get_mut();
        self.admission.metrics.reserved_bytes.set(booked.bytes as i64);
        self.admission.metrics.runs_in_flight.set(booked.runs as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(capacity: u64, max_runs: usize) -> Arc<Admission> {
        admission_of(Some(capacity), max_runs)
    }

    fn admission_of(capacity: Option<u64>, max_runs: usize) -> Arc<Admission> {
        let limits = Limits {
            max_runs,
            max_input_bytes: 1000,
            reserve_factor: 2.0,
            high_water: 0.9,
            capacity_bytes: capacity,
        };
        Admission::new(limits, std::env::temp_dir(), Arc::default())
    }

    #[tokio::test]
    async fn bytes_written_leave_the_reservation_only_where_the_volume_counts_them() {
        let measured = admission_of(None, 10);
        let run = measured.admit(&[("s3://b/a".into(), 300)]).await.unwrap();
        assert_eq!(measured.lock().bytes, 600);
        run.written(300);
        assert_eq!(
            measured.lock().bytes,
            300,
            "staged inputs count in the volume's usage"
        );
        run.written(1000);
        assert_eq!(measured.lock().bytes, 0);
        drop(run);
        {
            let booked = measured.lock();
            assert_eq!((booked.runs, booked.bytes), (0, 0));
        }

        let budgeted = admission_of(Some(10_000), 10);
        let run = budgeted.admit(&[("s3://b/a".into(), 300)]).await.unwrap();
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
        let a = admission(1000, 10);
        let first = a.admit(&[("s3://b/a".into(), 200)]).await.unwrap();
        let _second = a.admit(&[("s3://b/b".into(), 200)]).await.unwrap();
        let err = a
            .admit(&[("s3://b/c".into(), 100)])
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs") && err.contains("90%"), "{err}");
        drop(first);
        assert!(a.admit(&[("s3://b/c".into(), 100)]).await.is_ok());
    }

    #[tokio::test]
    async fn limits_runs_and_input_size() {
        let a = admission(1 << 40, 1);
        let err = a
            .admit(&[("s3://b/huge".into(), 5000)])
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("s3://b/huge"), "{err}");
        let _one = a.admit(&[]).await.unwrap();
        let err = a.admit(&[]).await.unwrap_err().to_string();
        assert!(err.contains("runs are in flight"), "{err}");
    }
}
