//! `prefab dev`: the whole system in one process on loopback, with embedded
//! defaults: an S3-compatible store backed by a local folder, a workspace
//! folder beside it, the example prefab, any exec prefabs given as
//! manifests, and the gateway without authentication.

pub mod s3;

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{GatewayArgs, S3Args, Secret},
    prefabs::hello::{self, Hello},
    runtime::{RuntimeService, exec::ExecPrefab},
    server::BoxError,
};

/// Settings of `prefab dev`.
#[derive(Debug, Clone, clap::Args)]
pub struct DevArgs {
    /// Folder holding the S3 data and the workspaces; survives restarts.
    #[arg(long, default_value = ".prefab-dev")]
    pub data_dir: PathBuf,
    /// Address of the gateway.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub gateway_addr: SocketAddr,
    /// Address of the embedded S3 endpoint.
    #[arg(long, default_value = "127.0.0.1:9000")]
    pub s3_addr: SocketAddr,
    /// Address of the example prefab's runtime.
    #[arg(long, default_value = "127.0.0.1:50052")]
    pub prefab_addr: SocketAddr,
    /// Also serve the prefab described by this exec manifest (repeatable).
    #[arg(long = "prefab", value_name = "MANIFEST")]
    pub prefabs: Vec<PathBuf>,
    /// Also route prefab ID@VERSION to a runtime you run yourself, in any
    /// language, at URL (repeatable); it must use `<data-dir>/workspaces` as
    /// its workspace root.
    #[arg(long = "endpoint", value_name = "ID@VERSION=URL")]
    pub endpoints: Vec<String>,
}

/// The bucket `prefab dev` creates.
pub const BUCKET: &str = "prefab-outputs";
/// A sample object `prefab dev` stores so that examples work at once.
pub const SAMPLE_KEY: &str = "samples/hello.txt";

/// Runs everything until `shutdown` is cancelled.
pub async fn run(args: DevArgs, shutdown: CancellationToken) -> Result<(), BoxError> {
    for addr in [args.gateway_addr, args.s3_addr, args.prefab_addr] {
        if !addr.ip().is_loopback() {
            return Err(format!(
                "prefab dev serves without authentication, so it binds loopback only; {addr} is not"
            )
            .into());
        }
    }
    let s3_root = args.data_dir.join("s3");
    let workspace_root = args.data_dir.join("workspaces");
    tokio::fs::create_dir_all(&workspace_root).await?;
    let mut tasks = JoinSet::new();

    let (s3_addr, s3_task) = s3::spawn(&s3_root, &[BUCKET], args.s3_addr, shutdown.clone())
        .await
        .map_err(|e| format!("embedded S3 on {}: {e}", args.s3_addr))?;
    tasks.spawn(async move { s3_task.await.map_err(BoxError::from)? });
    let s3_args = S3Args {
        endpoint_url: Some(format!("http://{s3_addr}")),
        region: Some("us-east-1".into()),
        default_region: None,
        bucket: BUCKET.into(),
        force_path_style: Some(true),
        access_key_id: Some(Secret::new(s3::ACCESS_KEY)),
        secret_access_key: Some(Secret::new(s3::SECRET_KEY)),
        checksum: Default::default(),
        retry_seconds: 120,
    };
    seed_sample(&s3_args).await?;

    let mut endpoints = Vec::new();
    let mut prefabs = Vec::new();
    let hello = RuntimeService::new(Arc::new(Hello), workspace_root.clone())?;
    let listener = bind(args.prefab_addr, "the example prefab").await?;
    let addr = listener.local_addr()?;
    endpoints.push(format!("{}@{}=http://{addr}", hello::ID, hello::VERSION));
    prefabs.push(format!("{}@{} at http://{addr}", hello::ID, hello::VERSION));
    tasks.spawn(hello.serve(listener, shutdown.clone()));
    for path in &args.prefabs {
        let prefab = ExecPrefab::load(path).await?;
        let (id, version) = (prefab.id().to_owned(), prefab.version().to_owned());
        let listener = bind("127.0.0.1:0".parse()?, &id).await?;
        let addr = listener.local_addr()?;
        endpoints.push(format!("{id}@{version}=http://{addr}"));
        prefabs.push(format!("{id}@{version} at http://{addr} ({})", path.display()));
        let service = RuntimeService::new(Arc::new(prefab), workspace_root.clone())?;
        tasks.spawn(service.serve(listener, shutdown.clone()));
    }
    for endpoint in &args.endpoints {
        let (prefab, url) = endpoint.split_once('=').unwrap_or((endpoint, "?"));
        prefabs.push(format!("{prefab} at {url} (yours)"));
        endpoints.push(endpoint.clone());
    }

    let mut gateway = GatewayArgs::from_flags([
        "--no-auth",
        "--allowed-buckets=*",
        "--endpoint-template=",
        "--describe-ttl-seconds=5",
        "--shutdown-grace-seconds=10",
    ])?;
    gateway.addr = args.gateway_addr;
    gateway.workspace_root = workspace_root.clone();
    gateway.endpoints = endpoints;
    gateway.s3 = s3_args;
    let listener = bind(gateway.addr, "the gateway").await?;
    let gateway_addr = listener.local_addr()?;
    let stop = shutdown.clone();
    tasks.spawn(async move { crate::gateway::serve(&gateway, listener, stop).await });

    print_banner(&args, gateway_addr, s3_addr, &prefabs);
    // The first server to stop (on Ctrl-C, all of them) ends the session.
    let mut result = Ok(());
    while let Some(done) = tasks.join_next().await {
        let outcome = done.map_err(BoxError::from).and_then(|r| r);
        if let Err(e) = outcome {
            shutdown.cancel();
            result = result.and(Err(e));
        }
    }
    result
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, BoxError> {
    TcpListener::bind(addr).await.map_err(|e| {
        format!("cannot listen on {addr} for {what}: {e}; pick another address with its flag").into()
    })
}

async fn seed_sample(s3_args: &S3Args) -> Result<(), BoxError> {
    let client = crate::storage::connect(&s3_args.settings())?;
    let text = "hello prefab world\nthe gateway stages this file for every run\n";
    client
        .put_object()
        .bucket(BUCKET)
        .key(SAMPLE_KEY)
        .body(text.as_bytes().to_vec().into())
        .send()
        .await
        .map_err(|e| {
            format!(
                "cannot store the sample object: {}",
                crate::storage::error_chain(&e)
            )
        })?;
    Ok(())
}

fn print_banner(args: &DevArgs, gateway: SocketAddr, s3: SocketAddr, prefabs: &[String]) {
    let data = args.data_dir.display();
    let sample = format!("s3://{BUCKET}/{SAMPLE_KEY}");
    println!(
        "\
prefab dev is running (Ctrl-C stops it).

  gateway    {gateway}   (no auth, loopback only)
  S3         http://{s3}   bucket {BUCKET}, data in {data}/s3
             AWS_ACCESS_KEY_ID={ak} AWS_SECRET_ACCESS_KEY={sk} AWS_DEFAULT_REGION=us-east-1
  workspaces {data}/workspaces
  prefabs    {prefabs}

Try it:
  export PREFAB_GATEWAY=http://{gateway}
  prefab run hello-world-prefab word_count --version 1.0.0 --input text={sample}
  prefab put ./README.md
  prefab run hello-world-prefab uppercase --version 1.0.0 --input text=./README.md --download ./out
  grpcurl -plaintext -d '{{\"calls\":[{{\"prefabId\":\"hello-world-prefab\",\"version\":\"1.0.0\",\"functionName\":\"word_count\",\"inputs\":{{\"text\":\"{sample}\"}}}}]}}' {gateway} prefab.v1.Gateway/Run
  (without an installed prefab binary, use `cargo run --release --` in place of `prefab`)
",
        ak = s3::ACCESS_KEY,
        sk = s3::SECRET_KEY,
        prefabs = prefabs.join("\n             "),
    );
}
