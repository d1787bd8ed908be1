//! Shared test helpers: a per-test namespace and client directory, nodes started in-process,
//! and `eventually` instead of sleeps.

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use prometheus::Registry;
use tokio_util::sync::CancellationToken;
use vigil::broker::Broker;
use vigil::config::Config;
use vigil::directory::{ClientRecord, ClientStore, FolderStore};
use vigil::edge::{self, EdgeHandle};
use vigil::metrics::BrokerMetrics;
use vigil::topology::Topology;
use vigil::worker::{self, WorkerHandle};

pub const TOKEN: &str = "test-token-123";

pub fn amqp_url() -> String {
    std::env::var("VIGIL_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// One test's world: a namespace on the shared broker, a clients folder, and the nodes started.
pub struct TestEnv {
    pub cfg: Config,
    pub clients_dir: PathBuf,
    pub shutdown: CancellationToken,
    pub edges: Vec<EdgeHandle>,
    pub workers: Vec<WorkerHandle>,
    pub worker_registries: Vec<Registry>,
    pub edge_registries: Vec<Registry>,
}

impl TestEnv {
    pub fn new(name: &str) -> Self {
        let namespace = format!("t-{name}-{:08x}", rand::random::<u32>());
        let clients_dir = std::env::temp_dir().join(format!("vigil-{namespace}"));
        let mut cfg = Config {
            namespace,
            amqp_url: amqp_url(),
            broker_connect_timeout_ms: 10_000,
            metrics_listen: "127.0.0.1:0".parse().unwrap(),
            clients_dir: clients_dir.clone(),
            ..Config::default()
        };
        cfg.edge.listen = "127.0.0.1:0".parse().unwrap();
        cfg.edge.max_fps = 1000;
        cfg.worker.analysis_threads = 2;
        // Transport tests need no models; identity tests opt in.
        cfg.worker.analyzer = "frame-info".into();
        // Nor liveness challenges, which only an identity analysis can answer; the liveness
        // tests opt in.
        cfg.challenge.on_start = false;
        Self {
            cfg,
            clients_dir,
            shutdown: CancellationToken::new(),
            edges: Vec::new(),
            workers: Vec::new(),
            worker_registries: Vec::new(),
            edge_registries: Vec::new(),
        }
    }

    pub fn add_client(&self, id: &str) {
        let store = FolderStore::open(&self.clients_dir).unwrap();
        store
            .put(&ClientRecord::new(id, id, TOKEN).unwrap())
            .unwrap();
    }

    pub async fn start_edge(&mut self, id: &str) -> String {
        let mut cfg = self.cfg.clone();
        cfg.edge.id = Some(id.into());
        let registry = Registry::new();
        let edge = edge::start(cfg, registry.clone(), self.shutdown.clone())
            .await
            .expect("edge starts");
        let url = edge.url();
        self.edges.push(edge);
        self.edge_registries.push(registry);
        url
    }

    pub async fn start_worker(&mut self, id: &str) {
        let mut cfg = self.cfg.clone();
        cfg.worker.id = Some(id.into());
        let registry = Registry::new();
        let worker = worker::start(cfg, registry.clone(), self.shutdown.clone())
            .await
            .expect("worker starts");
        self.workers.push(worker);
        self.worker_registries.push(registry);
    }

    pub async fn broker(&self) -> Broker {
        Broker::connect(
            &self.cfg.amqp_url,
            "test",
            BrokerMetrics::new(&Registry::new()),
        )
        .await
        .expect("broker reachable")
    }

    pub fn name(&self, logical: &str) -> String {
        format!("{}.{logical}", self.cfg.namespace)
    }

    /// Stop every node, then delete the namespace's queues and exchanges.
    pub async fn teardown(self) {
        self.shutdown.cancel();
        for e in self.edges {
            let _ = e.join().await;
        }
        for w in self.workers {
            let _ = w.join().await;
        }
        let broker = Broker::connect(
            &self.cfg.amqp_url,
            "teardown",
            BrokerMetrics::new(&Registry::new()),
        )
        .await
        .expect("broker reachable");
        let topo = Topology::load(None).unwrap();
        broker
            .delete(&topo.shared(&self.cfg.namespace))
            .await
            .unwrap();
        // The audit checkpoint stream, where a test's writer declared it.
        let _ = broker.delete(&topo.checkpoints(&self.cfg.namespace)).await;
        broker.close().await;
        let _ = std::fs::remove_dir_all(&self.clients_dir);
    }
}

/// The audit writer's read API token the tests use.
pub const AUDIT_API_TOKEN: &str = "test-audit-api-token-0123456789abcdef";

/// The audit writer started with `env`'s config serves its read API on a free port of the
/// loopback, and `env`'s edges read the trail there: set before either starts.
pub fn with_audit_api(env: &mut TestEnv) {
    let port = free_port();
    env.cfg.audit_api.listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
    env.cfg.audit_api.url = Some(format!("http://127.0.0.1:{port}"));
    env.cfg.audit_api.token = Some(AUDIT_API_TOKEN.into());
}

/// Poll `check` until it returns `Some`, or panic after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        // Each check is bounded too: a check that never returns must not hang the test.
        let left = timeout.saturating_sub(start.elapsed());
        if let Ok(Some(v)) = tokio::time::timeout(left, check()).await {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The value of a counter or gauge series in a registry (summed over labels matching `label`).
pub fn metric(registry: &Registry, name: &str, label: Option<(&str, &str)>) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| {
            label.is_none_or(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == k && l.value() == v)
            })
        })
        // A series is either a counter or a gauge; the other reads as 0.
        .map(|m| m.get_counter().get_value() + m.get_gauge().get_value())
        .sum()
}

/// A minimal HTTP/1.1 GET: status code and body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// A free local TCP port for a process the test starts, which binds it later.
///
/// Taken below the kernel's ephemeral range (`ip_local_port_range`): a port the kernel handed
/// out for `:0` would be free again once released, and any outgoing connection (to RabbitMQ,
/// PostgreSQL, the edge under test) could take it before the process binds it. Ports below the
/// range are given only to those who ask for them by number, and this process hands each out
/// once, from a start that differs between runs. On a machine whose ephemeral range starts
/// below 11,000 there is no such room, and the port is the kernel's, as before.
pub fn free_port() -> u16 {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 10_000;
    static START: OnceLock<(u32, u32)> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let &(ephemeral_low, start) = START.get_or_init(|| {
        let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
            .unwrap_or(32_768)
            .min(65_536);
        (low, rand::random_range(0..low.saturating_sub(LOW).max(1)))
    });
    if ephemeral_low < LOW + 1_000 {
        return std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free local port")
            .port();
    }
    let span = ephemeral_low - LOW;
    for _ in 0..span {
        let port = LOW + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free port between {LOW} and {ephemeral_low}")
}

/// A `vigil-worker` process for this test's namespace, with extra environment.
pub fn spawn_worker_process(
    env: &TestEnv,
    id: &str,
    extra: &[(&str, &str)],
) -> std::process::Child {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vigil-worker"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "warn,ort=error")
        .env("VIGIL_NAMESPACE", &env.cfg.namespace)
        .env("VIGIL_AMQP_URL", &env.cfg.amqp_url)
        .env("VIGIL_METRICS_LISTEN", "127.0.0.1:0")
        .env("VIGIL_WORKER_ID", id);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.spawn().expect("vigil-worker starts")
}

/// Wait until the work queue has `n` consumers.
pub async fn await_consumers(env: &TestEnv, n: u32) {
    let broker = env.broker().await;
    let queue = env.name("frames.work");
    eventually(
        &format!("{n} consumers on {queue}"),
        Duration::from_secs(20),
        || {
            let (broker, queue) = (&broker, &queue);
            async move {
                let (_, consumers) = broker.queue_counts(queue).await.ok()?;
                (consumers == n).then_some(())
            }
        },
    )
    .await;
    broker.close().await;
}

/// How long a process given SIGTERM/SIGINT/SIGKILL, or a CLI command, may take to finish.
pub const EXIT_LIMIT: Duration = Duration::from_secs(60);

/// Wait for a child to exit, at most `EXIT_LIMIT`; one that does not is killed and the test
/// fails saying so, rather than hanging.
pub fn exit_status(child: &mut std::process::Child) -> std::process::ExitStatus {
    wait_bounded(child)
        .unwrap_or_else(|| panic!("process {} did not exit within {EXIT_LIMIT:?}", child.id()))
}

/// Wait for a child to exit, at most `EXIT_LIMIT`; past that it is killed and `None` returned.
fn wait_bounded(child: &mut std::process::Child) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if start.elapsed() > EXIT_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run a command to completion and collect its output, at most `EXIT_LIMIT`.
pub fn output(cmd: &mut std::process::Command) -> std::process::Output {
    use std::io::Read as _;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let drain = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let status = exit_status(&mut child);
    std::process::Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// Send SIGTERM to a child process.
pub fn sigterm(child: &std::process::Child) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

/// What closed-loop clients saw: answers per (client, seq).
#[derive(Debug, Default)]
pub struct LoadReport {
    pub sent: u64,
    pub results: u64,
    pub dropped: Vec<(String, u64, vigil::wire::DropReason)>,
    /// (client, seq) pairs answered more than once.
    pub duplicates: Vec<(String, u64)>,
    /// (client, seq) pairs never answered.
    pub missing: Vec<(String, u64)>,
    /// Results that arrived within the load window, and its length.
    pub results_in_window: u64,
    pub seconds: f64,
}

impl LoadReport {
    /// Every frame sent got exactly one result: none lost, duplicated or dropped.
    pub fn assert_each_answered_once(&self) {
        assert!(self.missing.is_empty(), "lost: {:?}", self.missing);
        assert!(
            self.duplicates.is_empty(),
            "duplicated: {:?}",
            self.duplicates
        );
        assert!(self.dropped.is_empty(), "dropped: {:?}", self.dropped);
        assert_eq!(self.results, self.sent);
    }

    /// Results per second within the load window.
    pub fn results_per_s(&self) -> f64 {
        self.results_in_window as f64 / self.seconds
    }
}

/// `clients` closed-loop clients (each keeps `inflight` frames outstanding) for `duration`,
/// then wait for every outstanding answer.
pub async fn closed_loop(
    url: &str,
    prefix: &str,
    clients: usize,
    inflight: usize,
    duration: Duration,
) -> LoadReport {
    use vigil::edge::client::{Connection, Incoming};
    use vigil::wire::client::{Encoding, ServerMsg};
    let jpeg = vigil::inference::synthetic_jpeg(96, 64, 5, 0);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..clients {
        let client = format!("{prefix}{i}");
        let (url, jpeg) = (url.to_owned(), jpeg.clone());
        tasks.push(tokio::spawn(async move {
            let (mut conn, _) = Connection::connect(&url, &client, TOKEN, Encoding::MsgPack)
                .await
                .expect("connects");
            let mut answers: std::collections::HashMap<u64, u32> = Default::default();
            let mut report = LoadReport::default();
            let mut seq = 0;
            let mut outstanding = 0;
            loop {
                while outstanding < inflight && started.elapsed() < duration {
                    seq += 1;
                    outstanding += 1;
                    conn.send_frame(seq, 0, &jpeg).await.expect("send");
                }
                if outstanding == 0 {
                    break;
                }
                let msg = tokio::time::timeout(Duration::from_secs(15), conn.recv())
                    .await
                    .unwrap_or_else(|_| panic!("{client}: no answer for 15 s"));
                let (s, drop) = match msg {
                    Some(Ok(Incoming::Msg(ServerMsg::Result { seq, .. }))) => (seq, None),
                    Some(Ok(Incoming::Msg(ServerMsg::Dropped { seq, reason, .. }))) => {
                        (seq, Some(reason))
                    }
                    other => panic!("{client}: unexpected {other:?}"),
                };
                outstanding -= 1;
                *answers.entry(s).or_default() += 1;
                match drop {
                    None => {
                        report.results += 1;
                        if started.elapsed() < duration {
                            report.results_in_window += 1;
                        }
                    }
                    Some(reason) => report.dropped.push((client.clone(), s, reason)),
                }
            }
            // Late duplicates would arrive now.
            while let Ok(Some(Ok(Incoming::Msg(m)))) =
                tokio::time::timeout(Duration::from_millis(200), conn.recv()).await
            {
                if let ServerMsg::Result { seq, .. } | ServerMsg::Dropped { seq, .. } = m {
                    *answers.entry(seq).or_default() += 1;
                }
            }
            report.sent = seq;
            for s in 1..=seq {
                match answers.get(&s).copied().unwrap_or(0) {
                    0 => report.missing.push((client.clone(), s)),
                    1 => {}
                    _ => report.duplicates.push((client.clone(), s)),
                }
            }
            conn.close().await;
            report
        }));
    }
    let mut total = LoadReport::default();
    for t in tasks {
        let r = t.await.expect("client task");
        total.sent += r.sent;
        total.results += r.results;
        total.dropped.extend(r.dropped);
        total.duplicates.extend(r.duplicates);
        total.missing.extend(r.missing);
        total.results_in_window += r.results_in_window;
    }
    total.seconds = duration.as_secs_f64();
    total
}

/// A minimal HTTP/1.1 request with an optional bearer token and JSON body.
pub async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("admin API reachable");
    exchange(stream, addr, method, path, token, body)
        .await
        .unwrap()
}

/// [`http`] from the local address `source` (any of 127.0.0.0/8 reaches a loopback listener),
/// so that a test can play several hosts. `None` when the server closed the connection
/// before answering.
pub async fn http_from(
    source: std::net::IpAddr,
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Option<(u16, String)> {
    let stream = connect_from(source, addr).await.ok()?;
    exchange(stream, addr, method, path, token, None)
        .await
        .ok()
        .filter(|(status, _)| *status != 0)
}

/// A TCP connection to `addr` from the local address `source`.
pub async fn connect_from(
    source: std::net::IpAddr,
    addr: std::net::SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::new(source, 0))?;
    tokio::time::timeout(Duration::from_secs(10), socket.connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

/// The value of the metric line `name` (with its labels, as Prometheus prints them) in a
/// `/metrics` text, 0 when absent.
pub fn metric_value(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The same as [`http`] over HTTPS, trusting only the CA in `ca_pem`.
pub async fn https(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    use tokio_rustls::rustls::{self, pki_types::CertificateDer, pki_types::pem::PemObject as _};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let stream = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("TLS handshake timed out"))??;
    exchange(stream, addr, method, path, token, body).await
}

/// One HTTP/1.1 request on `stream`, read to the end: its status and body.
async fn exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let body = body.unwrap_or("");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut raw)).await;
    match read {
        Ok(Ok(_)) => {}
        // A TLS peer that closes without close_notify has still sent the whole answer.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(std::io::Error::other("no answer within 60 s")),
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// A TCP proxy to the broker that a test can cut (every connection dropped, nothing accepted)
/// and restore: a broker outage as the edge sees it.
pub struct Proxy {
    pub port: u16,
    target: String,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Proxy {
    pub async fn start(target: &str) -> std::sync::Arc<Self> {
        let proxy = std::sync::Arc::new(Self {
            port: free_port(),
            target: target.to_owned(),
            task: std::sync::Mutex::new(None),
        });
        proxy.resume().await;
        proxy
    }

    pub async fn resume(&self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .unwrap();
        let target = self.target.clone();
        let task = tokio::spawn(async move {
            let mut links = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                links.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        *self.task.lock().unwrap() = Some(task);
    }

    /// Drop every proxied connection and stop listening.
    pub fn cut(&self) {
        if let Some(task) = self.task.lock().unwrap().take() {
            task.abort();
        }
    }
}

/// host:port of the test broker.
pub fn broker_host() -> String {
    let url = amqp_url();
    url.split('@')
        .nth(1)
        .and_then(|h| h.split('/').next())
        .unwrap_or("127.0.0.1:5672")
        .to_owned()
}

/// A `vigil-edge` process for this test's namespace; returns it and its WebSocket URL.
pub fn spawn_edge_process(
    env: &TestEnv,
    id: &str,
    extra: &[(&str, &str)],
) -> (std::process::Child, String) {
    let port = free_port();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vigil-edge"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "warn")
        .env("VIGIL_NAMESPACE", &env.cfg.namespace)
        .env("VIGIL_AMQP_URL", &env.cfg.amqp_url)
        .env("VIGIL_METRICS_LISTEN", "127.0.0.1:0")
        .env("VIGIL_EDGE_LISTEN", format!("127.0.0.1:{port}"))
        .env("VIGIL_EDGE_ID", id)
        .env("VIGIL_CLIENTS_DIR", &env.clients_dir)
        .env(
            "VIGIL_CHALLENGE_ON_START",
            env.cfg.challenge.on_start.to_string(),
        );
    for (k, v) in extra {
        cmd.env(k, v);
    }
    (
        cmd.spawn().expect("vigil-edge starts"),
        format!("ws://127.0.0.1:{port}/v1/stream"),
    )
}

/// Resident memory of a process, in KiB (Linux).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The `host:port` of a `ws://` URL.
pub fn ws_addr(url: &str) -> String {
    url.trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Wait until a WebSocket endpoint accepts connections.
pub async fn await_listening(url: &str) {
    let addr = ws_addr(url);
    eventually(&format!("{url} listening"), Duration::from_secs(20), || {
        let addr = addr.clone();
        async move { tokio::net::TcpStream::connect(&addr).await.ok().map(|_| ()) }
    })
    .await;
}

/// A RabbitMQ node of the test's own, on its own port, data folder and node name, so that it can
/// be stopped and started without touching the shared broker.
pub struct PrivateBroker {
    pub port: u16,
    pub node: String,
    dir: PathBuf,
    dist_port: u16,
    /// The `amqps://` port, when the node was started with a TLS listener.
    tls_port: Option<u16>,
    /// The URL that shows the node is up, when it is not the guest's.
    probe: Option<String>,
}

impl PrivateBroker {
    const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
    pub const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";

    pub async fn start() -> Self {
        let b = Self::new();
        std::fs::write(b.dir.join("rabbitmq.conf"), "").unwrap();
        b.boot().await;
        b
    }

    /// A node with the management plugin, its HTTP API on `127.0.0.1:<port>`; returns the node
    /// and the API's URL (with the node's guest credentials).
    pub async fn start_with_management() -> (Self, String) {
        Self::start_with_management_conf(|_, _| (String::new(), None)).await
    }

    /// [`PrivateBroker::start_with_management`], with more configuration: `extra(amqp port,
    /// management port)` gives what is appended to the node's `rabbitmq.conf`, and, when the
    /// node will have no guest user, the AMQP URL that shows it is up.
    pub async fn start_with_management_conf(
        extra: impl Fn(u16, u16) -> (String, Option<String>),
    ) -> (Self, String) {
        let mut b = Self::new();
        let port = free_port();
        std::fs::write(b.dir.join("plugins"), "[rabbitmq_management].").unwrap();
        std::fs::write(b.dir.join("rabbitmq.conf"), {
            let (conf, probe) = extra(b.port, port);
            b.probe = probe;
            format!("management.tcp.port = {port}\nmanagement.tcp.ip = 127.0.0.1\n{conf}")
        })
        .unwrap();
        b.boot().await;
        let url = format!("http://guest:guest@127.0.0.1:{port}");
        eventually(
            "the management API",
            Duration::from_secs(60),
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
        (b, url)
    }

    /// A node that also listens for `amqps://`, with this server certificate and key (PEM).
    pub async fn start_tls(cert_pem: &str, key_pem: &str) -> Self {
        let mut b = Self::new();
        let tls_port = free_port();
        let (cert, key) = (b.dir.join("server.pem"), b.dir.join("server.key"));
        std::fs::write(&cert, cert_pem).unwrap();
        std::fs::write(&key, key_pem).unwrap();
        std::fs::write(
            b.dir.join("rabbitmq.conf"),
            format!(
                "listeners.ssl.default = {tls_port}\n\
                 ssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\n\
                 ssl_options.verify = verify_none\n\
                 ssl_options.fail_if_no_peer_cert = false\n",
                cert.display(),
                key.display()
            ),
        )
        .unwrap();
        b.tls_port = Some(tls_port);
        b.boot().await;
        b
    }

    /// `n` nodes joined into one cluster with `rabbitmqctl join_cluster` (one Erlang cookie,
    /// each node on its own ports and folder).
    pub async fn start_cluster(n: usize) -> Vec<Self> {
        let cookie = format!("vigiltestcookie{:016x}", rand::random::<u64>());
        let nodes: Vec<Self> = (0..n).map(|_| Self::new()).collect();
        for node in &nodes {
            std::fs::write(node.dir.join("rabbitmq.conf"), "").unwrap();
            let path = node.dir.join(".erlang.cookie");
            std::fs::write(&path, &cookie).unwrap();
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
            node.boot().await;
        }
        for node in &nodes[1..] {
            for args in [
                &["stop_app"][..],
                &["reset"][..],
                &["join_cluster", &nodes[0].node][..],
                &["start_app"][..],
            ] {
                assert!(
                    node.ctl(args),
                    "rabbitmqctl {args:?}: {}",
                    std::fs::read_to_string(node.dir.join("scripts.log")).unwrap_or_default()
                );
            }
        }
        nodes
    }

    fn new() -> Self {
        let tag = format!("{:08x}", rand::random::<u32>());
        let dir = std::env::temp_dir().join(format!("vigil-rmq-{tag}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("plugins"), "[].").unwrap();
        Self {
            port: free_port(),
            node: format!("vigil{tag}@localhost"),
            dir,
            dist_port: free_port(),
            tls_port: None,
            probe: None,
        }
    }

    /// The environment `rabbitmqctl` needs to reach this node (its cookie lives in `HOME`).
    pub fn env(&self, cmd: &mut std::process::Command) {
        cmd.env("HOME", &self.dir)
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", self.dir.join("plugins"))
            .env("RABBITMQ_PID_FILE", self.dir.join("pid"))
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("rabbitmq.conf"));
    }

    /// Start the node and wait until it accepts AMQP connections.
    pub async fn boot(&self) {
        let mut cmd = std::process::Command::new(Self::SERVER);
        cmd.arg("-detached");
        self.env(&mut cmd);
        assert!(
            self.run(cmd).is_some_and(|s| s.success()),
            "{} -detached failed",
            Self::SERVER
        );
        let url = self.probe.clone().unwrap_or_else(|| self.url());
        eventually("the private broker", Duration::from_secs(60), || async {
            let b = Broker::connect(&url, "probe", BrokerMetrics::new(&Registry::new()))
                .await
                .ok()?;
            b.close().await;
            Some(())
        })
        .await;
    }

    /// Run one of RabbitMQ's scripts, bounded by `EXIT_LIMIT`. Its output goes to a file in
    /// the node's folder: a pipe could be held open by the daemon it starts.
    fn run(&self, mut cmd: std::process::Command) -> Option<std::process::ExitStatus> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("scripts.log"))
            .unwrap();
        let mut child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{e} (Debian package rabbitmq-server)"));
        wait_bounded(&mut child)
    }

    /// `rabbitmqctl stop`, bounded; true when the node stopped.
    fn ctl_stop(&self) -> bool {
        let mut cmd = std::process::Command::new(Self::CTL);
        cmd.args(["-n", &self.node, "stop"]);
        self.env(&mut cmd);
        self.run(cmd).is_some_and(|s| s.success())
    }

    /// `rabbitmqctl -n NODE ARGS...`, bounded; true when it succeeded.
    pub fn ctl(&self, args: &[&str]) -> bool {
        let mut cmd = std::process::Command::new(Self::CTL);
        cmd.args(["-n", &self.node]).args(args);
        self.env(&mut cmd);
        self.run(cmd).is_some_and(|s| s.success())
    }

    /// Stop the node (its data stays).
    pub fn stop(&self) {
        assert!(
            self.ctl_stop(),
            "rabbitmqctl stop: {}",
            std::fs::read_to_string(self.dir.join("scripts.log")).unwrap_or_default()
        );
    }

    /// The node's URL. One connection attempt is bounded well below the default: the tests
    /// reconnect while the node boots, when it can accept a socket and never answer.
    pub fn url(&self) -> String {
        format!(
            "amqp://guest:guest@127.0.0.1:{}/%2f?connection_timeout=2000",
            self.port
        )
    }

    /// The node's `amqps://` URL, trusting the CA in the PEM file `ca`.
    pub fn tls_url(&self, ca: &std::path::Path) -> String {
        let port = self.tls_port.expect("the node was started without TLS");
        format!(
            "amqps://guest:guest@127.0.0.1:{port}/%2f?connection_timeout=5000&cacertfile={}",
            ca.display()
        )
    }

    /// `rabbitmqctl -n NODE ARGS...`, bounded, with its standard output.
    pub fn ctl_output(&self, args: &[&str]) -> String {
        let mut cmd = std::process::Command::new("timeout");
        cmd.args(["60", Self::CTL, "-n", &self.node]).args(args);
        self.env(&mut cmd);
        let out = cmd
            .stdin(std::process::Stdio::null())
            .output()
            .expect("rabbitmqctl");
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        if !self.ctl_stop() {
            // The node did not stop on request: end it by its pid file.
            if let Ok(pid) = std::fs::read_to_string(self.dir.join("pid")) {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", pid.trim()])
                    .status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The machine's PostgreSQL (VIGIL_TEST_DATABASE_URL, default
/// postgres://postgres@127.0.0.1:5432/postgres).
pub fn postgres_admin_url() -> String {
    std::env::var("VIGIL_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database of the test's own on the machine's PostgreSQL, dropped when it goes.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
}

impl TestDatabase {
    /// Create `vigil_t_<random>`. Blocks: call from a test body, not from inside a task.
    pub fn create() -> Self {
        let name = format!("vigil_t_{:08x}", rand::random::<u32>());
        Self::admin(&format!("CREATE DATABASE {name}"));
        let admin = postgres_admin_url();
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        Self {
            url: format!("{base}/{name}"),
            name,
        }
    }

    /// Run one statement on the `postgres` database, off the async runtime.
    fn admin(sql: &str) {
        let sql = sql.to_owned();
        std::thread::spawn(move || {
            let mut client = postgres::Client::connect(&postgres_admin_url(), postgres::NoTls)
                .expect("PostgreSQL reachable");
            client.batch_execute(&sql).expect("admin statement runs");
        })
        .join()
        .expect("admin thread");
    }

    /// Rows of one query on this database, off the async runtime.
    pub fn query(&self, sql: &str) -> Vec<postgres::Row> {
        let (url, sql) = (self.url.clone(), sql.to_owned());
        std::thread::spawn(move || {
            let mut client =
                postgres::Client::connect(&url, postgres::NoTls).expect("database reachable");
            client.query(&sql, &[]).expect("query runs")
        })
        .join()
        .expect("query thread")
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        Self::admin(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ));
    }
}

/// A child process killed when the test ends, however it ends.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// HAProxy running `deploy/haproxy/haproxy.cfg` (the file compose.yaml runs) in front of two
/// edges, each given as (WebSocket addr, admin addr, metrics port).
pub struct Haproxy {
    pub ws_url: String,
    pub admin_addr: std::net::SocketAddr,
    /// The candidates' HTTPS address, with a certificate from `vigil certs dev` for 127.0.0.1.
    pub https_addr: std::net::SocketAddr,
    /// That certificate's CA, and its key's SPKI SHA-256 (what Chromium pins).
    pub ca_pem: String,
    pub spki_sha256: String,
    _certs: TempDir,
    _process: KillOnDrop,
}

/// A folder removed when the test ends.
pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Haproxy {
    pub async fn start(edges: [(&str, &str, u16); 2]) -> Self {
        let (listen, admin, stats) = (free_port(), free_port(), free_port());
        let (tls, admin_tls) = (free_port(), free_port());
        let certs =
            TempDir(std::env::temp_dir().join(format!("vigil-lb-{:08x}", rand::random::<u32>())));
        let made = vigil::tools::certs::dev(&certs.0, &["127.0.0.1".to_owned()], 1, false, false)
            .unwrap()
            .unwrap();
        let config = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/haproxy/haproxy.cfg");
        let mut cmd = std::process::Command::new("haproxy");
        cmd.args(["-db", "-f", config])
            .env("VIGIL_LB_LISTEN", format!("127.0.0.1:{listen}"))
            .env("VIGIL_LB_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
            .env("VIGIL_LB_STATS_LISTEN", format!("127.0.0.1:{stats}"))
            .env("VIGIL_LB_TLS_LISTEN", format!("127.0.0.1:{tls}"))
            .env(
                "VIGIL_LB_ADMIN_TLS_LISTEN",
                format!("127.0.0.1:{admin_tls}"),
            )
            .env("VIGIL_LB_CERT", &made.combined)
            .stdin(std::process::Stdio::null());
        for (i, (ws, admin, health)) in edges.iter().enumerate() {
            let n = i + 1;
            cmd.env(format!("VIGIL_EDGE_{n}"), ws)
                .env(format!("VIGIL_EDGE_{n}_ADMIN"), admin)
                .env(format!("VIGIL_EDGE_{n}_HEALTH_PORT"), health.to_string());
        }
        let process = KillOnDrop(
            cmd.spawn()
                .expect("haproxy runs (Debian package `haproxy`; scripts/test.sh installs it)"),
        );
        let ws_url = format!("ws://127.0.0.1:{listen}/v1/stream");
        await_listening(&ws_url).await;
        Self {
            ws_url,
            admin_addr: format!("127.0.0.1:{admin}").parse().unwrap(),
            https_addr: format!("127.0.0.1:{tls}").parse().unwrap(),
            ca_pem: std::fs::read_to_string(&made.ca).unwrap(),
            spki_sha256: made.spki_sha256,
            _certs: certs,
            _process: process,
        }
    }
}

/// One client streaming to `url`, one frame in flight, reconnecting whenever its socket ends
/// (or an answer is 5 s late); counts the answers it gets and notes when it got the last.
pub fn stream_through(
    url: String,
    id: String,
    answers: std::sync::Arc<std::sync::atomic::AtomicU64>,
    last_answer: std::sync::Arc<std::sync::Mutex<Instant>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let jpeg = vigil::inference::synthetic_jpeg(64, 48, 1, 0);
        let mut seq = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let Ok((mut conn, _)) = vigil::edge::client::Connection::connect(
                &url,
                &id,
                TOKEN,
                vigil::wire::client::Encoding::MsgPack,
            )
            .await
            else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                seq += 1;
                if conn.send_frame(seq, 0, &jpeg).await.is_err() {
                    break;
                }
                match tokio::time::timeout(Duration::from_secs(5), conn.recv()).await {
                    Ok(Some(Ok(vigil::edge::client::Incoming::Msg(
                        vigil::wire::client::ServerMsg::Result { .. },
                    )))) => {
                        answers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        *last_answer.lock().unwrap() = Instant::now();
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Ok(Some(Ok(vigil::edge::client::Incoming::Msg(_)))) => {}
                    _ => break,
                }
            }
        }
    })
}

/// A hello sent from the local address `source` to the WebSocket at `url`, the connection
/// first carrying `preamble` (a PROXY header) when given: the reply's `type` and `code`.
pub async fn hello_from(
    source: &str,
    url: &str,
    client: &str,
    token: &str,
    preamble: &[u8],
) -> String {
    hello_with(source, url, client, token, preamble, None).await
}

/// ...with an `X-Forwarded-For` header on the WebSocket request, when given.
pub async fn hello_with(
    source: &str,
    url: &str,
    client: &str,
    token: &str,
    preamble: &[u8],
    forwarded_for: Option<&str>,
) -> String {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio::io::AsyncWriteExt as _;
    use tokio_tungstenite::tungstenite::Message;
    let addr: std::net::SocketAddr = crate::support::ws_addr(url).parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    // Closed with a reset, not left in TIME_WAIT: thousands of those (a login flood) would
    // hold their ports for a minute, and a wildcard bind (a later test's broker) could find
    // one taken.
    socket.set_zero_linger().unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    stream.write_all(preamble).await.unwrap();
    let attempt = async {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
        let mut request = url.into_client_request().map_err(|e| e.to_string())?;
        if let Some(xff) = forwarded_for {
            request
                .headers_mut()
                .insert("x-forwarded-for", xff.parse().unwrap());
        }
        let (mut ws, _) = tokio_tungstenite::client_async(request, stream)
            .await
            .map_err(|e| format!("no websocket: {e}"))?;
        let hello = serde_json::json!({"type": "hello", "client_id": client, "token": token});
        // A refusal before the hello may close the socket first: the answer is still read.
        let _ = ws.send(Message::Text(hello.to_string().into())).await;
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                Ok(format!(
                    "{} {}",
                    v["type"].as_str().unwrap_or(""),
                    v["code"].as_str().unwrap_or("")
                )
                .trim()
                .to_owned())
            }
            other => Err(format!("no answer: {other:?}")),
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), attempt).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => e,
        Err(_) => "timeout".into(),
    }
}
