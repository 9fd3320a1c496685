//! End-to-end runs through the real gateway, runtime and S3 store.

use crate::common;

use common::*;
use prefab::proto::{self, run_event::Event};
use sha2::{Digest, Sha256};
use tonic::Code;

fn uploaded(events: &[Event]) -> Vec<proto::OutputUploaded> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Uploaded(u) => Some(u.clone()),
            _ => None,
        })
        .collect()
}

fn kind(e: &Event) -> &'static str {
    match e {
        Event::Accepted(_) => "accepted",
        Event::Staging(_) => "staging",
        Event::Staged(_) => "staged",
        Event::Invoking(_) => "invoking",
        Event::RuntimeProgress(_) => "runtime_progress",
        Event::RuntimeLog(_) => "runtime_log",
        Event::Uploading(_) => "uploading",
        Event::Uploaded(_) => "uploaded",
        Event::CallCompleted(_) => "call_completed",
        Event::RunCompleted(_) => "run_completed",
        Event::Heartbeat(_) => "heartbeat",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uppercase_64_mib_lands_under_the_request_prefix() {
    let stack = Stack::start().await;
    let input = text(64 << 20, 1);
    let url = stack.put_input("docs/big.txt", input.clone()).await;
    let mut client = stack.client().await;

    let events = run_to_end(
        &mut client,
        run_request("uppercase", serde_json::json!({ "text": url })),
    )
    .await
    .expect("run succeeds");

    // The phases arrive in order.
    let mut order: Vec<&str> = events.iter().map(kind).filter(|k| *k != "heartbeat").collect();
    order.dedup();
    assert_eq!(
        order,
        [
            "accepted",
            "staging",
            "staged",
            "invoking",
            "runtime_progress",
            "uploading",
            "uploaded",
            "call_completed",
            "run_completed"
        ]
    );
    let Event::Accepted(accepted) = &events[0] else {
        unreachable!()
    };
    let staged = events.iter().find_map(|e| match e {
        Event::Staged(s) => Some(s.clone()),
        _ => None,
    });
    let staged = staged.unwrap();
    assert_eq!(staged.size, input.len() as u64);
    assert_eq!(staged.crc64nvme, crc64nvme(&input));

    let files = uploaded(&events);
    assert_eq!(files.len(), 1);
    let prefix = format!("s3://{BUCKET}/outputs/{}/", accepted.request_id);
    let name = files[0]
        .url
        .strip_prefix(&prefix)
        .expect("output under outputs/<request_id>/");
    let (stem, ext) = name.split_once('.').unwrap();
    assert!(uuid::Uuid::parse_str(stem).is_ok() && ext == "txt", "{name}");

    let expected = input.to_ascii_uppercase();
    let output = stack.get(&files[0].url).await;
    assert!(output == expected, "output differs from the upper-cased input");
    assert_eq!(files[0].size, expected.len() as u64);
    assert_eq!(files[0].crc64nvme, crc64nvme(&expected));

    let Some(Event::CallCompleted(done)) = events.iter().find(|e| matches!(e, Event::CallCompleted(_)))
    else {
        unreachable!()
    };
    let outputs = proto::struct_to_json(done.outputs.clone().unwrap());
    assert_eq!(outputs["output"], serde_json::json!(files[0].url));
    stack.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn word_count_returns_values() {
    let stack = Stack::start().await;
    let url = stack.put_input("a.txt", b"one two  three\nfour\n".to_vec()).await;
    let mut client = stack.client().await;
    let events = run_to_end(
        &mut client,
        run_request("word_count", serde_json::json!({ "text": url })),
    )
    .await
    .unwrap();
    let done = events
        .iter()
        .find_map(|e| match e {
            Event::CallCompleted(c) => Some(c.clone()),
            _ => None,
        })
        .unwrap();
    let outputs = proto::struct_to_json(done.outputs.unwrap());
    assert_eq!(
        outputs,
        serde_json::json!({"words": 4, "lines": 2, "bytes": 20})
            .as_object()
            .unwrap()
            .clone()
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::RuntimeLog(l) if l.line.contains("4 words")))
    );
    stack.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_runs_keep_their_workspaces_apart() {
    let stack = Stack::start().await;
    let (a, b) = (text(3 << 20, 2), text(5 << 20, 3));
    let url_a = stack.put_input("a.txt", a.clone()).await;
    let url_b = stack.put_input("b.txt", b.clone()).await;
    let (mut ca, mut cb) = (stack.client().await, stack.client().await);
    let (ra, rb) = tokio::join!(
        run_to_end(
            &mut ca,
            run_request("uppercase", serde_json::json!({ "text": url_a }))
        ),
        run_to_end(
            &mut cb,
            run_request("uppercase", serde_json::json!({ "text": url_b }))
        ),
    );
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    let id = |ev: &[Event]| match &ev[0] {
        Event::Accepted(a) => a.request_id.clone(),
        _ => unreachable!(),
    };
    assert_ne!(id(&ra), id(&rb));
    assert!(stack.get(&uploaded(&ra)[0].url).await == a.to_ascii_uppercase());
    assert!(stack.get(&uploaded(&rb)[0].url).await == b.to_ascii_uppercase());
    stack.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failing_function_reports_its_message_and_cleans_up() {
    let stack = Stack::start().await;
    let mut client = stack.client().await;
    let status = run_to_end(
        &mut client,
        run_request("fail", serde_json::json!({ "message": "disk quota on fire" })),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::Unknown);
    assert!(
        status.message().contains("disk quota on fire"),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("hello-world-prefab@1.0.0"),
        "{}",
        status.message()
    );
    stack.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dropping_the_stream_cancels_the_function_and_removes_the_workspace() {
    let stack = Stack::start().await;
    let mut client = stack.client().await;
    let stream = start_until_running(
        &mut client,
        authed(run_request("sleep", serde_json::json!({ "seconds": 60 }))),
    )
    .await;
    assert_eq!(stack.workspaces().len(), 1);
    assert_eq!(stack.runtime_active.load(std::sync::atomic::Ordering::SeqCst), 1);
    drop(stream);
    drop(client);
    // Well before the 60 s sleep would end, the runtime has stopped the
    // function and the workspace is gone.
    stack.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sha256_of_256_mib_streams_through_a_gateway_of_bounded_memory() {
    const SIZE: usize = 256 << 20;
    let stack = Stack::start().await;
    // 256 MiB whose 1 MiB blocks all differ.
    let input = big_text(SIZE >> 20, 9);
    let expected = hex::encode(Sha256::digest(&input));
    let url = stack.put_input("big/blob.bin", input).await;

    // The gateway under test is the real binary in its own process, so its
    // memory can be measured alone.
    let (mut gateway, mut client) = stack.gateway_process().await;

    let events = run_to_end(
        &mut client,
        run_request("sha256", serde_json::json!({ "file": url })),
    )
    .await
    .expect("run succeeds");
    let done = events
        .iter()
        .find_map(|e| match e {
            Event::CallCompleted(c) => Some(proto::struct_to_json(c.outputs.clone().unwrap())),
            _ => None,
        })
        .unwrap();
    assert_eq!(done["sha256"], serde_json::json!(expected));
    // Streamed, not buffered: progress arrived while bytes were moving.
    let progress: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            Event::Staging(p) => Some(p.bytes_done),
            _ => None,
        })
        .collect();
    assert!(progress.len() >= 3, "staging progress events: {progress:?}");
    assert!(progress.windows(2).all(|w| w[0] <= w[1]));

    let peak = peak_rss_bytes(gateway.id().unwrap());
    eprintln!("gateway peak RSS: {} MiB", peak >> 20);
    assert!(
        peak < 96 << 20,
        "gateway peak RSS {} MiB for a 256 MiB input",
        peak >> 20
    );
    common::stop(&mut gateway).await;
    stack.wait_idle().await;
}

// Pipelines: a call's output file feeds a later call on the workspace.

/// The `InputStaged` events of call `index`.
fn staged(events: &[proto::RunEvent], index: u32) -> Vec<proto::InputStaged> {
    events
        .iter()
        .filter(|e| e.call_index == index)
        .filter_map(|e| match &e.event {
            Some(Event::Staged(s)) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

/// A call of the example prefab.
fn hello(function: &str, inputs: serde_json::Value) -> proto::Call {
    call("hello-world-prefab", function, inputs)
}

fn bodies(events: &[proto::RunEvent]) -> Vec<Event> {
    events.iter().filter_map(|e| e.event.clone()).collect()
}

/// A gateway process whose store requests go through a logging relay.
async fn gateway_via_relay(
    stack: &Stack,
) -> (
    relay::Relay,
    tokio::process::Child,
    prefab::proto::gateway_client::GatewayClient<tonic::transport::Channel>,
) {
    let store = stack.s3_endpoint.trim_start_matches("http://").parse().unwrap();
    let relay = relay::Relay::start(store, relay::Strict::default()).await;
    let log = stack.tmp.path().join("gateway.log");
    let (gateway, client) = stack
        .gateway_process_via(&relay.endpoint(), &[], Some(&log))
        .await;
    (relay, gateway, client)
}

/// The relay's requests that named `key`.
fn requests_for(relay: &relay::Relay, key: &str) -> Vec<String> {
    let seen = relay.seen.requests.lock().unwrap();
    seen.iter().filter(|r| r.contains(key)).cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_calls_output_feeds_later_calls_without_a_round_trip_through_the_store() {
    let stack = Stack::start().await;
    let data = text(3 << 20, 11);
    let upper = data.to_ascii_uppercase();
    let url = stack.put_input("pipe/in.txt", data.clone()).await;
    let (relay, mut gateway, mut client) = gateway_via_relay(&stack).await;

    let req = request(vec![
        hello("uppercase", serde_json::json!({ "text": url })),
        hello("word_count", serde_json::json!({ "text": "call://0/output" })),
        hello("sha256", serde_json::json!({ "file": "call://0/output" })),
    ]);
    let events = run_events(&mut client, req).await.expect("the pipeline succeeds");
    let outputs = outputs(&bodies(&events));
    let words = upper
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty())
        .count();
    assert_eq!(outputs[1]["words"], words);
    assert_eq!(outputs[1]["bytes"], upper.len());
    assert_eq!(outputs[2]["sha256"], hex::encode(Sha256::digest(&upper)));

    // Each later call was handed the file, with its size and checksum as
    // collected, and says where it came from.
    for index in [1, 2] {
        let handed = staged(&events, index);
        assert_eq!(handed.len(), 1, "call {index}: {handed:?}");
        assert_eq!(handed[0].url, "call://0/output");
        assert_eq!(handed[0].size, upper.len() as u64);
        assert_eq!(handed[0].crc64nvme, crc64nvme(&upper));
    }
    // Call 0's output went up once, and was never read back.
    let uploaded = url_of(&outputs[0], "output");
    assert_eq!(get_object(&stack.s3, &uploaded).await, upper);
    let key = uploaded.trim_start_matches(&format!("s3://{BUCKET}/"));
    let seen = requests_for(&relay, key);
    assert!(
        seen.iter()
            .all(|r| !r.starts_with("GET") && !r.starts_with("HEAD")),
        "{seen:?}"
    );
    assert!(!seen.is_empty(), "the upload went through the relay");
    common::stop(&mut gateway).await;
    stack.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intermediate_output_is_handed_on_and_never_uploaded() {
    let stack = Stack::start().await;
    let data = text(256 << 10, 12);
    let upper = data.to_ascii_uppercase();
    let url = stack.put_input("pipe/mid.txt", data).await;
    let (relay, mut gateway, mut client) = gateway_via_relay(&stack).await;

    let mut first = hello("uppercase", serde_json::json!({ "text": url }));
    first.intermediate = vec!["output".into()];
    let req = request(vec![
        first,
        hello("sha256", serde_json::json!({ "file": "call://0/output" })),
    ]);
    let events = run_events(&mut client, req).await.expect("the pipeline succeeds");
    let bodies = bodies(&events);
    let outputs = outputs(&bodies);
    assert_eq!(outputs[0]["output"], "call://0/output");
    assert_eq!(outputs[1]["sha256"], hex::encode(Sha256::digest(&upper)));
    assert!(uploaded(&bodies).is_empty(), "nothing was uploaded");
    let handed = staged(&events, 1);
    assert_eq!(
        (handed[0].size, handed[0].crc64nvme.as_str()),
        (upper.len() as u64, crc64nvme(&upper).as_str())
    );
    // No request wrote to the output bucket.
    let writes = requests_for(&relay, &format!("/{BUCKET}/"));
    assert!(writes.is_empty(), "{writes:?}");
    common::stop(&mut gateway).await;
    stack.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_several_calls_name_is_staged_once() {
    let stack = Stack::start().await;
    let data = text(1 << 20, 13);
    let url = stack.put_input("pipe/shared.txt", data.clone()).await;
    let (relay, mut gateway, mut client) = gateway_via_relay(&stack).await;
    let req = request(vec![
        hello("word_count", serde_json::json!({ "text": url })),
        hello("sha256", serde_json::json!({ "file": url })),
    ]);
    let events = run_events(&mut client, req).await.expect("the run succeeds");
    assert_eq!(
        outputs(&bodies(&events))[1]["sha256"],
        hex::encode(Sha256::digest(&data))
    );
    assert_eq!(staged(&events, 1)[0].url, url);
    // Its bytes came from the store once (and the first 64 KiB, which
    // looking at it fetched, at most once more).
    let moved = relay
        .seen
        .response_bytes
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        moved < data.len() as u64 * 3 / 2,
        "{moved} bytes for a {} byte object",
        data.len()
    );
    common::stop(&mut gateway).await;
    stack.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn references_are_checked_before_anything_runs() {
    let stack = Stack::start().await;
    let url = stack.put_input("pipe/check.txt", b"a b c\n".to_vec()).await;
    let mut client = stack.client().await;
    let upper = || hello("uppercase", serde_json::json!({ "text": url }));
    let count = |reference: &str| hello("word_count", serde_json::json!({ "text": reference }));
    let mut unused = upper();
    unused.intermediate = vec!["output".into()];
    let mut not_an_output = upper();
    not_an_output.intermediate = vec!["text".into()];
    let cases = [
        (
            vec![count("call://1/output"), upper()],
            "calls[0].inputs.text",
            "a later call",
        ),
        (
            vec![upper(), count("call://1/output")],
            "calls[1].inputs.text",
            "this call itself",
        ),
        (
            vec![upper(), count("call://0/nothing")],
            "calls[1].inputs.text",
            "no output file \"nothing\"",
        ),
        (
            vec![count(&url), count("call://0/words")],
            "calls[1].inputs.text",
            "returns \"words\" as a value, not a file",
        ),
        (
            vec![upper(), count("call://zero/output")],
            "calls[1].inputs.text",
            "call://<index>/<output>",
        ),
        (
            vec![
                upper(),
                hello("fail", serde_json::json!({ "message": "call://0/output" })),
            ],
            "calls[1].inputs.message",
            "only input files take call:// references",
        ),
        (
            vec![unused, count(&url)],
            "calls[0].intermediate",
            "no later call takes call://0/output",
        ),
        (
            vec![not_an_output, count(&url)],
            "calls[0].intermediate",
            "\"text\" is not an output file",
        ),
    ];
    for (calls, field, complaint) in cases {
        let status = run_to_end(&mut client, request(calls)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().contains(complaint),
            "{field}: {}",
            status.message()
        );
        let violations = status_field(&status);
        assert_eq!(violations, field, "{}", status.message());
        // Refused before anything was made or staged.
        assert!(stack.workspaces().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_later_call_removes_the_workspace_and_keeps_what_completed() {
    let stack = Stack::start().await;
    let url = stack.put_input("pipe/fail.txt", b"keep me\n".to_vec()).await;
    let mut client = stack.client().await;
    let req = request(vec![
        hello("uppercase", serde_json::json!({ "text": url })),
        hello("fail", serde_json::json!({ "message": "second call broke" })),
    ]);
    let mut stream = client.run(authed(req)).await.unwrap().into_inner();
    let mut events = Vec::new();
    let status = loop {
        match stream.message().await {
            Ok(Some(msg)) => events.extend(msg.event),
            Ok(None) => panic!("the run must fail"),
            Err(status) => break status,
        }
    };
    assert!(status.message().contains("second call broke"), "{status:?}");
    let done = uploaded(&events);
    assert_eq!(done.len(), 1, "{events:?}");
    assert_eq!(get_object(&stack.s3, &done[0].url).await, b"KEEP ME\n");
    stack.wait_idle().await;
    assert!(open_multipart_uploads(&stack).is_empty());
}

/// The field a `BadRequest` detail of `status` names.
fn status_field(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    let bad = status.get_details_bad_request().expect("a BadRequest detail");
    bad.field_violations[0].field.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handed_file_leaves_the_workspace_once_its_last_taker_ended() {
    let stack = Stack::start().await;
    let url = stack.put_input("pipe/release.txt", text(64 << 10, 14)).await;
    let mut client = stack.client().await;
    let mut first = hello("uppercase", serde_json::json!({ "text": url }));
    first.intermediate = vec!["output".into()];
    let req = request(vec![
        first,
        hello("sha256", serde_json::json!({ "file": "call://0/output" })),
        hello("sleep", serde_json::json!({ "seconds": 2 })),
    ]);
    // While the third call runs, the first two calls' files are gone:
    // the intermediate output, the input staged for call 0, the one
    // handed to call 1.
    let mut stream = client.run(authed(req)).await.unwrap().into_inner();
    loop {
        let msg = stream.message().await.unwrap().expect("the run goes on");
        if msg.call_index == 2 && matches!(msg.event, Some(Event::RuntimeProgress(_))) {
            break;
        }
    }
    let workspaces = stack.workspaces();
    let files: Vec<String> = walk(&workspaces[0])
        .iter()
        .map(|p| p.strip_prefix(&workspaces[0]).unwrap().display().to_string())
        .collect();
    assert!(files.is_empty(), "{files:?}");
    while stream.message().await.unwrap().is_some() {}
    stack.wait_idle().await;
}

/// Every file below `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        match path.is_dir() {
            true => files.extend(walk(&path)),
            false => files.push(path),
        }
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_reserves_for_every_call_of_a_pipeline() {
    let stack = Stack::start().await;
    let url = stack.put_input("pipe/budget.txt", text(3_000_000, 15)).await;
    // 9 MB below the high-water mark: one upper-casing call (3 MB in, 3 MB
    // out) fits; three in a row (3 MB staged, and 3 MB out of each) do not.
    let (mut gateway, mut client) = stack
        .gateway_process_with(&["--workspace-capacity-bytes=10000000"], None)
        .await;
    let upper = |text: &str| hello("uppercase", serde_json::json!({ "text": text }));
    run_events(&mut client, request(vec![upper(&url)]))
        .await
        .expect("one call fits");
    let pipeline = request(vec![
        upper(&url),
        upper("call://0/output"),
        upper("call://1/output"),
    ]);
    let status = run_events(&mut client, pipeline).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("the run needs 0.01 GiB"),
        "{}",
        status.message()
    );
    common::stop(&mut gateway).await;
    stack.wait_idle().await;
}
