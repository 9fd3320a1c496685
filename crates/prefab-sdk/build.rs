//! Compiles the runtime's contract, `proto/prefab/v1/runtime.proto` of the
//! workspace, with the pure-Rust `protox` compiler (no system `protoc`), and
//! writes the descriptor set that server reflection serves.

use std::{env, fs, path::PathBuf};

const PROTO_DIR: &str = "../../proto";
const RUNTIME: &str = "prefab/v1/runtime.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_DIR}/{RUNTIME}");
    let descriptors = protox::compile([RUNTIME], [PROTO_DIR])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("runtime_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .bytes(".prefab.v1")
        .compile_fds(descriptors)?;
    Ok(())
}
