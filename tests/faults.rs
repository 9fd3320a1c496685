//! Faults between the gateway and object storage, injected by a real TCP
//! proxy: a connection cut mid-download is resumed; corrupted bytes fail
//! the run with a checksum error and leave nothing behind.

mod common;

use common::{
    proxy::{Fault, Proxy},
    *,
};
use sha2::{Digest, Sha256};
use tonic::Code;

fn s3_addr(stack: &Stack) -> std::net::SocketAddr {
    stack.s3_endpoint.trim_start_matches("http://").parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_download_cut_mid_way_resumes_and_is_byte_identical() {
    let stack = Stack::start().await;
    let data = text(48 << 20, 21);
    let expected = hex::encode(Sha256::digest(&data));
    let url = stack.put_input("faults/cut.bin", data).await;
    let proxy = Proxy::start(s3_addr(&stack), Fault::CutAfter(20 << 20)).await;
    let (mut gateway, mut client) = stack
        .gateway_process_via(&format!("http://{}", proxy.addr), &[], None)
        .await;
    let events = run_to_end(
        &mut client,
        run_request("sha256", serde_json::json!({ "file": url })),
    )
    .await
    .expect("the download resumes after the cut");
    assert!(proxy.fired(), "the proxy never cut the connection");
    assert_eq!(call_outputs(&events)["sha256"], serde_json::json!(expected));
    gateway.kill().await.unwrap();
    stack.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupted_bytes_fail_the_run_with_a_checksum_error() {
    let stack = Stack::start().await;
    let url = stack.put_input("faults/flip.bin", text(24 << 20, 22)).await;
    let proxy = Proxy::start(s3_addr(&stack), Fault::FlipAt(5 << 20)).await;
    let (mut gateway, mut client) = stack
        .gateway_process_via(&format!("http://{}", proxy.addr), &[], None)
        .await;
    let result = run_to_end(
        &mut client,
        run_request("sha256", serde_json::json!({ "file": url })),
    )
    .await;
    assert!(proxy.fired(), "the proxy never flipped a byte");
    let status = result.expect_err("corruption must fail the run");
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    assert!(
        status.message().contains("MD5 checksum mismatch"),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("s3://inputs/faults/flip.bin"),
        "{}",
        status.message()
    );
    gateway.kill().await.unwrap();
    stack.wait_idle().await;
}
