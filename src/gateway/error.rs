//! The gateway's error type and its one mapping to `tonic::Status`.

use tonic::{Code, Status};

use crate::storage::StorageError;

/// Why a run (or a file transfer) failed. Each message names the thing at
/// fault and, where it helps, what to do.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The request is malformed: a bad URL, a missing or mistyped parameter.
    #[error("{0}")]
    InvalidArgument(String),
    /// A prefab, function or object does not exist.
    #[error("{0}")]
    NotFound(String),
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
    /// The gRPC code this error is reported with.
    pub fn code(&self) -> Code {
        match self {
            GatewayError::InvalidArgument(_) => Code::InvalidArgument,
            GatewayError::NotFound(_) => Code::NotFound,
            GatewayError::PermissionDenied(_) => Code::PermissionDenied,
            GatewayError::ResourceExhausted(_) => Code::ResourceExhausted,
            GatewayError::Unavailable(_) => Code::Unavailable,
            GatewayError::Cancelled => Code::Cancelled,
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
}

impl From<GatewayError> for Status {
    fn from(e: GatewayError) -> Self {
        crate::proto::status(e.code(), &e.to_string())
    }
}
