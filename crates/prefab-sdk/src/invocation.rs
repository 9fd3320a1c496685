//! [`Invocation`]: everything a function needs to run one call.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    InputReader, PrefabError, proto,
    secret::Secret,
    telemetry,
    workspace::{DirFd, access},
};

/// The values a function returns, by output name.
pub type Outputs = Map<String, Value>;

/// One call of a function: its arguments with file parameters resolved to
/// local paths, its secrets, a sink for progress and log lines, and a
/// cancellation token.
#[derive(Debug)]
pub struct Invocation {
    pub(crate) function: String,
    pub(crate) args: Map<String, Value>,
    pub(crate) files: HashMap<String, PathBuf>,
    pub(crate) workspace: PathBuf,
    pub(crate) secrets: HashMap<String, Secret>,
    pub(crate) events: mpsc::Sender<Result<proto::InvokeEvent, tonic::Status>>,
    pub(crate) cancel: CancellationToken,
    pub(crate) trace: telemetry::Propagated,
}

impl Invocation {
    /// The function being called.
    pub fn function(&self) -> &str {
        &self.function
    }

    /// The raw argument `name`, if given. File parameters hold their
    /// workspace-relative path.
    pub fn arg(&self, name: &str) -> Option<&Value> {
        self.args.get(name)
    }

    /// Every argument.
    pub fn args(&self) -> &Map<String, Value> {
        &self.args
    }

    /// The W3C trace context to hand to work this call starts elsewhere:
    /// as headers for another service ([`telemetry::Propagated::headers`]),
    /// as `TRACEPARENT`/`TRACESTATE` for a program
    /// ([`telemetry::Propagated::env`]). It names this call's span when
    /// spans are exported, the gateway's context otherwise; empty when the
    /// call is not traced.
    pub fn trace(&self) -> telemetry::Propagated {
        self.trace.from_span(&tracing::Span::current())
    }

    /// The string argument `name`.
    pub fn str_arg(&self, name: &str) -> Result<&str, PrefabError> {
        self.arg(name)
            .and_then(Value::as_str)
            .ok_or_else(|| PrefabError::InvalidArgument(format!("string argument {name:?} is missing")))
    }

    /// The number argument `name`.
    pub fn number_arg(&self, name: &str) -> Result<f64, PrefabError> {
        self.arg(name)
            .and_then(Value::as_f64)
            .ok_or_else(|| PrefabError::InvalidArgument(format!("number argument {name:?} is missing")))
    }

    /// The local path of the input file `name`, ready to read.
    pub fn input(&self, name: &str) -> Result<&Path, PrefabError> {
        self.file(name)
    }

    /// Opens the input file `name` to read it front to back. For an input
    /// the function declares [streaming](crate::manifest::Param::streaming),
    /// the reader returns bytes as soon as the gateway has staged them, while
    /// [`Invocation::input`]'s path holds the file only once it is
    /// complete; any other input it reads whole.
    pub async fn open_input(&self, name: &str) -> Result<InputReader, PrefabError> {
        let (components, file_name) = self.folders_and_name(name, "input")?;
        let workspace = self.workspace.clone();
        let open = move || {
            let folders: Vec<&str> = components.iter().map(String::as_str).collect();
            DirFd::open(&workspace)?
                .subdir_path_existing(&folders)?
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "its folder is gone"))
        };
        let dir = tokio::task::spawn_blocking(open)
            .await
            .map_err(std::io::Error::other)
            .and_then(|opened| opened)
            .map_err(|e| PrefabError::Failed(format!("cannot open input {name:?}: {e}")))?;
        Ok(InputReader::new(dir, file_name, self.cancel.clone()))
    }

    /// The local path the output file `name` must be written to; its folder
    /// exists.
    pub fn output(&self, name: &str) -> Result<&Path, PrefabError> {
        self.file(name)
    }

    /// Creates the output file `name` for writing. Unlike opening
    /// [`Invocation::output`] by hand, it never writes through a file or
    /// link that something else put at that path, or on its way, first.
    pub async fn create_output(&self, name: &str) -> Result<tokio::fs::File, PrefabError> {
        let (components, file_name) = self.folders_and_name(name, "output")?;
        let (workspace, path) = (self.workspace.clone(), self.output(name)?.to_owned());
        let doing = format!("cannot create output {name:?} at");
        let create = move || {
            let folders: Vec<&str> = components.iter().map(String::as_str).collect();
            let created = DirFd::open(&workspace)
                .and_then(|dir| dir.subdir(&folders))
                .and_then(|dir| dir.create_new(&file_name, access::OUTPUT_MODE));
            created.map_err(|e| match access::is_denied(&e) {
                true => PrefabError::Workspace(access::explain_denied(&doing, &path)),
                false => e.into(),
            })
        };
        let file = tokio::task::spawn_blocking(create)
            .await
            .map_err(|e| PrefabError::Failed(format!("cannot create output {name:?}: {e}")))??;
        Ok(tokio::fs::File::from_std(file))
    }

    /// The folders (below the workspace) and the name of the file
    /// parameter `name`; `what` ("input", "output") names it in errors.
    fn folders_and_name(&self, name: &str, what: &str) -> Result<(Vec<String>, String), PrefabError> {
        let outside = || PrefabError::Failed(format!("{what} {name:?} is not in the workspace"));
        let rel = self
            .file(name)?
            .strip_prefix(&self.workspace)
            .map_err(|_| outside())?;
        let mut components: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        let file_name = components.pop().ok_or_else(outside)?;
        Ok((components, file_name))
    }

    /// Every file parameter with its local path.
    pub fn files(&self) -> &HashMap<String, PathBuf> {
        &self.files
    }

    fn file(&self, name: &str) -> Result<&Path, PrefabError> {
        self.files
            .get(name)
            .map(PathBuf::as_path)
            .ok_or_else(|| PrefabError::InvalidArgument(format!("file parameter {name:?} is missing")))
    }

    /// This call's workspace folder.
    pub fn workspace(&self) -> &Path {
        &self.workspace
    }

    /// The secret `name`, if the gateway sent one.
    pub fn secret(&self, name: &str) -> Option<&str> {
        self.secrets.get(name).map(Secret::expose)
    }

    /// Every secret, for passing on to a child process's environment.
    pub fn secrets(&self) -> impl Iterator<Item = (&str, &str)> {
        self.secrets.iter().map(|(k, v)| (k.as_str(), v.expose()))
    }

    /// Reports progress: `fraction` in [0, 1] (negative when unknown).
    pub async fn progress(&self, fraction: f64, message: impl Into<String>) {
        let event = proto::invoke_event::Event::Progress(proto::Progress {
            fraction,
            message: message.into(),
        });
        self.emit(event).await;
    }

    /// Sends a log line to the caller.
    pub async fn log(&self, stream: proto::LogStream, line: impl Into<String>) {
        let event = proto::invoke_event::Event::Log(proto::LogLine {
            stream: stream as i32,
            line: line.into(),
        });
        self.emit(event).await;
    }

    async fn emit(&self, event: proto::invoke_event::Event) {
        let msg = proto::InvokeEvent { event: Some(event) };
        // A gone caller is noticed through cancellation, not here.
        let _ = self.events.send(Ok(msg)).await;
    }

    /// The token cancelled when the caller goes away or the time limit
    /// passes; long functions should watch it.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Returns an error if the call was cancelled.
    pub fn check_cancelled(&self) -> Result<(), PrefabError> {
        if self.cancel.is_cancelled() {
            Err(PrefabError::Cancelled)
        } else {
            Ok(())
        }
    }
}
