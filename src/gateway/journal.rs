//! The journal of a run: its events in order, buffered so that the `Run`
//! stream and any later `Watch` can read them at their own pace, and the
//! token that cancels the run. The run never waits for a slow reader: the
//! buffer is bounded in events and in bytes, and when it is full the
//! oldest progress, log and heartbeat-like events make room first.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use prost::Message as _;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::proto::{self, run_event::Event};

/// Events kept per run.
const CAPACITY: usize = 2048;
/// Bytes of events kept per run (encoded), beyond which the oldest lossy
/// events make room: a chatty prefab's logs cost the gateway this much per
/// run at most, for as long as the run is kept.
const BYTE_BUDGET: usize = 1 << 20;
/// Heartbeat period of a quiet stream.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(15);

/// A run's events and its cancellation.
#[derive(Debug)]
pub struct Journal {
    prefabs: Vec<String>,
    state: Mutex<State>,
    latest: watch::Sender<u64>,
    cancel: CancellationToken,
}

#[derive(Debug, Default)]
struct State {
    events: VecDeque<proto::RunEvent>,
    /// Encoded size of `events`.
    bytes: usize,
    next: u64,
    end: Option<Result<(), Status>>,
}

impl Journal {
    /// An empty journal of a run calling `prefabs`.
    pub fn new(prefabs: Vec<String>) -> Arc<Self> {
        Arc::new(Self {
            prefabs,
            state: Mutex::new(State {
                next: 1,
                ..State::default()
            }),
            latest: watch::Sender::new(0),
            cancel: CancellationToken::new(),
        })
    }

    /// The prefab ids the run calls.
    pub fn prefabs(&self) -> &[String] {
        &self.prefabs
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends an event and wakes the readers.
    pub fn push(&self, call_index: u32, event: Event) {
        let seq = {
            let mut state = self.lock();
            if state.end.is_some() {
                return;
            }
            let sequence = state.next;
            state.next += 1;
            let event = proto::RunEvent {
                call_index,
                sequence,
                event: Some(event),
            };
            let len = event.encoded_len();
            state.make_room(len);
            state.bytes += len;
            state.events.push_back(event);
            sequence
        };
        self.latest.send_replace(seq);
    }

    /// Records how the run ended; later pushes are ignored.
    pub fn finish(&self, end: Result<(), Status>) {
        let seq = {
            let mut state = self.lock();
            state.end.get_or_insert(end);
            state.next
        };
        self.latest.send_replace(seq);
    }

    /// Whether the run is over.
    pub fn ended(&self) -> bool {
        self.lock().end.is_some()
    }

    /// Encoded size of the events kept.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// The token that cancels the run.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancel
    }

    /// A receiver of the latest sequence number, changed by every event
    /// and by the end.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.latest.subscribe()
    }

    /// Events after `after`, and the end if the run is over.
    pub fn read_after(&self, after: u64) -> (Vec<proto::RunEvent>, Option<Result<(), Status>>) {
        let state = self.lock();
        let events = state
            .events
            .iter()
            .filter(|e| e.sequence > after)
            .cloned()
            .collect();
        (events, state.end.clone())
    }

    /// Streams the events after `after` into `tx` until the run ends or the
    /// reader leaves; with `cancel_on_leave`, a reader leaving early
    /// cancels the run.
    pub async fn forward(
        self: Arc<Self>,
        mut after: u64,
        tx: mpsc::Sender<Result<proto::RunEvent, Status>>,
        cancel_on_leave: bool,
    ) {
        let mut latest = self.latest.subscribe();
        let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
        heartbeat.tick().await;
        let left = || {
            if cancel_on_leave {
                self.cancel.cancel();
            }
        };
        loop {
            latest.borrow_and_update();
            let (events, end) = self.read_after(after);
            for event in events {
                after = event.sequence;
                if tx.send(Ok(event)).await.is_err() {
                    return left();
                }
            }
            if let Some(end) = end {
                if let Err(status) = end {
                    let _ = tx.send(Err(status)).await;
                }
                return;
            }
            tokio::select! {
                changed = latest.changed() => if changed.is_err() { return },
                () = tx.closed() => return left(),
                _ = heartbeat.tick() => if !beat(&tx) {
                    return left();
                }
            }
        }
    }
}

/// Sends a heartbeat to a quiet stream's reader unless its queue is full;
/// false if the reader left.
pub fn beat(tx: &mpsc::Sender<Result<proto::RunEvent, Status>>) -> bool {
    let beat = proto::RunEvent {
        call_index: 0,
        sequence: 0,
        event: Some(Event::Heartbeat(proto::Heartbeat {})),
    };
    tx.try_send(Ok(beat)).is_ok() || !tx.is_closed()
}

impl State {
    /// Drops the oldest lossy events (the oldest of all if the journal is
    /// full of milestones) until an event of `len` bytes fits.
    fn make_room(&mut self, len: usize) {
        while self.events.len() >= CAPACITY || self.bytes + len > BYTE_BUDGET {
            let lossy = self.events.iter().position(|e| is_lossy(e.event.as_ref()));
            let victim = match lossy {
                Some(i) => i,
                // Over the byte budget with milestones only: they are few
                // and small (results are capped), so keep them.
                None if self.events.len() < CAPACITY => return,
                None => 0,
            };
            if let Some(dropped) = self.events.remove(victim) {
                self.bytes -= dropped.encoded_len();
            }
        }
    }
}

/// Events a reader may miss without losing track of the run.
fn is_lossy(event: Option<&Event>) -> bool {
    matches!(
        event,
        Some(Event::Staging(_) | Event::Uploading(_) | Event::RuntimeProgress(_) | Event::RuntimeLog(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(n: u64) -> Event {
        Event::Staging(proto::TransferProgress {
            bytes_done: n,
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn readers_resume_after_a_sequence_and_see_the_end() {
        let j = Journal::new(Vec::new());
        j.push(0, Event::Accepted(proto::RunAccepted::default()));
        j.push(0, progress(1));
        j.push(0, progress(2));
        j.finish(Err(Status::not_found("gone")));
        let (tx, mut rx) = mpsc::channel(8);
        Arc::clone(&j).forward(1, tx, false).await;
        let seqs: Vec<u64> = [rx.recv().await, rx.recv().await]
            .into_iter()
            .map(|m| m.unwrap().unwrap().sequence)
            .collect();
        assert_eq!(seqs, [2, 3]);
        assert_eq!(
            rx.recv().await.unwrap().unwrap_err().code(),
            tonic::Code::NotFound
        );
    }

    #[test]
    fn a_full_journal_drops_progress_before_milestones() {
        let j = Journal::new(Vec::new());
        j.push(0, Event::Accepted(proto::RunAccepted::default()));
        for n in 0..CAPACITY as u64 + 10 {
            j.push(0, progress(n));
        }
        let (events, _) = j.read_after(0);
        assert_eq!(events.len(), CAPACITY);
        assert!(matches!(events[0].event, Some(Event::Accepted(_))));
    }

    #[test]
    fn a_chatty_run_keeps_a_bounded_number_of_bytes() {
        let j = Journal::new(Vec::new());
        j.push(0, Event::Accepted(proto::RunAccepted::default()));
        let line = "x".repeat(16 << 10);
        for _ in 0..1000 {
            let log = proto::LogLine {
                line: line.clone(),
                ..Default::default()
            };
            j.push(0, Event::RuntimeLog(log));
        }
        j.push(0, Event::RunCompleted(proto::RunCompleted::default()));
        let (events, _) = j.read_after(0);
        let bytes: usize = events.iter().map(|e| e.encoded_len()).sum();
        assert!(bytes <= BYTE_BUDGET, "{bytes} bytes kept");
        assert!(events.len() > 50, "only {} events kept", events.len());
        assert!(matches!(events[0].event, Some(Event::Accepted(_))));
        assert!(matches!(
            events.last().unwrap().event,
            Some(Event::RunCompleted(_))
        ));
        assert_eq!(events.last().unwrap().sequence, 1002);
    }

    #[tokio::test]
    async fn a_reader_leaving_cancels_only_when_asked() {
        let j = Journal::new(Vec::new());
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        Arc::clone(&j).forward(0, tx, false).await;
        assert!(!j.cancellation().is_cancelled());
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        Arc::clone(&j).forward(0, tx, true).await;
        assert!(j.cancellation().is_cancelled());
    }
}
