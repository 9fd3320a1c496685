//! The exec runtime: real programs as prefabs, through the real gateway.

use crate::common;

use common::*;
use prefab::proto::run_event::Event;
use tonic::Code;

const GZIP: &str = include_str!("../../examples/prefabs/gzip.toml");

const TOOLS: &str = r#"
id = "tools"
version = "1.0.0"

[[function]]
name = "echo"
parameters = [
  { name = "text", type = "string" },
  { name = "output", type = "OutputFile", extension = "txt" },
]
exec = { command = ["printf", "%s", "{text}"], stdout = "output" }

[[function]]
name = "broken"
parameters = []
exec = { command = ["sh", "-c", "echo starting; echo 'cannot open the frobnicator' >&2; exit 3"] }

[[function]]
name = "hang"
parameters = [{ name = "pidfile", type = "string" }]
exec = { command = ["sh", "-c", "echo $$ > \"$0\"; echo '::progress 0.1 sleeping'; exec sleep 600", "{pidfile}"] }

[[function]]
name = "quiet_then_slow"
parameters = [{ name = "marker", type = "string" }]
exec = { command = ["sh", "-c", "sleep 3; exec >&- 2>&-; sleep 3; touch \"$0\"; sleep 600", "{marker}"], timeout_seconds = 4 }

[[function]]
name = "pipeline"
parameters = [{ name = "marker", type = "string" }]
exec = { command = ["sh", "-c", "(trap 'sleep 0.5; echo finished > \"$0\"; exit 0' TERM; while :; do sleep 0.1; done) & wait", "{marker}"], timeout_seconds = 1 }

[[function]]
name = "chatty"
parameters = []
exec = { command = ["sh", "-c", "line=$(head -c 20000 /dev/zero | tr '\\0' x); i=0; while [ $i -lt 300 ]; do echo \"$line\" >&2; i=$((i+1)); done"] }

[[function]]
name = "loud_failure"
parameters = []
exec = { command = ["sh", "-c", "line=$(head -c 16000 /dev/zero | tr '\\0' x); i=0; while [ $i -lt 25 ]; do echo \"$i $line\" >&2; i=$((i+1)); done; echo 'the very last words' >&2; exit 4"] }

[[function]]
name = "many"
parameters = []
exec = { command = ["sh", "-c", "seq 0 59999 | sed 's/.*/::output k& 1/'"] }

[[function]]
name = "flood"
parameters = []
exec = { command = ["sh", "-c", "v=$(head -c 1000 /dev/zero | tr '\\0' v); i=0; while [ $i -lt 1100 ]; do echo \"::output k$i $v\"; i=$((i+1)); done"] }

[[function]]
name = "report"
parameters = []
outputs = [{ name = "answer", type = "number" }, { name = "note", type = "string" }]
exec = { command = ["sh", "-c", "echo '::progress 0.5 half way'; echo '::output answer 42'; echo '::output note all good'"] }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gzip_manifest_wraps_the_real_tool() {
    let stack = Stack::start_full(&[], &[GZIP]).await;
    let input = text(3 << 20, 11);
    let url = stack.put_input("gz/in.txt", input.clone()).await;
    let mut client = stack.client().await;
    let events = run_to_end(
        &mut client,
        call_request("gzip", "compress", serde_json::json!({ "file": url, "level": 9 })),
    )
    .await
    .expect("gzip runs");
    let out_url = call_outputs(&events)["output"].as_str().unwrap().to_owned();
    assert!(out_url.ends_with(".gz"), "{out_url}");
    let compressed = stack.get(&out_url).await;
    assert!(compressed.len() < input.len() && compressed.starts_with(&[0x1f, 0x8b]));
    let path = stack.tmp.path().join("check.gz");
    std::fs::write(&path, &compressed).unwrap();
    let unzipped = std::process::Command::new("gzip")
        .arg("-dc")
        .arg(&path)
        .output()
        .unwrap();
    assert!(unzipped.status.success() && unzipped.stdout == input);

    // And back, through the gateway: decompress reads the path it is given,
    // a named pipe its streaming input flows through.
    let events = run_to_end(
        &mut client,
        call_request("gzip", "decompress", serde_json::json!({ "file": out_url })),
    )
    .await
    .expect("gunzip runs");
    let restored = stack.get(call_outputs(&events)["output"].as_str().unwrap()).await;
    assert!(restored == input, "decompress did not restore the input");
    stack.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn arguments_reach_the_program_as_one_argument_each() {
    let stack = Stack::start_full(&[], &[TOOLS]).await;
    let tricky = r#"two words; "quoted" 'single' $(rm -rf /) `id` | & > x {}"#;
    let mut client = stack.client().await;
    let events = run_to_end(
        &mut client,
        call_request("tools", "echo", serde_json::json!({ "text": tricky })),
    )
    .await
    .unwrap();
    let out = stack.get(call_outputs(&events)["output"].as_str().unwrap()).await;
    assert_eq!(String::from_utf8(out).unwrap(), tricky);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_program_reports_its_exit_status_and_stderr() {
    let stack = Stack::start_full(&[], &[TOOLS]).await;
    let mut client = stack.client().await;
    let mut stream = client
        .run(authed(call_request("tools", "broken", serde_json::json!({}))))
        .await
        .unwrap()
        .into_inner();
    let mut logs = Vec::new();
    let status = loop {
        match stream.message().await {
            Ok(Some(msg)) => {
                if let Some(Event::RuntimeLog(l)) = msg.event {
                    logs.push(l.line);
                }
            }
            Ok(None) => panic!("must fail"),
            Err(s) => break s,
        }
    };
    assert_eq!(status.code(), Code::Unknown);
    assert!(
        status.message().contains("exit status: 3"),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("cannot open the frobnicator"),
        "{}",
        status.message()
    );
    assert!(logs.contains(&"starting".to_owned()), "{logs:?}");
    stack.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_loud_failure_keeps_its_last_words_and_the_connection() {
    let stack = Stack::start_full(&[], &[TOOLS]).await;
    let mut client = stack.client().await;
    // 400 KB of standard error in its last lines: the failure's message
    // is cut to fit a gRPC trailer, keeping its start and its end.
    let status = run_tool(&mut client, "loud_failure")
        .await
        .expect_err("must fail");
    assert_eq!(status.code(), Code::Unknown, "{status:?}");
    let message = status.message();
    assert!(
        message.len() <= prefab::proto::MAX_STATUS_MESSAGE,
        "{}",
        message.len()
    );
    assert!(message.contains("exit status: 4"), "{message}");
    assert!(message.ends_with("the very last words"), "{message}");
    // Cut once, by the runtime, which says how much went.
    let cut: usize = message
        .split('[')
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(cut > 300_000, "{message}");
    // The runtime's connection survived: the next call gets its own answer.
    let status = run_tool(&mut client, "broken").await.expect_err("must fail");
    assert!(
        status.message().contains("cannot open the frobnicator"),
        "{status:?}"
    );
    stack.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_program_printing_too_many_values_fails_clearly() {
    let stack = Stack::start_full(&[], &[TOOLS]).await;
    let mut client = stack.client().await;
    // 1 100 values of 1 000 bytes, more than a result may hold.
    let status = run_tool(&mut client, "flood").await.expect_err("must fail");
    assert_eq!(status.code(), Code::Unknown, "{status:?}");
    assert!(
        status
            .message()
            .contains("bytes of ::output values a result may hold"),
        "{status:?}"
    );
    // 60 000 numbers: 420 KB as printed, over 1 MiB as a result.
    let status = run_tool(&mut client, "many").await.expect_err("must fail");
    assert_eq!(status.code(), Code::Unknown, "{status:?}");
    assert!(
        status
            .message()
            .contains("bytes of ::output values a result may hold"),
        "{status:?}"
    );
    stack.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn progress_and_values_come_from_the_line_protocol() {
    let stack = Stack::start_full(&[], &[TOOLS]).await;
    let mut client = stack.client().await;
    let events = run_tool(&mut client, "report").await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::RuntimeProgress(p) if p.fraction == 0.5 && p.message == "half way"))
    );
    let outputs = call_outputs(&events);
    assert_eq!(outputs["answer"], serde_json::json!(42));
    assert_eq!(outputs["note"], serde_json::json!("all good"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_disconnect_terminates_the_program_and_leaves_no_process() {
    let stack = Stack::start_full(&[], &[TOOLS]).await;
    let pidfile = stack.tmp.path().join("hang.pid");
    let mut client = stack.client().await;
    let mut stream = client
        .run(authed(call_request(
            "tools",
            "hang",
            serde_json::json!({ "pidfile": pidfile }),
        )))
        .await
        .unwrap()
        .into_inner();
    loop {
        let msg = stream.message().await.unwrap().expect("open");
        if matches!(msg.event, Some(Event::RuntimeProgress(_))) {
            break;
        }
    }
    let pid: u32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    drop(stream);
    drop(client);
    wait_for("the program to be gone", || {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
    })
    .await;
    stack.wait_idle().await;
}

/// Runs the tools function `name`, which takes no arguments, to its end.
async fn run_tool(
    client: &mut prefab::proto::gateway_client::GatewayClient<tonic::transport::Channel>,
    name: &str,
) -> Result<Vec<Event>, tonic::Status> {
    run_to_end(client, call_request("tools", name, serde_json::json!({}))).await
}

/// Runs the tools function `name`, which leaves `marker` when it gets that
/// far and is stopped at its time limit; returns how it failed.
async fn run_with_marker(
    client: &mut prefab::proto::gateway_client::GatewayClient<tonic::transport::Channel>,
    name: &str,
    marker: &std::path::Path,
) -> tonic::Status {
    let args = serde_json::json!({ "marker": marker.display().to_string() });
    run_to_end(client, call_request("tools", name, args))
        .await
        .expect_err("the program runs past its limit")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_shell_leaves_its_worker_the_grace_to_finish() {
    let stack = Stack::start_full(&[], &[TOOLS]).await;
    let marker = stack.tmp.path().join("worker-finished");
    let mut client = stack.client().await;
    // At its time limit the shell dies of SIGTERM at once; the worker it
    // started takes half a second to finish, well within the grace.
    let status = run_with_marker(&mut client, "pipeline", &marker).await;
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(std::fs::read_to_string(&marker).unwrap_or_default(), "finished\n");
    stack.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_time_limit_holds_when_the_program_closes_its_output() {
    let stack = Stack::start_full(&[], &[TOOLS]).await;
    let marker = stack.tmp.path().join("ran-past-its-limit");
    let mut client = stack.client().await;
    let status = run_with_marker(&mut client, "quiet_then_slow", &marker).await;
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    // Stopped at its 4 s limit, not 4 s after it closed its output (at
    // 3 s): the marker it would leave at 6 s never appears.
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    assert!(!marker.exists(), "the program ran on after its limit");
    stack.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chatty_program_costs_the_gateway_a_bounded_journal() {
    use prost::Message as _;
    let stack = Stack::start_full(&[], &[TOOLS]).await;
    let mut client = stack.client().await;
    // 300 lines of 20 000 bytes on stderr: 6 MB of logs.
    let events = run_tool(&mut client, "chatty").await.expect("chatty runs");
    let Some(Event::Accepted(accepted)) = events.first() else {
        panic!("the first event is not RunAccepted: {events:?}")
    };
    let lines: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            Event::RuntimeLog(l) => Some(l.line.as_str()),
            _ => None,
        })
        .collect();
    assert!(!lines.is_empty());
    assert!(
        lines.iter().all(|l| l.len() <= 17 << 10),
        "a log line was passed on whole"
    );
    // What a late Watch finds of the finished run: its milestones, and the
    // latest lines within the run's budget.
    let watch = prefab::proto::WatchRequest {
        request_id: accepted.request_id.clone(),
        after_sequence: 0,
    };
    let mut stream = client.watch(authed(watch)).await.unwrap().into_inner();
    let mut kept = Vec::new();
    while let Some(event) = stream.message().await.unwrap() {
        kept.push(event);
    }
    let bytes: usize = kept.iter().map(|e| e.encoded_len()).sum();
    assert!(bytes <= 1 << 20, "{bytes} bytes kept for a finished run");
    assert!(matches!(kept[0].event, Some(Event::Accepted(_))));
    assert!(matches!(kept.last().unwrap().event, Some(Event::RunCompleted(_))));
    stack.wait_idle().await;
}
