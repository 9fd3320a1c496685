//! What the benchmark examples share: one Run of the example prefab, timed.

// Each example uses part of it.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use prefab::proto::{self, gateway_client::GatewayClient, run_event::Event};
use tonic::transport::Channel;

/// Any error, sent between tasks.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Runs `function` of the example prefab on `url` and returns how long the
/// whole stream took; fails unless the run completed.
pub async fn run(
    client: &mut GatewayClient<Channel>,
    function: &str,
    param: &str,
    url: &str,
) -> Result<Duration, Error> {
    Ok(run_calls(client, &[(function, param, url)]).await?.0)
}

/// A run's calls as they completed: when (from the request) and with what
/// outputs.
pub type Completed = Vec<(Duration, serde_json::Map<String, serde_json::Value>)>;

/// Runs the calls `(function, parameter, value)` of the example prefab as
/// one run; returns how long the whole stream took and each call's
/// completion. Fails unless the run completed.
pub async fn run_calls(
    client: &mut GatewayClient<Channel>,
    calls: &[(&str, &str, &str)],
) -> Result<(Duration, Completed), Error> {
    let functions: Vec<&str> = calls.iter().map(|(function, ..)| *function).collect();
    let calls = calls
        .iter()
        .map(|(function, param, value)| {
            let mut inputs = serde_json::Map::new();
            inputs.insert((*param).into(), (*value).into());
            proto::Call {
                prefab_id: "hello-world-prefab".into(),
                version: "1.0.0".into(),
                function_name: (*function).into(),
                inputs: Some(proto::json_to_struct(inputs)),
                ..Default::default()
            }
        })
        .collect();
    let request = proto::RunRequest {
        calls,
        ..Default::default()
    };
    let started = Instant::now();
    let mut stream = client.run(request).await?.into_inner();
    let (mut completed, mut outputs) = (false, Vec::new());
    while let Some(event) = stream.message().await? {
        match event.event {
            Some(Event::RunCompleted(_)) => completed = true,
            Some(Event::CallCompleted(c)) => outputs.push((
                started.elapsed(),
                proto::struct_to_json(c.outputs.unwrap_or_default()),
            )),
            _ => {}
        }
    }
    if !completed {
        return Err(format!("the run of {functions:?} ended without completing").into());
    }
    Ok((started.elapsed(), outputs))
}
