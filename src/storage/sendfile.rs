//! Sending parts of local files to plain-HTTP stores straight from the page
//! cache, with `sendfile(2)`.
//!
//! Through hyper, every uploaded byte is copied twice by the gateway: from
//! the page cache into a buffer, and from the buffer into the socket. With
//! `sendfile` the kernel queues the file's own pages on the socket instead.
//! On a 1 GiB multipart upload to SeaweedFS on loopback that took the
//! gateway's CPU time from 1.42–1.54 s to 0.64–0.81 s, at or below curl's
//! for one plain PUT (what is left is mostly the checksum pass).
//!
//! The SDK still builds, signs, retries and parses every request: [`Client`]
//! wraps its HTTP client and sends a request itself only when the request
//! carries a [`FileBody`] (the upload code adds one to each part read from a
//! file) and goes to an `http://` endpoint. Everything else, TLS included,
//! goes to the wrapped client unchanged.
//!
//! The exchange is plain HTTP/1.1 on a blocking thread, since `sendfile`
//! blocks while the file's bytes come from the disk (or from NFS, for a
//! shared workspace volume). The body goes out on a non-blocking socket
//! polled for the store's reply as well, so a store that refuses a request
//! before taking its body is heard at once (an interim `1xx` lets the body
//! go on). Each wait is bounded by the read timeout, and dropping the
//! request's future shuts the socket down, so a cancelled upload frees its
//! thread at once. Connections are kept for reuse per host; one found
//! closed by the store as it is reused is replaced once, which is safe for
//! the idempotent PUTs sent this way.

use std::{
    collections::HashMap,
    fs::File,
    io::{self, Read, Write},
    net::{Shutdown, TcpStream, ToSocketAddrs},
    os::unix::fs::FileExt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aws_smithy_runtime_api::client::{
    http::{
        HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient,
        SharedHttpConnector,
    },
    orchestrator::{HttpRequest, HttpResponse},
    result::ConnectorError,
    runtime_components::RuntimeComponents,
};
use aws_smithy_types::body::SdkBody;

use super::upload_file::UploadFile;

/// Idle connections kept per host.
const MAX_IDLE: usize = 32;
/// How long an idle connection is kept; stores close theirs after a while
/// (S3 after about 20 s).
const IDLE_FOR: Duration = Duration::from_secs(15);
/// Used when the SDK gives no timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest response head and body taken from a store: replies to PUTs are
/// empty or a short XML error.
const MAX_HEAD: usize = 64 << 10;
const MAX_BODY: usize = 1 << 20;

/// The bytes of a request that come from a file: `len` bytes from `offset`.
/// Added to a request as an extension, it lets [`Client`] send them itself.
#[derive(Debug, Clone)]
pub(super) struct FileBody {
    pub(super) file: Arc<UploadFile>,
    pub(super) offset: u64,
    pub(super) len: u64,
}

/// The SDK's HTTP client, with requests carrying a [`FileBody`] to `http://`
/// endpoints sent by `sendfile`.
#[derive(Debug)]
pub(super) struct Client {
    inner: SharedHttpClient,
    pool: Arc<Pool>,
}

impl Client {
    pub(super) fn wrap(inner: SharedHttpClient) -> Self {
        Self {
            inner,
            pool: Arc::default(),
        }
    }
}

impl HttpClient for Client {
    fn http_connector(
        &self,
        settings: &HttpConnectorSettings,
        components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        SharedHttpConnector::new(Connector {
            inner: self.inner.http_connector(settings, components),
            pool: Arc::clone(&self.pool),
            connect_timeout: settings.connect_timeout().unwrap_or(DEFAULT_TIMEOUT),
            timeout: settings.read_timeout().unwrap_or(DEFAULT_TIMEOUT),
        })
    }

    fn connector_metadata(
        &self,
    ) -> Option<aws_smithy_runtime_api::client::connector_metadata::ConnectorMetadata> {
        self.inner.connector_metadata()
    }
}

#[derive(Debug)]
struct Connector {
    inner: SharedHttpConnector,
    pool: Arc<Pool>,
    connect_timeout: Duration,
    /// The longest wait for any progress, sending or receiving.
    timeout: Duration,
}

impl HttpConnector for Connector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let Some(job) = Job::of(&request, self) else {
            return self.inner.call(request);
        };
        let abort = Arc::new(Abort::default());
        let on_drop = CancelOnDrop(Arc::clone(&abort));
        // The run's span, so that what the thread logs names the request.
        let span = tracing::Span::current();
        HttpConnectorFuture::new(async move {
            let _on_drop = on_drop;
            tokio::task::spawn_blocking(move || span.in_scope(|| job.run(&abort)))
                .await
                .map_err(|e| ConnectorError::other(e.into(), None))?
        })
    }
}

/// One request to send by `sendfile`.
struct Job {
    pool: Arc<Pool>,
    /// `host:port`, the key of the connection pool.
    addr: String,
    /// The host to resolve: a name or an IP address.
    host: String,
    port: u16,
    head: Vec<u8>,
    body: FileBody,
    connect_timeout: Duration,
    timeout: Duration,
}

impl Job {
    /// The job for `request` if it is one to send by `sendfile`: it has a
    /// [`FileBody`] of its declared length and goes to an `http://` endpoint.
    fn of(request: &HttpRequest, connector: &Connector) -> Option<Self> {
        let body = request.extension::<FileBody>()?.clone();
        let uri: http::Uri = request.uri().parse().ok()?;
        let headers = request.headers();
        let plain = headers.get("transfer-encoding").is_none() && headers.get("content-encoding").is_none();
        let length = headers.get("content-length")?.parse::<u64>().ok()?;
        if uri.scheme_str() != Some("http") || !plain || length != body.len {
            return None;
        }
        let host = uri.host()?.to_owned();
        let port = uri.port_u16().unwrap_or(80);
        // An IPv6 literal is bracketed in URIs, not for the resolver.
        let ip_or_name = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut head = format!("{} {path} HTTP/1.1\r\n", request.method()).into_bytes();
        if headers.get("host").is_none() {
            // As the signer wrote it: without the scheme's default port.
            let authority = match uri.port_u16() {
                Some(80) | None => host.clone(),
                Some(_) => uri.authority()?.as_str().to_owned(),
            };
            head.extend_from_slice(format!("host: {authority}\r\n").as_bytes());
        }
        for (name, value) in headers {
            head.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        Some(Self {
            pool: Arc::clone(&connector.pool),
            addr: format!("{host}:{port}"),
            host: ip_or_name,
            port,
            head,
            body,
            connect_timeout: connector.connect_timeout,
            timeout: connector.timeout,
        })
    }

    /// Sends the request on a kept connection, or a new one if there is none
    /// or the kept one turns out closed, and returns the store's reply.
    fn run(self, abort: &Abort) -> Result<HttpResponse, ConnectorError> {
        let reply = match self.pool.take(&self.addr) {
            Some(kept) => match self.exchange(kept, abort) {
                Err(Failure::Closed(e)) if !abort.cancelled() => {
                    tracing::debug!(addr = %self.addr, error = %e, "kept connection closed by the store; sending on a new one");
                    self.exchange(self.connect()?, abort)
                }
                other => other,
            },
            None => self.exchange(self.connect()?, abort),
        };
        match reply {
            Ok((reply, stream)) => {
                if let Some(stream) = stream.filter(|_| abort.finish()) {
                    self.pool.put(&self.addr, stream);
                }
                reply.into_response()
            }
            Err(Failure::FileShort(at)) => Err(ConnectorError::user(
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "the file ended at byte {at}, before the part did: was it changed while uploading?"
                    ),
                )
                .into(),
            )),
            Err(Failure::Closed(e) | Failure::Io(e)) => Err(connector_error(e)),
        }
    }

    fn connect(&self) -> Result<TcpStream, ConnectorError> {
        let mut last = None;
        let addrs = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(connector_error)?;
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, self.connect_timeout) {
                Ok(stream) => {
                    stream.set_nodelay(true).map_err(connector_error)?;
                    return Ok(stream);
                }
                Err(e) => last = Some(e),
            }
        }
        let e = last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the host has no address"));
        Err(connector_error(e))
    }

    /// Sends the request on `stream` and reads the reply; the stream comes
    /// back if it can carry another request.
    fn exchange(&self, mut stream: TcpStream, abort: &Abort) -> Result<(Reply, Option<TcpStream>), Failure> {
        abort.watch(&stream).map_err(Failure::Io)?;
        stream
            .set_write_timeout(Some(self.timeout))
            .map_err(Failure::Io)?;
        stream.set_read_timeout(Some(self.timeout)).map_err(Failure::Io)?;
        stream.write_all(&self.head).map_err(sending)?;
        let mut early = Vec::new();
        let sent = send_file(&stream, &self.body, self.timeout, &mut early);
        // A store that refuses a request may answer before taking the
        // whole body, and close: its answer is the one to report.
        let whole = match sent {
            Ok(whole) => whole,
            Err(Failure::Closed(e)) => {
                return match read_reply(&mut stream, early) {
                    Ok(reply) => Ok((reply, None)),
                    Err(_) => Err(Failure::Closed(e)),
                };
            }
            Err(e) => return Err(e),
        };
        let reply = read_reply(&mut stream, early)?;
        let keep = whole && reply.keep_alive;
        Ok((reply, keep.then_some(stream)))
    }
}

/// Why an exchange failed.
#[derive(Debug)]
enum Failure {
    /// The connection failed before any byte of a reply came: the store
    /// may have closed it while it was idle.
    Closed(io::Error),
    /// The connection or the file failed after that, or the reply was
    /// malformed.
    Io(io::Error),
    /// The file ended at this offset, before the part did.
    FileShort(u64),
}

/// A failure to send: the store closed the connection, or another.
fn sending(e: io::Error) -> Failure {
    match e.kind() {
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => {
            Failure::Closed(e)
        }
        _ => Failure::Io(e),
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock)
}

/// A failed connection, as the SDK classifies it: both are retried.
fn connector_error(e: io::Error) -> ConnectorError {
    if is_timeout(&e) {
        ConnectorError::timeout(e.into())
    } else {
        ConnectorError::io(e.into())
    }
}

/// A reply that is no valid HTTP/1.1, or too large.
fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// Sends the file's bytes, from the page cache where it can. Stops early,
/// with `false`, if the store answers (or closes) before taking them all;
/// what it sent is left in `early`. Fails if the store takes nothing for
/// `timeout`.
fn send_file(
    stream: &TcpStream,
    body: &FileBody,
    timeout: Duration,
    early: &mut Vec<u8>,
) -> Result<bool, Failure> {
    stream.set_nonblocking(true).map_err(Failure::Io)?;
    let sent = send_until_answered(stream, body, timeout, early);
    stream.set_nonblocking(false).map_err(Failure::Io)?;
    sent
}

/// A store that closes mid-body makes `sendfile` fail with EPIPE, and raise
/// SIGPIPE, which Rust programs ignore from the start (`sendfile` has no
/// `MSG_NOSIGNAL`).
fn send_until_answered(
    mut stream: &TcpStream,
    body: &FileBody,
    timeout: Duration,
    early: &mut Vec<u8>,
) -> Result<bool, Failure> {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let file = body.file.file();
    let wait = Timespec::try_from(timeout).unwrap_or(Timespec {
        tv_sec: 60,
        tv_nsec: 0,
    });
    let (mut at, end) = (body.offset, body.offset + body.len);
    while at < end {
        let mut fds = [PollFd::new(stream, PollFlags::IN | PollFlags::OUT)];
        match poll(&mut fds, Some(&wait)) {
            Ok(0) => {
                let e = io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the store took no byte for {timeout:?}"),
                );
                return Err(Failure::Io(e));
            }
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(Failure::Io(e.into())),
        }
        let ready = fds[0].revents();
        if ready.intersects(PollFlags::IN | PollFlags::ERR | PollFlags::HUP) {
            let mut chunk = [0; 4096];
            match stream.read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(n) => early.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
                Err(e) => return Err(sending(e)),
            }
            // An interim `1xx` reply asks for the rest of the body; any
            // other ends the request.
            loop {
                match classify(early) {
                    Early::Interim(len) => drop(early.drain(..len)),
                    Early::Undecided => break,
                    Early::Final => return Ok(false),
                }
            }
            continue;
        }
        let want = usize::try_from(end - at).unwrap_or(usize::MAX).min(1 << 30);
        match rustix::fs::sendfile(stream, file, Some(&mut at), want) {
            Ok(0) => return Err(Failure::FileShort(at)),
            Ok(_) | Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {}
            // File systems that cannot hand over their pages.
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS | rustix::io::Errno::OPNOTSUPP) => {
                stream.set_nonblocking(false).map_err(Failure::Io)?;
                return copy_file(stream, file, at, end).map(|()| true);
            }
            Err(e) => return Err(sending(e.into())),
        }
    }
    Ok(true)
}

/// What the bytes a store sent while it was being sent the body are.
enum Early {
    /// A whole interim (`1xx`) reply head of this length, then maybe more.
    Interim(usize),
    /// Nothing yet, or the start of what may be an interim reply.
    Undecided,
    /// A final reply, or bytes that are no reply.
    Final,
}

fn classify(bytes: &[u8]) -> Early {
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut head = httparse::Response::new(&mut slots);
    match head.parse(bytes) {
        Ok(httparse::Status::Complete(len)) if head.code.is_some_and(|c| (100..200).contains(&c)) => {
            Early::Interim(len)
        }
        Ok(httparse::Status::Partial) if bytes.len() < MAX_HEAD => {
            let interim = b"HTTP/1.x 1";
            let may_be = bytes.iter().zip(interim).all(|(b, p)| p == b || *p == b'x');
            if may_be { Early::Undecided } else { Early::Final }
        }
        _ => Early::Final,
    }
}

/// Sends bytes `at..end` of `file` through a buffer.
fn copy_file(mut stream: &TcpStream, file: &File, mut at: u64, end: u64) -> Result<(), Failure> {
    let mut buf = vec![0; super::upload_file::CHUNK];
    while at < end {
        let n = buf.len().min((end - at) as usize);
        let n = match file.read_at(&mut buf[..n], at) {
            Ok(0) => return Err(Failure::FileShort(at)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Failure::Io(e)),
        };
        stream.write_all(&buf[..n]).map_err(sending)?;
        at += n as u64;
    }
    Ok(())
}

/// A store's reply.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    /// Whether the connection can carry another request.
    keep_alive: bool,
}

impl Reply {
    fn into_response(self) -> Result<HttpResponse, ConnectorError> {
        let malformed =
            |e: &dyn std::fmt::Display| ConnectorError::io(invalid(format!("malformed reply: {e}")).into());
        let mut response = http::Response::builder().status(self.status);
        for (name, value) in &self.headers {
            response = response.header(name.as_str(), value.as_slice());
        }
        let response = response
            .body(SdkBody::from(self.body))
            .map_err(|e| malformed(&e))?;
        HttpResponse::try_from(response).map_err(|e| malformed(&e))
    }
}

/// Reads a reply: its head (after any `1xx` ones) and its body, framed by
/// `Content-Length`, chunked, or by the end of the connection.
fn read_reply(stream: &mut TcpStream, early: Vec<u8>) -> Result<Reply, Failure> {
    let mut incoming = Incoming {
        stream,
        seen: !early.is_empty(),
        buf: early,
    };
    let (status, headers, keep_alive) = loop {
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut head = httparse::Response::new(&mut slots);
        let parsed = head
            .parse(&incoming.buf)
            .map_err(|e| Failure::Io(invalid(format!("malformed reply: {e}"))))?;
        let httparse::Status::Complete(len) = parsed else {
            if incoming.buf.len() > MAX_HEAD {
                return Err(Failure::Io(invalid("the reply's head is too large")));
            }
            incoming.fill()?;
            continue;
        };
        let status = head.code.unwrap_or_default();
        let keep_alive = head.version == Some(1);
        let headers: Vec<_> = head
            .headers
            .iter()
            .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
            .collect();
        incoming.buf.drain(..len);
        if (100..200).contains(&status) {
            continue;
        }
        break (status, headers, keep_alive);
    };
    // The comma-separated tokens of every header named `name`.
    let tokens = |name: &str| {
        let values = headers.iter().filter(|(n, _)| n == name);
        let tokens = values.flat_map(|(_, v)| v.split(|&b| b == b','));
        tokens
            .map(|t| t.trim_ascii().to_ascii_lowercase())
            .collect::<Vec<_>>()
    };
    let close = tokens("connection").iter().any(|t| t == b"close");
    let codings = tokens("transfer-encoding");
    let lengths = tokens("content-length");
    let (body, framed) = if status == 204 || status == 304 {
        (Vec::new(), true)
    } else if let Some(last) = codings.last() {
        if last == b"chunked" {
            (incoming.chunked()?, true)
        } else {
            (incoming.until_closed()?, false)
        }
    } else if let Some(len) = lengths.first() {
        let len = std::str::from_utf8(len)
            .ok()
            .and_then(|l| l.parse::<usize>().ok())
            .filter(|_| lengths.iter().all(|l| l == len))
            .ok_or_else(|| Failure::Io(invalid("malformed Content-Length")))?;
        if len > MAX_BODY {
            return Err(Failure::Io(invalid(format!(
                "the reply's body is too large ({len} bytes)"
            ))));
        }
        (incoming.take(len)?, true)
    } else {
        (incoming.until_closed()?, false)
    };
    // Bytes after the reply: the connection is out of step.
    let keep_alive = keep_alive && framed && !close && incoming.buf.is_empty();
    Ok(Reply {
        status,
        headers,
        body,
        keep_alive,
    })
}

/// The bytes of a reply as they come in.
struct Incoming<'a> {
    stream: &'a mut TcpStream,
    buf: Vec<u8>,
    /// Whether any byte came: the connection failing before that is
    /// [`Failure::Closed`].
    seen: bool,
}

impl Incoming<'_> {
    /// Reads some more bytes; the end of the connection is an error.
    fn fill(&mut self) -> Result<(), Failure> {
        match self.read_some()? {
            0 => Err(self.failure(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the store closed the connection before its reply ended",
            ))),
            _ => Ok(()),
        }
    }

    fn read_some(&mut self) -> Result<usize, Failure> {
        let mut chunk = [0; 8192];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(n) => {
                    self.seen |= n > 0;
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.failure(e)),
            }
        }
    }

    fn failure(&self, e: io::Error) -> Failure {
        if self.seen || is_timeout(&e) {
            Failure::Io(e)
        } else {
            Failure::Closed(e)
        }
    }

    /// The next `n` bytes.
    fn take(&mut self, n: usize) -> Result<Vec<u8>, Failure> {
        while self.buf.len() < n {
            self.fill()?;
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// The next line, without its CRLF.
    fn line(&mut self) -> Result<Vec<u8>, Failure> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf.drain(..end + 2).take(end).collect();
                return Ok(line);
            }
            if self.buf.len() > MAX_HEAD {
                return Err(Failure::Io(invalid("a reply line is too long")));
            }
            self.fill()?;
        }
    }

    /// A chunked body, decoded; trailers are dropped.
    fn chunked(&mut self) -> Result<Vec<u8>, Failure> {
        let mut body = Vec::new();
        loop {
            let line = self.line()?;
            let size = line.split(|&b| b == b';').next().unwrap_or_default();
            let size = std::str::from_utf8(size)
                .ok()
                .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
                .ok_or_else(|| Failure::Io(invalid("malformed chunk size")))?;
            if size == 0 {
                while !self.line()?.is_empty() {}
                return Ok(body);
            }
            if size > MAX_BODY - body.len() {
                return Err(Failure::Io(invalid("the reply's body is too large")));
            }
            body.extend(self.take(size)?);
            if !self.line()?.is_empty() {
                return Err(Failure::Io(invalid("malformed chunk")));
            }
        }
    }

    /// Everything up to the end of the connection.
    fn until_closed(&mut self) -> Result<Vec<u8>, Failure> {
        while self.read_some()? > 0 {
            if self.buf.len() > MAX_BODY {
                return Err(Failure::Io(invalid("the reply's body is too large")));
            }
        }
        Ok(std::mem::take(&mut self.buf))
    }
}

/// Idle connections per `host:port`, newest last.
#[derive(Debug, Default)]
struct Pool {
    idle: Mutex<HashMap<String, Vec<(TcpStream, Instant)>>>,
}

impl Pool {
    /// A kept connection to `addr` that is still open, if any.
    fn take(&self, addr: &str) -> Option<TcpStream> {
        loop {
            let (stream, since) = self.lock().get_mut(addr)?.pop()?;
            if since.elapsed() < IDLE_FOR && is_open(&stream) {
                return Some(stream);
            }
        }
    }

    /// Keeps `stream` for reuse, and closes connections idle too long, to
    /// any host.
    fn put(&self, addr: &str, stream: TcpStream) {
        let mut idle = self.lock();
        idle.retain(|_, kept| {
            kept.retain(|(_, since)| since.elapsed() < IDLE_FOR);
            !kept.is_empty()
        });
        let kept = idle.entry(addr.to_owned()).or_default();
        if kept.len() == MAX_IDLE {
            kept.remove(0);
        }
        kept.push((stream, Instant::now()));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<(TcpStream, Instant)>>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Whether an idle connection is still open: nothing to read, no end, no
/// error.
fn is_open(stream: &TcpStream) -> bool {
    let idle = stream.set_nonblocking(true).is_ok()
        && matches!(stream.peek(&mut [0]), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
    idle && stream.set_nonblocking(false).is_ok()
}

/// Lets the request's future stop the blocking thread sending it: the
/// thread registers its socket, and a cancel shuts it down, which ends any
/// blocking call on it at once.
#[derive(Debug, Default)]
struct Abort {
    cancelled: AtomicBool,
    socket: Mutex<Option<TcpStream>>,
}

impl Abort {
    /// Registers the socket in use (a handle to it).
    fn watch(&self, stream: &TcpStream) -> io::Result<()> {
        let handle = stream.try_clone()?;
        let mut socket = self.socket.lock().unwrap_or_else(|e| e.into_inner());
        if self.cancelled.load(Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "the request was cancelled",
            ));
        }
        *socket = Some(handle);
        Ok(())
    }

    fn cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Ends the watch; false if the request was cancelled meanwhile.
    fn finish(&self) -> bool {
        let mut socket = self.socket.lock().unwrap_or_else(|e| e.into_inner());
        socket.take();
        !self.cancelled.load(Ordering::Acquire)
    }

    fn cancel(&self) {
        let mut socket = self.socket.lock().unwrap_or_else(|e| e.into_inner());
        self.cancelled.store(true, Ordering::Release);
        if let Some(socket) = socket.take() {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}

/// Cancels the blocking send when the request's future is dropped (it is
/// a no-op once the send finished).
struct CancelOnDrop(Arc<Abort>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead, BufReader},
        net::{SocketAddr, TcpListener},
        sync::atomic::AtomicUsize,
        thread,
    };

    use super::*;

    /// A store on loopback serving each connection it accepts with `serve`
    /// (given the connection's number, from 0) on a thread of its own.
    struct Store {
        addr: SocketAddr,
        accepted: Arc<AtomicUsize>,
        stop: Arc<AtomicBool>,
    }

    impl Store {
        fn start(serve: impl Fn(usize, TcpStream) + Send + Sync + 'static) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            let addr = listener.local_addr().unwrap();
            let (accepted, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
            let (count, stopped, serve) = (Arc::clone(&accepted), Arc::clone(&stop), Arc::new(serve));
            thread::spawn(move || {
                while !stopped.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            stream.set_nonblocking(false).unwrap();
                            let n = count.fetch_add(1, Ordering::SeqCst);
                            let serve = Arc::clone(&serve);
                            thread::spawn(move || serve(n, stream));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(5)),
                    }
                }
            });
            Self { addr, accepted, stop }
        }

        /// The URI of an object in it.
        fn uri(&self) -> String {
            format!("http://{}/b/k", self.addr)
        }

        fn accepted(&self) -> usize {
            self.accepted.load(Ordering::SeqCst)
        }
    }

    impl Drop for Store {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
        }
    }

    /// Reads a request: its head and its body (by Content-Length).
    fn read_request(reader: &mut BufReader<TcpStream>) -> Option<(String, Vec<u8>)> {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).ok()? == 0 {
                return None;
            }
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map_or(0, |l| l.parse().unwrap());
        let mut body = vec![0; len];
        reader.read_exact(&mut body).ok()?;
        Some((head, body))
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nETag: \"abc\"\r\nContent-Length: 0\r\n\r\n";

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    fn file_of(data: &[u8]) -> Arc<UploadFile> {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(data).unwrap();
        UploadFile::new(file)
    }

    #[derive(Debug)]
    struct Wrapped;

    impl HttpConnector for Wrapped {
        fn call(&self, _: HttpRequest) -> HttpConnectorFuture {
            HttpConnectorFuture::ready(Err(ConnectorError::other(
                "sent by the wrapped client".into(),
                None,
            )))
        }
    }

    fn connector(timeout: Duration) -> Connector {
        Connector {
            inner: SharedHttpConnector::new(Wrapped),
            pool: Arc::default(),
            connect_timeout: Duration::from_secs(5),
            timeout,
        }
    }

    fn request(uri: &str, body: FileBody) -> HttpRequest {
        let mut request = HttpRequest::new(SdkBody::empty());
        request.set_method("PUT").unwrap();
        request.set_uri(uri).unwrap();
        request
            .headers_mut()
            .insert("content-length", body.len.to_string());
        request
            .headers_mut()
            .insert("authorization", "AWS4-HMAC-SHA256 Credential=test");
        request.add_extension(body);
        request
    }

    fn part(file: &Arc<UploadFile>, offset: u64, len: u64) -> FileBody {
        FileBody {
            file: Arc::clone(file),
            offset,
            len,
        }
    }

    #[tokio::test]
    async fn a_part_goes_after_its_signed_head_and_the_connection_is_kept() {
        let data = data((3 << 20) + 5);
        let file = file_of(&data);
        let (tx, rx) = std::sync::mpsc::channel();
        let store = Store::start(move |_, stream| {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            while let Some(request) = read_request(&mut reader) {
                tx.send(request).unwrap();
                (&stream).write_all(OK).unwrap();
            }
        });
        let connector = connector(DEFAULT_TIMEOUT);
        let uri = format!("http://{}/bucket/a%20key?partNumber=1&uploadId=u", store.addr);
        let ranges = [(1000, (2 << 20) + 7), (0, data.len() as u64)];
        for (offset, len) in ranges {
            let response = connector
                .call(request(&uri, part(&file, offset, len)))
                .await
                .unwrap();
            assert_eq!(response.status().as_u16(), 200);
            assert_eq!(response.headers().get("etag"), Some("\"abc\""));
            let (head, body) = rx.recv().unwrap();
            assert!(
                head.starts_with("PUT /bucket/a%20key?partNumber=1&uploadId=u HTTP/1.1\r\n"),
                "{head}"
            );
            assert!(head.contains(&format!("host: {}\r\n", store.addr)), "{head}");
            assert!(
                head.contains("authorization: AWS4-HMAC-SHA256 Credential=test\r\n"),
                "{head}"
            );
            assert!(
                body == data[offset as usize..][..len as usize],
                "the body differs"
            );
        }
        assert_eq!(store.accepted(), 1, "the connection was not kept");
    }

    #[tokio::test]
    async fn replies_come_back_whole_and_only_cleanly_ended_ones_keep_the_connection() {
        // (reply, the store closes after it, status, body, connection kept)
        let cases: [(&[u8], bool, u16, &str, bool); 6] = [
            (
                b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n6;x=y\r\n<Error\r\n4\r\n/>\n\n\r\n0\r\nA: b\r\n\r\n",
                false,
                403,
                "<Error/>\n\n",
                true,
            ),
            (
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Slow Down\r\nContent-Length: 9\r\n\r\n<Error/>\n",
                false,
                503,
                "<Error/>\n",
                true,
            ),
            (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false, 200, "", false),
            (
                b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 0\r\n\r\n",
                false,
                200,
                "",
                false,
            ),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nX", false, 200, "", false),
            (b"HTTP/1.1 400 Bad Request\r\n\r\n<Error/>\n\n", true, 400, "<Error/>\n\n", false),
        ];
        let next = Arc::new(AtomicUsize::new(0));
        let replies = cases.map(|(reply, close, ..)| (reply, close));
        let store = Store::start(move |_, stream| {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            while read_request(&mut reader).is_some() {
                let (reply, close) = replies[next.fetch_add(1, Ordering::SeqCst)];
                (&stream).write_all(reply).unwrap();
                if close {
                    return;
                }
            }
        });
        let file = file_of(&data(100));
        let connector = connector(DEFAULT_TIMEOUT);
        let uri = store.uri();
        for (_, _, status, body, kept) in cases {
            let response = connector.call(request(&uri, part(&file, 0, 100))).await.unwrap();
            assert_eq!(response.status().as_u16(), status);
            assert_eq!(response.body().bytes(), Some(body.as_bytes()));
            let idle = connector.pool.lock().values().map(Vec::len).sum::<usize>();
            assert_eq!(idle, usize::from(kept), "status {status}: kept or not");
        }
        // The first three on one connection, the others on one each.
        assert_eq!(store.accepted(), 4);
    }

    #[tokio::test]
    async fn a_store_that_answers_before_taking_the_body_is_heard_at_once() {
        // It refuses after the head and reads no more, the connection open.
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let done_rx = Mutex::new(done_rx);
        let store = Store::start(move |_, stream| {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap() > 2 {
                line.clear();
            }
            let reply = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 8\r\n\r\n<Error/>";
            (&stream).write_all(reply).unwrap();
            let _ = done_rx.lock().unwrap().recv_timeout(Duration::from_secs(20));
        });
        let file = sparse_file(256 << 20);
        let connector = connector(DEFAULT_TIMEOUT);
        let uri = store.uri();
        let started = Instant::now();
        let response = connector
            .call(request(&uri, part(&file, 0, 256 << 20)))
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 403);
        assert_eq!(response.body().bytes(), Some(&b"<Error/>"[..]));
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "waited for the send to time out"
        );
        assert!(
            connector.pool.lock().is_empty(),
            "kept a connection with a body half sent"
        );
        done_tx.send(()).unwrap();
    }

    #[tokio::test]
    async fn an_interim_reply_during_the_body_lets_it_go_on() {
        let data = data(24 << 20);
        let file = file_of(&data);
        let (tx, rx) = std::sync::mpsc::channel();
        let store = Store::start(move |_, stream| {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap() > 2 {
                line.clear();
            }
            (&stream).write_all(b"HTTP/1.1 100 Continue\r\n\r\n").unwrap();
            let mut body = vec![0; 24 << 20];
            reader.read_exact(&mut body).unwrap();
            tx.send(body).unwrap();
            (&stream).write_all(OK).unwrap();
        });
        let connector = connector(DEFAULT_TIMEOUT);
        let uri = store.uri();
        let response = connector
            .call(request(&uri, part(&file, 0, 24 << 20)))
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        assert!(rx.recv().unwrap() == data, "the body differs");
    }

    #[tokio::test]
    async fn a_kept_connection_the_store_closed_is_replaced_once() {
        // The first connection takes one request, then a second one it
        // drops unanswered; the second connection serves; the third drops
        // its first request.
        let store = Store::start(|n, stream| {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            if n < 2 {
                read_request(&mut reader).unwrap();
                (&stream).write_all(OK).unwrap();
            }
            let _ = read_request(&mut reader);
        });
        let file = file_of(&data(1 << 20));
        let connector = connector(DEFAULT_TIMEOUT);
        let uri = store.uri();
        for _ in 0..2 {
            let response = connector
                .call(request(&uri, part(&file, 0, 1 << 20)))
                .await
                .unwrap();
            assert_eq!(response.status().as_u16(), 200);
        }
        assert_eq!(store.accepted(), 2);
        // A new connection closed unanswered is an error, not retried here.
        connector.pool.lock().clear();
        let err = connector
            .call(request(&uri, part(&file, 0, 1 << 20)))
            .await
            .unwrap_err();
        assert!(err.is_io(), "{err:?}");
        assert_eq!(store.accepted(), 3);
    }

    #[tokio::test]
    async fn a_file_shorter_than_its_part_is_the_callers_error() {
        let data = data(1 << 20);
        let file = file_of(&data);
        let (tx, rx) = std::sync::mpsc::channel();
        let store = Store::start(move |_, mut stream| {
            let mut got = Vec::new();
            let _ = stream.read_to_end(&mut got);
            tx.send(got).unwrap();
        });
        let connector = connector(DEFAULT_TIMEOUT);
        let uri = store.uri();
        let err = connector
            .call(request(&uri, part(&file, 4096, 2 << 20)))
            .await
            .unwrap_err();
        assert!(err.is_user(), "{err:?}");
        assert!(format!("{:?}", err).contains("ended at byte 1048576"), "{err:?}");
        let got = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let body = &got[got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..];
        assert!(body == &data[4096..], "sent other bytes than the file's");
    }

    /// A store that takes a connection and reads nothing until `go`.
    fn deaf_store() -> (
        Store,
        std::sync::mpsc::Sender<()>,
        std::sync::mpsc::Receiver<Duration>,
    ) {
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let go_rx = Mutex::new(go_rx);
        let store = Store::start(move |_, mut stream| {
            let _ = go_rx.lock().unwrap().recv_timeout(Duration::from_secs(20));
            // Then read what was sent until the sender closes.
            let start = Instant::now();
            stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut sink = vec![0; 1 << 20];
            while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
            let _ = done_tx.send(start.elapsed());
        });
        (store, go_tx, done_rx)
    }

    fn sparse_file(len: u64) -> Arc<UploadFile> {
        let file = tempfile::tempfile().unwrap();
        file.set_len(len).unwrap();
        UploadFile::new(file)
    }

    #[tokio::test]
    async fn a_store_that_stops_reading_times_the_send_out() {
        let (store, go, _) = deaf_store();
        let file = sparse_file(256 << 20);
        let connector = connector(Duration::from_millis(300));
        let uri = store.uri();
        let started = Instant::now();
        let err = connector
            .call(request(&uri, part(&file, 0, 256 << 20)))
            .await
            .unwrap_err();
        assert!(err.is_timeout(), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(10));
        go.send(()).unwrap();
    }

    #[tokio::test]
    async fn dropping_a_request_stops_its_send_at_once() {
        let (store, go, done) = deaf_store();
        let file = sparse_file(256 << 20);
        let connector = connector(DEFAULT_TIMEOUT);
        let uri = store.uri();
        let call = connector.call(request(&uri, part(&file, 0, 256 << 20)));
        tokio::time::timeout(Duration::from_millis(300), call)
            .await
            .unwrap_err();
        go.send(()).unwrap();
        // The store sees the connection end as soon as it drains the few
        // MiB in flight, not after the 60 s timeout.
        let drained = done.recv_timeout(Duration::from_secs(15)).unwrap();
        assert!(drained < Duration::from_secs(15));
    }

    #[tokio::test]
    async fn other_requests_go_to_the_wrapped_client() {
        let file = file_of(&data(10));
        let connector = connector(DEFAULT_TIMEOUT);
        let wrapped = |err: ConnectorError| format!("{err:?}").contains("sent by the wrapped client");
        // Over TLS, with no file body, or with a length other than the part's.
        let tls = request("https://127.0.0.1:1/b/k", part(&file, 0, 10));
        let mut plain = HttpRequest::new(SdkBody::empty());
        plain.set_uri("http://127.0.0.1:1/b/k").unwrap();
        let mut other_length = request("http://127.0.0.1:1/b/k", part(&file, 0, 10));
        other_length.headers_mut().insert("content-length", "11");
        let mut encoded = request("http://127.0.0.1:1/b/k", part(&file, 0, 10));
        encoded.headers_mut().insert("content-encoding", "aws-chunked");
        for request in [tls, plain, other_length, encoded] {
            assert!(wrapped(connector.call(request).await.unwrap_err()));
        }
    }

    #[test]
    fn the_head_names_the_host_as_the_signer_did() {
        let file = file_of(&data(10));
        let connector = connector(DEFAULT_TIMEOUT);
        let cases = [
            (
                "http://store.example:80/b/k",
                "host: store.example\r\n",
                "store.example",
                "store.example:80",
            ),
            (
                "http://store.example/b/k",
                "host: store.example\r\n",
                "store.example",
                "store.example:80",
            ),
            (
                "http://[::1]:9000/b/k?uploads",
                "host: [::1]:9000\r\n",
                "::1",
                "[::1]:9000",
            ),
        ];
        for (uri, header, host, addr) in cases {
            let job = Job::of(&request(uri, part(&file, 0, 10)), &connector).unwrap();
            let head = String::from_utf8(job.head).unwrap();
            assert!(head.contains(header), "{uri}: {head}");
            assert_eq!((job.host.as_str(), job.addr.as_str()), (host, addr));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uploads_through_the_sdk_use_it_and_outlast_its_stall_check() {
        use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region, StalledStreamProtectionConfig};
        // The store answers each request 3 s after taking its body; the
        // SDK's check of upload speed would give up after 1 s of grace.
        let (tx, rx) = std::sync::mpsc::channel();
        let store = Store::start(move |_, stream| {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            while let Some((head, body)) = read_request(&mut reader) {
                tx.send((head, body)).unwrap();
                thread::sleep(Duration::from_secs(3));
                (&stream).write_all(OK).unwrap();
            }
        });
        let http = Client::wrap(aws_smithy_http_client::Builder::new().build_http());
        let pool = Arc::clone(&http.pool);
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("id", "secret", None, None, "test"))
            .endpoint_url(format!("http://{}", store.addr))
            .force_path_style(true)
            .http_client(http)
            .stalled_stream_protection(
                StalledStreamProtectionConfig::enabled()
                    .grace_period(Duration::from_secs(1))
                    .build(),
            )
            .build();
        let s3 = super::super::Storage::from_client(
            aws_sdk_s3::Client::from_conf(config),
            "test store",
            Default::default(),
            Default::default(),
        );
        let data = data(3 << 20);
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&data).unwrap();
        let dest = super::super::S3Url::parse("s3://bucket/slow.bin").unwrap();

        let done = super::super::upload(&s3, file, data.len() as u64, &dest, &mut |_| {})
            .await
            .unwrap();
        assert_eq!(done.size, data.len() as u64);
        let (head, body) = rx.recv().unwrap();
        assert!(head.starts_with("PUT /bucket/slow.bin"), "{head}");
        assert!(body == data, "the body differs");
        let idle = pool.lock().values().map(Vec::len).sum::<usize>();
        assert_eq!(idle, 1, "the part did not go by sendfile");
    }

    #[test]
    fn connections_idle_too_long_are_closed_whatever_their_host() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let connect = || TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let pool = Pool::default();
        let long_ago = Instant::now() - IDLE_FOR - Duration::from_secs(1);
        pool.lock().insert("old:80".into(), vec![(connect(), long_ago)]);
        pool.lock().insert(
            "mixed:80".into(),
            vec![(connect(), long_ago), (connect(), Instant::now())],
        );
        pool.put("new:80", connect());
        let kept: HashMap<_, _> = pool
            .lock()
            .iter()
            .map(|(host, kept)| (host.clone(), kept.len()))
            .collect();
        assert_eq!(
            kept,
            HashMap::from([("mixed:80".to_owned(), 1), ("new:80".to_owned(), 1)])
        );
        assert!(pool.take("old:80").is_none());
    }
}
