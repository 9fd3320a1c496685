//! This replica's runs: the journal of each live run, and of finished ones
//! for a while (late `Watch` calls), the task of each, and the token that
//! stops them when the shutdown grace is over.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::journal::Journal;
use crate::workspace::RequestId;

/// Bytes of events kept for finished runs, in all.
const RETAINED_BYTES: usize = 64 << 20;

/// The runs of this replica.
#[derive(Debug)]
pub struct Runs {
    journals: Mutex<HashMap<RequestId, Arc<Journal>>>,
    /// Finished runs whose journals are kept, oldest first.
    retired: Mutex<Retired>,
    /// How long a finished run's journal is kept.
    pub retention: Duration,
    /// Cancelled when the shutdown grace period is over: runs still going
    /// are cancelled and cleaned up.
    pub stop: CancellationToken,
    /// Every run task, so that shutdown can wait for their cleanup.
    pub tasks: TaskTracker,
}

/// The finished runs whose journals are kept, and their size.
#[derive(Debug, Default)]
struct Retired {
    runs: VecDeque<(RequestId, usize)>,
    bytes: usize,
}

impl Runs {
    /// No runs yet; finished ones are kept for `retention`.
    pub fn new(retention: Duration) -> Self {
        Self {
            journals: Mutex::default(),
            retired: Mutex::default(),
            retention,
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        }
    }

    fn journals(&self) -> MutexGuard<'_, HashMap<RequestId, Arc<Journal>>> {
        self.journals.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers the journal of a new run.
    pub fn insert(&self, id: RequestId, journal: Arc<Journal>) {
        self.journals().insert(id, journal);
    }

    /// The journal of run `id`, live or kept.
    pub fn journal(&self, id: RequestId) -> Option<Arc<Journal>> {
        self.journals().get(&id).cloned()
    }

    /// Keeps the journal of finished run `id` for late `Watch` calls: for
    /// the retention period, and while the journals kept stay within
    /// [`RETAINED_BYTES`] (the oldest go first).
    pub fn retire(self: &Arc<Self>, id: RequestId, bytes: usize) {
        {
            let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
            retired.runs.push_back((id, bytes));
            retired.bytes += bytes;
            let mut journals = self.journals();
            while let Some(&(oldest, size)) = retired.runs.front() {
                let expired = !journals.contains_key(&oldest);
                if !expired && retired.bytes <= RETAINED_BYTES {
                    break;
                }
                retired.runs.pop_front();
                retired.bytes -= size;
                journals.remove(&oldest);
            }
        }
        let runs = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(runs.retention).await;
            runs.journals().remove(&id);
        });
    }
}
