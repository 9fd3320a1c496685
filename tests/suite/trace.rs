//! Distributed tracing across real processes: a caller's W3C trace context
//! goes through the gateway to the runtimes and into an exec program, and,
//! with `OTEL_EXPORTER_OTLP_ENDPOINT` set, every process exports its spans
//! of the run to an OTLP/gRPC collector (here one inside the test) as one
//! trace under the caller's span.

use crate::common;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{BUCKET, INPUT_BUCKET, call, connect, outputs, request, start_listening, url_of};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value,
    trace::v1::Span,
};
use prefab::{
    dev,
    proto::{gateway_client::GatewayClient, run_event::Event},
};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// The caller's context: its trace, and its span the run is a child of.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
const TRACESTATE: &str = "caller=7";

fn traceparent() -> String {
    format!("00-{TRACE_ID}-{CALLER_SPAN}-01")
}

/// An exec prefab whose program writes the trace context it was given.
const TRACED: &str = r#"
id = "traced"
version = "1.0.0"
description = "Writes the trace context it runs in"

[[function]]
name = "context"
description = "Writes TRACEPARENT and TRACESTATE"
parameters = [
  { name = "file", type = "InputFile" },
  { name = "output", type = "OutputFile", extension = "txt" },
]
exec = { command = ["sh", "-c", "printf '%s %s' \"$TRACEPARENT\" \"$TRACESTATE\" > \"$1\"", "sh", "{output}"] }
"#;

/// A span as received, with the service that sent it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    span: Span,
}

impl Received {
    fn trace_id(&self) -> String {
        hex::encode(&self.span.trace_id)
    }

    fn id(&self) -> String {
        hex::encode(&self.span.span_id)
    }

    fn parent(&self) -> String {
        hex::encode(&self.span.parent_span_id)
    }
}

/// An OTLP/gRPC trace collector that keeps what it is sent.
#[derive(Default, Clone)]
struct Collector(Arc<Mutex<Vec<Received>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = self.0.lock().unwrap();
        for resource in req.into_inner().resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    any_value::Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for span in resource.scope_spans.into_iter().flat_map(|s| s.spans) {
                received.push(Received {
                    service: service.clone(),
                    span,
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Serves on a loopback port until `stop`; returns its endpoint.
    async fn serve(&self, stop: CancellationToken) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(self.clone()))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop.cancelled_owned(),
            );
        tokio::spawn(server);
        format!("http://{addr}")
    }

    fn spans(&self) -> Vec<Received> {
        self.0.lock().unwrap().clone()
    }
}

/// The embedded store, and the `prefab` processes of one cluster: the
/// example runtime, an exec runtime and a gateway.
struct Cluster {
    tmp: tempfile::TempDir,
    s3: prefab::storage::Storage,
    client: GatewayClient<Channel>,
    gateway: SocketAddr,
    _processes: Vec<Child>,
    _stop: StopOnDrop,
}

struct StopOnDrop(CancellationToken);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

impl Cluster {
    /// Starts everything, each process with `env` added.
    async fn start(env: &[(&str, &str)]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("workspaces");
        std::fs::create_dir(&root).unwrap();
        let manifest = tmp.path().join("traced.toml");
        std::fs::write(&manifest, TRACED).unwrap();
        let stop = CancellationToken::new();
        let (s3_addr, _) = dev::s3::spawn(
            &tmp.path().join("s3"),
            &[BUCKET, INPUT_BUCKET],
            "127.0.0.1:0".parse().unwrap(),
            stop.clone(),
        )
        .await
        .expect("embedded S3 starts");
        let s3_endpoint = format!("http://{s3_addr}");
        let s3 = prefab::storage::connect(&common::s3_args(&s3_endpoint).settings()).unwrap();

        let root_flag = format!("--workspace-root={}", root.display());
        let start = |args: Vec<String>, log: &'static str| {
            let log = tmp.path().join(log);
            let env: Vec<(String, String)> =
                env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            async move {
                let command = |addr: SocketAddr| {
                    let mut cmd = Command::new(env!("CARGO_BIN_EXE_prefab"));
                    cmd.args(&args)
                        .arg(format!("--addr={addr}"))
                        .env("AWS_ACCESS_KEY_ID", dev::s3::ACCESS_KEY)
                        .env("AWS_SECRET_ACCESS_KEY", dev::s3::SECRET_KEY)
                        .env("RUST_LOG", "info")
                        .envs(env.iter().map(|(k, v)| (k, v)));
                    cmd
                };
                start_listening(command, &log).await
            }
        };
        let (hello, hello_addr) = start(
            vec!["runtime".into(), "hello".into(), root_flag.clone()],
            "hello.log",
        )
        .await;
        let (traced, traced_addr) = start(
            vec![
                "runtime".into(),
                "exec".into(),
                format!("--manifest={}", manifest.display()),
                root_flag.clone(),
            ],
            "traced.log",
        )
        .await;
        let endpoints = format!(
            "--endpoints=hello-world-prefab@1.0.0=http://{hello_addr},traced@1.0.0=http://{traced_addr}"
        );
        let gateway_args = vec![
            "gateway".into(),
            "--no-auth".into(),
            root_flag,
            endpoints,
            "--endpoint-template=".into(),
            format!("--allowed-buckets={INPUT_BUCKET}"),
            format!("--s3-endpoint-url={s3_endpoint}"),
            format!("--s3-bucket={BUCKET}"),
        ];
        let (gateway, gateway_addr) = start(gateway_args, "gateway.log").await;
        Self {
            client: connect(gateway_addr).await,
            gateway: gateway_addr,
            tmp,
            s3,
            _processes: vec![hello, traced, gateway],
            _stop: StopOnDrop(stop),
        }
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.tmp.path().join(name)).unwrap_or_default()
    }

    /// Runs `word_count` and the tracing exec function on one input, with
    /// the caller's trace context in the metadata; returns what the program
    /// saw in its environment.
    async fn traced_run(&mut self) -> String {
        let put = self.s3.put_object().bucket(INPUT_BUCKET).key("a.txt");
        put.body(b"one two three\n".to_vec().into()).send().await.unwrap();
        let input = format!("s3://{INPUT_BUCKET}/a.txt");
        let mut req = tonic::Request::new(request(vec![
            call(
                "hello-world-prefab",
                "word_count",
                serde_json::json!({"text": input}),
            ),
            call("traced", "context", serde_json::json!({"file": input})),
        ]));
        req.metadata_mut()
            .insert("traceparent", traceparent().parse().unwrap());
        req.metadata_mut()
            .insert("tracestate", TRACESTATE.parse().unwrap());
        let mut stream = self.client.run(req).await.unwrap().into_inner();
        let mut events = Vec::new();
        while let Some(msg) = stream.message().await.unwrap() {
            events.push(msg.event.unwrap());
        }
        assert!(
            matches!(events.last(), Some(Event::RunCompleted(_))),
            "{events:?}"
        );
        let outputs = outputs(&events);
        assert_eq!(outputs[0]["words"], 3);
        let url = url_of(&outputs[1], "output");
        String::from_utf8(common::get_object(&self.s3, &url).await).unwrap()
    }
}

/// What `collector` holds once `done` says it is complete (bounded wait).
async fn collected(collector: &Collector, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
    for _ in 0..100 {
        let spans = collector.spans();
        if done(&spans) {
            return spans;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen: Vec<(String, String)> = collector
        .spans()
        .into_iter()
        .map(|r| (r.service, r.span.name))
        .collect();
    panic!("the trace never became complete; seen {seen:?}");
}

fn find<'a>(spans: &'a [Received], service: &str, name: &str) -> Vec<&'a Received> {
    spans
        .iter()
        .filter(|r| r.service == service && r.span.name == name && r.trace_id() == TRACE_ID)
        .collect()
}

fn attribute(r: &Received, key: &str) -> Option<String> {
    let kv = r.span.attributes.iter().find(|kv| kv.key == key)?;
    match kv.value.as_ref()?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        other => Some(format!("{other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_spans_caller_gateway_runtimes_and_program() {
    let collector = Collector::default();
    let stop = CancellationToken::new();
    let _stop = StopOnDrop(stop.clone());
    let endpoint = collector.serve(stop).await;
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let mut cluster = Cluster::start(&env).await;
    let seen = cluster.traced_run().await;

    let phases = [
        "run",
        "probe",
        "admission",
        "workspace",
        "stage",
        "hand_over",
        "invoke",
        "upload",
        "cleanup",
    ];
    let spans = collected(&collector, |spans| {
        phases
            .iter()
            .all(|p| !find(spans, "prefab-gateway", p).is_empty())
            && find(spans, "prefab-runtime", "invoke").len() == 2
    })
    .await;

    // The run continues the caller's span; every phase is inside the run.
    let runs = find(&spans, "prefab-gateway", "run");
    assert_eq!(runs.len(), 1, "{runs:?}");
    let run = runs[0];
    assert_eq!(run.parent(), CALLER_SPAN);
    let request_id = attribute(run, "request_id").expect("the run span names its request");
    assert_eq!(attribute(run, "prefab_id").as_deref(), Some("hello-world-prefab"));
    assert_eq!(attribute(run, "function_name").as_deref(), Some("word_count"));
    for phase in ["probe", "admission", "workspace", "cleanup"] {
        let found = find(&spans, "prefab-gateway", phase);
        assert_eq!(found.len(), 1, "{phase}: {found:?}");
        assert_eq!(found[0].parent(), run.id(), "{phase}");
    }
    // A stage and an upload per file: the input staged for the first call
    // (and handed to the second, which names the same object), one output
    // uploaded; an invoke per call.
    let stages = find(&spans, "prefab-gateway", "stage");
    assert_eq!(stages.len(), 1, "{stages:?}");
    assert_eq!(stages[0].parent(), run.id());
    assert_eq!(attribute(stages[0], "url").as_deref(), Some("s3://inputs/a.txt"));
    let handed = find(&spans, "prefab-gateway", "hand_over");
    assert_eq!(handed.len(), 1, "{handed:?}");
    assert_eq!(attribute(handed[0], "from").as_deref(), Some("s3://inputs/a.txt"));
    let uploads = find(&spans, "prefab-gateway", "upload");
    assert_eq!(uploads.len(), 1, "{uploads:?}");
    let gateway_invokes = find(&spans, "prefab-gateway", "invoke");
    assert_eq!(gateway_invokes.len(), 2, "{gateway_invokes:?}");

    // Each runtime's span is a child of the gateway's invoke of its call.
    let runtime_invokes = find(&spans, "prefab-runtime", "invoke");
    assert_eq!(runtime_invokes.len(), 2, "{runtime_invokes:?}");
    for runtime in &runtime_invokes {
        let parent = gateway_invokes
            .iter()
            .find(|g| g.id() == runtime.parent())
            .unwrap_or_else(|| panic!("no gateway span is the parent of {runtime:?}"));
        assert_eq!(attribute(parent, "function_name"), attribute(runtime, "function"));
    }

    // The program continues from the exec runtime's span, with the
    // caller's trace state.
    let traced = runtime_invokes
        .iter()
        .find(|r| attribute(r, "function").as_deref() == Some("context"))
        .unwrap();
    assert_eq!(seen, format!("00-{TRACE_ID}-{}-01 {TRACESTATE}", traced.id()));

    // The logs of the run name the trace.
    let log = cluster.log("gateway.log");
    let line = log
        .lines()
        .find(|l| l.contains(&request_id) && l.contains("run completed"))
        .unwrap_or_else(|| panic!("no completion line in {log}"));
    assert!(line.contains(&format!("trace_id={TRACE_ID}")), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_exporter_the_callers_context_reaches_the_program_as_sent() {
    let mut cluster = Cluster::start(&[]).await;
    let seen = cluster.traced_run().await;
    assert_eq!(seen, format!("{} {TRACESTATE}", traceparent()));
    let log = cluster.log("gateway.log");
    assert!(
        log.lines()
            .any(|l| l.contains("run completed") && l.contains(&format!("trace_id={TRACE_ID}"))),
        "{log}"
    );
    let runtime = cluster.log("traced.log");
    assert!(runtime.contains(&format!("trace_id={TRACE_ID}")), "{runtime}");

    // The CLI continues the trace its environment names.
    let downloads = cluster.tmp.path().join("downloads");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_prefab"))
        .args([
            "run",
            "traced",
            "context",
            "-i",
            "file=s3://inputs/a.txt",
            "--download",
        ])
        .arg(&downloads)
        .arg(format!("--gateway=http://{}", cluster.gateway))
        .env("TRACEPARENT", traceparent())
        .env("TRACESTATE", TRACESTATE)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let downloaded = common::list(&downloads);
    assert_eq!(downloaded.len(), 1, "{downloaded:?}");
    let seen = std::fs::read_to_string(&downloaded[0]).unwrap();
    assert_eq!(seen, format!("{} {TRACESTATE}", traceparent()));
}
