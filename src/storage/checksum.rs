//! CRC-64/NVME, the checksum S3 keeps for whole objects
//! (`x-amz-checksum-crc64nvme`). It is what the gateway reports for every
//! file it moves, checks downloads against when the store has one, and
//! sends with uploads so that the store checks them. Unlike a cryptographic
//! digest it runs at memory speed, and the checksums of pieces combine into
//! the checksum of the whole: ranges fetched in parallel are joined by
//! offset afterwards, whatever order they finish in.
//!
//! A store may keep another whole-object CRC instead: S3's full-object
//! CRC-32 or CRC-32C, or Aliyun OSS's CRC-64 (`x-oss-hash-crc64ecma`).
//! Downloads of such objects compute that one too ([`Sums`]) and check it.

use crc_fast::{CrcAlgorithm, CrcAlgorithm::Crc64Nvme};

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

    /// The checksum of this run followed by `next`, in about a microsecond.
    #[must_use]
    pub fn then(self, next: Self) -> Self {
        Self {
            crc: CRC64_NVME.join(self.crc, next.crc, next.len),
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

/// A whole-object checksum a store keeps, in the algorithm it chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreChecksum {
    /// The algorithm.
    pub algorithm: StoreAlgorithm,
    /// The checksum of the whole object.
    pub value: u64,
}

/// The whole-object checksums stores keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreAlgorithm {
    /// S3's `x-amz-checksum-crc64nvme`, the one the gateway reports.
    Crc64Nvme,
    /// S3's `x-amz-checksum-crc32c` of an object stored whole, or with a
    /// full-object checksum.
    Crc32c,
    /// S3's `x-amz-checksum-crc32`, likewise.
    Crc32,
    /// Aliyun OSS's `x-oss-hash-crc64ecma`: CRC-64/XZ, in decimal.
    Crc64Ecma,
}

impl StoreAlgorithm {
    fn crc(self) -> CrcAlgorithm {
        match self {
            Self::Crc64Nvme => Crc64Nvme,
            Self::Crc32c => CrcAlgorithm::Crc32Iscsi,
            Self::Crc32 => CrcAlgorithm::Crc32IsoHdlc,
            Self::Crc64Ecma => CrcAlgorithm::Crc64Xz,
        }
    }

    fn joiner(self) -> &'static Joiner {
        match self {
            Self::Crc64Nvme => &CRC64_NVME,
            Self::Crc32c => &CRC32C,
            Self::Crc32 => &CRC32,
            Self::Crc64Ecma => &CRC64_XZ,
        }
    }

    /// Its usual name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Crc64Nvme => "CRC-64/NVME",
            Self::Crc32c => "CRC-32C",
            Self::Crc32 => "CRC-32",
            Self::Crc64Ecma => "CRC-64/XZ (OSS crc64ecma)",
        }
    }

    /// `value` as the store writes it.
    pub fn format(self, value: u64) -> String {
        match self {
            Self::Crc64Nvme => to_base64(value),
            Self::Crc32c | Self::Crc32 => aws_smithy_types::base64::encode((value as u32).to_be_bytes()),
            Self::Crc64Ecma => value.to_string(),
        }
    }

    /// Parses a value as the store writes it; `None` if it is not one (a
    /// composite checksum of parts, say).
    pub fn parse(self, text: &str) -> Option<u64> {
        match self {
            Self::Crc64Nvme => from_base64(text),
            Self::Crc32c | Self::Crc32 => Some(u32::from_be_bytes(decode_base64(text)?).into()),
            Self::Crc64Ecma if text.bytes().all(|b| b.is_ascii_digit()) => text.parse().ok(),
            Self::Crc64Ecma => None,
        }
    }
}

/// The running checksums of a download: CRC-64/NVME always, and the
/// store's own algorithm when that is another one.
pub struct Sums {
    nvme: Crc64Stream,
    other: Option<(StoreAlgorithm, crc_fast::Digest)>,
}

impl Sums {
    /// Checksums for an object the store keeps `stored` of.
    pub fn new(stored: Option<StoreChecksum>) -> Self {
        let other = stored
            .map(|s| s.algorithm)
            .filter(|&a| a != StoreAlgorithm::Crc64Nvme)
            .map(|a| (a, crc_fast::Digest::new(a.crc())));
        Self {
            nvme: Crc64Stream::default(),
            other,
        }
    }

    /// Adds the next bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.nvme.update(bytes);
        if let Some((_, digest)) = &mut self.other {
            digest.update(bytes);
        }
    }

    /// The checksums of everything added so far.
    pub fn finish(&self) -> Summed {
        Summed {
            crc64: self.nvme.finish(),
            other: self.other.as_ref().map(|(a, d)| (*a, d.finalize())),
        }
    }
}

/// The checksums of a run of bytes, as [`Sums`] computes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summed {
    /// CRC-64/NVME, with the run's length.
    pub crc64: Crc64,
    /// The store's other algorithm, if any.
    pub other: Option<(StoreAlgorithm, u64)>,
}

impl Summed {
    /// The checksums of this run followed by `next` (computed alike).
    #[must_use]
    pub fn then(self, next: Self) -> Self {
        let other = match (self.other, next.other) {
            (Some((a, x)), Some((_, y))) => Some((a, a.joiner().join(x, y, next.crc64.len()))),
            (other, None) | (None, other) => other,
        };
        Self {
            crc64: self.crc64.then(next.crc64),
            other,
        }
    }

    /// Checks the checksum the store keeps; on a mismatch, says what differs.
    pub fn check(&self, stored: Option<StoreChecksum>) -> Result<(), String> {
        let Some(stored) = stored else { return Ok(()) };
        let got = match stored.algorithm {
            StoreAlgorithm::Crc64Nvme => Some(self.crc64.value()),
            _ => self.other.map(|(_, v)| v),
        };
        match got {
            Some(got) if got == stored.value => Ok(()),
            got => Err(format!(
                "{} checksum mismatch: the store says {}, the bytes received give {}",
                stored.algorithm.name(),
                stored.algorithm.format(stored.value),
                got.map_or("nothing".into(), |g| stored.algorithm.format(g))
            )),
        }
    }
}

/// Joins the CRCs of two runs of bytes into the CRC of both, for a reflected
/// CRC whose initial value and final XOR are all ones (all four here).
///
/// Mark Adler's method, as in zlib's `crc32_combine`: the CRC of A‖B is
/// crc(A)·x^(8·|B|) + crc(B) modulo the polynomial, and x^(8·|B|) is the
/// product of the powers x^(2^k) for the set bits of 8·|B|, kept in a table.
/// A join costs at most 64 small products, about a microsecond;
/// `crc_fast::checksum_combine` takes some 250 µs, which summed to ~30 ms at
/// the end of every 1 GiB transfer in 8 MiB parts.
struct Joiner {
    /// The polynomial, bit-reversed, without its x^width term.
    poly: u64,
    /// x^0: the register's top bit.
    one: u64,
    /// x^(2^k) modulo the polynomial; 8·|B| < 2^67.
    x2k: [u64; 67],
}

static CRC64_NVME: Joiner = Joiner::new(0x9a6c_9329_ac4b_c9b5, 64);
static CRC64_XZ: Joiner = Joiner::new(0xc96c_5795_d787_0f42, 64);
static CRC32C: Joiner = Joiner::new(0x82f6_3b78, 32);
static CRC32: Joiner = Joiner::new(0xedb8_8320, 32);

impl Joiner {
    const fn new(poly: u64, width: u32) -> Self {
        let one = 1 << (width - 1);
        let mut x2k = [0; 67];
        x2k[0] = one >> 1;
        let mut k = 1;
        while k < x2k.len() {
            x2k[k] = mul(poly, one, x2k[k - 1], x2k[k - 1]);
            k += 1;
        }
        Self { poly, one, x2k }
    }

    fn join(&self, head: u64, tail: u64, tail_len: u64) -> u64 {
        let mut shift = self.one;
        let mut bits = tail_len;
        let mut k = 3; // bytes to bits
        while bits != 0 {
            if bits & 1 != 0 {
                shift = mul(self.poly, self.one, self.x2k[k], shift);
            }
            bits >>= 1;
            k += 1;
        }
        mul(self.poly, self.one, shift, head) ^ tail
    }
}

/// a·b modulo `poly`, both bit-reversed with x^0 at `one`.
const fn mul(poly: u64, one: u64, a: u64, mut b: u64) -> u64 {
    let mut product = 0;
    let mut bit = one;
    while bit != 0 {
        if a & bit != 0 {
            product ^= b;
        }
        b = if b & 1 != 0 { (b >> 1) ^ poly } else { b >> 1 };
        bit >>= 1;
    }
    product
}

/// The form S3 uses in headers and the gateway in events: base64 of the
/// eight big-endian bytes.
pub fn to_base64(crc: u64) -> String {
    aws_smithy_types::base64::encode(crc.to_be_bytes())
}

/// Parses [`to_base64`]'s form; `None` if `text` is not one.
pub fn from_base64(text: &str) -> Option<u64> {
    Some(u64::from_be_bytes(decode_base64(text)?))
}

/// Exactly `N` bytes in base64; `None` if `text` is anything else.
fn decode_base64<const N: usize>(text: &str) -> Option<[u8; N]> {
    aws_smithy_types::base64::decode(text).ok()?.try_into().ok()
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
    fn store_algorithms_match_their_catalogue_check_values() {
        let cases = [
            (StoreAlgorithm::Crc64Nvme, 0xae8b_1486_0a79_9888),
            (StoreAlgorithm::Crc32c, 0xe306_9283),
            (StoreAlgorithm::Crc32, 0xcbf4_3926),
            (StoreAlgorithm::Crc64Ecma, 0x995d_c9bb_df19_39fa),
        ];
        for (algorithm, check) in cases {
            let stored = StoreChecksum {
                algorithm,
                value: check,
            };
            let mut sums = Sums::new(Some(stored));
            sums.update(b"1234");
            let head = sums.finish();
            let mut sums = Sums::new(Some(stored));
            sums.update(b"56789");
            let whole = Sums::new(Some(stored)).finish().then(head).then(sums.finish());
            assert_eq!(whole.check(Some(stored)), Ok(()), "{}", algorithm.name());
            let text = algorithm.format(check);
            assert_eq!(algorithm.parse(&text), Some(check), "{text}");
            let wrong = StoreChecksum {
                algorithm,
                value: check ^ 1,
            };
            let err = whole.check(Some(wrong)).unwrap_err();
            assert!(err.starts_with(algorithm.name()), "{err}");
        }
        // S3 writes CRC-32s as four bytes; a composite one is not whole.
        assert_eq!(StoreAlgorithm::Crc32.parse("yzSWjg=="), Some(0xcb34_968e));
        assert_eq!(StoreAlgorithm::Crc32c.parse("DYFc1g==-128"), None);
        assert_eq!(StoreAlgorithm::Crc64Ecma.parse("-1"), None);
        assert_eq!(StoreAlgorithm::Crc64Ecma.parse("+1"), None);
    }

    #[test]
    fn joins_agree_with_crc_fast_for_every_algorithm() {
        let data: Vec<u8> = (0..70_000u32).map(|i| (i * 13 % 253) as u8).collect();
        let algorithms = [
            StoreAlgorithm::Crc64Nvme,
            StoreAlgorithm::Crc32c,
            StoreAlgorithm::Crc32,
            StoreAlgorithm::Crc64Ecma,
        ];
        for algorithm in algorithms {
            let crc = |bytes: &[u8]| crc_fast::checksum(algorithm.crc(), bytes);
            for cut in [0, 1, 7, 4096, 65_537, 70_000] {
                let (a, b) = data.split_at(cut);
                let joined = algorithm.joiner().join(crc(a), crc(b), b.len() as u64);
                assert_eq!(joined, crc(&data), "{} cut at {cut}", algorithm.name());
            }
            // Lengths no test file has: up to the top bit of a u64.
            for len in [8 << 20, 5 << 30, (1 << 40) + 12_345, u64::MAX] {
                let width_mask = u64::MAX >> (63 - algorithm.joiner().one.trailing_zeros());
                let head = 0x0123_4567_89ab_cdef & width_mask;
                let tail = 0xfedc_ba98_7654_3210 & width_mask;
                assert_eq!(
                    algorithm.joiner().join(head, tail, len),
                    crc_fast::checksum_combine(algorithm.crc(), head, tail, len),
                    "{} after {len} bytes",
                    algorithm.name()
                );
            }
        }
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
