//! Prometheus metrics of the gateway, served as text on `/metrics` of a
//! separate HTTP port.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Labels of a run's outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// `ok`, or the gRPC code name of the failure.
    pub outcome: String,
}

/// Labels of a run phase.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Phase {
    /// `stage`, `invoke` or `upload`.
    pub phase: &'static str,
}

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    /// Runs finished, by outcome.
    pub runs: Family<Outcome, Counter>,
    /// Wall time of whole runs, in seconds.
    pub run_seconds: Histogram,
    /// Wall time of each phase of a call, in seconds.
    pub phase_seconds: Family<Phase, Histogram>,
    /// Bytes copied from S3 to workspaces.
    pub bytes_staged: Counter,
    /// Bytes uploaded from workspaces to S3.
    pub bytes_uploaded: Counter,
    /// Runs in progress.
    pub runs_in_flight: Gauge,
    /// Bytes of workspace reserved by admitted runs.
    pub reserved_bytes: Gauge,
    /// Used fraction of the workspace volume, in thousandths.
    pub disk_usage_permille: Gauge,
    /// Workspaces the janitor removed.
    pub janitor_removed: Counter,
    /// Bytes the janitor freed.
    pub janitor_freed_bytes: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("prefab_gateway");
        let seconds = || Histogram::new(exponential_buckets(0.01, 2.0, 20));
        let m = Self {
            runs: Family::default(),
            run_seconds: seconds(),
            phase_seconds: Family::new_with_constructor(seconds),
            bytes_staged: Counter::default(),
            bytes_uploaded: Counter::default(),
            runs_in_flight: Gauge::default(),
            reserved_bytes: Gauge::default(),
            disk_usage_permille: Gauge::default(),
            janitor_removed: Counter::default(),
            janitor_freed_bytes: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("runs", "Runs finished, by outcome", m.runs.clone());
        registry.register("run_duration_seconds", "Wall time of runs", m.run_seconds.clone());
        registry.register(
            "phase_duration_seconds",
            "Wall time of run phases",
            m.phase_seconds.clone(),
        );
        registry.register("staged_bytes", "Bytes staged from S3", m.bytes_staged.clone());
        registry.register("uploaded_bytes", "Bytes uploaded to S3", m.bytes_uploaded.clone());
        registry.register("runs_in_flight", "Runs in progress", m.runs_in_flight.clone());
        registry.register(
            "reserved_bytes",
            "Workspace bytes reserved by admitted runs",
            m.reserved_bytes.clone(),
        );
        registry.register(
            "workspace_disk_usage_permille",
            "Used thousandths of the workspace volume",
            m.disk_usage_permille.clone(),
        );
        registry.register(
            "janitor_removed_workspaces",
            "Workspaces removed by the janitor",
            m.janitor_removed.clone(),
        );
        registry.register(
            "janitor_freed_bytes",
            "Bytes freed by the janitor",
            m.janitor_freed_bytes.clone(),
        );
        Self { registry, ..m }
    }
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Serves `/metrics` on `listener` until `shutdown`.
pub async fn serve(metrics: Arc<Metrics>, listener: TcpListener, shutdown: CancellationToken) {
    let http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    loop {
        let socket = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => socket,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let _ = socket.set_nodelay(true);
        let metrics = Arc::clone(&metrics);
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let metrics = Arc::clone(&metrics);
            async move { Ok::<_, Infallible>(respond(&metrics, req.uri().path())) }
        });
        let conn = http.serve_connection(TokioIo::new(socket), service).into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

fn respond(metrics: &Metrics, path: &str) -> Response<Full<Bytes>> {
    let (status, body, kind) = match path {
        "/metrics" => (200, metrics.render(), "text/plain; version=0.0.4; charset=utf-8"),
        _ => (404, "not found; try /metrics\n".to_owned(), "text/plain"),
    };
    Response::builder()
        .status(status)
        .header("content-type", kind)
        .body(Full::new(Bytes::from(body)))
        .expect("a static response is valid")
}

/// Binds `addr` for [`serve`].
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.runs.get_or_create(&Outcome { outcome: "ok".into() }).inc();
        m.reserved_bytes.set(42);
        let text = m.render();
        assert!(
            text.contains("prefab_gateway_runs_total{outcome=\"ok\"} 1"),
            "{text}"
        );
        assert!(text.contains("prefab_gateway_reserved_bytes 42"), "{text}");
        assert!(
            text.contains("prefab_gateway_janitor_removed_workspaces_total 0"),
            "{text}"
        );
    }
}
