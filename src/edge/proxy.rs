//! The client's real address behind a load balancer: the PROXY protocol, version 2, as HAProxy
//! sends it with `send-proxy-v2`.
//!
//! The header is taken only from peers in `edge.trusted_proxies`, before anything else on the
//! connection (before TLS, when the edge terminates it). From a trusted peer it is optional: a
//! connection without one keeps the peer's own address. From any other peer, a connection
//! that starts with a PROXY header (v2, or v1's `PROXY `) is refused. An untrusted client could
//! otherwise claim any address it likes and slip out of its per-address limits. The header is
//! parsed by the `ppp` crate.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;

/// The longest PROXY v2 header read: its fixed 16 bytes and up to this many bytes of addresses
/// and TLVs. HAProxy's, with addresses and no TLVs, is 28 (IPv4) or 52 (IPv6) bytes long.
pub const MAX_HEADER_BYTES: usize = 1024;

/// The v2 header's fixed part: signature, version and command, family, length.
const FIXED_BYTES: usize = 16;
/// The v2 header's first 12 bytes.
const V2_SIGNATURE: &[u8] = ppp::v2::PROTOCOL_PREFIX;
const V1_SIGNATURE: &[u8] = b"PROXY ";

/// Networks whose peers may tell the client's address with a PROXY header: a list of CIDRs in
/// the config file, comma-separated in the environment.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(try_from = "Vec<String>")]
pub struct TrustedProxies(Vec<IpNet>);

impl TryFrom<Vec<String>> for TrustedProxies {
    type Error = String;

    fn try_from(list: Vec<String>) -> Result<Self, Self::Error> {
        list.iter()
            .map(|s| {
                let s = s.trim();
                // A bare address is a network of one.
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("`{s}` is not an address or a CIDR network"))
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }
}

impl std::str::FromStr for TrustedProxies {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::try_from(
            s.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>(),
        )
    }
}

impl TrustedProxies {
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|net| net.contains(&ip))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// An IPv4 address as itself, also when it arrives IPv4-mapped in IPv6.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// What came before the client's own bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preamble {
    /// No PROXY header: the peer is the client.
    None,
    /// The client's address, from a trusted proxy's header.
    Client(SocketAddr),
    /// A trusted proxy's header that names no client (`LOCAL`, its own health checks).
    Local,
}

/// Why a connection's preamble was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("a PROXY header from a peer that is not a trusted proxy")]
    Untrusted,
    #[error("a PROXY v1 header: configure the proxy to send v2 (`send-proxy-v2`)")]
    Version1,
    #[error("a PROXY header longer than {MAX_HEADER_BYTES} bytes")]
    TooLong,
    #[error("a malformed PROXY header: {0}")]
    Malformed(String),
    #[error("the connection ended or stalled before its first bytes")]
    Closed,
}

impl ProxyError {
    /// The `vigil_edge_sessions_refused_total` reason.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::Untrusted => "proxy_untrusted",
            ProxyError::Version1 | ProxyError::TooLong | ProxyError::Malformed(_) => {
                "proxy_malformed"
            }
            ProxyError::Closed => "disconnected",
        }
    }
}

/// How the first bytes of a connection begin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// Too few bytes to tell yet.
    Unsure,
    V2,
    V1,
    Other,
}

fn classify(bytes: &[u8]) -> Start {
    let matches = |sig: &[u8]| {
        let n = bytes.len().min(sig.len());
        bytes[..n] == sig[..n]
    };
    match (matches(V2_SIGNATURE), matches(V1_SIGNATURE)) {
        (true, _) if bytes.len() >= FIXED_BYTES => Start::V2,
        (_, true) if bytes.len() >= V1_SIGNATURE.len() => Start::V1,
        (true, _) | (_, true) => Start::Unsure,
        _ => Start::Other,
    }
}

/// Read the PROXY header that a `trusted` peer may send before anything else, within
/// `timeout`. Bytes that are not a PROXY header are left in the socket for TLS or HTTP.
pub async fn read_preamble(
    stream: &mut TcpStream,
    trusted: bool,
    timeout: Duration,
) -> Result<Preamble, ProxyError> {
    tokio::time::timeout(timeout, read(stream, trusted))
        .await
        .unwrap_or(Err(ProxyError::Closed))
}

async fn read(stream: &mut TcpStream, trusted: bool) -> Result<Preamble, ProxyError> {
    let mut head = [0u8; 16];
    loop {
        let n = stream
            .peek(&mut head)
            .await
            .map_err(|_| ProxyError::Closed)?;
        if n == 0 {
            return Err(ProxyError::Closed);
        }
        match classify(&head[..n]) {
            Start::Other => return Ok(Preamble::None),
            Start::V1 if trusted => return Err(ProxyError::Version1),
            Start::V1 | Start::V2 if !trusted => return Err(ProxyError::Untrusted),
            // From anyone else, one look is all: a header cut short is not valid HTTP either,
            // and the handshake refuses it. No untrusted peer makes the edge poll.
            Start::Unsure if !trusted => return Ok(Preamble::None),
            Start::V2 => break,
            // A trusted proxy's header cut across segments: the rest is on its way (the
            // caller bounds the wait).
            Start::V1 | Start::Unsure => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    if len > MAX_HEADER_BYTES {
        return Err(ProxyError::TooLong);
    }
    let mut header = vec![0u8; FIXED_BYTES + len];
    stream
        .read_exact(&mut header)
        .await
        .map_err(|_| ProxyError::Closed)?;
    let parsed = ppp::v2::Header::try_from(header.as_slice())
        .map_err(|e| ProxyError::Malformed(e.to_string()))?;
    Ok(match (parsed.command, parsed.addresses) {
        (ppp::v2::Command::Local, _) => Preamble::Local,
        (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv4(a)) => {
            Preamble::Client(SocketAddr::from((a.source_address, a.source_port)))
        }
        (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv6(a)) => {
            Preamble::Client(SocketAddr::from((a.source_address, a.source_port)))
        }
        // A UNIX socket or an unspecified family names no network client.
        (ppp::v2::Command::Proxy, _) => Preamble::Local,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt as _;

    fn v2(source: &str) -> Vec<u8> {
        let source: SocketAddr = source.parse().unwrap();
        let dest: SocketAddr = if source.is_ipv4() {
            "10.0.0.2:8080".parse().unwrap()
        } else {
            "[fd00::2]:8080".parse().unwrap()
        };
        ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (source, dest),
        )
        .build()
        .unwrap()
    }

    /// What the edge reads of `bytes`, sent (in two writes, split at `split`) by a peer that
    /// is `trusted` or not, and what is left to read after it.
    async fn preamble(
        bytes: Vec<u8>,
        split: usize,
        trusted: bool,
    ) -> (Result<Preamble, ProxyError>, Vec<u8>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&bytes[..split]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
            s.write_all(&bytes[split..]).await.unwrap();
            s.shutdown().await.unwrap();
        });
        let (mut stream, _) = listener.accept().await.unwrap();
        let got = read_preamble(&mut stream, trusted, Duration::from_secs(2)).await;
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest).await;
        client.await.unwrap();
        (got, rest)
    }

    #[tokio::test]
    async fn a_trusted_proxy_names_the_client_and_the_request_follows_untouched() {
        let mut bytes = v2("203.0.113.7:50123");
        bytes.extend_from_slice(b"GET /v1/stream HTTP/1.1\r\n");
        let (got, rest) = preamble(bytes.clone(), bytes.len(), true).await;
        assert_eq!(
            got,
            Ok(Preamble::Client("203.0.113.7:50123".parse().unwrap()))
        );
        assert_eq!(rest, b"GET /v1/stream HTTP/1.1\r\n");
        // IPv6, and a header cut across two segments.
        let mut bytes = v2("[2001:db8::7]:443");
        bytes.extend_from_slice(b"\x16\x03\x01");
        let (got, rest) = preamble(bytes, 5, true).await;
        assert_eq!(
            got,
            Ok(Preamble::Client("[2001:db8::7]:443".parse().unwrap()))
        );
        assert_eq!(
            rest, b"\x16\x03\x01",
            "a TLS hello after the header is left alone"
        );
    }

    #[tokio::test]
    async fn without_a_header_nothing_is_consumed() {
        let (got, rest) = preamble(b"GET / HTTP/1.1\r\n\r\n".to_vec(), 3, true).await;
        assert_eq!(got, Ok(Preamble::None));
        assert_eq!(rest, b"GET / HTTP/1.1\r\n\r\n");
        let (got, _) = preamble(b"GET / HTTP/1.1\r\n\r\n".to_vec(), 18, false).await;
        assert_eq!(got, Ok(Preamble::None));
    }

    #[tokio::test]
    async fn headers_from_untrusted_peers_and_bad_headers_are_refused() {
        let (got, _) = preamble(v2("198.51.100.1:1"), 28, false).await;
        assert_eq!(got, Err(ProxyError::Untrusted));
        let v1 = b"PROXY TCP4 198.51.100.1 10.0.0.2 1 8080\r\nGET /".to_vec();
        assert_eq!(
            preamble(v1.clone(), 10, false).await.0,
            Err(ProxyError::Untrusted)
        );
        assert_eq!(preamble(v1, 10, true).await.0, Err(ProxyError::Version1));
        let mut long = v2("198.51.100.1:1");
        long[14..16].copy_from_slice(&2000u16.to_be_bytes());
        assert_eq!(preamble(long, 28, true).await.0, Err(ProxyError::TooLong));
        let mut bad = v2("198.51.100.1:1");
        bad[12] = 0x31; // version 3
        assert!(matches!(
            preamble(bad, 28, true).await.0,
            Err(ProxyError::Malformed(_))
        ));
        // A signature prefix and then silence: bounded by the timeout.
        let (got, _) = preamble(V2_SIGNATURE[..6].to_vec(), 6, true).await;
        assert_eq!(got, Err(ProxyError::Closed));
    }

    #[test]
    fn trusted_networks_parse_and_match() {
        let t: TrustedProxies = "10.0.0.0/8, 192.168.1.5,fd00::/8".parse().unwrap();
        assert!(t.trusts("10.1.2.3".parse().unwrap()));
        assert!(t.trusts("192.168.1.5".parse().unwrap()));
        assert!(!t.trusts("192.168.1.6".parse().unwrap()));
        assert!(t.trusts("fd12::1".parse().unwrap()));
        assert!(t.trusts("::ffff:10.9.9.9".parse().unwrap()), "IPv4-mapped");
        assert!(!t.trusts("203.0.113.1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<TrustedProxies>().is_err());
        assert!("".parse::<TrustedProxies>().unwrap().is_empty());
    }
}
