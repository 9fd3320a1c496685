//! Small calls against their floor: what a 1 KiB `word_count` costs through
//! the gateway, and what its two unavoidable parts cost alone, in the same
//! run: one GET of the input from the store (what staging a small input
//! needs) and one `Invoke` on the runtime directly, on a workspace staged
//! beforehand. Then runs per second at CONCURRENCY clients. Prints one line
//! per measure for `benches/smallcalls.sh`:
//!
//! ```text
//! floor-get-p50-ms 0.9
//! floor-invoke-p50-ms 0.5
//! floor-p50-ms 1.4
//! run-p50-ms 3.9
//! run-p99-ms 6.0
//! runs-per-second 412
//! ```
//!
//! cargo run --release --example smallcalls -- GATEWAY RUNTIME WORKSPACE_ROOT S3_ENDPOINT SMALL_URL RUNS CONCURRENCY
//! (S3 credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)

mod common;

use std::time::{Duration, Instant};

use common::{Error, run};
use prefab::{
    config::Secret,
    proto::{self, gateway_client::GatewayClient, prefab_runtime_client::PrefabRuntimeClient},
    workspace::RequestId,
};
use tonic::transport::Channel;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [gateway_addr, runtime_addr, root, endpoint, url, runs, concurrency] = args.as_slice() else {
        return Err(
            "usage: smallcalls GATEWAY RUNTIME WORKSPACE_ROOT S3_ENDPOINT SMALL_URL RUNS CONCURRENCY".into(),
        );
    };
    let (runs, concurrency): (usize, usize) = (runs.parse()?, concurrency.parse()?);
    let (bucket, key) = url
        .strip_prefix("s3://")
        .and_then(|rest| rest.split_once('/'))
        .ok_or("SMALL_URL must be s3://bucket/key")?;
    let env = |name: &str| std::env::var(name).map_err(|_| format!("{name} is not set"));
    let s3 = prefab::storage::connect(&prefab::storage::Settings {
        endpoint_url: Some(endpoint.clone()),
        region: "us-east-1".into(),
        path_style: true,
        access_key_id: Some(Secret::new(env("AWS_ACCESS_KEY_ID")?)),
        secret_access_key: Some(Secret::new(env("AWS_SECRET_ACCESS_KEY")?)),
        retry_budget: std::time::Duration::ZERO,
        checksum: Default::default(),
    })?;
    let mut runtime = PrefabRuntimeClient::new(connect(runtime_addr).await?);
    let mut gateway = GatewayClient::new(connect(gateway_addr).await?);

    // The floor's workspace, staged once, as the gateway would.
    let text = get(&s3, bucket, key).await?;
    let id = RequestId::new();
    let inputs = std::path::Path::new(root).join(id.to_string()).join("inputs/0");
    tokio::fs::create_dir_all(&inputs).await?;
    tokio::fs::write(inputs.join("text.txt"), &text).await?;

    let (mut gets, mut invokes, mut floor, mut latencies) = (vec![], vec![], vec![], vec![]);
    // Unmeasured rounds first: connections, the manifest cache.
    for round in 0..runs + 5 {
        let started = Instant::now();
        get(&s3, bucket, key).await?;
        let got = started.elapsed();
        let started = Instant::now();
        invoke(&mut runtime, id).await?;
        let invoked = started.elapsed();
        let ran = run(&mut gateway, "word_count", "text", url).await?;
        if round >= 5 {
            gets.push(got);
            invokes.push(invoked);
            floor.push(got + invoked);
            latencies.push(ran);
        }
    }
    tokio::fs::remove_dir_all(std::path::Path::new(root).join(id.to_string())).await?;
    println!("floor-get-p50-ms {:.2}", ms(percentile(&mut gets, 0.5)));
    println!("floor-invoke-p50-ms {:.2}", ms(percentile(&mut invokes, 0.5)));
    println!("floor-p50-ms {:.2}", ms(percentile(&mut floor, 0.5)));
    println!("run-p50-ms {:.2}", ms(percentile(&mut latencies, 0.5)));
    println!("run-p99-ms {:.2}", ms(percentile(&mut latencies, 0.99)));

    // Runs per second at `concurrency` clients, each on its own connection.
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let mut client = GatewayClient::new(connect(gateway_addr).await?);
        let url = url.clone();
        clients.spawn(async move {
            for _ in 0..runs.div_ceil(concurrency) {
                run(&mut client, "word_count", "text", &url).await?;
            }
            Ok::<_, Error>(())
        });
    }
    while let Some(done) = clients.join_next().await {
        done??;
    }
    let total = runs.div_ceil(concurrency) * concurrency;
    println!(
        "runs-per-second {:.0}",
        total as f64 / started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn connect(addr: &str) -> Result<Channel, Error> {
    Ok(Channel::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await?)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)]
}

/// The whole object, with the gateway's own store client.
async fn get(s3: &prefab::storage::Storage, bucket: &str, key: &str) -> Result<Vec<u8>, Error> {
    let object = s3.get_object().bucket(bucket).key(key).send().await?;
    Ok(object.body.collect().await?.to_vec())
}

/// `word_count` on the staged workspace, directly on the runtime.
async fn invoke(runtime: &mut PrefabRuntimeClient<Channel>, id: RequestId) -> Result<(), Error> {
    let arguments = serde_json::json!({ "text": "inputs/0/text.txt" });
    let serde_json::Value::Object(arguments) = arguments else {
        unreachable!("an object literal")
    };
    let request = proto::InvokeRequest {
        workspace: id.to_string(),
        function_name: "word_count".into(),
        arguments: Some(proto::json_to_struct(arguments)),
        ..Default::default()
    };
    let mut stream = runtime.invoke(request).await?.into_inner();
    let mut result = false;
    while let Some(event) = stream.message().await? {
        result |= matches!(event.event, Some(proto::invoke_event::Event::Result(_)));
    }
    if !result {
        return Err("Invoke ended without a result".into());
    }
    Ok(())
}
