//! Every way a run can be refused or fail, each with the status code and a
//! message that names the thing at fault.

use crate::common;

use common::*;
use prefab::proto;
use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt};

async fn run_status(stack: &Stack, req: proto::RunRequest) -> tonic::Status {
    let mut client = stack.client().await;
    run_to_end(&mut client, req).await.expect_err("run must fail")
}

fn assert_status(status: &tonic::Status, code: Code, needles: &[&str]) {
    assert_eq!(status.code(), code, "{status:?}");
    for needle in needles {
        assert!(
            status.message().contains(needle),
            "{:?} does not mention {needle:?}",
            status.message()
        );
    }
}

/// The status's `google.rpc` details as a client decodes them, with the
/// `ErrorInfo` every error carries checked for `reason`.
fn details(status: &tonic::Status, reason: &str) -> ErrorDetails {
    let details = status.check_error_details().expect("the details decode");
    let info = details.error_info().expect("every error has an ErrorInfo");
    assert_eq!(
        (info.reason.as_str(), info.domain.as_str()),
        (reason, "prefab.dev"),
        "{status:?}"
    );
    details
}

/// The one BadRequest field violation of `status`.
fn bad_field(status: &tonic::Status) -> String {
    let details = details(status, "INVALID_REQUEST");
    let violations = &details.bad_request().expect("a BadRequest").field_violations;
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert!(details.retry_info().is_none(), "a bad request is not retried");
    violations[0].field.clone()
}

fn call(prefab: &str, function: &str, inputs: serde_json::Value) -> proto::RunRequest {
    let mut req = run_request(function, inputs);
    req.calls[0].prefab_id = prefab.into();
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_name_what_is_wrong() {
    let stack = Stack::start().await;
    let mut client = stack.client().await;
    let word_count = run_request("word_count", serde_json::json!({ "text": "s3://inputs/a.txt" }));

    // No token, and a wrong token.
    let status = client
        .run(tonic::Request::new(word_count.clone()))
        .await
        .unwrap_err();
    assert_status(&status, Code::Unauthenticated, &["authorization"]);
    let mut req = tonic::Request::new(word_count.clone());
    req.metadata_mut()
        .insert("authorization", "Bearer nope".parse().unwrap());
    assert_status(
        &client.run(req).await.unwrap_err(),
        Code::Unauthenticated,
        &["not valid"],
    );
    assert_eq!(
        client.put_file(tokio_stream::empty()).await.unwrap_err().code(),
        Code::Unauthenticated
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_have_the_right_codes() {
    let stack = Stack::start().await;
    let url = stack.put_input("ok.txt", b"hello".to_vec()).await;

    let status = run_status(&stack, call("no-such-prefab", "x", serde_json::json!({}))).await;
    assert_status(
        &status,
        Code::NotFound,
        &["no-such-prefab@1.0.0", "not registered"],
    );
    details(&status, "NOT_FOUND");

    let status = run_status(&stack, run_request("nope", serde_json::json!({}))).await;
    assert_status(&status, Code::NotFound, &["no function \"nope\"", "word_count"]);

    let missing = "s3://inputs/missing/file.txt";
    let status = run_status(
        &stack,
        run_request("word_count", serde_json::json!({ "text": missing })),
    )
    .await;
    assert_status(&status, Code::NotFound, &[missing]);
    let info = details(&status, "OBJECT_NOT_FOUND")
        .error_info()
        .cloned()
        .unwrap();
    assert_eq!(info.metadata["bucket"], "inputs");
    assert_eq!(info.metadata["url"], missing);

    let status = run_status(
        &stack,
        run_request("word_count", serde_json::json!({ "text": "http://x/y" })),
    )
    .await;
    assert_status(
        &status,
        Code::InvalidArgument,
        &["\"text\"", "http://x/y", "s3://"],
    );
    assert_eq!(bad_field(&status), "calls[0].inputs.text");

    let status = run_status(&stack, run_request("word_count", serde_json::json!({}))).await;
    assert_status(&status, Code::InvalidArgument, &["required input \"text\""]);

    let status = run_status(
        &stack,
        run_request("word_count", serde_json::json!({ "text": 42 })),
    )
    .await;
    assert_status(&status, Code::InvalidArgument, &["\"text\"", "s3://bucket/key"]);

    let status = run_status(
        &stack,
        run_request("sleep", serde_json::json!({ "seconds": "ten" })),
    )
    .await;
    assert_status(&status, Code::InvalidArgument, &["\"seconds\"", "a number"]);

    let status = run_status(
        &stack,
        run_request("word_count", serde_json::json!({ "text": url, "extra": 1 })),
    )
    .await;
    assert_status(&status, Code::InvalidArgument, &["unknown input \"extra\""]);
    assert_eq!(bad_field(&status), "calls[0].inputs.extra");

    let status = run_status(
        &stack,
        run_request(
            "uppercase",
            serde_json::json!({ "text": url, "output": "s3://inputs/x" }),
        ),
    )
    .await;
    assert_status(&status, Code::InvalidArgument, &["\"output\" is an output file"]);

    let status = run_status(
        &stack,
        run_request(
            "word_count",
            serde_json::json!({ "text": "s3://secret-bucket/passwords.txt" }),
        ),
    )
    .await;
    assert_status(
        &status,
        Code::PermissionDenied,
        &["s3://secret-bucket/passwords.txt", "PREFAB_ALLOWED_BUCKETS"],
    );
    details(&status, "NOT_ALLOWED");

    let status = run_status(&stack, proto::RunRequest::default()).await;
    assert_status(&status, Code::InvalidArgument, &["at least one call"]);
    assert_eq!(bad_field(&status), "calls");

    // A run refused after its workspace was made (a missing input) leaves
    // nothing behind either.
    stack.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_runtime_is_unavailable() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let stack = Stack::start_with(&[&format!("--endpoints=dead-prefab@2.0.0=http://127.0.0.1:{port}")]).await;
    let mut req = call("dead-prefab", "x", serde_json::json!({}));
    req.calls[0].version = "2.0.0".into();
    let status = run_status(&stack, req).await;
    assert_status(
        &status,
        Code::Unavailable,
        &["dead-prefab@2.0.0", &format!("127.0.0.1:{port}")],
    );
    let details = details(&status, "UNAVAILABLE");
    let retry = details.retry_info().expect("UNAVAILABLE says when to retry");
    assert!(retry.retry_delay.is_some_and(|d| !d.is_zero()), "{retry:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_that_dies_mid_call_is_unavailable_and_cleaned_up() {
    // The prefab runs as a real child process that is killed mid-call.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("--endpoints=hello-world-prefab@1.0.0=http://127.0.0.1:{port}");
    let stack = Stack::start_with(&[&endpoint]).await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_prefab"))
        .args(["runtime", "hello", "--addr", &format!("127.0.0.1:{port}")])
        .env("WORKSPACE_ROOT", &stack.workspace_root)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for_port(port).await;

    let mut client = stack.client().await;
    let mut stream = start_until_running(
        &mut client,
        authed(run_request("sleep", serde_json::json!({ "seconds": 60 }))),
    )
    .await;
    child.kill().await.unwrap();
    let status = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the run must not succeed"),
            Err(status) => break status,
        }
    };
    assert_status(
        &status,
        Code::Unavailable,
        &["hello-world-prefab@1.0.0", &format!("127.0.0.1:{port}")],
    );
    stack.wait_idle().await;
}

async fn wait_for_port(port: u16) {
    for _ in 0..250 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("nothing listens on port {port}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_need_no_token() {
    let stack = Stack::start().await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", stack.gateway_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let resp = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "prefab.v1.Gateway".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_runtime_that_cannot_see_the_workspace_is_a_deployment_fault() {
    let stack = Stack::start().await;
    // A runtime that mounts the shared volume somewhere else.
    let elsewhere = stack.tmp.path().join("not-the-volume");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let runtime =
        prefab::runtime::RuntimeService::new(std::sync::Arc::new(prefab::prefabs::hello::Hello), elsewhere)
            .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let served = tokio::spawn(runtime.serve(listener, shutdown.clone()));
    let endpoint = format!("--endpoints=hello-world-prefab@1.0.0=http://{addr}");
    let (mut gateway, mut client) = stack.gateway_process_with(&[&endpoint], None).await;
    let input = stack.put_input("deploy/a.txt", b"abc".to_vec()).await;
    let status = run_to_end(
        &mut client,
        run_request("uppercase", serde_json::json!({ "text": input })),
    )
    .await
    .expect_err("the runtime cannot see the workspace");
    assert_status(
        &status,
        Code::FailedPrecondition,
        &["hello-world-prefab", "uppercase"],
    );
    let details = details(&status, "PREFAB_FAILED");
    assert_eq!(
        details.error_info().unwrap().metadata["prefab"],
        "hello-world-prefab@1.0.0"
    );
    let violation = &details
        .precondition_failure()
        .expect("a PreconditionFailure")
        .violations[0];
    assert_eq!(
        (violation.r#type.as_str(), violation.subject.as_str()),
        ("PREFAB", "hello-world-prefab@1.0.0")
    );
    assert!(details.retry_info().is_none());
    common::stop(&mut gateway).await;
    shutdown.cancel();
    let _ = served.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_limits_are_not_worth_a_retry() {
    let stack = Stack::start_with(&["--max-input-bytes=1000", "--max-output-bytes=500"]).await;
    // An input over the limit is refused before anything is staged: no
    // wait makes it pass, so it is the request that is wrong.
    let big = stack.put_input("limits/big.txt", text(2000, 1)).await;
    let status = run_status(
        &stack,
        run_request("uppercase", serde_json::json!({ "text": big })),
    )
    .await;
    assert_status(
        &status,
        Code::InvalidArgument,
        &["limits/big.txt", "PREFAB_MAX_INPUT_BYTES"],
    );
    assert_eq!(bad_field(&status), big, "the input's URL is the field");
    // An output over the limit is the prefab's doing (or its deployment's),
    // found after the call; nothing of it is uploaded or left behind.
    let ok = stack.put_input("limits/ok.txt", text(1000, 2)).await;
    let status = run_status(
        &stack,
        run_request("uppercase", serde_json::json!({ "text": ok })),
    )
    .await;
    assert_status(
        &status,
        Code::FailedPrecondition,
        &["\"output\"", "PREFAB_MAX_OUTPUT_BYTES"],
    );
    let outputs = stack.tmp.path().join("s3").join(BUCKET).join("outputs");
    assert!(
        list(&outputs).iter().all(|run| list(run).is_empty()),
        "{:?}",
        list(&outputs)
    );
    stack.wait_idle().await;
}
