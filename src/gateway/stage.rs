//! Staging: look at every input of a call (a GET of its first bytes, which
//! brings a small object whole), then copy each object into the
//! workspace as `<name>.part`, renamed to its final name only once complete
//! and verified. Several inputs move at once.

use std::sync::Arc;

use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
};
use tracing::Instrument as _;

use super::{
    GatewayError,
    events::Events,
    plan::{CallPlan, FileInput},
};
use crate::{
    proto::{self, run_event::Event},
    storage::{self, Probed, Storage},
    workspace::PartFile,
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

/// Stages every input of call `index` into its prepared file; returns
/// what was staged.
pub async fn stage_inputs(
    s3: &Storage,
    index: u32,
    inputs: &[FileInput],
    probes: Vec<Looked>,
    files: Vec<PartFile>,
    events: &Events,
) -> Result<Vec<proto::InputStaged>, GatewayError> {
    let limit = Arc::new(tokio::sync::Semaphore::new(INPUTS_IN_FLIGHT));
    let mut tasks = JoinSet::new();
    for ((input, looked), file) in inputs.iter().cloned().zip(probes).zip(files) {
        let (s3, events, limit) = (s3.clone(), events.clone(), Arc::clone(&limit));
        let span = tracing::info_span!("stage", parameter = %input.param, url = %input.url);
        tasks.spawn(
            async move {
                let _permit = limit.acquire_owned().await.expect("semaphore is never closed");
                stage_one(&s3, &input, &looked.probed, file, index, &events).await
            }
            .instrument(span),
        );
    }
    let mut staged = Vec::with_capacity(inputs.len());
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
) -> Result<proto::InputStaged, GatewayError> {
    let url = input.url.to_string();
    let size = probed.info.size;
    let (mut progress, s3) = events.transfer_progress(s3, index, &input.param, &url, size, true);
    progress(0);
    tracing::debug!(%url, size, "staging input");
    let PartFile { file, target } = file;
    let complete = Box::new(move || target.complete());
    let done = storage::download_probed(&s3, &input.url, probed, file, &mut progress, Some(complete)).await?;
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
