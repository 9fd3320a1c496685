//! Example prefabs built only on the public API of `prefab-sdk`.

pub mod hello;
