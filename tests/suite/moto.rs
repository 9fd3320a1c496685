//! Compatibility with moto's S3 server (PyPI `moto[server]`), a third,
//! independent implementation with AWS's checksum semantics (it does not
//! check signatures): multipart uploads in both checksum modes, a part
//! damaged on the way refused by the store, and a whole run through the
//! gateway.
//!
//! Ignored by a plain `cargo test`: `bash .ci/compat` (part of `.ci/run`)
//! installs moto and runs them with `PREFAB_MOTO` naming `moto_server`.

use crate::common;

use std::{os::unix::fs::FileExt, time::Duration};

use common::{proxy, *};
use prefab::storage::{self, ChecksumMode, S3Url};

/// A `moto_server` on a free loopback port, stopped on drop.
struct Moto {
    child: std::process::Child,
    endpoint: String,
}

impl Moto {
    async fn start() -> Self {
        let server = std::env::var("PREFAB_MOTO")
            .expect("PREFAB_MOTO must name moto_server (bash .ci/compat installs it)");
        let port = free_port();
        let child = std::process::Command::new(server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start moto_server");
        let moto = Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let s3 = moto.storage(ChecksumMode::Auto);
        for _ in 0..200 {
            if s3.list_buckets().send().await.is_ok() {
                for bucket in [BUCKET, INPUT_BUCKET] {
                    s3.create_bucket()
                        .bucket(bucket)
                        .send()
                        .await
                        .expect("create bucket");
                }
                return moto;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("moto_server did not come up on {}", moto.endpoint);
    }

    /// A store client of this moto proving uploads with `checksum`.
    fn storage(&self, checksum: ChecksumMode) -> storage::Storage {
        self.storage_via(&self.endpoint, checksum)
    }

    fn storage_via(&self, endpoint: &str, checksum: ChecksumMode) -> storage::Storage {
        let mut args = s3_args(endpoint);
        args.checksum = checksum;
        args.retry_seconds = 5;
        storage::connect(&args.settings()).unwrap()
    }

    async fn open_uploads(&self) -> usize {
        let s3 = self.storage(ChecksumMode::Auto);
        let out = s3.list_multipart_uploads().bucket(BUCKET).send().await.unwrap();
        out.uploads().len()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn file_with(data: &[u8]) -> std::fs::File {
    let file = tempfile::tempfile().unwrap();
    file.write_all_at(data, 0).unwrap();
    file
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs moto: bash .ci/compat"]
async fn multipart_uploads_are_verified_in_both_checksum_modes() {
    let moto = Moto::start().await;
    let data = big_text(40, 1);
    for mode in [ChecksumMode::Auto, ChecksumMode::Md5] {
        let s3 = moto.storage(mode);
        let url = S3Url::parse(&format!("s3://{BUCKET}/moto-{mode:?}.bin")).unwrap();
        let sent = storage::upload(&s3, file_with(&data), data.len() as u64, &url, &mut |_| {})
            .await
            .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        assert_eq!(sent.checksum(), crc64nvme(&data), "{mode:?}");
        // moto 5.2.5 reports a 4-byte value as an object's CRC-64/NVME; a
        // stored checksum that does not parse is not checked against, so
        // the download below is verified by size (and MD5 where it can).
        let info = storage::head(&s3, &url).await.unwrap();
        let got = tempfile::tempfile().unwrap();
        let done = storage::download(&s3, &url, &info, got.try_clone().unwrap(), &mut |_| {})
            .await
            .unwrap();
        assert_eq!(done.checksum(), crc64nvme(&data), "{mode:?}");
        let mut back = vec![0; data.len()];
        got.read_exact_at(&mut back, 0).unwrap();
        assert!(back == data, "{mode:?}: the download differs");
    }
    assert_eq!(moto.open_uploads().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs moto: bash .ci/compat"]
async fn a_part_damaged_on_the_way_is_refused_and_leaves_no_upload() {
    let moto = Moto::start().await;
    let upstream = moto.endpoint.trim_start_matches("http://").parse().unwrap();
    // A byte of the first part's body, past the upload's creation.
    let relay = proxy::Proxy::start(upstream, proxy::Fault::FlipRequestAt(3 << 20)).await;
    let s3 = moto.storage_via(&format!("http://{}", relay.addr), ChecksumMode::Md5);
    let data = big_text(40, 2);
    let url = S3Url::parse(&format!("s3://{BUCKET}/damaged.bin")).unwrap();
    let err = storage::upload(&s3, file_with(&data), data.len() as u64, &url, &mut |_| {})
        .await
        .unwrap_err();
    assert!(relay.fired(), "the fault was not injected");
    let text = err.to_string();
    assert!(text.contains("BadDigest") || text.contains("damaged"), "{text}");
    for _ in 0..100 {
        if moto.open_uploads().await == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the damaged upload was left open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs moto: bash .ci/compat"]
async fn a_run_stages_from_and_uploads_to_moto() {
    let moto = Moto::start().await;
    let stack = Stack::start().await;
    let (_gateway, mut client) = stack.gateway_process_via(&moto.endpoint, &[], None).await;
    let s3 = moto.storage(ChecksumMode::Auto);
    let text = big_text(24, 3);
    s3.put_object()
        .bucket(INPUT_BUCKET)
        .key("in.txt")
        .body(text.clone().into())
        .send()
        .await
        .unwrap();
    let url = format!("s3://{INPUT_BUCKET}/in.txt");
    let events = run_to_end(
        &mut client,
        run_request("uppercase", serde_json::json!({ "text": url })),
    )
    .await
    .unwrap();
    let output = call_outputs(&events)["output"].as_str().unwrap().to_owned();
    assert!(get_object(&s3, &output).await == text.to_ascii_uppercase());
    stack.wait_idle().await;
}
