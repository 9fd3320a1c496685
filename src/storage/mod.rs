//! Object storage: the S3 client, `s3://` URLs, and the transfer engine that
//! streams objects to and from local files with bounded memory, retries and
//! checksums.

mod client;
pub mod download;
mod error;
pub mod ranged;
pub mod upload;
mod url;

pub use client::{ClientError, connect};
pub use download::download;
pub use error::{StorageError, error_chain};
pub use upload::upload;
pub use url::{S3Url, UrlError};

/// What a HEAD request says about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Size in bytes.
    pub size: u64,
    /// Entity tag, used to pin resumed reads to the same version.
    pub etag: Option<String>,
    /// Whether a plain entity tag is the object's MD5 (false for SSE-KMS
    /// and SSE-C objects, whose tags are not).
    pub etag_is_md5: bool,
}

/// The outcome of a completed transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    /// Bytes transferred.
    pub size: u64,
    /// Lower-case hex SHA-256 of those bytes.
    pub sha256: String,
}

/// Looks up an object's size and entity tag.
pub async fn head(client: &aws_sdk_s3::Client, url: &S3Url) -> Result<ObjectInfo, StorageError> {
    let out = client
        .head_object()
        .bucket(url.bucket())
        .key(url.key())
        .send()
        .await
        .map_err(|e| StorageError::from_sdk(url, "HeadObject", e))?;
    let size = out
        .content_length
        .and_then(|n| u64::try_from(n).ok())
        .ok_or_else(|| StorageError::Rejected {
            url: url.to_string(),
            op: "HeadObject",
            detail: "the store sent no valid Content-Length".into(),
        })?;
    let kms = out
        .server_side_encryption()
        .is_some_and(|e| e.as_str() != "AES256");
    let etag_is_md5 = !kms && out.sse_customer_algorithm().is_none();
    Ok(ObjectInfo {
        size,
        etag: out.e_tag,
        etag_is_md5,
    })
}
