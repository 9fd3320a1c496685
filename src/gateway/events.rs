//! The writing side of a run's events: typed helpers over its
//! [`Journal`], with progress throttled per file.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use super::{GatewayError, journal::Journal};
use crate::proto::{self, run_event::Event};

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
    /// a second. `staging` picks the event kind.
    pub fn transfer_progress(
        &self,
        call_index: u32,
        parameter: &str,
        url: &str,
        total: u64,
        staging: bool,
    ) -> impl FnMut(u64) + Send + 'static {
        let journal = Arc::clone(&self.journal);
        let (parameter, url) = (parameter.to_owned(), url.to_owned());
        let mut last: Option<Instant> = None;
        move |done| {
            if last.is_some_and(|t| t.elapsed() < PROGRESS_EVERY) && done < total {
                return;
            }
            last = Some(Instant::now());
            let p = proto::TransferProgress {
                parameter: parameter.clone(),
                url: url.clone(),
                bytes_done: done,
                bytes_total: total,
            };
            journal.push(
                call_index,
                if staging {
                    Event::Staging(p)
                } else {
                    Event::Uploading(p)
                },
            );
        }
    }
}
