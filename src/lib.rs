//! Prefab Gateway: run file-processing functions ("prefabs") on files in
//! S3-compatible storage, with each run's inputs staged onto a shared volume.
//!
//! # Layout
//!
//! - [`gateway`]: the `prefab.v1.Gateway` service and everything a run is
//!   on the gateway's side: planning the calls, admission, staging,
//!   invoking, collecting, the journal that `Run` and `Watch` stream.
//! - [`storage`]: the store as a value ([`storage::Storage`]: client, retry
//!   policy, budgets, aborts owed) and the transfer engine between objects
//!   and local files.
//! - [`workspace`]: the shared volume on the gateway's side: per-run
//!   folders named by request id, made, filled and removed; run records and
//!   leases every replica reads, and the janitor.
//! - [`runtime`]: the runtimes built into the binary (the exec runtime that
//!   wraps any program, and [`prefabs`], the example) on the SDK.
//! - The `prefab-sdk` crate (`crates/prefab-sdk`): what prefab authors
//!   build on and both sides share: the runtime's proto, [`manifest`], the
//!   workspace handle and confinement primitives, secrets, the trace
//!   context, [`server`] (health, reflection). It builds none of the
//!   gateway's dependencies (S3, clap, metrics).
//! - [`proto`], [`tls`], [`telemetry`], [`metrics`]: the gateway's wire
//!   contract (with the runtime's, re-exported), TLS settings, trace
//!   export, Prometheus.
//! - [`cli`], [`config`], [`dev`], [`deploy`]: the `prefab` binary, its
//!   settings, `prefab dev` (everything on loopback) and the Kubernetes
//!   manifests it renders.
//!
//! # How a run flows
//!
//! `Gateway::run` checks each call against its prefab's manifest
//! (`gateway::plan`, fetched and cached through the registry), then at once
//! probes every input in the store and makes the run's workspace, input
//! files and lease file (`stage::probe_all`, `run::prepare`), and admits the
//! run against the volume's space under the volume-wide lock. The run then
//! belongs to `run::Run`: per call it stages the inputs (`storage`
//! downloads into the prepared files) or hands over earlier calls' files,
//! invokes the runtime with the workspace handle (`gateway::invoke`, the
//! runtime side in `prefab-sdk`), uploads the output files
//! (`gateway::collect`), and streams every step to the journal. At the end
//! the workspace leaves its handle and is removed in the background, and
//! the run's record on the volume says how it ended.

#![warn(missing_docs)]

pub mod cli;
pub mod config;
pub mod deploy;
pub mod dev;
pub mod gateway;
pub mod metrics;
pub mod prefabs;
pub mod proto;
pub mod runtime;
pub mod storage;
pub mod telemetry;
pub mod tls;
pub mod workspace;

pub use prefab_sdk::{manifest, server};
