//! The run state machine: create the workspace, then for each call stage
//! its inputs, invoke the runtime and collect its outputs; finally remove
//! the workspace, whatever happened, and end the stream with success or a
//! status. A caller that goes away cancels everything in flight.

use std::{sync::Arc, time::Instant};

use tracing::Instrument;

use super::{
    GatewayError, State, collect::collect_outputs, events::Events, invoke::invoke, plan::CallPlan,
    stage::stage_inputs,
};
use crate::{
    proto::{self, run_event::Event},
    workspace::{RequestId, Workspace},
};

/// Runs `plans` to the end, reporting on `events`.
pub async fn run(state: Arc<State>, id: RequestId, plans: Vec<CallPlan>, events: Events) {
    let first = &plans[0];
    let span = tracing::info_span!(
        "run",
        request_id = %id,
        prefab_id = %first.prefab.manifest.id,
        function_name = %first.function.name,
        calls = plans.len(),
    );
    async move {
        let started = Instant::now();
        let _heartbeat = events.heartbeat();
        let workspace = match state.root.create(id).await {
            Ok(ws) => ws,
            Err(e) => {
                let err = GatewayError::Internal(format!("cannot create the workspace for {id}: {e}"));
                return events.fail(err.into()).await;
            }
        };
        let outcome = tokio::select! {
            outcome = execute(&state, &workspace, &plans, &events) => outcome,
            () = events.closed() => Err(GatewayError::Cancelled),
            () = state.stop.cancelled() => Err(GatewayError::Unavailable(
                "the gateway shut down before the run finished; it was cancelled and cleaned up, so retry it".into(),
            )),
        };
        if let Err(e) = workspace.remove().await {
            tracing::error!(error = %e, "could not remove the workspace");
        }
        let elapsed = started.elapsed();
        match outcome {
            Ok(()) => {
                tracing::info!(duration_ms = elapsed.as_millis() as u64, "run completed");
                let done = proto::RunCompleted {
                    request_id: id.to_string(),
                    duration_ms: elapsed.as_millis() as u64,
                };
                let _ = events.send(0, Event::RunCompleted(done)).await;
            }
            Err(GatewayError::Cancelled) => tracing::info!("run cancelled by the caller"),
            Err(e) => {
                tracing::info!(error = %e, "run failed");
                events.fail(e.into()).await;
            }
        }
    }
    .instrument(span)
    .await
}

async fn execute(
    state: &State,
    ws: &Workspace,
    plans: &[CallPlan],
    events: &Events,
) -> Result<(), GatewayError> {
    let accepted = proto::RunAccepted {
        request_id: ws.id().to_string(),
        calls: plans.len() as u32,
    };
    events.send(0, Event::Accepted(accepted)).await?;
    for plan in plans {
        stage_inputs(&state.s3, ws.dir(), plan.index, &plan.inputs, events).await?;
        let reported = invoke(plan, ws.id(), events).await.inspect_err(|e| {
            if matches!(e, GatewayError::Unavailable(_)) {
                state
                    .registry
                    .forget(&plan.prefab.manifest.id, &plan.prefab.manifest.version);
            }
        })?;
        let (outputs, files) = collect_outputs(
            &state.s3,
            &state.bucket,
            ws.dir(),
            ws.id(),
            plan,
            reported,
            events,
        )
        .await?;
        let completed = proto::CallCompleted {
            outputs: Some(proto::json_to_struct(outputs)),
            files,
        };
        events.send(plan.index, Event::CallCompleted(completed)).await?;
    }
    Ok(())
}
