//! Who may use a workspace. The gateway and every prefab pod mount one
//! volume, each under its own user id; what they share is one group, the
//! workspace group (the gateway's primary group, or `PREFAB_WORKSPACE_GID`).
//! Every folder in a workspace is group-owned, group-writable and setgid
//! ([`DIR_MODE`], so what is made inside inherits the group), staged inputs
//! are group-readable ([`INPUT_MODE`]), outputs group-writable
//! ([`OUTPUT_MODE`]), and nothing is world-readable. Modes are set
//! explicitly after creation, so a process's umask cannot narrow them.
//!
//! When access is refused anyway, [`explain_denied`] says which folder
//! refused whom and what to set, since that is a deployment to fix, not a
//! request to change.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use rustix::process::{Gid, getegid, geteuid, getgroups};

/// Mode of every folder in a workspace: `rwxrws---`.
pub const DIR_MODE: u32 = 0o2770;
/// Mode of a staged input: `rw-r-----`.
pub const INPUT_MODE: u32 = 0o640;
/// Mode of an output a runtime creates: `rw-rw----`.
pub const OUTPUT_MODE: u32 = 0o660;
/// The umask of programs the exec runtime starts: whatever they create is
/// group-writable and hidden from others.
pub const PROGRAM_UMASK: u32 = 0o007;

/// This process's user and groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Effective user id.
    pub uid: u32,
    /// Effective (primary) group id.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl Identity {
    /// The identity of this process.
    pub fn current() -> Self {
        let groups = getgroups().unwrap_or_default();
        Self {
            uid: geteuid().as_raw(),
            gid: getegid().as_raw(),
            groups: groups.into_iter().map(Gid::as_raw).collect(),
        }
    }

    /// Whether files may be given to group `gid` by this process (it is
    /// root, or the group is its primary or a supplementary one).
    pub fn may_use_group(&self, gid: u32) -> bool {
        self.uid == 0 || self.gid == gid || self.groups.contains(&gid)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid {}, gid {}", self.uid, self.gid)?;
        let extra: Vec<String> = self
            .groups
            .iter()
            .filter(|g| **g != self.gid)
            .map(u32::to_string)
            .collect();
        if !extra.is_empty() {
            write!(f, ", groups {}", extra.join(","))?;
        }
        Ok(())
    }
}

/// Whether `e` is a refusal by file permissions.
pub fn is_denied(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::PermissionDenied
}

/// Explains a permission error met while `doing` something at `path`: the
/// nearest folder on the way that this process can see, with its owner,
/// group and mode, this process's ids, and what to set. Blocking (it stats
/// the path): call it where blocking is allowed.
pub fn explain_denied(doing: &str, path: &Path) -> String {
    let me = Identity::current();
    let seen = nearest_visible(path);
    let (at, owner) = match &seen {
        Some((at, meta)) => {
            use std::os::unix::fs::MetadataExt;
            (
                at.display().to_string(),
                format!(
                    "owned by uid {} gid {} with mode {:04o}",
                    meta.uid(),
                    meta.gid(),
                    meta.mode() & 0o7777
                ),
            )
        }
        None => (path.display().to_string(), "not visible at all".to_owned()),
    };
    let group = seen
        .as_ref()
        .map(|(_, m)| std::os::unix::fs::MetadataExt::gid(m).to_string())
        .unwrap_or_else(|| "of the workspace volume".to_owned());
    format!(
        "{doing} {}: permission denied to this process ({me}); {at} is {owner}. Every pod that mounts \
         the workspace volume must have the workspace group {group} among its groups (runAsGroup, \
         fsGroup or supplementalGroups in its securityContext; `prefab deploy render --workspace-gid`), and \
         every workspace folder must be group-writable",
        path.display()
    )
}

/// The deepest of `path` and its ancestors whose metadata this process can
/// read, with that metadata.
fn nearest_visible(path: &Path) -> Option<(PathBuf, std::fs::Metadata)> {
    path.ancestors()
        .find_map(|p| std::fs::symlink_metadata(p).ok().map(|m| (p.to_owned(), m)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_explanation_names_the_folder_its_mode_and_the_ids() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o2750)).unwrap();
        let text = explain_denied("cannot read input \"text\" at", &tmp.path().join("a/b"));
        let me = Identity::current();
        assert!(text.contains(&me.to_string()), "{text}");
        assert!(text.contains("mode 2750"), "{text}");
        assert!(text.contains(&tmp.path().display().to_string()), "{text}");
        assert!(text.contains("supplementalGroups"), "{text}");
    }

    #[test]
    fn identities_say_which_groups_they_may_use() {
        let me = Identity {
            uid: 1000,
            gid: 1000,
            groups: vec![1000, 65532],
        };
        assert!(me.may_use_group(65532) && me.may_use_group(1000) && !me.may_use_group(5));
        assert_eq!(me.to_string(), "uid 1000, gid 1000, groups 65532");
        let root = Identity {
            uid: 0,
            gid: 0,
            groups: vec![],
        };
        assert!(root.may_use_group(5));
    }
}
