//! Distributed tracing: the W3C trace context in and out of every process,
//! and OpenTelemetry export when it is configured.
//!
//! A caller's `traceparent`/`tracestate` gRPC metadata is continued by the
//! run's span; the gateway passes the context on to the runtime's `Invoke`
//! (metadata), the runtime to its function (and to an exec program as
//! `TRACEPARENT`/`TRACESTATE`). Spans go out over OTLP/gRPC when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set, with the
//! standard `OTEL_*` variables for the service name, sampler, batching,
//! headers and timeouts. Otherwise no OpenTelemetry layer is installed: the
//! spans are the plain `tracing` spans the logs already have, and a caller's
//! context is passed on as it came, so a trace continues across a gateway
//! that does not export.

use std::env;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
pub use prefab_sdk::telemetry::{Propagated, Remote, record_failure};

/// Whether the environment asks for spans to be exported.
pub fn export_configured() -> bool {
    let set = |name| env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"))
        || env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.trim().eq_ignore_ascii_case("none"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Exports the spans of this process until [`Exporter::shutdown`].
pub struct Exporter {
    provider: SdkTracerProvider,
}

impl Exporter {
    /// An OTLP/gRPC exporter configured from the `OTEL_*` variables, with
    /// `service` as the service name unless `OTEL_SERVICE_NAME` (or
    /// `OTEL_RESOURCE_ATTRIBUTES`) names one. Must be called inside the
    /// Tokio runtime the exporter's connection will live on.
    pub fn from_env(service: &'static str) -> Result<Self, String> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|e| format!("cannot set up the OTLP trace exporter: {e}"))?;
        let named = env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty())
            || env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
        let mut resource = Resource::builder();
        if !named {
            resource = resource.with_service_name(service);
        }
        let resource = resource
            .with_attribute(opentelemetry::KeyValue::new(
                "service.version",
                crate::cli::VERSION,
            ))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        Ok(Self { provider })
    }

    /// The `tracing` layer that turns this process's spans into
    /// OpenTelemetry spans for this exporter.
    pub fn layer<S>(&self) -> impl tracing_subscriber::Layer<S> + use<S>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        tracing_opentelemetry::layer().with_tracer(self.provider.tracer("prefab"))
    }

    /// Sends what is still queued and stops.
    pub async fn shutdown(self) {
        // The batch processor's shutdown blocks until the last export ends.
        let provider = self.provider;
        let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(e)) = done {
            tracing::warn!(error = %e, "could not send the last spans to the OTLP endpoint");
        }
    }
}
