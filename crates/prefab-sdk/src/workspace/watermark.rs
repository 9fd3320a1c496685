//! How far a streamed input is staged: the file both sides agree on.
//!
//! A function may declare that it reads an input front to back
//! ([`crate::manifest::Param::streaming`]); the gateway then calls it as soon
//! as that input's staging has started. The bytes go to `<name>.part`, as
//! for every input, renamed to `<name>` once complete and verified; beside
//! it, `<name>.watermark` holds one line saying how many bytes from the
//! start are on the volume ([`Watermark`]). It is replaced whole (a new file
//! renamed over the old one), so a reader never sees half a line, and on
//! NFS a reader that opens it anew sees the latest (close-to-open). Readers
//! poll it: inotify does not cross hosts.
//!
//! On a volume that does not share one page cache between its hosts (NFS
//! and the other network file systems), the gateway writes the data back
//! before it moves the watermark, and a reader opens the data file anew
//! each time the watermark moves, so it never reads stale pages.

use std::fmt;

use super::{DirFd, access::INPUT_MODE};

/// The suffix of the watermark file beside a streamed input.
pub const WATERMARK_SUFFIX: &str = ".watermark";

/// The suffix of an input file while it is being staged.
pub const PART_SUFFIX: &str = ".part";

/// The name of the watermark file of input file `name`.
pub fn watermark_name(name: &str) -> String {
    format!("{name}{WATERMARK_SUFFIX}")
}

/// The name input file `name` has while it is being staged.
pub fn part_name(name: &str) -> String {
    format!("{name}{PART_SUFFIX}")
}

/// How far the staging of a streamed input has come.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Watermark {
    /// The first `written` bytes of `size` are on the volume, in
    /// `<name>.part`, each arrived whole at its offset; the file's checksum
    /// is checked when all have.
    Staging {
        /// Bytes from the start on the volume.
        written: u64,
        /// The object's size.
        size: u64,
    },
    /// All `size` bytes are on the volume and verified, under the file's
    /// final name.
    Complete {
        /// The file's size.
        size: u64,
    },
    /// Staging failed; the file will never be complete, and the call fails.
    Failed {
        /// Why, on one line.
        reason: String,
    },
}

impl fmt::Display for Watermark {
    /// The line written to the watermark file.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Staging { written, size } => writeln!(f, "staging {written} {size}"),
            Self::Complete { size } => writeln!(f, "complete {size}"),
            Self::Failed { reason } => {
                let line: String = reason
                    .chars()
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .collect();
                writeln!(f, "failed {line}")
            }
        }
    }
}

impl std::str::FromStr for Watermark {
    type Err = std::io::Error;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || {
            let shown: String = text.chars().take(80).collect();
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unreadable watermark {shown:?}"),
            )
        };
        let line = text.strip_suffix('\n').ok_or_else(bad)?;
        let (state, rest) = line.split_once(' ').ok_or_else(bad)?;
        let numbers = |rest: &str| -> Result<Vec<u64>, Self::Err> {
            rest.split(' ').map(|n| n.parse().map_err(|_| bad())).collect()
        };
        match state {
            "staging" => match numbers(rest)?[..] {
                [written, size] if written <= size => Ok(Self::Staging { written, size }),
                _ => Err(bad()),
            },
            "complete" => match numbers(rest)?[..] {
                [size] => Ok(Self::Complete { size }),
                _ => Err(bad()),
            },
            "failed" => Ok(Self::Failed {
                reason: rest.to_owned(),
            }),
            _ => Err(bad()),
        }
    }
}

impl Watermark {
    /// Writes `self` as the watermark of input file `name` in `dir`,
    /// replacing the last one in one rename. Blocking.
    pub fn publish(&self, dir: &DirFd, name: &str) -> std::io::Result<()> {
        dir.replace_with_mode(&watermark_name(name), self.to_string().as_bytes(), INPUT_MODE)
    }

    /// The watermark of input file `name` in `dir`; `None` if it has none
    /// (it was not streamed). Blocking.
    pub fn read(dir: &DirFd, name: &str) -> std::io::Result<Option<Self>> {
        dir.open_file(&watermark_name(name))?
            .map(Self::read_from)
            .transpose()
    }

    /// The watermark of input file `name` in `dir`, which should have one:
    /// as [`Watermark::read`], but one being replaced as it is looked up is
    /// looked up again (see [`super::open_replaced`]). Blocking.
    pub fn read_expected(dir: &DirFd, name: &str) -> std::io::Result<Option<Self>> {
        super::open_replaced(dir, std::path::Path::new(&watermark_name(name)))?
            .map(Self::read_from)
            .transpose()
    }

    fn read_from(mut file: std::fs::File) -> std::io::Result<Self> {
        let mut text = String::with_capacity(64);
        std::io::Read::read_to_string(&mut std::io::Read::take(&mut file, 4096), &mut text)?;
        text.parse()
    }
}

/// Whether every process that opens `file` reads it through this host's
/// page cache, so bytes written are visible to them at once: true for the
/// local file systems, false for NFS and anything not known.
pub fn shares_page_cache(file: &impl std::os::fd::AsFd) -> bool {
    /// `f_type` of ext2/3/4, XFS, Btrfs, tmpfs, overlayfs, ZFS and F2FS.
    const LOCAL: [u64; 7] = [
        0xEF53,
        0x5846_5342,
        0x9123_683E,
        0x0102_1994,
        0x794C_7630,
        0x2FC1_2FC1,
        0xF2F5_2010,
    ];
    rustix::fs::fstatfs(file).is_ok_and(|s| LOCAL.contains(&(s.f_type as u64)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermarks_read_back_as_written() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DirFd::open(tmp.path()).unwrap();
        assert_eq!(Watermark::read(&dir, "x.bin").unwrap(), None);
        for mark in [
            Watermark::Staging { written: 0, size: 10 },
            Watermark::Staging {
                written: 4096,
                size: 1 << 40,
            },
            Watermark::Complete { size: 10 },
            Watermark::Failed {
                reason: "checksum mismatch:\nCRC differs".into(),
            },
        ] {
            mark.publish(&dir, "x.bin").unwrap();
            let read = Watermark::read(&dir, "x.bin").unwrap().unwrap();
            match mark {
                Watermark::Failed { .. } => assert_eq!(
                    read,
                    Watermark::Failed {
                        reason: "checksum mismatch: CRC differs".into()
                    }
                ),
                mark => assert_eq!(read, mark),
            }
        }
        // No temporary file is left; the reader of another uid may read it.
        let mut names: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["x.bin.watermark"]);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(tmp.path().join("x.bin.watermark"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, INPUT_MODE);
    }

    #[test]
    fn a_damaged_watermark_is_an_error_not_a_guess() {
        for bad in [
            "",
            "staging 5 4\n",
            "staging 5\n",
            "staging -1 4\n",
            "complete\n",
            "complete 4",
            "done 4\n",
        ] {
            assert!(bad.parse::<Watermark>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn only_known_local_file_systems_share_their_page_cache() {
        let dir = std::fs::File::open("/proc/self").unwrap();
        assert!(!shares_page_cache(&dir), "procfs is no local disk");
    }
}
