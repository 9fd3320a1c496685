//! A prefab's manifest: its id, version and functions with typed parameters.
//! The same types describe a Rust prefab, parse an exec runtime's TOML file,
//! and validate what a runtime's `Describe` returned to the gateway.

use serde::{Deserialize, Serialize};

use crate::proto;

/// The type of a parameter or output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ParamKind {
    /// A UTF-8 string.
    #[serde(rename = "string")]
    String,
    /// A number.
    #[serde(rename = "number")]
    Number,
    /// A boolean.
    #[serde(rename = "bool")]
    Bool,
    /// Any JSON value.
    #[serde(rename = "json")]
    Json,
    /// A file put on the workspace before the call: staged from object
    /// storage (`s3://bucket/key`), or an earlier call's output file
    /// handed over (`call://<index>/<output>`).
    InputFile,
    /// A file the function writes, uploaded after the call.
    OutputFile,
}

/// One declared parameter or output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Param {
    /// Name, `[A-Za-z_][A-Za-z0-9_]{0,63}`.
    pub name: String,
    /// Type.
    #[serde(rename = "type")]
    pub kind: ParamKind,
    /// Whether the caller must supply it.
    #[serde(default = "yes")]
    pub required: bool,
    /// Human description.
    #[serde(default)]
    pub description: String,
    /// For output files: the extension of the uploaded object, without a dot.
    #[serde(default)]
    pub extension: Option<String>,
    /// For input files: the function reads the file front to back, with
    /// [`crate::Invocation::open_input`] (an exec program: on its standard
    /// input, or through a named pipe its path in the command stands for),
    /// so the gateway calls it as soon as staging has started instead of
    /// once the file is complete.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub streaming: bool,
}

fn yes() -> bool {
    true
}

/// One function of a prefab.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionSpec {
    /// Name, unique within the prefab.
    pub name: String,
    /// Human description.
    #[serde(default)]
    pub description: String,
    /// Parameters, including output files the function writes.
    #[serde(default)]
    pub parameters: Vec<Param>,
    /// Values the function returns.
    #[serde(default)]
    pub outputs: Vec<Param>,
    /// How the exec runtime runs it; unused by Rust prefabs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecSpec>,
}

/// How `prefab runtime exec` runs a function: a program and its arguments,
/// never through a shell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecSpec {
    /// Program and arguments. `{name}` is replaced by the value of
    /// parameter `name` (file parameters by absolute paths); `{{` and `}}`
    /// stand for braces. An argument naming an absent optional parameter is
    /// left out. A streaming input's path is that of a named pipe the
    /// program reads it from as it is staged, once and front to back (it
    /// cannot seek or `stat` it for its size).
    pub command: Vec<String>,
    /// An `OutputFile` parameter that receives the program's standard
    /// output; without it, standard output lines become log events.
    #[serde(default)]
    pub stdout: Option<String>,
    /// An `InputFile` parameter whose bytes the program reads on its
    /// standard input: a streaming one as it is staged. Without it,
    /// standard input is empty.
    #[serde(default)]
    pub stdin: Option<String>,
    /// Time limit in seconds.
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
}

/// A prefab's manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Prefab id, a DNS label such as `hello-world-prefab`.
    pub id: String,
    /// Version such as `1.0.0`.
    pub version: String,
    /// Human description.
    #[serde(default)]
    pub description: String,
    /// Functions, unique by name.
    #[serde(default, rename = "function")]
    pub functions: Vec<FunctionSpec>,
}

/// Why a manifest is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid prefab manifest: {0}")]
pub struct ManifestError(String);

impl Param {
    /// A required parameter of `kind`.
    pub fn new(name: impl Into<String>, kind: ParamKind) -> Self {
        Self {
            name: name.into(),
            kind,
            required: true,
            description: String::new(),
            extension: None,
            streaming: false,
        }
    }

    /// Sets the description.
    pub fn describe(mut self, text: impl Into<String>) -> Self {
        self.description = text.into();
        self
    }

    /// Sets the extension of an output file.
    pub fn extension(mut self, ext: impl Into<String>) -> Self {
        self.extension = Some(ext.into());
        self
    }

    /// Declares an input file read front to back while it is staged (see
    /// [`Param::streaming`]).
    pub fn streaming(mut self) -> Self {
        self.streaming = true;
        self
    }

    /// Makes the parameter optional.
    pub fn optional(mut self) -> Self {
        self.required = false;
        self
    }
}

impl FunctionSpec {
    /// A function with no parameters yet.
    pub fn new(name: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            description: description.into(),
            parameters: Vec::new(),
            outputs: Vec::new(),
            exec: None,
        }
    }

    /// Adds a parameter.
    pub fn param(mut self, p: Param) -> Self {
        self.parameters.push(p);
        self
    }

    /// Adds a returned value.
    pub fn output(mut self, p: Param) -> Self {
        self.outputs.push(p);
        self
    }

    /// The parameter called `name`.
    pub fn parameter(&self, name: &str) -> Option<&Param> {
        self.parameters.iter().find(|p| p.name == name)
    }
}

impl Manifest {
    /// The function called `name`.
    pub fn function(&self, name: &str) -> Option<&FunctionSpec> {
        self.functions.iter().find(|f| f.name == name)
    }

    /// Checks names, uniqueness and extensions.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let err = |m: String| Err(ManifestError(m));
        if !is_dns_label(&self.id) {
            return err(format!(
                "id {:?} must be a lower-case DNS label of at most 63 characters",
                self.id
            ));
        }
        if !is_version(&self.version) {
            return err(format!(
                "version {:?} must be 1-64 characters of [A-Za-z0-9._-]",
                self.version
            ));
        }
        let mut names = std::collections::HashSet::new();
        for f in &self.functions {
            if !is_identifier(&f.name) || !names.insert(&f.name) {
                return err(format!("function name {:?} is invalid or repeated", f.name));
            }
            let mut params = std::collections::HashSet::new();
            for p in f.parameters.iter().chain(&f.outputs) {
                if !is_identifier(&p.name) || !params.insert(&p.name) {
                    return err(format!(
                        "{}: parameter {:?} is invalid or repeated",
                        f.name, p.name
                    ));
                }
                if let Some(ext) = &p.extension
                    && !is_extension(ext)
                {
                    return err(format!(
                        "{}.{}: extension {ext:?} must be 1-16 letters or digits",
                        f.name, p.name
                    ));
                }
            }
            if let Some(p) = f
                .parameters
                .iter()
                .find(|p| p.streaming && p.kind != ParamKind::InputFile)
            {
                return err(format!(
                    "{}.{}: only an InputFile can be streaming",
                    f.name, p.name
                ));
            }
            if f.outputs
                .iter()
                .any(|p| matches!(p.kind, ParamKind::InputFile | ParamKind::OutputFile))
            {
                return err(format!(
                    "{}: file outputs are declared as OutputFile parameters",
                    f.name
                ));
            }
        }
        Ok(())
    }
}

/// Whether `s` is a DNS label: 1-63 of `[a-z0-9-]`, alphanumeric at both ends.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=63).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Whether `s` is an acceptable version string.
pub fn is_version(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c))
}

/// Whether `s` is a parameter or function name.
pub fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn is_extension(s: &str) -> bool {
    (1..=16).contains(&s.len()) && s.bytes().all(|c| c.is_ascii_alphanumeric())
}

impl From<ParamKind> for proto::ParamType {
    fn from(k: ParamKind) -> Self {
        match k {
            ParamKind::String => Self::String,
            ParamKind::Number => Self::Number,
            ParamKind::Bool => Self::Bool,
            ParamKind::Json => Self::Json,
            ParamKind::InputFile => Self::InputFile,
            ParamKind::OutputFile => Self::OutputFile,
        }
    }
}

impl From<&Param> for proto::Parameter {
    fn from(p: &Param) -> Self {
        Self {
            name: p.name.clone(),
            r#type: proto::ParamType::from(p.kind) as i32,
            required: p.required,
            description: p.description.clone(),
            extension: p.extension.clone().unwrap_or_default(),
            streaming: p.streaming,
        }
    }
}

impl From<&Manifest> for proto::Manifest {
    fn from(m: &Manifest) -> Self {
        let params = |ps: &[Param]| ps.iter().map(proto::Parameter::from).collect();
        Self {
            id: m.id.clone(),
            version: m.version.clone(),
            description: m.description.clone(),
            functions: m
                .functions
                .iter()
                .map(|f| proto::Function {
                    name: f.name.clone(),
                    description: f.description.clone(),
                    parameters: params(&f.parameters),
                    outputs: params(&f.outputs),
                })
                .collect(),
        }
    }
}

impl TryFrom<proto::Manifest> for Manifest {
    type Error = ManifestError;

    /// Parses what a runtime's `Describe` returned; the result is validated.
    fn try_from(m: proto::Manifest) -> Result<Self, ManifestError> {
        let param = |p: proto::Parameter| -> Result<Param, ManifestError> {
            let kind = match p.r#type() {
                proto::ParamType::String => ParamKind::String,
                proto::ParamType::Number => ParamKind::Number,
                proto::ParamType::Bool => ParamKind::Bool,
                proto::ParamType::Json => ParamKind::Json,
                proto::ParamType::InputFile => ParamKind::InputFile,
                proto::ParamType::OutputFile => ParamKind::OutputFile,
                proto::ParamType::Unspecified => {
                    return Err(ManifestError(format!("parameter {:?} has no type", p.name)));
                }
            };
            Ok(Param {
                name: p.name,
                kind,
                required: p.required,
                description: p.description,
                extension: Some(p.extension).filter(|e| !e.is_empty()),
                streaming: p.streaming,
            })
        };
        let manifest = Manifest {
            id: m.id,
            version: m.version,
            description: m.description,
            functions: m
                .functions
                .into_iter()
                .map(|f| {
                    Ok(FunctionSpec {
                        name: f.name,
                        description: f.description,
                        parameters: f.parameters.into_iter().map(param).collect::<Result<_, _>>()?,
                        outputs: f.outputs.into_iter().map(param).collect::<Result<_, _>>()?,
                        exec: None,
                    })
                })
                .collect::<Result<_, ManifestError>>()?,
        };
        manifest.validate()?;
        Ok(manifest)
    }
}
