//! The directory in PostgreSQL, for several edges on several hosts.
//!
//! The schema lives in `migrations/` and is applied when a store connects (or by
//! `vigil directory migrate`), under an advisory lock so that edges starting together migrate
//! once. Every read-modify-write is one transaction holding the row (`SELECT ... FOR UPDATE`),
//! so concurrent operators never lose an update; every statement and lock wait is bounded by
//! `statement_timeout` and `lock_timeout`, and every connection by `connect_timeout`.
//!
//! The `postgres` client is synchronous and runs its own small runtime, which must never run
//! (nor be dropped) on an async task: calls made from inside a Tokio runtime hop to a plain
//! thread, and the pool is dropped on one.
//!
//! TLS (rustls) is chosen by libpq's `sslmode` in the URL, with `sslrootcert` naming the CA
//! (see [`PgStore::client_config`]); `prefer` and `allow` are refused, since they fall back to
//! plain text whenever TLS fails.

use std::sync::Arc;

use postgres::types::Json;
use r2d2_postgres::PostgresConnectionManager;
use r2d2_postgres::postgres;
use r2d2_postgres::r2d2;
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_rustls::rustls;

use super::{
    ClientRecord, ClientStore, DirectoryError, PgLimits, Presence, check_client_id, check_edge_id,
};
use crate::policy::SavedPolicy;

mod embedded {
    refinery::embed_migrations!("src/directory/migrations");
}

/// Any number will do, as long as nothing else on the database uses it for a lock.
const MIGRATION_LOCK: i64 = 0x7669_6769_6c5f_6d69; // "vigil_mi"

type Pool = r2d2::Pool<PostgresConnectionManager<MakeRustlsConnect>>;

/// A client directory in PostgreSQL.
pub struct PgStore {
    /// Always `Some` until dropped (see `Drop`).
    pool: Option<Pool>,
    /// The console's presence reads, on connections of their own: a console polling every
    /// second never takes the connections hellos need.
    presence_pool: Option<Pool>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

fn db(e: impl std::fmt::Display) -> DirectoryError {
    DirectoryError::Database(e.to_string())
}

impl PgStore {
    /// Connect to `url` and bring its schema up to date.
    pub fn connect(url: &str, limits: &PgLimits) -> Result<Self, DirectoryError> {
        let store = off_runtime(|| -> Result<Self, DirectoryError> {
            let (mut config, tls, mode) = configure(url)?;
            config.connect_timeout(limits.connect_timeout);
            if config.get_application_name().is_none() {
                config.application_name("vigil");
            }
            let bound = limits.statement_timeout.as_millis();
            let options = format!(
                "{} -c statement_timeout={bound} -c lock_timeout={bound}",
                config.get_options().unwrap_or_default()
            );
            config.options(options.trim());
            if mode != SslMode::Disable {
                // One connection now, so that a server without TLS or with a certificate that
                // does not verify is said at once, not as a pool timing out.
                let probe = config.connect(tls.clone()).map_err(|e| {
                    DirectoryError::Database(format!(
                        "connecting with sslmode={}: {}",
                        mode.name(),
                        with_causes(&e)
                    ))
                })?;
                drop(probe);
            }
            let presence_pool = r2d2::Pool::builder()
                .max_size(PRESENCE_CONNECTIONS)
                .min_idle(Some(0))
                .connection_timeout(limits.connect_timeout)
                .build(PostgresConnectionManager::new(config.clone(), tls.clone()))
                .map_err(db)?;
            let pool = r2d2::Pool::builder()
                .max_size(limits.pool.max(1))
                .min_idle(Some(0))
                .connection_timeout(limits.connect_timeout)
                .build(PostgresConnectionManager::new(config, tls))
                .map_err(db)?;
            Ok(Self {
                pool: Some(pool),
                presence_pool: Some(presence_pool),
            })
        })?;
        store.migrate()?;
        Ok(store)
    }

    /// The client settings and TLS connector for the directory URL `url`, as [`PgStore::connect`]
    /// uses them (it adds its timeouts); `config.connect(tls)` opens a plain client.
    ///
    /// `url` is `postgres://` or `postgresql://`; its `sslmode` and `sslrootcert` parameters
    /// are read here with libpq's meaning, and removed before the rest is parsed:
    ///
    /// - absent or `disable`: no TLS;
    /// - `require`: TLS, but the server's certificate is not verified, which stops only passive
    ///   eavesdropping (anyone able to intercept the connection can impersonate the server);
    ///   with `sslrootcert`, the chain is verified as under `verify-ca`;
    /// - `verify-ca`: TLS, the chain verified against `sslrootcert` (a PEM file of CA
    ///   certificates; the system's roots when absent or `system`), the host name not checked;
    /// - `verify-full`: as `verify-ca`, and the certificate must name the host of the URL;
    /// - `prefer` and `allow` are refused: they fall back to plain text when TLS fails, a
    ///   downgrade anyone on the path can force;
    /// - `sslcert` and `sslkey` (with TLS): the client's certificate chain and private key, PEM
    ///   files, for a server that authenticates clients by certificate.
    ///
    /// Under `require`, `verify-ca` and `verify-full`, a server that does not speak TLS is an
    /// error, never a plain-text connection.
    pub fn client_config(
        url: &str,
    ) -> Result<(postgres::Config, MakeRustlsConnect), DirectoryError> {
        configure(url).map(|(config, tls, _)| (config, tls))
    }

    /// Apply the migrations this build knows that the database lacks; returns their names.
    pub fn migrate(&self) -> Result<Vec<String>, DirectoryError> {
        self.run(|client| {
            client
                .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
                .map_err(db)?;
            let report = embedded::migrations::runner().run(&mut *client);
            let unlocked = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]);
            let report = report.map_err(|e| DirectoryError::Database(format!("migration: {e}")))?;
            unlocked.map_err(db)?;
            Ok(report
                .applied_migrations()
                .iter()
                .map(|m| m.to_string())
                .collect())
        })
    }

    /// Run `f` on a pooled connection, off any async runtime.
    fn run<T: Send>(
        &self,
        f: impl FnOnce(&mut postgres::Client) -> Result<T, DirectoryError> + Send,
    ) -> Result<T, DirectoryError> {
        let pool = self.pool.as_ref().expect("the pool lives until drop");
        off_runtime(|| {
            let mut conn = pool
                .get()
                .map_err(|e| DirectoryError::Busy(format!("no database connection: {e}")))?;
            f(&mut conn)
        })
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Dropping a connection runs the client's runtime: never on an async task.
        let pools = (self.pool.take(), self.presence_pool.take());
        off_runtime(move || drop(pools));
    }
}

/// Connections of the presence reads' own pool.
const PRESENCE_CONNECTIONS: u32 = 2;

/// `e` and its causes, `: `-separated (the client's errors name only their kind).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}

/// [`PgStore::client_config`], and the `sslmode` it chose.
fn configure(url: &str) -> Result<(postgres::Config, MakeRustlsConnect, SslMode), DirectoryError> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(DirectoryError::Url(
            "expected postgres://... or postgresql://...".into(),
        ));
    }
    let params = TlsParams::split(url)?;
    let mut config: postgres::Config = params
        .url
        .parse()
        .map_err(|e| DirectoryError::Url(format!("{e}")))?;
    // Set either way: the client's own default, `prefer`, would try TLS and fall back.
    config.ssl_mode(match params.mode {
        SslMode::Disable => postgres::config::SslMode::Disable,
        _ => postgres::config::SslMode::Require,
    });
    // Under `disable` the connector is never used.
    let client = match &params.client {
        Some((cert, key)) => Some(client_identity(cert, key)?),
        None => None,
    };
    let tls = tls_config(params.mode, params.root_cert.as_deref(), client)?;
    Ok((config, MakeRustlsConnect::new(tls), params.mode))
}

/// libpq's `sslmode`, as far as Vigil accepts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SslMode {
    Disable,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn name(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }
}

/// A directory URL split into what `postgres::Config` parses and the TLS parameters it does
/// not know.
#[derive(Debug, PartialEq, Eq)]
struct TlsParams {
    /// The URL without `sslmode`, `sslrootcert`, `sslcert` and `sslkey`.
    url: String,
    mode: SslMode,
    root_cert: Option<String>,
    /// The client's certificate chain and private key (PEM files), when the server asks for
    /// one (`sslcert`, `sslkey`).
    client: Option<(String, String)>,
}

impl TlsParams {
    fn split(url: &str) -> Result<Self, DirectoryError> {
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let (mut mode, mut root_cert, mut kept) = (None, None, Vec::new());
        let (mut cert, mut key) = (None, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match percent_decode(name)?.as_str() {
                "sslmode" => mode = Some(percent_decode(value)?),
                "sslrootcert" => root_cert = Some(percent_decode(value)?),
                "sslcert" => cert = Some(percent_decode(value)?),
                "sslkey" => key = Some(percent_decode(value)?),
                _ => kept.push(pair),
            }
        }
        let client = match (cert, key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => {
                return Err(DirectoryError::Url(
                    "sslcert and sslkey go together: give both (the client's certificate and \
                     its private key) or neither"
                        .into(),
                ));
            }
        };
        if client.is_some()
            && !matches!(
                mode.as_deref(),
                Some("require" | "verify-ca" | "verify-full")
            )
        {
            return Err(DirectoryError::Url(
                "sslcert and sslkey need TLS: add sslmode=verify-full (or verify-ca, require)"
                    .into(),
            ));
        }
        let mode = match mode.as_deref() {
            None if root_cert.is_some() => {
                return Err(DirectoryError::Url(
                    "sslrootcert is given without sslmode: add sslmode=verify-full (or \
                     verify-ca, require)"
                        .into(),
                ));
            }
            None | Some("disable") => SslMode::Disable,
            Some("require") => SslMode::Require,
            Some("verify-ca") => SslMode::VerifyCa,
            Some("verify-full") => SslMode::VerifyFull,
            Some(m @ ("prefer" | "allow")) => {
                return Err(DirectoryError::Url(format!(
                    "sslmode={m} is refused: it falls back to an unencrypted connection \
                     whenever TLS fails, a downgrade anyone on the network path can force; use \
                     sslmode=verify-full (or require) to encrypt, or sslmode=disable on a \
                     trusted network"
                )));
            }
            Some(other) => {
                return Err(DirectoryError::Url(format!(
                    "unknown sslmode `{other}`: use disable, require, verify-ca or verify-full"
                )));
            }
        };
        let url = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        Ok(Self {
            url,
            mode,
            root_cert,
            client,
        })
    }
}

/// `%XX` sequences decoded, as in a URL's query.
fn percent_decode(s: &str) -> Result<String, DirectoryError> {
    let bad = || DirectoryError::Url(format!("bad percent-encoding in `{s}`"));
    let (bytes, mut out) = (s.as_bytes(), Vec::with_capacity(s.len()));
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or_else(bad)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

/// The trust anchors of `sslrootcert`: a PEM file, or the system's roots when absent or
/// `system`.
fn root_store(root_cert: Option<&str>) -> Result<rustls::RootCertStore, DirectoryError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match root_cert {
        None | Some("system") => {
            let native = rustls_native_certs::load_native_certs();
            // A system certificate rustls cannot read is skipped, as browsers do.
            roots.add_parsable_certificates(native.certs);
            if roots.is_empty() {
                return Err(DirectoryError::Url(
                    "no system root certificate found for sslmode verification: give \
                     sslrootcert=/path/ca.pem"
                        .into(),
                ));
            }
        }
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| DirectoryError::Url(format!("sslrootcert {path}: {e}")))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| {
                    DirectoryError::Url(format!("sslrootcert {path}: not a PEM certificate: {e}"))
                })?;
                roots
                    .add(cert)
                    .map_err(|e| DirectoryError::Url(format!("sslrootcert {path}: {e}")))?;
            }
            if roots.is_empty() {
                return Err(DirectoryError::Url(format!(
                    "sslrootcert {path} holds no PEM certificate"
                )));
            }
        }
    }
    Ok(roots)
}

/// A client certificate chain and its private key, as libpq reads `sslcert` and `sslkey`: PEM
/// files, the key readable by its owner only (as libpq insists).
type ClientIdentity = (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
);

fn client_identity(cert: &str, key: &str) -> Result<ClientIdentity, DirectoryError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let pem =
        std::fs::read(cert).map_err(|e| DirectoryError::Url(format!("sslcert {cert}: {e}")))?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| DirectoryError::Url(format!("sslcert {cert}: not a PEM certificate: {e}")))?;
    if chain.is_empty() {
        return Err(DirectoryError::Url(format!(
            "sslcert {cert} holds no PEM certificate"
        )));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(key)
            .map_err(|e| DirectoryError::Url(format!("sslkey {key}: {e}")))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(DirectoryError::Url(format!(
                "sslkey {key} is readable by others (mode {:o}): make it 0600",
                mode & 0o777
            )));
        }
    }
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| DirectoryError::Url(format!("sslkey {key}: {e}")))?;
    Ok((chain, private))
}

/// The rustls client configuration for `mode` (ring, TLS 1.2 and 1.3), with the client's
/// certificate when there is one.
fn tls_config(
    mode: SslMode,
    root_cert: Option<&str>,
    client: Option<ClientIdentity>,
) -> Result<rustls::ClientConfig, DirectoryError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| DirectoryError::Url(format!("TLS: {e}")))?;
    let verifier = |roots| {
        Arc::new(PgVerifier {
            roots,
            provider: provider.clone(),
        })
    };
    let with_roots = match (mode, root_cert) {
        (SslMode::Disable, _) => builder.with_root_certificates(rustls::RootCertStore::empty()),
        (SslMode::VerifyFull, _) => builder.with_root_certificates(root_store(root_cert)?),
        (SslMode::VerifyCa, _) | (SslMode::Require, Some(_)) => builder
            .dangerous()
            .with_custom_certificate_verifier(verifier(Some(Arc::new(root_store(root_cert)?)))),
        (SslMode::Require, None) => builder
            .dangerous()
            .with_custom_certificate_verifier(verifier(None)),
    };
    match client {
        None => Ok(with_roots.with_no_client_auth()),
        Some((chain, key)) => with_roots
            .with_client_auth_cert(chain, key)
            .map_err(|e| DirectoryError::Url(format!("sslcert/sslkey: {e}"))),
    }
}

/// The server's certificate checked as libpq's `verify-ca` does (chain to `roots`, any host
/// name), or not at all (`require` without `sslrootcert`) when `roots` is `None`. Either way the
/// handshake's signatures are checked against the certificate presented.
#[derive(Debug)]
struct PgVerifier {
    roots: Option<Arc<rustls::RootCertStore>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PgVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )?;
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Run `f` here, or on a plain scoped thread when this thread is inside a Tokio runtime (the
/// synchronous client would panic there).
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if tokio::runtime::Handle::try_current().is_err() {
        return f();
    }
    std::thread::scope(|s| {
        s.spawn(f)
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

fn status_of(record: &ClientRecord) -> &'static str {
    record.status.as_str()
}

fn decode_record(id: &str, value: serde_json::Value) -> Result<ClientRecord, DirectoryError> {
    decode("vigil_clients", id, value)
}

/// A JSON column's value as `T`; a value that does not decode names its table and row.
fn decode<T: serde::de::DeserializeOwned>(
    table: &str,
    id: &str,
    value: serde_json::Value,
) -> Result<T, DirectoryError> {
    serde_json::from_value(value).map_err(|source| DirectoryError::Corrupt {
        path: format!("{table}/{id}"),
        source,
    })
}

/// The one JSON column of the row of `table` whose `client_id` is `id`, decoded.
fn json_of<T: serde::de::DeserializeOwned>(
    c: &mut postgres::Client,
    table: &str,
    column: &str,
    id: &str,
) -> Result<Option<T>, DirectoryError> {
    // `table` and `column` are this module's constants, never input.
    let row = c
        .query_opt(
            &format!("SELECT {column} FROM {table} WHERE client_id = $1"),
            &[&id],
        )
        .map_err(db)?;
    row.map(|r| decode(table, id, r.get::<_, serde_json::Value>(0)))
        .transpose()
}

fn is_unique_violation(e: &postgres::Error) -> bool {
    e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION)
}

impl ClientStore for PgStore {
    fn get(&self, id: &str) -> Result<Option<ClientRecord>, DirectoryError> {
        check_client_id(id)?;
        self.run(|c| {
            let row = c
                .query_opt("SELECT record FROM vigil_clients WHERE id = $1", &[&id])
                .map_err(db)?;
            row.map(|r| decode_record(id, r.get::<_, serde_json::Value>(0)))
                .transpose()
        })
    }

    fn put(&self, record: &ClientRecord) -> Result<(), DirectoryError> {
        check_client_id(&record.id)?;
        self.run(|c| {
            c.execute(
                "INSERT INTO vigil_clients (id, status, revision, record) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (id) DO UPDATE
                 SET status = $2, revision = $3, record = $4, updated_at = now()",
                &[
                    &record.id,
                    &status_of(record),
                    &(record.revision as i64),
                    &Json(record),
                ],
            )
            .map_err(db)?;
            Ok(())
        })
    }

    fn add(&self, record: &ClientRecord) -> Result<(), DirectoryError> {
        check_client_id(&record.id)?;
        self.run(|c| {
            match c.execute(
                "INSERT INTO vigil_clients (id, status, revision, record) VALUES ($1, $2, $3, $4)",
                &[
                    &record.id,
                    &status_of(record),
                    &(record.revision as i64),
                    &Json(record),
                ],
            ) {
                Ok(_) => Ok(()),
                Err(e) if is_unique_violation(&e) => Err(DirectoryError::Exists(record.id.clone())),
                Err(e) => Err(db(e)),
            }
        })
    }

    fn update(
        &self,
        id: &str,
        change: &mut (dyn FnMut(&mut ClientRecord) + Send),
    ) -> Result<ClientRecord, DirectoryError> {
        check_client_id(id)?;
        self.run(|c| {
            let mut tx = c.transaction().map_err(db)?;
            let row = tx
                .query_opt(
                    "SELECT record FROM vigil_clients WHERE id = $1 FOR UPDATE",
                    &[&id],
                )
                .map_err(db)?
                .ok_or_else(|| DirectoryError::NotFound(id.to_owned()))?;
            let mut record = decode_record(id, row.get::<_, serde_json::Value>(0))?;
            change(&mut record);
            super::stamp_update(&mut record, id);
            tx.execute(
                "UPDATE vigil_clients SET status = $2, revision = $3, record = $4, updated_at = now()
                 WHERE id = $1",
                &[&id, &status_of(&record), &(record.revision as i64), &Json(&record)],
            )
            .map_err(db)?;
            tx.commit().map_err(db)?;
            Ok(record)
        })
    }

    fn remove(&self, id: &str) -> Result<(), DirectoryError> {
        check_client_id(id)?;
        self.run(|c| {
            let n = c
                .execute("DELETE FROM vigil_clients WHERE id = $1", &[&id])
                .map_err(db)?;
            if n == 0 {
                return Err(DirectoryError::NotFound(id.to_owned()));
            }
            Ok(())
        })
    }

    fn list(&self) -> Result<Vec<ClientRecord>, DirectoryError> {
        self.run(|c| {
            c.query("SELECT id, record FROM vigil_clients ORDER BY id", &[])
                .map_err(db)?
                .into_iter()
                .map(|r| decode_record(r.get::<_, &str>(0), r.get::<_, serde_json::Value>(1)))
                .collect()
        })
    }

    fn page(
        &self,
        after: Option<&str>,
        limit: usize,
        status: Option<super::ClientStatus>,
    ) -> Result<(Vec<ClientRecord>, usize), DirectoryError> {
        let pool = self
            .presence_pool
            .as_ref()
            .expect("the pool lives until drop");
        let status = status.map(|s| s.as_str());
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        off_runtime(|| {
            let mut conn = pool
                .get()
                .map_err(|e| DirectoryError::Busy(format!("no database connection: {e}")))?;
            // One snapshot for the page and its total, so they agree under concurrent adds.
            let mut tx = conn
                .build_transaction()
                .isolation_level(postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .map_err(db)?;
            let rows = tx
                .query(
                    "SELECT id, record FROM vigil_clients
                     WHERE ($1::text IS NULL OR id > $1) AND ($2::text IS NULL OR status = $2)
                     ORDER BY id LIMIT $3",
                    &[&after, &status, &limit],
                )
                .map_err(db)?;
            let total: i64 = tx
                .query_one(
                    "SELECT count(*) FROM vigil_clients WHERE ($1::text IS NULL OR status = $1)",
                    &[&status],
                )
                .map_err(db)?
                .get(0);
            tx.commit().map_err(db)?;
            let page = rows
                .into_iter()
                .map(|r| decode_record(r.get::<_, &str>(0), r.get::<_, serde_json::Value>(1)))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((page, usize::try_from(total).unwrap_or(0)))
        })
    }

    fn presence(&self, id: &str) -> Result<Option<Presence>, DirectoryError> {
        check_client_id(id)?;
        self.run(|c| json_of(c, "vigil_presence", "presence", id))
    }

    fn live_presences(
        &self,
        ids: &[String],
        now_ms: u64,
    ) -> Result<std::collections::HashMap<String, Presence>, DirectoryError> {
        let pool = self
            .presence_pool
            .as_ref()
            .expect("the pool lives until drop");
        let rows = off_runtime(|| {
            let mut conn = pool
                .get()
                .map_err(|e| DirectoryError::Busy(format!("no database connection: {e}")))?;
            conn.query(
                "SELECT p.client_id, p.presence, l.lease_until_ms FROM vigil_presence p
                 LEFT JOIN vigil_edge_leases l ON l.edge = p.edge
                 WHERE p.client_id = ANY($1)",
                &[&ids],
            )
            .map_err(db)
        })?;
        let mut out = std::collections::HashMap::new();
        for row in rows {
            let id: String = row.get(0);
            let Json(mut presence): Json<Presence> = row.get(1);
            let lease: Option<i64> = row.get(2);
            if presence.connection == crate::directory::Connection::Active
                && lease.is_none_or(|until| until < now_ms as i64)
            {
                presence.connection = crate::directory::Connection::ConnectionError;
            }
            out.insert(id, presence);
        }
        Ok(out)
    }

    fn set_presence(&self, id: &str, presence: &Presence) -> Result<(), DirectoryError> {
        check_client_id(id)?;
        // A client removed meanwhile has no presence to keep: nothing is written.
        self.run(|c| {
            c.execute(
                "INSERT INTO vigil_presence (client_id, edge, presence)
                 SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM vigil_clients WHERE id = $1)
                 ON CONFLICT (client_id) DO UPDATE SET edge = $2, presence = $3",
                &[&id, &presence.edge, &Json(presence)],
            )
            .map_err(db)?;
            Ok(())
        })
    }

    fn policy(&self, id: &str) -> Result<Option<SavedPolicy>, DirectoryError> {
        check_client_id(id)?;
        self.run(|c| json_of(c, "vigil_policy_state", "state", id))
    }

    fn put_policy(&self, id: &str, saved: &SavedPolicy) -> Result<(), DirectoryError> {
        check_client_id(id)?;
        self.run(|c| {
            c.execute(
                "INSERT INTO vigil_policy_state (client_id, state)
                 SELECT $1, $2 WHERE EXISTS (SELECT 1 FROM vigil_clients WHERE id = $1)
                 ON CONFLICT (client_id) DO UPDATE SET state = $2",
                &[&id, &Json(saved)],
            )
            .map_err(db)?;
            Ok(())
        })
    }

    fn reference_photo(&self, id: &str) -> Result<Option<Vec<u8>>, DirectoryError> {
        check_client_id(id)?;
        self.run(|c| {
            let row = c
                .query_opt(
                    "SELECT jpeg FROM vigil_reference_photos WHERE client_id = $1",
                    &[&id],
                )
                .map_err(db)?;
            Ok(row.map(|r| r.get::<_, Vec<u8>>(0)))
        })
    }

    fn put_reference_photo(&self, id: &str, jpeg: &[u8]) -> Result<String, DirectoryError> {
        check_client_id(id)?;
        let name = format!("{id}.reference.jpg");
        self.run(|c| {
            let n = c
                .execute(
                    "INSERT INTO vigil_reference_photos (client_id, name, jpeg)
                     SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM vigil_clients WHERE id = $1)
                     ON CONFLICT (client_id) DO UPDATE SET name = $2, jpeg = $3",
                    &[&id, &name, &jpeg],
                )
                .map_err(db)?;
            if n == 0 {
                return Err(DirectoryError::NotFound(id.to_owned()));
            }
            Ok(())
        })?;
        Ok(name)
    }

    fn renew_lease(&self, edge: &str, until_ms: u64) -> Result<(), DirectoryError> {
        check_edge_id(edge)?;
        self.run(|c| {
            c.execute(
                "INSERT INTO vigil_edge_leases (edge, lease_until_ms) VALUES ($1, $2)
                 ON CONFLICT (edge) DO UPDATE SET lease_until_ms = $2",
                &[&edge, &(until_ms as i64)],
            )
            .map_err(db)?;
            Ok(())
        })
    }

    fn lease(&self, edge: &str) -> Result<Option<u64>, DirectoryError> {
        check_edge_id(edge)?;
        self.run(|c| {
            let row = c
                .query_opt(
                    "SELECT lease_until_ms FROM vigil_edge_leases WHERE edge = $1",
                    &[&edge],
                )
                .map_err(db)?;
            Ok(row.map(|r| r.get::<_, i64>(0).max(0) as u64))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(url: &str) -> Result<TlsParams, DirectoryError> {
        TlsParams::split(url)
    }

    #[test]
    fn sslmode_and_sslrootcert_are_taken_out_of_the_url() {
        let p = split("postgres://u@h:5432/db?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=3").unwrap();
        assert_eq!(
            p.url,
            "postgres://u@h:5432/db?application_name=x&connect_timeout=3"
        );
        assert_eq!(p.mode, SslMode::VerifyFull);
        assert_eq!(p.root_cert.as_deref(), Some("/etc/ca.pem"));
        let p = split("postgresql://u@h/db?sslmode=require").unwrap();
        assert_eq!(
            (p.url.as_str(), p.mode),
            ("postgresql://u@h/db", SslMode::Require)
        );
        assert_eq!(split("postgres://h/db").unwrap().mode, SslMode::Disable);
        assert!(split("postgres://h/db?sslrootcert=%+1&sslmode=require").is_err());
        assert_eq!(
            split("postgres://h/db?sslmode=disable").unwrap().mode,
            SslMode::Disable
        );
        assert_eq!(
            split("postgres://h/db?sslmode=verify-ca").unwrap().mode,
            SslMode::VerifyCa
        );
    }

    #[test]
    fn downgradable_unknown_or_incomplete_tls_settings_are_refused() {
        for mode in ["prefer", "allow"] {
            let e = split(&format!("postgres://h/db?sslmode={mode}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("refused") && e.contains("verify-full"), "{e}");
        }
        let e = split("postgres://h/db?sslmode=verify_full")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown sslmode `verify_full`"), "{e}");
        let e = split("postgres://h/db?sslrootcert=/ca.pem")
            .unwrap_err()
            .to_string();
        assert!(e.contains("without sslmode"), "{e}");
        let e = split("postgres://h/db?sslmode=verify-full&sslcert=/c.pem")
            .unwrap_err()
            .to_string();
        assert!(e.contains("go together"), "{e}");
        let e = split("postgres://h/db?sslcert=/c.pem&sslkey=/k.pem")
            .unwrap_err()
            .to_string();
        assert!(e.contains("need TLS"), "{e}");
        let p =
            split("postgres://h/db?sslmode=verify-full&sslcert=%2Fc.pem&sslkey=/k.pem").unwrap();
        assert_eq!(p.url, "postgres://h/db");
        assert_eq!(p.client, Some(("/c.pem".to_owned(), "/k.pem".to_owned())));
        let Err(e) = PgStore::client_config(
            "postgres://h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
        ) else {
            panic!("an unreadable sslrootcert was accepted");
        };
        let e = e.to_string();
        assert!(e.contains("sslrootcert /nonexistent/ca.pem"), "{e}");
        assert!(PgStore::client_config("host=h sslmode=require").is_err());
    }
}
