//! `hello-world-prefab` 1.0.0: small functions that exercise every part of
//! the runtime contract (file inputs and outputs, progress, logs,
//! cancellation and failure). It uses only the public SDK, as a prefab
//! author's crate would.

use std::time::Duration;

use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use prefab_sdk::{
    Invocation, Outputs, Prefab, PrefabError,
    manifest::{FunctionSpec, Manifest, Param, ParamKind},
    proto::LogStream,
};

/// Read buffer size.
const CHUNK: usize = 1 << 20;
/// Bytes hashed between progress reports.
const PROGRESS_EVERY: u64 = 4 << 20;

/// The example prefab.
#[derive(Debug, Default, Clone, Copy)]
pub struct Hello;

/// Its id.
pub const ID: &str = "hello-world-prefab";
/// Its version.
pub const VERSION: &str = "1.0.0";

impl Prefab for Hello {
    fn manifest(&self) -> Manifest {
        use ParamKind::*;
        let text = || Param::new("text", InputFile).describe("A text file");
        Manifest {
            id: ID.into(),
            version: VERSION.into(),
            description: "Example prefab: counts, transforms and hashes files".into(),
            functions: vec![
                FunctionSpec::new("word_count", "Count words, lines and bytes of a text file")
                    .param(text().streaming())
                    .output(Param::new("words", Number))
                    .output(Param::new("lines", Number))
                    .output(Param::new("bytes", Number)),
                FunctionSpec::new("uppercase", "Upper-case the ASCII letters of a text file")
                    .param(text())
                    .param(Param::new("output", OutputFile).extension("txt")),
                FunctionSpec::new("sha256", "SHA-256 of a file")
                    .param(Param::new("file", InputFile).streaming())
                    .output(Param::new("sha256", String)),
                FunctionSpec::new("sleep", "Sleep, reporting progress every second")
                    .param(Param::new("seconds", Number))
                    .output(Param::new("slept", Number)),
                FunctionSpec::new("fail", "Fail with the given message").param(Param::new("message", String)),
            ],
        }
    }

    async fn invoke(&self, call: Invocation) -> Result<Outputs, PrefabError> {
        match call.function() {
            "word_count" => word_count(&call).await,
            "uppercase" => uppercase(&call).await,
            "sha256" => sha256(&call).await,
            "sleep" => sleep(&call).await,
            "fail" => Err(PrefabError::Failed(call.str_arg("message")?.to_owned())),
            other => Err(PrefabError::InvalidArgument(format!("no function {other}"))),
        }
    }
}

fn outputs(value: serde_json::Value) -> Outputs {
    match value {
        serde_json::Value::Object(map) => map,
        _ => Outputs::new(),
    }
}

async fn word_count(call: &Invocation) -> Result<Outputs, PrefabError> {
    let mut input = call.open_input("text").await?;
    let (mut words, mut lines, mut bytes) = (0u64, 0u64, 0u64);
    let mut in_word = false;
    while let Some(chunk) = input.chunk().await? {
        call.check_cancelled()?;
        bytes += chunk.len() as u64;
        for &b in &chunk[..] {
            lines += u64::from(b == b'\n');
            let space = b.is_ascii_whitespace();
            words += u64::from(in_word && space);
            in_word = !space;
        }
    }
    words += u64::from(in_word);
    call.log(
        LogStream::Stdout,
        format!("{words} words, {lines} lines, {bytes} bytes"),
    )
    .await;
    Ok(outputs(json!({ "words": words, "lines": lines, "bytes": bytes })))
}

async fn uppercase(call: &Invocation) -> Result<Outputs, PrefabError> {
    let mut input = tokio::fs::File::open(call.input("text")?).await?;
    let total = input.metadata().await?.len().max(1);
    let mut output = call.create_output("output").await?;
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    loop {
        call.check_cancelled()?;
        let n = input.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        buf[..n].make_ascii_uppercase();
        output.write_all(&buf[..n]).await?;
        done += n as u64;
        call.progress(done as f64 / total as f64, "upper-casing").await;
    }
    output.flush().await?;
    Ok(Outputs::new())
}

async fn sha256(call: &Invocation) -> Result<Outputs, PrefabError> {
    let mut input = call.open_input("file").await?;
    let mut hasher = Sha256::new();
    let (mut done, mut reported) = (0u64, 0u64);
    while let Some(chunk) = input.chunk().await? {
        call.check_cancelled()?;
        hasher.update(&chunk);
        done += chunk.len() as u64;
        if done - reported >= PROGRESS_EVERY {
            reported = done;
            let total = input.size().unwrap_or(done).max(1);
            call.progress(done as f64 / total as f64, "hashing").await;
        }
    }
    Ok(outputs(json!({ "sha256": hex::encode(hasher.finalize()) })))
}

async fn sleep(call: &Invocation) -> Result<Outputs, PrefabError> {
    let seconds = call.number_arg("seconds")?;
    if !(0.0..=86_400.0).contains(&seconds) {
        return Err(PrefabError::InvalidArgument(
            "seconds must be between 0 and 86400".into(),
        ));
    }
    let whole = seconds.ceil() as u64;
    for s in 0..whole {
        call.progress(s as f64 / seconds, format!("slept {s} of {seconds} s"))
            .await;
        let step = Duration::from_secs_f64((seconds - s as f64).min(1.0));
        tokio::select! {
            () = tokio::time::sleep(step) => {}
            () = call.cancellation().cancelled() => {
                call.log(LogStream::Stderr, format!("sleep cancelled after {s} s")).await;
                return Err(PrefabError::Cancelled);
            }
        }
    }
    Ok(outputs(json!({ "slept": seconds })))
}
