//! The writing side of a run's events: typed helpers over its
//! [`Journal`], with progress throttled per file.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use super::{GatewayError, journal::Journal};
use crate::{
    proto::{self, run_event::Event},
    storage::{RetryNotice, Storage},
};

/// Least time between two progress events of one file.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// The sender of one run's events.
#[derive(Debug, Clone)]
pub struct Events {
    journal: Arc<Journal>,
}

impl Events {
    /// Writes to `journal`.
    pub fn new(journal: Arc<Journal>) -> Self {
        Self { journal }
    }

    /// The journal written to.
    pub fn journal(&self) -> Arc<Journal> {
        Arc::clone(&self.journal)
    }

    /// Records an event; fails if the run was cancelled, so that the
    /// caller stops promptly.
    pub async fn send(&self, call_index: u32, event: Event) -> Result<(), GatewayError> {
        if self.journal.cancellation().is_cancelled() {
            return Err(GatewayError::Cancelled);
        }
        self.journal.push(call_index, event);
        Ok(())
    }

    /// A progress callback for one file transfer, throttled to ten events
    /// a second, and the store to transfer through, which reports its
    /// retries as progress events with a `retrying` note. `staging` picks
    /// the event kind.
    pub fn transfer_progress(
        &self,
        storage: &Storage,
        call_index: u32,
        parameter: &str,
        url: &str,
        total: u64,
        staging: bool,
    ) -> (impl FnMut(u64) + Send + 'static, Storage) {
        let done = Arc::new(AtomicU64::new(0));
        let event = {
            let (parameter, url) = (parameter.to_owned(), url.to_owned());
            move |bytes_done, retrying: Option<&RetryNotice>| {
                let p = proto::TransferProgress {
                    parameter: parameter.clone(),
                    url: url.clone(),
                    bytes_done,
                    bytes_total: total,
                    retrying: retrying.map(|r| r.error.clone()).unwrap_or_default(),
                    retry_seconds_left: retrying.map_or(0, |r| r.gives_up_in.as_secs() as u32),
                };
                match staging {
                    true => Event::Staging(p),
                    false => Event::Uploading(p),
                }
            }
        };
        let observed = {
            let (journal, done, event) = (Arc::clone(&self.journal), Arc::clone(&done), event.clone());
            storage.observed(move |notice| {
                journal.push(call_index, event(done.load(Ordering::Relaxed), Some(notice)));
            })
        };
        let journal = Arc::clone(&self.journal);
        let mut last: Option<Instant> = None;
        let progress = move |bytes_done| {
            done.store(bytes_done, Ordering::Relaxed);
            if last.is_some_and(|t| t.elapsed() < PROGRESS_EVERY) && bytes_done < total {
                return;
            }
            last = Some(Instant::now());
            journal.push(call_index, event(bytes_done, None));
        };
        (progress, observed)
    }
}
