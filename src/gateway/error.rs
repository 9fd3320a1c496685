//! The gateway's error type and its one mapping to `tonic::Status`: a
//! message for people, and the standard `google.rpc` details for programs
//! (`ErrorInfo` on every error; `BadRequest`, `RetryInfo`, `QuotaFailure`
//! and `PreconditionFailure` where they apply), so that callers need not
//! parse messages to know which field was wrong or whether to retry.

use std::{collections::HashMap, time::Duration};

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{storage::StorageError, workspace::RequestId};

/// `ErrorInfo.domain` of every error the gateway reports.
pub const DOMAIN: &str = "prefab.dev";
/// How long to wait before retrying what was unavailable.
const RETRY_UNAVAILABLE: Duration = Duration::from_secs(1);
/// How long to wait before retrying a run admission refused.
const RETRY_ADMISSION: Duration = Duration::from_secs(10);
/// Longest text in a detail: the details travel in a trailer, beside the
/// message, and a trailer too big for the client's HTTP/2 header limit
/// would lose the whole status.
const MAX_DETAIL: usize = 1 << 10;

/// Why a run (or a file transfer) failed. Each message names the thing at
/// fault and, where it helps, what to do.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The request is malformed: a bad URL, a missing or mistyped parameter.
    #[error("{message}")]
    InvalidArgument {
        /// The request field at fault, e.g. `calls[0].inputs.text`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// A prefab, function or object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The caller did not say who it is, or not validly.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// A limit was hit; try later or with less.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A dependency (prefab runtime, object storage) cannot be reached.
    #[error("{0}")]
    Unavailable(String),
    /// The caller went away.
    #[error("the run was cancelled")]
    Cancelled,
    /// The replica that ran the run is gone, and the run with it.
    #[error("{0}")]
    Abandoned(String),
    /// The caller's deadline passed.
    #[error("the run passed its deadline of {0:?}; it was cancelled and cleaned up")]
    DeadlineExceeded(std::time::Duration),
    /// The run took longer than the gateway allows any run.
    #[error(
        "the run took longer than the {0:?} this gateway allows a run (PREFAB_MAX_RUN_SECONDS); \
         it was cancelled and cleaned up"
    )]
    TooLong(std::time::Duration),
    /// Object storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The prefab's runtime returned an error; its code is kept, unless it
    /// would blame the caller for the deployment.
    #[error("prefab {prefab} function {function} failed: {message}")]
    Runtime {
        /// `id@version`.
        prefab: String,
        /// The function.
        function: String,
        /// The runtime's status code.
        code: Code,
        /// The runtime's message.
        message: String,
    },
    /// A runtime broke the contract (e.g. reported an output outside its
    /// workspace).
    #[error("prefab {prefab} misbehaved: {message}")]
    Contract {
        /// `id@version`.
        prefab: String,
        /// What it did wrong.
        message: String,
    },
    /// The deployment does not fit (user and group ids on the workspace
    /// volume, mounts): for the operator to fix, not the caller.
    #[error("{0}")]
    Deployment(String),
    /// A local failure of the gateway itself.
    #[error("internal error: {0}")]
    Internal(String),
}

impl GatewayError {
    /// The request's `field` is wrong: `message` says how.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The gRPC code this error is reported with.
    pub fn code(&self) -> Code {
        match self {
            GatewayError::InvalidArgument { .. } => Code::InvalidArgument,
            GatewayError::NotFound(_) => Code::NotFound,
            GatewayError::Unauthenticated(_) => Code::Unauthenticated,
            GatewayError::PermissionDenied(_) => Code::PermissionDenied,
            GatewayError::ResourceExhausted(_) => Code::ResourceExhausted,
            GatewayError::Unavailable(_) => Code::Unavailable,
            GatewayError::Cancelled => Code::Cancelled,
            GatewayError::Abandoned(_) => Code::Aborted,
            GatewayError::DeadlineExceeded(_) | GatewayError::TooLong(_) => Code::DeadlineExceeded,
            GatewayError::Storage(s) => match s {
                StorageError::NotFound { .. } => Code::NotFound,
                StorageError::AccessDenied { .. } => Code::PermissionDenied,
                StorageError::Unavailable { .. } => Code::Unavailable,
                StorageError::Rejected { .. } | StorageError::Unsupported { .. } => Code::FailedPrecondition,
                StorageError::Integrity { .. } => Code::DataLoss,
                StorageError::Io { .. } => Code::Internal,
            },
            GatewayError::Runtime { code, .. } => match code {
                // A transport failure between gateway and runtime.
                Code::Unavailable => Code::Unavailable,
                Code::Ok => Code::Unknown,
                // About what the gateway sent (a workspace the runtime
                // cannot see, a function it lacks) or the function's own
                // credentials, not the caller's: a deployment to fix.
                Code::NotFound | Code::Unauthenticated | Code::PermissionDenied | Code::Unimplemented => {
                    Code::FailedPrecondition
                }
                c => *c,
            },
            GatewayError::Contract { .. } | GatewayError::Deployment(_) => Code::FailedPrecondition,
            GatewayError::Internal(_) => Code::Internal,
        }
    }

    /// `ErrorInfo.reason`: why, as a constant a program can match.
    pub fn reason(&self) -> &'static str {
        match self {
            GatewayError::InvalidArgument { .. } => "INVALID_REQUEST",
            GatewayError::NotFound(_) => "NOT_FOUND",
            GatewayError::Unauthenticated(_) => "UNAUTHENTICATED",
            GatewayError::PermissionDenied(_) => "NOT_ALLOWED",
            GatewayError::ResourceExhausted(_) => "ADMISSION_REFUSED",
            GatewayError::Unavailable(_) => "UNAVAILABLE",
            GatewayError::Cancelled => "CANCELLED",
            GatewayError::Abandoned(_) => "RUN_ABANDONED",
            GatewayError::DeadlineExceeded(_) => "DEADLINE_EXCEEDED",
            GatewayError::TooLong(_) => "RUN_TOO_LONG",
            GatewayError::Storage(s) => match s {
                StorageError::NotFound { .. } => "OBJECT_NOT_FOUND",
                StorageError::AccessDenied { .. } => "STORE_ACCESS_DENIED",
                StorageError::Unavailable { .. } => "STORE_UNAVAILABLE",
                StorageError::Rejected { .. } => "STORE_REJECTED",
                StorageError::Unsupported { .. } => "STORE_UNSUPPORTED",
                StorageError::Integrity { .. } => "INTEGRITY",
                StorageError::Io { .. } => "LOCAL_IO",
            },
            GatewayError::Runtime { .. } => "PREFAB_FAILED",
            GatewayError::Contract { .. } => "PREFAB_MISBEHAVED",
            GatewayError::Deployment(_) => "DEPLOYMENT",
            GatewayError::Internal(_) => "INTERNAL",
        }
    }

    /// The status of this error, with its details; `request_id` names the
    /// run in its `ErrorInfo` once there is one.
    pub fn status(&self, request_id: Option<RequestId>) -> Status {
        let code = self.code();
        let message = self.to_string();
        let detail = |text: &str| crate::proto::clip_middle(text, MAX_DETAIL).into_owned();
        let mut metadata = HashMap::new();
        if let Some(id) = request_id {
            metadata.insert("request_id".to_owned(), id.to_string());
        }
        let mut details = ErrorDetails::new();
        match self {
            GatewayError::InvalidArgument { field, message } => {
                details.add_bad_request_violation(detail(field), detail(message));
            }
            GatewayError::ResourceExhausted(why) => {
                details.add_quota_failure_violation("workspace admission", detail(why));
            }
            GatewayError::Storage(s) => {
                let url = match s {
                    StorageError::NotFound { url, .. }
                    | StorageError::AccessDenied { url, .. }
                    | StorageError::Unavailable { url, .. }
                    | StorageError::Rejected { url, .. }
                    | StorageError::Unsupported { url, .. }
                    | StorageError::Integrity { url, .. } => Some(url),
                    StorageError::Io { .. } => None,
                };
                if let Some(url) = url {
                    metadata.insert("url".to_owned(), url.clone());
                    if let Some(bucket) = url.strip_prefix("s3://").and_then(|rest| rest.split('/').next()) {
                        metadata.insert("bucket".to_owned(), bucket.to_owned());
                    }
                }
            }
            GatewayError::Runtime { prefab, function, .. } => {
                metadata.insert("prefab".to_owned(), prefab.clone());
                metadata.insert("function".to_owned(), function.clone());
            }
            GatewayError::Contract { prefab, .. } => {
                metadata.insert("prefab".to_owned(), prefab.clone());
            }
            _ => {}
        }
        match code {
            Code::FailedPrecondition => {
                let (kind, subject) = match self {
                    GatewayError::Runtime { prefab, .. } | GatewayError::Contract { prefab, .. } => {
                        ("PREFAB", prefab.clone())
                    }
                    GatewayError::Storage(_) => ("STORE", metadata.get("url").cloned().unwrap_or_default()),
                    _ => ("DEPLOYMENT", "gateway".to_owned()),
                };
                details.add_precondition_failure_violation(kind, subject, detail(&message));
            }
            Code::Unavailable => {
                details.set_retry_info(Some(RETRY_UNAVAILABLE));
            }
            Code::ResourceExhausted => {
                details.set_retry_info(Some(RETRY_ADMISSION));
            }
            _ => {}
        }
        details.set_error_info(self.reason(), DOMAIN, metadata);
        let message = crate::proto::clip_middle(&message, crate::proto::MAX_STATUS_MESSAGE);
        Status::with_error_details(code, message, details)
    }
}

impl From<GatewayError> for Status {
    fn from(e: GatewayError) -> Self {
        e.status(None)
    }
}
