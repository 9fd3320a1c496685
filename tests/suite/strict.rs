//! The stores users run are stricter and less available than the embedded
//! one: a relay between a real `prefab gateway` process and the store
//! refuses what Backblaze B2 and Aliyun OSS refuse, damages a part, or takes
//! the store away for a minute. Default settings must keep working, with
//! integrity, and an outage must cost time, not the run.

use crate::common;

use std::time::{Duration, Instant};

use common::{
    Stack, big_text, open_multipart_uploads,
    relay::{Relay, Strict},
    run_request, run_to_end, wait_for,
};
use prefab::proto::gateway_client::GatewayClient;
use prefab::proto::{self, put_file_request::Msg, run_event::Event};
use tokio::{process::Child, sync::mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

/// Behaves like B2 (no checksum headers) and OSS (no aws-chunked) at once.
const B2_AND_OSS: Strict = Strict {
    refuse_checksum_headers: true,
    refuse_aws_chunked: true,
    damage_first_part: false,
    flip_object_byte: None,
    rate: None,
};

/// Where a gateway child logs: a file in the stack's folder, not the test's
/// output (each retry of an outage is a warning).
fn quiet_log(stack: &Stack) -> std::path::PathBuf {
    stack.tmp.path().join("gateway.log")
}

/// A gateway process (with `extra` flags) reaching the stack's store
/// through a relay that behaves as `strict` says.
async fn through_relay(
    stack: &Stack,
    strict: Strict,
    extra: &[&str],
) -> (Relay, Child, GatewayClient<Channel>) {
    let relay = Relay::start(store_addr(stack), strict).await;
    let (gateway, client) = stack
        .gateway_process_via(&relay.endpoint(), extra, Some(&quiet_log(stack)))
        .await;
    (relay, gateway, client)
}

/// A relay passing everything at [`THROTTLE`] bytes a second.
const THROTTLED: Strict = Strict {
    refuse_checksum_headers: false,
    refuse_aws_chunked: false,
    damage_first_part: false,
    flip_object_byte: None,
    rate: Some(THROTTLE),
};

/// The store's address, for a relay in front of it.
fn store_addr(stack: &Stack) -> std::net::SocketAddr {
    stack.s3_endpoint.trim_start_matches("http://").parse().unwrap()
}

/// The URL of the file output `name` of the first completed call.
fn output_url(events: &[Event], name: &str) -> String {
    common::call_outputs(events)[name].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_that_refuse_checksum_headers_get_content_md5_with_default_settings() {
    let stack = Stack::start().await;
    let relay = Relay::start(store_addr(&stack), B2_AND_OSS).await;
    let log = stack.tmp.path().join("gateway.log");
    let (_gateway, mut client) = stack
        .gateway_process_via(&relay.endpoint(), &[], Some(&log))
        .await;

    // A 24 MiB input staged, and its 24 MiB upper-cased output uploaded in
    // parts.
    let text = big_text(24, 3);
    let url = stack.put_input("strict/in.txt", text.clone()).await;
    let events = run_to_end(
        &mut client,
        run_request("uppercase", serde_json::json!({ "text": url })),
    )
    .await
    .unwrap_or_else(|s| panic!("{s:?}\n{}", std::fs::read_to_string(&log).unwrap_or_default()));
    let output = stack.get(&output_url(&events, "output")).await;
    assert!(output == text.to_ascii_uppercase(), "the output differs");

    // PutFile of 24 MiB through the gateway.
    let (tx, rx) = mpsc::channel(4);
    let data = big_text(24, 5);
    let sent = data.clone();
    tokio::spawn(async move {
        let header = proto::PutFileHeader {
            file_name: "strict.bin".into(),
            size: Some(sent.len() as u64),
        };
        let _ = tx
            .send(proto::PutFileRequest {
                msg: Some(Msg::Header(header)),
            })
            .await;
        for piece in sent.chunks(1 << 20) {
            let chunk = proto::PutFileRequest {
                msg: Some(Msg::Chunk(piece.to_vec().into())),
            };
            let _ = tx.send(chunk).await;
        }
    });
    let stored = client
        .put_file(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert!(stack.get(&stored.url).await == data, "the uploaded file differs");

    // Refused once each for the headers, then MD5 on every part.
    assert!(relay.seen.refused.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    assert_eq!(
        relay
            .seen
            .refused_aws_chunked
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert!(
        relay
            .seen
            .parts_with_md5
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 4
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        logged.matches("refuses the x-amz-checksum headers").count(),
        1,
        "the fallback is logged once per process:\n{logged}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_damaged_on_the_way_fails_the_upload_and_leaves_none_open() {
    let stack = Stack::start().await;
    let strict = Strict {
        damage_first_part: true,
        ..B2_AND_OSS
    };
    let (_relay, _gateway, mut client) = through_relay(&stack, strict, &[]).await;
    let url = stack.put_input("strict/damaged.txt", big_text(24, 4)).await;
    let status = run_to_end(
        &mut client,
        run_request("uppercase", serde_json::json!({ "text": url })),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    assert!(status.message().contains("damaged"), "{}", status.message());
    wait_for("no open multipart upload", || {
        open_multipart_uploads(&stack).is_empty()
    })
    .await;
    stack.wait_idle().await;
}

/// Bytes a second through the relay in the outage tests: slow enough that
/// the outage starts mid-transfer.
const THROTTLE: u64 = 48 << 20;
/// How long the store is away.
const OUTAGE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_long_outage_while_staging_resumes_where_it_stopped() {
    let stack = Stack::start().await;
    let (relay, _gateway, mut client) = through_relay(&stack, THROTTLED, &[]).await;
    let data = big_text(256, 6);
    let size = data.len() as u64;
    let url = stack.put_input("outage/in.bin", data.clone()).await;
    let want = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&data));
    let run = tokio::spawn(async move {
        run_to_end(
            &mut client,
            run_request("sha256", serde_json::json!({ "file": url })),
        )
        .await
    });
    let seen = std::sync::Arc::clone(&relay.seen);
    let received = move || seen.response_bytes.load(std::sync::atomic::Ordering::SeqCst);
    wait_for_long("a quarter staged", || received() > size / 4).await;
    relay.set_down(true);
    let before = received();
    tokio::time::sleep(OUTAGE).await;
    relay.set_down(false);
    let events = run.await.unwrap().expect("the run survives the outage");
    let outputs = common::call_outputs(&events);
    assert_eq!(outputs["sha256"], serde_json::json!(want));
    // The caller heard the store was away, and for how long it is tried.
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Staging(p) if !p.retrying.is_empty() && p.retry_seconds_left > 0)),
        "no retrying progress event"
    );
    // Resumed, not restarted: what came after the outage is about what was
    // missing (a few ranges' unsent pieces at most came twice).
    let after = received() - before;
    assert!(
        after <= size - before + (16 << 20),
        "{after} bytes after the outage for {} missing",
        size - before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_long_outage_while_uploading_resends_only_the_parts_cut() {
    let stack = Stack::start().await;
    let (relay, _gateway, mut client) = through_relay(&stack, THROTTLED, &[]).await;
    let text = big_text(128, 7);
    let size = text.len() as u64;
    let url = stack.put_input("outage/upper.txt", text.clone()).await;
    let run = tokio::spawn(async move {
        run_to_end(
            &mut client,
            run_request("uppercase", serde_json::json!({ "text": url })),
        )
        .await
    });
    let seen = std::sync::Arc::clone(&relay.seen);
    let sent = move || seen.request_bytes.load(std::sync::atomic::Ordering::SeqCst);
    wait_for_long("a quarter uploaded", || sent() > size / 4).await;
    relay.set_down(true);
    let before = sent();
    tokio::time::sleep(OUTAGE).await;
    relay.set_down(false);
    let events = run.await.unwrap().expect("the run survives the outage");
    assert!(stack.get(&output_url(&events, "output")).await == text.to_ascii_uppercase());
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Uploading(p) if !p.retrying.is_empty())),
        "no retrying progress event"
    );
    // Parts of 16 MiB, four in flight: at most those were sent again.
    let after = sent() - before;
    assert!(
        after <= size - before + (64 << 20),
        "{after} bytes sent after the outage for {} missing",
        size - before
    );
    wait_for("no open multipart upload", || {
        open_multipart_uploads(&stack).is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_never_comes_back_fails_within_the_budget() {
    let stack = Stack::start().await;
    let (relay, _gateway, mut client) = through_relay(&stack, THROTTLED, &["--s3-retry-seconds=5"]).await;
    let data = big_text(128, 8);
    let size = data.len() as u64;
    let url = stack.put_input("outage/gone.bin", data).await;
    let request = run_request("sha256", serde_json::json!({ "file": url.clone() }));
    let run = tokio::spawn(async move { run_to_end(&mut client, request).await });
    let seen = std::sync::Arc::clone(&relay.seen);
    wait_for_long("some staged", || {
        seen.response_bytes.load(std::sync::atomic::Ordering::SeqCst) > size / 8
    })
    .await;
    relay.set_down(true);
    let down = Instant::now();
    let status = run.await.unwrap().unwrap_err();
    let took = down.elapsed();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let message = status.message();
    for part in [url.as_str(), "retried for", "at byte"] {
        assert!(message.contains(part), "{part:?} missing from {message}");
    }
    assert!(
        took < Duration::from_secs(15),
        "failed after {took:?} with a 5 s budget"
    );
    stack.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cut_by_an_outage_is_aborted_once_the_store_is_back() {
    let stack = Stack::start().await;
    let (relay, _gateway, mut client) = through_relay(&stack, THROTTLED, &["--s3-retry-seconds=3"]).await;
    let url = stack.put_input("outage/abort.txt", big_text(64, 9)).await;
    let request = run_request("uppercase", serde_json::json!({ "text": url }));
    let run = tokio::spawn(async move { run_to_end(&mut client, request).await });
    // Staging sends no request bodies: the first one is a part's.
    let seen = std::sync::Arc::clone(&relay.seen);
    wait_for_long("a part uploaded", || {
        seen.request_bytes.load(std::sync::atomic::Ordering::SeqCst) > 0
    })
    .await;
    relay.set_down(true);
    let status = run.await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // The store cannot take the abort while it is away…
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        !open_multipart_uploads(&stack).is_empty(),
        "nothing to abort: the test missed the upload"
    );
    relay.set_down(false);
    // …and takes it once it is back: no upload stays open.
    wait_for_long("the upload aborted", || open_multipart_uploads(&stack).is_empty()).await;
}

/// Polls `cond` every 20 ms for up to 60 s.
async fn wait_for_long(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..3000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}
