//! Compiles `proto/` with the pure-Rust `protox` compiler (no system `protoc`)
//! and writes the descriptor set that server reflection serves.

use std::{env, fs, path::PathBuf};

const PROTOS: &[&str] = &["prefab/v1/runtime.proto", "prefab/v1/gateway.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("prefab_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .bytes(".prefab.v1")
        .compile_fds(descriptors)?;
    Ok(())
}
