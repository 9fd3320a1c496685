//! Writing inside a workspace through a directory descriptor opened once,
//! when the workspace is created: every folder on the way is opened with
//! `O_NOFOLLOW`, files are created with `O_EXCL`, and renames stay inside
//! the folder's descriptor. A symlink that a prefab (or anyone with the
//! shared volume) plants or swaps in is refused, never followed, and moving
//! the workspace's path away does not redirect the gateway's writes.

use std::{fs::File, os::fd::OwnedFd, path::Path};

use rustix::{
    fs::{AtFlags, Mode, OFlags},
    io::Errno,
};

use super::access::DIR_MODE;

/// Mode of the files [`DirFd::replace`] writes (leases, journals): the
/// gateway's own.
const PRIVATE_MODE: u32 = 0o600;

/// An open workspace folder.
#[derive(Debug)]
pub struct DirFd(OwnedFd);

impl std::os::fd::AsFd for DirFd {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_fd()
    }
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

impl DirFd {
    /// Opens the folder at `path`, which must not be a symlink.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        Ok(Self(rustix::fs::open(path, DIR_FLAGS, Mode::empty())?))
    }

    /// Opens (creating as needed) the sub-folders `dirs` one by one,
    /// without following symlinks. Folders it creates get the shared
    /// workspace mode ([`DIR_MODE`]: group-writable, setgid).
    pub fn subdir(&self, dirs: &[&str]) -> std::io::Result<DirFd> {
        let mut fd = rustix::io::dup(&self.0)?;
        for name in dirs {
            let created = match rustix::fs::mkdirat(&fd, *name, Mode::from_raw_mode(DIR_MODE)) {
                Ok(()) => true,
                Err(Errno::EXIST) => false,
                Err(e) => return Err(e.into()),
            };
            fd = rustix::fs::openat(&fd, *name, DIR_FLAGS, Mode::empty()).map_err(|e| refuse(name, e))?;
            if created {
                // mkdir applies the umask and drops the setgid bit.
                rustix::fs::fchmod(&fd, Mode::from_raw_mode(DIR_MODE))?;
            }
        }
        Ok(DirFd(fd))
    }

    /// Opens the existing sub-folder `name`, following no link; `None` if
    /// there is none.
    pub fn subdir_existing(&self, name: &str) -> std::io::Result<Option<DirFd>> {
        match rustix::fs::openat(&self.0, name, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => Ok(Some(DirFd(fd))),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(refuse(name, e)),
        }
    }

    /// Opens `rel` below this folder for reading, following no link on the
    /// way, and checks that it is a regular file (see
    /// [`super::open_regular`]); returns it and its size.
    pub fn open_regular(&self, rel: &super::RelPath) -> std::io::Result<(File, u64)> {
        super::confine::open_regular_below(rustix::io::dup(&self.0)?, rel)
    }

    /// Opens the existing folders `dirs` below this one, following no
    /// link; `None` if one is missing.
    pub fn subdir_path_existing(&self, dirs: &[&str]) -> std::io::Result<Option<DirFd>> {
        let mut fd = DirFd(rustix::io::dup(&self.0)?);
        for name in dirs {
            match fd.subdir_existing(name)? {
                Some(next) => fd = next,
                None => return Ok(None),
            }
        }
        Ok(Some(fd))
    }

    /// Makes `source` (an open regular file, which is `source_name` in
    /// `source_dir`) also appear here as the new name `name`: a hard link,
    /// checked afterwards to be that very file (same device and inode), so
    /// that a file swapped in under the name meanwhile is never handed on;
    /// where the volume refuses the link (another file system, a link
    /// limit, a policy) or the name no longer is that file, a copy of
    /// `source` made by the kernel, with `mode`.
    ///
    /// (Linking the open file through `/proc/self/fd` would need no check,
    /// but kernels refuse it with EXDEV for a file that has a name, this
    /// machine's among them; `AT_EMPTY_PATH` needs `CAP_DAC_READ_SEARCH`.)
    pub fn link_or_copy(
        &self,
        source_dir: &DirFd,
        source_name: &str,
        source: &File,
        name: &str,
        mode: u32,
    ) -> std::io::Result<()> {
        match rustix::fs::linkat(&source_dir.0, source_name, &self.0, name, AtFlags::empty()) {
            Ok(()) => {
                let linked = rustix::fs::statat(&self.0, name, AtFlags::SYMLINK_NOFOLLOW)?;
                let opened = rustix::fs::fstat(source)?;
                if (linked.st_dev, linked.st_ino) == (opened.st_dev, opened.st_ino) {
                    return Ok(());
                }
                tracing::warn!(name, "the file changed under its name while handed on; copying");
                self.remove_file(name)?;
            }
            Err(Errno::EXIST) => return Err(refuse(name, Errno::EXIST)),
            Err(e) => tracing::debug!(error = %e, name, "cannot link; copying"),
        }
        let mut copy = self.create_new(name, mode)?;
        let mut source = source;
        std::io::copy(&mut source, &mut copy)?;
        Ok(())
    }

    /// Creates the new folder `name` here with `mode`, given to `group`
    /// when one is named, and opens it; fails if anything has that name.
    pub fn create_dir(&self, name: &str, group: Option<u32>, mode: u32) -> std::io::Result<DirFd> {
        rustix::fs::mkdirat(&self.0, name, Mode::from_raw_mode(mode)).map_err(|e| refuse(name, e))?;
        let fd = rustix::fs::openat(&self.0, name, DIR_FLAGS, Mode::empty()).map_err(|e| refuse(name, e))?;
        if let Some(gid) = group {
            let now = rustix::fs::fstat(&fd)?.st_gid;
            if now != gid {
                rustix::fs::fchown(&fd, None, Some(rustix::fs::Gid::from_raw(gid)))?;
            }
        }
        // After the chown, which clears the setgid bit.
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))?;
        Ok(DirFd(fd))
    }

    /// Creates the new file `name` in this folder for reading and writing,
    /// with permissions `mode` whatever the umask; fails if anything (a
    /// symlink included) already has that name.
    pub fn create_new(&self, name: &str, mode: u32) -> std::io::Result<File> {
        let flags = OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&self.0, name, flags, Mode::from_raw_mode(mode))
            .map_err(|e| refuse(name, e))?;
        // The umask takes group and other bits away; the owner's stay.
        if mode & 0o077 != 0 {
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))?;
        }
        Ok(File::from(fd))
    }

    /// Appends `contents` to the regular file `name` (created with `mode`
    /// if missing), and closes it: on a network volume the close is what
    /// makes the bytes visible to other hosts. A write that fails part-way
    /// (a full volume) is cut off again, so the file never ends in half of
    /// what was appended.
    pub fn append(&self, name: &str, contents: &[u8], mode: u32) -> std::io::Result<()> {
        let flags = OFlags::WRONLY | OFlags::APPEND | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&self.0, name, flags, Mode::from_raw_mode(mode))
            .map_err(|e| refuse(name, e))?;
        let file = File::from(fd);
        let before = file.metadata()?;
        if !before.is_file() {
            return Err(refuse(name, Errno::EXIST));
        }
        std::io::Write::write_all(&mut &file, contents).inspect_err(|_| {
            let _ = file.set_len(before.len());
        })
    }

    /// Opens the regular file `name` here for reading, following no link;
    /// `None` if there is none.
    pub fn open_file(&self, name: &str) -> std::io::Result<Option<File>> {
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let file = match rustix::fs::openat(&self.0, name, flags, Mode::empty()) {
            Ok(fd) => File::from(fd),
            // Stale (NFS): the name led to a file that is gone.
            Err(Errno::NOENT | Errno::STALE) => return Ok(None),
            Err(e) => return Err(refuse(name, e)),
        };
        if !file.metadata()?.is_file() {
            return Err(refuse(name, Errno::EXIST));
        }
        Ok(Some(file))
    }

    /// Fails if anything (a symlink included) has the name `name` here.
    pub fn ensure_absent(&self, name: &str) -> std::io::Result<()> {
        match rustix::fs::statat(&self.0, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(_) => Err(refuse(name, Errno::EXIST)),
            Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes `name` atomically: a fresh temporary file renamed over it.
    ///
    /// Not synced: what is written here (leases) matters only while its
    /// writer lives, and the host's crash ends the writer's runs with it.
    /// What readers on other hosts need is the bytes on the volume before
    /// the rename, which an NFS client does on close (close-to-open); so
    /// the close is checked, where a network volume reports a write it
    /// could not store (a full disk, a quota). An fsync here cost each
    /// run about 0.4 ms of its latency.
    pub fn replace(&self, name: &str, contents: &[u8]) -> std::io::Result<()> {
        self.replace_with_mode(name, contents, PRIVATE_MODE)
    }

    /// [`DirFd::replace`], the new file with `mode` (readable by the
    /// workspace group, say).
    pub fn replace_with_mode(&self, name: &str, contents: &[u8], mode: u32) -> std::io::Result<()> {
        let tmp = tmp_name(name);
        self.remove_file(&tmp)?;
        let file = self.create_new(&tmp, mode)?;
        self.fill_and_rename(file, &tmp, name, contents)
    }

    /// Makes the temporary file [`DirFd::replace`] would write `name`
    /// through (`<name>.tmp`), for [`DirFd::fill_and_rename`] later: what
    /// creating a file costs (a volume round trip on NFS, 0.2 ms on this
    /// machine's disk) can then be paid before the moment that matters.
    pub fn create_tmp(&self, name: &str) -> std::io::Result<File> {
        self.create_new(&tmp_name(name), PRIVATE_MODE)
    }

    /// Writes `contents` into `file` (made as `tmp` here), closes it
    /// checking the close, and renames it to `to`.
    pub fn fill_and_rename(
        &self,
        mut file: File,
        tmp: &str,
        to: &str,
        contents: &[u8],
    ) -> std::io::Result<()> {
        std::io::Write::write_all(&mut file, contents)?;
        close_checked(file)?;
        self.rename(tmp, to)
    }

    /// Removes the file `name`; it being gone already is no error.
    pub fn remove_file(&self, name: &str) -> std::io::Result<()> {
        match rustix::fs::unlinkat(&self.0, name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes `contents` over the existing regular file `name`, in place:
    /// needs no new space on a full volume, but a reader may see a partial
    /// write.
    pub fn overwrite(&self, name: &str, contents: &[u8]) -> std::io::Result<()> {
        let flags = OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let file =
            File::from(rustix::fs::openat(&self.0, name, flags, Mode::empty()).map_err(|e| refuse(name, e))?);
        if !file.metadata()?.is_file() {
            return Err(refuse(name, Errno::EXIST));
        }
        std::os::unix::fs::FileExt::write_all_at(&file, contents, 0)?;
        file.set_len(contents.len() as u64)?;
        file.sync_data()
    }

    /// Renames `from` to `to` inside this folder.
    pub fn rename(&self, from: &str, to: &str) -> std::io::Result<()> {
        Ok(rustix::fs::renameat(&self.0, from, &self.0, to)?)
    }
}

/// The temporary name a file `name` is written under before its rename
/// (see [`DirFd::replace`]).
pub fn tmp_name(name: &str) -> String {
    format!("{name}{TMP_SUFFIX}")
}

/// The suffix of [`tmp_name`].
pub const TMP_SUFFIX: &str = ".tmp";

/// Closes `file` and returns what `close(2)` says, which dropping a
/// [`File`] ignores.
fn close_checked(file: File) -> std::io::Result<()> {
    use std::os::fd::IntoRawFd;
    let fd = file.into_raw_fd();
    // SAFETY: `fd` was just taken out of an owned `File`, so it is open and
    // closed here once.
    if unsafe { libc::close(fd) } == 0 {
        return Ok(());
    }
    match std::io::Error::last_os_error() {
        // Linux has closed the descriptor all the same.
        e if e.kind() == std::io::ErrorKind::Interrupted => Ok(()),
        e => Err(e),
    }
}

/// What [`read_cached_at`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cached {
    /// This many bytes (at least one) were in the page cache.
    Read(usize),
    /// Not in the page cache (or interrupted, or past the file's end, or an
    /// error a blocking read will meet again): read it blocking.
    NotCached,
    /// This file system takes no `RWF_NOWAIT` reads (`EOPNOTSUPP`: NFS,
    /// FUSE), or the kernel no `preadv2`: read blocking from now on.
    Unsupported,
}

/// Reads into `buf`, at `offset` in `file`, what the page cache holds, if
/// any, without blocking: `RWF_NOWAIT` returns what is cached and never
/// starts or waits for disk or network I/O (it can still wait briefly for
/// memory, like any allocation). A file just written or read is read so
/// where it is needed, saving a hand-off to a blocking thread.
pub fn read_cached_at(file: &File, buf: &mut [u8], offset: u64) -> Cached {
    let read = rustix::io::preadv2(
        file,
        &mut [std::io::IoSliceMut::new(buf)],
        offset,
        rustix::io::ReadWriteFlags::NOWAIT,
    );
    match read {
        Ok(n) if n > 0 => Cached::Read(n),
        Err(Errno::OPNOTSUPP | Errno::NOSYS) => Cached::Unsupported,
        _ => Cached::NotCached,
    }
}

/// How [`open_replaced`] looks a missing file up again: at once this many
/// times, then after each of these pauses (255 ms in all).
const REPLACED_RETRIES: (usize, [u64; 8]) = (8, [1, 2, 4, 8, 16, 32, 64, 128]);

/// Opens the regular file at `path` (relative to `dir`, following no link)
/// for reading: a file that should be there, which others replace by
/// renaming a new one over it (a lease, a watermark). `None` if there is
/// none. Blocking.
///
/// The rename is atomic, but on FUSE and network volumes an open racing it
/// can find the name gone: the name still led to the file replaced, which
/// is no more (bindfs: 3–6 % of opens racing a rename loop failed with
/// `ENOENT`, mostly once or twice in a row, longer when the renaming
/// process waits for a CPU; NFS reports `ESTALE`). So a missing or stale
/// file is looked up again for a while before it counts as absent: where
/// absence is normal, read the file plainly first and call this only to
/// confirm it.
pub fn open_replaced(dir: impl std::os::fd::AsFd, path: &Path) -> std::io::Result<Option<File>> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let (at_once, pauses) = REPLACED_RETRIES;
    let mut pauses = std::iter::repeat_n(0, at_once).chain(pauses);
    let file = loop {
        match rustix::fs::openat(&dir, path, flags, Mode::empty()) {
            Ok(fd) => break File::from(fd),
            Err(Errno::NOENT | Errno::STALE) => match pauses.next() {
                Some(ms) => std::thread::sleep(std::time::Duration::from_millis(ms)),
                None => return Ok(None),
            },
            Err(e) => return Err(refuse(&path.to_string_lossy(), e)),
        }
    };
    if !file.metadata()?.is_file() {
        return Err(refuse(&path.to_string_lossy(), Errno::EXIST));
    }
    Ok(Some(file))
}

fn refuse(name: &str, e: Errno) -> std::io::Error {
    match e {
        Errno::LOOP | Errno::NOTDIR | Errno::EXIST => std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!(
                "{name:?} in the workspace is a symbolic link or already exists; refusing to write through it"
            ),
        ),
        e => e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_handed_on_as_a_link_to_the_very_file_opened() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = DirFd::open(tmp.path()).unwrap();
        std::fs::write(tmp.path().join("out"), b"checked").unwrap();
        let opened = File::open(tmp.path().join("out")).unwrap();
        dir.link_or_copy(&dir, "out", &opened, "in", 0o640).unwrap();
        let (out, linked) = (
            std::fs::metadata(tmp.path().join("out")).unwrap(),
            std::fs::metadata(tmp.path().join("in")).unwrap(),
        );
        assert_eq!(
            (linked.ino(), linked.nlink()),
            (out.ino(), 2),
            "a hard link, not a copy"
        );

        // A file swapped in under the name after it was opened and checked
        // is not what is handed on: the opened one is, copied.
        std::fs::remove_file(tmp.path().join("out")).unwrap();
        std::fs::write(tmp.path().join("out"), b"planted").unwrap();
        dir.link_or_copy(&dir, "out", &opened, "again", 0o640).unwrap();
        assert_eq!(std::fs::read(tmp.path().join("again")).unwrap(), b"checked");
        let again = std::fs::metadata(tmp.path().join("again")).unwrap();
        assert_eq!(again.nlink(), 1);
    }

    #[test]
    fn planted_symlinks_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let ws = tmp.path().join("ws");
        std::fs::create_dir(&ws).unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let dir = DirFd::open(&ws).unwrap();
        std::os::unix::fs::symlink(&outside, ws.join("inputs")).unwrap();
        assert!(dir.subdir(&["inputs", "1"]).is_err());
        std::fs::create_dir(ws.join("real")).unwrap();
        let real = dir.subdir(&["real", "0"]).unwrap();
        std::os::unix::fs::symlink(outside.join("victim"), ws.join("real/0/x.part")).unwrap();
        assert!(real.create_new("x.part", 0o640).is_err());
        assert!(!outside.join("victim").exists());
        std::os::unix::fs::symlink(outside.join("lease"), ws.join(".lease.tmp")).unwrap();
        dir.replace(".lease", b"{}").unwrap();
        assert!(!outside.join("lease").exists());
        assert_eq!(std::fs::read(ws.join(".lease")).unwrap(), b"{}");
        dir.overwrite(".lease", b"{\"a\":1}").unwrap();
        dir.overwrite(".lease", b"[]").unwrap();
        assert_eq!(std::fs::read(ws.join(".lease")).unwrap(), b"[]");
        std::os::unix::fs::symlink(outside.join("lease"), ws.join("linked")).unwrap();
        assert!(dir.overwrite("linked", b"{}").is_err());
        assert!(!outside.join("lease").exists());
        // Moving the workspace away does not redirect writes.
        std::fs::rename(&ws, tmp.path().join("moved")).unwrap();
        std::os::unix::fs::symlink(&outside, &ws).unwrap();
        dir.replace("after", b"1").unwrap();
        assert!(tmp.path().join("moved/after").exists() && !outside.join("after").exists());
    }
}
