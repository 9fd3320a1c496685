//! Checksum headers as stores other than the embedded one send them, from a
//! small HTTP server on loopback that answers HEAD and ranged GETs. Aliyun
//! OSS keeps a CRC-64 of every object in its own header,
//! `x-oss-hash-crc64ecma`, which the S3 SDK does not model: downloads check
//! it (the right value passes, a wrong one is a checksum error). A CRC-32C
//! of a multipart object's parts, sent without saying so, is not mistaken
//! for the object's.

mod common;

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming};
use hyper_util::rt::TokioIo;
use prefab::storage::{self, S3Url, StoreAlgorithm};

/// One object, served with these extra headers.
struct Object {
    data: Bytes,
    headers: Vec<(&'static str, String)>,
}

/// Serves `object` at every key on a free loopback port; returns the
/// endpoint and the server task, which the caller aborts.
async fn serve(object: Object) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let object = Arc::new(object);
    let task = tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let object = Arc::clone(&object);
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let object = Arc::clone(&object);
                async move { Ok::<_, Infallible>(respond(&object, &req)) }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(socket), service),
            );
        }
    });
    (endpoint, task)
}

/// HEAD: the object's headers; GET: the range asked for (206) or all.
fn respond(object: &Object, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let size = object.data.len();
    let (mut start, mut end) = (0, size);
    if let Some(range) = req.headers().get("range").and_then(|r| r.to_str().ok()) {
        let (a, b) = range.trim_start_matches("bytes=").split_once('-').unwrap();
        start = a.parse().unwrap();
        end = b.parse::<usize>().map_or(size, |last| last + 1);
    }
    let mut response = Response::builder().header("last-modified", "Sun, 29 Nov 2026 10:00:00 GMT");
    for (name, value) in &object.headers {
        response = response.header(*name, value);
    }
    let (response, body) = if req.method() == hyper::Method::HEAD {
        (response.status(200).header("content-length", size), Bytes::new())
    } else if (start, end) != (0, size) {
        let range = format!("bytes {start}-{}/{size}", end - 1);
        let response = response.status(206).header("content-range", range);
        (response, object.data.slice(start..end))
    } else {
        (response.status(200), object.data.clone())
    };
    response.body(Full::new(body)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_check_the_crc64_that_oss_keeps() {
    // A small object (one GET) and a ranged one.
    for size in [300 << 10, 40 << 20] {
        let data = Bytes::from(text(size, 11));
        let crc64ecma = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Xz, &data);
        for (claimed, ok) in [(crc64ecma, true), (crc64ecma ^ 0x10, false)] {
            let object = Object {
                data: data.clone(),
                headers: vec![
                    ("x-oss-hash-crc64ecma", claimed.to_string()),
                    ("x-oss-request-id", "5f2c9e".into()),
                ],
            };
            let (endpoint, server) = serve(object).await;
            let s3 = storage::connect(&s3_args(&endpoint)).unwrap();
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
        };
        let (endpoint, server) = serve(object).await;
        let s3 = storage::connect(&s3_args(&endpoint)).unwrap();
        let url = S3Url::parse("s3://bucket/videos/parts.bin").unwrap();
        let info = storage::head(&s3, &url).await.unwrap();
        assert_eq!(info.checksum.map(|c| c.algorithm), taken, "{kind:?} {etag}");
        let got = storage::download(&s3, &url, &info, tempfile::tempfile().unwrap(), &mut |_| {}).await;
        server.abort();
        assert_eq!(got.unwrap().checksum(), crc64nvme(&data), "{kind:?} {etag}");
    }
}
