//! Collecting a call's outputs: each output file a runtime reports is
//! opened inside the workspace's `outputs/` without following symlinks,
//! checked to be a regular file, and uploaded from that open descriptor to
//! `s3://<bucket>/outputs/<request_id>/<uuid>.<ext>`.

use std::path::Path;

use serde_json::{Map, Value};
use tracing::Instrument as _;

use super::{GatewayError, State, events::Events, plan::CallPlan};
use crate::{
    proto::{self, run_event::Event},
    storage::{self, S3Url},
    workspace::{OUTPUTS, RelPath, RequestId, access, open_regular},
};

/// Uploads the output files of `plan` and returns the call's final outputs,
/// file values replaced by their URLs, plus one record per file.
pub async fn collect_outputs(
    state: &State,
    workspace: &Path,
    id: RequestId,
    plan: &CallPlan,
    mut reported: Map<String, Value>,
    events: &Events,
) -> Result<(Map<String, Value>, Vec<proto::OutputUploaded>), GatewayError> {
    let prefab = plan.prefab.name.clone();
    let contract = |message: String| GatewayError::Contract {
        prefab: prefab.clone(),
        message,
    };
    let declared = plan.function.outputs.len() + plan.outputs.len();
    if let Some(extra) = reported.keys().find(|k| {
        !plan.function.outputs.iter().any(|o| &o.name == *k) && !plan.outputs.iter().any(|o| &o.param == *k)
    }) {
        return Err(contract(format!(
            "it reported {} outputs including the undeclared {:?}; its manifest declares {declared}",
            reported.len(),
            extra.chars().take(64).collect::<String>()
        )));
    }
    let mut outputs = Map::new();
    for declared in &plan.function.outputs {
        if let Some(v) = reported.remove(&declared.name) {
            outputs.insert(declared.name.clone(), v);
        }
    }
    let mut files = Vec::new();
    for out in &plan.outputs {
        let raw = match reported.remove(&out.param) {
            Some(Value::String(s)) => s,
            Some(other) => {
                return Err(contract(format!(
                    "output {:?} must be a path, got {other}",
                    out.param
                )));
            }
            None => out.rel.clone(),
        };
        let rel = RelPath::parse(&raw).map_err(|e| contract(format!("output {:?}: {e}", out.param)))?;
        if !rel.is_inside(OUTPUTS) {
            return Err(contract(format!(
                "output {:?} at {rel} is outside {OUTPUTS}/",
                out.param
            )));
        }
        let (base, param) = (workspace.to_owned(), out.param.clone());
        let opened = tokio::task::spawn_blocking(move || {
            open_regular(&base, &rel).map_err(|e| {
                let doing = format!("the gateway cannot read output {param:?} at");
                let denied =
                    access::is_denied(&e).then(|| access::explain_denied(&doing, &base.join(rel.as_str())));
                (e, denied)
            })
        })
        .await
        .map_err(|e| GatewayError::Internal(e.to_string()))?;
        let (file, size) = opened.map_err(|(e, denied)| match denied {
            Some(explained) => GatewayError::Deployment(explained),
            None => contract(format!("output {:?}: {e}", out.param)),
        })?;
        if size > state.max_output_bytes {
            return Err(contract(format!(
                "output {:?} has {size} bytes, more than the {} an output may have here \
                 (PREFAB_MAX_OUTPUT_BYTES)",
                out.param, state.max_output_bytes
            )));
        }
        let key = format!("{OUTPUTS}/{id}/{}.{}", uuid::Uuid::new_v4(), out.extension);
        let dest = S3Url::new(&state.bucket, &key).map_err(|e| GatewayError::Internal(e.to_string()))?;
        let url = dest.to_string();
        let (mut progress, s3) =
            events.transfer_progress(&state.s3, plan.index, &out.param, &url, size, false);
        progress(0);
        let done = storage::upload(&s3, file, size, &dest, &mut progress)
            .instrument(tracing::info_span!("upload", parameter = %out.param, %url, size))
            .await?;
        let uploaded = proto::OutputUploaded {
            parameter: out.param.clone(),
            url: url.clone(),
            size: done.size,
            crc64nvme: done.checksum(),
        };
        events.send(plan.index, Event::Uploaded(uploaded.clone())).await?;
        outputs.insert(out.param.clone(), Value::String(url));
        files.push(uploaded);
    }
    Ok((outputs, files))
}
