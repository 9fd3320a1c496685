//! The gateway's transfer engine on its own, for benchmarks against other
//! S3 tools: `transfer get s3://b/k FILE`, `transfer put FILE s3://b/k`,
//! `transfer get-many s3://b/prefix/ N DIR`, `transfer put-many DIR s3://b/prefix/`.
//! S3 settings come from the usual environment (S3_ENDPOINT_URL,
//! AWS_ACCESS_KEY_ID, …). Prints one line: bytes or objects, and seconds.

use std::{path::PathBuf, sync::Arc, time::Instant};

use clap::Parser;
use prefab::{config::S3Args, storage};
use tokio::sync::Semaphore;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// A fresh file at `path` for a download (replacing any old one).
async fn create(path: PathBuf) -> std::io::Result<std::fs::File> {
    let open = move || {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
    };
    tokio::task::spawn_blocking(open).await?
}

/// A file to upload, and its size.
async fn open(path: PathBuf) -> std::io::Result<(std::fs::File, u64)> {
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(path)?;
        let size = file.metadata()?.len();
        Ok((file, size))
    })
    .await?
}

/// Objects moved at once by the *-many commands.
const MANY_IN_FLIGHT: usize = 64;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    s3: S3Args,
    /// get | put | get-many | put-many
    op: String,
    /// Arguments of the operation.
    args: Vec<String>,
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    prefab::storage::keep_freed_buffers();
    let cli = Cli::parse();
    let client = storage::connect(&cli.s3.settings())?;
    let started = Instant::now();
    let report = match (cli.op.as_str(), cli.args.as_slice()) {
        ("get", [url, dest]) => {
            let url = storage::S3Url::parse(url)?;
            let probed = storage::probe(&client, &url).await?;
            let file = create(dest.into()).await?;
            let done = storage::download_probed(&client, &url, &probed, file, &mut |_| {}, None).await?;
            format!("{} bytes crc64nvme {}", done.size, done.checksum())
        }
        ("put", [src, url]) => {
            let url = storage::S3Url::parse(url)?;
            let (file, size) = open(src.into()).await?;
            let done = storage::upload(&client, file, size, &url, &mut |_| {}).await?;
            format!("{} bytes crc64nvme {}", done.size, done.checksum())
        }
        ("get-many", [prefix, count, dir]) => {
            let count: usize = count.parse()?;
            std::fs::create_dir_all(dir)?;
            let limit = Arc::new(Semaphore::new(MANY_IN_FLIGHT));
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..count {
                let (client, limit) = (client.clone(), Arc::clone(&limit));
                let url = storage::S3Url::parse(&format!("{prefix}{i}"))?;
                let dest = PathBuf::from(dir).join(i.to_string());
                tasks.spawn(async move {
                    let _permit = limit.acquire_owned().await?;
                    let probed = storage::probe(&client, &url).await?;
                    let file = create(dest).await?;
                    storage::download_probed(&client, &url, &probed, file, &mut |_| {}, None).await?;
                    Ok::<_, Error>(())
                });
            }
            while let Some(done) = tasks.join_next().await {
                done??;
            }
            format!("{count} objects")
        }
        ("put-many", [dir, prefix]) => {
            let limit = Arc::new(Semaphore::new(MANY_IN_FLIGHT));
            let mut tasks = tokio::task::JoinSet::new();
            let mut count = 0;
            for entry in std::fs::read_dir(dir)? {
                let path = entry?.path();
                let url = storage::S3Url::parse(&format!(
                    "{prefix}{}",
                    path.file_name().unwrap_or_default().to_string_lossy()
                ))?;
                let (client, limit) = (client.clone(), Arc::clone(&limit));
                count += 1;
                tasks.spawn(async move {
                    let _permit = limit.acquire_owned().await?;
                    let (file, size) = open(path).await?;
                    storage::upload(&client, file, size, &url, &mut |_| {}).await?;
                    Ok::<_, Error>(())
                });
            }
            while let Some(done) = tasks.join_next().await {
                done??;
            }
            format!("{count} objects")
        }
        _ => return Err("usage: transfer get|put|get-many|put-many ARGS…".into()),
    };
    println!("{report} in {:.3} s", started.elapsed().as_secs_f64());
    Ok(())
}
