//! Uploading a local file: one PUT for small files, a multipart upload with
//! several parts in flight for large ones. The multipart upload is owned by a
//! guard that aborts it on every exit but completion, once the parts still
//! in flight have ended (a store may store a part after the abort if its
//! request was under way), so a failure or a cancelled run never leaves an
//! open upload or a stray part behind.
//!
//! Memory: parts of a local file are never held whole. Each is read once
//! to checksum it, then read again 256 KiB at a time as it goes to the
//! socket (see `upload_file`). An upload holds a few small buffers per part
//! in flight (at most 4 MiB kept for reuse) whatever the part size.
//!
//! Integrity: every PUT and part carries its CRC-64/NVME, and a multipart
//! upload is created as a full-object CRC-64/NVME one whose completion
//! carries the whole file's checksum, so the store checks each byte it
//! keeps; a store that refuses those headers gets `Content-MD5` instead
//! (see [`super::compat`]). The payload itself is not hashed again for the
//! signature (`UNSIGNED-PAYLOAD`): the checksums cover it at a fraction of
//! the cost.
//!
//! Retries: every request retries under the store's retry policy (see
//! [`super::retry`]); a failed part is sent again on its own, and an abort
//! the store cannot take now (it is away) is retried in the background
//! until it confirms it, so no upload stays open once the store is back.

use std::{fs::File, sync::Arc};

use aws_sdk_s3::{
    primitives::ByteStream,
    types::{ChecksumAlgorithm, ChecksumType, CompletedMultipartUpload, CompletedPart},
};
use aws_smithy_types::body::SdkBody;
use bytes::Bytes;
use tokio::task::JoinSet;

use super::{
    Crc64, S3Url, Storage, StorageError, Transfer,
    checksum::to_base64,
    compat::Integrity,
    retry::{self, RetryPolicy},
    upload_file::{FileRange, UploadFile},
};

/// Files up to this size go up in a single PUT.
pub const MULTIPART_THRESHOLD: u64 = 16 << 20;
/// Smallest multipart part.
const MIN_PART: u64 = 8 << 20;
/// S3's limit on parts per upload.
const MAX_PARTS: u64 = 10_000;
/// Parts uploading at once per file.
const PARTS_IN_FLIGHT: usize = 4;

/// Largest multipart part: bounds the memory of parts held in memory
/// (`PutFile` streams) whatever size a caller declares.
const MAX_PART: u64 = 512 << 20;

/// The part size for a file of `size` bytes: max(8 MiB, size / 10 000),
/// at most 512 MiB (S3's 5 TiB object limit needs parts of ~525 MiB).
pub fn part_size(size: u64) -> u64 {
    MIN_PART.max(size.div_ceil(MAX_PARTS)).min(MAX_PART)
}

/// A sequence of upload parts: a local file or a stream of chunks.
pub trait PartSource: Send {
    /// The next part of at most `max` bytes (exactly `max` unless it is the
    /// last); `None` at the end.
    fn next_part(&mut self, max: usize) -> impl Future<Output = Result<Option<Part>, StorageError>> + Send;
}

/// One part of an upload: bytes in memory, or a range of a local file that
/// is streamed to the socket through a small buffer when sent.
#[derive(Debug, Clone, Default)]
pub struct Part(PartData);

#[derive(Debug, Clone)]
enum PartData {
    Memory(Bytes),
    File {
        file: Arc<UploadFile>,
        offset: u64,
        crc: Crc64,
    },
}

impl Default for PartData {
    fn default() -> Self {
        Self::Memory(Bytes::new())
    }
}

impl Part {
    /// A part held in memory.
    pub fn memory(bytes: Bytes) -> Self {
        Self(PartData::Memory(bytes))
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        match &self.0 {
            PartData::Memory(bytes) => bytes.len() as u64,
            PartData::File { crc, .. } => crc.len(),
        }
    }

    /// Whether the part has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The part's CRC-64/NVME, computed off the async threads if it is big.
    async fn checksum(&self) -> std::io::Result<Crc64> {
        match &self.0 {
            PartData::File { crc, .. } => Ok(*crc),
            PartData::Memory(bytes) if bytes.len() <= INLINE_CHECKSUM => Ok(Crc64::of(bytes)),
            PartData::Memory(bytes) => {
                let bytes = bytes.clone();
                tokio::task::spawn_blocking(move || Crc64::of(&bytes))
                    .await
                    .map_err(std::io::Error::other)
            }
        }
    }

    /// The part's MD5, for `Content-MD5`: read again from its file (or
    /// hashed in memory) off the async threads.
    async fn md5(&self) -> std::io::Result<[u8; 16]> {
        use md5::Digest as _;
        match &self.0 {
            PartData::Memory(bytes) => {
                let bytes = bytes.clone();
                tokio::task::spawn_blocking(move || md5::Md5::digest(&bytes).into())
                    .await
                    .map_err(std::io::Error::other)
            }
            PartData::File { file, offset, crc } => {
                let (file, offset, len) = (Arc::clone(file), *offset, crc.len());
                tokio::task::spawn_blocking(move || file.md5(offset, len))
                    .await
                    .map_err(std::io::Error::other)?
            }
        }
    }

    /// The MD5 to send as `Content-MD5` with this part: only when the
    /// store gets no checksum headers and MD5 is what it checks instead.
    async fn content_md5(
        &self,
        storage: &Storage,
        headers: bool,
        url: &S3Url,
    ) -> Result<Option<[u8; 16]>, StorageError> {
        if headers || storage.compat().integrity() != Integrity::Md5 {
            return Ok(None);
        }
        self.md5().await.map(Some).map_err(|e| StorageError::io(url, e))
    }

    /// A request body for the part; the SDK can rebuild it to retry.
    fn body(&self) -> ByteStream {
        match &self.0 {
            PartData::Memory(bytes) => ByteStream::from(bytes.clone()),
            PartData::File { file, offset, crc } => {
                let (file, offset, len) = (Arc::clone(file), *offset, crc.len());
                ByteStream::new(SdkBody::retryable(move || {
                    SdkBody::from_body_1_x(FileRange::new(Arc::clone(&file), offset, len))
                }))
            }
        }
    }
}

/// Bodies up to this size are checksummed on the calling thread.
const INLINE_CHECKSUM: usize = 256 << 10;

/// Parts of a local file, checksummed on a blocking thread when taken and
/// sent from the file, read again chunk by chunk.
#[derive(Debug)]
pub struct FileSource {
    file: Arc<UploadFile>,
    offset: u64,
    size: u64,
}

impl FileSource {
    /// Reads the first `size` bytes of `file`.
    pub fn new(file: File, size: u64) -> Self {
        Self {
            file: UploadFile::new(file),
            offset: 0,
            size,
        }
    }
}

impl PartSource for FileSource {
    async fn next_part(&mut self, max: usize) -> Result<Option<Part>, StorageError> {
        let len = (max as u64).min(self.size - self.offset);
        if len == 0 {
            return Ok(None);
        }
        let (file, offset) = (Arc::clone(&self.file), self.offset);
        let crc = tokio::task::spawn_blocking(move || file.checksum(offset, len))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r)
            .map_err(|e| StorageError::io("the file being uploaded", e))?;
        self.offset += len;
        let file = Arc::clone(&self.file);
        Ok(Some(Part(PartData::File { file, offset, crc })))
    }
}

/// Uploads `size` bytes of `file` to `dest`, reporting the cumulative byte
/// count to `progress` as parts complete.
pub async fn upload(
    storage: &Storage,
    file: File,
    size: u64,
    dest: &S3Url,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<Transfer, StorageError> {
    let done = upload_from(storage, FileSource::new(file, size), Some(size), dest, progress).await?;
    if done.size != size {
        return Err(StorageError::Integrity {
            url: dest.to_string(),
            detail: format!("expected to upload {size} bytes, read {}", done.size),
        });
    }
    Ok(done)
}

/// Uploads everything `source` yields to `dest`: one PUT if it fits in a
/// single part, else a multipart upload that is aborted unless it
/// completes. `size_hint` picks the part size.
pub async fn upload_from(
    storage: &Storage,
    mut source: impl PartSource,
    size_hint: Option<u64>,
    dest: &S3Url,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<Transfer, StorageError> {
    let part = match size_hint {
        Some(size) if size <= MULTIPART_THRESHOLD => MULTIPART_THRESHOLD,
        Some(size) => part_size(size),
        None => 2 * MIN_PART,
    } as usize;
    let first = source.next_part(part).await?.unwrap_or_default();
    let second = if first.len() == part as u64 {
        source.next_part(part).await?
    } else {
        None
    };
    let Some(second) = second else {
        let crc = first.checksum().await.map_err(|e| StorageError::io(dest, e))?;
        let first = &first;
        storage
            .send(dest, |headers| async move {
                let md5 = first.content_md5(storage, headers, dest).await?;
                let request = storage
                    .put_object()
                    .bucket(dest.bucket())
                    .key(dest.key())
                    .content_length(crc.len() as i64)
                    .set_checksum_crc64_nvme(headers.then(|| to_base64(crc.value())))
                    .set_content_md5(md5.map(aws_smithy_types::base64::encode))
                    .body(first.body())
                    .customize()
                    .disable_payload_signing();
                let out = request
                    .send()
                    .await
                    .map_err(|e| StorageError::from_sdk(dest, "PutObject", e))?;
                let md5 = md5.filter(|_| {
                    super::etag_is_md5(out.server_side_encryption(), out.sse_customer_algorithm())
                });
                received_intact(dest, "the object", md5, out.e_tag())
            })
            .await?;
        progress(crc.len());
        return Ok(Transfer {
            size: crc.len(),
            crc64nvme: crc.value(),
        });
    };
    let mut upload = Multipart::create(storage, dest).await?;
    match upload_parts(&mut upload, [first, second], source, part, progress).await {
        Ok((parts, crc)) => {
            upload.complete(parts, crc).await?;
            Ok(Transfer {
                size: crc.len(),
                crc64nvme: crc.value(),
            })
        }
        Err(e) => {
            upload.abort().await;
            Err(e)
        }
    }
}

async fn upload_parts(
    upload: &mut Multipart,
    read_ahead: [Part; 2],
    mut source: impl PartSource,
    part: usize,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<(Vec<CompletedPart>, Crc64), StorageError> {
    let mut done = Vec::new();
    let mut sent = 0u64;
    let mut number = 1i32;
    for body in read_ahead {
        upload.start_part(number, body);
        number += 1;
    }
    let mut exhausted = false;
    while !exhausted || !upload.in_flight.is_empty() {
        if !exhausted && upload.in_flight.len() < PARTS_IN_FLIGHT {
            match source.next_part(part).await? {
                Some(body) => {
                    if number > MAX_PARTS as i32 {
                        return Err(StorageError::Rejected {
                            url: upload.url.to_string(),
                            op: "UploadPart",
                            detail: format!("more than {MAX_PARTS} parts; the object is too large"),
                        });
                    }
                    upload.start_part(number, body);
                    number += 1;
                }
                None => exhausted = true,
            }
            continue;
        }
        let finished = upload
            .in_flight
            .join_next()
            .await
            .expect("loop runs only while parts are in flight or unread");
        let (completed, crc) =
            finished.map_err(|e| StorageError::io(&upload.url, std::io::Error::other(e)))??;
        sent += crc.len();
        done.push((completed, crc));
        progress(sent);
    }
    done.sort_by_key(|(p, _)| p.part_number);
    let whole = done
        .iter()
        .fold(Crc64::default(), |whole, &(_, crc)| whole.then(crc));
    Ok((done.into_iter().map(|(p, _)| p).collect(), whole))
}

/// An open multipart upload. Dropping it without [`Multipart::complete`]
/// aborts it in the background; [`Multipart::abort`] does so and waits.
struct Multipart {
    storage: Storage,
    url: S3Url,
    upload_id: String,
    /// Whether it was created with checksum headers, which its parts and
    /// completion then carry too.
    checked: bool,
    open: bool,
    /// Parts being uploaded. An abort waits for them (a while at most): a
    /// store may still store a part whose request was dropped once it had
    /// the whole body, after the abort, leaving it behind (S3 documents
    /// this; the embedded store did it).
    in_flight: PartTasks,
    /// Keeps shutdown waiting until a dropped upload has started its abort.
    _pending: tokio_util::task::task_tracker::TaskTrackerToken,
}

impl Multipart {
    /// Starts a multipart upload. The request runs in a task of its own:
    /// if the caller gives up while the store is creating the upload, the
    /// task still learns its id and the dropped result aborts it.
    async fn create(storage: &Storage, url: &S3Url) -> Result<Self, StorageError> {
        let task = storage
            .aborts()
            .spawn(Self::request(storage.clone(), url.clone()));
        task.await.map_err(|e| StorageError::Unavailable {
            url: url.to_string(),
            op: "CreateMultipartUpload",
            detail: format!("the request was cut short: {e}"),
        })?
    }

    async fn request(storage: Storage, url: S3Url) -> Result<Self, StorageError> {
        let (out, checked) = storage
            .send(&url, |headers| {
                let request = storage
                    .create_multipart_upload()
                    .bucket(url.bucket())
                    .key(url.key())
                    .set_checksum_algorithm(headers.then_some(ChecksumAlgorithm::Crc64Nvme))
                    .set_checksum_type(headers.then_some(ChecksumType::FullObject));
                let url = &url;
                async move {
                    let out = request
                        .send()
                        .await
                        .map_err(|e| StorageError::from_sdk(url, "CreateMultipartUpload", e))?;
                    Ok((out, headers))
                }
            })
            .await?;
        let upload_id = out.upload_id.ok_or_else(|| StorageError::Rejected {
            url: url.to_string(),
            op: "CreateMultipartUpload",
            detail: "the store returned no upload id".into(),
        })?;
        Ok(Self {
            _pending: storage.aborts().token(),
            storage,
            url,
            upload_id,
            checked,
            open: true,
            in_flight: JoinSet::new(),
        })
    }

    /// Starts uploading one part among those in flight, retrying transient
    /// failures.
    fn start_part(&mut self, number: i32, part: Part) {
        let (storage, url, upload_id) = (self.storage.clone(), self.url.clone(), self.upload_id.clone());
        let checked = self.checked;
        self.in_flight.spawn(async move {
            let crc = part.checksum().await.map_err(|e| StorageError::io(&url, e))?;
            let encoded = checked.then(|| to_base64(crc.value()));
            let md5 = part.content_md5(&storage, checked, &url).await?;
            let content_md5 = md5.map(aws_smithy_types::base64::encode);
            let attempt = || async {
                let request = storage
                    .upload_part()
                    .bucket(url.bucket())
                    .key(url.key())
                    .upload_id(&upload_id)
                    .part_number(number)
                    .content_length(crc.len() as i64)
                    .set_checksum_crc64_nvme(encoded.clone())
                    .set_content_md5(content_md5.clone())
                    .body(part.body())
                    .customize()
                    .disable_payload_signing();
                request
                    .send()
                    .await
                    .map_err(|e| StorageError::from_sdk(&url, "UploadPart", e))
            };
            let warn = |e: &StorageError, left| storage.retrying(&url, e, left);
            let out = retry::retry(storage.retry_policy(), attempt, warn).await?;
            // Tags of parts encrypted with KMS or a customer key are no MD5s.
            let md5 = md5
                .filter(|_| super::etag_is_md5(out.server_side_encryption(), out.sse_customer_algorithm()));
            received_intact(&url, &format!("part {number}"), md5, out.e_tag())?;
            let part = CompletedPart::builder()
                .part_number(number)
                .set_e_tag(out.e_tag)
                .set_checksum_crc64_nvme(encoded)
                .build();
            Ok((part, crc))
        });
    }

    /// Completes the upload of parts whose bytes have checksum `whole`.
    async fn complete(mut self, parts: Vec<CompletedPart>, whole: Crc64) -> Result<(), StorageError> {
        let etag = multipart_etag(&parts);
        let checked = self.checked;
        let completed = CompletedMultipartUpload::builder().set_parts(Some(parts)).build();
        let attempt = || {
            let request = self
                .storage
                .complete_multipart_upload()
                .bucket(self.url.bucket())
                .key(self.url.key())
                .upload_id(&self.upload_id)
                .set_checksum_crc64_nvme(checked.then(|| to_base64(whole.value())))
                .set_checksum_type(checked.then_some(ChecksumType::FullObject))
                .multipart_upload(completed.clone());
            async {
                request
                    .send()
                    .await
                    .map_err(|e| StorageError::from_sdk(&self.url, "CompleteMultipartUpload", e))
            }
        };
        let warn = |e: &StorageError, left| self.storage.retrying(&self.url, e, left);
        let done = retry::retry(self.storage.retry_policy(), attempt, warn).await;
        match done {
            Ok(_) => {
                self.open = false;
                Ok(())
            }
            Err(err) => {
                // The reply to a completion that went through can be lost;
                // its retry then finds no upload (some stores say "access
                // denied" to an upload id they do not know), but the object
                // is there.
                let no_upload = matches!(
                    err,
                    StorageError::NotFound { .. } | StorageError::AccessDenied { .. }
                );
                if no_upload && self.completed_anyway(whole, etag.as_deref()).await {
                    tracing::info!(url = %self.url, "completion's reply was lost; the object is complete");
                    self.open = false;
                    return Ok(());
                }
                self.abort().await;
                Err(err)
            }
        }
    }

    /// Whether the object is already the one this upload makes: its size,
    /// and its CRC-64/NVME if the store reports one, else the entity tag
    /// made of this upload's parts' tags.
    async fn completed_anyway(&self, whole: Crc64, etag: Option<&str>) -> bool {
        let Ok(info) = super::head(&self.storage, &self.url).await else {
            return false;
        };
        let same = match info.checksum {
            Some(c) if c.algorithm == super::StoreAlgorithm::Crc64Nvme => c.value == whole.value(),
            _ => etag.is_some() && info.etag.as_deref() == etag,
        };
        info.size == whole.len() && same
    }

    /// Aborts the upload and waits for the abort to end, for
    /// [`ABORT_WAIT`] at most: a store that is away gets it later, from
    /// the background, and the failure it caused is not held up for it.
    async fn abort(&mut self) {
        if let Some(task) = self.start_abort() {
            let _ = tokio::time::timeout(ABORT_WAIT, task).await;
        }
    }

    /// Starts aborting the upload, unless it is over. The abort runs in a
    /// task of its own: a caller dropped while it waits for the parts in
    /// flight does not cut it short.
    fn start_abort(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        if !std::mem::replace(&mut self.open, false) {
            return None;
        }
        let in_flight = std::mem::take(&mut self.in_flight);
        let (storage, url, upload_id) = (self.storage.clone(), self.url.clone(), self.upload_id.clone());
        let aborts = storage.aborts().clone();
        Some(aborts.spawn(abort_upload(storage, url, upload_id, in_flight)))
    }
}

impl Drop for Multipart {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        if tokio::runtime::Handle::try_current().is_ok() {
            self.start_abort();
        } else {
            tracing::error!(url = %self.url, "multipart upload dropped outside a runtime; it stays open until the bucket's lifecycle rule removes it")
        }
    }
}

/// Checks that what the store received is what was sent, where its reply
/// can tell: a store that gets `Content-MD5` checks it itself when it can,
/// and answers with an entity tag that is the MD5 of what it stored (for
/// parts and single PUTs), which catches one that does not.
fn received_intact(
    url: &S3Url,
    what: &str,
    md5: Option<[u8; 16]>,
    etag: Option<&str>,
) -> Result<(), StorageError> {
    let (Some(sent), Some(stored)) = (md5, etag.and_then(super::verify::md5_of_etag)) else {
        return Ok(());
    };
    if sent == stored {
        return Ok(());
    }
    Err(StorageError::Integrity {
        url: url.to_string(),
        detail: format!(
            "{what} reached the store damaged: sent with MD5 {}, stored with MD5 {}",
            hex::encode(sent),
            hex::encode(stored)
        ),
    })
}

/// The entity tag most stores give an object made of `parts`: the MD5 of
/// their MD5s, and their count (`None` if a part's tag is no MD5).
fn multipart_etag(parts: &[CompletedPart]) -> Option<String> {
    use md5::Digest as _;
    let mut md5 = md5::Md5::new();
    for part in parts {
        let tag = part.e_tag()?.trim_matches('"');
        md5.update(hex::decode(tag).ok().filter(|d| d.len() == 16)?);
    }
    Some(format!("\"{}-{}\"", hex::encode(md5.finalize()), parts.len()))
}

/// Part uploads in flight, each ending with the part and its checksum.
type PartTasks = JoinSet<Result<(CompletedPart, Crc64), StorageError>>;

/// How long an abort waits for the parts still being uploaded before it
/// cuts them short.
const PARTS_SETTLE: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a failed upload waits for its abort before it reports the
/// failure (the abort goes on in the background).
const ABORT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long an abort keeps trying while the store is away.
const ABORT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Aborts a multipart upload once the parts `in_flight` have ended. While
/// the store is away the abort is tried again, backing off, until the
/// store confirms it (or says the upload is gone) or an hour has passed.
async fn abort_upload(storage: Storage, url: S3Url, upload_id: String, mut in_flight: PartTasks) {
    let settled = tokio::time::timeout(PARTS_SETTLE, async {
        while in_flight.join_next().await.is_some() {}
    });
    if settled.await.is_err() {
        in_flight.shutdown().await;
    }
    let attempt = || async {
        let aborted = storage
            .abort_multipart_upload()
            .bucket(url.bucket())
            .key(url.key())
            .upload_id(&upload_id)
            .send()
            .await;
        match aborted.map_err(|e| StorageError::from_sdk(&url, "AbortMultipartUpload", e)) {
            // Aborted before, by an attempt whose reply was lost.
            Ok(_) | Err(StorageError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    };
    let patient = RetryPolicy {
        budget: ABORT_PATIENCE,
        max_wait: std::time::Duration::from_secs(30),
        ..storage.retry_policy()
    };
    let warn = |e: &StorageError, _| tracing::warn!(%url, error = %e, "could not abort the multipart upload yet; retrying");
    match retry::retry(patient, attempt, warn).await {
        Ok(()) => tracing::debug!(%url, "multipart upload aborted"),
        Err(e) => tracing::error!(%url, error = %e, "could not abort multipart upload"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multipart_tag_is_the_md5_of_the_parts_md5s() {
        let part = |n, tag: &str| CompletedPart::builder().part_number(n).e_tag(tag).build();
        let parts = [
            part(1, "\"0cc175b9c0f1b6a831c399e269772661\""), // MD5 of "a"
            part(2, "92eb5ffee6ae2fec3ad71c777531578f"),     // of "b", unquoted
        ];
        assert_eq!(
            multipart_etag(&parts).as_deref(),
            Some("\"96e024ba2074fe77e8e965ba43a704be-2\"")
        );
        assert_eq!(multipart_etag(&[part(1, "\"not-an-md5\"")]), None);
        assert_eq!(
            multipart_etag(&[CompletedPart::builder().part_number(1).build()]),
            None
        );
    }
}
