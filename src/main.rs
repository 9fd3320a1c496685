//! The `prefab` binary: a thin shell over the library.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    prefab::storage::keep_freed_buffers();
    let cli = prefab::cli::Cli::parse();
    let exporter = prefab::cli::init_tracing(&cli);
    let code = prefab::cli::run(cli).await;
    if let Some(exporter) = exporter {
        exporter.shutdown().await;
    }
    std::process::ExitCode::from(code)
}
