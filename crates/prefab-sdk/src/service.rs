//! The `prefab.v1.PrefabRuntime` gRPC service wrapping a [`Prefab`].

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::{
    Invocation, Prefab, PrefabError,
    manifest::{FunctionSpec, Manifest, ParamKind},
    proto::{self, prefab_runtime_server::PrefabRuntime},
    secret::Secret,
    telemetry,
    workspace::{
        DirFd, HandleError, INPUTS, OUTPUTS, RelPath, Volume, access, open_regular, watermark::watermark_name,
    },
};

/// The gRPC name of the service, as health checks ask for it.
pub const RUNTIME_SERVICE: &str = "prefab.v1.PrefabRuntime";

/// How long a cancelled function may take to stop before it is dropped.
const CANCEL_GRACE: Duration = Duration::from_secs(10);
/// Events buffered between a function and its caller.
const EVENT_QUEUE: usize = 64;

/// The gRPC service for one prefab.
pub struct RuntimeService<P> {
    prefab: Arc<P>,
    manifest: Arc<Manifest>,
    root: Volume,
    active: Arc<AtomicUsize>,
}

impl<P> Clone for RuntimeService<P> {
    fn clone(&self) -> Self {
        Self {
            prefab: Arc::clone(&self.prefab),
            manifest: Arc::clone(&self.manifest),
            root: self.root.clone(),
            active: Arc::clone(&self.active),
        }
    }
}

impl<P: Prefab> RuntimeService<P> {
    /// Wraps `prefab`, resolving workspaces under `workspace_root`.
    pub fn new(prefab: Arc<P>, workspace_root: PathBuf) -> Result<Self, crate::server::BoxError> {
        let manifest = prefab.manifest();
        manifest.validate()?;
        Ok(Self {
            prefab,
            manifest: Arc::new(manifest),
            root: Volume::new(workspace_root)?,
            active: Arc::default(),
        })
    }

    /// The prefab's manifest, as `Describe` serves it.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The number of function calls running now.
    pub fn active(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.active)
    }

    /// Serves this runtime, with health and reflection, on `listener` until
    /// `shutdown` is cancelled.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), crate::server::BoxError> {
        self.serve_tls(listener, None, shutdown).await
    }

    /// Like [`RuntimeService::serve`], over TLS when `tls` is given.
    pub async fn serve_tls(
        self,
        listener: tokio::net::TcpListener,
        tls: Option<tonic::transport::ServerTlsConfig>,
        shutdown: CancellationToken,
    ) -> Result<(), crate::server::BoxError> {
        let router = crate::server::base_router(RUNTIME_SERVICE, proto::FILE_DESCRIPTOR_SET, tls)
            .await?
            .add_service(proto::prefab_runtime_server::PrefabRuntimeServer::new(self));
        crate::server::serve_router(router, listener, shutdown).await
    }

    /// Checks a request and builds the invocation, without running it.
    async fn prepare(
        &self,
        req: proto::InvokeRequest,
        events: mpsc::Sender<Result<proto::InvokeEvent, Status>>,
        cancel: CancellationToken,
        trace: telemetry::Propagated,
    ) -> Result<Invocation, Status> {
        let workspace = match self.root.resolve(&req.workspace).await {
            Ok(dir) => dir,
            Err(HandleError::Io { id, source }) if access::is_denied(&source) => {
                let dir = self.root.path().join(id.to_string());
                let explained = tokio::task::spawn_blocking(move || {
                    access::explain_denied("cannot open the workspace", &dir)
                })
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
                return Err(Status::failed_precondition(explained));
            }
            Err(e @ HandleError::Missing(_)) => return Err(Status::not_found(e.to_string())),
            Err(e @ HandleError::Io { .. }) => return Err(Status::internal(e.to_string())),
            Err(e) => return Err(Status::invalid_argument(e.to_string())),
        };
        let spec = self.manifest.function(&req.function_name).ok_or_else(|| {
            Status::not_found(format!(
                "prefab {} has no function {:?}",
                self.manifest.id, req.function_name
            ))
        })?;
        let args = req.arguments.map(proto::struct_to_json).unwrap_or_default();
        let files = resolve_files(spec, &args, &workspace).await?;
        Ok(Invocation {
            function: req.function_name,
            args,
            files,
            workspace,
            secrets: req
                .secrets
                .into_iter()
                .map(|(k, v)| (k, Secret::new(v)))
                .collect(),
            events,
            cancel,
            trace,
        })
    }
}

/// Resolves every file parameter to an absolute path inside `workspace`:
/// inputs must be regular files under `inputs/`, outputs go under
/// `outputs/` and get their folder created.
async fn resolve_files(
    spec: &FunctionSpec,
    args: &serde_json::Map<String, Value>,
    workspace: &Path,
) -> Result<HashMap<String, PathBuf>, Status> {
    let mut files = HashMap::new();
    for p in &spec.parameters {
        let (dir, is_input) = match p.kind {
            ParamKind::InputFile => (INPUTS, true),
            ParamKind::OutputFile => (OUTPUTS, false),
            _ => continue,
        };
        let Some(value) = args.get(&p.name) else {
            if p.required || !is_input {
                return Err(Status::invalid_argument(format!(
                    "file parameter {:?} is missing",
                    p.name
                )));
            }
            continue;
        };
        let rel = value
            .as_str()
            .ok_or_else(|| {
                Status::invalid_argument(format!("file parameter {:?} must be a path string", p.name))
            })
            .and_then(|s| RelPath::parse(s).map_err(|e| Status::invalid_argument(e.to_string())))?;
        if !rel.is_inside(dir) {
            return Err(Status::invalid_argument(format!(
                "file parameter {:?} must be under {dir}/, got {rel}",
                p.name
            )));
        }
        let path = workspace.join(rel.as_str());
        // Checked component by component without following symlinks, so a
        // link planted anywhere on the way is refused.
        let (base, at, name, streaming) = (workspace.to_owned(), path.clone(), p.name.clone(), p.streaming);
        let checked = tokio::task::spawn_blocking(move || {
            let checked = if is_input {
                // A streaming input may still be staged: then its
                // watermark is there.
                let watermark =
                    || RelPath::parse(&watermark_name(rel.as_str())).map_err(std::io::Error::other);
                match open_regular(&base, &rel) {
                    Err(e) if streaming && e.kind() == std::io::ErrorKind::NotFound => watermark()
                        .and_then(|mark| open_regular(&base, &mark))
                        .map_err(|_| e),
                    opened => opened,
                }
                .map(drop)
            } else {
                // Nothing may be at an output's path yet: a link planted
                // there by another process on the volume would take the
                // function's writes.
                let components: Vec<&str> = rel.components().collect();
                let (file, folders) = components.split_last().expect("a path has a name");
                DirFd::open(&base).and_then(|dir| dir.subdir(folders)?.ensure_absent(file))
            };
            checked.map_err(|e| match (is_input, e.kind()) {
                (_, std::io::ErrorKind::PermissionDenied) => {
                    let doing = match is_input {
                        true => format!("cannot read input {name:?} at"),
                        false => format!("cannot prepare output {name:?} at"),
                    };
                    Status::failed_precondition(access::explain_denied(&doing, &at))
                }
                (true, std::io::ErrorKind::NotFound) => {
                    Status::failed_precondition(format!("input {name:?} is not in the workspace: {e}"))
                }
                (true, _) => Status::invalid_argument(format!("input {name:?}: {e}")),
                (false, _) => Status::invalid_argument(format!("output {name:?}: {e}")),
            })
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        checked?;
        files.insert(p.name.clone(), path);
    }
    Ok(files)
}

/// After a successful call: report each output file the function did not
/// report itself under its parameter name, as its workspace-relative path,
/// and fail if one was not written.
async fn add_output_files(
    spec: &FunctionSpec,
    args: &serde_json::Map<String, Value>,
    workspace: &Path,
    outputs: &mut serde_json::Map<String, Value>,
) -> Result<(), Status> {
    for p in spec.parameters.iter().filter(|p| p.kind == ParamKind::OutputFile) {
        if outputs.contains_key(&p.name) {
            continue;
        }
        let Some(rel) = args.get(&p.name).and_then(Value::as_str) else {
            continue;
        };
        match tokio::fs::symlink_metadata(workspace.join(rel)).await {
            Ok(m) if m.is_file() => {
                outputs.insert(p.name.clone(), Value::String(rel.to_owned()));
            }
            // What the gateway would refuse to upload, refused here alike.
            Ok(m) => {
                return Err(Status::failed_precondition(format!(
                    "output {:?} at {rel} is {}, not a regular file; the gateway uploads regular files only",
                    p.name,
                    file_kind(m.file_type()),
                )));
            }
            Err(_) => {
                return Err(Status::internal(format!(
                    "the function finished without writing its output file {:?}",
                    p.name
                )));
            }
        }
    }
    Ok(())
}

/// What a file that is not a regular one is, for a message.
fn file_kind(kind: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_symlink() {
        "a symbolic link"
    } else if kind.is_dir() {
        "a folder"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "a device"
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::InvokeEvent, Status>> + Send>>;

#[tonic::async_trait]
impl<P: Prefab> PrefabRuntime for RuntimeService<P> {
    async fn describe(
        &self,
        _req: Request<proto::DescribeRequest>,
    ) -> Result<Response<proto::DescribeResponse>, Status> {
        Ok(Response::new(proto::DescribeResponse {
            manifest: Some(self.manifest.as_ref().into()),
        }))
    }

    type InvokeStream = EventStream;

    async fn invoke(&self, req: Request<proto::InvokeRequest>) -> Result<Response<EventStream>, Status> {
        // The call continues the gateway's trace; its fields are filled in
        // once the request is checked.
        let span = tracing::info_span!(
            "invoke",
            function = tracing::field::Empty,
            workspace = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        let trace = telemetry::Remote::from_metadata(req.metadata()).continue_in(&span);
        let req = req.into_inner();
        let timeout = Some(Duration::from_millis(req.timeout_ms)).filter(|t| !t.is_zero());
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let cancel = CancellationToken::new();
        let call = tracing::Instrument::instrument(
            self.prepare(req, tx.clone(), cancel.clone(), trace),
            span.clone(),
        )
        .await?;
        let spec = self
            .manifest
            .function(call.function())
            .expect("prepare checked the function exists")
            .clone();
        let (args, workspace) = (call.args.clone(), call.workspace.clone());
        span.record("function", spec.name.as_str());
        span.record("workspace", tracing::field::display(workspace.display()));
        let redactor = crate::secret::Redactor::new(call.secrets().map(|(_, value)| value));
        let prefab = Arc::clone(&self.prefab);
        let active = Arc::clone(&self.active);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                active.fetch_add(1, Ordering::SeqCst);
                let _active = DecrementOnDrop(active);
                let run = prefab.invoke(call);
                let outcome = supervise(run, &tx, &cancel, timeout).await;
                let result = match outcome {
                    Some(Ok(mut outputs)) => add_output_files(&spec, &args, &workspace, &mut outputs)
                        .await
                        .map(|()| outputs),
                    Some(Err(e)) => {
                        let status = Status::from(e);
                        // Cut to leave the gateway room to say which prefab failed.
                        let message = redactor.redact(status.message());
                        let message = proto::clip_middle(&message, proto::MAX_STATUS_MESSAGE - 512);
                        Err(Status::new(status.code(), message))
                    }
                    None => return, // the caller is gone
                };
                let event = result.map(|outputs| proto::InvokeEvent {
                    event: Some(proto::invoke_event::Event::Result(proto::InvokeResult {
                        outputs: Some(proto::json_to_struct(outputs)),
                    })),
                });
                if let Err(status) = &event {
                    tracing::info!(code = ?status.code(), message = status.message(), "function failed");
                    telemetry::record_failure(&tracing::Span::current(), status);
                }
                let _ = tx.send(event).await;
            },
            span,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Runs a function to completion, cancelling it when the caller leaves or
/// the time limit passes. `None` means the caller is gone.
async fn supervise(
    run: impl Future<Output = Result<super::Outputs, PrefabError>>,
    tx: &mpsc::Sender<Result<proto::InvokeEvent, Status>>,
    cancel: &CancellationToken,
    timeout: Option<Duration>,
) -> Option<Result<super::Outputs, PrefabError>> {
    let mut run = std::pin::pin!(run);
    let deadline = async {
        match timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        out = &mut run => return Some(out),
        () = tx.closed() => tracing::info!("caller went away; cancelling the function"),
        () = deadline => tracing::info!("time limit passed; cancelling the function"),
    }
    cancel.cancel();
    let stopped = tokio::time::timeout(CANCEL_GRACE, &mut run).await;
    if stopped.is_err() {
        tracing::warn!("function ignored cancellation for {CANCEL_GRACE:?}; dropping it");
    }
    if tx.is_closed() {
        return None;
    }
    Some(Err(PrefabError::TimedOut(timeout.unwrap_or_default())))
}

struct DecrementOnDrop(Arc<AtomicUsize>);

impl Drop for DecrementOnDrop {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_output_that_is_no_regular_file_fails_the_precondition() {
        let ws = tempfile::tempdir().unwrap();
        let spec: FunctionSpec = serde_json::from_value(serde_json::json!({
            "name": "f",
            "parameters": [{"name": "output", "type": "OutputFile", "extension": "txt"}],
        }))
        .unwrap();
        let outputs_dir = ws.path().join("outputs/0");
        std::fs::create_dir_all(&outputs_dir).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", outputs_dir.join("link.txt")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            outputs_dir.join("fifo.txt"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        std::fs::write(outputs_dir.join("ok.txt"), "ok").unwrap();
        let check = |rel: &str| {
            let args = serde_json::json!({ "output": rel }).as_object().unwrap().clone();
            let (spec, ws) = (&spec, ws.path().to_owned());
            async move {
                let mut outputs = serde_json::Map::new();
                add_output_files(spec, &args, &ws, &mut outputs)
                    .await
                    .map(|()| outputs)
            }
        };
        for (rel, kind) in [
            ("outputs/0/link.txt", "a symbolic link"),
            ("outputs/0/fifo.txt", "a FIFO"),
        ] {
            let status = check(rel).await.unwrap_err();
            assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{rel}");
            assert!(status.message().contains(kind), "{}", status.message());
        }
        let status = check("outputs/0/missing.txt").await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Internal);
        let outputs = check("outputs/0/ok.txt").await.unwrap();
        assert_eq!(outputs["output"], "outputs/0/ok.txt");
    }
}
