//! CRC-64/NVME, the checksum S3 keeps for whole objects
//! (`x-amz-checksum-crc64nvme`). It is what the gateway reports for every
//! file it moves, checks downloads against when the store has one, and
//! sends with uploads so that the store checks them. Unlike a cryptographic
//! digest it runs at memory speed, and the checksums of pieces combine into
//! the checksum of the whole: ranges fetched in parallel are joined by
//! offset afterwards, whatever order they finish in.

use crc_fast::{CrcAlgorithm::Crc64Nvme, checksum_combine};

/// The CRC-64/NVME of a run of bytes, with the run's length so that runs
/// can be joined.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Crc64 {
    crc: u64,
    len: u64,
}

impl Crc64 {
    /// The checksum of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self::of_chunks([bytes])
    }

    /// The checksum of `chunks` back to back.
    pub fn of_chunks<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let mut stream = Crc64Stream::default();
        chunks.into_iter().for_each(|c| stream.update(c));
        stream.finish()
    }

    /// The checksum of this run followed by `next`. Joining costs about as
    /// much as checksumming a few hundred KiB: join ranges, not small pieces.
    #[must_use]
    pub fn then(self, next: Self) -> Self {
        Self {
            crc: checksum_combine(Crc64Nvme, self.crc, next.crc, next.len),
            len: self.len + next.len,
        }
    }

    /// Bytes covered.
    pub fn len(self) -> u64 {
        self.len
    }

    /// Whether no bytes are covered.
    pub fn is_empty(self) -> bool {
        self.len == 0
    }

    /// The checksum value.
    pub fn value(self) -> u64 {
        self.crc
    }
}

/// A CRC-64/NVME computed over bytes as they come.
pub struct Crc64Stream {
    digest: crc_fast::Digest,
    len: u64,
}

impl Default for Crc64Stream {
    fn default() -> Self {
        Self {
            digest: crc_fast::Digest::new(Crc64Nvme),
            len: 0,
        }
    }
}

impl Crc64Stream {
    /// Adds the next bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.digest.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// The checksum of everything added so far.
    pub fn finish(&self) -> Crc64 {
        Crc64 {
            crc: self.digest.finalize(),
            len: self.len,
        }
    }
}

/// The form S3 uses in headers and the gateway in events: base64 of the
/// eight big-endian bytes.
pub fn to_base64(crc: u64) -> String {
    aws_smithy_types::base64::encode(crc.to_be_bytes())
}

/// Parses [`to_base64`]'s form; `None` if `text` is not one.
pub fn from_base64(text: &str) -> Option<u64> {
    let bytes = aws_smithy_types::base64::decode(text).ok()?;
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_catalogue_check_value_and_s3s_encoding() {
        assert_eq!(Crc64::of(b"123456789").value(), 0xae8b_1486_0a79_9888);
        // What SeaweedFS returns for a PUT of "hello\n" with this header.
        assert_eq!(to_base64(Crc64::of(b"hello\n").value()), "akP7S61aVgc=");
        assert_eq!(from_base64("akP7S61aVgc="), Some(Crc64::of(b"hello\n").value()));
        assert_eq!(from_base64("not base64"), None);
        assert_eq!(from_base64("AAAA"), None);
    }

    #[test]
    fn pieces_join_into_the_whole() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for cut in [0, 1, 4096, 55_555, 100_000] {
            let (a, b) = data.split_at(cut);
            assert_eq!(Crc64::of(a).then(Crc64::of(b)), Crc64::of(&data), "cut at {cut}");
        }
        let thirds = Crc64::default()
            .then(Crc64::of(&data[..10]))
            .then(Crc64::of_chunks([&data[10..20], &data[20..50_000]]))
            .then(Crc64::of(&data[50_000..]));
        assert_eq!(thirds, Crc64::of(&data));
        assert_eq!(thirds.len(), 100_000);
    }
}
