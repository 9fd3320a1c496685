//! `PutFile` and `GetFile` through a real gateway process.

use crate::common;

use common::*;
use prefab::proto::{self, put_file_request::Msg};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

fn header(name: &str, size: Option<u64>) -> proto::PutFileRequest {
    proto::PutFileRequest {
        msg: Some(Msg::Header(proto::PutFileHeader {
            file_name: name.into(),
            size,
        })),
    }
}

fn chunk(data: Vec<u8>) -> proto::PutFileRequest {
    proto::PutFileRequest {
        msg: Some(Msg::Chunk(data.into())),
    }
}

/// 1 MiB blocks, each different.
fn block(i: u64) -> Vec<u8> {
    let mut b = text(1 << 20, i);
    b[..8].copy_from_slice(&i.to_le_bytes());
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_200_mib_file_round_trips_with_bounded_gateway_memory() {
    const MIB: u64 = 200;
    let stack = Stack::start().await;
    let (mut gateway, mut client) = stack.gateway_process().await;

    let (tx, rx) = mpsc::channel(4);
    let sender = tokio::spawn(async move {
        let mut crc = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc64Nvme);
        tx.send(header("../../etc/big file.bin", Some(MIB << 20)))
            .await
            .unwrap();
        for i in 0..MIB {
            let b = block(i);
            crc.update(&b);
            tx.send(chunk(b)).await.unwrap();
        }
        aws_smithy_types::base64::encode(crc.finalize().to_be_bytes())
    });
    let stored = client
        .put_file(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let sent_crc = sender.await.unwrap();
    assert_eq!(stored.size, MIB << 20);
    assert_eq!(stored.crc64nvme, sent_crc);
    assert!(
        stored.url.starts_with(&format!("s3://{BUCKET}/uploads/")),
        "{}",
        stored.url
    );
    assert!(stored.url.ends_with("/big_file.bin"), "{}", stored.url);

    let mut stream = client
        .get_file(proto::GetFileRequest {
            url: stored.url.clone(),
            offset: 0,
            length: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut crc = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc64Nvme);
    let (mut received, mut chunks) = (0u64, 0);
    while let Some(c) = stream.message().await.unwrap() {
        assert_eq!(c.offset, received);
        assert!(c.data.len() <= 1 << 20);
        crc.update(&c.data);
        received += c.data.len() as u64;
        chunks += 1;
    }
    assert_eq!(received, MIB << 20);
    assert!(chunks >= MIB, "{chunks} chunks");
    assert_eq!(
        aws_smithy_types::base64::encode(crc.finalize().to_be_bytes()),
        sent_crc
    );

    // A byte range.
    let mut stream = client
        .get_file(proto::GetFileRequest {
            url: stored.url.clone(),
            offset: (5 << 20) + 3,
            length: 10,
        })
        .await
        .unwrap()
        .into_inner();
    let c = stream.message().await.unwrap().unwrap();
    assert_eq!(&c.data[..], &block(5)[3..13]);
    assert!(stream.message().await.unwrap().is_none());

    let peak = peak_rss_bytes(gateway.id().unwrap());
    eprintln!("gateway peak RSS: {} MiB", peak >> 20);
    assert!(
        peak < 96 << 20,
        "gateway peak RSS {} MiB moving 200 MiB",
        peak >> 20
    );
    common::stop(&mut gateway).await;
    assert!(open_multipart_uploads(&stack).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_disconnects_mid_upload_leaves_nothing_behind() {
    let stack = Stack::start().await;
    let mut client = stack.client().await;
    let (tx, rx) = mpsc::channel(4);
    let call = tokio::spawn(async move { client.put_file(authed(ReceiverStream::new(rx))).await });
    tx.send(header("partial.bin", Some(100 << 20))).await.unwrap();
    // Enough for several multipart parts to be in flight.
    for i in 0..40 {
        tx.send(chunk(block(i))).await.unwrap();
    }
    wait_for("a multipart upload to be open", || {
        !open_multipart_uploads(&stack).is_empty()
    })
    .await;
    call.abort();
    let _ = call.await;
    drop(tx);
    wait_for("the multipart upload to be aborted", || {
        open_multipart_uploads(&stack).is_empty()
    })
    .await;
    assert!(list(&stack.tmp.path().join("s3").join(BUCKET).join("uploads")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_short_upload_is_refused_and_removed() {
    let stack = Stack::start().await;
    let mut client = stack.client().await;
    let msgs = vec![header("short.bin", Some(10 << 20)), chunk(block(1))];
    let status = client
        .put_file(authed(tokio_stream::iter(msgs)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("promised 10485760 bytes but 1048576 arrived"),
        "{}",
        status.message()
    );
    assert!(
        list(&stack.tmp.path().join("s3").join(BUCKET).join("uploads"))
            .iter()
            .all(|d| list(d).is_empty())
    );

    let status = client
        .put_file(authed(tokio_stream::iter(vec![chunk(vec![1, 2, 3])])))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    let status = client
        .get_file(authed(proto::GetFileRequest {
            url: "s3://not-allowed/x".into(),
            offset: 0,
            length: 0,
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_carries_its_checksum_for_the_store_to_check() {
    let stack = Stack::start().await;
    let mut client = stack.client().await;
    let data = text(3 << 20, 9);
    let requests = [header("notes.txt", Some(data.len() as u64)), chunk(data.clone())];
    let stored = client
        .put_file(authed(tokio_stream::iter(requests)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.crc64nvme, crc64nvme(&data));
    // The store verified the checksum sent with the PUT and keeps it.
    assert_eq!(stack.stored_checksum(&stored.url).await, Some(crc64nvme(&data)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn get_file_reads_only_what_the_gateway_wrote_or_runs_may_read() {
    let stack = Stack::start().await;
    // The gateway's own bucket is not in PREFAB_ALLOWED_BUCKETS: only its
    // outputs and uploads may be read from it.
    let (mut gateway, mut client) = stack.gateway_process().await;
    for key in ["outputs/r1/out.txt", "uploads/u1/in.txt", "private/secret.txt"] {
        stack
            .s3
            .put_object()
            .bucket(BUCKET)
            .key(key)
            .body(key.as_bytes().to_vec().into())
            .send()
            .await
            .unwrap();
    }
    let get = |url: String| proto::GetFileRequest {
        url,
        ..Default::default()
    };
    for key in ["outputs/r1/out.txt", "uploads/u1/in.txt"] {
        let mut stream = client
            .get_file(get(format!("s3://{BUCKET}/{key}")))
            .await
            .unwrap_or_else(|s| panic!("{key}: {s:?}"))
            .into_inner();
        let c = stream.message().await.unwrap().unwrap();
        assert_eq!(&c.data[..], key.as_bytes());
    }
    for url in [
        format!("s3://{BUCKET}/private/secret.txt"),
        format!("s3://{BUCKET}/outputs-not/x"),
        "s3://elsewhere/outputs/r1/out.txt".to_owned(),
    ] {
        let status = client.get_file(get(url.clone())).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{url}: {status:?}");
        assert!(status.message().contains("PREFAB_ALLOWED_BUCKETS"), "{status:?}");
    }
    // What runs may read stays readable.
    let input = stack.put_input("in/a.txt", b"input".to_vec()).await;
    let mut stream = client.get_file(get(input)).await.unwrap().into_inner();
    assert_eq!(&stream.message().await.unwrap().unwrap().data[..], b"input");
    gateway.kill().await.unwrap();
}
