//! Hostile sockets: each connects, completes the WebSocket handshake, and then misbehaves in
//! one way while never reading a byte. How long the edge takes to close each one is watched
//! from the socket's readiness (the peer's FIN or RST), so the watching reads nothing either.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::Interest;
use tokio::net::{TcpSocket, TcpStream};

use crate::edge::client::RawSocket;
use crate::wire::client::{Encoding, encode_hello};

/// How a hostile socket misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Completes the handshake, never says hello, and sends pings as fast as the socket takes
    /// them, never reading the pongs.
    PingFlood,
    /// Completes the handshake and then sends nothing at all.
    NoHello,
    /// Authenticates with valid credentials, then never reads and never answers a ping.
    AuthenticatedNonReader,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::PingFlood, Kind::NoHello, Kind::AuthenticatedNonReader];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::PingFlood => "ping_flood",
            Kind::NoHello => "no_hello",
            Kind::AuthenticatedNonReader => "authenticated_non_reader",
        }
    }
}

/// What became of one hostile socket.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    /// The TCP connection itself failed.
    ConnectFailed,
    /// The edge closed it before or during the WebSocket handshake (a limit at accept).
    RefusedAtAccept { after: Duration },
    /// Connected; the edge closed it this long after the handshake.
    Closed { after: Duration },
    /// Still open when watching stopped.
    StillOpen,
}

pub struct Target {
    pub url: String,
    pub addr: SocketAddr,
    /// Local address to connect from (a loopback alias spreads sockets over sources).
    pub source: Option<IpAddr>,
}

/// Wait until the peer closes the socket (FIN or RST), without reading from it; `None` when
/// `until` comes first.
async fn closed_by_peer(stream: &TcpStream, until: Instant) -> Option<Instant> {
    loop {
        if Instant::now() >= until {
            return None;
        }
        let left = until - Instant::now();
        match tokio::time::timeout(left.min(Duration::from_millis(100)), async {
            stream.ready(Interest::READABLE).await
        })
        .await
        {
            Ok(Ok(ready)) if ready.is_read_closed() || ready.is_error() => {
                return Some(Instant::now());
            }
            Ok(Err(_)) => return Some(Instant::now()),
            // Readable (unread data) or nothing yet: look again shortly.
            Ok(Ok(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(_) => {}
        }
    }
}

/// One hostile socket, from connect until the edge closes it or `until` passes.
pub async fn run(
    target: &Target,
    kind: Kind,
    credentials: Option<(String, String)>,
    until: Instant,
) -> Outcome {
    let connected = async {
        let socket = match target.addr {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }?;
        if let Some(ip) = target.source {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        socket.connect(target.addr).await
    };
    let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(10), connected).await else {
        return Outcome::ConnectFailed;
    };
    let started = Instant::now();
    let handshake = RawSocket::handshake(&target.url, stream);
    let mut ws = match tokio::time::timeout(Duration::from_secs(10), handshake).await {
        Ok(Ok(ws)) => ws,
        _ => {
            return Outcome::RefusedAtAccept {
                after: started.elapsed(),
            };
        }
    };
    let handshaken = Instant::now();
    match kind {
        Kind::PingFlood => {
            // Pings until the socket stops taking them (the edge's pongs fill our unread
            // receive buffer, then its own send buffer) or the edge closes it.
            while Instant::now() < until {
                let ping = ws.ping(vec![0u8; 125]);
                match tokio::time::timeout(Duration::from_secs(1), ping).await {
                    Ok(Ok(())) => {}
                    _ => break,
                }
            }
        }
        Kind::NoHello => {}
        Kind::AuthenticatedNonReader => {
            if let Some((id, token)) = &credentials {
                let hello = encode_hello(id, token, Encoding::MsgPack);
                let _ = tokio::time::timeout(Duration::from_secs(5), ws.send_binary(hello)).await;
            }
        }
    }
    match closed_by_peer(ws.tcp(), until).await {
        Some(at) => Outcome::Closed {
            after: at - handshaken,
        },
        None => Outcome::StillOpen,
    }
}
