//! Streaming an object onto local disk: one GET streamed through a bounded
//! channel to a blocking writer that hashes as it writes, resumed with a
//! ranged GET after a transient failure. Memory is bounded by
//! `WRITE_BATCH × WRITE_QUEUE`, whatever the object size.
//!
//! Integrity: the size is always checked; when the entity tag is a plain MD5
//! (objects stored in one PUT), the MD5 of the bytes written is checked
//! against it, so corruption on the way is an error, never a wrong file.

use std::{fs::File, io::Write, time::Duration};

use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::{ObjectInfo, S3Url, StorageError, Transfer};

/// Bytes gathered before one write to disk.
pub const WRITE_BATCH: usize = 1 << 20;
/// Batches queued between the network and the disk.
const WRITE_QUEUE: usize = 4;
/// Attempts per object, counting the first.
const MAX_ATTEMPTS: u32 = 5;

/// Downloads `url` (whose HEAD was `info`) into `file`, a new empty file
/// opened for reading and writing, reporting the cumulative byte count to
/// `progress` as it goes.
///
/// Objects of [`RANGED_THRESHOLD`] bytes or more are fetched as parallel
/// ranged GETs (see [`super::ranged`]), smaller ones as one streamed GET.
/// Transient failures resume from the bytes already written, pinned to the
/// same object version by `If-Match`. The result is verified to have exactly
/// `info.size` bytes and, for single-part objects, their MD5. On error the
/// partial file is left for the caller, who owns it, to remove.
pub async fn download(
    client: &aws_sdk_s3::Client,
    url: &S3Url,
    info: &ObjectInfo,
    file: File,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<Transfer, StorageError> {
    if info.size >= RANGED_THRESHOLD {
        super::ranged::download(client, url, info, file, progress).await
    } else {
        single_stream(client, url, info, file, progress).await
    }
}

/// Objects at least this large are fetched with parallel ranged GETs.
pub const RANGED_THRESHOLD: u64 = 32 << 20;

async fn single_stream(
    client: &aws_sdk_s3::Client,
    url: &S3Url,
    info: &ObjectInfo,
    file: File,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<Transfer, StorageError> {
    let (tx, rx) = mpsc::channel::<Bytes>(WRITE_QUEUE);
    let expected_md5 = info
        .etag
        .as_deref()
        .filter(|_| info.etag_is_md5)
        .and_then(md5_of_etag);
    let writer = spawn_writer(file, rx, expected_md5.is_some());
    let fetched = fetch(client, url, info, tx, progress).await;
    // The sender is dropped by now, so the writer drains and finishes.
    let written = writer
        .await
        .map_err(|e| StorageError::io(url, std::io::Error::other(e)))?;
    // A failed writer is the root cause of any send error the fetch saw.
    let (size, sha256, md5) =
        written.map_err(|e| StorageError::io(format!("the file staged from {url}"), e))?;
    fetched?;
    verify_md5(url, expected_md5, md5)?;
    if size != info.size {
        return Err(StorageError::Integrity {
            url: url.to_string(),
            detail: format!("expected {} bytes, wrote {size}", info.size),
        });
    }
    Ok(Transfer { size, sha256 })
}

/// Fails if the MD5 of the bytes written differs from the one expected.
pub(crate) fn verify_md5(
    url: &S3Url,
    expected: Option<[u8; 16]>,
    got: Option<[u8; 16]>,
) -> Result<(), StorageError> {
    match (expected, got) {
        (Some(expected), Some(got)) if expected != got => Err(StorageError::Integrity {
            url: url.to_string(),
            detail: format!(
                "MD5 checksum mismatch: the store's ETag says {}, the bytes received hash to {}",
                hex::encode(expected),
                hex::encode(got)
            ),
        }),
        _ => Ok(()),
    }
}

/// The MD5 an entity tag stands for, if it is a plain (single-part) one.
pub(crate) fn md5_of_etag(etag: &str) -> Option<[u8; 16]> {
    let hex_digits = etag.trim_matches('"');
    let mut out = [0u8; 16];
    hex::decode_to_slice(hex_digits, &mut out).ok()?;
    Some(out)
}

type WriterResult = std::io::Result<(u64, String, Option<[u8; 16]>)>;

fn spawn_writer(
    mut file: File,
    mut rx: mpsc::Receiver<Bytes>,
    with_md5: bool,
) -> tokio::task::JoinHandle<WriterResult> {
    tokio::task::spawn_blocking(move || {
        let mut hasher = Sha256::new();
        let mut md5 = with_md5.then(<md5::Md5 as md5::Digest>::new);
        let mut size = 0u64;
        while let Some(batch) = rx.blocking_recv() {
            hasher.update(&batch);
            if let Some(m) = &mut md5 {
                md5::Digest::update(m, &batch);
            }
            file.write_all(&batch)?;
            size += batch.len() as u64;
        }
        file.flush()?;
        let md5 = md5.map(|m| md5::Digest::finalize(m).into());
        Ok((size, hex::encode(hasher.finalize()), md5))
    })
}

async fn fetch(
    client: &aws_sdk_s3::Client,
    url: &S3Url,
    info: &ObjectInfo,
    tx: mpsc::Sender<Bytes>,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<(), StorageError> {
    let mut offset = 0u64;
    let mut attempt = 0;
    loop {
        attempt += 1;
        match fetch_from(client, url, info, offset, &tx, progress).await {
            Ok(end) if end == info.size => return Ok(()),
            Ok(end) if end > info.size => {
                return Err(StorageError::Integrity {
                    url: url.to_string(),
                    detail: format!("object grew past its advertised {} bytes", info.size),
                });
            }
            // A body that ended early is a cut connection: resume.
            Ok(end) => offset = end,
            Err((end, e)) if e.is_transient() && attempt < MAX_ATTEMPTS => {
                tracing::warn!(%url, offset = end, attempt, error = %e, "download interrupted, resuming");
                offset = end;
            }
            Err((_, e)) => return Err(e),
        }
        if attempt >= MAX_ATTEMPTS {
            return Err(StorageError::Unavailable {
                url: url.to_string(),
                op: "GetObject",
                detail: format!("gave up after {MAX_ATTEMPTS} attempts at byte {offset}"),
            });
        }
        tokio::time::sleep(backoff(attempt)).await;
    }
}

/// One GET from `offset`; returns the offset reached, with the error if any.
async fn fetch_from(
    client: &aws_sdk_s3::Client,
    url: &S3Url,
    info: &ObjectInfo,
    mut offset: u64,
    tx: &mpsc::Sender<Bytes>,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<u64, (u64, StorageError)> {
    if info.size == 0 {
        return Ok(0);
    }
    let mut req = client
        .get_object()
        .bucket(url.bucket())
        .key(url.key())
        .range(format!("bytes={offset}-"));
    if let Some(etag) = &info.etag {
        req = req.if_match(etag);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| (offset, StorageError::from_sdk(url, "GetObject", e)))?;
    let mut body = resp.body;
    let mut batch = BytesMut::with_capacity(WRITE_BATCH);
    let cut = |offset, e: &dyn std::fmt::Display| {
        (
            offset,
            StorageError::Unavailable {
                url: url.to_string(),
                op: "GetObject",
                detail: e.to_string(),
            },
        )
    };
    loop {
        let next = body.try_next().await;
        let chunk = match next {
            Ok(Some(chunk)) => Some(chunk),
            Ok(None) => None,
            Err(e) => {
                // Keep what arrived intact before the cut.
                let flushed = offset + batch.len() as u64;
                flush(&mut batch, tx).await.map_err(|e| (offset, e))?;
                progress(flushed);
                return Err(cut(flushed, &e));
            }
        };
        let done = chunk.is_none();
        if let Some(chunk) = chunk {
            batch.extend_from_slice(&chunk);
        }
        if batch.len() >= WRITE_BATCH || (done && !batch.is_empty()) {
            offset += batch.len() as u64;
            flush(&mut batch, tx).await.map_err(|e| (offset, e))?;
            progress(offset);
        }
        if done {
            return Ok(offset);
        }
    }
}

async fn flush(batch: &mut BytesMut, tx: &mpsc::Sender<Bytes>) -> Result<(), StorageError> {
    if batch.is_empty() {
        return Ok(());
    }
    let full = std::mem::replace(batch, BytesMut::with_capacity(WRITE_BATCH)).freeze();
    tx.send(full).await.map_err(|_| StorageError::Io {
        path: "download writer".into(),
        source: std::io::Error::other("the file writer stopped early"),
    })
}

/// Exponential backoff with jitter: about 200 ms, 400 ms, 800 ms, … capped at 5 s.
pub(crate) fn backoff(attempt: u32) -> Duration {
    let base = 100u64 << attempt.min(6);
    let jitter = u64::from(uuid::Uuid::new_v4().as_bytes()[0]) * base / 255;
    Duration::from_millis((base + jitter).min(5_000))
}

#[cfg(test)]
mod tests {
    use super::md5_of_etag;

    #[test]
    fn only_plain_etags_are_md5s() {
        assert_eq!(
            md5_of_etag("\"9e107d9d372bb6826bd81d3542a419d6\""),
            Some(hex_literal(*b"9e107d9d372bb6826bd81d3542a419d6"))
        );
        assert_eq!(md5_of_etag("\"9e107d9d372bb6826bd81d3542a419d6-3\""), None);
        assert_eq!(md5_of_etag("W/\"x\""), None);
    }

    fn hex_literal(s: [u8; 32]) -> [u8; 16] {
        let mut out = [0u8; 16];
        hex::decode_to_slice(s, &mut out).unwrap();
        out
    }
}
