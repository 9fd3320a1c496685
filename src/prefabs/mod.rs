//! Example prefabs built only on the public [`crate::runtime`] SDK.

pub mod hello;
