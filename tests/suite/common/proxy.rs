//! A TCP proxy on loopback that injects one fault into the first response
//! (or request) stream that grows past a threshold: it cuts the connection,
//! flips a byte, or holds the response back a while. Everything else passes
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
    /// Hold every piece of every response back this long.
    DelayEach(std::time::Duration),
    /// Close the connection instead of passing on the reply to the first
    /// request whose first line starts with this (the request itself
    /// reaches the store).
    LoseReplyTo(&'static str),
    /// Close both sides after this many request bytes.
    CutRequestAfter(u64),
    /// Invert the bits of the request byte at this offset.
    FlipRequestAt(u64),
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
    let (client_rx, client_tx) = client.into_split();
    let (server_rx, server_tx) = server.into_split();
    let cut = Arc::new(tokio::sync::Notify::new());
    let doomed = Arc::new(AtomicBool::new(false));
    let upstream = tokio::spawn(pass(
        client_rx,
        server_tx,
        Direction::Request,
        fault,
        Arc::clone(&fired),
        Arc::clone(&cut),
        Arc::clone(&doomed),
    ));
    let downstream = pass(
        server_rx,
        client_tx,
        Direction::Response,
        fault,
        fired,
        Arc::clone(&cut),
        doomed,
    );
    tokio::select! {
        () = downstream => {}
        () = cut.notified() => {}
    }
    upstream.abort();
}

#[derive(Clone, Copy, PartialEq)]
enum Direction {
    Request,
    Response,
}

/// Copies `rx` to `tx`, injecting `fault` if it is one for `direction`;
/// a cut is signalled on `cut` so that both directions stop. A request
/// whose reply is to be lost marks the connection `doomed`.
async fn pass(
    mut rx: tokio::net::tcp::OwnedReadHalf,
    mut tx: tokio::net::tcp::OwnedWriteHalf,
    direction: Direction,
    fault: Fault,
    fired: Arc<AtomicBool>,
    cut: Arc<tokio::sync::Notify>,
    doomed: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 << 10];
    let mut seen = 0u64;
    let (cut_after, flip_at) = match (direction, fault) {
        (Direction::Response, Fault::CutAfter(at)) | (Direction::Request, Fault::CutRequestAfter(at)) => {
            (Some(at), None)
        }
        (Direction::Response, Fault::FlipAt(at)) | (Direction::Request, Fault::FlipRequestAt(at)) => {
            (None, Some(at))
        }
        _ => (None, None),
    };
    loop {
        let n = match rx.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &mut buf[..n];
        let end = seen + n as u64;
        match (cut_after, flip_at, fault) {
            (Some(at), _, _) if end > at && !fired.swap(true, Ordering::SeqCst) => {
                let keep = (at - seen.min(at)) as usize;
                let _ = tx.write_all(&chunk[..keep.min(n)]).await;
                cut.notify_one();
                return;
            }
            (_, Some(at), _) if (seen..end).contains(&at) && !fired.swap(true, Ordering::SeqCst) => {
                chunk[(at - seen) as usize] ^= 0xff;
            }
            (_, _, Fault::DelayFirst(delay))
                if direction == Direction::Response && !fired.swap(true, Ordering::SeqCst) =>
            {
                tokio::time::sleep(delay).await;
            }
            (_, _, Fault::LoseReplyTo(start))
                if direction == Direction::Request
                    && chunk.starts_with(start.as_bytes())
                    && !fired.swap(true, Ordering::SeqCst) =>
            {
                doomed.store(true, Ordering::SeqCst);
            }
            (_, _, Fault::LoseReplyTo(_))
                if direction == Direction::Response && doomed.load(Ordering::SeqCst) =>
            {
                cut.notify_one();
                return;
            }
            (_, _, Fault::DelayEach(delay)) if direction == Direction::Response => {
                fired.store(true, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
            }
            _ => {}
        }
        seen = end;
        if tx.write_all(chunk).await.is_err() {
            break;
        }
    }
    let _ = tx.shutdown().await;
}
