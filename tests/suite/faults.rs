//! Faults between the gateway and object storage, injected by a real TCP
//! proxy: a connection cut mid-download is resumed; corrupted bytes fail
//! the run with a checksum error and leave nothing behind; a part cut
//! mid-upload is sent again; an upload given up while the store is still
//! answering, or while it is being aborted, is aborted all the same; one
//! whose completion went through but whose reply was lost succeeds.

use crate::common;

use common::{
    proxy::{Fault, Proxy},
    *,
};
use sha2::{Digest, Sha256};
use std::time::Duration;

use tonic::Code;

fn s3_addr(stack: &Stack) -> std::net::SocketAddr {
    stack.s3_endpoint.trim_start_matches("http://").parse().unwrap()
}

/// How the input object is stored.
#[derive(Clone, Copy, PartialEq)]
enum Stored {
    /// A plain PUT: the store has its MD5 as ETag, no CRC.
    Plain,
    /// A PUT with its CRC-64/NVME, which the store checked and keeps.
    WithCrc64,
    /// A PUT with its CRC-32C (or CRC-32 if not `castagnoli`), likewise.
    WithCrc32 { castagnoli: bool },
}

/// Runs sha256 on an object of `size` bytes through a gateway whose S3
/// traffic passes a proxy injecting `fault`.
async fn run_through(
    size: usize,
    stored: Stored,
    fault: Fault,
) -> (
    Stack,
    Result<Vec<prefab::proto::run_event::Event>, tonic::Status>,
    String,
    bool,
) {
    let stack = Stack::start().await;
    let data = text(size, size as u64);
    let expected = hex::encode(Sha256::digest(&data));
    let key = format!("faults/{size}.bin");
    let url = format!("s3://{INPUT_BUCKET}/{key}");
    let put = stack.s3.put_object().bucket(INPUT_BUCKET).key(&key);
    let (put, checksum) = match stored {
        Stored::Plain => (put, None),
        Stored::WithCrc64 => {
            let checksum = crc64nvme(&data);
            (put.checksum_crc64_nvme(&checksum), Some(checksum))
        }
        Stored::WithCrc32 { castagnoli: true } => {
            let checksum = crc32(&data, true);
            (put.checksum_crc32_c(&checksum), Some(checksum))
        }
        Stored::WithCrc32 { castagnoli: false } => {
            let checksum = crc32(&data, false);
            (put.checksum_crc32(&checksum), Some(checksum))
        }
    };
    put.body(data.into()).send().await.expect("put input");
    if let Some(checksum) = checksum {
        let head = stack
            .s3
            .head_object()
            .bucket(INPUT_BUCKET)
            .key(&key)
            .checksum_mode(aws_sdk_s3::types::ChecksumMode::Enabled)
            .send()
            .await
            .expect("head input");
        let kept = [
            head.checksum_crc64_nvme(),
            head.checksum_crc32_c(),
            head.checksum_crc32(),
        ];
        assert!(
            kept.contains(&Some(checksum.as_str())),
            "the store keeps {checksum}"
        );
    }
    let proxy = Proxy::start(s3_addr(&stack), fault).await;
    let (mut gateway, mut client) = stack
        .gateway_process_via(&format!("http://{}", proxy.addr), &[], None)
        .await;
    let result = run_to_end(
        &mut client,
        run_request("sha256", serde_json::json!({ "file": url })),
    )
    .await;
    common::stop(&mut gateway).await;
    (stack, result, expected, proxy.fired())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_download_cut_mid_way_resumes_and_is_byte_identical() {
    // The big ones come in 8 MiB ranges (their ETags are MD5s, checked in
    // order); the small one would come whole with the GET that looks at it,
    // and is fetched again.
    for (size, cut) in [(24 << 20, 5 << 20), (48 << 20, 5 << 20), (40 << 10, 20 << 10)] {
        let (stack, result, expected, fired) = run_through(size, Stored::Plain, Fault::CutAfter(cut)).await;
        assert!(fired, "{size} bytes: the proxy never cut the connection");
        let events = result.unwrap_or_else(|s| panic!("{size} bytes: the download did not resume: {s:?}"));
        assert_eq!(
            call_outputs(&events)["sha256"],
            serde_json::json!(expected),
            "{size} bytes"
        );
        stack.wait_idle().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupted_bytes_fail_the_run_with_a_checksum_error() {
    // The MD5 ETag catches it (its objects come in 8 MiB ranges, or whole
    // with the GET that looks at them); the store's CRC catches it first
    // when the store has one.
    const MIB: usize = 1 << 20;
    let flip = Fault::FlipAt(5 << 20);
    let cases = [
        (
            40 << 10,
            Stored::Plain,
            Fault::FlipAt(20 << 10),
            "MD5 checksum mismatch",
        ),
        (24 * MIB, Stored::Plain, flip, "MD5 checksum mismatch"),
        (48 * MIB, Stored::Plain, flip, "MD5 checksum mismatch"),
        (12 * MIB, Stored::WithCrc64, flip, "CRC-64/NVME checksum mismatch"),
        (40 * MIB, Stored::WithCrc64, flip, "CRC-64/NVME checksum mismatch"),
        (
            12 * MIB,
            Stored::WithCrc32 { castagnoli: true },
            flip,
            "CRC-32C checksum mismatch",
        ),
        (
            40 * MIB,
            Stored::WithCrc32 { castagnoli: false },
            flip,
            "CRC-32 checksum mismatch",
        ),
    ];
    for (size, stored, fault, complaint) in cases {
        let (stack, result, _, fired) = run_through(size, stored, fault).await;
        assert!(fired, "{size} bytes: the proxy never flipped a byte");
        let status = result.expect_err("corruption must fail the run");
        assert_eq!(status.code(), Code::DataLoss, "{size} bytes: {status:?}");
        assert!(status.message().contains(complaint), "{}", status.message());
        assert!(
            status
                .message()
                .contains(&format!("s3://inputs/faults/{size}.bin")),
            "{}",
            status.message()
        );
        stack.wait_idle().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_300_mib_object_staged_by_ranges_is_byte_identical() {
    const SIZE: usize = 300 << 20;
    let stack = Stack::start().await;
    let data = big_text(SIZE >> 20, 31);
    let expected = hex::encode(Sha256::digest(&data));
    let checksum = crc64nvme(&data);
    let url = stack.put_input("faults/ranged.bin", data).await;
    let (mut gateway, mut client) = stack.gateway_process().await;
    let events = run_to_end(
        &mut client,
        run_request("sha256", serde_json::json!({ "file": url })),
    )
    .await
    .unwrap();
    let staged = events
        .iter()
        .find_map(|e| match e {
            prefab::proto::run_event::Event::Staged(s) => Some(s.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        (staged.size, staged.crc64nvme.as_str()),
        (SIZE as u64, checksum.as_str())
    );
    // The function read the staged file and agrees.
    assert_eq!(call_outputs(&events)["sha256"], serde_json::json!(expected));
    let peak = peak_rss_bytes(gateway.id().unwrap());
    assert!(
        peak < 96 << 20,
        "gateway peak RSS {} MiB for a 300 MiB input",
        peak >> 20
    );
    common::stop(&mut gateway).await;
    stack.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upload_given_up_while_the_store_creates_it_is_aborted() {
    let stack = Stack::start().await;
    // The store answers CreateMultipartUpload, the first request, late.
    let proxy = Proxy::start(s3_addr(&stack), Fault::DelayFirst(Duration::from_secs(2))).await;
    let s3 = prefab::storage::connect(&s3_args(&format!("http://{}", proxy.addr)).settings()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.bin");
    std::fs::write(&path, text(40 << 20, 9)).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let dest = prefab::storage::S3Url::new(BUCKET, "outputs/given-up/big.bin").unwrap();

    let mut progress = |_| {};
    let upload = prefab::storage::upload(&s3, file, 40 << 20, &dest, &mut progress);
    // Created, and its answer on the way but held back by the proxy.
    let created = wait_for("the store to create the upload", || {
        proxy.fired() && !open_multipart_uploads(&stack).is_empty()
    });
    tokio::select! {
        done = upload => panic!("the upload ended before it was given up: {:?}", done.map(|t| t.size)),
        () = created => {}
    }
    wait_for("the multipart upload to be aborted", || {
        open_multipart_uploads(&stack).is_empty()
    })
    .await;
}

/// Three parts of 8 MiB, then a failure, as from a client that went away.
struct FailingSource {
    parts: u32,
    failed: std::sync::Arc<tokio::sync::Notify>,
}

impl prefab::storage::upload::PartSource for FailingSource {
    async fn next_part(
        &mut self,
        max: usize,
    ) -> Result<Option<prefab::storage::upload::Part>, prefab::storage::StorageError> {
        if self.parts == 0 {
            self.failed.notify_one();
            return Err(prefab::storage::StorageError::io(
                "the client's stream",
                std::io::Error::other("the client went away"),
            ));
        }
        self.parts -= 1;
        Ok(Some(prefab::storage::upload::Part::memory(bytes::Bytes::from(
            vec![b'p'; max],
        ))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upload_dropped_while_it_aborts_is_aborted_all_the_same() {
    let stack = Stack::start().await;
    // Every answer comes late: when the source fails, parts are still in
    // flight, and the abort waits for them.
    let proxy = Proxy::start(s3_addr(&stack), Fault::DelayEach(Duration::from_millis(1500))).await;
    let s3 = prefab::storage::connect(&s3_args(&format!("http://{}", proxy.addr)).settings()).unwrap();
    let dest = prefab::storage::S3Url::new(BUCKET, "outputs/dropped/big.bin").unwrap();
    let failed = std::sync::Arc::new(tokio::sync::Notify::new());
    let source = FailingSource {
        parts: 3,
        failed: failed.clone(),
    };
    let mut progress = |_| {};
    let upload = prefab::storage::upload::upload_from(&s3, source, Some(40 << 20), &dest, &mut progress);
    tokio::select! {
        done = upload => panic!("the upload ended before it was dropped: {:?}", done.map(|t| t.size)),
        () = async {
            failed.notified().await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        } => {}
    }
    assert!(
        !open_multipart_uploads(&stack).is_empty(),
        "the upload was aborted before it was dropped"
    );
    wait_for("the multipart upload to be aborted", || {
        open_multipart_uploads(&stack).is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upload_whose_completion_reply_is_lost_still_succeeds() {
    let stack = Stack::start().await;
    let key = "outputs/lost-reply/big.bin";
    // The store completes the upload, but its reply never arrives: the
    // retry finds no upload to complete.
    let complete: &'static str = Box::leak(format!("POST /{BUCKET}/{key}?uploadId=").into_boxed_str());
    let proxy = Proxy::start(s3_addr(&stack), Fault::LoseReplyTo(complete)).await;
    let s3 = prefab::storage::connect(&s3_args(&format!("http://{}", proxy.addr)).settings()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.bin");
    let data = text(20 << 20, 12);
    std::fs::write(&path, &data).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let dest = prefab::storage::S3Url::new(BUCKET, key).unwrap();

    let mut progress = |_| {};
    let done = prefab::storage::upload(&s3, file, data.len() as u64, &dest, &mut progress)
        .await
        .expect("the object was completed");
    assert!(proxy.fired(), "the reply was never lost");
    assert_eq!(done.size, data.len() as u64);
    assert!(
        stack.get(&format!("s3://{BUCKET}/{key}")).await == data,
        "the stored object differs"
    );
    assert!(open_multipart_uploads(&stack).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upload_cut_mid_part_sends_the_part_again_and_is_byte_identical() {
    let stack = Stack::start().await;
    // The first connection to carry 3 MiB of requests is cut there: inside
    // the body of an 8 MiB part.
    let proxy = Proxy::start(s3_addr(&stack), Fault::CutRequestAfter(3 << 20)).await;
    let s3 = prefab::storage::connect(&s3_args(&format!("http://{}", proxy.addr)).settings()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.bin");
    let data = text(40 << 20, 11);
    std::fs::write(&path, &data).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let url = format!("s3://{BUCKET}/outputs/cut/big.bin");
    let dest = prefab::storage::S3Url::parse(&url).unwrap();

    let mut progress = |_| {};
    let done = prefab::storage::upload(&s3, file, data.len() as u64, &dest, &mut progress)
        .await
        .expect("the upload recovers from the cut");
    assert!(proxy.fired(), "the connection was never cut");
    assert_eq!(done.size, data.len() as u64);
    assert_eq!(
        aws_smithy_types::base64::encode(done.crc64nvme.to_be_bytes()),
        crc64nvme(&data)
    );
    assert!(stack.get(&url).await == data, "the stored object differs");
    assert!(open_multipart_uploads(&stack).is_empty());
}
