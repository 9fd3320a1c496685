//! The integration tests, one binary (linked once): each module drives the
//! real parts (the `prefab` binary or the library's servers, the embedded
//! S3 store, relays and proxies on loopback) from the outside. `common`
//! is the harness they share.
//!
//! `cargo test --test suite MODULE::` runs one module, e.g. `run::`.

mod common;
mod dev;
mod errors;
mod exec;
mod faults;
mod files;
mod lifecycle;
mod moto;
mod properties;
mod run;
mod seaweedfs;
mod security;
mod stores;
mod streaming;
mod strict;
mod tls;
mod trace;
mod volume;
