//! The shared volume as both sides see it: a workspace is named by a
//! [`RequestId`] handle, never by a path, and everything inside it is
//! reached through [`RelPath`] and descriptor-based, no-follow opens
//! ([`DirFd`], [`open_regular`]). [`access`] is who may use a workspace:
//! one shared group, whatever the user ids of the gateway and the prefabs.
//!
//! A runtime resolves the handle it is sent under its own mount of the
//! volume ([`Volume::resolve`]); the gateway makes, fills and removes the
//! workspaces with the same primitives.

pub mod access;
mod confine;
mod fd;
pub mod watermark;

use std::{
    fmt,
    path::{Path, PathBuf},
};

pub use confine::{RelPath, RelPathError, open_regular};
pub use fd::{Cached, DirFd, TMP_SUFFIX, open_replaced, read_cached_at, tmp_name};
use uuid::Uuid;

/// Name of the folder staged inputs go to.
pub const INPUTS: &str = "inputs";
/// Name of the folder functions write outputs to.
pub const OUTPUTS: &str = "outputs";

/// A request id: a random UUID in canonical lower-case hyphenated form. It is
/// the workspace handle, the folder name and the output prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId(Uuid);

/// Why a workspace handle was refused.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// Not a canonical UUID.
    #[error("workspace handle {0:?} is not a request id (a lower-case UUID)")]
    Malformed(String),
    /// No such workspace under the root.
    #[error(
        "workspace {0} does not exist on this volume; is the workspace volume mounted at the same path as the gateway's?"
    )]
    Missing(RequestId),
    /// The handle names something that is not a plain folder.
    #[error("workspace {0} is not a directory")]
    NotADirectory(RequestId),
    /// Checking the workspace failed.
    #[error("workspace {id}: {source}")]
    Io {
        /// The workspace.
        id: RequestId,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl RequestId {
    /// A fresh random request id.
    pub fn new() -> Self {
        Self(Uuid::new_v4())
    }

    /// Parses a handle; only the canonical form is accepted, so that one
    /// request has exactly one spelling.
    pub fn parse(s: &str) -> Result<Self, HandleError> {
        let malformed = || HandleError::Malformed(s.chars().take(64).collect());
        let id = Uuid::try_parse(s).map_err(|_| malformed())?;
        if id.hyphenated().to_string() != s {
            return Err(malformed());
        }
        Ok(Self(id))
    }
}

impl Default for RequestId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// The folder holding every workspace, as a runtime mounts it.
#[derive(Debug, Clone)]
pub struct Volume(PathBuf);

impl Volume {
    /// The volume mounted at `path`, which must be a folder.
    pub fn new(path: impl AsRef<Path>) -> std::io::Result<Self> {
        std::fs::create_dir_all(path.as_ref())?;
        Ok(Self(std::fs::canonicalize(path)?))
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Resolves a handle received over the network to its folder, which
    /// must exist and be a real directory (not a symlink).
    pub async fn resolve(&self, handle: &str) -> Result<PathBuf, HandleError> {
        let id = RequestId::parse(handle)?;
        let dir = self.0.join(id.to_string());
        match tokio::fs::symlink_metadata(&dir).await {
            Ok(m) if m.is_dir() => Ok(dir),
            Ok(_) => Err(HandleError::NotADirectory(id)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(HandleError::Missing(id)),
            Err(source) => Err(HandleError::Io { id, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_canonical_ids_are_handles() {
        let id = RequestId::new();
        assert_eq!(RequestId::parse(&id.to_string()).unwrap(), id);
        for bad in [
            "..",
            "/etc",
            "",
            "../../x",
            &id.to_string().to_uppercase(),
            &format!("{{{id}}}"),
            &id.0.simple().to_string(),
            &format!("{id}/.."),
        ] {
            assert!(RequestId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[tokio::test]
    async fn resolve_refuses_symlinks_and_strangers() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Volume::new(tmp.path().join("ws")).unwrap();
        let id = RequestId::new();
        std::os::unix::fs::symlink(tmp.path(), root.path().join(id.to_string())).unwrap();
        assert!(matches!(
            root.resolve(&id.to_string()).await,
            Err(HandleError::NotADirectory(_))
        ));
        assert!(matches!(root.resolve("..").await, Err(HandleError::Malformed(_))));
        let other = RequestId::new().to_string();
        assert!(matches!(root.resolve(&other).await, Err(HandleError::Missing(_))));
    }
}
