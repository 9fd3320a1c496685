//! Checking what a download received against what the store says of the
//! object: its size, its whole-object checksum if it keeps one, and the MD5
//! a plain entity tag stands for.

use super::{ObjectInfo, S3Url, StorageError, Transfer, checksum::Summed};

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
