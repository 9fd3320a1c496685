//! Errors of object-storage operations, classified by what the caller can do.

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};

/// What went wrong talking to object storage. Every variant names the object
/// and the operation; none carries credentials.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The object or bucket does not exist.
    #[error("{url} was not found ({op})")]
    NotFound {
        /// The object.
        url: String,
        /// The operation, e.g. "HeadObject".
        op: &'static str,
    },
    /// The store refused the credentials or the access.
    #[error("access to {url} was denied ({op}): check the gateway's S3 credentials and the bucket policy")]
    AccessDenied {
        /// The object.
        url: String,
        /// The operation.
        op: &'static str,
    },
    /// A transient failure: network, timeout, throttling or a 5xx. Worth a retry.
    #[error("object storage is unavailable for {url} ({op}): {detail}")]
    Unavailable {
        /// The object.
        url: String,
        /// The operation.
        op: &'static str,
        /// What the transport or store said.
        detail: String,
    },
    /// The store answered with an error that retrying will not fix.
    #[error("object storage refused {op} on {url}: {detail}")]
    Rejected {
        /// The object.
        url: String,
        /// The operation.
        op: &'static str,
        /// What the store said.
        detail: String,
    },
    /// The store refused the request for a header or encoding it does not
    /// support (see [`super::compat`]).
    #[error(
        "object storage refused {op} on {url} for a header it does not support: {detail}; set S3_CHECKSUM=md5 (or auto) for this store"
    )]
    Unsupported {
        /// The object.
        url: String,
        /// The operation.
        op: &'static str,
        /// What the store said.
        detail: String,
    },
    /// The bytes received do not match what the store promised.
    #[error("integrity check failed for {url}: {detail}")]
    Integrity {
        /// The object.
        url: String,
        /// What did not match.
        detail: String,
    },
    /// A local file could not be read or written.
    #[error("local file error on {path}: {source}")]
    Io {
        /// The local path.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl StorageError {
    /// Classifies an SDK error of `op` on `url`.
    pub fn from_sdk<E>(url: impl ToString, op: &'static str, err: SdkError<E, HttpResponse>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let url = url.to_string();
        let status = match &err {
            SdkError::ServiceError(e) => Some(e.raw().status().as_u16()),
            _ => None,
        };
        match &err {
            SdkError::ServiceError(se) => {
                let e = se.err();
                let code = e.code().unwrap_or_default();
                let detail = match e.message() {
                    Some(m) => format!("{code}: {m}"),
                    None if code.is_empty() => format!("HTTP {}", status.unwrap_or_default()),
                    None => code.to_owned(),
                };
                let message = e.message().unwrap_or_default();
                let status = status.unwrap_or_default();
                if super::compat::refuses_checksum_headers(status, code, message, op) {
                    return Self::Unsupported { url, op, detail };
                }
                match (status, code) {
                    // A 403 too, but no matter of credentials.
                    (_, "InvalidObjectState") => Self::Rejected {
                        url,
                        op,
                        detail: format!("{detail} (the object is archived: restore it first)"),
                    },
                    (404, _) | (_, "NoSuchKey" | "NoSuchBucket" | "NotFound") => Self::NotFound { url, op },
                    (401 | 403, _) | (_, "AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch") => {
                        Self::AccessDenied { url, op }
                    }
                    (408 | 429 | 500..=599, _) | (_, "SlowDown" | "RequestTimeout") => {
                        Self::Unavailable { url, op, detail }
                    }
                    _ => Self::Rejected { url, op, detail },
                }
            }
            // The request's body failed: a local file that changed while
            // it was uploaded. Sending it again will not help.
            SdkError::DispatchFailure(d) if d.is_user() => Self::Io {
                path: url,
                source: std::io::Error::other(error_chain(&err)),
            },
            SdkError::ConstructionFailure(_) => Self::Rejected {
                url,
                op,
                detail: error_chain(&err),
            },
            _ => Self::Unavailable {
                url,
                op,
                detail: error_chain(&err),
            },
        }
    }

    /// Whether retrying the operation may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }

    /// The error that ends a transfer whose retries ran out: how long they
    /// lasted and, if known, how far the transfer got.
    pub fn gave_up(self, retried: std::time::Duration, bytes_done: Option<u64>) -> Self {
        let Self::Unavailable { url, op, detail } = self else {
            return self;
        };
        let at = bytes_done.map(|n| format!(" at byte {n}")).unwrap_or_default();
        let detail = format!(
            "retried for {:.1} s without progress{at} (PREFAB_S3_RETRY_SECONDS), the last attempt: {detail}",
            retried.as_secs_f64()
        );
        Self::Unavailable { url, op, detail }
    }

    /// Wraps a local I/O error on `path`.
    pub fn io(path: impl std::fmt::Display, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_string(),
            source,
        }
    }
}

/// Renders an error and its sources on one line.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
