//! End-to-end runs through the real gateway, runtime and S3 store.

mod common;

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
