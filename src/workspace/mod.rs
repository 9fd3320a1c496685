//! Per-request workspaces on the shared volume, on the gateway's side:
//! `<root>/<request_id>/` with `inputs/` and `outputs/`, made, filled and
//! removed here. What the gateway and the runtimes share (the handle
//! [`RequestId`], [`RelPath`], the descriptor-based no-follow opens of
//! [`DirFd`], and [`access`]: who may use a workspace, one shared group
//! whatever the user ids) is the SDK's [`prefab_sdk::workspace`],
//! re-exported here. [`lease`] and [`record`] are what every gateway
//! replica knows of each run (owner, expiry, reservation, journal), and
//! [`janitor`] removes what nobody owns.

pub mod janitor;
pub mod lease;
pub mod record;

use std::path::{Path, PathBuf};

pub use prefab_sdk::workspace::{
    DirFd, HandleError, INPUTS, OUTPUTS, RelPath, RelPathError, RequestId, TMP_SUFFIX, access, open_regular,
    open_replaced, tmp_name, watermark,
};
use watermark::{Watermark, part_name};

/// The folder holding every workspace.
#[derive(Debug, Clone)]
pub struct WorkspaceRoot {
    path: PathBuf,
    group: Option<u32>,
}

impl WorkspaceRoot {
    /// Opens (creating if needed) the root folder.
    pub fn new(path: impl AsRef<Path>) -> std::io::Result<Self> {
        std::fs::create_dir_all(path.as_ref())?;
        Ok(Self {
            path: std::fs::canonicalize(path)?,
            group: None,
        })
    }

    /// Gives the workspaces created from now on to the group `gid` (see
    /// [`access`]); without it they get the creator's group, or the root
    /// folder's if that is setgid.
    pub fn with_group(mut self, gid: u32) -> Self {
        self.group = Some(gid);
        self
    }

    /// The root folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates the workspace of `id`; fails if it already exists. Its
    /// folders belong to the workspace group with [`access::DIR_MODE`]. The
    /// folder is opened once, and the gateway's writes go through that
    /// descriptor (see [`DirFd`]).
    pub async fn create(&self, id: RequestId) -> std::io::Result<Workspace> {
        let root = self.clone();
        tokio::task::spawn_blocking(move || root.create_blocking(id))
            .await
            .map_err(std::io::Error::other)?
    }

    /// [`WorkspaceRoot::create`], blocking.
    pub fn create_blocking(&self, id: RequestId) -> std::io::Result<Workspace> {
        let dir = self.path.join(id.to_string());
        let fd = DirFd::open(&self.path)?.create_dir(&id.to_string(), self.group, access::DIR_MODE)?;
        // From here on a failure leaves a folder half made (its group
        // refused, say): dropping the workspace removes it.
        let workspace = Workspace {
            id,
            dir,
            fd: std::sync::Arc::new(fd),
            removed: false,
        };
        workspace.fd.subdir(&[INPUTS])?;
        workspace.fd.subdir(&[OUTPUTS])?;
        Ok(workspace)
    }
}

/// A live workspace. Dropping it removes its folder in the background;
/// [`Workspace::remove`] removes it and waits.
#[derive(Debug)]
pub struct Workspace {
    id: RequestId,
    dir: PathBuf,
    fd: std::sync::Arc<DirFd>,
    removed: bool,
}

impl Workspace {
    /// The request id naming this workspace.
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// The workspace folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The open workspace folder, for writing inside it safely.
    pub fn fd(&self) -> std::sync::Arc<DirFd> {
        std::sync::Arc::clone(&self.fd)
    }

    /// Makes the input file at `rel` (`inputs/<call>/<name>`, as the
    /// planner builds it) ready to be staged: its folders, and the new,
    /// empty `<name>.part`, which [`PartTarget::complete`] renames once
    /// complete. Blocking.
    pub fn create_input(&self, rel: &RelPath) -> std::io::Result<PartFile> {
        let (folders, name) = rel.split_last();
        let dir = self.fd.subdir(&folders)?;
        let file = dir.create_new(&part_name(name), access::INPUT_MODE)?;
        Ok(PartFile {
            file,
            target: PartTarget {
                dir,
                name: name.to_owned(),
            },
        })
    }

    /// Gives the file at `from` (workspace-relative, a regular file, opened
    /// following no link) a second name `to` in the workspace, making its
    /// folders: a hard link to the very file opened (see
    /// [`DirFd::link_or_copy`]), so no byte moves; on a volume that cannot
    /// link it there, a copy made by the kernel. With
    /// `release`, the name `from` is removed afterwards (the space goes
    /// with the last name). Returns the file's size.
    pub async fn hand_over(&self, from: RelPath, to: RelPath, release: bool) -> std::io::Result<u64> {
        let fd = self.fd();
        tokio::task::spawn_blocking(move || {
            let (source, size) = fd.open_regular(&from)?;
            let (source_folders, source_name) = from.split_last();
            let source_dir = fd.subdir_path_existing(&source_folders)?.ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotFound, format!("{from} is gone"))
            })?;
            let (folders, name) = to.split_last();
            let target = fd.subdir(&folders)?;
            target.link_or_copy(&source_dir, source_name, &source, name, access::INPUT_MODE)?;
            if release {
                source_dir.remove_file(source_name)?;
            }
            Ok(size)
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// Removes the files at `rels` (workspace-relative), if they are there.
    pub async fn remove_files(&self, rels: Vec<RelPath>) -> std::io::Result<()> {
        let fd = self.fd();
        tokio::task::spawn_blocking(move || {
            for rel in rels {
                let (folders, name) = rel.split_last();
                if let Some(dir) = fd.subdir_path_existing(&folders)? {
                    dir.remove_file(name)?;
                }
            }
            Ok(())
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// Removes the folder and everything in it, and waits for that. It is
    /// first renamed aside (see [`REMOVING_PREFIX`]), so that a runtime
    /// still writing into it by path writes nowhere; a few attempts then
    /// cover writers that hold it open. What is left after that is the
    /// janitor's.
    pub async fn remove(self) -> std::io::Result<()> {
        match self.set_aside().await? {
            Some(aside) => remove_aside(aside).await,
            None => Ok(()),
        }
    }

    /// Removes the folder as [`Workspace::remove`] does, in a task on
    /// `tasks` (which a gateway's shutdown waits for; after a crash, the
    /// janitor finishes it), instrumented with `span`: the end of a run
    /// waits for no disk work.
    pub fn remove_later(self, tasks: &tokio_util::task::TaskTracker, span: tracing::Span) {
        let dir = self.dir.clone();
        let removal = async move {
            if let Err(e) = self.remove().await {
                tracing::error!(dir = %dir.display(), error = %e, "could not remove the workspace");
            }
        };
        tasks.spawn(tracing::Instrument::instrument(removal, span));
    }

    /// Renames the folder aside; where it is now, `None` if it was gone.
    async fn set_aside(mut self) -> std::io::Result<Option<PathBuf>> {
        self.removed = true;
        let aside = self.dir.with_file_name(format!("{REMOVING_PREFIX}{}", self.id));
        match tokio::fs::rename(&self.dir, &aside).await {
            Ok(()) => Ok(Some(aside)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(_) => Ok(Some(self.dir.clone())),
        }
    }
}

/// An input file made ready for staging (see [`Workspace::create_input`]).
#[derive(Debug)]
pub struct PartFile {
    /// The open, empty `<name>.part` to write the bytes to.
    pub file: std::fs::File,
    /// Where it goes once complete.
    pub target: PartTarget,
}

/// The final name of an input file being staged.
#[derive(Debug)]
pub struct PartTarget {
    dir: DirFd,
    name: String,
}

impl PartTarget {
    /// Renames `<name>.part` to `<name>`: the input is complete, and only
    /// now visible to a function under its name. Blocking.
    pub fn complete(&self) -> std::io::Result<()> {
        self.dir.rename(&part_name(&self.name), &self.name)
    }

    /// Tells a function reading the input while it is staged how far
    /// staging has come (see [`watermark`]). Blocking.
    pub fn publish(&self, mark: &Watermark) -> std::io::Result<()> {
        mark.publish(&self.dir, &self.name)
    }
}

/// Removes a workspace set aside, with a few attempts for writers that
/// still hold it open.
async fn remove_aside(dir: PathBuf) -> std::io::Result<()> {
    let mut attempt = 0;
    loop {
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if attempt >= 10 => return Err(e),
            Err(_) => attempt += 1,
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Workspaces being removed are first renamed to this prefix and their
/// request id; the janitor removes any it finds.
pub const REMOVING_PREFIX: &str = ".removing-";

impl Drop for Workspace {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        let dir = std::mem::take(&mut self.dir);
        let aside = dir.with_file_name(format!("{REMOVING_PREFIX}{}", self.id));
        let remove = move || {
            let dir = match std::fs::rename(&dir, &aside) {
                Ok(()) => aside,
                Err(_) => dir,
            };
            if let Err(e) = std::fs::remove_dir_all(&dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::error!(dir = %dir.display(), error = %e, "could not remove workspace");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(remove)),
            Err(_) => remove(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn workspace_is_removed_on_drop_and_on_remove() {
        let tmp = tempfile::tempdir().unwrap();
        let root = WorkspaceRoot::new(tmp.path()).unwrap();
        let ws = root.create(RequestId::new()).await.unwrap();
        let dir = ws.dir().to_owned();
        assert!(dir.join(INPUTS).is_dir() && dir.join(OUTPUTS).is_dir());
        ws.remove().await.unwrap();
        assert!(!dir.exists());

        let ws = root.create(RequestId::new()).await.unwrap();
        let dir = ws.dir().to_owned();
        drop(ws);
        for _ in 0..100 {
            if !dir.exists() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("workspace survived its guard");
    }
}
