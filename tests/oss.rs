//! Aliyun OSS keeps a CRC-64 of every object and sends it in its own
//! header, `x-oss-hash-crc64ecma`, which the S3 SDK does not model. A small
//! HTTP server on loopback answers HEAD and ranged GETs the way OSS does, so
//! that downloads are seen checking that header: the right value passes, a
//! wrong one is a checksum error.

mod common;

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming};
use hyper_util::rt::TokioIo;
use prefab::storage::{self, S3Url, StoreAlgorithm};

/// One object served OSS-style, with the CRC-64 it claims to have.
struct Object {
    data: Bytes,
    crc64ecma: u64,
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
        end = b.parse::<usize>().unwrap() + 1;
    }
    let response = Response::builder()
        .header("x-oss-hash-crc64ecma", object.crc64ecma.to_string())
        .header("x-oss-request-id", "5f2c9e")
        .header("last-modified", "Sun, 29 Nov 2026 10:00:00 GMT");
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
                crc64ecma: claimed,
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
                        message.contains("CRC-64/ECMA (OSS) checksum mismatch"),
                        "{message}"
                    );
                    assert!(message.contains(&claimed.to_string()), "{message}");
                }
            }
        }
    }
}
