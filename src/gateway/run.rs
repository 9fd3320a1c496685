//! The run state machine: create the workspace (its lease is held by the
//! run's journal writer, see [`super::persist`]), then for
//! each call stage its inputs, invoke the runtime and collect its outputs;
//! finally remove the workspace, whatever happened, release the
//! reservation, and end the journal with success or a status. Cancellation
//! (a caller that left, a deadline, shutdown) stops everything in flight.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use tracing::Instrument;

use super::{
    GatewayError, Services, State,
    admission::Reservation,
    collect::collect_outputs,
    events::Events,
    invoke::invoke,
    plan::{self, CallPlan, Origin},
    stage::{self, Probes, stage_inputs},
};
use crate::{
    metrics::{Outcome, Phase},
    proto::{self, run_event::Event},
    telemetry,
    workspace::{PartFile, RelPath, RequestId, Workspace, access, record::PendingRecord},
};

/// What a run needs on the volume before it is admitted, made while its
/// inputs are looked at (a store round trip, which this work then costs no
/// time beyond): the file its lease will be written to, its workspace, and
/// an empty `.part` file for each input of each call. Dropped unused (the
/// run refused, its caller gone), all of it is removed.
pub struct Prepared {
    /// The run's lease file, for admission.
    pub record: PendingRecord,
    /// The workspace.
    pub workspace: Workspace,
    /// Each call's input files, in plan order.
    pub inputs: Vec<Vec<PartFile>>,
}

/// Makes what run `id` of `plans` needs on the volume (see [`Prepared`]).
pub async fn prepare(
    services: &Services,
    id: RequestId,
    plans: &[CallPlan],
) -> Result<Prepared, GatewayError> {
    let (root, records) = (services.root.clone(), Arc::clone(&services.records));
    let inputs: Vec<Vec<String>> = plans
        .iter()
        .map(|plan| plan.inputs.iter().map(|input| input.rel.clone()).collect())
        .collect();
    tokio::task::spawn_blocking(move || {
        let workspace = root.create_blocking(id).map_err(|e| {
            if access::is_denied(&e) {
                let dir = root.path().join(id.to_string());
                GatewayError::Deployment(access::explain_denied(
                    "the gateway cannot create the workspace",
                    &dir,
                ))
            } else {
                GatewayError::Internal(format!("cannot create the workspace for {id}: {e}"))
            }
        })?;
        let inputs = inputs
            .iter()
            .map(|call| {
                call.iter()
                    .map(|rel| {
                        let rel = RelPath::parse(rel).map_err(std::io::Error::other)?;
                        workspace.create_input(&rel)
                    })
                    .collect()
            })
            .collect::<std::io::Result<_>>()
            .map_err(|e| GatewayError::Internal(format!("cannot create the input files of {id}: {e}")))?;
        let record = records.prepare(id).map_err(|e| {
            GatewayError::Internal(format!("cannot record the run on the workspace volume: {e}"))
        })?;
        Ok(Prepared {
            record,
            workspace,
            inputs,
        })
    })
    .await
    .map_err(|e| GatewayError::Internal(e.to_string()))?
}

/// An admitted run, ready to execute.
pub struct Run {
    /// Shared gateway state.
    pub state: Arc<State>,
    /// The request id.
    pub id: RequestId,
    /// The checked calls.
    pub plans: Vec<CallPlan>,
    /// What was found of every input, per call (small ones whole).
    pub probes: Probes,
    /// When the run must end, if ever.
    pub deadline: Option<Deadline>,
    /// Workspace space held for the run.
    pub reservation: Reservation,
    /// Its workspace, and each call's input files.
    pub workspace: Workspace,
    /// Each call's input files, in plan order.
    pub inputs: Vec<Vec<PartFile>>,
    /// The run's span, which every phase's span is a child of.
    pub span: tracing::Span,
    /// The trace context the caller sent, passed on as is when spans are
    /// not exported.
    pub trace: telemetry::Propagated,
}

/// How much longer than the gateway's deadline a runtime is given.
const RUNTIME_SLACK: Duration = Duration::from_millis(500);

/// How much before the caller's deadline the work before a run (describing,
/// probing, admission) gives up: a tenth of the time given, within these
/// bounds and at most half of it. Until the run's stream is returned, the
/// caller's gRPC library and tonic in the gateway both hold the call to the
/// same deadline, counted from before the gateway saw the request, and end
/// it with a bare CANCELLED "Timeout expired"; answering first, with time
/// for the answer to travel, keeps it DEADLINE_EXCEEDED with its explanation.
const FRAMEWORK_MARGIN: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(1));

/// A run's deadline, counted from the request's arrival: the caller's
/// (`grpc-timeout`) or the gateway's own limit, whichever comes first.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    /// The time given.
    pub given: Duration,
    /// When it runs out.
    pub at: Instant,
    /// Whether it is the gateway's limit rather than the caller's.
    pub gateways: bool,
}

impl Deadline {
    /// The earlier of the caller's deadline and the gateway's `limit`, from
    /// now; `None` if there is neither.
    pub fn starting_now(callers: Option<Duration>, limit: Option<Duration>) -> Option<Self> {
        let (given, gateways) = match (callers, limit) {
            (Some(c), Some(l)) if l < c => (l, true),
            (Some(c), _) => (c, false),
            (None, Some(l)) => (l, true),
            (None, None) => return None,
        };
        // A limit too far to count is no limit.
        let at = Instant::now().checked_add(given)?;
        Some(Self { given, at, gateways })
    }

    /// When the work before the run gives up (see [`FRAMEWORK_MARGIN`]).
    pub fn before_run(&self) -> Instant {
        if self.gateways {
            return self.at;
        }
        let (least, most) = FRAMEWORK_MARGIN;
        let margin = (self.given / 10).clamp(least, most).min(self.given / 2);
        self.at.checked_sub(margin).unwrap_or(self.at)
    }

    /// The error of a run that ran out of time.
    pub fn exceeded(&self) -> GatewayError {
        match self.gateways {
            true => GatewayError::TooLong(self.given),
            false => GatewayError::DeadlineExceeded(self.given),
        }
    }
}

impl Run {
    /// Runs to the end, writing to `events`.
    pub async fn execute(self, events: Events) {
        let span = self.span.clone();
        let state = Arc::clone(&self.state);
        let id = self.id;
        let journal = events.journal();
        let started = Instant::now();
        let outcome = self.guarded(&events).instrument(span.clone()).await;
        let _enter = span.enter();
        let elapsed = started.elapsed();
        state.services.metrics.run_seconds.observe(elapsed.as_secs_f64());
        let label = match &outcome {
            Ok(()) => "ok".to_owned(),
            Err(e) => format!("{:?}", e.code()),
        };
        state
            .services
            .metrics
            .runs
            .get_or_create(&Outcome { outcome: label })
            .inc();
        match outcome {
            Ok(()) => {
                tracing::info!(duration_ms = elapsed.as_millis() as u64, "run completed");
                let done = proto::RunCompleted {
                    request_id: id.to_string(),
                    duration_ms: elapsed.as_millis() as u64,
                };
                journal.push(0, Event::RunCompleted(done));
                journal.finish(Ok(()));
            }
            Err(e) => {
                tracing::info!(error = %e, "run failed");
                let status = e.status(Some(id));
                telemetry::record_failure(&span, &status);
                journal.finish(Err(status));
            }
        }
        state.runs.retire(id, journal.bytes());
    }

    /// Runs the calls, and removes the workspace.
    async fn guarded(mut self, events: &Events) -> Result<(), GatewayError> {
        let probes = std::mem::take(&mut self.probes);
        let inputs = std::mem::take(&mut self.inputs);
        let state = &self.state;
        let deadline = async {
            match self.deadline {
                Some(d) => {
                    tokio::time::sleep_until(d.at.into()).await;
                    d.exceeded()
                }
                None => std::future::pending().await,
            }
        };
        let cancelled = events.journal().cancellation().clone();
        let outcome = tokio::select! {
            outcome = self.calls(probes, inputs, events) => outcome,
            () = cancelled.cancelled() => Err(GatewayError::Cancelled),
            exceeded = deadline => Err(exceeded),
            () = state.runs.stop.cancelled() => Err(GatewayError::Unavailable(
                "the gateway shut down before the run finished; it was cancelled and cleaned up, so retry it".into(),
            )),
        };
        self.workspace
            .remove_later(&state.runs.tasks, tracing::info_span!("cleanup"));
        drop(self.reservation);
        outcome
    }

    /// Stages, invokes and collects each call in turn.
    async fn calls(
        &self,
        probes: Probes,
        inputs: Vec<Vec<PartFile>>,
        events: &Events,
    ) -> Result<(), GatewayError> {
        let (state, plans, ws) = (&self.state, &self.plans, &self.workspace);
        let deadline_at = self.deadline.map(|d| d.at);
        let accepted = proto::RunAccepted {
            request_id: ws.id().to_string(),
            calls: plans.len() as u32,
        };
        events.send(0, Event::Accepted(accepted)).await?;
        // The run's files on the volume that later calls take: where, size
        // and checksum; and which call takes each last.
        let mut on_volume = HashMap::new();
        let last_users = plan::last_users(plans);
        for ((plan, probes), files) in plans.iter().zip(probes).zip(inputs) {
            let phase = |phase| {
                state
                    .services
                    .metrics
                    .phase_seconds
                    .get_or_create(&Phase { phase })
                    .clone()
            };
            let t = Instant::now();
            let (now, streamed) = stage::split(&plan.inputs, probes, files);
            let staged = stage_inputs(&state.services.s3, plan.index, now, events, None).await?;
            self.record_staged(plan, staged, &mut on_volume)?;
            self.hand_over(plan, &mut on_volume, &last_users, events).await?;
            let streamed = match streamed.is_empty() {
                true => None,
                false => Some(stage::announce(streamed).await?),
            };
            phase("stage").observe(t.elapsed().as_secs_f64());

            let t = Instant::now();
            let secrets =
                super::secrets::for_prefab(state.services.secrets_dir.as_deref(), &plan.prefab.manifest.id)
                    .await
                    .map_err(|e| {
                        GatewayError::Internal(format!(
                            "cannot read the secrets of {}: {e}",
                            plan.prefab.name
                        ))
                    })?;
            // The runtime gets what is left of the deadline, and a moment more:
            // the gateway's own deadline ends the call first, and says which.
            let budget = deadline_at.map(|at| at.saturating_duration_since(Instant::now()) + RUNTIME_SLACK);
            let span = tracing::info_span!(
                "invoke",
                call = plan.index,
                prefab_id = %plan.prefab.manifest.id,
                version = %plan.prefab.manifest.version,
                function_name = %plan.function.name,
            );
            let trace = self.trace.from_span(&span);
            let invoking = async {
                invoke(plan, ws.id(), events, secrets, budget, &trace)
                    .instrument(span)
                    .await
                    .inspect_err(|e| {
                        if matches!(e, GatewayError::Unavailable(_)) {
                            state
                                .services
                                .registry
                                .forget(&plan.prefab.manifest.id, &plan.prefab.manifest.version);
                        }
                    })
            };
            let reported = match streamed {
                None => invoking.await?,
                Some(streamed) => {
                    let failing = stage::Failing::default();
                    let staging =
                        stage_inputs(&state.services.s3, plan.index, streamed, events, Some(&failing));
                    let (reported, staged) = while_staging(staging, invoking, &failing).await?;
                    self.record_staged(plan, staged, &mut on_volume)?;
                    reported
                }
            };
            phase("invoke").observe(t.elapsed().as_secs_f64());

            let t = Instant::now();
            let collected = collect_outputs(
                &state.services,
                state.limits.max_output_bytes,
                ws,
                plan,
                reported,
                events,
            )
            .await?;
            state
                .services
                .metrics
                .bytes_uploaded
                .inc_by(collected.uploaded.iter().map(|f| f.size).sum());
            phase("upload").observe(t.elapsed().as_secs_f64());
            for file in collected.files {
                let origin = Origin::Output {
                    call: plan.index,
                    param: file.param,
                };
                on_volume.insert(origin, (file.rel, file.size, file.crc64nvme));
            }
            // Before a later call: what no later call uses leaves the
            // volume (the last call's go with the workspace).
            if (plan.index as usize) + 1 < plans.len() {
                let done = plan::spent(plan, &last_users);
                let rels = done
                    .iter()
                    .filter_map(|o| on_volume.remove(o))
                    .map(|(rel, ..)| rel);
                let mut rels: Vec<RelPath> = rels.collect();
                rels.extend(plan.handed.iter().filter_map(|h| RelPath::parse(&h.rel).ok()));
                ws.remove_files(rels).await.map_err(|e| {
                    GatewayError::Internal(format!("cannot release the inputs of call {}: {e}", plan.index))
                })?;
            }

            let completed = proto::CallCompleted {
                outputs: Some(proto::json_to_struct(collected.values)),
                files: collected.uploaded,
            };
            events.send(plan.index, Event::CallCompleted(completed)).await?;
        }
        Ok(())
    }

    /// Counts what call `plan` staged, and notes where it is for later
    /// calls.
    fn record_staged(
        &self,
        plan: &CallPlan,
        staged: Vec<proto::InputStaged>,
        on_volume: &mut HashMap<Origin, (RelPath, u64, String)>,
    ) -> Result<(), GatewayError> {
        let bytes = staged.iter().map(|s| s.size).sum();
        self.state.services.metrics.bytes_staged.inc_by(bytes);
        self.reservation.written(bytes);
        for input in staged {
            let origin = Origin::Input {
                call: plan.index,
                param: input.parameter,
            };
            let rel = RelPath::parse(&input.path).map_err(|e| GatewayError::Internal(e.to_string()))?;
            on_volume.insert(origin, (rel, input.size, input.crc64nvme));
        }
        Ok(())
    }

    /// Hands call `plan` the files it takes from earlier in the run, each a
    /// second name of the file on the volume; a file's first name goes when
    /// its last user has taken it.
    async fn hand_over(
        &self,
        plan: &CallPlan,
        on_volume: &mut HashMap<Origin, (RelPath, u64, String)>,
        last_users: &HashMap<Origin, u32>,
        events: &Events,
    ) -> Result<(), GatewayError> {
        for handed in &plan.handed {
            let (from, size, crc) = on_volume.get(&handed.from).cloned().ok_or_else(|| {
                GatewayError::Internal(format!("{} is not on the workspace", handed.reference))
            })?;
            let to = RelPath::parse(&handed.rel).map_err(|e| GatewayError::Internal(e.to_string()))?;
            let last = last_users.get(&handed.from) == Some(&plan.index);
            let span = tracing::info_span!("hand_over", parameter = %handed.param, from = %handed.reference);
            let handing = self.workspace.hand_over(from, to, last).instrument(span);
            handing.await.map_err(|e| {
                GatewayError::Internal(format!(
                    "cannot hand {} to call {}: {e}",
                    handed.reference, plan.index
                ))
            })?;
            if last {
                on_volume.remove(&handed.from);
            }
            let staged = proto::InputStaged {
                parameter: handed.param.clone(),
                url: handed.reference.clone(),
                path: handed.rel.clone(),
                size,
                crc64nvme: crc,
            };
            events.send(plan.index, Event::Staged(staged)).await?;
        }
        Ok(())
    }
}

/// Invokes a function while some of its inputs are still `staging`: its
/// result counts only once what it read is verified, and a staging failure
/// fails the call (cancelling the function) whatever the function did.
async fn while_staging<S, R>(
    staging: impl Future<Output = Result<S, GatewayError>>,
    invoking: impl Future<Output = Result<R, GatewayError>>,
    failing: &stage::Failing,
) -> Result<(R, S), GatewayError> {
    let (mut staging, mut invoking) = (std::pin::pin!(staging), std::pin::pin!(invoking));
    tokio::select! {
        staged = &mut staging => {
            let staged = staged?;
            Ok((invoking.await?, staged))
        }
        reported = &mut invoking => match reported {
            Ok(reported) => Ok((reported, staging.await?)),
            // A function whose input failed to stage fails too, but only
            // after `failing` is set: staging's error is the call's.
            Err(e) if failing.is_set() => staging.await.and(Err(e)),
            Err(e) => Err(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_reading_inputs_as_they_stage_fails_as_staging_did() {
        let failed = |what: &str| GatewayError::Internal(what.into());
        let message = |r: Result<((), ()), GatewayError>| r.unwrap_err().to_string();

        // Staging fails, says so, and the function fails because of it,
        // its error arriving first: the call fails with staging's error.
        let failing = stage::Failing::default();
        let (told, learns) = tokio::sync::oneshot::channel();
        let staging = async {
            failing.set();
            told.send(()).unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            Err::<(), _>(failed("checksum mismatch"))
        };
        let invoking = async {
            learns.await.unwrap();
            Err::<(), _>(failed("the function could not read its input"))
        };
        let result = while_staging(staging, invoking, &failing).await;
        assert_eq!(message(result), "internal error: checksum mismatch");

        // A function failing on its own is not kept waiting for staging.
        let failing = stage::Failing::default();
        let staging = std::future::pending::<Result<(), GatewayError>>();
        let invoking = async { Err::<(), _>(failed("bad argument")) };
        let result = while_staging(staging, invoking, &failing).await;
        assert_eq!(message(result), "internal error: bad argument");

        // A result counts only once what it read is verified.
        let staging = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Err::<(), _>(failed("checksum mismatch"))
        };
        let result = while_staging(staging, async { Ok(()) }, &failing).await;
        assert_eq!(message(result), "internal error: checksum mismatch");
    }

    #[test]
    fn the_work_before_a_run_leaves_the_answer_time_to_travel() {
        let margin = |callers: u64, limit: Option<u64>| {
            let d = Deadline::starting_now(
                Some(Duration::from_millis(callers)),
                limit.map(Duration::from_millis),
            )
            .unwrap();
            d.at - d.before_run()
        };
        assert_eq!(margin(1_000, None), Duration::from_millis(200));
        assert_eq!(margin(5_000, None), Duration::from_millis(500));
        assert_eq!(margin(60_000, None), Duration::from_secs(1));
        assert_eq!(margin(100, None), Duration::from_millis(50));
        // The gateway's own limit is no caller's timer.
        assert_eq!(margin(60_000, Some(1_000)), Duration::ZERO);
    }
}
