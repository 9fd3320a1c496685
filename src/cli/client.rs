//! The client commands: `put`, `get`, `run` and `health`, talking to a
//! gateway through the generated gRPC client.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Code, Request, Status, transport::Channel};
use tonic_types::StatusExt;

use super::render::Render;
use crate::{
    config::Secret,
    proto::{self, gateway_client::GatewayClient, run_event::Event},
};

/// Size of the chunks `put` sends.
const PUT_CHUNK: usize = 1 << 20;

/// How to reach the gateway.
#[derive(Debug, Clone, clap::Args)]
pub struct Connection {
    /// Gateway address.
    #[arg(long, env = "PREFAB_GATEWAY", default_value = "http://127.0.0.1:50051")]
    pub gateway: String,
    /// Bearer token.
    #[arg(long, env = "PREFAB_TOKEN", hide_env_values = true)]
    pub token: Option<Secret>,
    /// CA certificate (PEM) to trust for an https:// gateway.
    #[arg(long, env = "PREFAB_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Print one JSON object per line instead of progress bars.
    #[arg(long)]
    pub json: bool,
}

/// A failed client command, with the exit code that tells scripts why.
#[derive(Debug)]
pub struct ClientError {
    /// Exit code: 1 local error, 3 refused by the gateway, 4 the prefab
    /// failed, 5 unavailable (worth a retry), 130 stopped by Ctrl-C.
    pub exit: u8,
    /// What went wrong.
    pub message: String,
}

impl ClientError {
    fn local(message: impl Into<String>) -> Self {
        Self {
            exit: 1,
            message: message.into(),
        }
    }
}

impl From<Status> for ClientError {
    fn from(s: Status) -> Self {
        // The gateway says when a retry is worth it (google.rpc.RetryInfo);
        // a status without details (the connection itself failed) is
        // judged by its code.
        let retry = s.get_details_retry_info();
        let exit = match s.code() {
            _ if retry.is_some() => 5,
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => 5,
            Code::InvalidArgument
            | Code::NotFound
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::FailedPrecondition
            | Code::ResourceExhausted => 3,
            _ => 4,
        };
        let mut message = format!("{:?}: {}", s.code(), s.message());
        if let Some(delay) = retry.and_then(|r| r.retry_delay) {
            message.push_str(&format!(" (retry in {} s)", delay.as_secs_f64().ceil()));
        }
        Self { exit, message }
    }
}

/// A run's failure: FAILED_PRECONDITION there is a prefab that misbehaved
/// or is deployed wrong, not the caller's request to fix.
fn run_failed(s: Status) -> ClientError {
    let exit = match s.code() {
        Code::FailedPrecondition => 4,
        _ => return s.into(),
    };
    ClientError {
        exit,
        message: format!("{:?}: {}", s.code(), s.message()),
    }
}

impl Connection {
    async fn client(&self) -> Result<GatewayClient<Channel>, ClientError> {
        Ok(GatewayClient::new(self.channel().await?).max_decoding_message_size(8 << 20))
    }

    async fn channel(&self) -> Result<Channel, ClientError> {
        let url = if self.gateway.contains("://") {
            self.gateway.clone()
        } else {
            format!("http://{}", self.gateway)
        };
        let mut endpoint = Channel::from_shared(url.clone())
            .map_err(|e| ClientError::local(format!("gateway address {url:?}: {e}")))?;
        if url.starts_with("https://") {
            let tls = crate::tls::client_config(self.tls_ca.as_deref(), None)
                .map_err(|e| ClientError::local(e.to_string()))?;
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| ClientError::local(format!("TLS: {e}")))?;
        }
        let channel = endpoint
            .connect_timeout(Duration::from_secs(10))
            .connect()
            .await
            .map_err(|e| ClientError {
                exit: 5,
                message: format!("cannot reach the gateway at {url}: {e}; is it running? (PREFAB_GATEWAY)"),
            })?;
        Ok(channel)
    }

    fn request<T>(&self, msg: T) -> Result<Request<T>, ClientError> {
        let mut req = Request::new(msg);
        if let Some(token) = &self.token {
            let value = format!("Bearer {}", token.expose()).parse().map_err(|_| {
                ClientError::local("PREFAB_TOKEN contains characters not allowed in metadata")
            })?;
            req.metadata_mut().insert("authorization", value);
        }
        // A script that runs in a trace (TRACEPARENT, as OpenTelemetry's
        // environment carriers name it) has the call continue it.
        crate::telemetry::Remote::from_env()
            .passed_on()
            .inject(req.metadata_mut());
        Ok(req)
    }
}

/// Uploads a local file; returns its `FileRef`.
pub async fn put(conn: &Connection, path: &Path, render: &mut Render) -> Result<proto::FileRef, ClientError> {
    let mut client = conn.client().await?;
    put_with(conn, &mut client, path, render).await
}

async fn put_with(
    conn: &Connection,
    client: &mut GatewayClient<Channel>,
    path: &Path,
    render: &mut Render,
) -> Result<proto::FileRef, ClientError> {
    let local = |e: std::io::Error| ClientError::local(format!("{}: {e}", path.display()));
    // Looked at before opening: opening a FIFO would wait for a writer.
    if !tokio::fs::metadata(path).await.map_err(local)?.is_file() {
        return Err(ClientError::local(format!(
            "{}: not a regular file",
            path.display()
        )));
    }
    let mut file = tokio::fs::File::open(path).await.map_err(local)?;
    let size = file.metadata().await.map_err(local)?.len();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let label = format!("put {name}");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let header = proto::PutFileRequest {
        msg: Some(proto::put_file_request::Msg::Header(proto::PutFileHeader {
            file_name: name.clone(),
            size: Some(size),
        })),
    };
    tx.send(header).await.expect("receiver is alive");
    let call = client.put_file(conn.request(tokio_stream::wrappers::ReceiverStream::new(rx))?);
    let send = async {
        let mut sent = 0u64;
        loop {
            let mut buf = vec![0u8; PUT_CHUNK];
            let n = file.read(&mut buf).await.map_err(local)?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            sent += n as u64;
            let chunk = proto::PutFileRequest {
                msg: Some(proto::put_file_request::Msg::Chunk(buf.into())),
            };
            if tx.send(chunk).await.is_err() {
                break; // the call ended early; its status says why
            }
            render.bytes(&label, sent, size);
        }
        drop(tx);
        Ok::<_, ClientError>(())
    };
    let (sent, done) = tokio::join!(send, call);
    // A local read error ends the stream short, which the gateway refuses:
    // the local error is the one to tell.
    sent?;
    Ok(done?.into_inner())
}

/// Downloads an object to `dest` (`-` for standard output).
pub async fn get(conn: &Connection, url: &str, dest: &Path, render: &mut Render) -> Result<u64, ClientError> {
    let mut client = conn.client().await?;
    get_with(conn, &mut client, url, dest, render).await
}

async fn get_with(
    conn: &Connection,
    client: &mut GatewayClient<Channel>,
    url: &str,
    dest: &Path,
    render: &mut Render,
) -> Result<u64, ClientError> {
    let req = proto::GetFileRequest {
        url: url.to_owned(),
        offset: 0,
        length: 0,
    };
    let to_stdout = dest == Path::new("-");
    let part = dest.with_file_name(format!(
        ".{}.part",
        dest.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
    ));
    let local = |e: std::io::Error| ClientError::local(format!("{}: {e}", dest.display()));
    let label = format!("get {}", url.rsplit('/').next().unwrap_or(url));
    let transfer = async {
        let mut stream = client.get_file(conn.request(req)?).await?.into_inner();
        let mut out: Box<dyn tokio::io::AsyncWrite + Unpin + Send> = if to_stdout {
            Box::new(tokio::io::stdout())
        } else {
            Box::new(tokio::fs::File::create(&part).await.map_err(local)?)
        };
        let (mut received, mut total) = (0u64, 0u64);
        while let Some(chunk) = stream.message().await? {
            if chunk.offset != received {
                return Err(ClientError::local(format!(
                    "{url}: chunk at {} while expecting {received}",
                    chunk.offset
                )));
            }
            out.write_all(&chunk.data).await.map_err(local)?;
            received += chunk.data.len() as u64;
            total = chunk.object_size;
            render.bytes(&label, received, total);
        }
        out.flush().await.map_err(local)?;
        if received != total && total != 0 {
            return Err(ClientError {
                exit: 5,
                message: format!("{url}: stream ended at {received} of {total} bytes"),
            });
        }
        Ok(received)
    };
    // Ctrl-C stops the download and leaves no partial file (a signal
    // handler that cannot be installed leaves Ctrl-C as it was).
    let mut result = tokio::select! {
        result = transfer => result,
        Ok(()) = tokio::signal::ctrl_c() => Err(ClientError {
            exit: 130,
            message: format!("{url}: interrupted"),
        }),
    };
    if !to_stdout {
        if result.is_ok() {
            result = tokio::fs::rename(&part, dest).await.map_err(local).and(result);
        }
        if result.is_err() {
            let _ = tokio::fs::remove_file(&part).await;
        }
    }
    result
}

/// A `--input name=value` argument.
#[derive(Debug, Clone)]
pub struct Input {
    name: String,
    value: String,
}

impl std::str::FromStr for Input {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, value) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?} must look like name=value"))?;
        Ok(Self {
            name: name.to_owned(),
            value: value.to_owned(),
        })
    }
}

/// Settings of `prefab run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// The prefab, e.g. hello-world-prefab.
    #[arg(required_unless_present = "request")]
    pub prefab_id: Option<String>,
    /// The function, e.g. word_count.
    #[arg(required_unless_present = "request")]
    pub function: Option<String>,
    /// The prefab's version.
    #[arg(long, default_value = "1.0.0")]
    pub version: String,
    /// An input as name=value: an s3:// URL, a call:// reference, a local
    /// file (uploaded first), or a JSON value (a number, true/false, an
    /// object); anything else is a string.
    #[arg(long = "input", short = 'i', value_name = "NAME=VALUE")]
    pub inputs: Vec<Input>,
    /// Run the calls of this JSON request instead (`-` reads standard
    /// input): the RunRequest as grpcurl takes it, e.g. a pipeline
    /// {"calls": [{"prefabId": "p", "functionName": "f", "inputs": {…},
    /// "intermediate": ["output"]}, {… "inputs": {"text": "call://0/output"}}]}
    #[arg(long, value_name = "FILE", conflicts_with_all = ["prefab_id", "function", "inputs"])]
    pub request: Option<PathBuf>,
    /// Download the output files into this folder afterwards.
    #[arg(long, value_name = "DIR")]
    pub download: Option<PathBuf>,
    /// Keep the run going if this client disconnects (follow it again with
    /// the Watch RPC and the request id, e.g. through grpcurl); default: a
    /// disconnect cancels the run.
    #[arg(long)]
    pub detach: bool,
}

/// Runs a prefab function, or the calls of a request file; prints the last
/// call's outputs.
pub async fn run(conn: &Connection, args: &RunArgs, render: &mut Render) -> Result<(), ClientError> {
    let mut client = conn.client().await?;
    let mut req = match &args.request {
        Some(path) => read_request(path).await?,
        None => one_call(conn, &mut client, args, render).await?,
    };
    if args.detach {
        req.on_disconnect = proto::OnDisconnect::Detach as i32;
    }
    let stream = client
        .run(conn.request(req)?)
        .await
        .map_err(run_failed)?
        .into_inner();
    let (outputs, files) = follow(stream, render).await?;
    if let Some(dir) = &args.download {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| ClientError::local(format!("{}: {e}", dir.display())))?;
        for file in &files {
            let ext = file.url.rsplit_once('.').map(|(_, e)| e).unwrap_or("bin");
            let dest = dir.join(format!("{}.{ext}", file.parameter));
            get_with(conn, &mut client, &file.url, &dest, render).await?;
            render.note(&format!("downloaded {} to {}", file.parameter, dest.display()));
        }
    }
    print_outputs(render, &outputs);
    Ok(())
}

/// The request of `prefab run PREFAB FUNCTION -i …`, local files uploaded.
async fn one_call(
    conn: &Connection,
    client: &mut GatewayClient<Channel>,
    args: &RunArgs,
    render: &mut Render,
) -> Result<proto::RunRequest, ClientError> {
    let mut inputs = Map::new();
    for input in &args.inputs {
        let value = if input.value.starts_with("s3://") || input.value.starts_with("call://") {
            Value::String(input.value.clone())
        } else if Path::new(&input.value).is_file() {
            let stored = put_with(conn, client, Path::new(&input.value), render).await?;
            render.note(&format!("uploaded {} as {}", input.value, stored.url));
            Value::String(stored.url)
        } else {
            serde_json::from_str(&input.value).unwrap_or_else(|_| Value::String(input.value.clone()))
        };
        inputs.insert(input.name.clone(), value);
    }
    let call = proto::Call {
        prefab_id: args.prefab_id.clone().unwrap_or_default(),
        version: args.version.clone(),
        function_name: args.function.clone().unwrap_or_default(),
        inputs: Some(proto::json_to_struct(inputs)),
        intermediate: Vec::new(),
    };
    Ok(proto::RunRequest {
        calls: vec![call],
        ..Default::default()
    })
}

/// Reads a RunRequest written as JSON, as grpcurl takes it (field names in
/// lowerCamelCase or snake_case).
async fn read_request(path: &Path) -> Result<proto::RunRequest, ClientError> {
    let text = if path.as_os_str() == "-" {
        let mut text = String::new();
        tokio::io::stdin().read_to_string(&mut text).await.map(|_| text)
    } else {
        tokio::fs::read_to_string(path).await
    };
    let text = text.map_err(|e| ClientError::local(format!("{}: {e}", path.display())))?;
    let json: Value = serde_json::from_str(&text)
        .map_err(|e| ClientError::local(format!("{}: not JSON: {e}", path.display())))?;
    proto::run_request_from_json(&json).map_err(|e| ClientError::local(format!("{}: {e}", path.display())))
}

/// Follows a run another client started (or this one, detached) by its
/// request id, from the events after `after`; prints its outputs.
pub async fn watch(
    conn: &Connection,
    request_id: &str,
    after: u64,
    render: &mut Render,
) -> Result<(), ClientError> {
    let mut client = conn.client().await?;
    let req = proto::WatchRequest {
        request_id: request_id.to_owned(),
        after_sequence: after,
    };
    let stream = client
        .watch(conn.request(req)?)
        .await
        .map_err(run_failed)?
        .into_inner();
    let (outputs, _) = follow(stream, render).await?;
    print_outputs(render, &outputs);
    Ok(())
}

/// Prints the last call's outputs, unless the events went out as JSON.
fn print_outputs(render: &Render, outputs: &Value) {
    if !render.is_json() {
        println!("{}", serde_json::to_string_pretty(outputs).unwrap_or_default());
    }
}

/// Shows a run's events to its end: the last call's outputs and every
/// output file.
async fn follow(
    mut stream: tonic::Streaming<proto::RunEvent>,
    render: &mut Render,
) -> Result<(Value, Vec<proto::OutputUploaded>), ClientError> {
    let mut outputs = Value::Null;
    let mut files = Vec::new();
    let mut completed = false;
    while let Some(msg) = stream.message().await.map_err(run_failed)? {
        let Some(event) = msg.event else { continue };
        render.event(msg.call_index, &event);
        match event {
            Event::CallCompleted(c) => {
                outputs = c
                    .outputs
                    .map(|s| Value::Object(proto::struct_to_json(s)))
                    .unwrap_or_default();
                files.extend(c.files);
            }
            Event::RunCompleted(_) => completed = true,
            _ => {}
        }
    }
    render.finish();
    if !completed {
        return Err(ClientError {
            exit: 5,
            message: "the run stream ended without a result".into(),
        });
    }
    Ok((outputs, files))
}

/// Asks the gateway's health service; `Ok` when serving.
pub async fn health(conn: &Connection, service: &str, render: &Render) -> Result<(), ClientError> {
    let mut client = tonic_health::pb::health_client::HealthClient::new(conn.channel().await?);
    let resp = client
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?
        .into_inner();
    let status = resp.status().as_str_name();
    if render.is_json() {
        render.json_line(&json!({"service": service, "status": status}));
    } else {
        println!("{service}: {status}");
    }
    if resp.status() == tonic_health::pb::health_check_response::ServingStatus::Serving {
        Ok(())
    } else {
        Err(ClientError {
            exit: 5,
            message: format!("{service} is {status}"),
        })
    }
}
