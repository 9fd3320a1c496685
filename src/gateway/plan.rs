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

/// Most inputs in one call.
const MAX_INPUTS: usize = 64;
/// Deepest nesting of a JSON input.
const MAX_DEPTH: usize = 32;
/// Longest string anywhere in the inputs, in bytes.
const MAX_STRING: usize = 64 << 10;
/// Most values (strings, numbers, list items, fields) in one call's inputs.
const MAX_VALUES: usize = 100_000;

/// Refuses inputs too large or deep to be reasonable, before anything
/// else reads them.
fn check_shape(inputs: &Map<String, Value>) -> Result<(), String> {
    if inputs.len() > MAX_INPUTS {
        return Err(format!(
            "{} inputs given; at most {MAX_INPUTS} are accepted",
            inputs.len()
        ));
    }
    let mut stack: Vec<(&Value, usize)> = inputs.values().map(|v| (v, 1)).collect();
    let mut seen = inputs.len();
    while let Some((value, depth)) = stack.pop() {
        if depth > MAX_DEPTH {
            return Err(format!("inputs are nested deeper than {MAX_DEPTH} levels"));
        }
        let children: Box<dyn Iterator<Item = &Value>> = match value {
            Value::String(s) if s.len() > MAX_STRING => {
                return Err(format!(
                    "a string input has {} bytes; at most {MAX_STRING} are accepted",
                    s.len()
                ));
            }
            Value::Array(a) => Box::new(a.iter()),
            Value::Object(m) => {
                if let Some(k) = m.keys().find(|k| k.len() > MAX_STRING) {
                    return Err(format!(
                        "a field name has {} bytes; at most {MAX_STRING} are accepted",
                        k.len()
                    ));
                }
                Box::new(m.values())
            }
            _ => Box::new(std::iter::empty()),
        };
        for child in children {
            seen += 1;
            if seen > MAX_VALUES {
                return Err(format!("inputs hold more than {MAX_VALUES} values"));
            }
            stack.push((child, depth + 1));
        }
    }
    Ok(())
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
    // The field a violation names: the call's inputs, or one of them.
    let invalid = |name: &str, msg: String| {
        let field = match name {
            "" => format!("calls[{index}].inputs"),
            name => format!("calls[{index}].inputs.{name}"),
        };
        GatewayError::invalid(field, format!("{here}: {msg}"))
    };
    check_shape(&inputs).map_err(|msg| invalid("", msg))?;
    let declared: HashSet<&str> = function.parameters.iter().map(|p| p.name.as_str()).collect();
    if let Some(unknown) = inputs.keys().find(|k| !declared.contains(k.as_str())) {
        let mut names: Vec<_> = declared.iter().copied().collect();
        names.sort_unstable();
        return Err(invalid(
            unknown,
            format!("unknown input {unknown:?}; expected: {}", names.join(", ")),
        ));
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
                return Err(invalid(
                    name,
                    format!("{name:?} is an output file; the gateway names it, do not pass it"),
                ));
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
                return Err(invalid(name, format!("required input {name:?} is missing")));
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
            return Err(invalid(
                name,
                format!("input {name:?} must be {expected}, got {value}"),
            ));
        }
        if p.kind == ParamKind::InputFile {
            let raw = value.as_str().unwrap_or_default();
            let url =
                S3Url::parse(raw).map_err(|e| invalid(name, format!("input {name:?} = {raw:?}: {e}")))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_or_deep_inputs_are_refused() {
        let ok: Map<String, Value> = serde_json::from_str(r#"{"a": [1, {"b": "c"}], "d": true}"#).unwrap();
        assert!(check_shape(&ok).is_ok());
        let mut deep = Value::Null;
        for _ in 0..40 {
            deep = Value::Array(vec![deep]);
        }
        let deep = Map::from_iter([("x".to_owned(), deep)]);
        assert!(check_shape(&deep).unwrap_err().contains("nested"));
        let long = Map::from_iter([("x".to_owned(), Value::String("y".repeat(MAX_STRING + 1)))]);
        assert!(check_shape(&long).unwrap_err().contains("string"));
        let many = (0..=MAX_INPUTS).map(|i| (i.to_string(), Value::Null)).collect();
        assert!(check_shape(&many).unwrap_err().contains("inputs given"));
        let wide = Map::from_iter([("x".to_owned(), Value::Array(vec![Value::Null; MAX_VALUES]))]);
        assert!(check_shape(&wide).unwrap_err().contains("values"));
    }

    #[test]
    fn bucket_policy_honours_prefixes() {
        let p = BucketPolicy::new(&["media/incoming/".into(), "shared".into()], "out");
        let url = |s: &str| S3Url::parse(s).unwrap();
        assert!(p.allows(&url("s3://media/incoming/a.mp4")));
        assert!(!p.allows(&url("s3://media/private/a.mp4")));
        assert!(p.allows(&url("s3://shared/x")));
        assert!(!p.allows(&url("s3://out/x")));
        assert!(BucketPolicy::new(&[], "out").allows(&url("s3://out/x")));
        assert!(BucketPolicy::new(&["*".into()], "out").allows(&url("s3://any/x")));
    }
}
