//! Bearer-token authentication and per-token scopes, as a tonic interceptor
//! at the edge. Tokens are compared as SHA-256 digests in constant time, so
//! neither a token's bytes nor its length leak through timing; the token
//! file is reloaded when it changes. Health and reflection need no token.
//!
//! The token file has one token per line, optionally followed by scopes:
//!
//! ```text
//! # token                scopes (none: everything)
//! 3f8a...e1              run:hello-world-prefab run:gzip
//! 9b2c...77              files
//! 51d0...0a              run:* files
//! ```

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status};

use super::GatewayError;

/// What a token may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    run_any: bool,
    run: HashSet<String>,
    files: bool,
}

impl Grant {
    /// Everything (a token without scopes, or `--no-auth`).
    pub fn all() -> Self {
        Self {
            run_any: true,
            run: HashSet::new(),
            files: true,
        }
    }

    /// Whether the token may run prefab `id`.
    pub fn may_run(&self, id: &str) -> bool {
        self.run_any || self.run.contains(id)
    }

    /// Whether the token may use `PutFile` and `GetFile`.
    pub fn may_move_files(&self) -> bool {
        self.files
    }

    /// The grant a request was authenticated with.
    pub fn of<T>(req: &Request<T>) -> Grant {
        req.extensions()
            .get::<Grant>()
            .cloned()
            .unwrap_or_else(Grant::all)
    }
}

type Entries = Arc<Vec<([u8; 32], Grant)>>;

/// The accepted tokens, reloadable.
#[derive(Clone)]
pub struct Tokens {
    entries: Arc<RwLock<Entries>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} configured)", self.current().len())
    }
}

impl Tokens {
    /// Loads tokens from a file. An empty file is an error: it would lock
    /// everyone out.
    pub fn load(path: &Path) -> Result<Self, String> {
        let entries = read(path)?;
        Ok(Self {
            entries: Arc::new(RwLock::new(Arc::new(entries))),
        })
    }

    /// Parses tokens from text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let entries = parse(text)?;
        Ok(Self {
            entries: Arc::new(RwLock::new(Arc::new(entries))),
        })
    }

    fn current(&self) -> Entries {
        Arc::clone(&self.entries.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The grant of `token`, if it is one of ours. Every configured token is
    /// compared, so the time taken does not depend on which one matched.
    pub fn grant(&self, token: &str) -> Option<Grant> {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for (digest, grant) in self.current().iter() {
            if bool::from(digest.ct_eq(&presented)) {
                found = Some(grant.clone());
            }
        }
        found
    }

    /// Checks the `authorization: Bearer <token>` metadata of a request.
    pub fn check<T>(&self, req: &Request<T>) -> Result<Grant, Status> {
        let refuse = |why: &str| Status::from(GatewayError::Unauthenticated(why.to_owned()));
        let header = req.metadata().get("authorization").ok_or_else(|| {
            refuse("missing authorization metadata: send \"authorization: Bearer <token>\"")
        })?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
            .ok_or_else(|| refuse("authorization metadata must be \"Bearer <token>\""))?;
        self.grant(token.trim())
            .ok_or_else(|| refuse("the bearer token is not valid"))
    }

    /// Reloads the file at `path` whenever it changes, checking every
    /// `every`; a file that fails to parse keeps the previous tokens.
    pub fn reload_on_change(&self, path: PathBuf, every: Duration, shutdown: CancellationToken) {
        let tokens = self.clone();
        tokio::spawn(async move {
            async fn stamp(p: &Path) -> Option<(Option<SystemTime>, u64)> {
                tokio::fs::metadata(p)
                    .await
                    .ok()
                    .map(|m| (m.modified().ok(), m.len()))
            }
            let mut seen = stamp(&path).await;
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = shutdown.cancelled() => return,
                }
                let now = stamp(&path).await;
                if now == seen {
                    continue;
                }
                seen = now;
                let file = path.clone();
                let parsed = tokio::task::spawn_blocking(move || read(&file))
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()));
                match parsed {
                    Ok(entries) => {
                        let count = entries.len();
                        *tokens.entries.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(entries);
                        tracing::info!(tokens = count, "reloaded PREFAB_AUTH_TOKENS_FILE");
                    }
                    Err(e) => tracing::error!(error = %e, "kept the previous tokens"),
                }
            }
        });
    }
}

fn read(path: &Path) -> Result<Vec<([u8; 32], Grant)>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read PREFAB_AUTH_TOKENS_FILE {}: {e}", path.display()))?;
    let entries = parse(&text).map_err(|e| format!("PREFAB_AUTH_TOKENS_FILE {}: {e}", path.display()))?;
    if entries.is_empty() {
        return Err(format!(
            "PREFAB_AUTH_TOKENS_FILE {} holds no tokens; add one per line or run with --no-auth",
            path.display()
        ));
    }
    Ok(entries)
}

fn parse(text: &str) -> Result<Vec<([u8; 32], Grant)>, String> {
    let mut entries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let mut fields = line.split_whitespace();
        let Some(token) = fields.next().filter(|t| !t.starts_with('#')) else {
            continue;
        };
        let scopes: Vec<&str> = fields.take_while(|f| !f.starts_with('#')).collect();
        let grant = if scopes.is_empty() {
            Grant::all()
        } else {
            let mut g = Grant {
                run_any: false,
                run: HashSet::new(),
                files: false,
            };
            for scope in scopes {
                match scope {
                    "files" => g.files = true,
                    "run:*" => g.run_any = true,
                    s if s.starts_with("run:") && crate::manifest::is_dns_label(&s[4..]) => {
                        g.run.insert(s[4..].to_owned());
                    }
                    // Say where, never what the token is.
                    other => {
                        return Err(format!(
                            "line {}: unknown scope {other:?} (use run:<prefab-id>, run:* or files)",
                            n + 1
                        ));
                    }
                }
            }
            g
        };
        entries.push((Sha256::digest(token.as_bytes()).into(), grant));
    }
    Ok(entries)
}

/// The interceptor: checks the token and attaches its [`Grant`]; with
/// `None`, every call passes with every right (`--no-auth`).
pub fn interceptor(tokens: Option<Tokens>) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut req: Request<()>| {
        if let Some(tokens) = &tokens {
            let grant = tokens.check(&req)?;
            req.extensions_mut().insert(grant);
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_listed_tokens_with_their_scopes() {
        let t = Tokens::parse("# ops\nalpha\n\n  beta run:gzip files # comment\ngamma run:*\n").unwrap();
        assert_eq!(t.grant("alpha"), Some(Grant::all()));
        let beta = t.grant("beta").unwrap();
        assert!(beta.may_run("gzip") && !beta.may_run("hello") && beta.may_move_files());
        let gamma = t.grant("gamma").unwrap();
        assert!(gamma.may_run("anything") && !gamma.may_move_files());
        assert!(t.grant("alph").is_none() && t.grant("").is_none() && t.grant("# ops").is_none());
        let mut req = Request::new(());
        assert_eq!(t.check(&req).unwrap_err().code(), tonic::Code::Unauthenticated);
        req.metadata_mut()
            .insert("authorization", "Bearer beta".parse().unwrap());
        assert!(t.check(&req).is_ok());
        req.metadata_mut()
            .insert("authorization", "Basic beta".parse().unwrap());
        assert!(t.check(&req).is_err());
    }

    #[test]
    fn bad_scopes_are_reported_without_the_token() {
        let err = Tokens::parse("s3cret-value run:Bad_Name").unwrap_err();
        assert!(err.contains("line 1") && !err.contains("s3cret-value"), "{err}");
    }

    #[test]
    fn debug_does_not_print_tokens() {
        assert_eq!(
            format!("{:?}", Tokens::parse("s3cret").unwrap()),
            "Tokens(1 configured)"
        );
    }
}
