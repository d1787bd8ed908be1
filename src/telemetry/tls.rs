//! TLS on the services' listeners, with rustls: `wss://` on the edge's WebSocket listener,
//! HTTPS on its admin API and on the audit writer's read API. The certificate and key are PEM
//! files (`VIGIL_EDGE_TLS_*`, `VIGIL_ADMIN_TLS_*`, `VIGIL_AUDIT_API_TLS_*`); when either file
//! changes on disk the next connection gets the new certificate, so a renewed certificate
//! needs no restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};

/// A client's connection: plain TCP, or TLS over it.
pub(crate) type Stream =
    tokio_util::either::Either<TcpStream, tokio_rustls::server::TlsStream<TcpStream>>;

pub(crate) struct Tls {
    /// Which setting the files come from, for errors (`edge.tls`, `edge.admin_tls`).
    label: &'static str,
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Loaded>,
}

struct Loaded {
    stamp: (Option<SystemTime>, Option<SystemTime>),
    acceptor: TlsAcceptor,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// A TLS acceptor for the PEM certificate chain and private key at these paths.
fn build(label: &str, cert: &Path, key: &Path) -> Result<TlsAcceptor, String> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{label}_cert {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "{label}_cert {}: no certificate in it",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("{label}_key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("{label}_cert and {label}_key: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

impl Tls {
    /// Load the certificate and key, or say exactly what is wrong with them.
    pub(crate) fn load(label: &'static str, cert: &Path, key: &Path) -> Result<Self, String> {
        let acceptor = build(label, cert, key)?;
        Ok(Self {
            label,
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: RwLock::new(Loaded {
                stamp: (modified(cert), modified(key)),
                acceptor,
            }),
        })
    }

    /// The acceptor for a new connection: rebuilt first when a file changed on disk. A bad new
    /// certificate is logged and the one in use kept, so a botched renewal never takes the
    /// edge down.
    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        let stamp = (modified(&self.cert), modified(&self.key));
        {
            let current = self.current.read().unwrap_or_else(|e| e.into_inner());
            if current.stamp == stamp {
                return current.acceptor.clone();
            }
        }
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if current.stamp != stamp {
            match build(self.label, &self.cert, &self.key) {
                Ok(acceptor) => {
                    tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                    current.acceptor = acceptor;
                }
                Err(e) => {
                    tracing::error!(error = %e, "new TLS certificate refused; keeping the old one")
                }
            }
            current.stamp = stamp;
        }
        current.acceptor.clone()
    }
}

/// A listener that hands out connections only once their TLS handshake is done, for
/// [`crate::telemetry::http::serve`]. It takes connections from `inner` (the bounded listener,
/// so each handshake already holds a place), and runs each handshake in its own task within
/// `handshake_timeout`, so a client that opens a socket and stalls holds up no one.
pub(crate) struct TlsListener<S> {
    ready: mpsc::Receiver<(tokio_rustls::server::TlsStream<S>, std::net::SocketAddr)>,
    local: std::net::SocketAddr,
}

/// What bounds [`TlsListener`]'s handshakes, and counts those that fail.
pub(crate) struct HandshakeLimits {
    pub handshake_timeout: std::time::Duration,
    pub failed: prometheus::IntCounter,
}

impl<S> TlsListener<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    pub(crate) fn new<L>(
        mut inner: L,
        tls: Arc<Tls>,
        limits: HandshakeLimits,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> std::io::Result<Self>
    where
        L: axum::serve::Listener<Io = S, Addr = std::net::SocketAddr>,
    {
        let local = inner.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                // The inner listener retries failed accepts itself, and bounds what it hands
                // out: a handshake runs only for a connection that holds a place.
                let (stream, peer) = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    accepted = inner.accept() => accepted,
                };
                let (acceptor, tx) = (tls.acceptor(), tx.clone());
                let (timeout, failed) = (limits.handshake_timeout, limits.failed.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => {
                            // Bounded: the server takes connections as fast as they come.
                            let _ = tokio::time::timeout(timeout, tx.send((s, peer))).await;
                        }
                        Ok(Err(e)) => {
                            failed.inc();
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        }
                        Err(_) => {
                            failed.inc();
                            tracing::debug!(%peer, "TLS handshake timed out");
                        }
                    }
                });
            }
        });
        Ok(Self { ready, local })
    }
}

impl<S> axum::serve::Listener for TlsListener<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    type Io = tokio_rustls::server::TlsStream<S>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept loop ended (shutdown): wait for the server's own shutdown.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
