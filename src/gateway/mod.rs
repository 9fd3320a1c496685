//! The `prefab.v1.Gateway` service: authenticates callers, checks each
//! call against its prefab's manifest, admits the run against the
//! workspace volume, then hands it to the state machine in [`run`], which
//! owns it until the end. Runs write to a [`journal::Journal`] that the
//! `Run` stream and `Watch` read.

mod admission;
mod auth;
mod collect;
mod error;
mod events;
mod files;
mod follow;
mod invoke;
mod journal;
mod persist;
mod plan;
mod registry;
mod run;
mod runs;
mod secrets;
mod stage;

use std::{pin::Pin, sync::Arc, time::Duration};

pub use admission::{Admission, Limits};
pub use auth::{Grant, Tokens};
pub use error::GatewayError;
pub use plan::BucketPolicy;
pub use registry::Registry;
use tokio::{net::TcpListener, sync::mpsc};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

use crate::{
    config::GatewayArgs,
    metrics::Metrics,
    proto::{self, gateway_server::GatewayServer},
    server::BoxError,
    storage, telemetry,
    workspace::{RequestId, WorkspaceRoot, access, janitor, record::Records},
};

/// The gRPC name of the service, as health checks ask for it.
pub const GATEWAY_SERVICE: &str = "prefab.v1.Gateway";

/// Most calls in one `Run` request.
const MAX_CALLS: usize = 16;
/// Largest gRPC message accepted or sent (file chunks are at most 1 MiB).
const MAX_MESSAGE: usize = 4 << 20;
/// Events queued for one stream reader.
const STREAM_QUEUE: usize = 64;

/// What every run of this gateway shares, by concern.
#[derive(Debug)]
pub struct State {
    /// What runs call: the store, the volume, the runtimes.
    services: Services,
    /// What a request may ask for.
    limits: RunLimits,
    /// This replica's runs, live and finished.
    runs: Arc<runs::Runs>,
    /// This replica's name in the run records.
    replica: String,
}

/// The services runs call, and where they keep things.
#[derive(Debug)]
struct Services {
    s3: storage::Storage,
    /// The bucket outputs and uploaded files go to.
    bucket: String,
    /// The bodies of small inputs kept from probing until staged.
    kept: stage::Kept,
    root: WorkspaceRoot,
    /// Every replica's run records on the volume.
    records: Arc<Records>,
    /// The volume's space, shared with every replica.
    admission: Arc<Admission>,
    /// The prefabs' runtimes and their manifests.
    registry: Registry,
    metrics: Arc<Metrics>,
    secrets_dir: Option<std::path::PathBuf>,
}

/// What a request may ask for.
#[derive(Debug)]
struct RunLimits {
    /// Which buckets inputs may come from.
    buckets: BucketPolicy,
    allow_detach: bool,
    /// Longest a run may take, if limited.
    max_run: Option<Duration>,
    max_input_bytes: u64,
    max_output_bytes: u64,
    /// How long a run's lease lasts unless renewed.
    lease_ttl: Duration,
}

impl State {
    /// Builds the shared state from the gateway's settings.
    pub fn from_args(args: &GatewayArgs, metrics: Arc<Metrics>) -> Result<Self, BoxError> {
        let gid = args
            .workspace_gid
            .unwrap_or_else(|| rustix::process::getegid().as_raw());
        let me = access::Identity::current();
        if !me.may_use_group(gid) {
            tracing::warn!(
                workspace_gid = gid,
                identity = %me,
                "the gateway is not a member of the workspace group (PREFAB_WORKSPACE_GID): it cannot give \
                 workspaces to it, and runs will fail; add the group to the gateway's pod (runAsGroup or \
                 supplementalGroups)"
            );
        }
        let root = WorkspaceRoot::new(&args.workspace_root)
            .map_err(|e| format!("cannot use WORKSPACE_ROOT {}: {e}", args.workspace_root.display()))?
            .with_group(gid);
        let records = Arc::new(Records::open(&root).map_err(|e| {
            format!(
                "cannot keep run records in {}/{}: {e}",
                args.workspace_root.display(),
                crate::workspace::record::RUNS_DIR
            )
        })?);
        if !(0.0..=1.0).contains(&args.high_water) || args.reserve_factor < 0.0 || args.lease_ttl_seconds == 0
        {
            return Err("PREFAB_HIGH_WATER must be in [0, 1], PREFAB_RESERVE_FACTOR >= 0, PREFAB_LEASE_TTL_SECONDS > 0".into());
        }
        let limits = Limits {
            max_runs: args.max_concurrent_runs,
            max_input_bytes: args.max_input_bytes,
            reserve_factor: args.reserve_factor,
            high_water: args.high_water,
            capacity_bytes: args.workspace_capacity_bytes,
        };
        let replica = args.replica_id.clone().unwrap_or_else(|| {
            let host = rustix::system::uname().nodename().to_string_lossy().into_owned();
            format!("{host}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
        });
        let owner = admission::Owner {
            replica: replica.clone(),
            ttl: Duration::from_secs(args.lease_ttl_seconds),
        };
        let services = Services {
            s3: storage::connect(&args.s3.settings())?,
            bucket: args.s3.bucket.clone(),
            kept: stage::Kept::default(),
            admission: Admission::new(
                limits,
                root.path().to_owned(),
                Arc::clone(&records),
                owner,
                Arc::clone(&metrics),
            ),
            root,
            records,
            registry: Registry::new(
                &args.endpoints,
                args.endpoint_template.clone(),
                args.describe_ttl(),
                args.runtime_tls.config()?,
            )?,
            metrics,
            secrets_dir: args.secrets_dir.clone(),
        };
        let limits = RunLimits {
            buckets: BucketPolicy::new(&args.allowed_buckets, &args.s3.bucket),
            allow_detach: args.allow_detach,
            max_run: Some(Duration::from_secs(args.max_run_seconds)).filter(|d| !d.is_zero()),
            max_input_bytes: args.max_input_bytes,
            max_output_bytes: args.max_output_bytes,
            lease_ttl: Duration::from_secs(args.lease_ttl_seconds),
        };
        Ok(Self {
            services,
            limits,
            runs: Arc::new(runs::Runs::new(Duration::from_secs(args.run_retention_seconds))),
            replica,
        })
    }

    /// Resolves and checks every call of a request.
    async fn plan(&self, req: &proto::RunRequest) -> Result<Vec<plan::CallPlan>, GatewayError> {
        if req.calls.is_empty() {
            return Err(GatewayError::invalid("calls", "a run needs at least one call"));
        }
        if req.calls.len() > MAX_CALLS {
            return Err(GatewayError::invalid(
                "calls",
                format!("a run may have at most {MAX_CALLS} calls"),
            ));
        }
        let mut plans = Vec::with_capacity(req.calls.len());
        for (index, call) in req.calls.iter().enumerate() {
            let requested = plan::Requested {
                index: index as u32,
                prefab: self
                    .services
                    .registry
                    .resolve(&call.prefab_id, &call.version)
                    .await?,
                function_name: &call.function_name,
                inputs: call.inputs.clone().map(proto::struct_to_json).unwrap_or_default(),
                intermediate: &call.intermediate,
            };
            let planned = plan::plan(requested, &plans, &self.limits.buckets)?;
            plans.push(planned);
        }
        plan::check_intermediates(&plans)?;
        Ok(plans)
    }
}

/// The gateway service.
#[derive(Debug, Clone)]
pub struct Gateway {
    state: Arc<State>,
}

impl Gateway {
    /// A gateway over `state`.
    pub fn new(state: State) -> Self {
        Self {
            state: Arc::new(state),
        }
    }
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The deadline a caller set with `grpc-timeout`, if any.
fn deadline_of<T>(req: &Request<T>) -> Option<Duration> {
    let raw = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (value, unit) = raw.split_at(raw.len().checked_sub(1)?);
    // The gRPC spec allows at most 8 digits, so nothing below overflows.
    if value.is_empty() || value.len() > 8 {
        return None;
    }
    let value: u64 = value.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(value * 3600),
        "M" => Duration::from_secs(value * 60),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    })
}

/// Refuses a `Watch` by a token that may not run every prefab of the run.
fn may_follow(grant: &Grant, prefabs: &[String]) -> Result<(), Status> {
    match prefabs.iter().find(|p| !grant.may_run(p)) {
        Some(id) => Err(GatewayError::PermissionDenied(format!(
            "this token may not follow runs of prefab {id:?}; ask for a token with scope run:{id}"
        ))
        .into()),
        None => Ok(()),
    }
}

fn files_allowed<T>(req: &Request<T>) -> Result<(), Status> {
    if Grant::of(req).may_move_files() {
        Ok(())
    } else {
        Err(GatewayError::PermissionDenied(
            "this token may not use PutFile or GetFile; ask for a token with scope files".into(),
        )
        .into())
    }
}

#[tonic::async_trait]
impl proto::gateway_server::Gateway for Gateway {
    type RunStream = Boxed<proto::RunEvent>;

    async fn run(&self, req: Request<proto::RunRequest>) -> Result<Response<Self::RunStream>, Status> {
        let deadline = run::Deadline::starting_now(deadline_of(&req), self.state.limits.max_run);
        let grant = Grant::of(&req);
        let caller = telemetry::Remote::from_metadata(req.metadata());
        let req = req.into_inner();
        if let Some(call) = req.calls.iter().find(|c| !grant.may_run(&c.prefab_id)) {
            return Err(GatewayError::PermissionDenied(format!(
                "this token may not run prefab {:?}; ask for a token with scope run:{}",
                call.prefab_id, call.prefab_id
            ))
            .into());
        }
        let detach = req.on_disconnect() == proto::OnDisconnect::Detach;
        if detach && !self.state.limits.allow_detach {
            return Err(GatewayError::Deployment(
                "this gateway refuses ON_DISCONNECT_DETACH (PREFAB_ALLOW_DETACH=false): its replicas are \
                 stopped when no request is open (Knative scaling down), which would cancel a detached run; \
                 keep the Run stream open (ON_DISCONNECT_CANCEL)"
                    .into(),
            )
            .into());
        }
        let id = RequestId::new();
        let prefabs: Vec<String> = req.calls.iter().map(|c| c.prefab_id.clone()).collect();
        // The first call's names are recorded once checked.
        let span = tracing::info_span!(
            "run",
            request_id = %id,
            prefab_id = tracing::field::Empty,
            function_name = tracing::field::Empty,
            calls = req.calls.len(),
            trace_id = tracing::field::Empty,
        );
        let trace = caller.continue_in(&span);
        // Describing the prefabs, looking at the inputs and waiting for
        // admission count against the caller's deadline too.
        let admitted = async {
            let plans = self.state.plan(&req).await?;
            let first = &plans[0];
            span.record("prefab_id", first.prefab.manifest.id.as_str());
            span.record("function_name", first.function.name.as_str());
            self.state.services.admission.has_room()?;
            // The workspace is made while the inputs are looked at.
            let (probes, prepared) = tokio::join!(
                stage::probe_all(&self.state.services.s3, &plans, &self.state.services.kept)
                    .instrument(tracing::info_span!("probe")),
                run::prepare(&self.state.services, id, &plans).instrument(tracing::info_span!("workspace")),
            );
            let (probes, prepared) = (probes?, prepared?);
            let sizes: Vec<(String, u64)> = probes
                .iter()
                .flatten()
                .zip(plans.iter().flat_map(|plan| &plan.inputs))
                .map(|(looked, input)| (input.url.to_string(), looked.probed.info.size))
                .collect();
            let by_call: Vec<Vec<u64>> = probes
                .iter()
                .map(|call| call.iter().map(|looked| looked.probed.info.size).collect())
                .collect();
            let need = plan::workspace_need(&plans, &by_call, self.state.services.admission.reserve_factor());
            let run::Prepared {
                record,
                workspace,
                inputs,
            } = prepared;
            let reservation = self
                .state
                .services
                .admission
                .admit(record, prefabs.clone(), &sizes, need)
                .instrument(tracing::info_span!("admission"))
                .await?;
            Ok::<_, Status>((plans, probes, reservation, workspace, inputs))
        }
        .instrument(span.clone());
        let admitted = match deadline {
            Some(d) => tokio::time::timeout_at(d.before_run().into(), admitted)
                .await
                .unwrap_or_else(|_| Err(d.exceeded().into())),
            None => admitted.await,
        };
        let (plans, probes, reservation, workspace, inputs) =
            admitted.inspect_err(|status| telemetry::record_failure(&span, status))?;

        let journal = journal::Journal::new(prefabs);
        self.state.runs.insert(id, Arc::clone(&journal));
        self.state.runs.tasks.spawn(persist::run(
            Arc::clone(&journal),
            reservation.record(),
            self.state.limits.lease_ttl,
        ));
        let work = run::Run {
            state: Arc::clone(&self.state),
            id,
            plans,
            probes,
            deadline,
            reservation,
            workspace,
            inputs,
            span,
            trace,
        };
        self.state
            .runs
            .tasks
            .spawn(work.execute(events::Events::new(Arc::clone(&journal))));
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        tokio::spawn(journal.forward(0, tx, !detach));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn put_file(
        &self,
        req: Request<Streaming<proto::PutFileRequest>>,
    ) -> Result<Response<proto::FileRef>, Status> {
        files_allowed(&req)?;
        Ok(Response::new(
            files::put_file(&self.state, req.into_inner()).await?,
        ))
    }

    type GetFileStream = Boxed<proto::FileChunk>;

    async fn get_file(
        &self,
        req: Request<proto::GetFileRequest>,
    ) -> Result<Response<Self::GetFileStream>, Status> {
        files_allowed(&req)?;
        let rx = files::get_file(&self.state, req.into_inner()).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type WatchStream = Boxed<proto::RunEvent>;

    async fn watch(&self, req: Request<proto::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let grant = Grant::of(&req);
        let req = req.into_inner();
        let id = RequestId::parse(&req.request_id)
            .map_err(|e| GatewayError::invalid("request_id", e.to_string()))?;
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let stream = Response::new(Box::pin(ReceiverStream::new(rx)) as Self::WatchStream);
        // Runs of this replica are followed in memory, others' on the volume.
        let local = self.state.runs.journal(id);
        if let Some(journal) = local {
            may_follow(&grant, journal.prefabs())?;
            tokio::spawn(journal.forward(req.after_sequence, tx, false));
            return Ok(stream);
        }
        let records = Arc::clone(&self.state.services.records);
        let found = tokio::task::spawn_blocking(move || {
            let record = records.find(id)?;
            record.lease().map(|lease| (record, lease))
        })
        .await
        .map_err(|e| GatewayError::Internal(e.to_string()))?;
        let Some((record, lease)) = found else {
            return Err(GatewayError::NotFound(format!(
                "run {id} is unknown on this workspace volume: it finished more than {} s ago \
                 (PREFAB_RUN_RETENTION_SECONDS), or it never ran here",
                self.state.runs.retention.as_secs()
            ))
            .into());
        };
        may_follow(&grant, &lease.prefabs)?;
        tokio::spawn(follow::follow(id, record, req.after_sequence, tx));
        Ok(stream)
    }
}

/// Serves the gateway on `listener` until `shutdown` is cancelled, with
/// its janitor and, if configured, its metrics endpoint.
pub async fn serve(
    args: &GatewayArgs,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), BoxError> {
    let tokens = load_tokens(args, &shutdown)?;
    let metrics = Arc::new(Metrics::default());
    let state = State::from_args(args, Arc::clone(&metrics))?;
    if let Some(addr) = args.metrics_addr {
        serve_metrics(addr, &metrics, &shutdown).await?;
    }
    start_janitor(args, &state, &metrics, &shutdown);
    tracing::info!(
        addr = %listener.local_addr()?,
        workspace_root = %state.services.root.path().display(),
        bucket = %state.services.bucket,
        replica = %state.replica,
        auth = tokens.is_some(),
        "gateway serving"
    );
    stop_runs_after_grace(
        &state,
        Duration::from_secs(args.shutdown_grace_seconds),
        &shutdown,
    );
    let (runs, s3) = (Arc::clone(&state.runs), state.services.s3.clone());
    let server = GatewayServer::new(Gateway::new(state))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let service = tonic::service::interceptor::InterceptedService::new(server, auth::interceptor(tokens));
    let router = crate::server::base_router(
        GATEWAY_SERVICE,
        crate::proto::FILE_DESCRIPTOR_SET,
        args.tls.config()?,
    )
    .await?
    .add_service(service);
    let served = crate::server::serve_router(router, listener, shutdown.clone()).await;
    // However serving ended, start the grace-then-stop path.
    shutdown.cancel();
    drain(&runs, &s3).await;
    served
}

/// The bearer tokens callers must present (reloaded when their file
/// changes), or `None` with `--no-auth`.
fn load_tokens(args: &GatewayArgs, shutdown: &CancellationToken) -> Result<Option<Tokens>, BoxError> {
    match (&args.auth_tokens_file, args.no_auth) {
        (Some(path), _) => {
            let tokens = Tokens::load(path)?;
            let every = Duration::from_secs(args.auth_reload_seconds.max(1));
            tokens.reload_on_change(path.clone(), every, shutdown.clone());
            Ok(Some(tokens))
        }
        (None, true) => Ok(None),
        (None, false) => Err(
            "no PREFAB_AUTH_TOKENS_FILE is set; give one, or --no-auth to serve without authentication"
                .into(),
        ),
    }
}

/// Serves Prometheus `/metrics` on `addr` until shutdown.
async fn serve_metrics(
    addr: std::net::SocketAddr,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> Result<(), BoxError> {
    let listener = crate::metrics::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr} for metrics: {e}"))?;
    tracing::info!(addr = %listener.local_addr()?, "metrics serving on /metrics");
    tokio::spawn(crate::metrics::serve(
        Arc::clone(metrics),
        listener,
        shutdown.clone(),
    ));
    Ok(())
}

/// Starts the janitor of the workspace volume, reporting its sweeps and the
/// volume's usage to the metrics.
fn start_janitor(args: &GatewayArgs, state: &State, metrics: &Arc<Metrics>, shutdown: &CancellationToken) {
    let metrics = Arc::clone(metrics);
    let report = move |sweep: janitor::Sweep, usage: Option<janitor::DiskUsage>| {
        metrics.janitor_removed.inc_by(sweep.removed);
        metrics.janitor_freed_bytes.inc_by(sweep.freed_bytes);
        if let Some(u) = usage {
            metrics
                .disk_usage_permille
                .set((u.ratio() * 1000.0).round() as i64);
        }
    };
    let schedule = janitor::Schedule {
        interval: Duration::from_secs(args.janitor_interval_seconds.max(1)),
        grace: Duration::from_secs(args.workspace_max_age_seconds),
        retention: state.runs.retention,
    };
    tokio::spawn(janitor::run(
        state.services.root.clone(),
        schedule,
        shutdown.clone(),
        report,
    ));
}

/// Once shutdown begins, gives the runs in flight `grace` to finish, then
/// cancels them (they clean up as they end).
fn stop_runs_after_grace(state: &State, grace: Duration, shutdown: &CancellationToken) {
    let (stop, signal) = (state.runs.stop.clone(), shutdown.clone());
    tokio::spawn(async move {
        signal.cancelled().await;
        tracing::info!(
            grace_seconds = grace.as_secs(),
            "no new runs; waiting for in-flight runs"
        );
        tokio::time::sleep(grace).await;
        stop.cancel();
    });
}

/// Waits for the runs that outlived their connections (detached ones)
/// within the grace period, then for the cleanup of those it cancelled, and
/// for the aborts of uploads they left.
async fn drain(runs: &runs::Runs, s3: &storage::Storage) {
    runs.tasks.close();
    tokio::select! {
        () = runs.tasks.wait() => {}
        () = runs.stop.cancelled() => {
            if tokio::time::timeout(Duration::from_secs(30), runs.tasks.wait()).await.is_err() {
                tracing::error!("runs did not finish cleaning up; the janitor will remove their workspaces");
            }
        }
    }
    s3.wait_for_aborts(Duration::from_secs(10)).await;
}
