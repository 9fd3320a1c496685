//! What the benchmark examples share: one Run of the example prefab, timed.

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
    let inputs = serde_json::json!({ param: url });
    let serde_json::Value::Object(inputs) = inputs else {
        unreachable!("an object literal")
    };
    let request = proto::RunRequest {
        calls: vec![proto::Call {
            prefab_id: "hello-world-prefab".into(),
            version: "1.0.0".into(),
            function_name: function.into(),
            inputs: Some(proto::json_to_struct(inputs)),
            ..Default::default()
        }],
        ..Default::default()
    };
    let started = Instant::now();
    let mut stream = client.run(request).await?.into_inner();
    let mut completed = false;
    while let Some(event) = stream.message().await? {
        completed |= matches!(event.event, Some(Event::RunCompleted(_)));
    }
    if !completed {
        return Err(format!("{function} on {url} ended without completing").into());
    }
    Ok(started.elapsed())
}
