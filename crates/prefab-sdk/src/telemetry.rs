//! The W3C trace context in and out of a runtime: the gateway's
//! `traceparent`/`tracestate` metadata on `Invoke` is continued by the
//! call's span ([`Remote::continue_in`]), and a function hands it on
//! ([`Propagated`]) to the services it calls or, as `TRACEPARENT`/
//! `TRACESTATE`, to the programs it starts. The spans are exported where
//! the process installs an OpenTelemetry layer (the `prefab` binary does
//! when `OTEL_EXPORTER_OTLP_ENDPOINT` is set); without one the context is
//! passed on as it came, so a trace continues across a process that does
//! not export.

use std::{collections::HashMap, env};

use opentelemetry::{
    Context,
    propagation::{Extractor, Injector, TextMapPropagator as _},
    trace::TraceContextExt as _,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The W3C header names, as gRPC metadata keys.
const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

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
