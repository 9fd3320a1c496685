//! Prefab Gateway: run file-processing functions ("prefabs") on files in
//! S3-compatible storage, with each run's inputs staged onto a shared volume.
//!
//! The modules follow the life of a run: [`gateway`] accepts it, [`storage`]
//! moves the bytes, [`workspace`] owns the folder on the shared volume, and
//! [`runtime`] is what prefab authors implement.

#![warn(missing_docs)]

pub mod cli;
pub mod config;
pub mod deploy;
pub mod dev;
pub mod gateway;
pub mod manifest;
pub mod metrics;
pub mod prefabs;
pub mod proto;
pub mod runtime;
pub mod server;
pub mod storage;
pub mod telemetry;
pub mod tls;
pub mod workspace;
