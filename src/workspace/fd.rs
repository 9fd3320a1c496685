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

/// An open workspace folder.
#[derive(Debug)]
pub struct DirFd(OwnedFd);

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
    /// without following symlinks.
    pub fn subdir(&self, dirs: &[&str]) -> std::io::Result<DirFd> {
        let mut fd = rustix::io::dup(&self.0)?;
        for name in dirs {
            match rustix::fs::mkdirat(&fd, *name, Mode::from_raw_mode(0o755)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
            fd = rustix::fs::openat(&fd, *name, DIR_FLAGS, Mode::empty()).map_err(|e| refuse(name, e))?;
        }
        Ok(DirFd(fd))
    }

    /// Creates the new file `name` in this folder for reading and writing;
    /// fails if anything (a symlink included) already has that name.
    pub fn create_new(&self, name: &str) -> std::io::Result<File> {
        let flags = OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&self.0, name, flags, Mode::from_raw_mode(0o644))
            .map_err(|e| refuse(name, e))?;
        Ok(File::from(fd))
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
    pub fn replace(&self, name: &str, contents: &[u8]) -> std::io::Result<()> {
        let tmp = format!("{name}.tmp");
        match rustix::fs::unlinkat(&self.0, tmp.as_str(), AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(e) => return Err(e.into()),
        }
        let mut file = self.create_new(&tmp)?;
        std::io::Write::write_all(&mut file, contents)?;
        // Network file systems may report a full volume only here.
        file.sync_all()?;
        self.rename(&tmp, name)
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
        assert!(real.create_new("x.part").is_err());
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
