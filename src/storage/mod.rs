//! Object storage: the store as a value ([`Storage`]: the S3 client, the
//! one [`retry`] policy, what the store accepts in [`compat`]), `s3://`
//! URLs, and the transfer engine that streams objects to and from local
//! files with bounded memory, retries and checksums.

pub mod checksum;
mod client;
pub mod compat;
pub mod download;
mod error;
mod fetch;
pub mod ranged;
pub mod retry;
pub mod upload;
mod upload_file;
mod url;
mod verify;

pub use checksum::{Crc64, StoreAlgorithm, StoreChecksum};
pub use client::{ClientError, Settings, connect};
pub use compat::{ChecksumMode, Compat};
pub use download::{Complete, Progress, download, download_probed};
pub use error::{StorageError, error_chain};
pub use retry::RetryPolicy;
pub use upload::upload;
pub use upload_file::crc64_of_range;
pub use url::{S3Url, UrlError};

use std::{sync::Arc, time::Duration};

use bytes::Bytes;

/// A store as the transfer engine uses it: the SDK client, the one retry
/// policy, and what the store was found to accept. Cheap to clone; it
/// dereferences to the SDK client for the operations the engine does not
/// wrap.
#[derive(Clone)]
pub struct Storage {
    client: aws_sdk_s3::Client,
    retry: RetryPolicy,
    compat: Arc<Compat>,
    endpoint: String,
    notices: Option<Observer>,
    shared: Arc<Shared>,
}

/// What the transfers of one store (a [`Storage`] and its clones) share.
#[derive(Debug)]
struct Shared {
    /// Probes in flight: their replies are read into memory.
    probes: tokio::sync::Semaphore,
    /// Ranges in flight across every download: each holds its pieces.
    ranges: tokio::sync::Semaphore,
    /// Requests that outlive the upload that made them (the creation of a
    /// multipart upload, the abort of a dropped one), so that shutdown can
    /// wait for them.
    aborts: tokio_util::task::TaskTracker,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            probes: tokio::sync::Semaphore::new(PROBES_IN_FLIGHT),
            ranges: tokio::sync::Semaphore::new(ranged::RANGES_IN_FLIGHT),
            aborts: tokio_util::task::TaskTracker::new(),
        }
    }
}

/// Who hears of a store's retries.
type Observer = Arc<dyn Fn(&RetryNotice) + Send + Sync>;

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("endpoint", &self.endpoint)
            .field("retry", &self.retry)
            .field("compat", &self.compat)
            .finish_non_exhaustive()
    }
}

/// What a transfer tells its observer when the store fails and it retries.
#[derive(Debug, Clone)]
pub struct RetryNotice {
    /// The failure.
    pub error: String,
    /// How long it keeps retrying without progress.
    pub gives_up_in: Duration,
}

impl Storage {
    /// The store at `endpoint` reached through `client` (built as
    /// [`connect`] builds it: without the SDK's own retries), retrying
    /// under `retry`, proving uploads with `checksum`.
    pub fn from_client(
        client: aws_sdk_s3::Client,
        endpoint: &str,
        retry: RetryPolicy,
        checksum: ChecksumMode,
    ) -> Self {
        Self {
            client,
            retry,
            compat: Arc::new(Compat::new(checksum)),
            endpoint: endpoint.to_owned(),
            notices: None,
            shared: Arc::default(),
        }
    }

    /// Ranges in flight across every download from this store.
    pub(crate) fn range_permits(&self) -> &tokio::sync::Semaphore {
        &self.shared.ranges
    }

    /// The requests that outlive their uploads.
    pub(crate) fn aborts(&self) -> &tokio_util::task::TaskTracker {
        &self.shared.aborts
    }

    /// Waits up to `limit` for the aborts of dropped multipart uploads (at
    /// shutdown).
    pub async fn wait_for_aborts(&self, limit: Duration) {
        let aborts = &self.shared.aborts;
        aborts.close();
        let _ = tokio::time::timeout(limit, aborts.wait()).await;
        aborts.reopen();
    }

    /// The same store, telling `observer` of each retry of the transfers
    /// made through it (so that a caller can tell a store that is away
    /// from a hang).
    pub fn observed(&self, observer: impl Fn(&RetryNotice) + Send + Sync + 'static) -> Self {
        Self {
            notices: Some(Arc::new(observer)),
            ..self.clone()
        }
    }

    /// Logs a retry of a request on `url` and tells the observer.
    pub(crate) fn retrying(&self, url: &S3Url, error: &StorageError, gives_up_in: Duration) {
        tracing::warn!(%url, %error, left_s = gives_up_in.as_secs(), "store request failed, retrying");
        if let Some(notices) = &self.notices {
            notices(&RetryNotice {
                error: error.to_string(),
                gives_up_in,
            });
        }
    }

    /// The SDK client.
    pub fn client(&self) -> &aws_sdk_s3::Client {
        &self.client
    }

    /// The retry policy of every request.
    pub fn retry_policy(&self) -> RetryPolicy {
        self.retry
    }

    /// What the store accepts.
    pub fn compat(&self) -> &Compat {
        &self.compat
    }

    /// Sends a request built by `send(with_checksum_headers)`, retrying
    /// transient failures under the retry policy; a store that refuses the
    /// checksum headers gets it once more without them (see [`compat`]).
    pub(crate) async fn send<T, F, Fut>(&self, url: &S3Url, send: F) -> Result<T, StorageError>
    where
        F: Fn(bool) -> Fut,
        Fut: Future<Output = Result<T, StorageError>>,
    {
        let attempt = || async {
            let headers = self.compat.checksum_headers();
            match send(headers).await {
                Err(StorageError::Unsupported { detail, .. })
                    if headers && self.compat.fall_back(&self.endpoint, &detail) =>
                {
                    // Refused again without the headers: it was not them.
                    match send(false).await {
                        Err(StorageError::Unsupported { url, op, detail }) => {
                            Err(StorageError::Rejected { url, op, detail })
                        }
                        other => other,
                    }
                }
                other => other,
            }
        };
        retry::retry(self.retry, attempt, |e, left| self.retrying(url, e, left)).await
    }
}

impl std::ops::Deref for Storage {
    type Target = aws_sdk_s3::Client;

    fn deref(&self) -> &aws_sdk_s3::Client {
        &self.client
    }
}

/// Has the allocator keep freed transfer buffers for reuse rather than give
/// them back to the system at once. Call it first thing in `main`.
///
/// Each body chunk hyper receives lands in a fresh allocation of up to a few
/// hundred KiB, freed once written out. glibc starts out returning such
/// memory as soon as a little sits free, so a 1 GiB download faulted in and
/// zeroed some 200 MiB of new pages (40 000 page faults, ~10 % of its CPU).
/// These are the limits glibc's own sliding thresholds reach at most after
/// large frees (allocations under 32 MiB from the heap, 64 MiB kept free per
/// arena), set from the start: the download faults ~9 000 times and costs
/// ~0.13 CPU-s less, and peak RSS grows by a few MiB; memory freed after a
/// burst stays with the process, bounded by the burst's peak.
pub fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets glibc malloc's tuning parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

/// What the store says of an object: from a HEAD, or from the reply to a
/// [`probe`] (which brings no whole-object checksum).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Size in bytes.
    pub size: u64,
    /// Entity tag, used to pin resumed reads to the same version.
    pub etag: Option<String>,
    /// Whether a plain entity tag is the object's MD5 (false for SSE-KMS
    /// and SSE-C objects, whose tags are not).
    pub etag_is_md5: bool,
    /// The whole-object checksum the store keeps, if any.
    pub checksum: Option<StoreChecksum>,
}

/// Objects up to this size come whole with the first look at them
/// ([`probe`]).
pub const PROBE_BYTES: u64 = 64 << 10;

/// What a first look at an object found: what a HEAD says of it and, if
/// it is small, the object itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probed {
    /// What a HEAD would have said.
    pub info: ObjectInfo,
    /// The whole object, when it came with the look; verified against
    /// `info` when it is saved.
    pub body: Option<Bytes>,
}

/// The outcome of a completed transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    /// Bytes transferred.
    pub size: u64,
    /// CRC-64/NVME of those bytes.
    pub crc64nvme: u64,
}

impl Transfer {
    /// The checksum as events report it (base64, as S3 does).
    pub fn checksum(&self) -> String {
        checksum::to_base64(self.crc64nvme)
    }
}

/// Looks up an object's size, entity tag and, if the store keeps one, its
/// whole-object checksum.
pub async fn head(storage: &Storage, url: &S3Url) -> Result<ObjectInfo, StorageError> {
    let (out, oss) = storage
        .send(url, |checksums| async move {
            let oss = OssCrc64::default();
            let mode = checksums.then_some(aws_sdk_s3::types::ChecksumMode::Enabled);
            let out = storage
                .head_object()
                .bucket(url.bucket())
                .key(url.key())
                .set_checksum_mode(mode)
                .customize()
                .interceptor(oss.clone())
                .send()
                .await
                .map_err(|e| StorageError::from_sdk(url, "HeadObject", e))?;
            Ok((out, oss))
        })
        .await?;
    let size = out
        .content_length
        .and_then(|n| u64::try_from(n).ok())
        .ok_or_else(|| StorageError::Rejected {
            url: url.to_string(),
            op: "HeadObject",
            detail: "the store sent no valid Content-Length".into(),
        })?;
    let etag_is_md5 = etag_is_md5(out.server_side_encryption(), out.sse_customer_algorithm());
    // The cheapest whole-object checksum on offer: CRC-64/NVME is computed
    // anyway. CRC-32s of a multipart object are of its parts unless the
    // store says they are full-object ones; a value that does not parse
    // (such as a composite "…-N") is ignored rather than failing a good
    // download.
    let oss = oss.take();
    let composite = match out.checksum_type() {
        Some(aws_sdk_s3::types::ChecksumType::FullObject) => false,
        Some(aws_sdk_s3::types::ChecksumType::Composite) => true,
        _ => out.e_tag().is_some_and(|tag| tag.contains('-')),
    };
    let offered = [
        (StoreAlgorithm::Crc64Nvme, out.checksum_crc64_nvme()),
        (
            StoreAlgorithm::Crc32c,
            out.checksum_crc32_c().filter(|_| !composite),
        ),
        (StoreAlgorithm::Crc32, out.checksum_crc32().filter(|_| !composite)),
        (StoreAlgorithm::Crc64Ecma, oss.as_deref()),
    ];
    let checksum = offered.into_iter().find_map(|(algorithm, text)| {
        let value = algorithm.parse(text?)?;
        Some(StoreChecksum { algorithm, value })
    });
    Ok(ObjectInfo {
        size,
        etag: out.e_tag,
        etag_is_md5,
        checksum,
    })
}

/// Whether an object's plain entity tag is its MD5: not for SSE-KMS and
/// SSE-C objects.
fn etag_is_md5(sse: Option<&aws_sdk_s3::types::ServerSideEncryption>, sse_c: Option<&str>) -> bool {
    let kms = sse.is_some_and(|e| e.as_str() != "AES256");
    !kms && sse_c.is_none()
}

/// Takes a first look at an object with a GET of its first
/// [`PROBE_BYTES`] instead of a HEAD: a small object comes whole in that
/// one request, halving the requests for many small inputs; a larger one
/// costs that small GET more. At most 64 probes run at once in the
/// process, and each reads at most [`PROBE_BYTES`], whatever the reply
/// says of its length.
///
/// The bytes are kept only if they can be verified when saved: the reply
/// must give the object's size and hold all of it, and its entity tag must
/// be a plain MD5, which the bytes are checked against. A ranged reply
/// carries no whole-object checksum, so a small object whose tag is no MD5
/// (encrypted with KMS or a customer key) is looked up with a HEAD too, and
/// its bytes kept if the HEAD describes the same version. Larger objects,
/// and any reply that breaks off, fall back to a HEAD alone.
pub async fn probe(storage: &Storage, url: &S3Url) -> Result<Probed, StorageError> {
    let _permit = storage
        .shared
        .probes
        .acquire()
        .await
        .expect("the probe semaphore is never closed");
    let reply = storage
        .send(url, |_| async move {
            let reply = storage
                .get_object()
                .bucket(url.bucket())
                .key(url.key())
                .range(format!("bytes=0-{}", PROBE_BYTES - 1))
                .send()
                .await;
            match reply {
                Ok(out) => Ok(Some(out)),
                // An empty object has no byte 0 to send.
                Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 416) => Ok(None),
                Err(e) => Err(StorageError::from_sdk(url, "GetObject", e)),
            }
        })
        .await?;
    let Some(out) = reply else {
        let info = head(storage, url).await?;
        return Ok(Probed { info, body: None });
    };
    let received = out.content_length.and_then(|n| u64::try_from(n).ok());
    let size = match out.content_range() {
        Some(range) => range.rsplit_once('/').and_then(|(_, total)| total.parse().ok()),
        // A store that ignores the range sends the whole object; one that
        // sends a full range without saying of what may have cut it short.
        None => received.filter(|&n| n < PROBE_BYTES),
    };
    let looked = size.map(|size| ObjectInfo {
        size,
        etag: out.e_tag.clone(),
        etag_is_md5: etag_is_md5(out.server_side_encryption(), out.sse_customer_algorithm()),
        checksum: None,
    });
    // A reply this short is read even when its bytes are not kept, so the
    // connection can serve the next request; a longer one is dropped.
    let body = match received.is_some_and(|n| n <= PROBE_BYTES) {
        true => read_at_most(out.body, PROBE_BYTES as usize).await,
        false => None,
    };
    let whole = |b: &Bytes| size.is_some_and(|size| size <= PROBE_BYTES && b.len() as u64 == size);
    let body = body.filter(whole);
    match (looked, body) {
        (Some(info), Some(body)) if verify::expected_md5(&info).is_some() => Ok(Probed {
            info,
            body: Some(body),
        }),
        (looked, body) => {
            let info = head(storage, url).await?;
            let same = looked.is_some_and(|l| l.size == info.size && l.etag.is_some() && l.etag == info.etag);
            let body = body.filter(|_| same);
            Ok(Probed { info, body })
        }
    }
}

/// Probes in flight per store: their replies are read into memory.
const PROBES_IN_FLIGHT: usize = 64;

/// The whole body if it ends within `limit` bytes; `None` if it is longer
/// (whatever its Content-Length said) or breaks off.
async fn read_at_most(mut body: aws_sdk_s3::primitives::ByteStream, limit: usize) -> Option<Bytes> {
    let mut gathered = bytes::BytesMut::new();
    while let Some(chunk) = body.try_next().await.ok()? {
        if gathered.len() + chunk.len() > limit {
            return None;
        }
        gathered.extend_from_slice(&chunk);
    }
    Some(gathered.freeze())
}

/// Keeps the `x-oss-hash-crc64ecma` header of a response, which Aliyun OSS
/// sends and the S3 SDK does not model.
#[derive(Debug, Clone, Default)]
struct OssCrc64(std::sync::Arc<std::sync::Mutex<Option<String>>>);

impl OssCrc64 {
    const HEADER: &str = "x-oss-hash-crc64ecma";

    /// The header of the last response, if it had one.
    fn take(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl aws_sdk_s3::config::Intercept for OssCrc64 {
    fn name(&self) -> &'static str {
        "OssCrc64"
    }

    fn read_after_transmit(
        &self,
        context: &aws_sdk_s3::config::interceptors::BeforeDeserializationInterceptorContextRef<'_>,
        _: &aws_sdk_s3::config::RuntimeComponents,
        _: &mut aws_sdk_s3::config::ConfigBag,
    ) -> Result<(), aws_sdk_s3::error::BoxError> {
        let value = context.response().headers().get(Self::HEADER).map(str::to_owned);
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = value;
        Ok(())
    }
}
