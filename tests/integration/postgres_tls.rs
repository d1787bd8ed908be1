//! The PostgreSQL directory over TLS, against a private PostgreSQL server of the test's own
//! (`ssl=on`, a certificate for `localhost` from a CA made here): each `sslmode` connects or
//! fails as libpq's would, and never falls back to plain text.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::free_port;
use vigil::directory::{ClientStore, PgLimits, PgStore};

/// A CA's PEM, and a certificate and key it signed for `localhost` only; and a client
/// certificate and key it signed for the database user `postgres`.
fn ca_and_localhost_cert() -> (String, String, String, (String, String)) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    // A name of its own, so that another CA's certificate is an unknown issuer.
    ca_params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("Vigil test CA {:08x}", rand::random::<u32>()),
    );
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    // PostgreSQL's `cert` authentication takes the user from the certificate's common name.
    let client_key = rcgen::KeyPair::generate().unwrap();
    let mut client_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    client_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "postgres");
    let client = client_params.signed_by(&client_key, &ca).unwrap();
    (
        ca.pem(),
        cert.pem(),
        key.serialize_pem(),
        (client.pem(), client_key.serialize_pem()),
    )
}

/// The newest PostgreSQL server binaries on the machine.
fn pg_bin() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries in /usr/lib/postgresql (apt-get install postgresql)")
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("an initdb under /usr/lib/postgresql/*/bin")
        .1
}

fn running_as_root() -> bool {
    let out = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

/// A private PostgreSQL server in a temporary folder, stopped and removed when dropped (a
/// panicking test too).
struct PgServer {
    dir: PathBuf,
    bin: PathBuf,
    as_root: bool,
    port: u16,
    /// The PEM file of the CA that signed the server's certificate.
    ca_file: PathBuf,
    /// A client certificate and key (PEM files, 0600) the CA signed for the user `postgres`.
    client: (PathBuf, PathBuf),
}

impl PgServer {
    /// initdb (trust authentication), a certificate for `localhost`, and `ssl` on or off.
    fn start(ssl: bool) -> Self {
        Self::start_with(ssl, false)
    }

    /// With `client_certs`, TCP connections must be TLS and authenticate with a client
    /// certificate the CA signed (`hostssl ... cert`), and nothing else.
    fn start_with(ssl: bool, client_certs: bool) -> Self {
        let dir = std::env::temp_dir().join(format!("vigil-pgtls-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let server = Self {
            bin: pg_bin(),
            as_root: running_as_root(),
            port: free_port(),
            ca_file: dir.join("ca.pem"),
            client: (dir.join("client.crt"), dir.join("client.key")),
            dir,
        };
        let (ca, cert, key, (client_cert, client_key)) = ca_and_localhost_cert();
        std::fs::write(&server.ca_file, ca).unwrap();
        let (cert_file, key_file) = (server.dir.join("server.crt"), server.dir.join("server.key"));
        std::fs::write(&cert_file, cert).unwrap();
        std::fs::write(&key_file, key).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        if server.as_root {
            // initdb refuses root: the server runs as `postgres`, which owns its files.
            let owned = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&server.dir)
                .status()
                .unwrap();
            assert!(owned.success(), "chown the server's folder to postgres");
        }
        let data = server.dir.join("data");
        server.run(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-A".as_ref(),
                "trust".as_ref(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "--no-sync".as_ref(),
            ],
        );
        let conf = format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{dir}'\n\
             fsync = off\nssl = {ssl}\nssl_cert_file = '{cert}'\nssl_key_file = '{key}'\n",
            port = server.port,
            dir = server.dir.display(),
            ssl = if ssl { "on" } else { "off" },
            cert = cert_file.display(),
            key = key_file.display(),
        );
        let conf_file = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_file).unwrap();
        text.push_str(&conf);
        if client_certs {
            text.push_str(&format!("ssl_ca_file = '{}'\n", server.ca_file.display()));
            // Over TCP, TLS with a certificate the CA signed, and nothing else (the file keeps
            // its owner, the server's user).
            let hba = "local all all trust\nhostssl all all 127.0.0.1/32 cert\n";
            std::fs::write(data.join("pg_hba.conf"), hba).unwrap();
        }
        std::fs::write(&conf_file, text).unwrap();
        let log = server.dir.join("server.log");
        server.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-w".as_ref(),
                "-t".as_ref(),
                "30".as_ref(),
                "start".as_ref(),
            ],
        );
        // The client's files are the test's own (as libpq insists, the key for its owner only).
        std::fs::write(&server.client.0, client_cert).unwrap();
        std::fs::write(&server.client.1, client_key).unwrap();
        std::fs::set_permissions(&server.client.1, std::fs::Permissions::from_mode(0o600)).unwrap();
        server
    }

    /// Run one of the server's programs, as `postgres` when the test runs as root.
    fn run(&self, program: &str, args: &[&std::ffi::OsStr]) {
        let out = self.command(program, args).output().unwrap();
        assert!(
            out.status.success(),
            "{program} failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
        );
    }

    fn command(&self, program: &str, args: &[&std::ffi::OsStr]) -> Command {
        let program = self.bin.join(program);
        let mut cmd = if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        cmd.args(args);
        cmd
    }

    /// The directory URL for `host` with these query parameters.
    fn url(&self, host: &str, query: &str) -> String {
        format!("postgres://postgres@{host}:{}/postgres?{query}", self.port)
    }

    fn ca(&self) -> &Path {
        &self.ca_file
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = self
            .command(
                "pg_ctl",
                &[
                    "-D".as_ref(),
                    data.as_os_str(),
                    "-m".as_ref(),
                    "immediate".as_ref(),
                    "-w".as_ref(),
                    "stop".as_ref(),
                ],
            )
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn limits() -> PgLimits {
    PgLimits {
        pool: 2,
        connect_timeout: std::time::Duration::from_secs(5),
        statement_timeout: std::time::Duration::from_secs(5),
    }
}

/// Whether the connection `url` opens is encrypted, asked of the server itself.
fn server_says_ssl(url: &str) -> bool {
    let (config, tls) = PgStore::client_config(url).unwrap();
    let mut client = config.connect(tls).unwrap();
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .unwrap()
        .get(0)
}

fn connect_error(url: &str) -> String {
    PgStore::connect(url, &limits())
        .expect_err("the connection must be refused")
        .to_string()
}

#[test]
fn verify_full_with_the_servers_ca_connects_encrypted() {
    let server = PgServer::start(true);
    let url = server.url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", server.ca().display()),
    );
    let store = PgStore::connect(&url, &limits()).unwrap();
    // The pool works over TLS: migrations ran, and the table answers.
    assert!(store.list().unwrap().is_empty());
    assert!(
        server_says_ssl(&url),
        "pg_stat_ssl says the connection is plain"
    );
    drop(store);
    // Without sslmode the connection stays plain, as before.
    assert!(!server_says_ssl(
        &server.url("localhost", "application_name=plain")
    ));
}

#[test]
fn verify_full_refuses_a_host_the_certificate_does_not_name() {
    let server = PgServer::start(true);
    let ca = server.ca().display().to_string();
    let e = connect_error(&server.url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ));
    assert!(e.contains("sslmode=verify-full"), "{e}");
    assert!(e.contains("not valid for name"), "{e}");
    // verify-ca checks the chain only: the same host is accepted.
    let url = server.url("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={ca}"));
    assert!(server_says_ssl(&url));
}

#[test]
fn verify_full_and_verify_ca_refuse_another_ca() {
    let server = PgServer::start(true);
    let other = server.dir.join("other-ca.pem");
    std::fs::write(&other, ca_and_localhost_cert().0).unwrap();
    for mode in ["verify-full", "verify-ca", "require"] {
        let e = connect_error(&server.url(
            "localhost",
            &format!("sslmode={mode}&sslrootcert={}", other.display()),
        ));
        assert!(e.contains(&format!("sslmode={mode}")), "{e}");
        assert!(e.contains("UnknownIssuer"), "{e}");
    }
}

#[test]
fn require_encrypts_without_verifying() {
    let server = PgServer::start(true);
    // 127.0.0.1 is not in the certificate and no CA is given: require checks neither.
    let url = server.url("127.0.0.1", "sslmode=require");
    let store = PgStore::connect(&url, &limits()).unwrap();
    assert!(store.list().unwrap().is_empty());
    assert!(server_says_ssl(&url));
}

#[test]
fn prefer_and_allow_are_refused_with_a_clear_error() {
    for mode in ["prefer", "allow"] {
        let e = connect_error(&format!(
            "postgres://postgres@localhost:1/postgres?sslmode={mode}"
        ));
        assert!(e.contains(&format!("sslmode={mode} is refused")), "{e}");
        assert!(e.contains("verify-full") && e.contains("disable"), "{e}");
    }
    let e = connect_error("postgres://postgres@localhost:1/postgres?sslmode=sometimes");
    assert!(e.contains("unknown sslmode `sometimes`"), "{e}");
    let e = connect_error(
        "postgres://postgres@localhost:1/postgres?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
    );
    assert!(e.contains("sslrootcert /nonexistent/ca.pem"), "{e}");
}

#[test]
fn require_against_a_server_without_tls_fails_clearly() {
    let server = PgServer::start(false);
    // The server is up and answers in plain text...
    assert!(!server_says_ssl(
        &server.url("localhost", "sslmode=disable")
    ));
    // ...but TLS was asked for: an error, never a plain connection.
    for query in [
        "sslmode=require".to_owned(),
        format!("sslmode=verify-full&sslrootcert={}", server.ca().display()),
    ] {
        let e = connect_error(&server.url("localhost", &query));
        assert!(e.contains("server does not support TLS"), "{e}");
    }
}

#[test]
fn a_server_that_asks_for_a_client_certificate_gets_one() {
    let server = PgServer::start_with(true, true);
    let (cert, key) = &server.client;
    let ca = server.ca().display().to_string();
    let url = server.url(
        "localhost",
        &format!(
            "sslmode=verify-full&sslrootcert={ca}&sslcert={}&sslkey={}",
            cert.display(),
            key.display()
        ),
    );
    // In, encrypted, and known to the server by the certificate's name.
    let (config, tls) = PgStore::client_config(&url).unwrap();
    let mut client = config.connect(tls).unwrap();
    let row = client
        .query_one(
            "SELECT ssl, client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .unwrap();
    assert!(row.get::<_, bool>(0));
    assert!(
        row.get::<_, String>(1).contains("CN=postgres"),
        "{:?}",
        row.get::<_, String>(1)
    );
    let store = PgStore::connect(&url, &limits()).unwrap();
    assert!(store.list().unwrap().is_empty());
    // Without the certificate, the server refuses.
    let without = connect_error(&server.url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ));
    assert!(
        without.contains("certificate") || without.contains("pg_hba"),
        "{without}"
    );
    // A key others may read is refused before any connection, as libpq does.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let loose = connect_error(&url);
    assert!(loose.contains("readable by others"), "{loose}");
}
