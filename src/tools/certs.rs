//! `vigil certs dev`: a certificate for HTTPS where no public CA issues one (a test host, a
//! private network, compose on a laptop). Browsers give a page the camera only in a secure
//! context, so the candidate page needs HTTPS on any host but localhost.
//!
//! It makes a one-off CA, signs a server certificate for the given host names with it, and
//! throws the CA's private key away: the CA can never sign anything else, so trusting it (its
//! `ca.pem`, in the browser or the system) trusts this one certificate only.

use std::path::{Path, PathBuf};

use sha2::Digest as _;

/// What `dev` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DevCertificate {
    /// The CA to trust (in the browser, or the system's store).
    pub ca: PathBuf,
    /// The server's certificate chain (server, then CA) and its key, for the edge's own TLS
    /// (`VIGIL_EDGE_TLS_CERT`, `VIGIL_EDGE_TLS_KEY`).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Chain and key in one file, as HAProxy's `crt` takes it.
    pub combined: PathBuf,
    pub hosts: Vec<String>,
    /// The SHA-256 of the server key's SubjectPublicKeyInfo, base64: what Chromium's
    /// `--ignore-certificate-errors-spki-list` pins.
    pub spki_sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0} exists; pass --force to replace it, or --if-missing to keep it")]
    Exists(String),
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("no host names: give at least one --host")]
    NoHosts,
}

/// Write a fresh dev CA and a server certificate for `hosts` into `out`. With `if_missing`, an
/// existing set is kept (compose makes one at first start and keeps it); otherwise existing
/// files are refused unless `force`.
pub fn dev(
    out: &Path,
    hosts: &[String],
    days: u32,
    force: bool,
    if_missing: bool,
) -> Result<Option<DevCertificate>, CertsError> {
    dev_owned(out, hosts, days, force, if_missing, None)
}

/// [`dev`], with the files handed to `owner` (uid, gid): the user of the process that reads the
/// key (HAProxy's, in its own container).
pub fn dev_owned(
    out: &Path,
    hosts: &[String],
    days: u32,
    force: bool,
    if_missing: bool,
    owner: Option<(u32, u32)>,
) -> Result<Option<DevCertificate>, CertsError> {
    if hosts.is_empty() {
        return Err(CertsError::NoHosts);
    }
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |e| CertsError::Io(p, e)
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    let paths = [
        out.join("ca.pem"),
        out.join("server.pem"),
        out.join("server.key"),
        out.join("haproxy.pem"),
    ];
    if let Some(existing) = paths.iter().find(|p| p.exists()) {
        // A complete set, or an operator's own chain and key in haproxy.pem, is kept.
        if if_missing && (paths.iter().all(|p| p.exists()) || paths[3].exists()) {
            return Ok(None);
        }
        if !force {
            return Err(CertsError::Exists(existing.display().to_string()));
        }
    }
    let now = time_now();
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Vigil development CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    ca_params.not_before = now;
    ca_params.not_after = now + time::Duration::days(i64::from(days));
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(hosts.to_vec())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, hosts[0].clone());
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = now;
    params.not_after = now + time::Duration::days(i64::from(days));
    let cert = params.signed_by(&key, &ca)?;
    let chain = format!("{}{}", cert.pem(), ca.pem());
    let key_pem = key.serialize_pem();
    write(&paths[0], ca.pem().as_bytes(), 0o644).map_err(io(&paths[0]))?;
    write(&paths[1], chain.as_bytes(), 0o644).map_err(io(&paths[1]))?;
    write(&paths[2], key_pem.as_bytes(), 0o600).map_err(io(&paths[2]))?;
    write(&paths[3], format!("{chain}{key_pem}").as_bytes(), 0o600).map_err(io(&paths[3]))?;
    #[cfg(unix)]
    if let Some((uid, gid)) = owner {
        for p in &paths {
            std::os::unix::fs::chown(p, Some(uid), Some(gid)).map_err(io(p))?;
        }
    }
    #[cfg(not(unix))]
    let _ = owner;
    use base64::Engine as _;
    use rcgen::PublicKeyData as _;
    let spki = sha2::Sha256::digest(key.subject_public_key_info());
    let [ca, cert, key, combined] = paths;
    Ok(Some(DevCertificate {
        ca,
        cert,
        key,
        combined,
        hosts: hosts.to_vec(),
        spki_sha256: base64::engine::general_purpose::STANDARD.encode(spki),
    }))
}

fn time_now() -> time::OffsetDateTime {
    // A minute back: a clock a little behind still accepts the certificate.
    time::OffsetDateTime::now_utc() - time::Duration::minutes(1)
}

/// Write a file readable as `mode` says (private keys: the owner only), through a fresh
/// temporary file of its own (never one left over, nor a link someone put there).
pub(crate) fn write(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    write_owned(path, bytes, mode, None)
}

/// [`write`], the file handed to `owner` (UID, GID) before it takes its name: the change of
/// owner is made on the open file, never through a path someone could swap for a link.
pub(crate) fn write_owned(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> std::io::Result<()> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    {
        use std::io::Write as _;
        let mut f = options.open(&tmp)?;
        f.write_all(bytes)?;
        #[cfg(unix)]
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
        }
        #[cfg(not(unix))]
        let _ = owner;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dev_certificate_chains_to_its_ca_and_is_not_overwritten_by_accident() {
        let dir = std::env::temp_dir().join(format!("vigil-certs-{:08x}", rand::random::<u32>()));
        let hosts = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let made = dev(&dir, &hosts, 30, false, false).unwrap().unwrap();
        let chain = std::fs::read_to_string(&made.cert).unwrap();
        assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);
        let combined = std::fs::read_to_string(&made.combined).unwrap();
        assert!(combined.contains("PRIVATE KEY") && combined.starts_with(&chain));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&made.key).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "the key is the owner's only");
        }
        // rustls, trusting only ca.pem, accepts the chain for the host names.
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::client::danger::ServerCertVerifier as _;
        use tokio_rustls::rustls::pki_types::pem::PemObject as _;
        use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(&made.ca).unwrap())
            .unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            provider,
        )
        .build()
        .unwrap();
        let certs: Vec<CertificateDer> = CertificateDer::pem_file_iter(&made.cert)
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
        for host in ["localhost", "127.0.0.1"] {
            verifier
                .verify_server_cert(
                    &certs[0],
                    &certs[1..],
                    &ServerName::try_from(host).unwrap(),
                    &[],
                    UnixTime::now(),
                )
                .unwrap_or_else(|e| panic!("{host}: {e}"));
        }
        assert!(
            verifier
                .verify_server_cert(
                    &certs[0],
                    &certs[1..],
                    &ServerName::try_from("elsewhere.example").unwrap(),
                    &[],
                    UnixTime::now(),
                )
                .is_err()
        );
        assert_eq!(made.spki_sha256.len(), 44);
        // Kept, refused, or replaced; an operator's own haproxy.pem alone is kept too.
        assert!(dev(&dir, &hosts, 30, false, true).unwrap().is_none());
        std::fs::remove_file(&made.ca).unwrap();
        assert!(dev(&dir, &hosts, 30, false, true).unwrap().is_none());
        assert!(matches!(
            dev(&dir, &hosts, 30, false, false),
            Err(CertsError::Exists(_))
        ));
        let again = dev(&dir, &hosts, 30, true, false).unwrap().unwrap();
        assert_ne!(again.spki_sha256, made.spki_sha256);
        let _ = std::fs::remove_dir_all(dir);
    }
}
