//! Reading a local file for upload: each part is read once to checksum it
//! (its CRC goes in the request's headers, before the body) and again, a
//! chunk at a time, as it goes to the socket. An upload holds a few chunk buffers
//! per part in flight, whatever the part size.
//!
//! The second read usually comes from the page cache (the file was just
//! written, or just checksummed). A chunk the page cache holds is read right
//! where the socket asks for it, with `RWF_NOWAIT`: the kernel returns what
//! is cached and never starts or waits for disk I/O (the read can still wait
//! briefly for memory, like any allocation). That saves a hand-off to a
//! blocking thread per chunk, and the bytes are still in the CPU cache when
//! the socket copies them. Bytes that must come from the disk, and every
//! read on a file system without `RWF_NOWAIT` (NFS, FUSE), are read on a
//! blocking thread, one chunk ahead of the socket. Chunk buffers are reused
//! as the socket releases them, so those copies land in warm memory too.

use std::{
    fs::File,
    os::unix::fs::FileExt,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use tokio::task::JoinHandle;

use super::{Crc64, checksum::Crc64Stream};
use prefab_sdk::workspace::{Cached, read_cached_at};

/// Bytes per read when checksumming or sending part of a file: small enough
/// to stay in the CPU cache between the page cache and the socket.
pub(super) const CHUNK: usize = 256 << 10;

/// Chunk buffers an upload keeps for reuse (4 MiB). A part being sent holds
/// about three: hyper queues two 256 KiB chunks (up to ~400 KiB) per
/// connection while the next is read, and four parts are in flight.
const POOLED: usize = 16;

/// A file being uploaded, with the chunk buffers its reads reuse.
#[derive(Debug)]
pub(super) struct UploadFile {
    file: File,
    free: Mutex<Vec<Vec<u8>>>,
    /// Whether the file system takes `RWF_NOWAIT` reads; cleared on the
    /// first refusal.
    nowait: AtomicBool,
}

impl UploadFile {
    pub(super) fn new(file: File) -> Arc<Self> {
        Arc::new(Self {
            file,
            free: Mutex::default(),
            nowait: AtomicBool::new(true),
        })
    }

    /// A buffer of at least `len` bytes (`len` ≤ [`CHUNK`]): a free one if
    /// any (free ones are whole chunks), else a new one of exactly `len`.
    fn buffer(&self, len: usize) -> Vec<u8> {
        debug_assert!(len <= CHUNK);
        let free = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop();
        free.unwrap_or_else(|| vec![0; len])
    }

    /// Takes back a buffer; only whole chunk buffers are kept.
    fn give_back(&self, buf: Vec<u8>) {
        if buf.len() == CHUNK {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            if free.len() < POOLED {
                free.push(buf);
            }
        }
    }

    fn nowait(&self) -> bool {
        self.nowait.load(Ordering::Relaxed)
    }

    /// The CRC-64/NVME of `len` bytes from `offset` (see
    /// [`crc64_of_range`]).
    pub(super) fn checksum(&self, offset: u64, len: u64) -> std::io::Result<Crc64> {
        crc64_of_range(&self.file, offset, len)
    }

    /// The MD5 of `len` bytes from `offset` (for `Content-MD5`, which
    /// stores that refuse checksum headers check), read on the calling
    /// thread (a blocking one).
    pub(super) fn md5(&self, offset: u64, len: u64) -> std::io::Result<[u8; 16]> {
        use md5::Digest as _;
        let mut md5 = md5::Md5::new();
        read_range(&self.file, offset, len, |bytes| md5.update(bytes))?;
        Ok(md5.finalize().into())
    }
}

/// The CRC-64/NVME of `len` bytes of `file` from `offset`, read on the
/// calling thread (a blocking one).
///
/// The buffer is its own, not one of an upload's pool: handing pool
/// buffers between this thread and the socket's made both copies from the
/// page cache about three times slower (measured: 2.2 CPU-s per GiB
/// uploaded against 1.2). The blocking reads of [`FileRange`] do share the
/// pool, but they are the exception (bytes not in the page cache).
pub fn crc64_of_range(file: &File, offset: u64, len: u64) -> std::io::Result<Crc64> {
    let mut crc = Crc64Stream::default();
    read_range(file, offset, len, |bytes| crc.update(bytes))?;
    Ok(crc.finish())
}

/// Hands `len` bytes of `file` from `offset` to `each`, a chunk at a time,
/// read into a buffer of its own (see [`crc64_of_range`]).
fn read_range(file: &File, offset: u64, len: u64, mut each: impl FnMut(&[u8])) -> std::io::Result<()> {
    let mut buf = vec![0; CHUNK.min(len as usize)];
    let mut at = offset;
    while at < offset + len {
        let n = buf.len().min((offset + len - at) as usize);
        file.read_exact_at(&mut buf[..n], at)?;
        each(&buf[..n]);
        at += n as u64;
    }
    Ok(())
}

/// A request body streaming `len` bytes of a file from `offset`, in frames
/// of at most [`CHUNK`] bytes (fewer where the page cache holds only part of
/// a chunk).
pub(super) struct FileRange {
    file: Arc<UploadFile>,
    /// Where the next read starts, and the bytes after it.
    offset: u64,
    remaining: u64,
    /// A read on a blocking thread, and its length.
    reading: Option<(JoinHandle<std::io::Result<Bytes>>, u64)>,
    /// The failure that ended the body, returned again if it is polled on.
    failed: Option<std::io::ErrorKind>,
    /// Chunks read from the page cache without blocking, and on a blocking
    /// thread.
    cached_reads: u32,
    blocking_reads: u32,
}

impl FileRange {
    /// A body that reads nothing until first polled: the SDK builds copies
    /// of a body it may never send.
    pub(super) fn new(file: Arc<UploadFile>, offset: u64, len: u64) -> Self {
        Self {
            file,
            offset,
            remaining: len,
            reading: None,
            failed: None,
            cached_reads: 0,
            blocking_reads: 0,
        }
    }

    /// Reads as much of the next chunk as the page cache holds, if any,
    /// without blocking.
    fn read_cached(&mut self) -> Option<Bytes> {
        if !self.file.nowait() {
            return None;
        }
        let want = (CHUNK as u64).min(self.remaining) as usize;
        let mut buf = self.file.buffer(want);
        match read_cached_at(&self.file.file, &mut buf[..want], self.offset) {
            Cached::Read(n) => {
                self.offset += n as u64;
                self.remaining -= n as u64;
                self.cached_reads += 1;
                return Some(Chunk::bytes(buf, n, &self.file));
            }
            // The blocking read waits for the disk, or reports the end or
            // the error.
            Cached::NotCached => {}
            Cached::Unsupported => self.file.nowait.store(false, Ordering::Relaxed),
        }
        self.file.give_back(buf);
        None
    }

    /// Starts reading the next chunk on a blocking thread.
    fn read_blocking(&mut self) {
        let n = (CHUNK as u64).min(self.remaining) as usize;
        let (file, at) = (Arc::clone(&self.file), self.offset);
        self.offset += n as u64;
        self.remaining -= n as u64;
        self.blocking_reads += 1;
        let read = tokio::task::spawn_blocking(move || {
            let mut buf = file.buffer(n);
            match file.file.read_exact_at(&mut buf[..n], at) {
                Ok(()) => Ok(Chunk::bytes(buf, n, &file)),
                Err(e) => {
                    file.give_back(buf);
                    Err(e)
                }
            }
        });
        self.reading = Some((read, n as u64));
    }
}

impl http_body::Body for FileRange {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        if let Some(kind) = self.failed {
            return Poll::Ready(Some(Err(kind.into())));
        }
        if self.reading.is_none() {
            if self.remaining == 0 {
                return Poll::Ready(None);
            }
            if let Some(chunk) = self.read_cached() {
                return Poll::Ready(Some(Ok(http_body::Frame::data(chunk))));
            }
            self.read_blocking();
        }
        let (reading, _) = self.reading.as_mut().expect("a read was just started");
        let read = ready!(Pin::new(reading).poll(cx));
        self.reading = None;
        match read.map_err(std::io::Error::other).and_then(|r| r) {
            Ok(chunk) => {
                // Where every read blocks, the next one starts while this
                // chunk goes to the socket.
                if self.remaining > 0 && !self.file.nowait() {
                    self.read_blocking();
                }
                Poll::Ready(Some(Ok(http_body::Frame::data(chunk))))
            }
            Err(e) => {
                self.failed = Some(e.kind());
                Poll::Ready(Some(Err(e)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed.is_none() && self.reading.is_none() && self.remaining == 0
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let reading = self.reading.as_ref().map_or(0, |(_, len)| *len);
        http_body::SizeHint::with_exact(self.remaining + reading)
    }
}

impl Drop for FileRange {
    fn drop(&mut self) {
        if let Some((reading, _)) = self.reading.take() {
            reading.abort();
        }
    }
}

/// The first `len` bytes of a chunk buffer, which goes back to its file's
/// pool once the socket has sent them.
struct Chunk {
    buf: Vec<u8>,
    len: usize,
    home: Arc<UploadFile>,
}

impl Chunk {
    fn bytes(buf: Vec<u8>, len: usize, home: &Arc<UploadFile>) -> Bytes {
        Bytes::from_owner(Self {
            buf,
            len,
            home: Arc::clone(home),
        })
    }
}

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        self.home.give_back(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use http_body::Body as _;
    use http_body_util::BodyExt;

    use super::*;

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4099) as u8).collect()
    }

    /// A file holding `data`, written out to the disk.
    fn file_of(data: &[u8]) -> (File, Arc<UploadFile>) {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(data).unwrap();
        file.sync_all().unwrap();
        let upload = UploadFile::new(file.try_clone().unwrap());
        (file, upload)
    }

    /// Whether this file system serves `RWF_NOWAIT` reads (tmpfs and
    /// overlayfs on older kernels do not); the cached path is checked only
    /// where it is taken.
    fn takes_nowait(file: &File) -> bool {
        if read_cached_at(file, &mut [0], 0) == Cached::Unsupported {
            eprintln!("the test directory's file system has no RWF_NOWAIT: only blocking reads are checked");
            return false;
        }
        true
    }

    /// Polls `body` to its end or its first error: the bytes sent, and the
    /// error. Frames are dropped as they come, like a socket does.
    async fn drain(body: &mut FileRange) -> (Vec<u8>, Option<std::io::Error>) {
        let mut sent = Vec::new();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => sent.extend_from_slice(&frame.into_data().unwrap()),
                Err(e) => return (sent, Some(e)),
            }
        }
        (sent, None)
    }

    #[tokio::test]
    async fn a_range_streams_exactly_its_bytes_on_either_read_path() {
        let data = data(3 * CHUNK + 1234);
        let (raw, file) = file_of(&data);
        let nowait = takes_nowait(&raw);
        for blocking_only in [false, true] {
            file.nowait.store(!blocking_only, Ordering::Relaxed);
            for (offset, len) in [(0, data.len()), (1000, 2 * CHUNK), (CHUNK + 5, 1), (7, 0)] {
                let mut body = FileRange::new(Arc::clone(&file), offset as u64, len as u64);
                let (sent, failed) = drain(&mut body).await;
                assert!(failed.is_none(), "offset {offset} len {len}: {failed:?}");
                assert_eq!(sent, &data[offset..offset + len], "offset {offset} len {len}");
                assert!(body.is_end_stream());
                let chunks = len.div_ceil(CHUNK) as u32;
                if blocking_only || !nowait {
                    assert_eq!((body.cached_reads, body.blocking_reads), (0, chunks));
                } else {
                    assert_eq!(body.cached_reads, chunks, "all of a fresh file is cached");
                }
            }
        }
        let crc = file.checksum(1000, 2 * CHUNK as u64).unwrap();
        assert_eq!(crc, Crc64::of(&data[1000..1000 + 2 * CHUNK]));
    }

    #[tokio::test]
    async fn chunks_the_page_cache_lacks_are_read_from_the_disk_in_between() {
        let data = data(32 * CHUNK);
        let (raw, file) = file_of(&data);
        if !takes_nowait(&raw) {
            return;
        }
        // Drop the whole file from the page cache (a range can be kept
        // whole in a large folio), then read its first chunk back: the body
        // finds the start cached, then has to wait for the disk. Only clean
        // pages can be dropped: the file is written back first. Readahead is
        // turned off for the file (the body shares its open file): with it,
        // the kernel may read the whole file back in before the body gets
        // there (read_ahead_kb is 8 MiB on the dev machine's disk).
        raw.sync_data().unwrap();
        rustix::fs::fadvise(&raw, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        rustix::fs::fadvise(&raw, 0, None, rustix::fs::Advice::Random).unwrap();
        raw.read_exact_at(&mut vec![0; CHUNK], 0).unwrap();
        let mut body = FileRange::new(Arc::clone(&file), 100, (32 * CHUNK - 200) as u64);
        let (sent, failed) = drain(&mut body).await;
        assert!(failed.is_none(), "{failed:?}");
        assert_eq!(sent, &data[100..32 * CHUNK - 100]);
        let reads = (body.cached_reads, body.blocking_reads);
        assert!(reads.0 > 0 && reads.1 > 0, "{reads:?} cached and blocking reads");
    }

    #[tokio::test]
    async fn chunk_buffers_are_reused_once_sent_and_at_most_a_few_are_kept() {
        let (raw, file) = file_of(&data(40 * CHUNK));
        let free = || file.free.lock().unwrap().len();
        // Frames dropped as they come: one buffer serves every cached read;
        // blocking reads, one chunk ahead, take two (three if the next read
        // takes its buffer before the last frame is dropped).
        for (blocking_only, buffers) in [(false, 1..=1), (true, 2..=3)] {
            if !blocking_only && !takes_nowait(&raw) {
                continue;
            }
            file.free.lock().unwrap().clear();
            file.nowait.store(!blocking_only, Ordering::Relaxed);
            let mut body = FileRange::new(Arc::clone(&file), 0, 40 * CHUNK as u64);
            assert_eq!(drain(&mut body).await.0.len(), 40 * CHUNK);
            assert!(
                buffers.contains(&free()),
                "blocking only: {blocking_only}, {} buffers",
                free()
            );
        }
        // Frames all held until the end: only POOLED buffers are kept.
        let mut body = FileRange::new(Arc::clone(&file), 0, 40 * CHUNK as u64);
        let mut held = Vec::new();
        while let Some(frame) = body.frame().await {
            held.push(frame.unwrap().into_data().unwrap());
        }
        assert_eq!(held.len(), 40);
        drop(held);
        assert_eq!(free(), POOLED);
        // A short last chunk's buffer is not kept for whole chunks.
        file.free.lock().unwrap().clear();
        let mut body = FileRange::new(Arc::clone(&file), 0, 100);
        drain(&mut body).await;
        assert_eq!(free(), 0);
    }

    #[tokio::test]
    async fn a_file_cut_short_fails_the_body_and_it_stays_failed() {
        for blocking_only in [false, true] {
            let (raw, file) = file_of(&data(2 * CHUNK));
            file.nowait.store(!blocking_only, Ordering::Relaxed);
            let mut body = FileRange::new(Arc::clone(&file), 0, 2 * CHUNK as u64);
            raw.set_len(CHUNK as u64 + 10).unwrap();
            let (sent, failed) = drain(&mut body).await;
            assert_eq!(failed.unwrap().kind(), std::io::ErrorKind::UnexpectedEof);
            assert!(sent.len() <= CHUNK + 10, "sent {} bytes", sent.len());
            assert!(!body.is_end_stream());
            let again = body.frame().await.unwrap().unwrap_err();
            assert_eq!(again.kind(), std::io::ErrorKind::UnexpectedEof);
            let err = file.checksum(0, 2 * CHUNK as u64).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        }
    }
}
