//! The bounded HTTP server every listener of ours runs (the admin API and the console,
//! `/metrics`): how many connections it holds, how many from one address, how long a request's
//! headers may take, and how long a connection may sit idle.
//!
//! One address (an IPv4 address, or an IPv6 /64) may hold at most
//! `max_connections_per_address` places. When every place is taken, a newcomer takes the
//! place of the oldest connection that has not yet shown an operator's token
//! ([`Authenticated`]); connections that have are never evicted. So sockets held open, from
//! however many addresses, cannot keep an operator out: to push out an operator's new
//! connection before its request is answered, an attacker would have to open every other
//! place anew in that time. Sockets that trickle a request's headers are closed at the header
//! deadline. With TLS, the place is taken as the TCP connection is accepted, before the
//! handshake, so stalled handshakes count (and are evicted) like any other connection.

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
    /// Every place was taken, by connections that have all shown an operator's token.
    Full,
    /// The newcomer's address already held `max_connections_per_address`.
    PerAddress,
    /// A held connection that had shown no token, closed to make room for a newcomer.
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

/// The key an address's places are counted under: an IPv4 address (also IPv4-mapped), or an
/// IPv6 address's /64, which one subscriber usually holds whole.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        v4 => v4,
    }
}

/// Set once a request on the connection showed a valid operator's token: the connection is
/// then never evicted. Handlers find it in the request's extensions.
#[derive(Debug, Clone, Default)]
pub struct Authenticated(Arc<std::sync::atomic::AtomicBool>);

impl Authenticated {
    pub fn mark(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn is_set(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// One held place.
struct Held {
    id: u64,
    evict: CancellationToken,
    authenticated: Authenticated,
}

/// Who holds the places: per address key, the connections in the order they came.
#[derive(Default)]
struct Places {
    by_address: HashMap<IpAddr, Vec<Held>>,
    held: usize,
    next: u64,
}

/// A place given to a connection.
#[derive(Debug)]
struct Admitted {
    id: u64,
    evict: CancellationToken,
    authenticated: Authenticated,
    /// Whether another connection was evicted to make room.
    evicted: bool,
}

impl Places {
    /// Admit a connection from `key`, or say why not.
    fn admit(&mut self, key: IpAddr, limits: &HttpLimits) -> Result<Admitted, Refusal> {
        let own = self.by_address.get(&key).map_or(0, Vec::len);
        if own >= limits.max_connections_per_address {
            return Err(Refusal::PerAddress);
        }
        let mut evicted = false;
        if self.held >= limits.max_connections {
            // The oldest connection that has shown no token gives up its place.
            let oldest = self
                .by_address
                .iter()
                .flat_map(|(key, held)| held.iter().map(move |h| (h.id, *key, h)))
                .filter(|(_, _, h)| !h.authenticated.is_set())
                .min_by_key(|(id, _, _)| *id)
                .map(|(id, key, _)| (id, key));
            let Some((id, victim)) = oldest else {
                return Err(Refusal::Full);
            };
            if let Some(held) = self.release(victim, id) {
                held.evict.cancel();
            }
            evicted = true;
        }
        let id = self.next;
        self.next += 1;
        let held = Held {
            id,
            evict: CancellationToken::new(),
            authenticated: Authenticated::default(),
        };
        let admitted = Admitted {
            id,
            evict: held.evict.clone(),
            authenticated: held.authenticated.clone(),
            evicted,
        };
        self.by_address.entry(key).or_default().push(held);
        self.held += 1;
        Ok(admitted)
    }

    /// Give back connection `id`'s place, unless it was already taken from it.
    fn release(&mut self, key: IpAddr, id: u64) -> Option<Held> {
        let held = self.by_address.get_mut(&key)?;
        let at = held.iter().position(|h| h.id == id)?;
        let gone = held.remove(at);
        if held.is_empty() {
            self.by_address.remove(&key);
        }
        self.held -= 1;
        Some(gone)
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
    key: IpAddr,
    id: u64,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.places
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .release(self.key, self.id);
    }
}

/// A connection of a [`Guarded`] listener: its place, its time-bounded stream, and the signal
/// that its place was given to another address.
pub struct GuardedIo<S> {
    io: Pin<Box<tokio_io_timeout::TimeoutStream<S>>>,
    evicted: Pin<Box<WaitForCancellationFutureOwned>>,
    authenticated: Authenticated,
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

impl<L> axum::serve::Listener for Guarded<L>
where
    L: axum::serve::Listener,
    L::Addr: PeerAddress,
{
    type Io = GuardedIo<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (io, addr) = self.inner.accept().await;
            let key = address_key(addr.ip());
            let admitted = self
                .places
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .admit(key, &self.limits);
            match admitted {
                Ok(admitted) => {
                    if admitted.evicted {
                        self.refused
                            .with_label_values(&[Refusal::Evicted.label()])
                            .inc();
                    }
                    let mut io = tokio_io_timeout::TimeoutStream::new(io);
                    io.set_read_timeout(Some(self.limits.idle_timeout));
                    io.set_write_timeout(Some(self.limits.idle_timeout));
                    let place = Place {
                        places: self.places.clone(),
                        key,
                        id: admitted.id,
                    };
                    return (
                        GuardedIo {
                            io: Box::pin(io),
                            evicted: Box::pin(admitted.evict.cancelled_owned()),
                            authenticated: admitted.authenticated,
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

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection that can say whether it has shown an operator's token: a [`GuardedIo`], or a
/// TLS stream over one.
pub trait Marked {
    fn authenticated(&self) -> Authenticated;
}

impl<S> Marked for GuardedIo<S> {
    fn authenticated(&self) -> Authenticated {
        self.authenticated.clone()
    }
}

impl<S: Marked> Marked for tokio_rustls::server::TlsStream<S> {
    fn authenticated(&self) -> Authenticated {
        self.get_ref().0.authenticated()
    }
}

/// How long a connection may take to finish its request once shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serve `app` on `listener` until `shutdown`. Each connection is HTTP/1.1 with
/// `header_timeout` for each request's headers, and each request carries the connection's
/// [`Authenticated`] mark in its extensions; on shutdown a connection finishes the request in
/// flight (for at most [`SHUTDOWN_GRACE`]) and is closed.
pub async fn serve<L>(
    mut listener: L,
    app: Router,
    header_timeout: Duration,
    shutdown: CancellationToken,
) where
    L: axum::serve::Listener,
    L::Io: Marked,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    loop {
        let (io, _addr) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => return,
        };
        let app = app.clone().layer(axum::Extension(io.authenticated()));
        let service = hyper_util::service::TowerToHyperService::new(app);
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

/// An HTTP client for the services' outbound requests (webhooks, the audit writer's read
/// API): rustls with the system's roots and the PEM certificates of `ca_file`, `limit` on
/// each request (connect, send, answer), no redirects (a request goes where it was
/// configured to, or fails).
pub fn client(
    ca_file: Option<&std::path::Path>,
    limit: Duration,
    agent: &'static str,
) -> Result<reqwest::Client, String> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // A system certificate rustls cannot read is skipped, as browsers do.
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let mut n = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            n += 1;
        }
        if n == 0 {
            return Err(format!("{} holds no PEM certificate", path.display()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .connect_timeout(limit)
        .timeout(limit)
        .redirect(reqwest::redirect::Policy::none())
        // A request goes to the configured host itself: no `HTTP_PROXY` from the environment
        // sees its bearer token.
        .no_proxy()
        .user_agent(agent)
        .build()
        .map_err(|e| e.to_string())
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
    fn an_ipv6_subscriber_counts_as_one_address() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(other));
        let mapped: IpAddr = "::ffff:10.0.0.7".parse().unwrap();
        assert_eq!(address_key(mapped), IpAddr::from([10, 0, 0, 7]));
    }

    #[test]
    fn a_full_listener_evicts_the_oldest_connection_without_a_token() {
        let l = limits(4, 4);
        let mut p = Places::default();
        let held: Vec<_> = (1..=4).map(|last| p.admit(ip(last), &l).unwrap()).collect();
        // The oldest has shown a token: the next oldest goes instead.
        held[0].authenticated.mark();
        let newcomer = p.admit(ip(9), &l).unwrap();
        assert!(newcomer.evicted);
        assert!(
            !held[0].evict.is_cancelled(),
            "an operator's connection stays"
        );
        assert!(
            held[1].evict.is_cancelled(),
            "the oldest without a token went"
        );
        assert!(held[2..].iter().all(|h| !h.evict.is_cancelled()));
        assert_eq!(p.held, 4);
        // The evicted connection's own release later is a no-op.
        assert!(p.release(ip(2), held[1].id).is_none());
        assert_eq!(p.held, 4);
    }

    #[test]
    fn a_listener_full_of_operators_refuses() {
        let l = limits(2, 2);
        let mut p = Places::default();
        for last in 1..=2 {
            p.admit(ip(last), &l).unwrap().authenticated.mark();
        }
        assert_eq!(p.admit(ip(3), &l).unwrap_err(), Refusal::Full);
    }

    #[test]
    fn places_given_back_are_taken_again() {
        let l = limits(2, 2);
        let mut p = Places::default();
        let a = p.admit(ip(1), &l).unwrap();
        p.admit(ip(2), &l).unwrap().authenticated.mark();
        a.authenticated.mark();
        assert_eq!(p.admit(ip(3), &l).unwrap_err(), Refusal::Full);
        assert!(p.release(ip(1), a.id).is_some());
        assert!(!p.admit(ip(3), &l).unwrap().evicted);
        assert!(!p.by_address.contains_key(&ip(1)));
    }
}
