//! Compiles `proto/` with the pure-Rust `protox` compiler (no system `protoc`)
//! and writes the descriptor set that server reflection serves; names the
//! git revision for `prefab --version`.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

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
    println!("cargo:rustc-env=PREFAB_GIT_REVISION={}", git_revision());
    Ok(())
}

/// The revision being built: `PREFAB_GIT_REVISION` if set (an image build,
/// whose context has no `.git`), else git's short hash, else "unknown".
fn git_revision() -> String {
    println!("cargo:rerun-if-env-changed=PREFAB_GIT_REVISION");
    if let Some(revision) = env::var("PREFAB_GIT_REVISION").ok().filter(|r| !r.is_empty()) {
        return revision;
    }
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    // Built again when HEAD moves: HEAD itself and the branch it names,
    // loose or packed (cargo would rerun every build for a missing file).
    let branch = git(&["symbolic-ref", "-q", "HEAD"]);
    for name in ["HEAD", "packed-refs"].into_iter().chain(branch.as_deref()) {
        if let Some(file) = git(&["rev-parse", "--git-path", name]).filter(|f| Path::new(f).exists()) {
            println!("cargo:rerun-if-changed={file}");
        }
    }
    git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into())
}
