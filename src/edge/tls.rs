//! `wss://`: TLS on the edge's WebSocket listener, with rustls. The certificate and key are
//! PEM files (`VIGIL_EDGE_TLS_CERT`, `VIGIL_EDGE_TLS_KEY`); when either file changes on disk the
//! next connection gets the new certificate, so a renewed certificate needs no restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};

/// A client's connection: plain TCP, or TLS over it.
pub(crate) type Stream =
    tokio_util::either::Either<TcpStream, tokio_rustls::server::TlsStream<TcpStream>>;

pub(crate) struct Tls {
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
fn build(cert: &Path, key: &Path) -> Result<TlsAcceptor, String> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("edge.tls_cert {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "edge.tls_cert {}: no certificate in it",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("edge.tls_key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("edge TLS certificate and key: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

impl Tls {
    /// Load the certificate and key, or say exactly what is wrong with them.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, String> {
        let acceptor = build(cert, key)?;
        Ok(Self {
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
    pub fn acceptor(&self) -> TlsAcceptor {
        let stamp = (modified(&self.cert), modified(&self.key));
        {
            let current = self.current.read().unwrap_or_else(|e| e.into_inner());
            if current.stamp == stamp {
                return current.acceptor.clone();
            }
        }
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if current.stamp != stamp {
            match build(&self.cert, &self.key) {
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
