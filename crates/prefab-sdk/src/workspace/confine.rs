//! Confinement inside a workspace: [`RelPath`] accepts only plain relative
//! paths, and [`open_regular`] walks them one descriptor at a time with
//! `O_NOFOLLOW`, so a symlink anywhere on the way, or one swapped in after a
//! check, is refused rather than followed.

use std::{fmt, fs::File, os::fd::OwnedFd, path::Path};

use rustix::fs::{FileType, Mode, OFlags};

/// Longest accepted relative path, in bytes.
const MAX_LEN: usize = 1024;
/// Most components in a relative path.
const MAX_DEPTH: usize = 16;

/// A workspace-relative path such as `outputs/0/result.txt`: non-empty
/// components of `[A-Za-z0-9._-]`, none starting with `.`, no leading `/`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RelPath(String);

/// Why a relative path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("path {path:?} is not allowed: {reason}")]
pub struct RelPathError {
    path: String,
    reason: &'static str,
}

impl RelPath {
    /// Parses a relative path received from the network or a prefab.
    pub fn parse(s: &str) -> Result<Self, RelPathError> {
        let err = |reason| RelPathError {
            path: s.chars().take(128).collect(),
            reason,
        };
        if s.is_empty() || s.len() > MAX_LEN {
            return Err(err("it must have 1 to 1024 bytes"));
        }
        if s.starts_with('/') {
            return Err(err("it must be relative to the workspace"));
        }
        let parts: Vec<&str> = s.split('/').collect();
        if parts.len() > MAX_DEPTH {
            return Err(err("it is nested too deeply"));
        }
        for part in parts {
            if part.is_empty() || part.starts_with('.') {
                return Err(err("components must be non-empty and must not start with '.'"));
            }
            let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
            if !part.chars().all(ok) {
                return Err(err("only letters, digits, '.', '_' and '-' are allowed"));
            }
        }
        Ok(Self(s.to_owned()))
    }

    /// The path as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the path lies inside the top-level folder `dir`.
    pub fn is_inside(&self, dir: &str) -> bool {
        self.0.strip_prefix(dir).is_some_and(|rest| rest.starts_with('/'))
    }

    /// The components, in order.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// The folders on the way, and the last component.
    pub fn split_last(&self) -> (Vec<&str>, &str) {
        let mut parts: Vec<&str> = self.components().collect();
        let last = parts.pop().expect("a RelPath has at least one component");
        (parts, last)
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Opens `rel` below the directory `base` for reading, following no symlink
/// on the way, and checks that it is a regular file. Returns the open file
/// and its size. Blocking: call it from `spawn_blocking`.
pub fn open_regular(base: &Path, rel: &RelPath) -> std::io::Result<(File, u64)> {
    let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    open_regular_below(rustix::fs::open(base, dir_flags, Mode::empty())?, rel)
}

/// [`open_regular`] from the open folder `dir` (which it consumes).
pub(super) fn open_regular_below(mut dir: OwnedFd, rel: &RelPath) -> std::io::Result<(File, u64)> {
    let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let parts: Vec<&str> = rel.components().collect();
    let (last, parents) = parts.split_last().expect("a RelPath has at least one component");
    let refuse = |what: &str| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{rel} is not a regular file inside the workspace ({what})"),
        )
    };
    let explain = |e: rustix::io::Errno| match e {
        rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => {
            refuse("a symbolic link or not a folder on the way")
        }
        rustix::io::Errno::NOENT => {
            std::io::Error::new(std::io::ErrorKind::NotFound, format!("{rel} does not exist"))
        }
        e => std::io::Error::from(e),
    };
    for part in parents {
        dir = rustix::fs::openat(&dir, *part, dir_flags, Mode::empty()).map_err(explain)?;
    }
    // NONBLOCK: opening a FIFO must not wait for a writer.
    let file_flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
    let fd = rustix::fs::openat(&dir, *last, file_flags, Mode::empty()).map_err(explain)?;
    let stat = rustix::fs::fstat(&fd)?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
        return Err(refuse("a FIFO, device, socket or folder"));
    }
    Ok((File::from(fd), stat.st_size as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn rel_paths_refuse_escapes() {
        assert!(RelPath::parse("outputs/0/a.txt").unwrap().is_inside("outputs"));
        assert!(!RelPath::parse("outputsx/a").unwrap().is_inside("outputs"));
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "outputs/../../etc/passwd",
            "outputs/./a",
            "outputs//a",
            "outputs/a/",
            "outputs/.hidden",
            "outputs/a b",
            "outputs\\..\\x",
            "outputs/a\0b",
        ] {
            assert!(RelPath::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn open_regular_refuses_links_and_special_files() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path();
        std::fs::create_dir_all(base.join("outputs/d")).unwrap();
        std::fs::write(base.join("outputs/ok.txt"), b"hello").unwrap();
        std::fs::write(tmp.path().join("secret"), b"x").unwrap();
        symlink(base.join("secret"), base.join("outputs/link")).unwrap();
        symlink(base.join("outputs/d"), base.join("outputs/dirlink")).unwrap();
        std::fs::write(base.join("outputs/d/f"), b"y").unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            base.join("outputs/fifo"),
            FileType::Fifo,
            Mode::RUSR | Mode::WUSR,
            0,
        )
        .unwrap();

        let open = |p: &str| open_regular(base, &RelPath::parse(p).unwrap());
        let (_, size) = open("outputs/ok.txt").unwrap();
        assert_eq!(size, 5);
        assert!(open("outputs/d/f").is_ok());
        for bad in [
            "outputs/link",
            "outputs/dirlink/f",
            "outputs/fifo",
            "outputs/d",
            "outputs/missing",
        ] {
            let err = open(bad).unwrap_err();
            assert!(
                err.to_string().contains(bad.split('/').next().unwrap()),
                "{bad}: {err}"
            );
        }
    }
}
