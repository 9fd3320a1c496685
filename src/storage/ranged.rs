//! The download engine for objects above [`SMALL_OBJECT`]: ranged GETs,
//! several at once for large objects (with a global limit across all
//! downloads), whose bytes go to one writer thread. It writes each piece at
//! its offset into the preallocated file and joins the pieces' checksums
//! (CRC-64/NVME, and the store's own CRC if it keeps another) in file
//! order; no byte is copied in user space or read back.
//!
//! Checking an MD5 entity tag needs the bytes themselves in order: then the
//! writer passes them to an MD5 thread, and a range may only start within
//! [`WINDOW`] small ranges of the first byte not yet handed to MD5, so at
//! most 32 MiB wait there (plus the two queues' pieces), whatever the
//! object size.
//!
//! [`SMALL_OBJECT`]: super::download::SMALL_OBJECT

use std::{
    collections::BTreeMap,
    fs::File,
    io::IoSlice,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc as std_mpsc,
    },
};

use bytes::Bytes;
use md5::{Digest, Md5};
use tokio::{
    sync::{mpsc, watch},
    task::JoinSet,
};

use super::{
    ObjectInfo, S3Url, Storage, StorageError, StoreChecksum, Transfer,
    checksum::{Summed, Sums},
    download::Progress,
    fetch::{FetchSpec, Piece, PieceSink, fetch_range},
    verify::{expected_md5, verify},
};

/// Objects at least this large are split into ranges (those whose MD5 is
/// checked are split into the smallest ranges from 8 MiB up).
pub const RANGED_THRESHOLD: u64 = 32 << 20;
/// Bytes per ranged GET: enough ranges to keep several in flight for
/// mid-sized objects, few enough requests for large ones.
const RANGE_SIZES: std::ops::RangeInclusive<u64> = (8 << 20)..=(32 << 20);
/// Ranges of one object in flight.
const RANGES_PER_OBJECT: usize = 4;
/// With an MD5 to check, how many ranges ahead of the first byte not yet
/// handed to MD5 a range may start; those ranges are the smallest size, so at most
/// 4 × 8 MiB wait to be hashed.
const WINDOW: u64 = 4;
/// Ranges in flight across every download from one store.
pub(crate) const RANGES_IN_FLIGHT: usize = 16;
/// Pieces queued between the network and the writer thread. With the
/// ranges' pieces gathering, about 2 MiB of received bytes wait to be
/// written (12 MiB with the 1 MiB pieces and eight queued before): a 1 GiB
/// GET peaks at 21 MiB of resident memory instead of 43. The smaller pieces
/// also measured faster (14 pairs of `examples/transfer get`, median ratio
/// 0.84×), but that was before [`WRITE_STEP`], which explains most of it.
const PIECE_QUEUE: usize = 4;
/// Pieces queued for the MD5 thread.
const MD5_QUEUE: usize = 4;

/// Downloads `url` (`info.size` > 0 bytes) into `file`, a new empty file
/// open for reading and writing.
pub async fn download(
    storage: &Storage,
    url: &S3Url,
    info: &ObjectInfo,
    file: File,
    progress: &mut dyn Progress,
) -> Result<Transfer, StorageError> {
    let io = |e: std::io::Error| StorageError::io(format!("the file staged from {url}"), e);
    let size = info.size;
    let (with_md5, stored) = (expected_md5(info).is_some(), info.checksum);
    let range_size = match with_md5 {
        true => range_size(size).min(*RANGE_SIZES.start()),
        false => range_size(size),
    };
    let ranges = size.div_ceil(range_size);

    let (pieces, piece_rx) = mpsc::channel::<Piece>(PIECE_QUEUE);
    let (hashed_tx, mut hashed) = watch::channel(0u64);
    let writer = tokio::task::spawn_blocking(move || {
        file.set_len(size)?;
        write_all(&file, piece_rx, &hashed_tx, with_md5, stored)
    });

    let spec = FetchSpec::new(storage, url, info);
    let received = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    let mut next = 0u64;
    let mut result = Ok(());
    loop {
        let window_end = match with_md5 {
            true => *hashed.borrow() / range_size + WINDOW,
            false => u64::MAX,
        };
        if next < ranges && next < window_end && tasks.len() < RANGES_PER_OBJECT {
            let start = next * range_size;
            let end = (start + range_size).min(size);
            let (spec, received, storage) = (spec.clone(), Arc::clone(&received), storage.clone());
            let mut sink = ChannelSink {
                pieces: pieces.clone(),
                received,
            };
            tasks.spawn(async move {
                let _permit = storage.range_permits().acquire().await.expect("never closed");
                fetch_range(&spec, start, end, &mut sink).await
            });
            next += 1;
            continue;
        }
        if next == ranges && tasks.is_empty() {
            break;
        }
        tokio::select! {
            Some(finished) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = finished.map_err(|e| io(std::io::Error::other(e))).and_then(|r| r) {
                    result = Err(e);
                    break;
                }
            }
            changed = hashed.changed() => {
                // The writer only stops early when it failed; its join says why.
                if changed.is_err() {
                    break;
                }
                progress.received(received.load(Ordering::Relaxed));
                progress.written(*hashed.borrow());
            }
        }
    }
    tasks.abort_all();
    drop(pieces);
    let written = writer.await.map_err(|e| io(std::io::Error::other(e)))?;
    // A failed writer is the root cause of anything the ranges saw.
    let (sums, md5) = written.map_err(io)?;
    result?;
    let transfer = verify(url, info, sums, md5)?;
    progress.received(size);
    Ok(transfer)
}

/// The size of the ranges `size` bytes are fetched in: the whole object
/// below [`RANGED_THRESHOLD`], else about a sixteenth of it within
/// [`RANGE_SIZES`].
pub fn range_size(size: u64) -> u64 {
    if size < RANGED_THRESHOLD {
        return size;
    }
    (size / 16).clamp(*RANGE_SIZES.start(), *RANGE_SIZES.end())
}

/// Hands a range's pieces to the writer thread.
struct ChannelSink {
    pieces: mpsc::Sender<Piece>,
    received: Arc<AtomicU64>,
}

impl PieceSink for ChannelSink {
    async fn put(&mut self, piece: Piece) -> Result<(), StorageError> {
        let len = piece.len;
        self.pieces.send(piece).await.map_err(|_| StorageError::Io {
            path: "download writer".into(),
            source: std::io::Error::other("the file writer stopped early"),
        })?;
        self.received.fetch_add(len as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// The writer thread: writes every piece at its offset and joins the
/// pieces' checksums in file order (passing the bytes to an MD5 thread if
/// wanted), publishing the length of the prefix done. Returns the checksum
/// of that prefix, which covers the whole object unless a range failed.
fn write_all(
    file: &File,
    mut pieces: mpsc::Receiver<Piece>,
    done: &watch::Sender<u64>,
    with_md5: bool,
    stored: Option<StoreChecksum>,
) -> std::io::Result<(Summed, Option<[u8; 16]>)> {
    std::thread::scope(|scope| {
        let md5 = with_md5.then(|| {
            let (tx, rx) = std_mpsc::sync_channel::<Vec<Bytes>>(MD5_QUEUE);
            let thread = scope.spawn(move || {
                let mut md5 = Md5::new();
                for chunks in rx {
                    chunks.iter().for_each(|c| md5.update(c));
                }
                <[u8; 16]>::from(md5.finalize())
            });
            (tx, thread)
        });
        // Each range's pieces arrive in order: one running checksum per range.
        let mut ranges = BTreeMap::<u64, Sums>::new();
        // Pieces past the contiguous prefix, with their bytes if MD5 wants them.
        let mut waiting = BTreeMap::<u64, (usize, Vec<Bytes>)>::new();
        let mut prefix = 0u64;
        while let Some(piece) = pieces.blocking_recv() {
            write_all_at(file, &piece.chunks, piece.offset)?;
            let sums = ranges.entry(piece.range).or_insert_with(|| Sums::new(stored));
            piece.chunks.iter().for_each(|c| sums.update(c));
            let bytes = if md5.is_some() { piece.chunks } else { Vec::new() };
            waiting.insert(piece.offset, (piece.len, bytes));
            while let Some((len, bytes)) = waiting.remove(&prefix) {
                prefix += len as u64;
                if let Some((tx, _)) = &md5 {
                    tx.send(bytes)
                        .map_err(|_| std::io::Error::other("the MD5 thread stopped"))?;
                }
            }
            done.send_replace(prefix);
        }
        // Join the ranges' checksums in order, as far as they are contiguous.
        let mut whole = Sums::new(stored).finish();
        for (start, range) in &ranges {
            if *start != whole.crc64.len() {
                break;
            }
            whole = whole.then(range.finish());
        }
        let md5 = match md5 {
            Some((tx, thread)) => {
                drop(tx);
                let digest = thread
                    .join()
                    .map_err(|_| std::io::Error::other("the MD5 thread panicked"))?;
                Some(digest)
            }
            None => None,
        };
        Ok((whole, md5))
    })
}

/// The most one system call writes, and the file boundaries it keeps to.
///
/// The kernel gives a buffered write page-cache folios as large as the
/// write. Those of at most 32 KiB (order 3) come from per-CPU lists of
/// recently freed pages; larger ones from the buddy allocator, whose free
/// blocks a VM with free page reporting (virtio-balloon, as this project's
/// machines) has handed back to the host, so that the first touch of each
/// page faults in the host. Writing a 1 GiB download in pieces of up to
/// 256 KiB cost 1.3–2.6 s of kernel time in most runs here, in 32 KiB steps
/// 0.6–0.8 s, as s5cmd (which writes 32 KiB at a time): six alternating
/// rounds of `examples/transfer get`, median 2.38 s before, 1.05 s after,
/// s5cmd 1.06 s in the same rounds.
const WRITE_STEP: u64 = 32 << 10;

/// Writes `chunks` back to back at `offset`, in [`WRITE_STEP`]s.
pub(crate) fn write_all_at(file: &File, chunks: &[Bytes], mut offset: u64) -> std::io::Result<()> {
    /// Linux's limit on buffers per call.
    const IOV_MAX: usize = 1024;
    let mut rest: Vec<&[u8]> = chunks.iter().map(|c| &c[..]).filter(|c| !c.is_empty()).collect();
    let mut first = 0;
    while first < rest.len() {
        // Up to the next WRITE_STEP boundary of the file.
        let mut room = (WRITE_STEP - offset % WRITE_STEP) as usize;
        let mut slices: Vec<IoSlice<'_>> = Vec::new();
        for c in rest[first..].iter().take(IOV_MAX) {
            if room == 0 {
                break;
            }
            let take = c.len().min(room);
            slices.push(IoSlice::new(&c[..take]));
            room -= take;
        }
        let mut written = match rustix::io::pwritev(file, &slices, offset) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        offset += written as u64;
        while written > 0 {
            let head = rest[first];
            if head.len() <= written {
                written -= head.len();
                first += 1;
            } else {
                rest[first] = &head[written..];
                written = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_land_at_their_offset_whatever_the_steps_cut() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        // Chunks of odd sizes, some empty, some larger than a step.
        let mut chunks = Vec::new();
        let mut at = 0;
        for len in [1, 0, 40_000, 7, 32 << 10, 100_000, 3].into_iter().cycle() {
            let end = (at + len).min(data.len());
            chunks.push(Bytes::copy_from_slice(&data[at..end]));
            at = end;
            if at == data.len() {
                break;
            }
        }
        let file = tempfile::tempfile().unwrap();
        let offset = 12_345;
        write_all_at(&file, &chunks, offset).unwrap();
        let mut got = vec![0; data.len()];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut got, offset).unwrap();
        assert!(got == data, "the bytes written differ");
        assert_eq!(file.metadata().unwrap().len(), offset + data.len() as u64);
    }
}
