//! A bounded load test on loopback: the embedded S3 store, the example
//! prefab and the gateway in this process (as `prefab dev` runs them), then
//! 200 concurrent small runs and 8 concurrent 256 MiB runs through the real
//! gRPC client. Prints runs/s, latency percentiles and peak RSS, and checks
//! every output and that nothing is left on the volume.
//!
//! cargo run --release --example loadtest [-- SMALL_RUNS BIG_RUNS BIG_MIB]

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use prefab::{
    config::{GatewayArgs, S3Args, Secret},
    dev,
    prefabs::hello::Hello,
    proto::{self, gateway_client::GatewayClient, run_event::Event},
    runtime::RuntimeService,
};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    prefab::storage::keep_freed_buffers();
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let small_runs = args.next().transpose()?.unwrap_or(200);
    let big_runs = args.next().transpose()?.unwrap_or(8);
    let big_mib = args.next().transpose()?.unwrap_or(256);

    let tmp = tempfile::tempdir()?;
    let shutdown = CancellationToken::new();
    let (s3_addr, _) = dev::s3::spawn(
        &tmp.path().join("s3"),
        &["prefab-outputs"],
        "127.0.0.1:0".parse()?,
        shutdown.clone(),
    )
    .await?;
    let s3_args = S3Args {
        endpoint_url: Some(format!("http://{s3_addr}")),
        region: Some("us-east-1".into()),
        default_region: None,
        bucket: "prefab-outputs".into(),
        force_path_style: Some(true),
        access_key_id: Some(Secret::new(dev::s3::ACCESS_KEY)),
        secret_access_key: Some(Secret::new(dev::s3::SECRET_KEY)),
        checksum: Default::default(),
        retry_seconds: 120,
    };
    let s3 = prefab::storage::connect(&s3_args.settings())?;
    let root = tmp.path().join("workspaces");
    let runtime = RuntimeService::new(Arc::new(Hello), root.clone())?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let runtime_addr = listener.local_addr()?;
    tokio::spawn(runtime.serve(listener, shutdown.clone()));
    let mut gateway = GatewayArgs::from_flags([
        "--no-auth",
        "--endpoint-template=",
        "--max-concurrent-runs=1000",
        &format!("--endpoints=hello-world-prefab@1.0.0=http://{runtime_addr}"),
    ])?;
    gateway.workspace_root = root.clone();
    gateway.s3 = s3_args;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let gateway_addr = listener.local_addr()?;
    let stop = shutdown.clone();
    tokio::spawn(async move { prefab::gateway::serve(&gateway, listener, stop).await });
    let channel = Channel::from_shared(format!("http://{gateway_addr}"))?
        .connect()
        .await?;
    let client = GatewayClient::new(channel);

    // Small runs: word_count of a small file, all at once.
    let small = b"the quick brown fox jumps over the lazy dog\n".repeat(20);
    put(&s3, "load/small.txt", small.clone()).await?;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..small_runs {
        let mut client = client.clone();
        tasks.spawn(async move {
            let t = Instant::now();
            let out = run(
                &mut client,
                "word_count",
                "text",
                "s3://prefab-outputs/load/small.txt",
            )
            .await;
            out.map(|o| (t.elapsed(), o))
        });
    }
    let mut latencies = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (latency, outputs) = done??;
        if outputs["words"] != serde_json::json!(180.0) {
            return Err(format!("wrong word count: {outputs:?}").into());
        }
        latencies.push(latency);
    }
    let wall = started.elapsed();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "small runs: {small_runs} concurrent word_count runs in {:.2} s = {:.1} runs/s; latency p50 {:.0} ms, p99 {:.0} ms",
        wall.as_secs_f64(),
        small_runs as f64 / wall.as_secs_f64(),
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
    );

    // Big runs: sha256 of distinct big objects, all at once.
    let mut expected = Vec::new();
    for i in 0..big_runs {
        let mut data = vec![0u8; big_mib << 20];
        for (n, chunk) in data.chunks_mut(1 << 20).enumerate() {
            chunk[..8].copy_from_slice(&(n as u64).to_le_bytes());
            chunk[8] = i as u8;
        }
        expected.push(hex::encode(Sha256::digest(&data)));
        put(&s3, &format!("load/big-{i}.bin"), data).await?;
    }
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..big_runs {
        let mut client = client.clone();
        tasks.spawn(async move {
            let url = format!("s3://prefab-outputs/load/big-{i}.bin");
            run(&mut client, "sha256", "file", &url).await.map(|o| (i, o))
        });
    }
    while let Some(done) = tasks.join_next().await {
        let (i, outputs) = done??;
        if outputs["sha256"] != serde_json::json!(expected[i]) {
            return Err(format!("wrong sha256 for big-{i}").into());
        }
    }
    let wall = started.elapsed();
    let total = (big_runs * big_mib) as f64 * 1.048576;
    println!(
        "big runs: {big_runs} concurrent sha256 runs of {big_mib} MiB in {:.2} s = {:.0} MB/s staged",
        wall.as_secs_f64(),
        total / wall.as_secs_f64()
    );

    for _ in 0..100 {
        if std::fs::read_dir(&root)?.next().is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = std::fs::read_dir(&root)?.count();
    println!("workspaces left on the volume: {left}");
    let status = std::fs::read_to_string("/proc/self/status")?;
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .unwrap_or_default();
    println!("peak RSS of this process (store + runtime + gateway + test data): {hwm}");
    shutdown.cancel();
    if left != 0 {
        return Err("workspaces were left behind".into());
    }
    Ok(())
}

async fn put(s3: &aws_sdk_s3::Client, key: &str, data: Vec<u8>) -> Result<(), Error> {
    s3.put_object()
        .bucket("prefab-outputs")
        .key(key)
        .body(data.into())
        .send()
        .await?;
    Ok(())
}

async fn run(
    client: &mut GatewayClient<Channel>,
    function: &str,
    param: &str,
    url: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, Error> {
    let req = proto::RunRequest {
        calls: vec![proto::Call {
            prefab_id: "hello-world-prefab".into(),
            version: "1.0.0".into(),
            function_name: function.into(),
            inputs: Some(proto::json_to_struct(
                serde_json::json!({ param: url })
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
            )),
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut stream = client.run(req).await?.into_inner();
    let mut outputs = None;
    while let Some(msg) = stream.message().await? {
        if let Some(Event::CallCompleted(c)) = msg.event {
            outputs = c.outputs.map(proto::struct_to_json);
        }
    }
    outputs.ok_or_else(|| "no outputs".into())
}
