//! Secrets for prefabs: the files of `PREFAB_SECRETS_DIR/<prefab_id>/`
//! (a mounted Kubernetes Secret), read at each call and sent only to that
//! prefab's runtime. The gateway never logs them, and masks them in what
//! the runtime says (log lines, progress, errors) before passing it on.

use std::{collections::HashMap, path::Path};

/// Reads the secrets of `prefab_id`; a missing folder means none.
pub async fn for_prefab(dir: Option<&Path>, prefab_id: &str) -> std::io::Result<HashMap<String, String>> {
    let mut secrets = HashMap::new();
    let Some(dir) = dir else { return Ok(secrets) };
    let folder = dir.join(prefab_id);
    let mut entries = match tokio::fs::read_dir(&folder).await {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(secrets),
        Err(e) => return Err(e),
    };
    while let Some(entry) = entries.next_entry().await? {
        let name = entry.file_name().to_string_lossy().into_owned();
        // Kubernetes keeps its bookkeeping in dot-files; names must also be
        // usable as environment variables.
        if !is_env_name(&name) || !tokio::fs::metadata(entry.path()).await?.is_file() {
            continue;
        }
        let mut value = tokio::fs::read_to_string(entry.path()).await?;
        if value.ends_with('\n') {
            value.pop();
            if value.ends_with('\r') {
                value.pop();
            }
        }
        secrets.insert(name, value);
    }
    Ok(secrets)
}

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 128
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_only_the_prefabs_own_folder() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("a/..data")).unwrap();
        std::fs::create_dir_all(tmp.path().join("b")).unwrap();
        std::fs::write(tmp.path().join("a/API_KEY"), "k-a\n").unwrap();
        std::fs::write(tmp.path().join("a/not-an-env-name"), "x").unwrap();
        std::fs::write(tmp.path().join("b/API_KEY"), "k-b").unwrap();
        let a = for_prefab(Some(tmp.path()), "a").await.unwrap();
        assert_eq!(a, HashMap::from([("API_KEY".to_owned(), "k-a".to_owned())]));
        assert!(for_prefab(Some(tmp.path()), "c").await.unwrap().is_empty());
        assert!(for_prefab(None, "a").await.unwrap().is_empty());
    }
}
