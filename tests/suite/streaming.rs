//! Streaming inputs: functions that read an input front to back while the
//! gateway is still staging it (the Rust SDK's reader, an exec program's
//! standard input), through a relay that slows the store down or damages
//! a byte on the way, next to functions that only ever see complete files.

use std::time::Duration;

use sha2::{Digest, Sha256};
use tonic::{Code, Status};

use crate::common::{
    self, Stack, authed,
    relay::{Relay, Strict},
};
use common::*;
use prefab::proto::{self, run_event::Event};

/// An exec prefab with functions reading their input as it is staged, on
/// standard input and through the named pipe a path in the command stands
/// for (and one never opening it), one reading a complete file on standard
/// input, and one given the complete file's path.
const STREAMER: &str = r#"
id = "streamer"
version = "1.0.0"

[[function]]
name = "checksum"
parameters = [{ name = "file", type = "InputFile", streaming = true }]
outputs = [{ name = "sha256", type = "string" }]
exec = { command = ["sh", "-c", "echo \"::output sha256 $(sha256sum | cut -d' ' -f1)\""], stdin = "file" }

[[function]]
name = "digest"
parameters = [{ name = "file", type = "InputFile", streaming = true }]
outputs = [{ name = "sha256", type = "string" }, { name = "kind", type = "string" }]
exec = { command = ["sh", "-c", "echo \"::output kind $(stat -c %F \"$0\")\"; echo \"::output sha256 $(sha256sum \"$0\" | cut -d' ' -f1)\"", "{file}"] }

[[function]]
name = "ignore"
parameters = [{ name = "file", type = "InputFile", streaming = true }]
outputs = [{ name = "ignored", type = "string" }]
exec = { command = ["echo", "::output ignored {file}"] }

[[function]]
name = "count"
parameters = [{ name = "file", type = "InputFile" }]
outputs = [{ name = "bytes", type = "number" }]
exec = { command = ["sh", "-c", "echo \"::output bytes $(wc -c)\""], stdin = "file" }

[[function]]
name = "look"
parameters = [{ name = "file", type = "InputFile" }]
outputs = [{ name = "size", type = "number" }, { name = "unfinished", type = "number" }]
exec = { command = ["sh", "-c", "echo \"::output size $(stat -c %s \"$0\")\"; echo \"::output unfinished $(ls -a \"$(dirname \"$0\")\" | grep -c -e '[.]part$' -e '[.]watermark$')\"", "{file}"] }
"#;

/// Bytes a second the relay passes on each connection: the first 8 MiB
/// range of an input (whose MD5 the gateway checks) takes about three
/// seconds, and the function sees its bytes as they come.
const RATE: u64 = 3 << 20;

/// The size of the inputs, in MiB: two ranges.
const MIB: usize = 12;

/// A relay passing everything at [`RATE`].
const THROTTLED: Strict = Strict {
    refuse_checksum_headers: false,
    refuse_aws_chunked: false,
    damage_first_part: false,
    flip_object_byte: None,
    rate: Some(RATE),
};

/// A stack with the exec prefab, and a gateway process reaching the store
/// through a relay that behaves as `strict` says.
async fn through_relay(strict: Strict) -> (Stack, Relay, tokio::process::Child, GatewayClient) {
    let stack = Stack::start_full(&[], &[STREAMER]).await;
    let store = stack.s3_endpoint.trim_start_matches("http://").parse().unwrap();
    let relay = Relay::start(store, strict).await;
    let log = stack.tmp.path().join("gateway.log");
    let (gateway, client) = stack
        .gateway_process_via(&relay.endpoint(), &[], Some(&log))
        .await;
    (stack, relay, gateway, client)
}

type GatewayClient = proto::gateway_client::GatewayClient<tonic::transport::Channel>;

/// Runs `function` of `prefab` on `url` and returns the events it sent,
/// and the status that ended it if it failed.
async fn run(
    client: &mut GatewayClient,
    prefab: &str,
    function: &str,
    param: &str,
    url: &str,
) -> (Vec<Event>, Option<Status>) {
    let req = call_request(prefab, function, serde_json::json!({ param: url }));
    let mut stream = client.run(authed(req)).await.expect("run accepted").into_inner();
    let mut events = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(msg)) => events.push(msg.event.expect("every event has a body")),
            Ok(None) => return (events, None),
            Err(status) => return (events, Some(status)),
        }
    }
}

/// Where the first event `is` is in `events`.
fn position(events: &[Event], is: impl Fn(&Event) -> bool) -> usize {
    events
        .iter()
        .position(is)
        .unwrap_or_else(|| panic!("no such event in {events:?}"))
}

fn staged(e: &Event) -> bool {
    matches!(e, Event::Staged(_))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_functions_read_the_whole_input_while_it_is_staged() {
    let (stack, _relay, _gateway, mut client) = through_relay(THROTTLED).await;
    let data = big_text(MIB, 31);
    let expected = hex::encode(Sha256::digest(&data));
    let url = stack.put_input("stream/in.txt", data).await;

    // The Rust prefab's reader: the function hashed its first 4 MiB
    // (reporting it) before the input was complete.
    let (events, failed) = run(&mut client, "hello-world-prefab", "sha256", "file", &url).await;
    assert!(failed.is_none(), "{failed:?}");
    let invoked = position(&events, |e| matches!(e, Event::Invoking(_)));
    let hashing = position(&events, |e| matches!(e, Event::RuntimeProgress(_)));
    assert!(
        invoked < hashing && hashing < position(&events, staged),
        "{events:?}"
    );
    assert_eq!(call_outputs(&events)["sha256"], expected.as_str());

    // An exec program reading its standard input as it is staged, and one
    // reading the path it was given: a named pipe.
    for function in ["checksum", "digest"] {
        let (events, failed) = run(&mut client, "streamer", function, "file", &url).await;
        assert!(failed.is_none(), "{function}: {failed:?}");
        assert!(
            position(&events, |e| matches!(e, Event::Invoking(_))) < position(&events, staged),
            "{function}: {events:?}"
        );
        let outputs = call_outputs(&events);
        assert_eq!(outputs["sha256"], expected.as_str(), "{function}");
        if function == "digest" {
            assert_eq!(outputs["kind"], "fifo", "{outputs:?}");
        }
    }

    // A program that never opens its pipe ends all the same, once its
    // input is verified; the pipe goes with the call.
    let (events, failed) = run(&mut client, "streamer", "ignore", "file", &url).await;
    assert!(failed.is_none(), "{failed:?}");
    let pipe = call_outputs(&events)["ignored"]
        .as_str()
        .expect("a path")
        .to_owned();
    assert!(pipe.ends_with("/file/file.txt"), "{pipe}");
    stack.wait_idle().await;
    wait_for("the named pipe removed", || !std::path::Path::new(&pipe).exists()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_streaming_input_reads_as_empty() {
    let (stack, _relay, _gateway, mut client) = through_relay(THROTTLED).await;
    let url = stack.put_input("stream/empty.txt", Vec::new()).await;
    let empty = hex::encode(Sha256::digest(b""));
    // Read by the SDK's reader, on standard input, and through a named pipe
    // the program opens after everything (nothing) was fed.
    for (prefab, function) in [
        ("hello-world-prefab", "sha256"),
        ("streamer", "checksum"),
        ("streamer", "digest"),
    ] {
        let (events, failed) = run(&mut client, prefab, function, "file", &url).await;
        assert!(failed.is_none(), "{function}: {failed:?}");
        assert_eq!(call_outputs(&events)["sha256"], empty.as_str(), "{function}");
    }
    stack.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_damaged_on_the_way_fails_a_started_streaming_call_with_data_loss() {
    let size = (MIB as u64) << 20;
    let damaging = Strict {
        flip_object_byte: Some(size - (1 << 20)),
        ..THROTTLED
    };
    let (stack, _relay, _gateway, mut client) = through_relay(damaging).await;
    let url = stack.put_input("stream/damaged.txt", big_text(MIB, 32)).await;
    for (prefab, function) in [
        ("hello-world-prefab", "sha256"),
        ("streamer", "checksum"),
        ("streamer", "digest"),
    ] {
        let (events, failed) = run(&mut client, prefab, function, "file", &url).await;
        let status = failed.unwrap_or_else(|| panic!("{function} succeeded on damaged bytes: {events:?}"));
        assert_eq!(status.code(), Code::DataLoss, "{function}: {status:?}");
        assert!(
            status.message().contains("checksum mismatch"),
            "{}",
            status.message()
        );
        // The function was at work on the input when the damage showed.
        assert!(
            events.iter().any(|e| matches!(e, Event::Invoking(_))),
            "{events:?}"
        );
        if function == "sha256" {
            assert!(
                events.iter().any(|e| matches!(e, Event::RuntimeProgress(_))),
                "{events:?}"
            );
        }
        assert!(!events.iter().any(|e| matches!(e, Event::CallCompleted(_))));
        stack.wait_idle().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_streaming_call_mid_stream_removes_its_workspace() {
    let slow = Strict {
        rate: Some(4 << 20),
        ..THROTTLED
    };
    let (stack, _relay, _gateway, mut client) = through_relay(slow).await;
    let url = stack.put_input("stream/long.txt", big_text(96, 33)).await;
    let req = call_request("hello-world-prefab", "sha256", serde_json::json!({ "file": url }));
    let mut stream = client.run(authed(req)).await.expect("run accepted").into_inner();
    // Until the function has hashed its first 4 MiB, with most of the
    // input still to come.
    loop {
        let msg = stream.message().await.expect("stream ok").expect("stream open");
        match msg.event {
            Some(Event::RuntimeProgress(_)) => break,
            Some(Event::Staged(_)) => panic!("staged before the function reported progress"),
            _ => {}
        }
    }
    assert_eq!(stack.workspaces().len(), 1);
    drop(stream);
    // The run is cancelled: the function stops waiting for bytes, and the
    // workspace goes.
    stack.wait_idle().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(stack.workspaces().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_that_do_not_stream_see_only_complete_files() {
    let (stack, _relay, _gateway, mut client) = through_relay(THROTTLED).await;
    let data = big_text(MIB, 34);
    let url = stack.put_input("stream/whole.txt", data.clone()).await;

    // The Rust prefab's uppercase, beside its streaming sha256: called
    // only once its input is staged.
    let (events, failed) = run(&mut client, "hello-world-prefab", "uppercase", "text", &url).await;
    assert!(failed.is_none(), "{failed:?}");
    assert!(
        position(&events, staged) < position(&events, |e| matches!(e, Event::Invoking(_))),
        "{events:?}"
    );
    let output = stack.get(&url_of(&call_outputs(&events), "output")).await;
    assert!(output == data.to_ascii_uppercase(), "the output differs");

    // An exec program given the file's path finds it whole, and nothing
    // unfinished beside it.
    let (events, failed) = run(&mut client, "streamer", "look", "file", &url).await;
    assert!(failed.is_none(), "{failed:?}");
    let outputs = call_outputs(&events);
    assert_eq!(outputs["size"], data.len() as u64, "{outputs:?}");
    assert_eq!(outputs["unfinished"], 0, "{outputs:?}");

    // One reading a file that is not streaming on standard input gets it
    // whole, once staged.
    let (events, failed) = run(&mut client, "streamer", "count", "file", &url).await;
    assert!(failed.is_none(), "{failed:?}");
    assert!(
        position(&events, staged) < position(&events, |e| matches!(e, Event::Invoking(_))),
        "{events:?}"
    );
    assert_eq!(call_outputs(&events)["bytes"], data.len() as u64);
    stack.wait_idle().await;
}
