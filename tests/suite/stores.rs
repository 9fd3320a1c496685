//! What stores send, and how few requests a download takes.
//!
//! A small HTTP server on loopback answers HEAD and ranged GETs as stores
//! other than the embedded one do. A small object comes whole with the GET
//! that looks at it, checked against its MD5 tag or, if its tag is no MD5,
//! the checksum a HEAD reports; a store that ignores ranges is served too;
//! a refusal names the object and what to do, at once.
//! The embedded store checks the probe's size boundaries. Aliyun
//! OSS keeps a CRC-64 of every object in its own header,
//! `x-oss-hash-crc64ecma`, which the S3 SDK does not model: downloads check
//! it (the right value passes, a wrong one is a checksum error). A CRC-32C
//! of a multipart object's parts, sent without saying so, is not mistaken
//! for the object's. A reply cut after its last byte loses nothing.

use crate::common;

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{
    Request, Response,
    body::{Frame, Incoming},
};
use hyper_util::rt::TokioIo;
use prefab::storage::{self, S3Url, StoreAlgorithm};

/// One object, served with these extra headers.
#[derive(Default)]
struct Object {
    data: Bytes,
    headers: Vec<(&'static str, String)>,
    /// Answer every GET with the whole object, as a store that does not
    /// know ranges would.
    ignore_range: bool,
    /// Another entity tag for HEADs, as if the object changed after the GET.
    head_etag: Option<&'static str>,
    /// Answer every request with this status and S3 error code.
    refuse: Option<(u16, &'static str)>,
    /// Send GET bodies chunked, and close the connection after the last
    /// byte instead of ending the body.
    cut_after_body: bool,
    /// Requests answered: HEADs and GETs.
    heads: AtomicUsize,
    gets: AtomicUsize,
}

impl Object {
    fn requests(&self) -> (usize, usize) {
        (
            self.heads.load(Ordering::SeqCst),
            self.gets.load(Ordering::SeqCst),
        )
    }
}

/// Serves `object` at every key on a free loopback port; returns the
/// endpoint, the object (to count requests) and the server task, which the
/// caller aborts.
async fn serve(object: Object) -> (String, Arc<Object>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let object = Arc::new(object);
    let served = Arc::clone(&object);
    let task = tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let object = Arc::clone(&served);
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let object = Arc::clone(&object);
                async move { Ok::<_, Infallible>(respond(&object, &req)) }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(socket), service),
            );
        }
    });
    (endpoint, object, task)
}

/// HEAD: the object's headers; GET: the range asked for (206) or all.
fn respond(object: &Object, req: &Request<Incoming>) -> Response<Body> {
    let size = object.data.len();
    let (mut start, mut end) = (0, size);
    let range = req.headers().get("range").and_then(|r| r.to_str().ok());
    if let Some(range) = range.filter(|_| !object.ignore_range) {
        let (a, b) = range.trim_start_matches("bytes=").split_once('-').unwrap();
        start = a.parse().unwrap();
        end = b.parse::<usize>().map_or(size, |last| (last + 1).min(size));
    }
    let counter = match req.method() == hyper::Method::HEAD {
        true => &object.heads,
        false => &object.gets,
    };
    counter.fetch_add(1, Ordering::SeqCst);
    if let Some((status, code)) = object.refuse {
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>refused by the test store</Message></Error>"
        );
        let response = Response::builder()
            .status(status)
            .header("content-type", "application/xml");
        return response.body(whole(Bytes::from(body))).unwrap();
    }
    let mut response = Response::builder().header("last-modified", "Sun, 29 Nov 2026 10:00:00 GMT");
    let head = req.method() == hyper::Method::HEAD;
    for (name, value) in &object.headers {
        match (*name, object.head_etag) {
            ("etag", Some(etag)) if head => response = response.header("etag", etag),
            _ => response = response.header(*name, value),
        }
    }
    let (response, body) = if head {
        (response.status(200).header("content-length", size), Bytes::new())
    } else if (start, end) != (0, size) {
        let range = format!("bytes {start}-{}/{size}", end - 1);
        let response = response.status(206).header("content-range", range);
        (response, object.data.slice(start..end))
    } else {
        (response.status(200), object.data.clone())
    };
    if object.cut_after_body && !head {
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(async move {
            let _ = tx.send(Ok(Frame::data(body))).await;
            // Time for hyper to hand every byte to the socket, which
            // delivers them before it closes.
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            let _ = tx
                .send(Err(std::io::Error::other("the test store stops here")))
                .await;
        });
        let frames = tokio_stream::wrappers::ReceiverStream::new(rx);
        return response.body(StreamBody::new(frames).boxed()).unwrap();
    }
    response.body(whole(body)).unwrap()
}

/// A reply body: whole, or cut by the store.
type Body = BoxBody<Bytes, std::io::Error>;

fn whole(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_cut_after_its_last_byte_loses_nothing() {
    let data = Bytes::from(text(40 << 20, 16));
    let object = Object {
        data: data.clone(),
        headers: vec![("etag", "\"4d2c0e1fb5c8a0c1ad3a2f7e59e2b6a1-3\"".into())],
        cut_after_body: true,
        ..Object::default()
    };
    let (endpoint, object, server) = serve(object).await;
    let s3 = storage::connect(&s3_args(&endpoint).settings()).unwrap();
    let url = S3Url::parse("s3://bucket/videos/cut.bin").unwrap();
    let info = storage::head(&s3, &url).await.unwrap();
    let out = tempfile::tempfile().unwrap();
    let got = storage::download(&s3, &url, &info, out.try_clone().unwrap(), &mut |_| {}).await;
    server.abort();
    assert_eq!(got.unwrap().checksum(), crc64nvme(&data));
    let mut written = Vec::new();
    std::io::Read::read_to_end(&mut &out, &mut written).unwrap();
    assert!(written == data, "the file differs");
    let (_, gets) = object.requests();
    assert!(
        gets <= 16,
        "{gets} GETs: a range that had all its bytes was asked for again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_check_the_crc64_that_oss_keeps() {
    // A small object (one GET) and a ranged one.
    for size in [300 << 10, 40 << 20] {
        let data = Bytes::from(text(size, 11));
        let crc64ecma = crc64xz(&data);
        for (claimed, ok) in [(crc64ecma, true), (crc64ecma ^ 0x10, false)] {
            let object = Object {
                data: data.clone(),
                headers: vec![
                    ("x-oss-hash-crc64ecma", claimed.to_string()),
                    ("x-oss-request-id", "5f2c9e".into()),
                ],
                ..Object::default()
            };
            let (endpoint, _, server) = serve(object).await;
            let s3 = storage::connect(&s3_args(&endpoint).settings()).unwrap();
            let url = S3Url::parse("s3://bucket/videos/in.bin").unwrap();
            let info = storage::head(&s3, &url).await.unwrap();
            assert_eq!(
                info.checksum.map(|c| (c.algorithm, c.value)),
                Some((StoreAlgorithm::Crc64Ecma, claimed))
            );
            let out = tempfile::tempfile().unwrap();
            let got = storage::download(&s3, &url, &info, out.try_clone().unwrap(), &mut |_| {}).await;
            server.abort();
            match got {
                Ok(done) => {
                    assert!(ok, "{size} bytes: a wrong CRC-64 passed");
                    assert_eq!(done.checksum(), crc64nvme(&data));
                    let mut written = Vec::new();
                    std::io::Read::read_to_end(&mut &out, &mut written).unwrap();
                    assert!(written == data, "{size} bytes: the file differs");
                }
                Err(e) => {
                    assert!(!ok, "{size} bytes: {e}");
                    let message = e.to_string();
                    assert!(
                        message.contains("CRC-64/XZ (OSS crc64ecma) checksum mismatch"),
                        "{message}"
                    );
                    assert!(message.contains(&claimed.to_string()), "{message}");
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crc32c_of_parts_is_not_taken_for_the_whole_object() {
    let data = Bytes::from(text(3 << 20, 12));
    let of_parts = crc32(b"the parts' checksums, not the object's", true);
    let whole = crc32(&data, true);
    // (type header, ETag, CRC-32C sent) -> what HEAD takes
    let cases = [
        (None, "\"0a1b-3\"", &of_parts, None),
        (Some("COMPOSITE"), "\"0a1b\"", &of_parts, None),
        (
            Some("FULL_OBJECT"),
            "\"0a1b-3\"",
            &whole,
            Some(StoreAlgorithm::Crc32c),
        ),
        (None, "\"0a1b\"", &whole, Some(StoreAlgorithm::Crc32c)),
    ];
    for (kind, etag, crc, taken) in cases {
        let mut headers = vec![("etag", etag.to_owned()), ("x-amz-checksum-crc32c", crc.clone())];
        headers.extend(kind.map(|k| ("x-amz-checksum-type", k.to_owned())));
        let object = Object {
            data: data.clone(),
            headers,
            ..Object::default()
        };
        let (endpoint, _, server) = serve(object).await;
        let s3 = storage::connect(&s3_args(&endpoint).settings()).unwrap();
        let url = S3Url::parse("s3://bucket/videos/parts.bin").unwrap();
        let info = storage::head(&s3, &url).await.unwrap();
        assert_eq!(info.checksum.map(|c| c.algorithm), taken, "{kind:?} {etag}");
        let got = storage::download(&s3, &url, &info, tempfile::tempfile().unwrap(), &mut |_| {}).await;
        server.abort();
        assert_eq!(got.unwrap().checksum(), crc64nvme(&data), "{kind:?} {etag}");
    }
}

/// Probes `object` on a fake store and downloads what the probe found;
/// returns what the probe kept, the requests made, and the outcome.
async fn probe_and_download(object: Object) -> (bool, (usize, usize), Result<Vec<u8>, String>) {
    let data = object.data.clone();
    let (endpoint, object, server) = serve(object).await;
    let s3 = storage::connect(&s3_args(&endpoint).settings()).unwrap();
    let url = S3Url::parse("s3://bucket/small/in.bin").unwrap();
    let probed = storage::probe(&s3, &url).await.unwrap();
    assert_eq!(probed.info.size, data.len() as u64);
    let out = tempfile::tempfile().unwrap();
    let completed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = std::sync::Arc::clone(&completed);
    let complete = Box::new(move || {
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    });
    let got = storage::download_probed(
        &s3,
        &url,
        &probed,
        out.try_clone().unwrap(),
        &mut |_| {},
        Some(complete),
    )
    .await;
    server.abort();
    // Completed (renamed into place, in the gateway) only once verified.
    assert_eq!(completed.load(std::sync::atomic::Ordering::SeqCst), got.is_ok());
    let got = got.map_err(|e| e.to_string()).map(|done| {
        assert_eq!(done.checksum(), crc64nvme(&data));
        let mut written = Vec::new();
        std::io::Read::read_to_end(&mut &out, &mut written).unwrap();
        written
    });
    (probed.body.is_some(), object.requests(), got)
}

/// Checks a download: the bytes of `good` if given, else an error that
/// says `complaint`.
fn expect(got: Result<Vec<u8>, String>, good: Option<&[u8]>, complaint: &str) {
    match (got, good) {
        (Ok(written), Some(data)) => assert!(written == data, "the file differs"),
        (Ok(_), None) => panic!("a download passed that should fail with {complaint:?}"),
        (Err(e), Some(_)) => panic!("{e}"),
        (Err(e), None) => assert!(e.contains(complaint), "{e}"),
    }
}

/// Aliyun OSS's CRC-64 of `data`.
fn crc64xz(data: &[u8]) -> u64 {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Xz, data)
}

/// `data` encrypted with a KMS key, as OSS keeps it: a tag that is not the
/// MD5, and the CRC-64 it `claimed`.
fn kms_object(data: &Bytes, claimed: u64) -> Object {
    Object {
        data: data.clone(),
        headers: vec![
            ("etag", "\"4d2c0e1fb5c8a0c1ad3a2f7e59e2b6a1\"".into()),
            ("x-amz-server-side-encryption", "aws:kms".into()),
            ("x-oss-hash-crc64ecma", claimed.to_string()),
        ],
        ..Object::default()
    }
}

fn md5_etag(data: &[u8]) -> String {
    use md5::Digest;
    format!("\"{}\"", hex::encode(md5::Md5::digest(data)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_object_comes_whole_with_one_get_and_is_checked_against_its_md5() {
    let data = Bytes::from(text(40 << 10, 13));
    for (etag, ok) in [(md5_etag(&data), true), (md5_etag(b"other bytes"), false)] {
        let object = Object {
            data: data.clone(),
            headers: vec![("etag", etag.clone())],
            ..Object::default()
        };
        let (kept, requests, got) = probe_and_download(object).await;
        assert!(kept, "the probe keeps a small object");
        assert_eq!(requests, (0, 1), "one GET, no HEAD");
        expect(got, ok.then_some(&data[..]), "MD5 checksum mismatch");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_object_whose_tag_is_no_md5_is_checked_against_the_stores_crc() {
    // Encrypted with a KMS key: the tag is not the MD5, and only a HEAD
    // brings the store's CRC.
    let data = Bytes::from(text(40 << 10, 14));
    let crc64ecma = crc64xz(&data);
    for (claimed, ok) in [(crc64ecma, true), (crc64ecma ^ 0x10, false)] {
        let object = kms_object(&data, claimed);
        let (kept, requests, got) = probe_and_download(object).await;
        assert!(kept, "the HEAD describes the same version: the bytes are kept");
        assert_eq!(requests, (1, 1), "one GET and one HEAD");
        expect(
            got,
            ok.then_some(&data[..]),
            "CRC-64/XZ (OSS crc64ecma) checksum mismatch",
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_ignores_ranges_is_served_all_the_same() {
    for (size, whole) in [(40 << 10, true), (300 << 10, false)] {
        let data = Bytes::from(text(size, 15));
        let object = Object {
            data: data.clone(),
            headers: vec![("etag", md5_etag(&data))],
            ignore_range: true,
            ..Object::default()
        };
        let (kept, (heads, _), got) = probe_and_download(object).await;
        assert_eq!(kept, whole, "{size} bytes");
        assert_eq!(
            heads,
            usize::from(!whole),
            "{size} bytes: a HEAD only when the probe fell short"
        );
        assert!(got.unwrap() == data, "{size} bytes: the file differs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_store_brings_objects_up_to_the_probe_size_whole() {
    let stack = Stack::start().await;
    let limit = storage::PROBE_BYTES as usize;
    let cases = [
        (0, false),
        (1, true),
        (limit, true),
        (limit + 1, false),
        (3 << 20, false),
    ];
    check_probe_sizes(&stack.s3, INPUT_BUCKET, "probe/", &cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_look_says_why() {
    let cases = [
        (404, "NoSuchKey", "was not found (GetObject)"),
        (403, "AccessDenied", "check the gateway's S3 credentials"),
        (
            403,
            "InvalidObjectState",
            "the object is archived: restore it first",
        ),
    ];
    for (status, code, says) in cases {
        let object = Object {
            refuse: Some((status, code)),
            ..Object::default()
        };
        let (endpoint, object, server) = serve(object).await;
        let s3 = storage::connect(&s3_args(&endpoint).settings()).unwrap();
        let url = S3Url::parse("s3://bucket/cold/in.bin").unwrap();
        let err = storage::probe(&s3, &url).await.unwrap_err().to_string();
        server.abort();
        assert!(err.contains(says), "{code}: {err}");
        assert!(err.contains("s3://bucket/cold/in.bin"), "{code}: {err}");
        assert_eq!(object.requests(), (0, 1), "{code}: refused at once, not retried");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_of_a_version_the_head_does_not_describe_are_not_kept() {
    let data = Bytes::from(text(40 << 10, 16));
    let object = Object {
        head_etag: Some("\"77c0e1fb5c8a0c1ad3a2f7e59e2b6a10\""),
        ..kms_object(&data, crc64xz(&data))
    };
    let (kept, requests, got) = probe_and_download(object).await;
    assert!(!kept, "the probe's bytes are of another version than the HEAD's");
    assert_eq!(requests, (1, 2), "probe, HEAD, then a GET of the HEAD's version");
    assert!(got.unwrap() == data, "the file differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_reply_longer_than_it_said_is_not_read_to_its_end() {
    // A store that says 10 bytes but streams chunks without end: the probe
    // stops reading at 64 KiB and takes the size from a HEAD.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let sent = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&sent);
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut socket, _)) = listener.accept().await {
            let counted = Arc::clone(&counted);
            tokio::spawn(async move {
                let mut request = vec![0u8; 16 << 10];
                let n = socket.read(&mut request).await.unwrap_or(0);
                let head = request[..n].starts_with(b"HEAD");
                let etag = "\"0123456789abcdef0123456789abcdef\"";
                if head {
                    let reply = format!("HTTP/1.1 200 OK\r\ncontent-length: 10\r\netag: {etag}\r\n\r\n");
                    let _ = socket.write_all(reply.as_bytes()).await;
                    return;
                }
                let reply = format!(
                    "HTTP/1.1 206 Partial Content\r\ncontent-length: 10\r\ntransfer-encoding: chunked\r\n\
                     content-range: bytes 0-9/10\r\netag: {etag}\r\n\r\n"
                );
                if socket.write_all(reply.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = format!("10000\r\n{}\r\n", "x".repeat(1 << 16));
                // At most 256 MiB, stopping as soon as the client hangs up.
                for _ in 0..4096 {
                    if socket.write_all(chunk.as_bytes()).await.is_err() {
                        return;
                    }
                    counted.fetch_add(1 << 16, Ordering::SeqCst);
                }
            });
        }
    });
    let s3 = storage::connect(&s3_args(&endpoint).settings()).unwrap();
    let url = S3Url::parse("s3://bucket/endless/in.bin").unwrap();
    let probed = storage::probe(&s3, &url).await.unwrap();
    server.abort();
    assert_eq!(probed.info.size, 10, "the size comes from the HEAD");
    assert!(probed.body.is_none());
    let sent = sent.load(Ordering::SeqCst);
    assert!(sent < 64 << 20, "the probe kept reading: {sent} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_file_relays_a_reply_cut_after_its_last_byte_and_refuses_an_ignored_range() {
    let stack = Stack::start().await;
    let data = Bytes::from(text(3 << 20, 17));
    for (cut_after_body, ignore_range) in [(true, false), (false, true)] {
        let object = Object {
            data: data.clone(),
            headers: vec![("etag", md5_etag(&data))],
            cut_after_body,
            ignore_range,
            ..Object::default()
        };
        let (endpoint, _, server) = serve(object).await;
        let (mut gateway, mut client) = stack
            .gateway_process_via(&endpoint, &["--allowed-buckets=bucket"], None)
            .await;
        let get = prefab::proto::GetFileRequest {
            url: "s3://bucket/videos/relayed.bin".into(),
            offset: 1000,
            length: 0,
        };
        let got = async {
            let mut stream = client.get_file(authed(get)).await?.into_inner();
            let mut got = Vec::new();
            while let Some(chunk) = stream.message().await? {
                got.extend_from_slice(&chunk.data);
            }
            Ok::<_, tonic::Status>(got)
        }
        .await;
        common::stop(&mut gateway).await;
        server.abort();
        match (cut_after_body, got) {
            (true, Ok(got)) => assert!(got == data[1000..], "the relayed bytes differ"),
            (true, Err(status)) => panic!("a reply with every byte failed: {status:?}"),
            (false, Ok(_)) => panic!("the whole object was relayed as a range"),
            (false, Err(status)) => assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}"),
        }
    }
}
