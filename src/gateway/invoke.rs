//! Invoking a prefab's runtime with a workspace handle and relaying its
//! progress and log lines. Dropping the future drops the gRPC stream, which
//! cancels the function on the runtime's side.

use std::collections::HashMap;

use prost::Message as _;
use serde_json::{Map, Value};
use tonic::Code;

use super::{GatewayError, events::Events, plan::CallPlan};
use crate::{
    config::Redactor,
    proto::{self, invoke_event, run_event::Event},
    telemetry,
    workspace::RequestId,
};

/// Runs the call's function and returns its raw outputs.
pub async fn invoke(
    plan: &CallPlan,
    id: RequestId,
    events: &Events,
    secrets: HashMap<String, String>,
    budget: Option<std::time::Duration>,
    trace: &telemetry::Propagated,
) -> Result<Map<String, Value>, GatewayError> {
    let prefab = &plan.prefab;
    let invoking = proto::Invoking {
        prefab_id: prefab.manifest.id.clone(),
        version: prefab.manifest.version.clone(),
        function_name: plan.function.name.clone(),
    };
    events.send(plan.index, Event::Invoking(invoking)).await?;
    // What the runtime says goes to the caller and the logs: without the
    // secrets it was given.
    let redactor = Redactor::new(secrets.values().map(String::as_str));
    let mut request = tonic::Request::new(proto::InvokeRequest {
        workspace: id.to_string(),
        function_name: plan.function.name.clone(),
        arguments: Some(proto::json_to_struct(plan.arguments.clone())),
        secrets,
        timeout_ms: budget.map_or(0, |b| b.as_millis().min(u128::from(u64::MAX)) as u64),
    });
    trace.inject(request.metadata_mut());
    let failed = |status: tonic::Status| runtime_error(plan, status, &redactor);
    let mut stream = prefab
        .client
        .clone()
        .invoke(request)
        .await
        .map_err(failed)?
        .into_inner();
    while let Some(msg) = stream.message().await.map_err(failed)? {
        match msg.event {
            Some(invoke_event::Event::Progress(mut p)) => {
                redactor.redact_in_place(&mut p.message);
                clip(&mut p.message, MAX_TEXT);
                events.send(plan.index, Event::RuntimeProgress(p)).await?
            }
            Some(invoke_event::Event::Log(mut l)) => {
                redactor.redact_in_place(&mut l.line);
                clip(&mut l.line, MAX_TEXT);
                events.send(plan.index, Event::RuntimeLog(l)).await?
            }
            Some(invoke_event::Event::Result(r)) => {
                let size = r.encoded_len();
                if size > proto::MAX_RESULT {
                    return Err(GatewayError::Contract {
                        prefab: prefab.name.clone(),
                        message: format!(
                            "{} returned a result of {size} bytes; results are limited to {} bytes: \
                             return large values as output files",
                            plan.function.name,
                            proto::MAX_RESULT
                        ),
                    });
                }
                let mut outputs = r.outputs.map(proto::struct_to_json).unwrap_or_default();
                outputs
                    .values_mut()
                    .for_each(|value| redact_json(&redactor, value));
                return Ok(outputs);
            }
            None => {}
        }
    }
    Err(GatewayError::Contract {
        prefab: prefab.name.clone(),
        message: format!("Invoke of {} ended without a result", plan.function.name),
    })
}

/// Longest log line or progress message passed on, in bytes; the rest is
/// cut, so that a chatty prefab cannot fill the run's journal with a few
/// events.
const MAX_TEXT: usize = 16 << 10;

/// Cuts `text` to at most `max` bytes (on a character boundary), saying
/// how much was cut.
fn clip(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    let end = text.floor_char_boundary(max);
    let cut = text.len() - end;
    text.truncate(end);
    text.push_str(&format!(" [{cut} more bytes cut]"));
}

/// Masks the secrets in every string of `value`.
fn redact_json(redactor: &Redactor, value: &mut Value) {
    match value {
        Value::String(text) => redactor.redact_in_place(text),
        Value::Array(items) => items.iter_mut().for_each(|item| redact_json(redactor, item)),
        Value::Object(fields) => fields.values_mut().for_each(|field| redact_json(redactor, field)),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

fn runtime_error(plan: &CallPlan, status: tonic::Status, redactor: &Redactor) -> GatewayError {
    let prefab = &plan.prefab;
    let message = redactor.redact(status.message());
    // Transport failures surface as UNAVAILABLE (or UNKNOWN with a source).
    let transport = status.code() == Code::Unavailable
        || (status.code() == Code::Unknown && std::error::Error::source(&status).is_some());
    if transport {
        return GatewayError::Unavailable(format!(
            "prefab {} at {} became unreachable during {}: {}",
            prefab.name, prefab.endpoint, plan.function.name, message
        ));
    }
    GatewayError::Runtime {
        prefab: prefab.name.clone(),
        function: plan.function.name.clone(),
        code: status.code(),
        message: message.into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_keeps_whole_characters_and_says_how_much_went() {
        let mut short = "héllo".to_owned();
        clip(&mut short, 16);
        assert_eq!(short, "héllo");
        let mut long = "é".repeat(10);
        clip(&mut long, 5);
        assert_eq!(long, "éé [16 more bytes cut]");
    }
}
