//! Staging: look at every input of a call (a GET of its first bytes, which
//! brings a small object whole), then copy each object into the
//! workspace as `<name>.part`, renamed to its final name only once complete
//! and verified. Several inputs move at once.
//!
//! An input the function reads front to back (declared `streaming`) is
//! staged while the function runs: its watermark file says how much of it
//! is on the volume (see [`crate::workspace::watermark`]), moved at most
//! every [`PUBLISH_EVERY`], and ends `complete` once the file is verified
//! and renamed, or `failed` with the error the call then fails with.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore, watch},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::{
    GatewayError,
    events::Events,
    plan::{CallPlan, FileInput},
};
use crate::{
    proto::{self, run_event::Event},
    storage::{self, Probed, Storage},
    workspace::{
        PartFile, PartTarget,
        watermark::{Watermark, shares_page_cache},
    },
};

/// Inputs of one call staged at once.
const INPUTS_IN_FLIGHT: usize = 4;

/// Bytes of small objects a run keeps from looking at its inputs until it
/// stages them; the inputs beyond are fetched again.
const KEPT_PER_RUN: u64 = 2 << 20;

/// The same for all of a gateway's runs together, in KiB: what
/// [`Kept::default`] holds.
const KEPT_PER_GATEWAY_KIB: usize = 16 << 10;

/// A gateway's budget for the bodies its runs keep from looking at their
/// inputs, in KiB.
#[derive(Debug, Clone)]
pub struct Kept(Arc<Semaphore>);

impl Default for Kept {
    fn default() -> Self {
        Self(Arc::new(Semaphore::new(KEPT_PER_GATEWAY_KIB)))
    }
}

/// An input as looked at: a kept body holds its share of the gateway's
/// [`Kept`] budget until it is staged.
#[derive(Debug)]
pub struct Looked {
    pub probed: Probed,
    _kept: Option<OwnedSemaphorePermit>,
}

impl Looked {
    /// Keeps `probed`'s body if the run's (`kept`) and the gateway's
    /// (`budget`) budgets allow, and drops it otherwise.
    fn new(mut probed: Probed, kept: &mut u64, budget: &Kept) -> Self {
        let size = probed.body.as_ref().map_or(0, |b| b.len() as u64);
        let share = u32::try_from(size.div_ceil(1024)).unwrap_or(u32::MAX);
        let fits = size > 0 && *kept + size <= KEPT_PER_RUN;
        let permit = fits
            .then(|| Arc::clone(&budget.0).try_acquire_many_owned(share).ok())
            .flatten();
        if permit.is_some() {
            *kept += size;
        } else {
            probed.body = None;
        }
        Self {
            probed,
            _kept: permit,
        }
    }
}

/// What was found of each call's inputs, in plan order.
pub type Probes = Vec<Vec<Looked>>;

/// Looks at every input of every call (a call's inputs, at most 64, at
/// once): a missing object fails the run before any byte moves, and the
/// sizes feed admission. Small objects come whole and are kept, within
/// [`KEPT_PER_RUN`] and the gateway's `budget`.
pub async fn probe_all(s3: &Storage, plans: &[CallPlan], budget: &Kept) -> Result<Probes, GatewayError> {
    let mut probes = Vec::with_capacity(plans.len());
    let mut kept = 0;
    for plan in plans {
        let mut tasks = JoinSet::new();
        for (i, input) in plan.inputs.iter().enumerate() {
            let (s3, url) = (s3.clone(), input.url.clone());
            tasks.spawn(async move { (i, storage::probe(&s3, &url).await) });
        }
        let mut call: Vec<Option<Looked>> = plan.inputs.iter().map(|_| None).collect();
        while let Some(done) = tasks.join_next().await {
            let (i, probed) = done.map_err(|e| GatewayError::Internal(format!("probe task failed: {e}")))?;
            call[i] = Some(Looked::new(probed?, &mut kept, budget));
        }
        probes.push(
            call.into_iter()
                .map(|looked| looked.expect("every input was looked at"))
                .collect(),
        );
    }
    Ok(probes)
}

/// An input of a call about to be staged: what it is, what was found of
/// it, and its prepared file.
pub type Staging = (FileInput, Looked, PartFile);

/// Splits a call's inputs into those staged before the function is called
/// and those it reads while they are staged ([`FileInput::streaming`]).
pub fn split(
    inputs: &[FileInput],
    probes: Vec<Looked>,
    files: Vec<PartFile>,
) -> (Vec<Staging>, Vec<Staging>) {
    let all = inputs.iter().cloned().zip(probes).zip(files);
    all.map(|((input, looked), file)| (input, looked, file))
        .partition(|(input, ..)| !input.streaming)
}

/// Publishes each streamed input's first watermark (nothing staged yet), so
/// that the function, called next, finds it.
pub async fn announce(streamed: Vec<Staging>) -> Result<Vec<Staging>, GatewayError> {
    tokio::task::spawn_blocking(move || {
        for (input, looked, file) in &streamed {
            let size = looked.probed.info.size;
            file.target
                .publish(&Watermark::Staging { written: 0, size })
                .map_err(|e| GatewayError::Internal(format!("cannot announce input {}: {e}", input.param)))?;
        }
        Ok(streamed)
    })
    .await
    .map_err(|e| GatewayError::Internal(e.to_string()))?
}

/// Set by the staging of a call's streamed inputs just before it tells the
/// function that staging failed: the function's failure that follows is
/// then not the call's error, staging's is.
#[derive(Debug, Clone, Default)]
pub struct Failing(Arc<AtomicBool>);

impl Failing {
    /// Whether staging has failed, or is about to say so.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Says staging failed, before the function can learn it.
    pub fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Stages `inputs` of call `index` into their prepared files, at most
/// [`INPUTS_IN_FLIGHT`] at once; with `streamed`, publishing each one's
/// watermark as it goes, and setting it before a failure is published.
/// Returns what was staged.
pub async fn stage_inputs(
    s3: &Storage,
    index: u32,
    inputs: Vec<Staging>,
    events: &Events,
    streamed: Option<&Failing>,
) -> Result<Vec<proto::InputStaged>, GatewayError> {
    let limit = Arc::new(tokio::sync::Semaphore::new(INPUTS_IN_FLIGHT));
    let mut tasks = JoinSet::new();
    let count = inputs.len();
    for (input, looked, file) in inputs {
        let (s3, events, limit, streamed) =
            (s3.clone(), events.clone(), Arc::clone(&limit), streamed.cloned());
        let span = tracing::info_span!("stage", parameter = %input.param, url = %input.url, streamed = streamed.is_some());
        tasks.spawn(
            async move {
                let _permit = limit.acquire_owned().await.expect("semaphore is never closed");
                stage_one(&s3, &input, &looked.probed, file, index, &events, streamed).await
            }
            .instrument(span),
        );
    }
    let mut staged = Vec::with_capacity(count);
    while let Some(done) = tasks.join_next().await {
        staged.push(done.map_err(|e| GatewayError::Internal(format!("staging task failed: {e}")))??);
    }
    Ok(staged)
}

async fn stage_one(
    s3: &Storage,
    input: &FileInput,
    probed: &Probed,
    file: PartFile,
    index: u32,
    events: &Events,
    streamed: Option<Failing>,
) -> Result<proto::InputStaged, GatewayError> {
    let url = input.url.to_string();
    let size = probed.info.size;
    let (mut progress, s3) = events.transfer_progress(s3, index, &input.param, &url, size, true);
    progress(0);
    tracing::debug!(%url, size, "staging input");
    let PartFile { file, target } = file;
    let target = Arc::new(target);
    let complete: storage::Complete = {
        let target = Arc::clone(&target);
        Box::new(move || target.complete())
    };
    let done = match streamed {
        None => {
            storage::download_probed(&s3, &input.url, probed, file, &mut progress, Some(complete)).await?
        }
        Some(failing) => {
            // Asking the volume what it is may be a round trip (NFS).
            let (file, data, sync) = tokio::task::spawn_blocking(move || {
                let data = file.try_clone()?;
                let sync = !shares_page_cache(&data);
                Ok::<_, std::io::Error>((file, data, sync))
            })
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r)
            .map_err(|e| GatewayError::Internal(format!("cannot stage input {}: {e}", input.param)))?;
            let watermark = Watermarks {
                failing,
                sync,
                data: Arc::new(data),
                target,
                size,
            };
            let (prefix, moved) = watch::channel(0);
            let mut marked = Marked {
                progress: &mut progress,
                prefix,
            };
            let ended = CancellationToken::new();
            let (downloaded, followed) = tokio::join!(
                async {
                    let downloaded =
                        storage::download_probed(&s3, &input.url, probed, file, &mut marked, Some(complete))
                            .await;
                    ended.cancel();
                    downloaded.map_err(GatewayError::from)
                },
                watermark.follow(moved, &ended),
            );
            let followed = followed.map_err(|e| {
                GatewayError::Internal(format!(
                    "cannot publish how far input {} is staged: {e}",
                    input.param
                ))
            });
            watermark.finish(downloaded, followed).await?
        }
    };
    let staged = proto::InputStaged {
        parameter: input.param.clone(),
        url,
        path: input.rel.clone(),
        size: done.size,
        crc64nvme: done.checksum(),
    };
    events.send(index, Event::Staged(staged.clone())).await?;
    Ok(staged)
}

/// How often at most a streamed input's watermark moves: a publication
/// costs a file created and renamed (0.1 ms here, round trips on NFS, and
/// a write-back there), and a reader waits at most this long for bytes
/// that are in.
const PUBLISH_EVERY: Duration = Duration::from_millis(10);

/// A streamed input's watermark, moved as its prefix lands on the volume.
struct Watermarks {
    failing: Failing,
    target: Arc<PartTarget>,
    /// The file being staged, to write back before the watermark moves
    /// where the volume's hosts do not share a page cache.
    data: Arc<std::fs::File>,
    sync: bool,
    size: u64,
}

impl Watermarks {
    /// Publishes the prefix written as it grows, until the download has
    /// `ended` (never leaving a publication behind, which could land after
    /// the last).
    async fn follow(
        &self,
        mut prefix: watch::Receiver<u64>,
        ended: &CancellationToken,
    ) -> std::io::Result<()> {
        loop {
            tokio::select! {
                changed = prefix.changed() => if changed.is_err() {
                    return Ok(());
                },
                () = ended.cancelled() => return Ok(()),
            }
            let written = *prefix.borrow_and_update();
            let (target, data, sync, size) = (
                Arc::clone(&self.target),
                Arc::clone(&self.data),
                self.sync,
                self.size,
            );
            tokio::task::spawn_blocking(move || {
                if sync {
                    data.sync_data()?;
                }
                target.publish(&Watermark::Staging { written, size })
            })
            .await
            .map_err(std::io::Error::other)??;
            tokio::select! {
                () = tokio::time::sleep(PUBLISH_EVERY) => {}
                () = ended.cancelled() => return Ok(()),
            }
        }
    }

    /// Publishes how staging ended: complete, or failed with the error the
    /// call fails with.
    async fn finish<T>(
        &self,
        downloaded: Result<T, GatewayError>,
        followed: Result<(), GatewayError>,
    ) -> Result<T, GatewayError> {
        let outcome = downloaded.and_then(|done| followed.map(|()| done));
        let mark = match &outcome {
            Ok(_) => Watermark::Complete { size: self.size },
            Err(e) => {
                self.failing.set();
                Watermark::Failed {
                    reason: e.to_string(),
                }
            }
        };
        let target = Arc::clone(&self.target);
        let published = tokio::task::spawn_blocking(move || target.publish(&mark))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r);
        let done = outcome?;
        published
            .map_err(|e| GatewayError::Internal(format!("cannot publish a staged input as complete: {e}")))?;
        Ok(done)
    }
}

/// The progress of a streamed input: events as for any input, and its
/// prefix for [`Watermarks::follow`].
struct Marked<'a, P> {
    progress: &'a mut P,
    prefix: watch::Sender<u64>,
}

impl<P: FnMut(u64) + Send> storage::Progress for Marked<'_, P> {
    fn received(&mut self, bytes: u64) {
        (self.progress)(bytes);
    }

    fn written(&mut self, prefix: u64) {
        self.prefix.send_replace(prefix);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::ObjectInfo;

    fn small(len: usize) -> Probed {
        let info = ObjectInfo {
            size: len as u64,
            etag: None,
            etag_is_md5: false,
            checksum: None,
        };
        Probed {
            info,
            body: Some(bytes::Bytes::from(vec![7; len])),
        }
    }

    #[tokio::test]
    async fn kept_bodies_stay_within_the_run_and_the_gateway_budgets() {
        // A run keeps 2 MiB: 32 bodies of 64 KiB, not the 33rd.
        let budget = Kept::default();
        let mut kept = 0;
        let looked: Vec<Looked> = (0..40)
            .map(|_| Looked::new(small(64 << 10), &mut kept, &budget))
            .collect();
        let bodies = looked.iter().filter(|l| l.probed.body.is_some()).count();
        assert_eq!(bodies, 32);
        assert_eq!(kept, KEPT_PER_RUN);
        // The sizes stay for admission whether the bytes are kept or not.
        assert!(looked.iter().all(|l| l.probed.info.size == 64 << 10));
        drop(looked);

        // With the gateway's budget taken, nothing is kept.
        let hog = budget
            .0
            .acquire_many(budget.0.available_permits() as u32)
            .await
            .unwrap();
        let mut kept = 0;
        assert!(Looked::new(small(1), &mut kept, &budget).probed.body.is_none());
        assert_eq!(kept, 0);
        // Another gateway in the process has a budget of its own.
        assert!(
            Looked::new(small(1), &mut kept, &Kept::default())
                .probed
                .body
                .is_some()
        );
        drop(hog);
        assert!(Looked::new(small(1), &mut kept, &budget).probed.body.is_some());
    }
}
