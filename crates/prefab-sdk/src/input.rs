//! [`InputReader`]: an input file read front to back, while the gateway is
//! still staging it if the function declared it
//! [streaming](crate::manifest::Param::streaming).

use std::{
    fs::File,
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};
use tokio_util::sync::CancellationToken;

use crate::workspace::{
    Cached, DirFd, read_cached_at,
    watermark::{Watermark, part_name, shares_page_cache},
};

/// Bytes read from the file at a time on a blocking thread.
const CHUNK: u64 = 1 << 20;
/// Bytes read at a time from the page cache, on the caller's thread: small
/// enough that the buffer, reused, stays in the CPU cache between the copy
/// out of the page cache and the function reading it.
const CACHED_CHUNK: usize = 256 << 10;
/// How long a reader that has caught up with staging waits before it looks
/// again, at first and at most (doubling in between).
const WAIT: (Duration, Duration) = (Duration::from_millis(1), Duration::from_millis(25));

/// An input file, read front to back. For a streamed input it returns the
/// bytes the gateway has staged so far and waits for more, ends when the
/// whole file is staged and verified, and fails if staging fails (the call
/// fails then anyway). For any other input it reads the complete file.
///
/// Read it with [`InputReader::chunk`] (no copy) or as a
/// [`tokio::io::AsyncRead`].
pub struct InputReader {
    state: State,
    /// The file's whole size, once known.
    size: Option<u64>,
    /// What is left of the chunk [`AsyncRead`] read last.
    rest: Bytes,
    cancel: CancellationToken,
}

type Step = Pin<Box<dyn Future<Output = std::io::Result<(Box<Cursor>, Option<Bytes>)>> + Send>>;

enum State {
    Idle(Box<Cursor>),
    Reading(Step),
    Ended,
    Failed(std::io::ErrorKind, String),
}

impl std::fmt::Debug for InputReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Idle(cursor) => format!("at {} of {}", cursor.pos, cursor.name),
            State::Reading(_) => "reading".into(),
            State::Ended => "ended".into(),
            State::Failed(_, e) => format!("failed: {e}"),
        };
        f.debug_struct("InputReader").field("state", &state).finish()
    }
}

impl InputReader {
    /// Reads the input file `name` in the folder `dir`, giving up waiting
    /// when `cancel` is cancelled.
    pub(crate) fn new(dir: DirFd, name: String, cancel: CancellationToken) -> Self {
        let cursor = Cursor {
            dir,
            name,
            file: None,
            pos: 0,
            readable: 0,
            size: None,
            complete: false,
            reopen: None,
            nowait: true,
            cached: BytesMut::new(),
        };
        Self {
            state: State::Idle(Box::new(cursor)),
            size: None,
            rest: Bytes::new(),
            cancel,
        }
    }

    /// The size of the whole file, once the first read has learned it.
    pub fn size(&self) -> Option<u64> {
        self.size
    }

    /// The next bytes of the file, waiting for them to be staged; `None`
    /// at its end.
    pub async fn chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        if !self.rest.is_empty() {
            return Ok(Some(std::mem::take(&mut self.rest)));
        }
        std::future::poll_fn(|cx| self.poll_chunk(cx)).await
    }

    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<Option<Bytes>>> {
        loop {
            match &mut self.state {
                State::Idle(_) => {
                    let State::Idle(cursor) = std::mem::replace(&mut self.state, State::Ended) else {
                        unreachable!("matched Idle")
                    };
                    self.state = State::Reading(Box::pin(next(cursor, self.cancel.clone())));
                }
                State::Reading(step) => {
                    let (state, read) = match ready!(step.as_mut().poll(cx)) {
                        Ok((cursor, Some(bytes))) => {
                            self.size = cursor.size;
                            (State::Idle(cursor), Ok(Some(bytes)))
                        }
                        Ok((cursor, None)) => {
                            self.size = cursor.size;
                            (State::Ended, Ok(None))
                        }
                        Err(e) => (State::Failed(e.kind(), e.to_string()), Err(e)),
                    };
                    self.state = state;
                    return Poll::Ready(read);
                }
                State::Ended => return Poll::Ready(Ok(None)),
                // A failed reader never ends as if the file were whole.
                State::Failed(kind, message) => {
                    return Poll::Ready(Err(std::io::Error::new(*kind, message.clone())));
                }
            }
        }
    }
}

impl AsyncRead for InputReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.rest.is_empty() {
            match ready!(this.poll_chunk(cx))? {
                Some(bytes) => this.rest = bytes,
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = buf.remaining().min(this.rest.len());
        buf.put_slice(&this.rest.split_to(n));
        Poll::Ready(Ok(()))
    }
}

/// Reads the next chunk: what the page cache holds of it right here, or
/// else in a blocking thread, waiting while the reader has caught up with
/// staging.
async fn next(
    mut cursor: Box<Cursor>,
    cancel: CancellationToken,
) -> std::io::Result<(Box<Cursor>, Option<Bytes>)> {
    if let Some(bytes) = cursor.read_cached() {
        return Ok((cursor, Some(bytes)));
    }
    let mut wait = WAIT.0;
    loop {
        let (back, step) = tokio::task::spawn_blocking(move || {
            let step = cursor.step();
            (cursor, step)
        })
        .await
        .map_err(std::io::Error::other)?;
        cursor = back;
        match step? {
            Next::Data(bytes) => return Ok((cursor, Some(bytes))),
            Next::End => return Ok((cursor, None)),
            Next::Wait => {
                tokio::select! {
                    () = tokio::time::sleep(wait) => wait = (wait * 2).min(WAIT.1),
                    () = cancel.cancelled() => {
                        return Err(std::io::Error::new(std::io::ErrorKind::Interrupted, "the call was cancelled"));
                    }
                }
            }
        }
    }
}

/// Where reading stands; moved into a blocking thread for each step.
struct Cursor {
    dir: DirFd,
    name: String,
    file: Option<File>,
    /// Bytes read so far.
    pos: u64,
    /// Bytes known to be on the volume.
    readable: u64,
    /// The size of the whole file, once known.
    size: Option<u64>,
    /// Whether `readable` is the whole file.
    complete: bool,
    /// Whether to open the file anew whenever more is readable (see
    /// [`crate::workspace::watermark`]), once asked of the volume.
    reopen: Option<bool>,
    /// Whether the file system takes `RWF_NOWAIT` reads; cleared on the
    /// first refusal.
    nowait: bool,
    /// The buffer of [`Cursor::read_cached`], whose memory comes back for
    /// the next chunk once the function has dropped the last.
    cached: BytesMut,
}

enum Next {
    Data(Bytes),
    End,
    Wait,
}

impl Cursor {
    fn step(&mut self) -> std::io::Result<Next> {
        loop {
            if self.pos < self.readable {
                return self.read().map(Next::Data);
            }
            if self.complete {
                return Ok(Next::End);
            }
            let mark = match Watermark::read(&self.dir, &self.name)? {
                Some(mark) => mark,
                None => match self.dir.open_file(&self.name)? {
                    // Not streamed: the complete file is under its name.
                    Some(file) => {
                        self.readable = file.metadata()?.len();
                        self.size = Some(self.readable);
                        self.file = Some(file);
                        self.complete = true;
                        continue;
                    }
                    // Neither a watermark nor the file: a watermark replaced
                    // as it was looked up (network and FUSE volumes), or the
                    // input is gone.
                    None => Watermark::read_expected(&self.dir, &self.name)?.ok_or_else(|| self.gone())?,
                },
            };
            match mark {
                Watermark::Staging { written, size } if written > self.readable => {
                    self.size = Some(size);
                    let reopen = *self.reopen.get_or_insert_with(|| !shares_page_cache(&self.dir));
                    if reopen || self.file.is_none() {
                        self.file = Some(self.open_staging()?);
                    }
                    self.readable = written;
                }
                Watermark::Staging { .. } => return Ok(Next::Wait),
                Watermark::Complete { size } => {
                    let file = self.open(&self.name)?;
                    let len = file.metadata()?.len();
                    if len != size {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("input {} has {len} bytes where {size} were staged", self.name),
                        ));
                    }
                    self.file = Some(file);
                    self.readable = size;
                    self.size = Some(size);
                    self.complete = true;
                }
                Watermark::Failed { reason } => {
                    return Err(std::io::Error::other(format!(
                        "staging input {} failed: {reason}",
                        self.name
                    )));
                }
            }
        }
    }

    /// Reads up to [`CACHED_CHUNK`] of what is readable, if the page cache
    /// holds it, on the caller's thread ([`read_cached_at`]): staged bytes
    /// were just written, so they are nearly always there.
    fn read_cached(&mut self) -> Option<Bytes> {
        let file = self
            .file
            .as_ref()
            .filter(|_| self.nowait && self.pos < self.readable)?;
        let want = (self.readable - self.pos).min(CACHED_CHUNK as u64) as usize;
        self.cached.reserve(want);
        self.cached.resize(want, 0);
        match read_cached_at(file, &mut self.cached, self.pos) {
            Cached::Read(n) => {
                self.cached.truncate(n);
                self.pos += n as u64;
                return Some(self.cached.split().freeze());
            }
            Cached::NotCached => {}
            Cached::Unsupported => self.nowait = false,
        }
        self.cached.clear();
        None
    }

    /// Reads up to [`CHUNK`] of what is readable.
    fn read(&mut self) -> std::io::Result<Bytes> {
        let want = (self.readable - self.pos).min(CHUNK);
        let file = self.file.as_ref().expect("a readable file is open");
        let mut buf = Vec::with_capacity(want as usize);
        // Into the spare capacity: no zeroing first.
        let n = loop {
            match rustix::io::pread(file, rustix::buffer::spare_capacity(&mut buf), self.pos) {
                Err(rustix::io::Errno::INTR) => continue,
                read => break read?,
            }
        };
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "input {} ended at {} bytes, before the staged {}",
                    self.name, self.pos, self.readable
                ),
            ));
        }
        self.pos += buf.len() as u64;
        Ok(Bytes::from(buf))
    }

    /// Opens the file being staged: `<name>.part`, or `<name>` once it is
    /// complete and renamed.
    fn open_staging(&self) -> std::io::Result<File> {
        match self.open(&part_name(&self.name)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => self.open(&self.name),
            opened => opened,
        }
    }

    /// Opens `name` (following no link); it is read at positions.
    fn open(&self, name: &str) -> std::io::Result<File> {
        self.dir.open_file(name)?.ok_or_else(|| self.gone())
    }

    fn gone(&self) -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "input {} is gone: the call was cancelled or its workspace removed",
                self.name
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn reader(dir: &std::path::Path, name: &str) -> InputReader {
        InputReader::new(DirFd::open(dir).unwrap(), name.into(), CancellationToken::new())
    }

    #[tokio::test]
    async fn a_complete_input_reads_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..3 * CHUNK + 7).map(|i| (i % 251) as u8).collect();
        std::fs::write(tmp.path().join("in.bin"), &data).unwrap();
        let mut got = Vec::new();
        reader(tmp.path(), "in.bin").read_to_end(&mut got).await.unwrap();
        assert_eq!(got, data);

        // The first chunk comes from a blocking thread, the rest (here, where
        // the file system takes RWF_NOWAIT reads) from the page cache.
        let (mut input, mut got, mut sizes) = (reader(tmp.path(), "in.bin"), Vec::new(), Vec::new());
        while let Some(bytes) = input.chunk().await.unwrap() {
            sizes.push(bytes.len());
            got.extend_from_slice(&bytes);
        }
        assert!(got == data, "chunk by chunk, the bytes differ");
        assert_eq!(sizes[0], CHUNK as usize);
        let cached = std::fs::File::open(tmp.path().join("in.bin"))
            .is_ok_and(|f| read_cached_at(&f, &mut [0], 0) != Cached::Unsupported);
        if cached {
            assert!(sizes[1..].iter().all(|&n| n <= CACHED_CHUNK), "{sizes:?}");
            assert_eq!(sizes.len(), 1 + (2 * CHUNK as usize + 7).div_ceil(CACHED_CHUNK));
        }
    }

    #[tokio::test]
    async fn a_streamed_input_is_read_as_the_watermark_moves() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DirFd::open(tmp.path()).unwrap();
        let data: Vec<u8> = (0..2 * CHUNK + 5).map(|i| (i % 241) as u8).collect();
        let size = data.len() as u64;
        // Preallocated as the gateway does: what lies past the watermark
        // reads as zeros and must never be returned.
        let part = std::fs::File::create(tmp.path().join("in.bin.part")).unwrap();
        part.set_len(size).unwrap();
        Watermark::Staging { written: 0, size }
            .publish(&dir, "in.bin")
            .unwrap();

        let mut reader = reader(tmp.path(), "in.bin");
        let writer = {
            let (data, path) = (data.clone(), tmp.path().to_owned());
            tokio::task::spawn_blocking(move || {
                let dir = DirFd::open(&path).unwrap();
                let mut written = 0;
                for piece in data.chunks(300_000) {
                    std::os::unix::fs::FileExt::write_all_at(&part, piece, written).unwrap();
                    written += piece.len() as u64;
                    Watermark::Staging { written, size }
                        .publish(&dir, "in.bin")
                        .unwrap();
                    std::thread::sleep(Duration::from_millis(3));
                }
                dir.rename("in.bin.part", "in.bin").unwrap();
                Watermark::Complete { size }.publish(&dir, "in.bin").unwrap();
            })
        };
        let mut got = Vec::new();
        while let Some(bytes) = reader.chunk().await.unwrap() {
            got.extend_from_slice(&bytes);
        }
        writer.await.unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data, "the bytes read differ from the bytes staged");
    }

    #[tokio::test]
    async fn failed_staging_fails_the_reader_for_good() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DirFd::open(tmp.path()).unwrap();
        std::fs::write(tmp.path().join("in.bin.part"), b"abcd").unwrap();
        Watermark::Staging { written: 4, size: 8 }
            .publish(&dir, "in.bin")
            .unwrap();
        let mut reader = reader(tmp.path(), "in.bin");
        assert_eq!(&reader.chunk().await.unwrap().unwrap()[..], b"abcd");
        Watermark::Failed {
            reason: "the object's CRC-64/NVME does not match".into(),
        }
        .publish(&dir, "in.bin")
        .unwrap();
        for _ in 0..2 {
            let e = reader.chunk().await.unwrap_err();
            assert!(e.to_string().contains("CRC-64/NVME does not match"), "{e}");
        }
    }

    #[tokio::test]
    async fn a_waiting_reader_stops_when_the_call_is_cancelled_or_the_input_goes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DirFd::open(tmp.path()).unwrap();
        std::fs::write(tmp.path().join("in.bin.part"), b"").unwrap();
        Watermark::Staging { written: 0, size: 8 }
            .publish(&dir, "in.bin")
            .unwrap();
        let cancel = CancellationToken::new();
        let mut waiting = InputReader::new(DirFd::open(tmp.path()).unwrap(), "in.bin".into(), cancel.clone());
        let read = tokio::spawn(async move { waiting.chunk().await });
        tokio::time::sleep(Duration::from_millis(30)).await;
        cancel.cancel();
        let e = read.await.unwrap().unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::Interrupted);

        // The workspace removed under a reader: an error, not an end.
        std::fs::remove_file(tmp.path().join("in.bin.watermark")).unwrap();
        std::fs::remove_file(tmp.path().join("in.bin.part")).unwrap();
        let e = reader(tmp.path(), "in.bin").chunk().await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
    }
}
