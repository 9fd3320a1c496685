//! Object storage: the S3 client, `s3://` URLs, and the transfer engine that
//! streams objects to and from local files with bounded memory, retries and
//! checksums.

pub mod checksum;
mod client;
pub mod download;
mod error;
pub mod ranged;
pub mod upload;
mod url;

pub use checksum::Crc64;
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
    /// The CRC-64/NVME the store keeps for the whole object, if any.
    pub crc64nvme: Option<u64>,
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
pub async fn head(client: &aws_sdk_s3::Client, url: &S3Url) -> Result<ObjectInfo, StorageError> {
    let out = client
        .head_object()
        .bucket(url.bucket())
        .key(url.key())
        .checksum_mode(aws_sdk_s3::types::ChecksumMode::Enabled)
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
    // CRC-64/NVME checksums are always of the whole object; one that does
    // not parse is ignored rather than failing a good download.
    let crc64nvme = out.checksum_crc64_nvme().and_then(checksum::from_base64);
    Ok(ObjectInfo {
        size,
        etag: out.e_tag,
        etag_is_md5,
        crc64nvme,
    })
}
