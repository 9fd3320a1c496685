//! The `prefab` binary: a thin shell over the library.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    prefab::storage::keep_freed_buffers();
    let cli = prefab::cli::Cli::parse();
    prefab::cli::init_tracing(cli.log_json);
    std::process::ExitCode::from(prefab::cli::run(cli).await)
}
