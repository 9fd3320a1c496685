//! Parallel ranged downloads of large objects: the object is split into
//! ranges fetched by several GETs at once (with a global limit across all
//! downloads), each written at its offset into a preallocated file. A
//! hashing thread follows the contiguous prefix of finished ranges, reading
//! them back (from the page cache) to compute SHA-256 and, for single-part
//! objects, the MD5 to check against the ETag. Memory is bounded by
//! ranges in flight × one write batch, whatever the object size.

use std::{
    collections::BTreeSet,
    fs::File,
    os::unix::fs::FileExt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::BytesMut;
use sha2::{Digest, Sha256};
use tokio::{
    sync::{Semaphore, mpsc},
    task::JoinSet,
};

use super::{
    ObjectInfo, S3Url, StorageError, Transfer,
    download::{WRITE_BATCH, backoff, md5_of_etag, verify_md5},
};

/// Bytes per ranged GET.
pub const RANGE_SIZE: u64 = 16 << 20;
/// Ranges of one object in flight.
const RANGES_PER_OBJECT: usize = 4;
/// Ranges in flight across every download of the process.
static RANGE_PERMITS: Semaphore = Semaphore::const_new(16);
/// Attempts per range, counting the first.
const MAX_ATTEMPTS: u32 = 5;

/// Downloads `url` into `file` (new, empty, open for reading and writing)
/// with parallel ranged GETs.
pub async fn download(
    client: &aws_sdk_s3::Client,
    url: &S3Url,
    info: &ObjectInfo,
    file: File,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<Transfer, StorageError> {
    let io = |e: std::io::Error| StorageError::io(format!("the file staged from {url}"), e);
    let size = info.size;
    let file = tokio::task::spawn_blocking(move || {
        file.set_len(size)?;
        Ok::<_, std::io::Error>(file)
    })
    .await
    .map_err(|e| io(std::io::Error::other(e)))?
    .map_err(io)?;
    let file = Arc::new(file);
    let ranges = size.div_ceil(RANGE_SIZE);
    let expected_md5 = info
        .etag
        .as_deref()
        .filter(|_| info.etag_is_md5)
        .and_then(md5_of_etag);
    let (done_tx, done_rx) = mpsc::unbounded_channel::<u64>();
    let hasher = spawn_hasher(Arc::clone(&file), size, done_rx, expected_md5.is_some());

    let written = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    let mut next = 0u64;
    let mut result = Ok(());
    while next < ranges || !tasks.is_empty() {
        if next < ranges && tasks.len() < RANGES_PER_OBJECT {
            let start = next * RANGE_SIZE;
            let end = (start + RANGE_SIZE).min(size);
            let job = Range {
                client: client.clone(),
                url: url.clone(),
                etag: info.etag.clone(),
                file: Arc::clone(&file),
                written: Arc::clone(&written),
            };
            let index = next;
            tasks.spawn(async move {
                let _permit = RANGE_PERMITS.acquire().await.expect("never closed");
                job.fetch(start, end).await.map(|()| index)
            });
            next += 1;
            continue;
        }
        let finished = tasks.join_next().await.expect("a range is in flight");
        match finished.map_err(|e| io(std::io::Error::other(e))).and_then(|r| r) {
            Ok(index) => {
                // The hasher only stops early if its file read failed; the
                // join below reports that.
                let _ = done_tx.send(index);
                progress(written.load(Ordering::Relaxed));
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    tasks.abort_all();
    drop(done_tx);
    let hashed = hasher.await.map_err(|e| io(std::io::Error::other(e)))?;
    result?;
    let (sha256, md5) = hashed.map_err(io)?;
    verify_md5(url, expected_md5, md5)?;
    Ok(Transfer { size, sha256 })
}

struct Range {
    client: aws_sdk_s3::Client,
    url: S3Url,
    etag: Option<String>,
    file: Arc<File>,
    written: Arc<AtomicU64>,
}

impl Range {
    /// Fetches bytes `[start, end)`, resuming after transient failures.
    async fn fetch(&self, start: u64, end: u64) -> Result<(), StorageError> {
        let mut pos = start;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.fetch_from(pos, end).await {
                Ok(reached) if reached == end => return Ok(()),
                Ok(reached) => pos = reached, // cut short: resume
                Err((reached, e)) if e.is_transient() && attempt < MAX_ATTEMPTS => {
                    tracing::warn!(url = %self.url, offset = reached, attempt, error = %e, "range interrupted, resuming");
                    pos = reached;
                }
                Err((_, e)) => return Err(e),
            }
            if attempt >= MAX_ATTEMPTS {
                return Err(StorageError::Unavailable {
                    url: self.url.to_string(),
                    op: "GetObject",
                    detail: format!("gave up after {MAX_ATTEMPTS} attempts at byte {pos}"),
                });
            }
            tokio::time::sleep(backoff(attempt)).await;
        }
    }

    async fn fetch_from(&self, mut pos: u64, end: u64) -> Result<u64, (u64, StorageError)> {
        let mut req = self
            .client
            .get_object()
            .bucket(self.url.bucket())
            .key(self.url.key())
            .range(format!("bytes={pos}-{}", end - 1));
        if let Some(etag) = &self.etag {
            req = req.if_match(etag);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| (pos, StorageError::from_sdk(&self.url, "GetObject", e)))?;
        let mut body = resp.body;
        let mut batch = BytesMut::with_capacity(WRITE_BATCH);
        loop {
            let next = body.try_next().await;
            let (chunk, failed) = match next {
                Ok(chunk) => (chunk, None),
                Err(e) => (None, Some(e.to_string())),
            };
            if let Some(chunk) = &chunk {
                if pos + (batch.len() + chunk.len()) as u64 > end {
                    let detail = "the store sent more bytes than the range asked for".to_owned();
                    return Err((
                        pos,
                        StorageError::Integrity {
                            url: self.url.to_string(),
                            detail,
                        },
                    ));
                }
                batch.extend_from_slice(chunk);
            }
            if batch.len() >= WRITE_BATCH || (chunk.is_none() && !batch.is_empty()) {
                let data = std::mem::replace(&mut batch, BytesMut::with_capacity(WRITE_BATCH)).freeze();
                let (file, at, len) = (Arc::clone(&self.file), pos, data.len() as u64);
                tokio::task::spawn_blocking(move || file.write_all_at(&data, at))
                    .await
                    .map_err(std::io::Error::other)
                    .and_then(|r| r)
                    .map_err(|e| (pos, StorageError::io("the staged file", e)))?;
                pos += len;
                self.written.fetch_add(len, Ordering::Relaxed);
            }
            if let Some(detail) = failed {
                let op = "GetObject";
                return Err((
                    pos,
                    StorageError::Unavailable {
                        url: self.url.to_string(),
                        op,
                        detail,
                    },
                ));
            }
            if chunk.is_none() {
                return Ok(pos);
            }
        }
    }
}

type Hashes = std::io::Result<(String, Option<[u8; 16]>)>;

/// Hashes the file's contiguous prefix of finished ranges as it grows.
fn spawn_hasher(
    file: Arc<File>,
    size: u64,
    mut done: mpsc::UnboundedReceiver<u64>,
    with_md5: bool,
) -> tokio::task::JoinHandle<Hashes> {
    tokio::task::spawn_blocking(move || {
        let mut sha = Sha256::new();
        let mut md5 = with_md5.then(<md5::Md5 as md5::Digest>::new);
        let mut finished = BTreeSet::new();
        let mut next = 0u64;
        let mut buf = vec![0u8; WRITE_BATCH];
        while let Some(index) = done.blocking_recv() {
            finished.insert(index);
            while finished.remove(&next) {
                let (mut at, end) = (next * RANGE_SIZE, ((next + 1) * RANGE_SIZE).min(size));
                while at < end {
                    let n = ((end - at) as usize).min(buf.len());
                    file.read_exact_at(&mut buf[..n], at)?;
                    sha.update(&buf[..n]);
                    if let Some(m) = &mut md5 {
                        md5::Digest::update(m, &buf[..n]);
                    }
                    at += n as u64;
                }
                next += 1;
            }
        }
        let md5 = md5.map(|m| md5::Digest::finalize(m).into());
        Ok((hex::encode(sha.finalize()), md5))
    })
}
