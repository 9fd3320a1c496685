//! The all-in-one local mode: an embedded S3-compatible store, a workspace
//! folder, the gateway and the example prefab in one process.

pub mod s3;
