//! The `prefab.v1.Gateway` service: authenticates callers, checks each
//! call against its prefab's manifest, then hands the run to the state
//! machine in [`run`], which owns it until the end.

mod auth;
mod collect;
mod error;
mod events;
mod files;
mod invoke;
mod plan;
mod registry;
mod run;
mod stage;

use std::{pin::Pin, sync::Arc, time::Duration};

pub use auth::Tokens;
pub use error::GatewayError;
pub use plan::BucketPolicy;
pub use registry::Registry;
use tokio::{net::TcpListener, sync::mpsc};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    config::GatewayArgs,
    proto::{self, gateway_server::GatewayServer},
    server::BoxError,
    storage,
    workspace::{RequestId, WorkspaceRoot},
};

/// The gRPC name of the service, as health checks ask for it.
pub const GATEWAY_SERVICE: &str = "prefab.v1.Gateway";

/// Most calls in one `Run` request.
const MAX_CALLS: usize = 16;

/// What every run of this gateway shares.
#[derive(Debug)]
pub struct State {
    s3: aws_sdk_s3::Client,
    bucket: String,
    root: WorkspaceRoot,
    registry: Registry,
    buckets: BucketPolicy,
    /// Cancelled when the shutdown grace period is over: runs still going
    /// are cancelled and cleaned up.
    stop: CancellationToken,
}

impl State {
    /// Builds the shared state from the gateway's settings.
    pub fn from_args(args: &GatewayArgs) -> Result<Self, BoxError> {
        Ok(Self {
            s3: storage::connect(&args.s3)?,
            bucket: args.s3.bucket.clone(),
            root: WorkspaceRoot::new(&args.workspace_root)
                .map_err(|e| format!("cannot use WORKSPACE_ROOT {}: {e}", args.workspace_root.display()))?,
            registry: Registry::new(
                &args.endpoints,
                args.endpoint_template.clone(),
                args.describe_ttl(),
            )?,
            buckets: BucketPolicy::new(&args.allowed_buckets, &args.s3.bucket),
            stop: CancellationToken::new(),
        })
    }

    /// Resolves and checks every call of a request.
    async fn plan(&self, req: proto::RunRequest) -> Result<Vec<plan::CallPlan>, GatewayError> {
        if req.calls.is_empty() {
            return Err(GatewayError::InvalidArgument(
                "a run needs at least one call".into(),
            ));
        }
        if req.calls.len() > MAX_CALLS {
            return Err(GatewayError::InvalidArgument(format!(
                "a run may have at most {MAX_CALLS} calls"
            )));
        }
        let mut plans = Vec::with_capacity(req.calls.len());
        for (index, call) in req.calls.into_iter().enumerate() {
            let prefab = self.registry.resolve(&call.prefab_id, &call.version).await?;
            let inputs = call.inputs.map(proto::struct_to_json).unwrap_or_default();
            plans.push(plan::plan(
                index as u32,
                prefab,
                &call.function_name,
                inputs,
                &self.buckets,
            )?);
        }
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

#[tonic::async_trait]
impl proto::gateway_server::Gateway for Gateway {
    type RunStream = Boxed<proto::RunEvent>;

    async fn run(&self, req: Request<proto::RunRequest>) -> Result<Response<Self::RunStream>, Status> {
        let plans = self.state.plan(req.into_inner()).await?;
        let (tx, rx) = mpsc::channel(events::EVENT_QUEUE);
        let id = RequestId::new();
        tokio::spawn(run::run(
            Arc::clone(&self.state),
            id,
            plans,
            events::Events::new(tx),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn put_file(
        &self,
        req: Request<Streaming<proto::PutFileRequest>>,
    ) -> Result<Response<proto::FileRef>, Status> {
        Ok(Response::new(
            files::put_file(&self.state, req.into_inner()).await?,
        ))
    }

    type GetFileStream = Boxed<proto::FileChunk>;

    async fn get_file(
        &self,
        req: Request<proto::GetFileRequest>,
    ) -> Result<Response<Self::GetFileStream>, Status> {
        let rx = files::get_file(&self.state, req.into_inner()).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Serves the gateway on `listener` until `shutdown` is cancelled.
pub async fn serve(
    args: &GatewayArgs,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), BoxError> {
    let tokens = match (&args.auth_tokens_file, args.no_auth) {
        (Some(path), _) => Some(Tokens::load(path)?),
        (None, true) => None,
        (None, false) => {
            return Err(
                "no PREFAB_AUTH_TOKENS_FILE is set; give one, or --no-auth to serve without authentication"
                    .into(),
            );
        }
    };
    let state = State::from_args(args)?;
    tracing::info!(
        addr = %listener.local_addr()?,
        workspace_root = %state.root.path().display(),
        bucket = %state.bucket,
        auth = tokens.is_some(),
        "gateway serving"
    );
    // After the grace period, runs still in flight are cancelled and cleaned.
    let (stop, grace) = (
        state.stop.clone(),
        Duration::from_secs(args.shutdown_grace_seconds),
    );
    let signal = shutdown.clone();
    tokio::spawn(async move {
        signal.cancelled().await;
        tracing::info!(
            grace_seconds = grace.as_secs(),
            "no new runs; waiting for in-flight runs"
        );
        tokio::time::sleep(grace).await;
        stop.cancel();
    });
    let service = GatewayServer::with_interceptor(Gateway::new(state), auth::interceptor(tokens));
    let router = crate::server::base_router(GATEWAY_SERVICE)
        .await?
        .add_service(service);
    crate::server::serve_router(router, listener, shutdown).await
}
