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

use std::{collections::HashMap, env};

use opentelemetry::{
    Context,
    propagation::{Extractor, Injector, TextMapPropagator as _},
    trace::{TraceContextExt as _, TracerProvider as _},
};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The W3C header names, as gRPC metadata keys.
const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

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

/// Marks `span` failed with `status`, for the trace (without an exporter,
/// nothing).
pub fn record_failure(span: &Span, status: &tonic::Status) {
    let described = format!("{:?}: {}", status.code(), status.message());
    span.set_status(opentelemetry::trace::Status::error(described));
    span.set_attribute("rpc.grpc.status_code", status.code() as i64);
}

/// A W3C trace context received from a caller, validated.
#[derive(Debug, Clone, Default)]
pub struct Remote(Context);

impl Remote {
    /// The context in a request's metadata (none, if it is missing or
    /// malformed: a bad header starts a new trace, it fails nothing).
    pub fn from_metadata(metadata: &tonic::metadata::MetadataMap) -> Self {
        Self(TraceContextPropagator::new().extract(&Metadata(metadata)))
    }

    /// The context in `TRACEPARENT`/`TRACESTATE` of this process's
    /// environment (how a program is handed a trace to continue).
    pub fn from_env() -> Self {
        let carrier: HashMap<String, String> = [TRACEPARENT, TRACESTATE]
            .into_iter()
            .filter_map(|name| Some((name.to_owned(), env::var(name.to_uppercase()).ok()?)))
            .collect();
        Self(TraceContextPropagator::new().extract(&carrier))
    }

    /// This context, to pass on unchanged (a client that makes no span of
    /// its own).
    pub fn passed_on(self) -> Propagated {
        Propagated(self.0)
    }

    /// Makes `span` continue this context (when spans are exported) and
    /// records the trace id in its `trace_id` field, so that every log line
    /// inside it names the trace. Returns the context to pass on from
    /// `span`: its own when exporting, otherwise this one as it came.
    pub fn continue_in(self, span: &Span) -> Propagated {
        if self.0.span().span_context().is_valid() {
            // Fails only without an OpenTelemetry layer, when there is no
            // span of ours to join: the context is then passed on as is.
            let _ = span.set_parent(self.0.clone());
        }
        let propagated = Propagated::of(span).unwrap_or(Propagated(self.0));
        if let Some(id) = propagated.trace_id() {
            span.record("trace_id", tracing::field::display(id));
        }
        propagated
    }
}

/// A trace context to hand on: the span it was taken from when exporting,
/// the caller's as received otherwise (possibly empty).
#[derive(Debug, Clone, Default)]
pub struct Propagated(Context);

impl Propagated {
    /// The context of `span`, if spans are exported.
    fn of(span: &Span) -> Option<Self> {
        let cx = span.context();
        cx.span().span_context().is_valid().then_some(Self(cx))
    }

    /// The context to pass on from `span`: its own when spans are exported,
    /// otherwise `self`.
    pub fn from_span(&self, span: &Span) -> Self {
        Self::of(span).unwrap_or_else(|| self.clone())
    }

    /// The trace id, if there is a trace.
    pub fn trace_id(&self) -> Option<String> {
        let span = self.0.span();
        let cx = span.span_context();
        cx.is_valid().then(|| cx.trace_id().to_string())
    }

    /// The W3C headers, lower-case names (`traceparent`, `tracestate`).
    pub fn headers(&self) -> HashMap<String, String> {
        let mut carrier = HashMap::new();
        if self.0.span().span_context().is_valid() {
            TraceContextPropagator::new().inject_context(&self.0, &mut carrier);
        }
        carrier
    }

    /// Puts the headers into a request's metadata.
    pub fn inject(&self, metadata: &mut tonic::metadata::MetadataMap) {
        if self.0.span().span_context().is_valid() {
            TraceContextPropagator::new().inject_context(&self.0, &mut MetadataMut(metadata));
        }
    }

    /// The environment a program continues the trace from:
    /// `TRACEPARENT` and, if any, `TRACESTATE`.
    pub fn env(&self) -> impl Iterator<Item = (String, String)> {
        self.headers()
            .into_iter()
            .map(|(name, value)| (name.to_uppercase(), value))
    }
}

struct Metadata<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for Metadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        [TRACEPARENT, TRACESTATE]
            .into_iter()
            .filter(|k| self.0.contains_key(*k))
            .collect()
    }
}

struct MetadataMut<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        let key = tonic::metadata::MetadataKey::from_bytes(key.as_bytes());
        if let (Ok(key), Ok(value)) = (key, value.parse()) {
            self.0.insert(key, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn without_an_exporter_the_callers_context_is_passed_on_as_it_came() {
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert(TRACEPARENT, PARENT.parse().unwrap());
        metadata.insert(TRACESTATE, "vendor=abc".parse().unwrap());
        let span = tracing::info_span!("run", trace_id = tracing::field::Empty);
        let propagated = Remote::from_metadata(&metadata).continue_in(&span);
        assert_eq!(
            propagated.trace_id().as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        let headers = propagated.from_span(&span).headers();
        assert_eq!(headers[TRACEPARENT], PARENT);
        assert_eq!(headers[TRACESTATE], "vendor=abc");
        let env: HashMap<_, _> = propagated.env().collect();
        assert_eq!(env["TRACEPARENT"], PARENT);
    }

    #[test]
    fn a_malformed_or_missing_context_is_no_context() {
        for bad in [
            "",
            "00-zz-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            let mut metadata = tonic::metadata::MetadataMap::new();
            metadata.insert(TRACEPARENT, bad.parse().unwrap());
            let span = tracing::info_span!("run");
            let propagated = Remote::from_metadata(&metadata).continue_in(&span);
            assert_eq!(propagated.trace_id(), None, "{bad:?}");
            assert!(propagated.headers().is_empty());
            let mut out = tonic::metadata::MetadataMap::new();
            propagated.inject(&mut out);
            assert!(out.is_empty());
        }
    }
}
