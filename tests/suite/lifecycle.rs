//! The workspace lifecycle with real gateways sharing a real folder:
//! leases, the janitor, admission, cancellation at every phase, graceful
//! shutdown and re-attaching with Watch.

use crate::common;

use std::time::Duration;

use common::*;
use prefab::proto::{self, run_event::Event};
use tonic::Code;

/// Reads the next event, skipping heartbeats.
async fn next_event(stream: &mut tonic::Streaming<proto::RunEvent>) -> proto::RunEvent {
    loop {
        let msg = stream.message().await.expect("stream ok").expect("stream open");
        if !matches!(msg.event, Some(Event::Heartbeat(_))) {
            return msg;
        }
    }
}

/// Reads until an event matches `pred`; returns the request id seen.
async fn read_until(stream: &mut tonic::Streaming<proto::RunEvent>, pred: impl Fn(&Event) -> bool) -> String {
    let mut id = String::new();
    loop {
        let msg = next_event(stream).await;
        let event = msg.event.unwrap();
        if let Event::Accepted(a) = &event {
            id = a.request_id.clone();
        }
        if pred(&event) {
            return id;
        }
    }
}

/// The rest of a stream: events, then the status that ended it (OK for a
/// clean end).
async fn drain(stream: &mut tonic::Streaming<proto::RunEvent>) -> (Vec<proto::RunEvent>, tonic::Status) {
    let mut events = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(e)) => events.push(e),
            Ok(None) => return (events, tonic::Status::ok("")),
            Err(s) => return (events, s),
        }
    }
}

/// The status a run ends with: refused at once, or at the end of its stream.
async fn end_of(
    client: &mut prefab::proto::gateway_client::GatewayClient<tonic::transport::Channel>,
    req: tonic::Request<proto::RunRequest>,
) -> tonic::Status {
    match client.run(req).await {
        Ok(resp) => drain(&mut resp.into_inner()).await.1,
        Err(status) => status,
    }
}

fn sigterm(child: &tokio::process::Child) {
    let pid = rustix::process::Pid::from_raw(child.id().unwrap() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_keep_live_runs_and_free_a_dead_gateways_workspace() {
    // Gateway B (in-process) sweeps every second, with a max age of one
    // second and two-second leases.
    let fast = [
        "--janitor-interval-seconds=1",
        "--workspace-max-age-seconds=1",
        "--lease-ttl-seconds=2",
    ];
    let stack = Stack::start_with(&fast).await;
    // Gateway A is a real process on the same folder, with the same settings.
    let (mut gateway_a, mut client_a) = stack.gateway_process_with(&fast, None).await;

    // Something that is not a workspace, and a workspace nobody leases.
    let foreign = stack.workspace_root.join("lost+found");
    std::fs::create_dir(&foreign).unwrap();
    let orphan = stack.workspace_root.join(uuid::Uuid::new_v4().to_string());
    std::fs::create_dir(&orphan).unwrap();

    // A run on A that A will not live to finish.
    let mut doomed = client_a
        .run(run_request("sleep", serde_json::json!({ "seconds": 60 })))
        .await
        .unwrap()
        .into_inner();
    let doomed_id = read_until(&mut doomed, |e| matches!(e, Event::RuntimeProgress(_))).await;
    let doomed_dir = stack.workspace_root.join(&doomed_id);

    // A run on B that lasts longer than the max age and than the lease TTL.
    let mut client_b = stack.client().await;
    let mut long = client_b
        .run(authed(run_request("sleep", serde_json::json!({ "seconds": 8 }))))
        .await
        .unwrap()
        .into_inner();
    let long_id = read_until(&mut long, |e| matches!(e, Event::RuntimeProgress(_))).await;
    let long_dir = stack.workspace_root.join(&long_id);

    // Both janitors have swept several times by now, and an unrenewed
    // lease would have expired: live workspaces are untouched.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(
        doomed_dir.exists() && long_dir.exists(),
        "a live workspace was removed"
    );
    assert!(!orphan.exists(), "the unleased, old workspace was not removed");

    gateway_a.kill().await.unwrap(); // SIGKILL: no cleanup of its own
    drop(doomed);
    wait_for("B's janitor to remove A's abandoned workspace", || {
        !doomed_dir.exists()
    })
    .await;

    let (events, status) = drain(&mut long).await;
    assert_eq!(status.code(), Code::Ok, "{status:?}");
    assert!(
        events
            .iter()
            .any(|e| matches!(e.event, Some(Event::RunCompleted(_))))
    );
    assert!(
        foreign.exists(),
        "the janitor touched a folder that is not a workspace"
    );
    std::fs::remove_dir(&foreign).unwrap();
    stack.wait_idle().await;
}

async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_janitor_logs_its_summary_and_metrics_follow() {
    let stack = Stack::start().await;
    let log = stack.tmp.path().join("gateway.log");
    let metrics = format!("127.0.0.1:{}", free_port());
    let abandoned = stack.workspace_root.join(uuid::Uuid::new_v4().to_string());
    std::fs::create_dir_all(abandoned.join("inputs")).unwrap();
    std::fs::write(abandoned.join("inputs/data.bin"), vec![7u8; 1_500_000]).unwrap();
    let flags = [
        "--janitor-interval-seconds=1",
        "--workspace-max-age-seconds=0",
        &format!("--metrics-addr={metrics}"),
    ];
    let (mut gateway, mut client) = stack.gateway_process_with(&flags, Some(&log)).await;

    let read_log = || String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
    wait_for("the cleanup summary", || {
        read_log().contains("Cleanup summary: removed 1 workspaces, freed 1.50 MB")
    })
    .await;
    wait_for("the disk usage line", || {
        read_log().contains("Workspace disk usage: ")
    })
    .await;
    assert!(!abandoned.exists());

    let url = stack.put_input("m.txt", b"a b c".to_vec()).await;
    run_to_end(
        &mut client,
        run_request("word_count", serde_json::json!({ "text": url })),
    )
    .await
    .unwrap();
    let body = http_get(&metrics, "/metrics").await;
    for line in [
        "prefab_gateway_janitor_removed_workspaces_total 1",
        "prefab_gateway_janitor_freed_bytes_total 1500000",
        "prefab_gateway_runs_total{outcome=\"ok\"} 1",
        "prefab_gateway_staged_bytes_total 5",
        "prefab_gateway_runs_in_flight 0",
        "prefab_gateway_reserved_bytes 0",
        "prefab_gateway_phase_duration_seconds_count{phase=\"invoke\"} 1",
    ] {
        assert!(body.contains(line), "{line} missing from:\n{body}");
    }
    assert!(body.contains("prefab_gateway_workspace_disk_usage_permille"));
    // The run's log lines carry its request id.
    let text = read_log();
    assert!(text.contains("request_id="), "log:\n{text}");
    common::stop(&mut gateway).await;
}

const HOLD: &str = r#"
id = "hold"
version = "1.0.0"

[[function]]
name = "hold"
parameters = [{ name = "file", type = "InputFile" }]
exec = { command = ["sh", "-c", "sleep 3", "{file}"] }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_beyond_the_volume_is_partly_refused_and_the_rest_completes() {
    // A 100 MB budget with a 90% high-water mark; each run reserves twice
    // its 10 MiB input, so four fit and the rest are refused.
    let stack = Stack::start_full(&["--workspace-capacity-bytes=100000000"], &[HOLD]).await;
    let url = stack.put_input("burst/10mib.bin", vec![1u8; 10 << 20]).await;
    let mut runs = Vec::new();
    for _ in 0..8 {
        let mut client = stack.client().await;
        let req = call_request("hold", "hold", serde_json::json!({ "file": url }));
        runs.push(tokio::spawn(async move { run_to_end(&mut client, req).await }));
    }
    let (mut ok, mut refused) = (0, 0);
    for run in runs {
        match run.await.unwrap() {
            Ok(events) => {
                assert!(matches!(events.last(), Some(Event::RunCompleted(_))));
                ok += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(
                    status.message().contains("high-water mark"),
                    "{}",
                    status.message()
                );
                // For programs: a quota, and when to try again.
                use tonic_types::StatusExt;
                let details = status.check_error_details().unwrap();
                assert_eq!(details.error_info().unwrap().reason, "ADMISSION_REFUSED");
                let quota = details.quota_failure().expect("a QuotaFailure");
                assert!(quota.violations[0].description.contains("high-water mark"));
                assert!(details.retry_info().is_some_and(|r| r.retry_delay.is_some()));
                refused += 1;
            }
        }
    }
    assert_eq!((ok, refused), (4, 4));
    stack.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disconnecting_while_staging_or_uploading_leaves_nothing() {
    let stack = Stack::start().await;
    let url = stack.put_input("cancel/big.txt", text(96 << 20, 5)).await;

    // During staging.
    let mut client = stack.client().await;
    let mut stream = client
        .run(authed(run_request(
            "uppercase",
            serde_json::json!({ "text": url }),
        )))
        .await
        .unwrap()
        .into_inner();
    read_until(
        &mut stream,
        |e| matches!(e, Event::Staging(p) if p.bytes_done > 0),
    )
    .await;
    drop(stream);
    stack.wait_idle().await;

    // During the upload of a multipart output.
    let mut stream = client
        .run(authed(run_request(
            "uppercase",
            serde_json::json!({ "text": url }),
        )))
        .await
        .unwrap()
        .into_inner();
    let id = read_until(&mut stream, |e| matches!(e, Event::Uploading(_))).await;
    wait_for("a multipart upload to start", || {
        !open_multipart_uploads(&stack).is_empty()
    })
    .await;
    drop(stream);
    stack.wait_idle().await;
    wait_for("the multipart upload to be aborted", || {
        open_multipart_uploads(&stack).is_empty()
    })
    .await;
    let outputs = stack.tmp.path().join("s3").join(BUCKET).join("outputs").join(&id);
    assert!(list(&outputs).is_empty(), "an output object was left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_lets_short_runs_finish_and_cleans_the_rest() {
    let stack = Stack::start().await;
    let (gateway, client) = stack
        .gateway_process_with(&["--shutdown-grace-seconds=2"], None)
        .await;
    let (mut c1, mut c2) = (client.clone(), client);
    let mut short = c1
        .run(run_request("sleep", serde_json::json!({ "seconds": 1 })))
        .await
        .unwrap()
        .into_inner();
    let mut long = c2
        .run(run_request("sleep", serde_json::json!({ "seconds": 30 })))
        .await
        .unwrap()
        .into_inner();
    read_until(&mut short, |e| matches!(e, Event::RuntimeProgress(_))).await;
    read_until(&mut long, |e| matches!(e, Event::RuntimeProgress(_))).await;
    sigterm(&gateway);

    let (events, status) = drain(&mut short).await;
    assert_eq!(status.code(), Code::Ok, "{status:?}");
    assert!(matches!(
        events.last().and_then(|e| e.event.as_ref()),
        Some(Event::RunCompleted(_))
    ));
    let (_, status) = drain(&mut long).await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shut down"), "{}", status.message());
    stack.wait_idle().await;
    let mut gateway = gateway;
    let exit = tokio::time::timeout(Duration::from_secs(10), gateway.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "gateway exited with {exit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_detached_run_is_followed_again_with_watch() {
    let stack = Stack::start().await;
    let mut client = stack.client().await;
    let mut req = run_request("sleep", serde_json::json!({ "seconds": 2 }));
    req.on_disconnect = proto::OnDisconnect::Detach as i32;
    let mut stream = client.run(authed(req)).await.unwrap().into_inner();
    let first = next_event(&mut stream).await;
    let Some(Event::Accepted(accepted)) = first.event else {
        panic!("accepted first")
    };
    assert_eq!(first.sequence, 1);
    let mut last;
    loop {
        let msg = next_event(&mut stream).await;
        last = msg.sequence;
        if matches!(msg.event, Some(Event::RuntimeProgress(_))) {
            break;
        }
    }
    drop(stream);
    drop(client);
    // The run goes on without a reader.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(stack.workspace_root.join(&accepted.request_id).exists());
    assert_eq!(stack.runtime_active.load(std::sync::atomic::Ordering::SeqCst), 1);

    let mut client = stack.client().await;
    let watch = proto::WatchRequest {
        request_id: accepted.request_id.clone(),
        after_sequence: last,
    };
    let mut stream = client.watch(authed(watch)).await.unwrap().into_inner();
    let (events, status) = drain(&mut stream).await;
    assert_eq!(status.code(), Code::Ok, "{status:?}");
    let seqs: Vec<u64> = events.iter().map(|e| e.sequence).filter(|s| *s > 0).collect();
    assert_eq!(seqs.first(), Some(&(last + 1)), "{seqs:?}");
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    assert!(matches!(
        events.last().and_then(|e| e.event.as_ref()),
        Some(Event::RunCompleted(_))
    ));
    assert!(
        events
            .iter()
            .any(|e| matches!(&e.event, Some(Event::CallCompleted(c))
        if proto::struct_to_json(c.outputs.clone().unwrap())["slept"] == serde_json::json!(2)))
    );

    let unknown = proto::WatchRequest {
        request_id: uuid::Uuid::new_v4().to_string(),
        after_sequence: 0,
    };
    let status = client.watch(authed(unknown)).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    stack.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deadline_cancels_and_cleans_the_run() {
    let stack = Stack::start().await;
    let mut client = stack.client().await;
    let mut req = authed(run_request("sleep", serde_json::json!({ "seconds": 30 })));
    req.set_timeout(Duration::from_millis(1500));
    let status = end_of(&mut client, req).await;
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    stack.wait_idle().await;
}

/// A gateway process reaching the runtime through a proxy that holds the
/// runtime's first answer (to the gateway's Describe) back for 2 s.
async fn behind_a_slow_describe(
    stack: &Stack,
) -> (
    common::proxy::Proxy,
    tokio::process::Child,
    prefab::proto::gateway_client::GatewayClient<tonic::transport::Channel>,
) {
    use common::proxy::{Fault, Proxy};
    let proxy = Proxy::start(stack.runtime_addr, Fault::DelayFirst(Duration::from_secs(2))).await;
    let endpoint = format!("--endpoints=hello-world-prefab@1.0.0=http://{}", proxy.addr);
    let (gateway, client) = stack.gateway_process_with(&[&endpoint], None).await;
    (proxy, gateway, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_deadline_counts_from_the_request_not_from_the_start_of_the_work() {
    let stack = Stack::start().await;
    let (proxy, mut gateway, mut client) = behind_a_slow_describe(&stack).await;
    // 2 s of describing and 3 s of sleeping do not fit in 4 s.
    let mut req = authed(run_request("sleep", serde_json::json!({ "seconds": 3 })));
    req.set_timeout(Duration::from_secs(4));
    let status = end_of(&mut client, req).await;
    assert!(proxy.fired(), "the runtime was not reached through the proxy");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    common::stop(&mut gateway).await;
    stack.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deadline_passed_before_the_run_starts_is_named_as_such() {
    let stack = Stack::start().await;
    // The gateway is still waiting for the runtime's Describe when the
    // caller's second runs out: the caller hears DEADLINE_EXCEEDED from the
    // gateway, not the server framework's bare CANCELLED.
    let (_proxy, mut gateway, mut client) = behind_a_slow_describe(&stack).await;
    let mut req = authed(run_request("sleep", serde_json::json!({ "seconds": 0 })));
    req.set_timeout(Duration::from_secs(1));
    let status = end_of(&mut client, req).await;
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("deadline of 1s"), "{status:?}");
    common::stop(&mut gateway).await;
    stack.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_detached_run_ends_at_the_gateways_limit() {
    let stack = Stack::start_with(&["--max-run-seconds=1"]).await;
    let mut client = stack.client().await;
    // No deadline from the caller, who may leave: the gateway's limit ends it.
    let mut req = run_request("sleep", serde_json::json!({ "seconds": 30 }));
    req.on_disconnect = proto::OnDisconnect::Detach as i32;
    let status = end_of(&mut client, authed(req)).await;
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("PREFAB_MAX_RUN_SECONDS"), "{status:?}");
    // A caller's shorter deadline is still its own.
    let mut req = authed(run_request("sleep", serde_json::json!({ "seconds": 30 })));
    req.set_timeout(Duration::from_millis(500));
    let status = end_of(&mut client, req).await;
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(!status.message().contains("PREFAB_MAX_RUN_SECONDS"), "{status:?}");
    stack.wait_idle().await;
}
