//! Bearer-token authentication for the Gateway service, as a tonic
//! interceptor at the edge. Tokens are compared as SHA-256 digests in
//! constant time, so neither a token's bytes nor its length leak through
//! timing. Health and reflection are served without it.

use std::{path::Path, sync::Arc};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{Request, Status};

/// The accepted tokens.
#[derive(Clone)]
pub struct Tokens {
    digests: Arc<Vec<[u8; 32]>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} configured)", self.digests.len())
    }
}

impl Tokens {
    /// Loads tokens from a file, one per line; blank lines and `#` comments
    /// are skipped. An empty file is an error: it would lock everyone out.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read PREFAB_AUTH_TOKENS_FILE {}: {e}", path.display()))?;
        let tokens = Self::from_lines(&text);
        if tokens.digests.is_empty() {
            return Err(format!(
                "PREFAB_AUTH_TOKENS_FILE {} holds no tokens; add one per line or run with --no-auth",
                path.display()
            ));
        }
        Ok(tokens)
    }

    /// Parses tokens from text.
    pub fn from_lines(text: &str) -> Self {
        let digests = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|t| Sha256::digest(t.as_bytes()).into())
            .collect();
        Self {
            digests: Arc::new(digests),
        }
    }

    /// Whether `token` is one of ours. Every configured token is compared,
    /// so the time taken does not depend on which one matched.
    pub fn accepts(&self, token: &str) -> bool {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.digests
            .iter()
            .fold(subtle::Choice::from(0), |found, d| found | d.ct_eq(&presented))
            .into()
    }

    /// Checks the `authorization: Bearer <token>` metadata of a request.
    pub fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let header = req.metadata().get("authorization").ok_or_else(|| {
            Status::unauthenticated("missing authorization metadata: send \"authorization: Bearer <token>\"")
        })?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
            .ok_or_else(|| Status::unauthenticated("authorization metadata must be \"Bearer <token>\""))?;
        if self.accepts(token.trim()) {
            Ok(())
        } else {
            Err(Status::unauthenticated("the bearer token is not valid"))
        }
    }
}

/// The interceptor: with `None`, every call passes (`--no-auth`).
pub fn interceptor(tokens: Option<Tokens>) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |req: Request<()>| {
        if let Some(tokens) = &tokens {
            tokens.check(&req)?;
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_listed_tokens() {
        let t = Tokens::from_lines("# ops\nalpha\n\n  beta  \n");
        assert!(t.accepts("alpha") && t.accepts("beta"));
        assert!(!t.accepts("alph") && !t.accepts("") && !t.accepts("# ops"));
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
    fn debug_does_not_print_tokens() {
        assert_eq!(
            format!("{:?}", Tokens::from_lines("s3cret")),
            "Tokens(1 configured)"
        );
    }
}
