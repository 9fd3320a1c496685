//! A TCP proxy on loopback that injects one fault into the first response
//! stream that grows past a threshold: it cuts the connection, flips a
//! byte, or holds the response back a while. Everything else passes
//! through untouched.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// The fault to inject, once.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Close both sides after this many response bytes.
    CutAfter(u64),
    /// Invert the bits of the response byte at this offset.
    FlipAt(u64),
    /// Hold the first response back this long.
    DelayFirst(std::time::Duration),
}

/// A running proxy.
pub struct Proxy {
    /// Where to connect instead of the upstream.
    pub addr: SocketAddr,
    fired: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Proxies `upstream`, injecting `fault` once.
    pub async fn start(upstream: SocketAddr, fault: Fault) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fired = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&fired);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                tokio::spawn(relay(client, server, fault, Arc::clone(&flag)));
            }
        });
        Self { addr, fired, task }
    }

    /// Whether the fault has been injected.
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(client: TcpStream, server: TcpStream, fault: Fault, fired: Arc<AtomicBool>) {
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    let upstream = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_rx, &mut server_tx).await;
        let _ = server_tx.shutdown().await;
    });
    let mut buf = vec![0u8; 64 << 10];
    let mut seen = 0u64;
    loop {
        let n = match server_rx.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &mut buf[..n];
        let end = seen + n as u64;
        match fault {
            Fault::CutAfter(at) if end > at && !fired.swap(true, Ordering::SeqCst) => {
                let keep = (at - seen.min(at)) as usize;
                let _ = client_tx.write_all(&chunk[..keep.min(n)]).await;
                upstream.abort();
                return;
            }
            Fault::FlipAt(at) if (seen..end).contains(&at) && !fired.swap(true, Ordering::SeqCst) => {
                chunk[(at - seen) as usize] ^= 0xff;
            }
            Fault::DelayFirst(delay) if !fired.swap(true, Ordering::SeqCst) => {
                tokio::time::sleep(delay).await;
            }
            _ => {}
        }
        seen = end;
        if client_tx.write_all(chunk).await.is_err() {
            break;
        }
    }
    let _ = client_tx.shutdown().await;
    upstream.abort();
}
