//! Vigil's own WebSocket client: the demo streamer, the benchmarks and the tests speak the
//! real protocol through it.

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::wire::client::{self, Encoding, ProtocolError, ServerMsg};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("websocket: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("unexpected server message: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("refused: {code} ({message})")]
    Refused { code: String, message: String },
    #[error("connection closed by the server: code {code} {reason}")]
    Closed { code: u16, reason: String },
    #[error("expected a welcome, got {0:?}")]
    NoWelcome(Box<ServerMsg>),
    #[error("TLS trust: {0}")]
    Trust(String),
}

/// What the server sent.
// Identity results are built once per frame and moved along, never stored in bulk; boxing
// them would cost an allocation per frame to save stack bytes.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Msg(ServerMsg),
    /// The server closed the socket with this code.
    Closed {
        code: u16,
        reason: String,
    },
}

/// A WebSocket over a TCP stream its caller connected, that sends what it is told and never
/// reads (`vigil attack`'s hostile sockets). Writes are not buffered.
pub struct RawSocket {
    ws: Ws,
}

impl RawSocket {
    /// The WebSocket handshake for `url` on `stream` (TLS for `wss://`, against the system's
    /// roots).
    pub async fn handshake(url: &str, stream: TcpStream) -> Result<Self, ClientError> {
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .write_buffer_size(0);
        let (ws, _) =
            tokio_tungstenite::client_async_tls_with_config(url, stream, Some(config), None)
                .await?;
        Ok(Self { ws })
    }

    /// Send a ping carrying `payload` (at most 125 bytes).
    pub async fn ping(&mut self, payload: Vec<u8>) -> Result<(), ClientError> {
        Ok(self.ws.send(Message::Ping(payload.into())).await?)
    }

    /// Send one binary message.
    pub async fn send_binary(&mut self, bytes: Vec<u8>) -> Result<(), ClientError> {
        Ok(self.ws.send(Message::Binary(bytes.into())).await?)
    }

    /// The TCP stream under the WebSocket (and under TLS), to watch without reading.
    pub fn tcp(&self) -> &TcpStream {
        match self.ws.get_ref() {
            MaybeTlsStream::Plain(s) => s,
            MaybeTlsStream::Rustls(s) => s.get_ref().0,
            _ => unreachable!("only plain and rustls streams are built here"),
        }
    }
}

/// A connected, not yet authenticated WebSocket.
pub struct Connection {
    ws: Ws,
    encoding: Encoding,
}

impl Connection {
    /// Open the socket; nothing is sent yet.
    pub async fn open(url: &str, encoding: Encoding) -> Result<Self, ClientError> {
        // Same read-buffer reasoning as the edge: a small buffer is zeroed per read attempt.
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(16 * 1024)
            .write_buffer_size(0);
        let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true).await?;
        Ok(Self { ws, encoding })
    }

    /// Open a `wss://` socket that trusts the certificate authorities in `ca_pem` (PEM), for
    /// an edge whose certificate is not from a public CA (a private one, or the tests').
    pub async fn open_tls(
        url: &str,
        encoding: Encoding,
        ca_pem: &[u8],
    ) -> Result<Self, ClientError> {
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::pki_types::CertificateDer;
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        let trust = |e: &dyn std::fmt::Display| ClientError::Trust(e.to_string());
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            roots
                .add(cert.map_err(|e| trust(&e))?)
                .map_err(|e| trust(&e))?;
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| trust(&e))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(16 * 1024)
            .write_buffer_size(0);
        let (ws, _) = tokio_tungstenite::connect_async_tls_with_config(
            url,
            Some(config),
            true,
            Some(tokio_tungstenite::Connector::Rustls(std::sync::Arc::new(
                tls,
            ))),
        )
        .await?;
        Ok(Self { ws, encoding })
    }

    /// Send raw bytes as a text message (tests of bad input).
    pub async fn send_text(&mut self, text: impl Into<String>) -> Result<(), ClientError> {
        self.ws.send(Message::Text(text.into().into())).await?;
        Ok(())
    }

    /// Send raw bytes as a binary message (raw JPEG frames, bad input).
    pub async fn send_binary(&mut self, bytes: Vec<u8>) -> Result<(), ClientError> {
        self.ws.send(Message::Binary(bytes.into())).await?;
        Ok(())
    }

    async fn send_encoded(&mut self, bytes: Vec<u8>) -> Result<(), ClientError> {
        self.ws.send(message(bytes, self.encoding)).await?;
        Ok(())
    }

    pub async fn send_hello(&mut self, client_id: &str, token: &str) -> Result<(), ClientError> {
        self.send_encoded(client::encode_hello(client_id, token, self.encoding))
            .await
    }

    pub async fn send_frame(
        &mut self,
        seq: u64,
        captured_at_ms: u64,
        jpeg: &[u8],
    ) -> Result<(), ClientError> {
        self.send_encoded(client::encode_frame(
            seq,
            captured_at_ms,
            jpeg,
            self.encoding,
        ))
        .await
    }

    /// The next server message or close; `None` once the socket is done.
    pub async fn recv(&mut self) -> Option<Result<Incoming, ClientError>> {
        next_incoming(&mut self.ws).await
    }

    /// Say hello and wait for the welcome.
    pub async fn authenticate(
        &mut self,
        client_id: &str,
        token: &str,
    ) -> Result<ServerMsg, ClientError> {
        self.send_hello(client_id, token).await?;
        match self.recv().await {
            Some(Ok(Incoming::Msg(msg @ ServerMsg::Welcome { .. }))) => Ok(msg),
            Some(Ok(Incoming::Msg(ServerMsg::Error { code, message }))) => {
                Err(ClientError::Refused {
                    code: serde_json::to_value(code)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    message,
                })
            }
            Some(Ok(Incoming::Msg(other))) => Err(ClientError::NoWelcome(Box::new(other))),
            Some(Ok(Incoming::Closed { code, reason })) => {
                Err(ClientError::Closed { code, reason })
            }
            Some(Err(e)) => Err(e),
            None => Err(ClientError::Closed {
                code: 1006,
                reason: "closed before welcome".into(),
            }),
        }
    }

    /// Connect and authenticate in one step.
    pub async fn connect(
        url: &str,
        client_id: &str,
        token: &str,
        encoding: Encoding,
    ) -> Result<(Self, ServerMsg), ClientError> {
        let mut conn = Self::open(url, encoding).await?;
        let welcome = conn.authenticate(client_id, token).await?;
        Ok((conn, welcome))
    }

    /// Split into a sending half and a receiving half, for pipelined streaming.
    pub fn split(self) -> (Sender, Receiver) {
        let (sink, stream) = self.ws.split();
        (
            Sender {
                sink,
                encoding: self.encoding,
            },
            Receiver { stream },
        )
    }

    /// Close politely.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// An encoded client message as a WebSocket message: text for JSON, binary for MessagePack.
fn message(bytes: Vec<u8>, encoding: Encoding) -> Message {
    match encoding {
        Encoding::Json => Message::Text(
            String::from_utf8(bytes)
                .expect("json encoder writes utf-8")
                .into(),
        ),
        Encoding::MsgPack => Message::Binary(bytes.into()),
    }
}

async fn next_incoming<S>(stream: &mut S) -> Option<Result<Incoming, ClientError>>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let msg = match stream.next().await? {
            Ok(m) => m,
            Err(e) => return Some(Err(e.into())),
        };
        let decoded = match msg {
            Message::Text(text) => ServerMsg::decode(text.as_bytes(), Encoding::Json),
            Message::Binary(bytes) => ServerMsg::decode(&bytes, Encoding::MsgPack),
            Message::Close(frame) => {
                let (code, reason) = frame
                    .map(|f| (u16::from(f.code), f.reason.to_string()))
                    .unwrap_or((1005, String::new()));
                return Some(Ok(Incoming::Closed { code, reason }));
            }
            _ => continue,
        };
        return Some(decoded.map(Incoming::Msg).map_err(ClientError::from));
    }
}

/// Sending half of a split connection.
pub struct Sender {
    sink: SplitSink<Ws, Message>,
    encoding: Encoding,
}

impl Sender {
    pub async fn send_frame(
        &mut self,
        seq: u64,
        captured_at_ms: u64,
        jpeg: &[u8],
    ) -> Result<(), ClientError> {
        let bytes = client::encode_frame(seq, captured_at_ms, jpeg, self.encoding);
        self.sink.send(message(bytes, self.encoding)).await?;
        Ok(())
    }

    pub async fn close(mut self) {
        let _ = self.sink.send(Message::Close(None)).await;
    }
}

/// Receiving half of a split connection.
pub struct Receiver {
    stream: SplitStream<Ws>,
}

impl Receiver {
    pub async fn recv(&mut self) -> Option<Result<Incoming, ClientError>> {
        next_incoming(&mut self.stream).await
    }
}
