//! Staging: HEAD every input of a call, then copy each object into the
//! workspace as `<name>.part`, renamed to its final name only once complete
//! and verified. Several inputs move at once.

use std::{path::Path, sync::Arc};

use tokio::task::JoinSet;

use super::{GatewayError, events::Events, plan::FileInput};
use crate::{
    proto::{self, run_event::Event},
    storage::{self, ObjectInfo},
};

/// Inputs of one call staged at once.
const INPUTS_IN_FLIGHT: usize = 4;

/// Stages every input of call `index` into `workspace`.
pub async fn stage_inputs(
    s3: &aws_sdk_s3::Client,
    workspace: &Path,
    index: u32,
    inputs: &[FileInput],
    events: &Events,
) -> Result<(), GatewayError> {
    // HEAD everything first: a missing object fails the run before any
    // byte moves.
    let mut heads = Vec::with_capacity(inputs.len());
    for input in inputs {
        heads.push(storage::head(s3, &input.url).await?);
    }
    let limit = Arc::new(tokio::sync::Semaphore::new(INPUTS_IN_FLIGHT));
    let mut tasks = JoinSet::new();
    for (input, info) in inputs.iter().cloned().zip(heads) {
        let (s3, events, limit) = (s3.clone(), events.clone(), Arc::clone(&limit));
        let dest = workspace.join(&input.rel);
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await.expect("semaphore is never closed");
            stage_one(&s3, &input, &info, &dest, index, &events).await
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(|e| GatewayError::Internal(format!("staging task failed: {e}")))??;
    }
    Ok(())
}

async fn stage_one(
    s3: &aws_sdk_s3::Client,
    input: &FileInput,
    info: &ObjectInfo,
    dest: &Path,
    index: u32,
    events: &Events,
) -> Result<(), GatewayError> {
    let io = |e: std::io::Error| GatewayError::Internal(format!("cannot write {}: {e}", input.rel));
    if let Some(parent) = dest.parent() {
        tokio::fs::create_dir_all(parent).await.map_err(io)?;
    }
    let part = dest.with_extension(match dest.extension() {
        Some(ext) => format!("{}.part", ext.to_string_lossy()),
        None => "part".into(),
    });
    let url = input.url.to_string();
    let mut progress = events.transfer_progress(index, &input.param, &url, info.size, true);
    progress(0);
    tracing::debug!(%url, size = info.size, "staging input");
    let done = storage::download(s3, &input.url, info, &part, &mut progress).await?;
    tokio::fs::rename(&part, dest).await.map_err(io)?;
    let staged = proto::InputStaged {
        parameter: input.param.clone(),
        url,
        path: input.rel.clone(),
        size: done.size,
        sha256: done.sha256,
    };
    events.send(index, Event::Staged(staged)).await
}
