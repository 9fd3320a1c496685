//! `Watch` of a run that another replica owns (or that this replica owned
//! before it restarted): its events are read from its journal on the shared
//! volume (see [`super::persist`]), polled, since file-change notification
//! does not work across the hosts of a network volume. The stream ends with
//! the run's own end, or with ABORTED when its owner stopped renewing its
//! lease without finishing it.

use std::{sync::Arc, time::Duration};

use tokio::sync::mpsc;
use tonic::Status;

use super::{
    GatewayError,
    journal::{self, HEARTBEAT_EVERY},
    persist,
};
use crate::{
    proto,
    workspace::{RequestId, record::RecordReader},
};

/// Time between two looks at a quiet journal.
const POLL_EVERY: Duration = Duration::from_millis(200);
/// Polls of a finished run's journal before its end counts as lost.
const MISSING_END_POLLS: u32 = 10;
/// Most journal bytes read at once.
const READ_AT_ONCE: usize = 1 << 20;

/// Streams the events of run `id` after `after` from its record into `tx`,
/// until the run ends or the reader leaves.
pub async fn follow(
    id: RequestId,
    record: RecordReader,
    mut after: u64,
    tx: mpsc::Sender<Result<proto::RunEvent, Status>>,
) {
    let record = Arc::new(record);
    let mut offset = 0u64;
    let mut pending = Vec::new();
    let mut finished_polls = 0;
    let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
    heartbeat.tick().await;
    loop {
        let reader = Arc::clone(&record);
        let read = tokio::task::spawn_blocking(move || reader.read_journal(offset, READ_AT_ONCE)).await;
        let chunk = match read {
            Ok(Ok(chunk)) => chunk,
            Ok(Err(e)) => {
                let status = GatewayError::Unavailable(format!(
                    "cannot read the journal of run {id} on the workspace volume: {e}; retry Watch"
                ))
                .status(Some(id));
                let _ = tx.send(Err(status)).await;
                return;
            }
            Err(_) => return,
        };
        let whole = chunk.len() == READ_AT_ONCE;
        offset += chunk.len() as u64;
        pending.extend_from_slice(&chunk);
        let entries = match persist::decode(&mut pending) {
            Ok(entries) => entries,
            Err(e) => {
                let status = GatewayError::Internal(format!(
                    "the journal of run {id} on the workspace volume is damaged near byte {offset}: {e}"
                ))
                .status(Some(id));
                let _ = tx.send(Err(status)).await;
                return;
            }
        };
        for entry in entries {
            if let Some(event) = entry.event.filter(|e| e.sequence > after) {
                after = event.sequence;
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
            if let Some(end) = entry.end {
                if let Some(status) = end.status() {
                    let _ = tx.send(Err(status)).await;
                }
                return;
            }
        }
        if whole {
            continue;
        }
        if chunk.is_empty() {
            let ended = match quiet(id, &record).await {
                Quiet::Going => None,
                // The end is appended before the lease says finished, so
                // it is missing only if that append failed for good.
                Quiet::Finished(owner) if finished_polls >= MISSING_END_POLLS => {
                    Some(Status::unknown(format!(
                        "run {id} finished on gateway replica {owner}, but its journal on the volume lacks \
                     how it ended; the events above are all there is"
                    )))
                }
                Quiet::Finished(_) => {
                    finished_polls += 1;
                    None
                }
                Quiet::Over(status) => Some(status),
            };
            if let Some(status) = ended {
                let _ = tx.send(Err(status)).await;
                return;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(POLL_EVERY) => {}
            () = tx.closed() => return,
            _ = heartbeat.tick() => if !journal::beat(&tx) {
                return;
            }
        }
    }
}

/// What a quiet journal's lease says of its run.
enum Quiet {
    /// It may still go on.
    Going,
    /// It finished; its end should be in the journal.
    Finished(String),
    /// It can have no more events: end with this.
    Over(Status),
}

/// Looks at the lease of a run whose journal has nothing new.
async fn quiet(id: RequestId, record: &Arc<RecordReader>) -> Quiet {
    let reader = Arc::clone(record);
    let Ok(lease) = tokio::task::spawn_blocking(move || reader.lease()).await else {
        return Quiet::Going;
    };
    let Some(lease) = lease else {
        return Quiet::Over(
            GatewayError::NotFound(format!(
                "the record of run {id} was removed from the workspace volume while it was followed \
                 (its retention ran out)"
            ))
            .status(Some(id)),
        );
    };
    if lease.finished_unix_ms.is_some() {
        return Quiet::Finished(lease.owner);
    }
    if !lease.expired() {
        return Quiet::Going;
    }
    Quiet::Over(
        GatewayError::Abandoned(format!(
            "run {id} was abandoned: gateway replica {} owned it and stopped renewing its lease without \
             finishing it (the replica was stopped or lost the volume); its workspace is removed by the \
             janitor; start the run again",
            lease.owner
        ))
        .status(Some(id)),
    )
}
