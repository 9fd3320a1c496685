//! Run-level timings against a running gateway (any version that speaks
//! `prefab.v1`): sequential small `word_count` runs, then `sha256` runs of a
//! big object, each timed from the request to the end of its stream. Prints
//! one line per measure for `benches/runs.sh`:
//!
//! ```text
//! small-p50-ms 3.1
//! small-p99-ms 4.0
//! big-seconds 2.91
//! ```
//!
//! cargo run --release --example runbench -- ADDR SMALL_URL SMALL_RUNS BIG_URL BIG_RUNS

mod common;

use common::{Error, run};
use prefab::proto::gateway_client::GatewayClient;
use tonic::transport::Channel;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, small_url, small_runs, big_url, big_runs] = args.as_slice() else {
        return Err("usage: runbench ADDR SMALL_URL SMALL_RUNS BIG_URL BIG_RUNS".into());
    };
    let channel = Channel::from_shared(format!("http://{addr}"))?.connect().await?;
    let mut client = GatewayClient::new(channel);

    // A few unmeasured runs first: connections, the manifest cache.
    for _ in 0..5 {
        run(&mut client, "word_count", "text", small_url).await?;
    }
    let mut latencies = Vec::new();
    for _ in 0..small_runs.parse::<usize>()? {
        latencies.push(run(&mut client, "word_count", "text", small_url).await?);
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!("small-p50-ms {:.2}", pct(0.50).as_secs_f64() * 1e3);
    println!("small-p99-ms {:.2}", pct(0.99).as_secs_f64() * 1e3);
    for _ in 0..big_runs.parse::<usize>()? {
        let took = run(&mut client, "sha256", "file", big_url).await?;
        println!("big-seconds {:.3}", took.as_secs_f64());
    }
    Ok(())
}
