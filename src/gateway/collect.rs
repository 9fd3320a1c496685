//! Collecting a call's outputs: each output file a runtime reports is
//! opened inside the workspace's `outputs/` (from the workspace's own open
//! descriptor, as staging writes) without following symlinks,
//! checked to be a regular file, and uploaded from that open descriptor to
//! `s3://<bucket>/outputs/<request_id>/<uuid>.<ext>`.

use serde_json::{Map, Value};
use tracing::Instrument as _;

use super::{
    GatewayError, Services,
    events::Events,
    plan::{CALL_SCHEME, CallPlan},
};
use crate::{
    proto::{self, run_event::Event},
    storage::{self, S3Url, checksum},
    workspace::{OUTPUTS, RelPath, Workspace, access},
};

/// An output file as collected: where it is on the workspace, its size and
/// CRC-64/NVME (S3's base64 form).
#[derive(Debug, Clone)]
pub struct Collected {
    /// The output parameter.
    pub param: String,
    /// Workspace-relative path.
    pub rel: RelPath,
    /// Size in bytes.
    pub size: u64,
    /// Checksum.
    pub crc64nvme: String,
}

/// What a call left: its final outputs (file values replaced by their URLs,
/// intermediate ones by their `call://` reference), the uploads, and every
/// output file as collected.
pub struct CallOutputs {
    /// The outputs as the caller sees them.
    pub values: Map<String, Value>,
    /// One record per uploaded file.
    pub uploaded: Vec<proto::OutputUploaded>,
    /// Every output file.
    pub files: Vec<Collected>,
}

/// Uploads the output files of `plan` (but the intermediate ones), none
/// larger than `max_file_bytes`, and returns what the call left.
pub async fn collect_outputs(
    services: &Services,
    max_file_bytes: u64,
    workspace: &Workspace,
    plan: &CallPlan,
    mut reported: Map<String, Value>,
    events: &Events,
) -> Result<CallOutputs, GatewayError> {
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
    let (mut files, mut collected) = (Vec::new(), Vec::new());
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
        let (base, fd, param, opened_rel) = (
            workspace.dir().to_owned(),
            workspace.fd(),
            out.param.clone(),
            rel.clone(),
        );
        let opened = tokio::task::spawn_blocking(move || {
            fd.open_regular(&opened_rel).map_err(|e| {
                let doing = format!("the gateway cannot read output {param:?} at");
                let denied = access::is_denied(&e)
                    .then(|| access::explain_denied(&doing, &base.join(opened_rel.as_str())));
                (e, denied)
            })
        })
        .await
        .map_err(|e| GatewayError::Internal(e.to_string()))?;
        let (file, size) = opened.map_err(|(e, denied)| match denied {
            Some(explained) => GatewayError::Deployment(explained),
            None => contract(format!("output {:?}: {e}", out.param)),
        })?;
        if size > max_file_bytes {
            return Err(contract(format!(
                "output {:?} has {size} bytes, more than the {} an output may have here \
                 (PREFAB_MAX_OUTPUT_BYTES)",
                out.param, max_file_bytes
            )));
        }
        if out.intermediate {
            // Handed to later calls on the workspace: its checksum is taken
            // here, since no upload takes it.
            let crc = tokio::task::spawn_blocking(move || storage::crc64_of_range(&file, 0, size))
                .await
                .map_err(|e| GatewayError::Internal(e.to_string()))?
                .map_err(|e| GatewayError::Internal(format!("cannot read output {:?}: {e}", out.param)))?;
            let reference = format!("{CALL_SCHEME}{}/{}", plan.index, out.param);
            outputs.insert(out.param.clone(), Value::String(reference));
            collected.push(Collected {
                param: out.param.clone(),
                rel,
                size,
                crc64nvme: checksum::to_base64(crc.value()),
            });
            continue;
        }
        let key = format!(
            "{OUTPUTS}/{}/{}.{}",
            workspace.id(),
            uuid::Uuid::new_v4(),
            out.extension
        );
        let dest = S3Url::new(&services.bucket, &key).map_err(|e| GatewayError::Internal(e.to_string()))?;
        let url = dest.to_string();
        let (mut progress, s3) =
            events.transfer_progress(&services.s3, plan.index, &out.param, &url, size, false);
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
        collected.push(Collected {
            param: out.param.clone(),
            rel,
            size: uploaded.size,
            crc64nvme: uploaded.crc64nvme.clone(),
        });
        files.push(uploaded);
    }
    Ok(CallOutputs {
        values: outputs,
        uploaded: files,
        files: collected,
    })
}
