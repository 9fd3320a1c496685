//! A run's journal on the shared volume, so that whichever replica a client
//! reaches can follow the run (see [`super::follow`]). One task per run
//! owns its record: it appends the journal's new events in batches, at most
//! every [`FLUSH_EVERY`], with the progress events a later one in the same
//! batch supersedes left out (a 1 GiB transfer writes tens of records, not
//! thousands), renews the lease, and at the end writes the run's status
//! and its finished lease. The run itself never waits for the volume: the
//! events are read from the in-memory journal, and a slow or full volume
//! only delays what other replicas see.
//!
//! Entries are length-delimited protobuf messages, appended one batch per
//! write; a reader stops at an entry not yet whole.

use std::{collections::HashSet, sync::Arc, time::Duration};

use prost::Message as _;
use tonic::Status;

use super::journal::Journal;
use crate::{
    proto::{self, run_event::Event},
    workspace::{lease, record::Record},
};

/// Least time between two appends to a run's journal.
pub const FLUSH_EVERY: Duration = Duration::from_millis(250);
/// Journal bytes beyond which only milestones are written.
const BUDGET: u64 = 8 << 20;
/// Attempts at the final write, a second apart, before giving up.
const FINAL_ATTEMPTS: u32 = 10;

/// One journal entry: an event or the run's end.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Entry {
    /// An event as the owner sent it.
    #[prost(message, optional, tag = "1")]
    pub event: Option<proto::RunEvent>,
    /// How the run ended.
    #[prost(message, optional, tag = "2")]
    pub end: Option<End>,
}

/// How a run ended: a gRPC status (code 0 for success).
#[derive(Clone, PartialEq, prost::Message)]
pub struct End {
    /// The status code.
    #[prost(int32, tag = "1")]
    pub code: i32,
    /// The status message.
    #[prost(string, tag = "2")]
    pub message: String,
    /// The status details (`google.rpc.Status` bytes), if any.
    #[prost(bytes = "vec", tag = "3")]
    pub details: Vec<u8>,
}

impl End {
    fn of(end: &Result<(), Status>) -> Self {
        match end {
            Ok(()) => Self::default(),
            Err(status) => Self {
                code: status.code() as i32,
                message: status.message().to_owned(),
                details: status.details().to_vec(),
            },
        }
    }

    /// The status a `Watch` ends with; `None` for success.
    pub fn status(&self) -> Option<Status> {
        let code = tonic::Code::from_i32(self.code);
        (code != tonic::Code::Ok)
            .then(|| Status::with_details(code, self.message.clone(), self.details.clone().into()))
    }
}

/// Takes the complete entries off the front of `buf`; what is left is an
/// entry not yet whole. Fails on bytes that are no entry.
pub fn decode(buf: &mut Vec<u8>) -> Result<Vec<Entry>, String> {
    let mut entries = Vec::new();
    let mut rest: &[u8] = buf;
    loop {
        let mut peek = rest;
        let Ok(len) = prost::decode_length_delimiter(&mut peek) else {
            // Not even a whole length yet (or junk, caught once longer).
            if rest.len() >= 10 {
                return Err("an entry's length is not a number".into());
            }
            break;
        };
        if peek.len() < len {
            break;
        }
        entries.push(Entry::decode(&peek[..len]).map_err(|e| e.to_string())?);
        rest = &peek[len..];
    }
    let used = buf.len() - rest.len();
    buf.drain(..used);
    Ok(entries)
}

/// Writes `journal` to `record` until the run ends, renewing the lease
/// every third of `ttl`.
pub async fn run(journal: Arc<Journal>, record: Arc<Record>, ttl: Duration) {
    let mut latest = journal.subscribe();
    // Whatever the run wrote before this task started counts as news.
    latest.mark_changed();
    let mut renew = tokio::time::interval(ttl / 3);
    renew.tick().await;
    let mut writer = Writer::new(record);
    loop {
        tokio::select! {
            changed = latest.changed() => if changed.is_err() { return },
            _ = renew.tick() => {
                writer.renew(ttl).await;
                continue;
            }
        }
        // Let a batch gather, but not past the run's end: that is what
        // other replicas (and admission, which counts the live leases)
        // wait for.
        let batch_end = tokio::time::Instant::now() + FLUSH_EVERY;
        while !journal.ended() {
            tokio::select! {
                () = tokio::time::sleep_until(batch_end) => break,
                changed = latest.changed() => if changed.is_err() { break },
            }
        }
        latest.borrow_and_update();
        let (events, end) = journal.read_after(writer.written_seq);
        if let Some(end) = end {
            writer.finish(events, &end, ttl).await;
            return;
        }
        writer.append(events).await;
        writer.store_lease_if_changed().await;
    }
}

/// The appending side of one record.
struct Writer {
    record: Arc<Record>,
    /// Last sequence number appended.
    written_seq: u64,
    /// Journal bytes appended.
    bytes: u64,
    /// The lease as last stored.
    stored: lease::Lease,
    /// Whether a failed write was logged already.
    warned: bool,
}

impl Writer {
    fn new(record: Arc<Record>) -> Self {
        let stored = record.current_lease();
        Self {
            record,
            written_seq: 0,
            bytes: 0,
            stored,
            warned: false,
        }
    }

    /// Encodes `events`, coalesced (and, over the budget, milestones
    /// only), and the end if given.
    fn encode(&self, events: Vec<proto::RunEvent>, end: Option<End>) -> Vec<u8> {
        let over_budget = self.bytes > BUDGET;
        let mut buf = Vec::new();
        let entries = coalesce(events)
            .into_iter()
            .filter(|event| !(over_budget && is_lossy(event)))
            .map(|event| Entry {
                event: Some(event),
                end: None,
            })
            .chain(end.map(|end| Entry {
                event: None,
                end: Some(end),
            }));
        for entry in entries {
            entry
                .encode_length_delimited(&mut buf)
                .expect("a Vec grows as needed");
        }
        buf
    }

    /// Appends `events`, coalesced, in one write.
    async fn append(&mut self, events: Vec<proto::RunEvent>) {
        let Some(last) = events.last().map(|e| e.sequence) else {
            return;
        };
        let buf = self.encode(events, None);
        if self.write(buf, false).await {
            self.written_seq = last;
        }
    }

    /// Appends the last `events` and the end, and ends the lease, in one
    /// blocking call (a short run's whole journal is this one write);
    /// retried a while: a reader that never sees them reports the run
    /// aborted.
    async fn finish(&mut self, events: Vec<proto::RunEvent>, end: &Result<(), Status>, ttl: Duration) {
        let buf = self.encode(events, Some(End::of(end)));
        for attempt in 1..=FINAL_ATTEMPTS {
            if self.write(buf.clone(), true).await {
                return;
            }
            if attempt == FINAL_ATTEMPTS {
                tracing::error!(run = %self.record.id(), "could not write the run's end to its journal");
                return;
            }
            // Keep the lease alive meanwhile, so readers wait.
            self.renew(ttl).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Extends the lease by `ttl` from now and stores it.
    async fn renew(&mut self, ttl: Duration) {
        self.record.update_lease(|l| *l = l.renewed(ttl));
        self.store_lease().await;
    }

    async fn store_lease_if_changed(&mut self) {
        if self.record.current_lease() != self.stored {
            self.store_lease().await;
        }
    }

    async fn store_lease(&mut self) -> bool {
        let record = Arc::clone(&self.record);
        let stored = tokio::task::spawn_blocking(move || {
            let lease = record.current_lease();
            record.write_lease().map(|()| lease)
        })
        .await;
        match stored {
            Ok(Ok(lease)) => {
                self.stored = lease;
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(run = %self.record.id(), error = %e, "could not store the run's lease");
                false
            }
            Err(_) => false,
        }
    }

    /// Appends `buf` (and, with `last`, ends the lease); whether it went.
    async fn write(&mut self, buf: Vec<u8>, last: bool) -> bool {
        let len = buf.len() as u64;
        let record = Arc::clone(&self.record);
        let written = tokio::task::spawn_blocking(move || {
            if !buf.is_empty() {
                record.append(&buf)?;
            }
            if last { record.finish() } else { Ok(()) }
        })
        .await;
        match written {
            Ok(Ok(())) => {
                self.bytes += len;
                true
            }
            Ok(Err(e)) => {
                if !std::mem::replace(&mut self.warned, true) {
                    tracing::warn!(
                        run = %self.record.id(),
                        error = %e,
                        "could not write the run's journal; other replicas' Watch lags until it can"
                    );
                }
                false
            }
            Err(_) => false,
        }
    }
}

/// Events a reader may miss without losing track of the run.
fn is_lossy(event: &proto::RunEvent) -> bool {
    matches!(
        event.event,
        Some(Event::Staging(_) | Event::Uploading(_) | Event::RuntimeProgress(_) | Event::RuntimeLog(_))
    )
}

/// Leaves out each progress event that a later one of the same transfer
/// (or the same call's runtime) supersedes.
fn coalesce(events: Vec<proto::RunEvent>) -> Vec<proto::RunEvent> {
    let mut seen = HashSet::new();
    let mut kept: Vec<proto::RunEvent> = events
        .into_iter()
        .rev()
        .filter(|e| {
            let key = match &e.event {
                Some(Event::Staging(p)) => (0, e.call_index, p.parameter.clone(), p.url.clone()),
                Some(Event::Uploading(p)) => (1, e.call_index, p.parameter.clone(), p.url.clone()),
                Some(Event::RuntimeProgress(_)) => (2, e.call_index, String::new(), String::new()),
                _ => return true,
            };
            seen.insert(key)
        })
        .collect();
    kept.reverse();
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(sequence: u64, event: Event) -> proto::RunEvent {
        proto::RunEvent {
            call_index: 0,
            sequence,
            event: Some(event),
        }
    }

    fn staging(parameter: &str, done: u64) -> Event {
        Event::Staging(proto::TransferProgress {
            parameter: parameter.into(),
            bytes_done: done,
            ..Default::default()
        })
    }

    #[test]
    fn progress_is_coalesced_per_transfer_and_milestones_kept() {
        let events = vec![
            event(1, Event::Accepted(proto::RunAccepted::default())),
            event(2, staging("a", 1)),
            event(3, staging("b", 1)),
            event(4, staging("a", 2)),
            event(5, Event::RuntimeLog(proto::LogLine::default())),
            event(6, staging("a", 3)),
        ];
        let kept: Vec<u64> = coalesce(events).iter().map(|e| e.sequence).collect();
        assert_eq!(kept, [1, 3, 5, 6]);
    }

    #[test]
    fn entries_are_decoded_only_once_whole() {
        let mut bytes = Vec::new();
        for seq in 1..=3 {
            let entry = Entry {
                event: Some(event(seq, staging("a", seq))),
                end: None,
            };
            entry.encode_length_delimited(&mut bytes).unwrap();
        }
        let end = Entry {
            event: None,
            end: Some(End::of(&Err(Status::aborted("gone")))),
        };
        end.encode_length_delimited(&mut bytes).unwrap();
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for piece in bytes.chunks(7) {
            buf.extend_from_slice(piece);
            got.extend(decode(&mut buf).unwrap());
        }
        assert!(buf.is_empty());
        assert_eq!(got.len(), 4);
        assert_eq!(got[2].event.as_ref().unwrap().sequence, 3);
        let status = got[3].end.as_ref().unwrap().status().unwrap();
        assert_eq!((status.code(), status.message()), (tonic::Code::Aborted, "gone"));
        assert!(End::of(&Ok(())).status().is_none());
        assert!(decode(&mut vec![0xff; 16]).is_err());
    }
}
