//! Streaming an object onto local disk. Small objects are gathered in
//! memory (or came whole with their [`super::probe`]) and are written by
//! one blocking call; larger ones go through the ranged engine in
//! [`super::ranged`]. Either way a GET that breaks resumes
//! from the bytes already received, pinned to the same object version by
//! `If-Match`.
//!
//! Integrity: the size is always checked; the bytes received are checked
//! against the whole-object checksum the store keeps, if any (CRC-64/NVME,
//! which the gateway computes anyway, or a CRC-32C, CRC-32 or OSS CRC-64
//! computed alongside it), and their MD5 against the entity tag when that
//! is a plain MD5 (objects stored in one PUT). Corruption of an object that
//! has either is an error, never a wrong file; an object with neither (a
//! multipart upload by another tool without checksums, or an encrypted one)
//! can only be checked for its size.

use std::fs::File;

use md5::{Digest, Md5};

use super::{
    ObjectInfo, Probed, S3Url, Storage, StorageError, Transfer,
    checksum::Sums,
    fetch::{FetchSpec, Piece, fetch_range},
    verify::{expected_md5, verify},
};

/// Objects up to this size are gathered in memory and written at once.
pub const SMALL_OBJECT: u64 = 1 << 20;

/// Downloads `url` (described by `info`) into `file`, a new empty file
/// opened for reading and writing, reporting to `progress` as it goes.
///
/// The result is verified to have exactly `info.size` bytes, the store's
/// whole-object checksum if it has one, and, for single-part objects, their
/// MD5. On error the partial file is left for the caller, who owns it, to
/// remove.
pub async fn download(
    storage: &Storage,
    url: &S3Url,
    info: &ObjectInfo,
    file: File,
    progress: &mut dyn Progress,
) -> Result<Transfer, StorageError> {
    if info.size > SMALL_OBJECT {
        return super::ranged::download(storage, url, info, file, progress).await;
    }
    let mut gathered = Vec::new();
    if info.size > 0 {
        fetch_range(&FetchSpec::new(storage, url, info), 0, info.size, &mut gathered).await?;
    }
    let transfer = save(url, info, gathered, file, None).await?;
    progress.received(info.size);
    Ok(transfer)
}

/// What a download reports as it goes. Any `FnMut(u64)` is one that
/// takes the bytes received.
pub trait Progress: Send {
    /// Bytes received so far.
    fn received(&mut self, bytes: u64);

    /// The length of the file's prefix written so far, every byte of it as
    /// the store sent it at its offset, from time to time as it grows (a
    /// reader may take those bytes before the download ends; the checksum
    /// of the whole is known only then).
    fn written(&mut self, _prefix: u64) {}
}

impl<F: FnMut(u64) + Send> Progress for F {
    fn received(&mut self, bytes: u64) {
        self(bytes);
    }
}

/// What to do with a downloaded file once its bytes are written and
/// verified (rename it into place, say); blocking.
pub type Complete = Box<dyn FnOnce() -> std::io::Result<()> + Send>;

/// Downloads what [`super::probe`] found into `file`, as [`download`]
/// does, then runs `complete` if given: a small object that came with the
/// probe is written, verified and completed in one blocking call.
pub async fn download_probed(
    storage: &Storage,
    url: &S3Url,
    probed: &Probed,
    file: File,
    progress: &mut dyn Progress,
    complete: Option<Complete>,
) -> Result<Transfer, StorageError> {
    let completed = |e| StorageError::io(format!("the file staged from {url}"), e);
    let Some(body) = &probed.body else {
        let transfer = download(storage, url, &probed.info, file, progress).await?;
        if let Some(complete) = complete {
            tokio::task::spawn_blocking(complete)
                .await
                .map_err(|e| completed(std::io::Error::other(e)))?
                .map_err(completed)?;
        }
        return Ok(transfer);
    };
    let piece = Piece {
        range: 0,
        offset: 0,
        len: body.len(),
        chunks: vec![body.clone()],
    };
    let transfer = save(url, &probed.info, vec![piece], file, complete).await?;
    progress.received(transfer.size);
    Ok(transfer)
}

/// Writes the pieces of a whole small object into `file` in one blocking
/// call, verifies them, and then, if given, runs `complete` in that call.
async fn save(
    url: &S3Url,
    info: &ObjectInfo,
    gathered: Vec<Piece>,
    file: File,
    complete: Option<Complete>,
) -> Result<Transfer, StorageError> {
    let failed = |e| StorageError::io(format!("the file staged from {url}"), std::io::Error::other(e));
    let (url, info) = (url.clone(), info.clone());
    tokio::task::spawn_blocking(move || {
        let written = || {
            let mut sums = Sums::new(info.checksum);
            let mut md5 = expected_md5(&info).is_some().then(Md5::new);
            for piece in &gathered {
                super::ranged::write_all_at(&file, &piece.chunks, piece.offset)?;
                for chunk in &piece.chunks {
                    sums.update(chunk);
                    md5.iter_mut().for_each(|m| m.update(chunk));
                }
            }
            Ok::<_, std::io::Error>((sums.finish(), md5.map(|m| m.finalize().into())))
        };
        let staged = |e| StorageError::io(format!("the file staged from {url}"), e);
        let (sums, md5) = written().map_err(staged)?;
        let transfer = verify(&url, &info, sums, md5)?;
        complete.map_or(Ok(()), |complete| complete()).map_err(staged)?;
        Ok(transfer)
    })
    .await
    .map_err(failed)?
}
