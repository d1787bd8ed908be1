//! The bounded HTTP server every listener of ours runs (the admin API and the console,
//! `/metrics`): how many connections it holds, how many from one address, how long a request's
//! headers may take, and how long a connection may sit idle.
//!
//! The places are shared fairly: one address may hold at most `max_connections_per_address`
//! of them, and when the listener is full a newcomer from an address that holds fewer than
//! the address holding most takes that address's oldest place. So sockets held open from a
//! few addresses, however many, cannot keep an operator from another address out, and
//! sockets that trickle a request's headers are closed at the header deadline.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// The bounds every HTTP listener keeps.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Connections held at once.
    pub max_connections: usize,
    /// Connections one address may hold at once.
    pub max_connections_per_address: usize,
    /// How long a connection may send nothing or take nothing before it is closed.
    pub idle_timeout: Duration,
    /// How long a request's headers may take to arrive, from the moment the server waits for
    /// them, however they trickle in.
    pub header_timeout: Duration,
}

impl HttpLimits {
    pub fn of(cfg: &crate::config::Config) -> Self {
        Self {
            max_connections: cfg.http_max_connections,
            max_connections_per_address: cfg.http_max_connections_per_address,
            idle_timeout: Duration::from_millis(cfg.http_idle_timeout_ms),
            header_timeout: Duration::from_millis(cfg.http_header_timeout_ms),
        }
    }
}

/// Why a connection lost, or never got, its place: the `reason` label of the listeners'
/// `..._connections_refused_total` counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The listener was full and the newcomer's address held as many as any other.
    Full,
    /// The newcomer's address already held `max_connections_per_address`.
    PerAddress,
    /// A held connection closed to make room for an address that held fewer.
    Evicted,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::PerAddress => "per_address",
            Self::Evicted => "evicted",
        }
    }
}

/// Who holds the places: per address, the connections in the order they came.
#[derive(Default)]
struct Places {
    by_address: HashMap<IpAddr, Vec<(u64, CancellationToken)>>,
    held: usize,
    next: u64,
}

impl Places {
    /// Admit a connection from `ip`, or say why not. On admission, also the place taken from
    /// another address to make room (already cancelled).
    fn admit(
        &mut self,
        ip: IpAddr,
        limits: &HttpLimits,
    ) -> Result<(u64, CancellationToken, bool), Refusal> {
        let own = self.by_address.get(&ip).map_or(0, Vec::len);
        if own >= limits.max_connections_per_address {
            return Err(Refusal::PerAddress);
        }
        let mut evicted = false;
        if self.held >= limits.max_connections {
            // The address holding most gives up its oldest place, if it holds at least two
            // more than the newcomer's (so two addresses never take turns evicting each other).
            let heaviest = self
                .by_address
                .iter()
                .max_by_key(|(_, held)| held.len())
                .map(|(ip, held)| (*ip, held.len()));
            match heaviest {
                Some((victim, n)) if n > own + 1 => {
                    let (_, token) = self.remove_oldest(victim);
                    token.cancel();
                    evicted = true;
                }
                _ => return Err(Refusal::Full),
            }
        }
        let id = self.next;
        self.next += 1;
        let token = CancellationToken::new();
        self.by_address
            .entry(ip)
            .or_default()
            .push((id, token.clone()));
        self.held += 1;
        Ok((id, token, evicted))
    }

    fn remove_oldest(&mut self, ip: IpAddr) -> (u64, CancellationToken) {
        let held = self
            .by_address
            .get_mut(&ip)
            .expect("the address holds places");
        let oldest = held.remove(0);
        if held.is_empty() {
            self.by_address.remove(&ip);
        }
        self.held -= 1;
        oldest
    }

    /// Give back connection `id`'s place, unless it was already taken from it.
    fn release(&mut self, ip: IpAddr, id: u64) {
        let Some(held) = self.by_address.get_mut(&ip) else {
            return;
        };
        let Some(at) = held.iter().position(|(i, _)| *i == id) else {
            return;
        };
        held.remove(at);
        if held.is_empty() {
            self.by_address.remove(&ip);
        }
        self.held -= 1;
    }
}

/// The address a listener's peer connected from.
pub trait PeerAddress {
    fn ip(&self) -> IpAddr;
}

impl PeerAddress for SocketAddr {
    fn ip(&self) -> IpAddr {
        SocketAddr::ip(self)
    }
}

/// A listener that keeps [`HttpLimits`]' places: a connection that gets none is closed as it
/// is accepted, and counted under its [`Refusal`]; every connection's reads and writes time
/// out after `idle_timeout` without progress, which ends it.
pub struct Guarded<L> {
    inner: L,
    limits: HttpLimits,
    places: Arc<Mutex<Places>>,
    refused: prometheus::IntCounterVec,
}

impl<L> Guarded<L> {
    /// `refused` is labelled by `reason` ([`Refusal::label`]).
    pub fn new(inner: L, limits: HttpLimits, refused: prometheus::IntCounterVec) -> Self {
        Self {
            inner,
            limits,
            places: Arc::default(),
            refused,
        }
    }
}

/// A connection's place; given back when the connection ends.
struct Place {
    places: Arc<Mutex<Places>>,
    ip: IpAddr,
    id: u64,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.places
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .release(self.ip, self.id);
    }
}

/// A connection of a [`Guarded`] listener: its place, its time-bounded stream, and the signal
/// that its place was given to another address.
pub struct GuardedIo<S> {
    io: Pin<Box<tokio_io_timeout::TimeoutStream<S>>>,
    evicted: Pin<Box<WaitForCancellationFutureOwned>>,
    _place: Place,
}

impl<S> GuardedIo<S> {
    /// An error once the place was taken; polling registers the waker, so an idle connection
    /// waiting on a read ends as soon as it is evicted.
    fn check_evicted(&mut self, cx: &mut Context<'_>) -> Option<std::io::Error> {
        self.evicted.as_mut().poll(cx).is_ready().then(|| {
            std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the connection's place went to another address",
            )
        })
    }
}

use std::future::Future as _;

impl<S: AsyncRead + AsyncWrite> AsyncRead for GuardedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(e) = self.check_evicted(cx) {
            return Poll::Ready(Err(e));
        }
        self.io.as_mut().poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite> AsyncWrite for GuardedIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(e) = self.check_evicted(cx) {
            return Poll::Ready(Err(e));
        }
        self.io.as_mut().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.io.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.io.as_mut().poll_shutdown(cx)
    }
}

impl<L> Guarded<L>
where
    L: axum::serve::Listener,
    L::Addr: PeerAddress,
{
    async fn accept(&mut self) -> (GuardedIo<L::Io>, L::Addr) {
        loop {
            let (io, addr) = self.inner.accept().await;
            let ip = addr.ip();
            let admitted = self
                .places
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .admit(ip, &self.limits);
            match admitted {
                Ok((id, token, evicted)) => {
                    if evicted {
                        self.refused
                            .with_label_values(&[Refusal::Evicted.label()])
                            .inc();
                    }
                    let mut io = tokio_io_timeout::TimeoutStream::new(io);
                    io.set_read_timeout(Some(self.limits.idle_timeout));
                    io.set_write_timeout(Some(self.limits.idle_timeout));
                    let place = Place {
                        places: self.places.clone(),
                        ip,
                        id,
                    };
                    return (
                        GuardedIo {
                            io: Box::pin(io),
                            evicted: Box::pin(token.cancelled_owned()),
                            _place: place,
                        },
                        addr,
                    );
                }
                // No place: this one is closed at once (dropped), the others keep theirs.
                Err(why) => self.refused.with_label_values(&[why.label()]).inc(),
            }
        }
    }
}

/// How long a connection may take to finish its request once shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serve `app` on `listener` until `shutdown`. Each connection is HTTP/1.1 with the header
/// deadline of the listener's limits; on shutdown a connection finishes the request in flight
/// (for at most [`SHUTDOWN_GRACE`]) and is closed.
pub async fn serve<L>(mut listener: Guarded<L>, app: Router, shutdown: CancellationToken)
where
    L: axum::serve::Listener,
    L::Addr: PeerAddress,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    let header_timeout = listener.limits.header_timeout;
    loop {
        let (io, _addr) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => return,
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = builder.serve_connection(TokioIo::new(io), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "HTTP connection ended");
                    }
                }
                () = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, per_address: usize) -> HttpLimits {
        HttpLimits {
            max_connections: max,
            max_connections_per_address: per_address,
            idle_timeout: Duration::from_secs(60),
            header_timeout: Duration::from_secs(10),
        }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn one_address_holds_at_most_its_share() {
        let l = limits(10, 3);
        let mut p = Places::default();
        for _ in 0..3 {
            p.admit(ip(1), &l).unwrap();
        }
        assert_eq!(p.admit(ip(1), &l).unwrap_err(), Refusal::PerAddress);
        assert!(p.admit(ip(2), &l).is_ok());
        assert_eq!(p.held, 4);
    }

    #[test]
    fn a_full_listener_takes_the_oldest_place_of_the_address_holding_most() {
        let l = limits(4, 4);
        let mut p = Places::default();
        let held: Vec<_> = (0..4).map(|_| p.admit(ip(1), &l).unwrap()).collect();
        let (_, _, evicted) = p.admit(ip(2), &l).unwrap();
        assert!(evicted);
        assert!(held[0].1.is_cancelled(), "the oldest place went");
        assert!(held[1..].iter().all(|(_, t, _)| !t.is_cancelled()));
        assert_eq!(p.held, 4);
        // The evicted connection's own release later is a no-op.
        p.release(ip(1), held[0].0);
        assert_eq!(p.held, 4);
        // ip(2) may take another (ip(1) holds 3 > 1 + 1), but not a third once even.
        assert!(p.admit(ip(2), &l).unwrap().2);
        assert_eq!(p.admit(ip(2), &l).unwrap_err(), Refusal::Full);
    }

    #[test]
    fn addresses_holding_one_each_are_not_evicted_for_each_other() {
        let l = limits(3, 3);
        let mut p = Places::default();
        for last in 1..=3 {
            p.admit(ip(last), &l).unwrap();
        }
        assert_eq!(p.admit(ip(4), &l).unwrap_err(), Refusal::Full);
    }

    #[test]
    fn places_given_back_are_taken_again() {
        let l = limits(2, 2);
        let mut p = Places::default();
        let (a, _, _) = p.admit(ip(1), &l).unwrap();
        p.admit(ip(2), &l).unwrap();
        assert_eq!(p.admit(ip(3), &l).unwrap_err(), Refusal::Full);
        p.release(ip(1), a);
        assert!(!p.admit(ip(3), &l).unwrap().2);
        assert!(!p.by_address.contains_key(&ip(1)));
    }
}
