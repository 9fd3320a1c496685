//! `PutFile` and `GetFile`: moving files through the gateway for clients
//! without S3 credentials, streamed in both directions with bounded memory.

use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::{Status, Streaming};

use super::{GatewayError, State};
use crate::{
    proto,
    storage::{
        self, S3Url, StorageError,
        upload::{Part, PartSource},
    },
};

/// Largest chunk sent by `GetFile`.
pub const GET_CHUNK: usize = 1 << 20;
/// Chunks queued for a slow `GetFile` reader.
const GET_QUEUE: usize = 4;

/// Receives a `PutFile` stream into `s3://<bucket>/uploads/<uuid>/<name>`.
pub async fn put_file(
    state: &State,
    mut stream: Streaming<proto::PutFileRequest>,
) -> Result<proto::FileRef, GatewayError> {
    let header = match stream.message().await {
        Ok(Some(proto::PutFileRequest {
            msg: Some(proto::put_file_request::Msg::Header(h)),
        })) => h,
        Ok(_) => {
            return Err(GatewayError::invalid(
                "header",
                "the first PutFile message must be the header",
            ));
        }
        Err(status) => {
            return Err(GatewayError::invalid(
                "header",
                format!("PutFile stream failed: {}", status.message()),
            ));
        }
    };
    if let Some(size) = header.size
        && size > state.limits.max_input_bytes
    {
        return Err(GatewayError::invalid(
            "header.size",
            format!(
                "PutFile header declares {size} bytes; this gateway takes files up to {} bytes",
                state.limits.max_input_bytes
            ),
        ));
    }
    let name = sanitize_name(&header.file_name);
    let key = format!("{UPLOADS}/{}/{name}", uuid::Uuid::new_v4());
    let dest = S3Url::new(&state.services.bucket, &key).map_err(|e| GatewayError::Internal(e.to_string()))?;
    let fault = Arc::new(Mutex::new(None));
    let source = ChunkSource {
        stream,
        pending: BytesMut::new(),
        received: 0,
        limit: Some(header.size.unwrap_or(state.limits.max_input_bytes)),
        fault: Arc::clone(&fault),
    };
    let uploaded =
        storage::upload::upload_from(&state.services.s3, source, header.size, &dest, &mut |_| {}).await;
    // A failure the client caused is reported as such, not as a storage error.
    let client_fault = fault.lock().unwrap_or_else(|p| p.into_inner()).take();
    let done = match (uploaded, client_fault) {
        (Err(_), Some(fault)) => return Err(fault),
        (result, _) => result?,
    };
    if let Some(expected) = header.size
        && expected != done.size
    {
        // The object was written, but it is not what the client meant.
        let _ = state
            .services
            .s3
            .delete_object()
            .bucket(dest.bucket())
            .key(dest.key())
            .send()
            .await;
        return Err(GatewayError::invalid(
            "header.size",
            format!(
                "PutFile header promised {expected} bytes but {} arrived",
                done.size
            ),
        ));
    }
    tracing::info!(url = %dest, size = done.size, "file stored");
    Ok(proto::FileRef {
        url: dest.to_string(),
        size: done.size,
        crc64nvme: done.checksum(),
    })
}

/// Keeps the last path component of a client's file name, with every
/// character outside `[A-Za-z0-9._-]` replaced by `_`.
pub fn sanitize_name(name: &str) -> String {
    let last = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let mut clean: String = last
        .chars()
        .take(128)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.trim_start_matches('.').is_empty() {
        clean = "file".into();
    } else if clean.starts_with('.') {
        clean.insert(0, '_');
    }
    clean
}

struct ChunkSource {
    stream: Streaming<proto::PutFileRequest>,
    pending: BytesMut,
    received: u64,
    limit: Option<u64>,
    /// What the client did wrong, if the stream failed because of it.
    fault: Arc<Mutex<Option<GatewayError>>>,
}

impl PartSource for ChunkSource {
    async fn next_part(&mut self, max: usize) -> Result<Option<Part>, StorageError> {
        let fault = &self.fault;
        let cut = |error: GatewayError| {
            let detail = error.to_string();
            *fault.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
            StorageError::Rejected {
                url: "PutFile".into(),
                op: "PutFile",
                detail,
            }
        };
        while self.pending.len() < max {
            match self.stream.next().await {
                Some(Ok(proto::PutFileRequest {
                    msg: Some(proto::put_file_request::Msg::Chunk(chunk)),
                })) => {
                    self.received += chunk.len() as u64;
                    if self.limit.is_some_and(|l| self.received > l) {
                        return Err(cut(GatewayError::invalid(
                            "chunk",
                            "more bytes arrived than the PutFile header declared",
                        )));
                    }
                    self.pending.extend_from_slice(&chunk);
                }
                Some(Ok(_)) => {
                    return Err(cut(GatewayError::invalid(
                        "header",
                        "only data chunks may follow the PutFile header",
                    )));
                }
                Some(Err(status)) => {
                    tracing::info!(
                        message = status.message(),
                        "PutFile client stream broke; upload aborted"
                    );
                    return Err(cut(GatewayError::Cancelled));
                }
                None => break,
            }
        }
        if self.pending.is_empty() {
            return Ok(None);
        }
        let n = max.min(self.pending.len());
        Ok(Some(Part::memory(self.pending.split_to(n).freeze())))
    }
}

/// Where the gateway writes in its own bucket: runs' outputs and `PutFile`
/// uploads. `GetFile` reads these whatever `PREFAB_ALLOWED_BUCKETS` says;
/// other objects only where runs may read (by default the whole bucket).
const WRITTEN_HERE: [&str; 2] = [crate::workspace::OUTPUTS, UPLOADS];
/// Where `PutFile` uploads go.
const UPLOADS: &str = "uploads";

/// Streams an object (or a range of it) as chunks of at most [`GET_CHUNK`].
pub async fn get_file(
    state: &State,
    req: proto::GetFileRequest,
) -> Result<mpsc::Receiver<Result<proto::FileChunk, Status>>, GatewayError> {
    let url =
        S3Url::parse(&req.url).map_err(|e| GatewayError::invalid("url", format!("{:?}: {e}", req.url)))?;
    let written_here = url.bucket() == state.services.bucket
        && WRITTEN_HERE.iter().any(|dir| {
            url.key()
                .strip_prefix(dir)
                .is_some_and(|rest| rest.starts_with('/'))
        });
    if !written_here && !state.limits.buckets.allows(&url) {
        return Err(GatewayError::PermissionDenied(format!(
            "{url}: the bucket or prefix is not in PREFAB_ALLOWED_BUCKETS"
        )));
    }
    let info = storage::head(&state.services.s3, &url).await?;
    if req.offset > info.size || (req.offset == info.size && info.size > 0) {
        return Err(GatewayError::invalid(
            "offset",
            format!(
                "offset {} is past the end of {url} ({} bytes)",
                req.offset, info.size
            ),
        ));
    }
    let end = match req.length {
        0 => info.size,
        n => info.size.min(req.offset.saturating_add(n)),
    };
    let (tx, rx) = mpsc::channel(GET_QUEUE);
    if end == req.offset {
        return Ok(rx);
    }
    let s3 = &state.services.s3;
    let (url_ref, etag) = (&url, &info.etag);
    let resp = s3
        .send(url_ref, |_| async move {
            s3.get_object()
                .bucket(url_ref.bucket())
                .key(url_ref.key())
                .range(format!("bytes={}-{}", req.offset, end - 1))
                .set_if_match(etag.clone())
                .send()
                .await
                .map_err(|e| StorageError::from_sdk(url_ref, "GetObject", e))
        })
        .await?;
    // A store that ignores the range sends more than asked; one that sends
    // no length (chunked) is held to the range as the bytes come.
    let want = end - req.offset;
    if resp
        .content_length()
        .is_some_and(|n| u64::try_from(n).ok() != Some(want))
    {
        return Err(StorageError::Rejected {
            url: url.to_string(),
            op: "GetObject",
            detail: format!(
                "asked for {want} bytes at offset {}, the store answered with {:?}",
                req.offset,
                resp.content_length()
            ),
        }
        .into());
    }
    tokio::spawn(relay(resp.body, tx, url, req.offset..end, info.size));
    Ok(rx)
}

/// Sends the bytes of `range` as they come, in chunks of [`GET_CHUNK`].
async fn relay(
    mut body: aws_sdk_s3::primitives::ByteStream,
    tx: mpsc::Sender<Result<proto::FileChunk, Status>>,
    url: S3Url,
    range: std::ops::Range<u64>,
    object_size: u64,
) {
    let mut offset = range.start;
    let mut batch = BytesMut::with_capacity(GET_CHUNK);
    loop {
        let next = tokio::select! {
            next = body.try_next() => next,
            () = tx.closed() => return,
        };
        let received = offset + batch.len() as u64;
        let done = match next {
            Ok(Some(chunk)) if received + chunk.len() as u64 > range.end => {
                let detail = "the store sent more bytes than the range has".to_owned();
                return fail(
                    &tx,
                    StorageError::Integrity {
                        url: url.to_string(),
                        detail,
                    },
                )
                .await;
            }
            Ok(Some(chunk)) => {
                batch.extend_from_slice(&chunk);
                false
            }
            Ok(None) if received < range.end => {
                let detail = format!("the reply ended at byte {received} of {}", range.end);
                let err = StorageError::Unavailable {
                    url: url.to_string(),
                    op: "GetObject",
                    detail,
                };
                return fail(&tx, err).await;
            }
            Ok(None) => true,
            // Every byte came: a reply cut after its last one lost nothing.
            Err(_) if received == range.end => true,
            Err(e) => {
                let detail = e.to_string();
                let err = StorageError::Unavailable {
                    url: url.to_string(),
                    op: "GetObject",
                    detail,
                };
                return fail(&tx, err).await;
            }
        };
        while batch.len() >= GET_CHUNK || (done && !batch.is_empty()) {
            let data = batch.split_to(GET_CHUNK.min(batch.len())).freeze();
            let len = data.len() as u64;
            let chunk = proto::FileChunk {
                offset,
                data,
                object_size,
            };
            if tx.send(Ok(chunk)).await.is_err() {
                return;
            }
            offset += len;
        }
        if done {
            return;
        }
    }
}

async fn fail(tx: &mpsc::Sender<Result<proto::FileChunk, Status>>, err: StorageError) {
    let _ = tx.send(Err(GatewayError::from(err).into())).await;
}

#[cfg(test)]
mod tests {
    use super::sanitize_name;

    #[test]
    fn names_are_reduced_to_a_safe_last_component() {
        assert_eq!(sanitize_name("../../etc/passwd"), "passwd");
        assert_eq!(sanitize_name("C:\\x\\movie file.mp4"), "movie_file.mp4");
        assert_eq!(sanitize_name(".."), "file");
        assert_eq!(sanitize_name(".bashrc"), "_.bashrc");
        assert_eq!(sanitize_name(""), "file");
    }
}
