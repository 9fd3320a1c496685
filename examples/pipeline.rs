//! A two-step pipeline on a big object against the same two steps as two
//! runs: `uppercase` then `sha256` of its output, once as one run (the
//! output handed to the second call on the workspace, `call://0/output`),
//! once as two runs (the second downloads what the first uploaded). Each
//! round runs both, in alternating order; prints one line per measure for
//! `benches/pipeline.sh`:
//!
//! ```text
//! pipeline-seconds 5.1
//! pipeline-sha256-seconds 1.1
//! separate-seconds 6.9
//! uppercase-seconds 4.0
//! sha256-seconds 2.9
//! ```
//!
//! `pipeline-sha256-seconds` is the pipeline's second call alone (from the
//! first call's completion to the end of the run), against
//! `sha256-seconds`, the same call as a run of its own, which downloads the
//! file first.
//!
//! cargo run --release --example pipeline -- ADDR BIG_URL ROUNDS

mod common;

use common::{Error, run_calls};
use prefab::proto::gateway_client::GatewayClient;
use tonic::transport::Channel;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, url, rounds] = args.as_slice() else {
        return Err("usage: pipeline ADDR BIG_URL ROUNDS".into());
    };
    let channel = Channel::from_shared(format!("http://{addr}"))?.connect().await?;
    let mut client = GatewayClient::new(channel);
    for round in 0..rounds.parse::<usize>()? {
        for pipeline in [round % 2 == 0, round % 2 == 1] {
            if pipeline {
                let calls = [
                    ("uppercase", "text", url.as_str()),
                    ("sha256", "file", "call://0/output"),
                ];
                let (took, completed) = run_calls(&mut client, &calls).await?;
                println!("pipeline-seconds {:.3}", took.as_secs_f64());
                println!(
                    "pipeline-sha256-seconds {:.3}",
                    (took - completed[0].0).as_secs_f64()
                );
            } else {
                let (upper, outputs) = run_calls(&mut client, &[("uppercase", "text", url.as_str())]).await?;
                let output = outputs[0].1["output"]
                    .as_str()
                    .ok_or("uppercase returned no output URL")?;
                let (hash, _) = run_calls(&mut client, &[("sha256", "file", output)]).await?;
                println!("separate-seconds {:.3}", (upper + hash).as_secs_f64());
                println!("uppercase-seconds {:.3}", upper.as_secs_f64());
                println!("sha256-seconds {:.3}", hash.as_secs_f64());
            }
        }
    }
    Ok(())
}
