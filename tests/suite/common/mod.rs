//! A test harness that starts the real parts on ephemeral loopback ports in
//! a temporary folder: the embedded S3 store, the example prefab runtime
//! and the gateway, talking to each other over real sockets.

#![allow(dead_code)]

pub mod proxy;
pub mod relay;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, atomic::AtomicUsize},
    time::Duration,
};

use prefab::{
    config::{GatewayArgs, S3Args, Secret},
    dev,
    prefabs::hello::Hello,
    proto::{self, gateway_client::GatewayClient, run_event::Event},
    runtime::{RuntimeService, exec::ExecPrefab},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status, transport::Channel};

pub const BUCKET: &str = "prefab-outputs";
pub const INPUT_BUCKET: &str = "inputs";
pub const TOKEN: &str = "test-token-5f2c9e";

/// The CRC-64/NVME of `data` in S3's form (base64 of the big-endian bytes),
/// computed independently of the gateway's code.
pub fn crc64nvme(data: &[u8]) -> String {
    let crc = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Nvme, data);
    aws_smithy_types::base64::encode(crc.to_be_bytes())
}

/// A CRC-32 (`castagnoli` for CRC-32C) of `data` in S3's form (base64 of
/// the four big-endian bytes), computed independently of the gateway's code.
pub fn crc32(data: &[u8], castagnoli: bool) -> String {
    let algorithm = match castagnoli {
        true => crc_fast::CrcAlgorithm::Crc32Iscsi,
        false => crc_fast::CrcAlgorithm::Crc32IsoHdlc,
    };
    let crc = crc_fast::checksum(algorithm, data) as u32;
    aws_smithy_types::base64::encode(crc.to_be_bytes())
}

/// Reads an object by URL through `s3`.
pub async fn get_object(s3: &aws_sdk_s3::Client, url: &str) -> Vec<u8> {
    let url = prefab::storage::S3Url::parse(url).expect("an s3 URL");
    let out = s3
        .get_object()
        .bucket(url.bucket())
        .key(url.key())
        .send()
        .await
        .expect("get object");
    out.body.collect().await.expect("read body").into_bytes().to_vec()
}

/// The CRC-64/NVME the store behind `s3` keeps for an object, as it
/// reports it.
pub async fn stored_checksum(s3: &aws_sdk_s3::Client, url: &str) -> Option<String> {
    let url = prefab::storage::S3Url::parse(url).expect("an s3 URL");
    let out = s3
        .head_object()
        .bucket(url.bucket())
        .key(url.key())
        .checksum_mode(aws_sdk_s3::types::ChecksumMode::Enabled)
        .send()
        .await
        .expect("head object");
    out.checksum_crc64_nvme
}

/// The S3 settings of the embedded store at `endpoint`.
pub fn s3_args(endpoint: &str) -> S3Args {
    S3Args {
        endpoint_url: Some(endpoint.to_owned()),
        region: Some("us-east-1".into()),
        default_region: None,
        bucket: BUCKET.into(),
        force_path_style: Some(true),
        access_key_id: Some(Secret::new(dev::s3::ACCESS_KEY)),
        secret_access_key: Some(Secret::new(dev::s3::SECRET_KEY)),
        checksum: Default::default(),
        retry_seconds: 120,
    }
}

/// Everything a test talks to.
pub struct Stack {
    pub tmp: tempfile::TempDir,
    pub s3_endpoint: String,
    pub s3: prefab::storage::Storage,
    pub workspace_root: PathBuf,
    pub runtime_addr: SocketAddr,
    pub runtime_active: Arc<AtomicUsize>,
    /// Every runtime, as `--endpoints` names them.
    pub endpoints: String,
    pub gateway_addr: SocketAddr,
    shutdown: CancellationToken,
}

impl Stack {
    /// Starts everything with default settings.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts everything; `extra` are additional `prefab gateway` flags.
    pub async fn start_with(extra: &[&str]) -> Self {
        Self::start_full(extra, &[]).await
    }

    /// Starts everything plus one exec runtime per manifest text.
    pub async fn start_full(extra: &[&str], exec_manifests: &[&str]) -> Self {
        let tmp = tempfile::tempdir().expect("temp dir");
        let shutdown = CancellationToken::new();
        let (s3_addr, _) = dev::s3::spawn(
            &tmp.path().join("s3"),
            &[BUCKET, INPUT_BUCKET],
            "127.0.0.1:0".parse().unwrap(),
            shutdown.clone(),
        )
        .await
        .expect("embedded S3 starts");
        let s3_endpoint = format!("http://{s3_addr}");
        let workspace_root = tmp.path().join("workspaces");
        std::fs::create_dir_all(&workspace_root).unwrap();

        let runtime = RuntimeService::new(Arc::new(Hello), workspace_root.clone()).expect("runtime");
        let runtime_active = runtime.active();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let runtime_addr = listener.local_addr().unwrap();
        tokio::spawn(runtime.serve(listener, shutdown.clone()));

        let tokens = tmp.path().join("tokens");
        std::fs::write(&tokens, format!("# test tokens\n{TOKEN}\n")).unwrap();
        let mut endpoints = format!("hello-world-prefab@1.0.0=http://{runtime_addr}");
        for text in exec_manifests {
            let prefab = ExecPrefab::parse(text).expect("test manifest is valid");
            let name = format!("{}@{}", prefab.id(), prefab.version());
            let service =
                RuntimeService::new(Arc::new(prefab), workspace_root.clone()).expect("exec runtime");
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            endpoints.push_str(&format!(",{name}=http://{}", listener.local_addr().unwrap()));
            tokio::spawn(service.serve(listener, shutdown.clone()));
        }
        let mut argv = vec![
            "--addr=127.0.0.1:0".to_owned(),
            format!("--workspace-root={}", workspace_root.display()),
            format!("--auth-tokens-file={}", tokens.display()),
            format!("--endpoints={endpoints}"),
            "--endpoint-template=".into(),
            format!("--allowed-buckets={INPUT_BUCKET},{BUCKET}"),
            format!("--s3-endpoint-url={s3_endpoint}"),
            "--s3-region=us-east-1".into(),
            format!("--s3-bucket={BUCKET}"),
            format!("--aws-access-key-id={}", dev::s3::ACCESS_KEY),
            format!("--aws-secret-access-key={}", dev::s3::SECRET_KEY),
        ];
        argv.extend(extra.iter().map(|s| s.to_string()));
        let args = GatewayArgs::from_flags(argv).expect("valid gateway flags");
        let listener = TcpListener::bind(args.addr).await.unwrap();
        let gateway_addr = listener.local_addr().unwrap();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = prefab::gateway::serve(&args, listener, stop).await {
                panic!("gateway failed: {e}");
            }
        });
        let s3 = prefab::storage::connect(&s3_args(&s3_endpoint).settings()).unwrap();
        Self {
            tmp,
            s3_endpoint,
            s3,
            workspace_root,
            runtime_addr,
            runtime_active,
            endpoints,
            gateway_addr,
            shutdown,
        }
    }

    /// A client of the gateway (requests need [`authed`]).
    pub async fn client(&self) -> GatewayClient<Channel> {
        connect(self.gateway_addr).await
    }

    /// Stores `data` at `s3://inputs/<key>` and returns the URL.
    pub async fn put_input(&self, key: &str, data: Vec<u8>) -> String {
        self.s3
            .put_object()
            .bucket(INPUT_BUCKET)
            .key(key)
            .body(data.into())
            .send()
            .await
            .expect("put input");
        format!("s3://{INPUT_BUCKET}/{key}")
    }

    /// Reads an object back by URL.
    pub async fn get(&self, url: &str) -> Vec<u8> {
        get_object(&self.s3, url).await
    }

    /// The CRC-64/NVME the store keeps for an object, as it reports it.
    pub async fn stored_checksum(&self, url: &str) -> Option<String> {
        stored_checksum(&self.s3, url).await
    }

    /// The folders currently under the workspace root.
    pub fn workspaces(&self) -> Vec<PathBuf> {
        list(&self.workspace_root)
    }

    /// Waits (up to 10 s) until no workspace is left and no function runs.
    pub async fn wait_idle(&self) {
        let active = Arc::clone(&self.runtime_active);
        let root = self.workspace_root.clone();
        let idle = || list(&root).is_empty() && active.load(std::sync::atomic::Ordering::SeqCst) == 0;
        for _ in 0..500 {
            if idle() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "still busy after 10 s: workspaces {:?}, functions running {}",
            list(&root),
            active.load(std::sync::atomic::Ordering::SeqCst)
        );
    }
}

impl Stack {
    /// Starts the real `prefab gateway` binary as a child process (no auth)
    /// against this stack's store, runtimes and workspace root.
    pub async fn gateway_process(&self) -> (tokio::process::Child, GatewayClient<Channel>) {
        self.gateway_process_with(&[], None).await
    }

    /// Like [`Stack::gateway_process`], with extra flags and its log
    /// (at info level) written to `log`.
    pub async fn gateway_process_with(
        &self,
        extra: &[&str],
        log: Option<&Path>,
    ) -> (tokio::process::Child, GatewayClient<Channel>) {
        self.gateway_process_via(&self.s3_endpoint, extra, log).await
    }

    /// Like [`Stack::gateway_process_with`], reaching S3 at `s3_endpoint`
    /// (e.g. through a fault-injecting proxy). A child that exits before it
    /// listens (its port was taken after it was picked) is started again on
    /// another port, up to three times.
    pub async fn gateway_process_via(
        &self,
        s3_endpoint: &str,
        extra: &[&str],
        log: Option<&Path>,
    ) -> (tokio::process::Child, GatewayClient<Channel>) {
        for _ in 0..3 {
            let port = free_port();
            let stderr = match log {
                Some(path) => std::process::Stdio::from(std::fs::File::create(path).unwrap()),
                None => std::process::Stdio::inherit(),
            };
            let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_prefab"))
                .arg("gateway")
                .stderr(stderr)
                .arg(format!("--addr=127.0.0.1:{port}"))
                .arg("--no-auth")
                .arg(format!("--workspace-root={}", self.workspace_root.display()))
                .arg(format!("--endpoints={}", self.endpoints))
                .arg("--endpoint-template=")
                .arg(format!("--allowed-buckets={INPUT_BUCKET}"))
                .arg(format!("--s3-endpoint-url={s3_endpoint}"))
                .args(extra)
                .env("AWS_ACCESS_KEY_ID", dev::s3::ACCESS_KEY)
                .env("AWS_SECRET_ACCESS_KEY", dev::s3::SECRET_KEY)
                .env("RUST_LOG", if log.is_some() { "info" } else { "warn" })
                .kill_on_drop(true)
                .spawn()
                .expect("start the gateway binary");
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            for _ in 0..500 {
                if let Ok(ch) = Channel::from_shared(format!("http://{addr}"))
                    .unwrap()
                    .connect()
                    .await
                {
                    return (child, GatewayClient::new(ch).max_decoding_message_size(8 << 20));
                }
                if child.try_wait().is_ok_and(|status| status.is_some()) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if child.try_wait().is_ok_and(|status| status.is_none()) {
                panic!("the gateway child never listened on {addr}");
            }
        }
        panic!("the gateway child exited before listening, three times");
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Peak resident memory of a process, from /proc.
pub fn peak_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// Files in the store's folder that hold multipart upload state.
pub fn open_multipart_uploads(stack: &Stack) -> Vec<PathBuf> {
    list(&stack.tmp.path().join("s3"))
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains("upload"))
        })
        .collect()
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The entries of `dir`, but for the gateways' run records
/// (`.runs`, kept beside the workspaces for `Watch`).
pub fn list(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| !p.ends_with(prefab::workspace::record::RUNS_DIR))
                .collect()
        })
        .unwrap_or_default()
}

/// Polls `cond` every 20 ms for up to 10 s.
pub async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

pub async fn connect(addr: SocketAddr) -> GatewayClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to gateway");
    GatewayClient::new(channel).max_decoding_message_size(8 << 20)
}

/// Wraps a message with the test token.
pub fn authed<T>(msg: T) -> Request<T> {
    authed_as(TOKEN, msg)
}

/// Wraps a message with `token`.
pub fn authed_as<T>(token: &str, msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

/// A one-call run request of the example prefab.
pub fn run_request(function: &str, inputs: serde_json::Value) -> proto::RunRequest {
    call_request("hello-world-prefab", function, inputs)
}

/// A one-call run request of `prefab@1.0.0`.
pub fn call_request(prefab: &str, function: &str, inputs: serde_json::Value) -> proto::RunRequest {
    request(vec![call(prefab, function, inputs)])
}

/// A call of `prefab@1.0.0`.
pub fn call(prefab: &str, function: &str, inputs: serde_json::Value) -> proto::Call {
    let serde_json::Value::Object(map) = inputs else {
        panic!("inputs must be an object")
    };
    proto::Call {
        prefab_id: prefab.into(),
        version: "1.0.0".into(),
        function_name: function.into(),
        inputs: Some(proto::json_to_struct(map)),
        ..Default::default()
    }
}

/// A run request of `calls`, in order.
pub fn request(calls: Vec<proto::Call>) -> proto::RunRequest {
    proto::RunRequest {
        calls,
        ..Default::default()
    }
}

/// The outputs of each completed call, in order.
pub fn outputs(events: &[Event]) -> Vec<serde_json::Map<String, serde_json::Value>> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::CallCompleted(c) => Some(proto::struct_to_json(c.outputs.clone().unwrap_or_default())),
            _ => None,
        })
        .collect()
}

/// The URL an output file was uploaded to.
pub fn url_of(outputs: &serde_json::Map<String, serde_json::Value>, name: &str) -> String {
    outputs[name].as_str().expect("an output URL").to_owned()
}

/// Stops a `prefab` server process as Kubernetes does, with SIGTERM, and
/// waits (up to 10 s) for it to finish its work (a gateway: the removal of
/// finished runs' workspaces) and exit.
pub async fn stop(child: &mut tokio::process::Child) {
    let pid = rustix::process::Pid::from_raw(child.id().expect("the process runs") as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
        Ok(status) => assert!(status.unwrap().success(), "the process failed to stop cleanly"),
        Err(_) => {
            let _ = child.kill().await;
            panic!("the process did not stop within 10 s of SIGTERM");
        }
    }
}

/// Starts a server process on a free loopback port and waits until it
/// listens: `command` builds it for the address (`--addr`); if it exits
/// first (another test took the port meanwhile), it is tried again on
/// another port. `log` is where its standard error goes, shown if it
/// never listens.
pub async fn start_listening(
    mut command: impl FnMut(SocketAddr) -> tokio::process::Command,
    log: &Path,
) -> (tokio::process::Child, SocketAddr) {
    for _ in 0..3 {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = command(addr);
        cmd.stderr(std::fs::File::create(log).unwrap()).kill_on_drop(true);
        let mut child = cmd.spawn().expect("start the process");
        for _ in 0..500 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return (child, addr);
            }
            if child.try_wait().unwrap().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill().await;
    }
    let output = std::fs::read_to_string(log).unwrap_or_default();
    panic!("the process never listened; {}: {output}", log.display());
}

/// The outputs of the first completed call.
pub fn call_outputs(events: &[Event]) -> serde_json::Map<String, serde_json::Value> {
    events
        .iter()
        .find_map(|e| match e {
            Event::CallCompleted(c) => Some(proto::struct_to_json(c.outputs.clone().unwrap_or_default())),
            _ => None,
        })
        .expect("a call completed")
}

/// Runs to the end and returns every event, or the status that ended it.
pub async fn run_to_end(
    client: &mut GatewayClient<Channel>,
    req: proto::RunRequest,
) -> Result<Vec<Event>, Status> {
    let events = run_events(client, req).await?;
    Ok(events
        .into_iter()
        .map(|e| e.event.expect("every event has a body"))
        .collect())
}

/// [`run_to_end`], keeping each event's call index and sequence number.
pub async fn run_events(
    client: &mut GatewayClient<Channel>,
    req: proto::RunRequest,
) -> Result<Vec<proto::RunEvent>, Status> {
    let mut stream = client.run(authed(req)).await?.into_inner();
    let mut events = Vec::new();
    while let Some(msg) = stream.message().await? {
        events.push(msg);
    }
    Ok(events)
}

/// Pseudo-random printable text of `len` bytes, with words and lines.
pub fn text(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            match (state >> 33) % 16 {
                0 => b' ',
                1 => b'\n',
                n => b'a' + ((n * 7 + (state >> 50)) % 26) as u8,
            }
        })
        .collect()
}

/// Starts `req` and reads its stream until the function reports progress,
/// so that the caller knows the runtime is at work.
pub async fn start_until_running(
    client: &mut GatewayClient<Channel>,
    req: Request<proto::RunRequest>,
) -> tonic::Streaming<proto::RunEvent> {
    let mut stream = client.run(req).await.expect("run accepted").into_inner();
    loop {
        let msg = stream.message().await.expect("stream ok").expect("stream open");
        if matches!(msg.event, Some(Event::RuntimeProgress(_))) {
            return stream;
        }
    }
}

/// `mib` MiB of text made of 1 MiB blocks that all differ (each starts with
/// its index), cheap to build for big inputs.
pub fn big_text(mib: usize, seed: u64) -> Vec<u8> {
    let block = text(1 << 20, seed);
    let mut data = Vec::with_capacity(mib << 20);
    for i in 0..mib as u64 {
        data.extend_from_slice(&i.to_le_bytes());
        data.extend_from_slice(&block[8..]);
    }
    data
}

/// Puts objects of each size under `prefix` in `bucket`, probes them and
/// downloads what the probe found: the body comes with the probe exactly
/// when `whole` says, and every download is byte-identical with the right
/// CRC-64/NVME.
pub async fn check_probe_sizes(
    s3: &prefab::storage::Storage,
    bucket: &str,
    prefix: &str,
    cases: &[(usize, bool)],
) {
    use prefab::storage;
    for &(size, whole) in cases {
        let data = text(size, size as u64);
        let key = format!("{prefix}{size}.bin");
        let put = s3.put_object().bucket(bucket).key(&key);
        put.body(data.clone().into()).send().await.expect("put input");
        let url = storage::S3Url::parse(&format!("s3://{bucket}/{key}")).unwrap();
        let probed = storage::probe(s3, &url).await.unwrap();
        assert_eq!(probed.info.size, size as u64, "{size} bytes");
        assert_eq!(probed.body.is_some(), whole, "{size} bytes");
        let out = tempfile::tempfile().unwrap();
        let completed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&completed);
        let complete = Box::new(move || {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        });
        let done = storage::download_probed(
            s3,
            &url,
            &probed,
            out.try_clone().unwrap(),
            &mut |_| {},
            Some(complete),
        )
        .await
        .unwrap_or_else(|e| panic!("{size} bytes: {e}"));
        assert!(
            completed.load(std::sync::atomic::Ordering::SeqCst),
            "{size} bytes: not completed"
        );
        assert_eq!(done.checksum(), crc64nvme(&data), "{size} bytes");
        let mut written = Vec::new();
        std::io::Read::read_to_end(&mut &out, &mut written).unwrap();
        assert!(written == data, "{size} bytes: the file differs");
    }
}
