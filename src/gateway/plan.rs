//! Turning a caller's `Call` into a checked plan: every input matched
//! against the prefab's manifest and typed, every file input parsed as an
//! allowed `s3://` URL, every file assigned its place in the workspace.

use std::collections::HashSet;

use serde_json::{Map, Value};

use super::{GatewayError, registry::Resolved};
use crate::{
    manifest::{FunctionSpec, ParamKind},
    storage::S3Url,
    workspace::{INPUTS, OUTPUTS},
};

/// An input file to stage.
#[derive(Debug, Clone)]
pub struct FileInput {
    /// The parameter.
    pub param: String,
    /// Where it comes from.
    pub url: S3Url,
    /// Workspace-relative destination, e.g. `inputs/0/text.txt`.
    pub rel: String,
}

/// An output file to collect.
#[derive(Debug, Clone)]
pub struct FileOutput {
    /// The parameter.
    pub param: String,
    /// Workspace-relative path assigned to it, e.g. `outputs/0/output.txt`.
    pub rel: String,
    /// Extension of the uploaded object.
    pub extension: String,
}

/// One call, checked and ready to run.
#[derive(Debug, Clone)]
pub struct CallPlan {
    /// Position in the request.
    pub index: u32,
    /// The prefab.
    pub prefab: Resolved,
    /// The function.
    pub function: FunctionSpec,
    /// Files to stage.
    pub inputs: Vec<FileInput>,
    /// Files to upload afterwards.
    pub outputs: Vec<FileOutput>,
    /// Arguments for the runtime, file parameters as workspace paths.
    pub arguments: Map<String, Value>,
}

/// Which buckets (and key prefixes) inputs may come from.
#[derive(Debug, Clone)]
pub struct BucketPolicy {
    any: bool,
    rules: Vec<(String, String)>,
}

impl BucketPolicy {
    /// From `PREFAB_ALLOWED_BUCKETS` entries (`bucket` or `bucket/prefix`,
    /// `*` for any); an empty list allows only `default_bucket`.
    pub fn new(entries: &[String], default_bucket: &str) -> Self {
        let entries: Vec<&str> = entries
            .iter()
            .map(|e| e.trim())
            .filter(|e| !e.is_empty())
            .collect();
        let rules = if entries.is_empty() {
            vec![default_bucket]
        } else {
            entries.clone()
        };
        Self {
            any: entries.contains(&"*"),
            rules: rules
                .into_iter()
                .map(|r| match r.split_once('/') {
                    Some((b, p)) => (b.to_owned(), p.to_owned()),
                    None => (r.to_owned(), String::new()),
                })
                .collect(),
        }
    }

    /// Whether `url` may be read.
    pub fn allows(&self, url: &S3Url) -> bool {
        self.any
            || self
                .rules
                .iter()
                .any(|(b, p)| b == url.bucket() && url.key().starts_with(p.as_str()))
    }
}

/// Checks `inputs` of call `index` against `function` of `prefab`.
pub fn plan(
    index: u32,
    prefab: Resolved,
    function_name: &str,
    inputs: Map<String, Value>,
    policy: &BucketPolicy,
) -> Result<CallPlan, GatewayError> {
    let function = prefab
        .manifest
        .function(function_name)
        .ok_or_else(|| {
            let known: Vec<_> = prefab
                .manifest
                .functions
                .iter()
                .map(|f| f.name.as_str())
                .collect();
            GatewayError::NotFound(format!(
                "prefab {} has no function {function_name:?}; it has: {}",
                prefab.name,
                known.join(", ")
            ))
        })?
        .clone();
    let here = format!("call {index} ({} {})", prefab.name, function.name);
    let invalid = |msg: String| GatewayError::InvalidArgument(format!("{here}: {msg}"));
    let declared: HashSet<&str> = function.parameters.iter().map(|p| p.name.as_str()).collect();
    if let Some(unknown) = inputs.keys().find(|k| !declared.contains(k.as_str())) {
        let mut names: Vec<_> = declared.iter().copied().collect();
        names.sort_unstable();
        return Err(invalid(format!(
            "unknown input {unknown:?}; expected: {}",
            names.join(", ")
        )));
    }
    let mut plan = CallPlan {
        index,
        inputs: Vec::new(),
        outputs: Vec::new(),
        arguments: Map::new(),
        prefab: prefab.clone(),
        function: function.clone(),
    };
    for p in &function.parameters {
        let name = &p.name;
        if p.kind == ParamKind::OutputFile {
            if inputs.contains_key(name) {
                return Err(invalid(format!(
                    "{name:?} is an output file; the gateway names it, do not pass it"
                )));
            }
            let extension = p.extension.clone().unwrap_or_else(|| "bin".into());
            let rel = format!("{OUTPUTS}/{index}/{name}.{extension}");
            plan.arguments.insert(name.clone(), Value::String(rel.clone()));
            plan.outputs.push(FileOutput {
                param: name.clone(),
                rel,
                extension,
            });
            continue;
        }
        let Some(value) = inputs.get(name) else {
            if p.required {
                return Err(invalid(format!("required input {name:?} is missing")));
            }
            continue;
        };
        let type_ok = match p.kind {
            ParamKind::String | ParamKind::InputFile => value.is_string(),
            ParamKind::Number => value.is_number(),
            ParamKind::Bool => value.is_boolean(),
            ParamKind::Json | ParamKind::OutputFile => true,
        };
        if !type_ok {
            let expected = match p.kind {
                ParamKind::InputFile => "an s3://bucket/key URL string",
                ParamKind::String => "a string",
                ParamKind::Number => "a number",
                _ => "a boolean",
            };
            return Err(invalid(format!("input {name:?} must be {expected}, got {value}")));
        }
        if p.kind == ParamKind::InputFile {
            let raw = value.as_str().unwrap_or_default();
            let url = S3Url::parse(raw).map_err(|e| invalid(format!("input {name:?} = {raw:?}: {e}")))?;
            if !policy.allows(&url) {
                return Err(GatewayError::PermissionDenied(format!(
                    "{here}: input {name:?} = {url}: the bucket or prefix is not in PREFAB_ALLOWED_BUCKETS"
                )));
            }
            let rel = match url.extension() {
                Some(ext) => format!("{INPUTS}/{index}/{name}.{ext}"),
                None => format!("{INPUTS}/{index}/{name}"),
            };
            plan.arguments.insert(name.clone(), Value::String(rel.clone()));
            plan.inputs.push(FileInput {
                param: name.clone(),
                url,
                rel,
            });
        } else {
            plan.arguments.insert(name.clone(), value.clone());
        }
    }
    Ok(plan)
}
