//! The Run stream's sending side: typed helpers for each event, throttled
//! progress, heartbeats, and detection of a caller that went away.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tonic::Status;

use super::GatewayError;
use crate::proto::{self, run_event::Event};

/// Events queued for a slow client before the run waits for it.
pub const EVENT_QUEUE: usize = 64;
/// Least time between two progress events of one file.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);
/// Heartbeat period of a quiet run.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(15);

/// The sender of one run's events.
#[derive(Debug, Clone)]
pub struct Events {
    tx: mpsc::Sender<Result<proto::RunEvent, Status>>,
}

impl Events {
    /// Wraps the stream's sender.
    pub fn new(tx: mpsc::Sender<Result<proto::RunEvent, Status>>) -> Self {
        Self { tx }
    }

    /// Sends an event, waiting for room; fails if the caller went away.
    pub async fn send(&self, call_index: u32, event: Event) -> Result<(), GatewayError> {
        let msg = proto::RunEvent {
            call_index,
            event: Some(event),
        };
        self.tx.send(Ok(msg)).await.map_err(|_| GatewayError::Cancelled)
    }

    /// Sends an event if there is room; for progress and heartbeats, which
    /// a lagging client may miss.
    pub fn offer(&self, call_index: u32, event: Event) {
        let msg = proto::RunEvent {
            call_index,
            event: Some(event),
        };
        let _ = self.tx.try_send(Ok(msg));
    }

    /// Ends the stream with an error.
    pub async fn fail(&self, status: Status) {
        let _ = self.tx.send(Err(status)).await;
    }

    /// Resolves when the caller has gone away.
    pub async fn closed(&self) {
        self.tx.closed().await;
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
        let events = self.clone();
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
            events.offer(
                call_index,
                if staging {
                    Event::Staging(p)
                } else {
                    Event::Uploading(p)
                },
            );
        }
    }

    /// Sends heartbeats until the returned guard is dropped.
    pub fn heartbeat(&self) -> AbortOnDrop {
        let events = self.clone();
        AbortOnDrop(tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                events.offer(0, Event::Heartbeat(proto::Heartbeat {}));
            }
        }))
    }
}

/// Aborts a background task when dropped.
#[derive(Debug)]
pub struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
