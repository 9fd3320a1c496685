//! An HTTP/1.1 relay on loopback in front of the test store that behaves
//! like the stores the embedded one is more lenient than: it refuses the
//! flexible checksum headers as Backblaze B2 does, refuses `aws-chunked`
//! bodies as Aliyun OSS does, can damage a part or a downloaded byte on the
//! way, throttle, and
//! go away for a while (an outage: connections refused and cut). It parses
//! each request and response head to find where the messages end, and
//! passes bytes through otherwise.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};

/// How the relay behaves.
#[derive(Debug, Clone, Copy, Default)]
pub struct Strict {
    /// Refuse requests with `x-amz-checksum-*` or
    /// `x-amz-sdk-checksum-algorithm` headers (400; a bare 400 to a HEAD).
    pub refuse_checksum_headers: bool,
    /// Refuse `Content-Encoding: aws-chunked` (400).
    pub refuse_aws_chunked: bool,
    /// Invert one byte in the body of the first `UploadPart`.
    pub damage_first_part: bool,
    /// Invert the byte at this offset of any object a GET returns it of.
    pub flip_object_byte: Option<u64>,
    /// Bytes per second in each direction, if limited.
    pub rate: Option<u64>,
}

/// What the relay saw and did.
#[derive(Debug, Default)]
pub struct Seen {
    /// Request lines (method and target), in order.
    pub requests: Mutex<Vec<String>>,
    /// Requests refused for their checksum headers.
    pub refused: AtomicU64,
    /// Requests refused for an `aws-chunked` body.
    pub refused_aws_chunked: AtomicU64,
    /// `UploadPart` requests that carried `Content-MD5`.
    pub parts_with_md5: AtomicU64,
    /// Response body bytes passed on.
    pub response_bytes: AtomicU64,
    /// Request body bytes passed on.
    pub request_bytes: AtomicU64,
}

/// A running relay.
pub struct Relay {
    /// Where to reach the store through it.
    pub addr: SocketAddr,
    /// What it saw.
    pub seen: Arc<Seen>,
    down: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Relays to `upstream`, behaving as `strict` says.
    pub async fn start(upstream: SocketAddr, strict: Strict) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let down = Arc::new(AtomicBool::new(false));
        let damaged = Arc::new(AtomicBool::new(false));
        let (seen2, down2) = (Arc::clone(&seen), Arc::clone(&down));
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if down2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let conn = Connection {
                    strict,
                    seen: Arc::clone(&seen2),
                    down: Arc::clone(&down2),
                    damaged: Arc::clone(&damaged),
                };
                tokio::spawn(conn.serve(client, server));
            }
        });
        Self {
            addr,
            seen,
            down,
            task,
        }
    }

    /// The endpoint URL of the store through the relay.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Takes the store away (refusing new connections and cutting the
    /// open ones) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// The request lines seen so far.
    pub fn requests(&self) -> Vec<String> {
        self.seen.requests.lock().unwrap().clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Connection {
    strict: Strict,
    seen: Arc<Seen>,
    down: Arc<AtomicBool>,
    damaged: Arc<AtomicBool>,
}

/// A message head: its lines, and its body's framing.
struct Head {
    raw: Vec<u8>,
    first_line: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn content_length(&self) -> u64 {
        self.header("content-length")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Where in the object a response body starts: its `Content-Range`'s
    /// first byte, or 0.
    fn range_start(&self) -> u64 {
        self.header("content-range")
            .and_then(|v| v.strip_prefix("bytes "))
            .and_then(|v| v.split('-').next())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    fn chunked(&self) -> bool {
        self.header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    }
}

async fn read_head(reader: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> Option<Head> {
    let mut raw = Vec::new();
    loop {
        let before = raw.len();
        let n = reader.read_until(b'\n', &mut raw).await.ok()?;
        if n == 0 {
            return None;
        }
        if &raw[before..] == b"\r\n" {
            break;
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let mut lines = text.split("\r\n");
    let first_line = lines.next()?.to_owned();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Some(Head {
        raw,
        first_line,
        headers,
    })
}

impl Connection {
    async fn serve(self, client: TcpStream, server: TcpStream) {
        let (client_rx, mut client_tx) = client.into_split();
        let (server_rx, mut server_tx) = server.into_split();
        let mut from_client = BufReader::new(client_rx);
        let mut from_server = BufReader::new(server_rx);
        while let Some(request) = read_head(&mut from_client).await {
            if self.down.load(Ordering::SeqCst) {
                return;
            }
            self.seen
                .requests
                .lock()
                .unwrap()
                .push(request.first_line.clone());
            let method = request
                .first_line
                .split(' ')
                .next()
                .unwrap_or_default()
                .to_owned();
            if let Some((reply, chunked)) = self.refusal(&request, &method) {
                // Read the body away, then answer for the store.
                if copy_body(
                    &mut from_client,
                    None,
                    request.content_length(),
                    self.strict.rate,
                    None,
                    None,
                )
                .await
                .is_err()
                {
                    return;
                }
                let counter = if chunked {
                    &self.seen.refused_aws_chunked
                } else {
                    &self.seen.refused
                };
                counter.fetch_add(1, Ordering::SeqCst);
                if client_tx.write_all(&reply).await.is_err() {
                    return;
                }
                continue;
            }
            let is_part = method == "PUT" && request.first_line.contains("partNumber=");
            if is_part && request.header("content-md5").is_some() {
                self.seen.parts_with_md5.fetch_add(1, Ordering::SeqCst);
            }
            let damage =
                is_part && self.strict.damage_first_part && !self.damaged.swap(true, Ordering::SeqCst);
            if server_tx.write_all(&request.raw).await.is_err() {
                return;
            }
            let len = request.content_length();
            let flip = damage.then_some(len / 2);
            let to = Some(&mut server_tx);
            if copy_body(
                &mut from_client,
                to,
                len,
                self.strict.rate,
                Some(&self.down),
                flip,
            )
            .await
            .is_err()
            {
                return;
            }
            self.seen.request_bytes.fetch_add(len, Ordering::SeqCst);
            let Some(response) = read_head(&mut from_server).await else {
                return;
            };
            if client_tx.write_all(&response.raw).await.is_err() {
                return;
            }
            let status: u16 = response
                .first_line
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let bodiless = method == "HEAD" || status == 204 || status == 304 || (100..200).contains(&status);
            let relayed = if bodiless {
                Ok(0)
            } else if response.chunked() {
                copy_chunked(&mut from_server, &mut client_tx, self.strict.rate, &self.down).await
            } else {
                let len = response.content_length();
                let flip = match (method.as_str(), self.strict.flip_object_byte) {
                    ("GET", Some(at)) => {
                        let start = response.range_start();
                        (start..start + len).contains(&at).then(|| at - start)
                    }
                    _ => None,
                };
                copy_body(
                    &mut from_server,
                    Some(&mut client_tx),
                    len,
                    self.strict.rate,
                    Some(&self.down),
                    flip,
                )
                .await
                .map(|()| len)
            };
            match relayed {
                Ok(n) => {
                    self.seen.response_bytes.fetch_add(n, Ordering::SeqCst);
                }
                Err(()) => return,
            }
        }
    }

    /// The reply a strict store gives `request` instead of serving it, and
    /// whether it is for an `aws-chunked` body.
    fn refusal(&self, request: &Head, method: &str) -> Option<(Vec<u8>, bool)> {
        let strict = self.strict;
        let checksum_header = request.headers.iter().find(|(name, _)| {
            let name = name.to_ascii_lowercase();
            name.starts_with("x-amz-checksum-") || name == "x-amz-sdk-checksum-algorithm"
        });
        if strict.refuse_checksum_headers
            && let Some((name, _)) = checksum_header
        {
            if method == "HEAD" {
                return Some((
                    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n".to_vec(),
                    false,
                ));
            }
            let body = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>InvalidArgument</Code>\
                 <Message>Unsupported header '{}' received for this API call.</Message></Error>",
                name.to_ascii_lowercase()
            );
            return Some((reply(400, &body), false));
        }
        let chunked = request
            .header("content-encoding")
            .is_some_and(|v| v.contains("aws-chunked"));
        if strict.refuse_aws_chunked && chunked {
            let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>InvalidArgument</Code>\
                        <Message>aws-chunked encoding is not supported with the specified x-amz-content-sha256 \
                        value.</Message><EC>0017-00000804</EC></Error>";
            return Some((reply(400, body), true));
        }
        None
    }
}

fn reply(status: u16, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} Bad Request\r\ncontent-type: application/xml\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Copies `len` body bytes from `from` to `to` (or drops them), at `rate`
/// bytes a second if given, inverting the byte at offset `flip` if given;
/// fails when either side fails or the relay goes down.
async fn copy_body(
    from: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    mut to: Option<&mut tokio::net::tcp::OwnedWriteHalf>,
    len: u64,
    rate: Option<u64>,
    down: Option<&AtomicBool>,
    flip: Option<u64>,
) -> Result<(), ()> {
    let mut left = len;
    let mut buf = vec![0u8; 64 << 10];
    while left > 0 {
        if down.is_some_and(|d| d.load(Ordering::SeqCst)) {
            return Err(());
        }
        let want = buf.len().min(left as usize);
        let n = from.read(&mut buf[..want]).await.map_err(|_| ())?;
        if n == 0 {
            return Err(());
        }
        let at = len - left;
        if let Some(flip) = flip.filter(|f| (at..at + n as u64).contains(f)) {
            buf[(flip - at) as usize] ^= 0xff;
        }
        if let Some(to) = to.as_deref_mut() {
            to.write_all(&buf[..n]).await.map_err(|_| ())?;
        }
        left -= n as u64;
        if let Some(rate) = rate {
            tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64)).await;
        }
    }
    Ok(())
}

/// Copies a chunked body through, returning its data bytes.
async fn copy_chunked(
    from: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    rate: Option<u64>,
    down: &AtomicBool,
) -> Result<u64, ()> {
    let mut total = 0;
    loop {
        let mut line = Vec::new();
        from.read_until(b'\n', &mut line).await.map_err(|_| ())?;
        to.write_all(&line).await.map_err(|_| ())?;
        let size_text = String::from_utf8_lossy(&line);
        let size =
            u64::from_str_radix(size_text.trim().split(';').next().unwrap_or("0"), 16).map_err(|_| ())?;
        if size == 0 {
            // Trailers, then the empty line.
            loop {
                let mut trailer = Vec::new();
                from.read_until(b'\n', &mut trailer).await.map_err(|_| ())?;
                to.write_all(&trailer).await.map_err(|_| ())?;
                if trailer == b"\r\n" || trailer.is_empty() {
                    return Ok(total);
                }
            }
        }
        copy_body(from, Some(to), size + 2, rate, Some(down), None).await?;
        total += size;
    }
}
