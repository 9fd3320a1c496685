//! Streaming an object onto local disk. Small objects are gathered in
//! memory (or came whole with their [`super::probe`]) and are written by
//! one blocking call; larger ones go through the ranged engine in
//! [`super::ranged`]. Either way a GET that breaks resumes
//! from the bytes already received, pinned to the same object version by
//! `If-Match`.
//!
//! Integrity: the size is always checked; the bytes received are checked
//! against the whole-object checksum the store keeps, if any (CRC-64/NVME,
//! which the gateway computes anyway, or a CRC-32C, CRC-32 or OSS CRC-64
//! computed alongside it), and their MD5 against the entity tag when that
//! is a plain MD5 (objects stored in one PUT). Corruption of an object that
//! has either is an error, never a wrong file; an object with neither (a
//! multipart upload by another tool without checksums, or an encrypted one)
//! can only be checked for its size.

use std::fs::File;

use bytes::Bytes;
use md5::{Digest, Md5};

use super::{
    ObjectInfo, Probed, S3Url, Storage, StorageError, Transfer,
    checksum::{Summed, Sums},
    retry::{Next, Retrier},
};

/// Objects up to this size are gathered in memory and written at once.
pub const SMALL_OBJECT: u64 = 1 << 20;
/// Bytes a range gathers before handing them to the writer.
pub const WRITE_BATCH: usize = 1 << 20;

/// Downloads `url` (described by `info`) into `file`, a new empty file
/// opened for reading and writing, reporting the cumulative byte count to
/// `progress` as it goes.
///
/// The result is verified to have exactly `info.size` bytes, the store's
/// whole-object checksum if it has one, and, for single-part objects, their
/// MD5. On error the partial file is left for the caller, who owns it, to
/// remove.
pub async fn download(
    storage: &Storage,
    url: &S3Url,
    info: &ObjectInfo,
    file: File,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<Transfer, StorageError> {
    if info.size > SMALL_OBJECT {
        return super::ranged::download(storage, url, info, file, progress).await;
    }
    let mut gathered = Vec::new();
    if info.size > 0 {
        fetch_range(&FetchSpec::new(storage, url, info), 0, info.size, &mut gathered).await?;
    }
    let transfer = save(url, info, gathered, file, None).await?;
    progress(info.size);
    Ok(transfer)
}

/// What to do with a downloaded file once its bytes are written and
/// verified (rename it into place, say); blocking.
pub type Complete = Box<dyn FnOnce() -> std::io::Result<()> + Send>;

/// Downloads what [`super::probe`] found into `file`, as [`download`]
/// does, then runs `complete` if given: a small object that came with the
/// probe is written, verified and completed in one blocking call.
pub async fn download_probed(
    storage: &Storage,
    url: &S3Url,
    probed: &Probed,
    file: File,
    progress: &mut (dyn FnMut(u64) + Send),
    complete: Option<Complete>,
) -> Result<Transfer, StorageError> {
    let completed = |e| StorageError::io(format!("the file staged from {url}"), e);
    let Some(body) = &probed.body else {
        let transfer = download(storage, url, &probed.info, file, progress).await?;
        if let Some(complete) = complete {
            tokio::task::spawn_blocking(complete)
                .await
                .map_err(|e| completed(std::io::Error::other(e)))?
                .map_err(completed)?;
        }
        return Ok(transfer);
    };
    let piece = Piece {
        range: 0,
        offset: 0,
        len: body.len(),
        chunks: vec![body.clone()],
    };
    let transfer = save(url, &probed.info, vec![piece], file, complete).await?;
    progress(transfer.size);
    Ok(transfer)
}

/// Writes the pieces of a whole small object into `file` in one blocking
/// call, verifies them, and then, if given, runs `complete` in that call.
async fn save(
    url: &S3Url,
    info: &ObjectInfo,
    gathered: Vec<Piece>,
    file: File,
    complete: Option<Complete>,
) -> Result<Transfer, StorageError> {
    let failed = |e| StorageError::io(format!("the file staged from {url}"), std::io::Error::other(e));
    let (url, info) = (url.clone(), info.clone());
    tokio::task::spawn_blocking(move || {
        let written = || {
            let mut sums = Sums::new(info.checksum);
            let mut md5 = expected_md5(&info).is_some().then(Md5::new);
            for piece in &gathered {
                super::ranged::write_all_at(&file, &piece.chunks, piece.offset)?;
                for chunk in &piece.chunks {
                    sums.update(chunk);
                    md5.iter_mut().for_each(|m| m.update(chunk));
                }
            }
            Ok::<_, std::io::Error>((sums.finish(), md5.map(|m| m.finalize().into())))
        };
        let staged = |e| StorageError::io(format!("the file staged from {url}"), e);
        let (sums, md5) = written().map_err(staged)?;
        let transfer = verify(&url, &info, sums, md5)?;
        complete.map_or(Ok(()), |complete| complete()).map_err(staged)?;
        Ok(transfer)
    })
    .await
    .map_err(failed)?
}

/// Checks what was received against what the store says of the object.
pub(crate) fn verify(
    url: &S3Url,
    info: &ObjectInfo,
    sums: Summed,
    md5: Option<[u8; 16]>,
) -> Result<Transfer, StorageError> {
    let mismatch = |detail: String| StorageError::Integrity {
        url: url.to_string(),
        detail,
    };
    let crc = sums.crc64;
    if crc.len() != info.size {
        return Err(mismatch(format!(
            "expected {} bytes, received {}",
            info.size,
            crc.len()
        )));
    }
    sums.check(info.checksum).map_err(mismatch)?;
    if let (Some(expected), Some(got)) = (expected_md5(info), md5)
        && expected != got
    {
        return Err(mismatch(format!(
            "MD5 checksum mismatch: the store's ETag says {}, the bytes received hash to {}",
            hex::encode(expected),
            hex::encode(got)
        )));
    }
    Ok(Transfer {
        size: crc.len(),
        crc64nvme: crc.value(),
    })
}

/// A run of bytes received back to back, starting at `offset` in the
/// object, within the range that starts at `range`.
#[derive(Debug)]
pub(crate) struct Piece {
    pub range: u64,
    pub offset: u64,
    pub len: usize,
    pub chunks: Vec<Bytes>,
}

impl Piece {
    fn at(range: u64, offset: u64) -> Self {
        Self {
            range,
            offset,
            len: 0,
            chunks: Vec::new(),
        }
    }
}

/// Where a range delivers its pieces.
pub(crate) trait PieceSink: Send {
    /// Takes a piece, waiting while the consumer is busy.
    fn put(&mut self, piece: Piece) -> impl Future<Output = Result<(), StorageError>> + Send;
}

impl PieceSink for Vec<Piece> {
    async fn put(&mut self, piece: Piece) -> Result<(), StorageError> {
        self.push(piece);
        Ok(())
    }
}

/// What every ranged GET of one object shares.
#[derive(Debug, Clone)]
pub(crate) struct FetchSpec {
    storage: Storage,
    url: S3Url,
    etag: Option<String>,
}

impl FetchSpec {
    pub fn new(storage: &Storage, url: &S3Url, info: &ObjectInfo) -> Self {
        Self {
            storage: storage.clone(),
            url: url.clone(),
            etag: info.etag.clone(),
        }
    }
}

/// Fetches bytes `[start, end)` into `sink`, resuming after transient
/// failures from the last byte delivered, under the store's retry policy:
/// every byte delivered starts its budget again, so a link that keeps
/// breaking still finishes while it moves, and a store that is away longer
/// than the budget fails the range.
pub(crate) async fn fetch_range(
    spec: &FetchSpec,
    start: u64,
    end: u64,
    sink: &mut impl PieceSink,
) -> Result<(), StorageError> {
    let mut pos = start;
    let mut retrier = Retrier::new(spec.storage.retry_policy());
    loop {
        let (reached, failure) = match fetch_from(spec, start, pos, end, sink).await {
            Ok(reached) if reached == end => return Ok(()),
            // Every byte came: a reply cut after its last one (a chunked
            // body without its end) lost nothing.
            Err((reached, e)) if reached == end && e.is_transient() => return Ok(()),
            Ok(reached) => (
                reached,
                StorageError::Unavailable {
                    url: spec.url.to_string(),
                    op: "GetObject",
                    detail: "the body ended early".into(),
                },
            ),
            Err((reached, e)) if e.is_transient() => (reached, e),
            Err((_, e)) => return Err(e),
        };
        if reached > pos {
            retrier.progressed();
        }
        pos = reached;
        match retrier.failed() {
            Next::Retry { wait, left } => {
                tracing::debug!(url = %spec.url, offset = pos, "download interrupted, resuming");
                spec.storage.retrying(&spec.url, &failure, left + wait);
                tokio::time::sleep(wait).await;
            }
            Next::GiveUp(spent) => return Err(failure.gave_up(spent, Some(pos))),
        }
    }
}

/// One GET of `[pos, end)` of the range starting at `range`; returns the
/// offset delivered up to, with the error if any. The reply must be the
/// range asked for (`206` with a matching `Content-Range`, or a `200` of
/// the whole object when that is what was asked) before a byte of it is
/// used.
async fn fetch_from(
    spec: &FetchSpec,
    range: u64,
    mut pos: u64,
    end: u64,
    sink: &mut impl PieceSink,
) -> Result<u64, (u64, StorageError)> {
    let url = &spec.url;
    let resp = spec
        .storage
        .get_object()
        .bucket(url.bucket())
        .key(url.key())
        .range(format!("bytes={pos}-{}", end - 1))
        .set_if_match(spec.etag.clone())
        .send()
        .await
        .map_err(|e| (pos, StorageError::from_sdk(url, "GetObject", e)))?;
    check_range(url, resp.content_range(), pos, end).map_err(|e| (pos, e))?;
    let mut body = resp.body;
    let mut piece = Piece::at(range, pos);
    loop {
        let (chunk, failed) = match body.try_next().await {
            Ok(chunk) => (chunk, None),
            Err(e) => (None, Some(e.to_string())),
        };
        let done = chunk.is_none();
        if let Some(chunk) = chunk {
            if pos + (piece.len + chunk.len()) as u64 > end {
                let detail = "the store sent more bytes than the range asked for".to_owned();
                let url = url.to_string();
                return Err((pos, StorageError::Integrity { url, detail }));
            }
            piece.len += chunk.len();
            piece.chunks.push(chunk);
        }
        // Deliver what arrived intact, including before a cut.
        if piece.len >= WRITE_BATCH || (done && piece.len > 0) {
            let next = pos + piece.len as u64;
            let full = std::mem::replace(&mut piece, Piece::at(range, next));
            sink.put(full).await.map_err(|e| (pos, e))?;
            pos = next;
        }
        if let Some(detail) = failed {
            let url = url.to_string();
            let op = "GetObject";
            return Err((pos, StorageError::Unavailable { url, op, detail }));
        }
        if done {
            return Ok(pos);
        }
    }
}

/// Checks that a reply to `Range: bytes=pos-(end-1)` is that range: its
/// `Content-Range` names exactly those bytes. A reply without one is only
/// the range when the range starts at 0 (a store that ignores ranges sends
/// the whole object, which the length check then bounds).
fn check_range(url: &S3Url, content_range: Option<&str>, pos: u64, end: u64) -> Result<(), StorageError> {
    let refuse = |detail: String| StorageError::Integrity {
        url: url.to_string(),
        detail,
    };
    let Some(header) = content_range else {
        return match pos {
            0 => Ok(()),
            _ => Err(refuse(format!(
                "asked for bytes {pos}-{}, the store answered without a Content-Range",
                end - 1
            ))),
        };
    };
    let span = header
        .strip_prefix("bytes ")
        .and_then(|rest| rest.split_once('/'))
        .and_then(|(span, _)| span.split_once('-'))
        .and_then(|(first, last)| Some((first.parse::<u64>().ok()?, last.parse::<u64>().ok()?)));
    match span {
        Some((first, last)) if first == pos && last < end => Ok(()),
        _ => Err(refuse(format!(
            "asked for bytes {pos}-{}, the store answered with Content-Range {header:?}",
            end - 1
        ))),
    }
}

/// The MD5 to check a download against: the entity tag of a single-part,
/// unencrypted (or SSE-S3) object.
pub(crate) fn expected_md5(info: &ObjectInfo) -> Option<[u8; 16]> {
    info.etag
        .as_deref()
        .filter(|_| info.etag_is_md5)
        .and_then(md5_of_etag)
}

/// The MD5 an entity tag stands for, if it is a plain (single-part) one.
pub(crate) fn md5_of_etag(etag: &str) -> Option<[u8; 16]> {
    let hex_digits = etag.trim_matches('"');
    let mut out = [0u8; 16];
    hex::decode_to_slice(hex_digits, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::{S3Url, check_range, md5_of_etag};

    #[test]
    fn a_ranged_reply_must_be_the_range_asked_for() {
        let url = S3Url::parse("s3://bucket/k").unwrap();
        assert!(check_range(&url, Some("bytes 100-199/1000"), 100, 200).is_ok());
        // A short range (the object's end) is fine; the length check follows.
        assert!(check_range(&url, Some("bytes 900-999/1000"), 900, 1200).is_ok());
        assert!(check_range(&url, None, 0, 200).is_ok());
        for wrong in [
            "bytes 0-99/1000",
            "bytes 100-299/1000",
            "bytes */1000",
            "items 100-199/1000",
        ] {
            assert!(check_range(&url, Some(wrong), 100, 200).is_err(), "{wrong}");
        }
        let err = check_range(&url, None, 100, 200).unwrap_err().to_string();
        assert!(err.contains("bytes 100-199"), "{err}");
    }

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
