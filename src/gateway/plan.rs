//! Turning a caller's `Call` into a checked plan: every input matched
//! against the prefab's manifest and typed, every file input parsed as an
//! allowed `s3://` URL or a `call://` reference to an earlier call's output
//! file, every file assigned its place in the workspace.

use std::collections::{HashMap, HashSet};

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
    /// Whether the function reads it while it is staged.
    pub streaming: bool,
}

/// An input file handed over on the workspace from earlier in the run:
/// another call's output file, or an object an earlier call staged.
#[derive(Debug, Clone)]
pub struct HandedInput {
    /// The parameter.
    pub param: String,
    /// What the caller passed: `call://<index>/<output>`, or the URL.
    pub reference: String,
    /// The file it is.
    pub from: Origin,
    /// Workspace-relative destination, e.g. `inputs/1/text.txt`.
    pub rel: String,
}

/// A file of the run on the workspace, by the call and parameter it
/// belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Origin {
    /// The output file `param` of call `call`.
    Output {
        /// The call.
        call: u32,
        /// Its output parameter.
        param: String,
    },
    /// The input file `param` of call `call`, staged from the store.
    Input {
        /// The call.
        call: u32,
        /// Its input parameter.
        param: String,
    },
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
    /// Whether it only feeds later calls, and is not uploaded.
    pub intermediate: bool,
}

/// The prefix of a reference to an earlier call's output file.
pub const CALL_SCHEME: &str = "call://";

/// One call, checked and ready to run.
#[derive(Debug, Clone)]
pub struct CallPlan {
    /// Position in the request.
    pub index: u32,
    /// The prefab.
    pub prefab: Resolved,
    /// The function.
    pub function: FunctionSpec,
    /// Files to stage from the store.
    pub inputs: Vec<FileInput>,
    /// Files handed over from earlier in the run.
    pub handed: Vec<HandedInput>,
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

/// One call as the caller gave it.
pub struct Requested<'a> {
    /// Position in the request.
    pub index: u32,
    /// The prefab.
    pub prefab: Resolved,
    /// The function's name.
    pub function_name: &'a str,
    /// Its inputs.
    pub inputs: Map<String, Value>,
    /// Its output files that only feed later calls.
    pub intermediate: &'a [String],
}

/// Checks the inputs of a call against its function, `earlier` being the
/// plans of the calls before it.
pub fn plan(
    call: Requested<'_>,
    earlier: &[CallPlan],
    policy: &BucketPolicy,
) -> Result<CallPlan, GatewayError> {
    let Requested {
        index,
        prefab,
        function_name,
        inputs,
        intermediate,
    } = call;
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
    if let Some(name) = intermediate.iter().find(|name| {
        !function
            .parameters
            .iter()
            .any(|p| &p.name == *name && p.kind == ParamKind::OutputFile)
    }) {
        return Err(GatewayError::invalid(
            format!("calls[{index}].intermediate"),
            format!("{here}: {name:?} is not an output file of {}", function.name),
        ));
    }
    let mut plan = CallPlan {
        index,
        inputs: Vec::new(),
        handed: Vec::new(),
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
                intermediate: intermediate.contains(name),
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
        let reference = value.as_str().filter(|s| s.starts_with(CALL_SCHEME));
        if let (Some(raw), false) = (reference, p.kind == ParamKind::InputFile) {
            return Err(invalid(
                name,
                format!("input {name:?} = {raw:?}: only input files take {CALL_SCHEME} references"),
            ));
        }
        if let Some(raw) = reference {
            let (from, extension) = referenced_output(raw, index, earlier)
                .map_err(|e| invalid(name, format!("input {name:?} = {raw:?}: {e}")))?;
            let rel = format!("{INPUTS}/{index}/{name}.{extension}");
            plan.arguments.insert(name.clone(), Value::String(rel.clone()));
            plan.handed.push(HandedInput {
                param: name.clone(),
                reference: raw.to_owned(),
                from,
                rel,
            });
            continue;
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
            // An object an earlier call staged is handed over, not staged
            // again.
            let staged = earlier
                .iter()
                .find_map(|e| e.inputs.iter().find(|i| i.url == url).map(|i| (e.index, i)));
            match staged {
                Some((call, input)) => plan.handed.push(HandedInput {
                    param: name.clone(),
                    reference: url.to_string(),
                    from: Origin::Input {
                        call,
                        param: input.param.clone(),
                    },
                    rel,
                }),
                None => plan.inputs.push(FileInput {
                    param: name.clone(),
                    url,
                    rel,
                    streaming: p.streaming,
                }),
            }
        } else {
            plan.arguments.insert(name.clone(), value.clone());
        }
    }
    Ok(plan)
}

/// Resolves `call://<index>/<output>` given to call `index`: the output
/// file it names, and that file's extension.
fn referenced_output(raw: &str, index: u32, earlier: &[CallPlan]) -> Result<(Origin, String), String> {
    let malformed = || format!("a reference is {CALL_SCHEME}<index>/<output>, e.g. {CALL_SCHEME}0/output");
    let rest = raw.strip_prefix(CALL_SCHEME).ok_or_else(malformed)?;
    let (call, output) = rest.split_once('/').ok_or_else(malformed)?;
    let call: u32 = call.parse().map_err(|_| malformed())?;
    if output.is_empty() || output.contains('/') {
        return Err(malformed());
    }
    if call >= index {
        let which = if call == index {
            "this call itself"
        } else {
            "a later call"
        };
        return Err(format!(
            "it refers to {which}; a call can take the output files of earlier calls only (index below {index})"
        ));
    }
    let plan = &earlier[call as usize];
    let here = format!("call {call} ({} {})", plan.prefab.name, plan.function.name);
    match plan.outputs.iter().find(|o| o.param == output) {
        Some(file) => Ok((
            Origin::Output {
                call,
                param: output.to_owned(),
            },
            file.extension.clone(),
        )),
        None if plan.function.outputs.iter().any(|o| o.name == output) => Err(format!(
            "{here} returns {output:?} as a value, not a file; only output files can be handed on"
        )),
        None => {
            let files: Vec<&str> = plan.outputs.iter().map(|o| o.param.as_str()).collect();
            Err(format!(
                "{here} has no output file {output:?}; its output files: {}",
                match files.is_empty() {
                    true => "none".to_owned(),
                    false => files.join(", "),
                }
            ))
        }
    }
}

/// The last call that takes each file handed over in the run.
pub fn last_users(plans: &[CallPlan]) -> HashMap<Origin, u32> {
    let mut last = HashMap::new();
    for plan in plans {
        for handed in &plan.handed {
            last.insert(handed.from.clone(), plan.index);
        }
    }
    last
}

/// The inputs call `plan` staged that no later call takes. (Its output
/// files stay for the caller; intermediate ones always have a taker, who
/// releases them.)
pub fn spent(plan: &CallPlan, last_users: &HashMap<Origin, u32>) -> Vec<Origin> {
    plan.inputs
        .iter()
        .map(|i| Origin::Input {
            call: plan.index,
            param: i.param.clone(),
        })
        .filter(|origin| !last_users.contains_key(origin))
        .collect()
}

/// The workspace a run may fill: the inputs it stages (`sizes[call][i]`
/// is the size of `plans[call].inputs[i]`), and each call's output files,
/// estimated at `factor - 1` times the call's inputs, counting what earlier
/// calls hand it at their own estimate. For one call, inputs x `factor`.
pub fn workspace_need(plans: &[CallPlan], sizes: &[Vec<u64>], factor: f64) -> u64 {
    let mut staged: HashMap<Origin, u64> = HashMap::new();
    let mut outputs: Vec<f64> = Vec::with_capacity(plans.len());
    for (plan, sizes) in plans.iter().zip(sizes) {
        let mut inputs = 0.0;
        for (input, size) in plan.inputs.iter().zip(sizes) {
            let origin = Origin::Input {
                call: plan.index,
                param: input.param.clone(),
            };
            staged.insert(origin, *size);
            inputs += *size as f64;
        }
        for handed in &plan.handed {
            inputs += match &handed.from {
                Origin::Input { .. } => staged.get(&handed.from).copied().unwrap_or(0) as f64,
                Origin::Output { call, .. } => outputs[*call as usize],
            };
        }
        outputs.push(inputs * (factor - 1.0).max(0.0));
    }
    let staged: u64 = staged.values().sum();
    (staged as f64 + outputs.iter().sum::<f64>()).ceil() as u64
}

/// Checks that every intermediate output file of `plans` feeds a later
/// call: one that nothing uses would be computed and thrown away.
pub fn check_intermediates(plans: &[CallPlan]) -> Result<(), GatewayError> {
    for plan in plans {
        for out in plan.outputs.iter().filter(|o| o.intermediate) {
            let origin = Origin::Output {
                call: plan.index,
                param: out.param.clone(),
            };
            if !plans.iter().flat_map(|p| &p.handed).any(|h| h.from == origin) {
                return Err(GatewayError::invalid(
                    format!("calls[{}].intermediate", plan.index),
                    format!(
                        "call {} ({} {}): output {:?} is intermediate, but no later call takes {CALL_SCHEME}{}/{}",
                        plan.index, plan.prefab.name, plan.function.name, out.param, plan.index, out.param
                    ),
                ));
            }
        }
    }
    Ok(())
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
