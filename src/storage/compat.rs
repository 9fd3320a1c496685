//! What a store accepts. S3 itself, MinIO and SeaweedFS take the flexible
//! checksum headers (`x-amz-checksum-*`, `x-amz-checksum-mode`, a multipart
//! upload's checksum algorithm and type), and the gateway sends its
//! CRC-64/NVME with every PUT and part so that the store verifies each byte
//! it keeps. Backblaze B2, OVHcloud and older S3-compatible stores refuse
//! those headers (`400 InvalidArgument: Unsupported header 'x-amz-checksum-…'`,
//! to a HEAD a bare 400). With the default mode, [`ChecksumMode::Auto`], the
//! first such refusal switches the endpoint to `Content-MD5` for the rest of
//! the process (logged once, at WARN): accepted almost everywhere, and the
//! store still verifies every PUT and part. `S3_CHECKSUM` forces a mode.
//!
//! No request uses `Content-Encoding: aws-chunked` (Aliyun OSS refuses it
//! unless the payload is signed in streaming mode): checksums travel in
//! headers computed before the request, and payloads are unsigned.

use std::sync::atomic::{AtomicBool, Ordering};

/// How uploads prove their bytes to the store (`S3_CHECKSUM`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ChecksumMode {
    /// CRC-64/NVME headers, falling back to `Content-MD5` for a store that
    /// refuses them.
    #[default]
    Auto,
    /// CRC-64/NVME headers only (a store that refuses them fails the run).
    Crc64nvme,
    /// `Content-MD5` on every PUT and part; no checksum headers at all.
    Md5,
    /// Nothing beyond what the protocol needs (not recommended).
    Off,
}

/// The integrity an upload request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Integrity {
    /// `x-amz-checksum-crc64nvme`, and full-object multipart uploads.
    Crc64Nvme,
    /// `Content-MD5`.
    Md5,
    /// None.
    Unchecked,
}

/// What one endpoint was found to accept, shared by every transfer.
#[derive(Debug)]
pub struct Compat {
    mode: ChecksumMode,
    fell_back: AtomicBool,
}

impl Compat {
    /// The settings for `mode`.
    pub fn new(mode: ChecksumMode) -> Self {
        Self {
            mode,
            fell_back: AtomicBool::new(false),
        }
    }

    /// What uploads carry now.
    pub fn integrity(&self) -> Integrity {
        match self.mode {
            ChecksumMode::Auto if self.fell_back.load(Ordering::Relaxed) => Integrity::Md5,
            ChecksumMode::Auto | ChecksumMode::Crc64nvme => Integrity::Crc64Nvme,
            ChecksumMode::Md5 => Integrity::Md5,
            ChecksumMode::Off => Integrity::Unchecked,
        }
    }

    /// Whether requests may carry the flexible checksum headers (uploads'
    /// checksums, and `x-amz-checksum-mode` asking a HEAD for the stored
    /// checksum).
    pub fn checksum_headers(&self) -> bool {
        self.integrity() == Integrity::Crc64Nvme
    }

    /// After the store refused a request for its checksum headers: whether
    /// to send it again without them (only in [`ChecksumMode::Auto`], and
    /// only if it carried them).
    pub fn fall_back(&self, endpoint: &str, refused: &str) -> bool {
        if self.mode != ChecksumMode::Auto {
            return false;
        }
        if !self.fell_back.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                endpoint,
                refused,
                "the store refuses the x-amz-checksum headers; from now on uploads to it carry Content-MD5 \
                 instead and downloads are verified by what it does report (set S3_CHECKSUM=md5 to start so)"
            );
            return true;
        }
        // Another transfer fell back first; this request carried the
        // headers before it did.
        true
    }
}

/// Whether a store's error of `status` with `code` and `message` refuses a
/// request for its flexible checksum headers. A HEAD cannot say why (its
/// error has no body): a bare 400 to a HEAD that carried them counts.
pub fn refuses_checksum_headers(status: u16, code: &str, message: &str, op: &str) -> bool {
    if !matches!(status, 400 | 501) {
        return false;
    }
    let text = format!("{code} {message}").to_ascii_lowercase();
    let named = text.contains("x-amz-checksum")
        || text.contains("x-amz-sdk-checksum")
        || text.contains("checksum algorithm")
        || (text.contains("checksum") && (text.contains("unsupported") || text.contains("not supported")));
    named || (status == 400 && op == "HeadObject" && code.is_empty() && message.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_falls_back_once_and_forced_modes_never() {
        let auto = Compat::new(ChecksumMode::Auto);
        assert!(auto.checksum_headers());
        assert!(auto.fall_back("http://store", "x-amz-checksum-crc64nvme"));
        assert_eq!(auto.integrity(), Integrity::Md5);
        assert!(!auto.checksum_headers());
        let forced = Compat::new(ChecksumMode::Crc64nvme);
        assert!(!forced.fall_back("http://store", "x"));
        assert_eq!(forced.integrity(), Integrity::Crc64Nvme);
        assert_eq!(Compat::new(ChecksumMode::Off).integrity(), Integrity::Unchecked);
    }

    #[test]
    fn refusals_of_the_headers_are_told_from_other_errors() {
        let b2 = "Unsupported header 'x-amz-checksum-crc64nvme' received for this API call.";
        assert!(refuses_checksum_headers(400, "InvalidArgument", b2, "PutObject"));
        assert!(refuses_checksum_headers(400, "", "", "HeadObject"));
        assert!(refuses_checksum_headers(
            501,
            "NotImplemented",
            "x-amz-sdk-checksum-algorithm is not supported",
            "UploadPart"
        ));
        assert!(!refuses_checksum_headers(400, "", "", "PutObject"));
        assert!(!refuses_checksum_headers(
            400,
            "BadDigest",
            "content md5 mismatch",
            "PutObject"
        ));
        assert!(!refuses_checksum_headers(
            403,
            "AccessDenied",
            "x-amz-checksum",
            "PutObject"
        ));
    }
}
