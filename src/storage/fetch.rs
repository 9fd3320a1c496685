//! Fetching one byte range of an object, resuming where a broken reply
//! stopped (pinned to the same version by `If-Match`) and checking that
//! each reply is the range asked for before a byte of it is kept; the
//! pieces go to a [`PieceSink`]. Used by the small-object path in
//! [`super::download`] and by the ranged engine in [`super::ranged`].

use bytes::Bytes;

use super::{
    ObjectInfo, S3Url, Storage, StorageError,
    retry::{Next, Retrier},
};

/// Bytes a range gathers before handing them to the writer (see
/// `PIECE_QUEUE` in [`super::ranged`]).
pub const WRITE_BATCH: usize = 256 << 10;

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

#[cfg(test)]
mod tests {
    use super::{S3Url, check_range};

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
}
