//! An S3-compatible endpoint on loopback backed by a local folder (the
//! `s3s-fs` crate), for `prefab dev` and the integration tests.

use std::{net::SocketAddr, path::Path, time::Duration};

use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::{conn::auto::Builder as ConnBuilder, graceful::GracefulShutdown},
};
use s3s::{auth::SimpleAuth, service::S3ServiceBuilder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::server::BoxError;

/// Access key of the embedded store.
pub const ACCESS_KEY: &str = "prefab-dev";
/// Secret key of the embedded store (it only listens on loopback).
pub const SECRET_KEY: &str = "prefab-dev-secret";

/// Serves the folder `root` as an S3 endpoint on `listener`, with `buckets`
/// created, until `shutdown` is cancelled. Data survives a restart.
pub async fn serve(
    root: &Path,
    buckets: &[&str],
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), BoxError> {
    for bucket in buckets {
        tokio::fs::create_dir_all(root.join(bucket)).await?;
    }
    let fs =
        s3s_fs::FileSystem::new(root).map_err(|e| format!("cannot serve {} as S3: {e:?}", root.display()))?;
    let service = {
        let mut b = S3ServiceBuilder::new(fs);
        b.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        b.build()
    };
    let http = ConnBuilder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    loop {
        let socket = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => socket,
                Err(e) => {
                    tracing::warn!(error = %e, "embedded S3: accept failed");
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = socket.set_nodelay(true);
        let conn = http.serve_connection(TokioIo::new(socket), service.clone());
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
    Ok(())
}

/// Binds `addr` and serves as [`serve`] does, returning the bound address
/// and the server task.
pub async fn spawn(
    root: &Path,
    buckets: &[&str],
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<Result<(), BoxError>>), BoxError> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let root = root.to_owned();
    let buckets: Vec<String> = buckets.iter().map(|b| b.to_string()).collect();
    let task = tokio::spawn(async move {
        let buckets: Vec<&str> = buckets.iter().map(String::as_str).collect();
        serve(&root, &buckets, listener, shutdown).await
    });
    Ok((bound, task))
}
