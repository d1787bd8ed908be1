//! The candidate page, served on the edge's own listener beside `/v1/stream`: one port, one
//! certificate, one origin.
//!
//! Every connection's request head is read first (bounded in size and, with the TLS handshake,
//! by the hello timeout). A WebSocket upgrade goes on to the session with the bytes already
//! read put back in front of the stream ([`Rewind`]); any other request gets a file of the page
//! or 404, and the connection closes. The files are read once at start from `VIGIL_WEB_DIR`
//! (`npm run build` in `web/` makes them) into memory, so a request never touches the file
//! system.

use std::collections::HashMap;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};

/// The longest request head read before a request is refused.
pub(crate) const MAX_HEAD_BYTES: usize = 8 * 1024;
/// The most files and the largest file the page may have.
const MAX_FILES: usize = 64;
const MAX_FILE_BYTES: u64 = 4 << 20;

/// The page's files, by request path.
#[derive(Default)]
pub(crate) struct WebAssets {
    files: HashMap<String, (&'static str, Bytes)>,
}

impl WebAssets {
    /// The regular files directly in `dir` (no subfolders, no links followed out of it).
    pub(crate) fn load(dir: &Path) -> Result<Self, String> {
        let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut files = HashMap::new();
        for entry in entries {
            let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
            let meta = entry
                .metadata()
                .map_err(|e| format!("{}: {e}", entry.path().display()))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if !meta.is_file() || name.starts_with('.') {
                continue;
            }
            if meta.len() > MAX_FILE_BYTES || files.len() >= MAX_FILES {
                return Err(format!(
                    "{}: the page may have at most {MAX_FILES} files of at most {MAX_FILE_BYTES} bytes",
                    dir.display()
                ));
            }
            let body = std::fs::read(entry.path())
                .map_err(|e| format!("{}: {e}", entry.path().display()))?;
            files.insert(format!("/{name}"), (content_type(&name), Bytes::from(body)));
        }
        if !files.contains_key("/index.html") {
            return Err(format!("{} has no index.html", dir.display()));
        }
        Ok(Self { files })
    }

    /// A file's content type and body, by request path.
    pub(crate) fn file(&self, path: &str) -> Option<(&'static str, Bytes)> {
        self.get(path).map(|(t, b)| (*t, b.clone()))
    }

    fn get(&self, path: &str) -> Option<&(&'static str, Bytes)> {
        let path = path.split('?').next().unwrap_or("/");
        self.files
            .get(if path == "/" { "/index.html" } else { path })
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    }
}

/// The headers every page response carries: it talks only to its own origin, may use the
/// camera, and nothing may frame it.
pub(crate) const SECURITY_HEADERS: &[(&str, &str)] = &[
    ("cache-control", "no-cache"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("permissions-policy", "camera=(self), microphone=()"),
    (
        "content-security-policy",
        "default-src 'self'; connect-src 'self'; img-src 'self' blob: data:; \
         media-src 'self' blob: mediastream:; worker-src 'self' blob:; object-src 'none'; \
         base-uri 'none'; frame-ancestors 'none'",
    ),
];

/// What the start of a request says.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Head {
    pub method: String,
    pub path: String,
    /// `Upgrade: websocket`.
    pub websocket: bool,
    /// The last address of the last `X-Forwarded-For` header: the one the nearest proxy
    /// appended. Worth anything only from a trusted proxy.
    pub forwarded_for: Option<std::net::IpAddr>,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HeadError {
    /// Not HTTP, or the connection ended first.
    Malformed,
    /// More than [`MAX_HEAD_BYTES`] without the end of the head.
    TooLarge,
}

/// Read until the end of the request head; `buf` keeps every byte read (the head and anything
/// after it), to be replayed to the WebSocket handshake.
pub(crate) async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> Result<Head, HeadError> {
    let mut chunk = [0u8; 2048];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(_)) => {
                let websocket = req.headers.iter().any(|h| {
                    h.name.eq_ignore_ascii_case("upgrade")
                        && std::str::from_utf8(h.value)
                            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("websocket"))
                });
                let forwarded_for = req
                    .headers
                    .iter()
                    .rfind(|h| h.name.eq_ignore_ascii_case("x-forwarded-for"))
                    .and_then(|h| std::str::from_utf8(h.value).ok())
                    .and_then(|v| v.rsplit(',').next())
                    .and_then(|last| last.trim().parse().ok());
                return Ok(Head {
                    method: req.method.unwrap_or_default().to_owned(),
                    path: req.path.unwrap_or_default().to_owned(),
                    websocket,
                    forwarded_for,
                });
            }
            Ok(httparse::Status::Partial) => {}
            Err(_) => return Err(HeadError::Malformed),
        }
        if buf.len() >= MAX_HEAD_BYTES {
            return Err(HeadError::TooLarge);
        }
        let want = chunk.len().min(MAX_HEAD_BYTES - buf.len());
        match stream.read(&mut chunk[..want]).await {
            Ok(0) | Err(_) => return Err(HeadError::Malformed),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Answer one plain HTTP request with a page file (or 404/405/431), within `deadline`.
/// Returns the status sent.
pub(crate) async fn respond<S: AsyncWrite + Unpin>(
    stream: &mut S,
    assets: &WebAssets,
    head: Result<&Head, &HeadError>,
    stream_path: &str,
    deadline: Duration,
) -> u16 {
    let (status, reason, content_type, body) = match head {
        Err(HeadError::TooLarge) => (
            431,
            "Request Header Fields Too Large",
            "text/plain; charset=utf-8",
            Bytes::from_static(b"request head too large\n"),
        ),
        Err(HeadError::Malformed) => (
            400,
            "Bad Request",
            "text/plain; charset=utf-8",
            Bytes::from_static(b"not an HTTP request\n"),
        ),
        Ok(h) if h.method != "GET" && h.method != "HEAD" => (
            405,
            "Method Not Allowed",
            "text/plain; charset=utf-8",
            Bytes::from_static(b"only GET\n"),
        ),
        Ok(h) => match assets.get(&h.path) {
            Some((content_type, body)) => (200, "OK", *content_type, body.clone()),
            None if assets.is_empty() => (
                404,
                "Not Found",
                "text/plain; charset=utf-8",
                Bytes::from(format!(
                    "no page is served here (build it with `npm run build` in web/ and set \
                     VIGIL_WEB_DIR); clients connect to {stream_path}\n"
                )),
            ),
            None => (
                404,
                "Not Found",
                "text/plain; charset=utf-8",
                Bytes::from_static(b"not found\n"),
            ),
        },
    };
    let head_only = matches!(head, Ok(h) if h.method == "HEAD");
    let mut response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in SECURITY_HEADERS {
        response.push_str(&format!("{name}: {value}\r\n"));
    }
    response.push_str("Connection: close\r\n\r\n");
    let write = async {
        stream.write_all(response.as_bytes()).await?;
        if !head_only {
            stream.write_all(&body).await?;
        }
        stream.flush().await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(deadline, write).await;
    status
}

/// A stream with bytes already read from it put back in front.
pub(crate) struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub(crate) fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix: Bytes::from(prefix),
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn head_of(bytes: &[u8]) -> (Result<Head, HeadError>, Vec<u8>) {
        let mut stream = bytes;
        let mut buf = Vec::new();
        let head = read_head(&mut stream, &mut buf).await;
        (head, buf)
    }

    #[tokio::test]
    async fn request_heads_are_read_and_bounded() {
        let upgrade = b"GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nextra";
        let (head, buf) = head_of(upgrade).await;
        assert_eq!(
            head.unwrap(),
            Head {
                method: "GET".into(),
                path: "/v1/stream".into(),
                websocket: true,
                forwarded_for: None,
            }
        );
        // Everything read is kept, to be replayed.
        assert_eq!(buf, upgrade);
        let (head, _) = head_of(b"GET /?client=a HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(!head.unwrap().websocket);
        // The address the nearest proxy appended: the last of the last header.
        let (head, _) = head_of(
            b"GET / HTTP/1.1\r\nX-Forwarded-For: 10.9.9.9\r\nx-forwarded-for: 198.51.100.1, 203.0.113.7\r\n\r\n",
        )
        .await;
        assert_eq!(
            head.unwrap().forwarded_for,
            Some("203.0.113.7".parse().unwrap())
        );
        let (head, _) = head_of(b"GET / HTTP/1.1\r\nX-Forwarded-For: nonsense\r\n\r\n").await;
        assert_eq!(head.unwrap().forwarded_for, None);
        assert_eq!(
            head_of(b"\x16\x03\x01 tls").await.0,
            Err(HeadError::Malformed)
        );
        assert_eq!(
            head_of(b"GET / HTTP/1.1\r\n").await.0,
            Err(HeadError::Malformed)
        );
        let huge = [b"GET / HTTP/1.1\r\nX: ".as_slice(), &[b'a'; 9000]].concat();
        assert_eq!(head_of(&huge).await.0, Err(HeadError::TooLarge));
    }

    #[tokio::test]
    async fn rewind_replays_then_reads_on() {
        let inner: &[u8] = b" world";
        let mut s = Rewind::new(b"hello".to_vec(), inner);
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }

    #[test]
    fn only_the_folders_own_files_are_served() {
        let dir = std::env::temp_dir().join(format!("vigil-web-{}", rand::random::<u64>()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("index.html"), "<h1>hi</h1>").unwrap();
        std::fs::write(dir.join("app.js"), "1").unwrap();
        std::fs::write(dir.join("sub/secret.txt"), "no").unwrap();
        let assets = WebAssets::load(&dir).unwrap();
        assert_eq!(assets.get("/").unwrap().0, "text/html; charset=utf-8");
        assert_eq!(
            assets.get("/?client=a").unwrap().1,
            Bytes::from("<h1>hi</h1>")
        );
        assert!(assets.get("/app.js").is_some());
        for path in ["/sub/secret.txt", "/../Cargo.toml", "/%2e%2e/x", "/sub"] {
            assert!(assets.get(path).is_none(), "{path}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
