//! Configuration: one TOML file (optional) plus `VIGIL_*` environment overrides, typed and
//! validated. Validation reports every problem at once; binaries exit with code 64 on any.
//!
//! The doc comment of each field is its user documentation; the env variable that overrides it
//! is named in brackets.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::topology::check_identifier;

pub mod vars;
pub use vars::Role;

/// Exit code for a bad configuration: `EX_CONFIG` from sysexits.h (clap's usage errors are 2).
pub const EXIT_BAD_CONFIG: u8 = 78;

/// Exit code of `vigil audit verify` on a broken chain: `EX_DATAERR` from sysexits.h, apart from
/// clap's usage errors (2) and other failures (1).
pub const EXIT_AUDIT_BROKEN: u8 = 65;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Prefix of every exchange and queue name [VIGIL_NAMESPACE].
    pub namespace: String,
    /// AMQP URL of the broker, or the URLs of a cluster's nodes separated by commas: a
    /// process connects to one of them and fails over to the others [VIGIL_AMQP_URL].
    pub amqp_url: String,
    /// How long a binary keeps retrying its first broker connection, in ms
    /// [VIGIL_BROKER_CONNECT_TIMEOUT_MS].
    pub broker_connect_timeout_ms: u64,
    /// `shared`: every role is this process's broker user. `separate`: each role is its own
    /// user, `<namespace>-<role>` (made by `vigil broker provision`), and receivers accept each
    /// kind of event only from its roles [VIGIL_BROKER_ROLES].
    pub broker_roles: crate::roles::RoleMode,
    /// RabbitMQ's management API (`http://user:pass@host:15672`). When set, the shared queues'
    /// tunables (TTL, lengths, overflow, dead-lettering) are RabbitMQ policies put through it,
    /// not declare arguments, so changing them in the topology never breaks start-up
    /// [VIGIL_BROKER_MANAGEMENT_URL].
    pub broker_management_url: Option<String>,
    /// PEM certificates trusted for an `https://` management URL besides the system's roots
    /// [VIGIL_BROKER_MANAGEMENT_CA_FILE].
    pub broker_management_ca_file: Option<PathBuf>,
    /// Address of the `/metrics`, `/healthz` and `/readyz` endpoints; port 0 picks a free port
    /// [VIGIL_METRICS_LISTEN].
    pub metrics_listen: SocketAddr,
    /// Connections an HTTP listener (the admin API, `/metrics`) serves at once; more are
    /// closed as they are accepted [VIGIL_HTTP_MAX_CONNECTIONS].
    pub http_max_connections: usize,
    /// Connections one address may hold on an HTTP listener at once; more from it are closed
    /// as they are accepted [VIGIL_HTTP_MAX_CONNECTIONS_PER_ADDRESS].
    pub http_max_connections_per_address: usize,
    /// How long a request's headers may take to arrive, however they trickle in, in ms
    /// [VIGIL_HTTP_HEADER_TIMEOUT_MS].
    pub http_header_timeout_ms: u64,
    /// How long an HTTP connection may go without sending or taking a byte (no headers, no
    /// next request) before it is closed, in ms [VIGIL_HTTP_IDLE_TIMEOUT_MS].
    pub http_idle_timeout_ms: u64,
    /// Topology file; the built-in `exchanges.toml` when unset [VIGIL_TOPOLOGY].
    pub topology_file: Option<PathBuf>,
    /// Folder of the client directory, used when `directory_url` is unset
    /// [VIGIL_CLIENTS_DIR].
    pub clients_dir: PathBuf,
    /// The client directory in PostgreSQL (`postgres://user:pass@host/db`), shared by every
    /// edge of a cluster; the folder `clients_dir` when unset [VIGIL_DIRECTORY_URL].
    pub directory_url: Option<String>,
    /// Most PostgreSQL connections one process holds [VIGIL_DIRECTORY_POOL].
    pub directory_pool: u32,
    /// Bound on a directory connection, statement or row-lock wait, in ms
    /// [VIGIL_DIRECTORY_TIMEOUT_MS].
    pub directory_timeout_ms: u64,
    /// `text` or `json` [VIGIL_LOG_FORMAT].
    pub log_format: LogFormat,
    pub edge: EdgeConfig,
    pub worker: WorkerConfig,
    pub inference: InferenceConfig,
    /// The action policy the edge runs per client.
    pub policy: crate::policy::PolicyConfig,
    /// Passive liveness over the stream: the signals that raise a suspicion in the edge.
    pub liveness: crate::liveness::LivenessConfig,
    /// Active liveness: the challenges the edge issues (at the start of a session, on a
    /// suspicion, at random) and how they are checked.
    pub challenge: crate::challenge::ChallengeConfig,
    /// Folder of the evidence and the append-only audit log [VIGIL_EVIDENCE_DIR].
    pub evidence_dir: PathBuf,
    /// The Ed25519 private key (PKCS#8 PEM, from `vigil audit keygen`) the audit writer signs
    /// entries with; outside the evidence folder. Unset: entries are not signed
    /// [VIGIL_AUDIT_KEY].
    pub audit_key: Option<PathBuf>,
    /// The audit writer's public key (PEM): the admin API serves it for pinning, the writer
    /// checks its views under it when it has no key of its own; `vigil audit verify` uses it by
    /// default [VIGIL_AUDIT_PUBLIC_KEY].
    pub audit_public_key: Option<PathBuf>,
    /// The most time a read of the checkpoint stream may take, in ms
    /// [VIGIL_AUDIT_CHECKPOINT_SCAN_MS].
    pub audit_checkpoint_scan_ms: u64,
    /// Evidence JPEGs kept per client and UTC day, in MiB; past it an entry records its
    /// frames' verdicts without their images; 0: no limit
    /// [VIGIL_AUDIT_EVIDENCE_MB_PER_CLIENT_DAY].
    pub audit_evidence_mb_per_client_day: u64,
    /// The audit writer removes the evidence files of actions older than this many days, once
    /// an hour (the log keeps their entries and hashes, and a prune entry lists the files); 0
    /// keeps evidence forever [VIGIL_AUDIT_RETENTION_DAYS].
    pub audit_retention_days: u32,
    /// Short-lived session tokens, minted per exam session in place of a client's permanent
    /// token.
    pub sessions: crate::session_tokens::SessionConfig,
    /// Signed webhooks to the exam platform: every audited entry, POSTed by the audit writer.
    pub webhooks: crate::webhooks::WebhookConfig,
    /// The audit writer's read API, through which the console's audit view reads the trail.
    pub audit_api: AuditApiConfig,
    /// Keep the last minutes of frames in a RabbitMQ stream for `vigil record --from-stream`
    /// [VIGIL_CAPTURE_STREAM].
    pub capture_stream: bool,
}

/// `[audit_api]` in the config file: the audit writer's read API. The console's audit view
/// (on an edge's admin API) reads each client's trail and its evidence frames through it, so
/// the edge never reads the writer's folder: the writer checks its own log and serves what it
/// checked.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditApiConfig {
    /// Where the audit writer serves it; unset: it serves none [VIGIL_AUDIT_API_LISTEN].
    pub listen: Option<SocketAddr>,
    /// The bearer token the edge presents and the writer expects, at least 32 characters
    /// [VIGIL_AUDIT_API_TOKEN]; or read from a file [VIGIL_AUDIT_API_TOKEN_FILE].
    pub token: Option<String>,
    /// PEM certificate chain for HTTPS on it; with `tls_key` it speaks HTTPS only
    /// [VIGIL_AUDIT_API_TLS_CERT].
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert` [VIGIL_AUDIT_API_TLS_KEY].
    pub tls_key: Option<PathBuf>,
    /// Where the edge reads it: `https://host:port`, or `http://` on a private network
    /// [VIGIL_AUDIT_API_URL].
    pub url: Option<String>,
    /// PEM certificates the edge trusts for `https://` besides the system's roots
    /// [VIGIL_AUDIT_API_CA_FILE].
    pub ca_file: Option<PathBuf>,
    /// Views the writer builds at once; more wait their turn [VIGIL_AUDIT_API_VIEWS].
    pub views: usize,
    /// How long a view waits for its turn at the writer before a 503, in ms
    /// [VIGIL_AUDIT_API_WAIT_MS].
    pub wait_ms: u64,
    /// The most entries one trail view holds, the newest; it says how many there are
    /// [VIGIL_AUDIT_API_MAX_ENTRIES].
    pub max_entries: usize,
    /// The largest trail view the edge takes from the writer, in bytes
    /// [VIGIL_AUDIT_API_MAX_BYTES].
    pub max_bytes: usize,
}

impl Default for AuditApiConfig {
    fn default() -> Self {
        Self {
            listen: None,
            token: None,
            tls_cert: None,
            tls_key: None,
            url: None,
            ca_file: None,
            views: 2,
            wait_ms: 10_000,
            max_entries: 5_000,
            max_bytes: 64 << 20,
        }
    }
}

/// The shortest bearer token the read API takes.
pub const MIN_AUDIT_API_TOKEN: usize = 32;

impl AuditApiConfig {
    /// What the process in `role` reads of it, checked.
    fn validate(&self, serves: bool, reads: bool) -> Vec<String> {
        let mut errors = Vec::new();
        let needs_token = (serves && self.listen.is_some()) || (reads && self.url.is_some());
        if needs_token {
            match &self.token {
                None => errors.push(
                    "audit_api.token is unset: the audit writer's read API needs a bearer token \
                     (VIGIL_AUDIT_API_TOKEN_FILE)"
                        .to_owned(),
                ),
                Some(t)
                    if t.len() < MIN_AUDIT_API_TOKEN
                        || !t.bytes().all(|b| b.is_ascii_graphic()) =>
                {
                    errors.push(format!(
                        "audit_api.token must be at least {MIN_AUDIT_API_TOKEN} visible ASCII \
                         characters, no spaces (`head -c 32 /dev/urandom | base64`)"
                    ))
                }
                Some(_) => {}
            }
        }
        if serves && self.tls_cert.is_some() != self.tls_key.is_some() {
            errors.push("audit_api.tls_cert and audit_api.tls_key go together".to_owned());
        }
        if serves && self.views == 0 {
            errors.push("audit_api.views must be at least 1".to_owned());
        }
        if serves && self.max_entries == 0 {
            errors.push("audit_api.max_entries must be at least 1".to_owned());
        }
        if serves && self.wait_ms == 0 {
            errors.push("audit_api.wait_ms must be at least 1".to_owned());
        }
        if reads && let Some(url) = &self.url {
            match url::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
                    if u.scheme() == "http" && self.ca_file.is_some() {
                        errors.push(
                            "audit_api.ca_file is set but audit_api.url is http://: use https://"
                                .to_owned(),
                        );
                    }
                    if !u.username().is_empty() || u.password().is_some() {
                        errors.push(
                            "audit_api.url must not hold credentials: the token goes in \
                             audit_api.token"
                                .to_owned(),
                        );
                    }
                }
                Ok(_) => errors.push(format!(
                    "audit_api.url {url:?} must be an http:// or https:// URL with a host"
                )),
                Err(e) => errors.push(format!("audit_api.url {url:?}: {e}")),
            }
        }
        if reads && self.max_bytes < 1024 {
            errors.push(format!(
                "audit_api.max_bytes = {} must be at least 1024",
                self.max_bytes
            ));
        }
        errors
    }
}

// The model stack's settings are the inference crate's, here at their old paths.
pub use vigil_inference::config::{InferenceConfig, Thresholds};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeConfig {
    /// WebSocket listen address [VIGIL_EDGE_LISTEN].
    pub listen: SocketAddr,
    /// This edge's id; replies are routed to it. Random when unset [VIGIL_EDGE_ID].
    pub id: Option<String>,
    /// Largest JPEG accepted, in bytes [VIGIL_EDGE_MAX_FRAME_BYTES].
    pub max_frame_bytes: usize,
    /// Most pixels a frame may declare in its JPEG header (a few hundred bytes can declare
    /// gigabytes of pixels); larger frames are dropped `frame_too_large` before they reach a
    /// worker [VIGIL_EDGE_MAX_FRAME_PIXELS].
    pub max_frame_pixels: u64,
    /// Longest side a frame may declare, in pixels [VIGIL_EDGE_MAX_FRAME_SIDE].
    pub max_frame_side: u32,
    /// Frames per second per client; faster frames are dropped `rate_limited`
    /// [VIGIL_EDGE_MAX_FPS].
    pub max_fps: u32,
    /// A client that sends more than this many times `max_fps` within one second is closed
    /// with 4429 [VIGIL_EDGE_FLOOD_FACTOR].
    pub flood_factor: u32,
    /// Open sessions per edge, counted from authentication; further clients are refused with
    /// 4503 [VIGIL_EDGE_MAX_SESSIONS].
    pub max_sessions: usize,
    /// Connections that have not authenticated yet, per edge; more are closed at accept
    /// [VIGIL_EDGE_MAX_UNAUTHENTICATED].
    pub max_unauthenticated: usize,
    /// ...and per source address [VIGIL_EDGE_MAX_UNAUTHENTICATED_PER_SOURCE].
    pub max_unauthenticated_per_source: u32,
    /// Load balancers whose PROXY protocol v2 header (HAProxy's `send-proxy-v2`), or else the
    /// last `X-Forwarded-For` address (an HTTP ingress), gives the client's real address, as
    /// CIDRs or addresses, comma-separated. Every per-address limit, log line and audit entry
    /// then uses the client's address. A PROXY header from any other peer is refused, and its
    /// `X-Forwarded-For` ignored. Empty: no peer is trusted [VIGIL_EDGE_TRUSTED_PROXIES].
    pub trusted_proxies: crate::edge::proxy::TrustedProxies,
    /// Failed hellos an address may make per minute; past that its hellos are refused (4429)
    /// until the quota refills [VIGIL_EDGE_FAILED_HELLOS_PER_MINUTE].
    pub failed_hellos_per_minute: u32,
    /// Failed token hellos in a row a client id may have; past that its token hellos are
    /// refused (4429), before any hashing, for `id_lockout_base_ms` doubled with each further
    /// failure [VIGIL_EDGE_FAILED_HELLOS_PER_ID].
    pub failed_hellos_per_id: u32,
    /// The largest message accepted before the hello, in bytes; a larger one is refused and
    /// counts as a failed hello. (The WebSocket layer reads a message up to
    /// `max_frame_bytes` before this check sees it) [VIGIL_EDGE_MAX_HELLO_BYTES].
    pub max_hello_bytes: usize,
    /// Audit views the admin API builds at once [VIGIL_ADMIN_AUDIT_VIEWS].
    pub audit_views: usize,
    /// How long an audit view may wait for its turn before a 503, in ms
    /// [VIGIL_ADMIN_AUDIT_VIEW_WAIT_MS].
    pub audit_view_wait_ms: u64,
    /// A client id's first lockout, in ms [VIGIL_EDGE_ID_LOCKOUT_BASE_MS].
    pub id_lockout_base_ms: u64,
    /// A client id's longest lockout, in ms [VIGIL_EDGE_ID_LOCKOUT_MAX_MS].
    pub id_lockout_max_ms: u64,
    /// Frames per client published and awaiting a result; one more waits, and a newer frame
    /// replaces the waiting one [VIGIL_EDGE_MAX_INFLIGHT].
    pub max_inflight: usize,
    /// Every write to a client (a message, a flush, a close) must finish within this many ms;
    /// a client that does not read is closed `slow_reader` (4408) and counted
    /// [VIGIL_EDGE_WRITE_TIMEOUT_MS].
    pub write_timeout_ms: u64,
    /// How long a new connection may take to send its hello, in ms [VIGIL_EDGE_HELLO_TIMEOUT_MS].
    pub hello_timeout_ms: u64,
    /// The edge pings each client this often, in ms [VIGIL_EDGE_PING_INTERVAL_MS].
    pub ping_interval_ms: u64,
    /// A client from which nothing (not even a pong) has arrived for this long is closed
    /// `idle` (4410), in ms [VIGIL_EDGE_IDLE_TIMEOUT_MS].
    pub idle_timeout_ms: u64,
    /// The edge's lease in the directory, renewed every third of it: once it runs out (the
    /// edge died), the directory reports the edge's clients as no longer connected. In ms
    /// [VIGIL_EDGE_LEASE_MS].
    pub lease_ms: u64,
    /// A frame's life from arrival to result, in ms; past it the frame is answered `expired`
    /// [VIGIL_EDGE_FRAME_DEADLINE_MS].
    pub frame_deadline_ms: u64,
    /// Consecutive unparseable messages tolerated before the session is closed with 4400
    /// [VIGIL_EDGE_MAX_BAD_MESSAGES].
    pub max_bad_messages: u32,
    /// Send clients the scores behind each verdict (similarity, liveness and presentation-attack
    /// scores, pose, thresholds). Off, a client learns its verdicts and face boxes only: the
    /// numbers would let an attacker tune a photo or a mask against the models, frame by frame,
    /// until it passes. Operators see them in the audit evidence either way
    /// [VIGIL_EDGE_CLIENT_SCORES].
    pub client_scores: bool,
    /// A steady candidate's frames run the phone detector on every this-many-th frame, and on
    /// every frame after a phone was seen or a verdict was not `ok` (1: every frame)
    /// [VIGIL_EDGE_PHONE_EVERY].
    pub phone_every: u32,
    /// Track reuse: a steady candidate's frames on a confirmed face track skip the recogniser
    /// and the liveness models, with a full analysis at least this often, in ms (and on any
    /// frame with `recheck_chance`); 0 runs every model on every frame
    /// ([`crate::cadence::IdentityCadence`]) [VIGIL_EDGE_RECHECK_MS].
    pub recheck_ms: u64,
    /// A full analysis confirms the track only when its similarity clears the worker's
    /// `match_cosine` by this much.
    pub track_margin: f32,
    /// Track reuse: the chance that any frame on the track is fully analysed anyway, so that
    /// no frame is known to be carried.
    pub recheck_chance: f64,
    /// Grace period for closing sessions on shutdown, in ms [VIGIL_EDGE_SHUTDOWN_GRACE_MS].
    pub shutdown_grace_ms: u64,
    /// Actions on their way to the audit trail (each publish waits for its confirm, with
    /// retries); past this many, a new action is counted unaudited rather than queued
    /// [VIGIL_EDGE_MAX_PENDING_AUDITS].
    pub max_pending_audits: usize,
    /// How long an action keeps trying to reach the audit exchange (through a broker restart
    /// or failover) before it is counted unaudited, in ms [VIGIL_EDGE_AUDIT_RETRY_MS].
    pub audit_retry_ms: u64,
    /// On shutdown, after the sessions have closed, how long the actions still on their way
    /// to the audit trail may take, in ms [VIGIL_EDGE_AUDIT_DRAIN_MS].
    pub audit_drain_ms: u64,
    /// Bytes read from a client socket at a time. The WebSocket library zeroes this much on
    /// every read attempt, so it is kept small; larger frames take a few reads
    /// [VIGIL_EDGE_WS_READ_BUFFER_BYTES].
    pub ws_read_buffer_bytes: usize,
    /// Most bytes buffered for writing to one client before the session waits for it
    /// [VIGIL_EDGE_WS_MAX_WRITE_BUFFER_BYTES].
    pub ws_max_write_buffer_bytes: usize,
    /// The candidate page's files (`npm run build` in `web/`), served at `/` on the WebSocket
    /// listener; read once at start. A folder that is not there serves no page
    /// [VIGIL_WEB_DIR].
    pub web_dir: PathBuf,
    /// PEM certificate chain for `wss://` on the WebSocket listener; with `tls_key`, the edge
    /// speaks TLS only. Reloaded when the file changes [VIGIL_EDGE_TLS_CERT].
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert` [VIGIL_EDGE_TLS_KEY].
    pub tls_key: Option<PathBuf>,
    /// Address of the admin HTTP API (`/v1/admin/...`); off when unset [VIGIL_ADMIN_LISTEN].
    pub admin_listen: Option<SocketAddr>,
    /// The broker as the admin role, for what the admin API publishes (control, operators'
    /// notes, enrolments); the edge's own link when unset. Needed with separate broker roles,
    /// where an edge's own user may publish none of these [VIGIL_ADMIN_AMQP_URL].
    pub admin_amqp_url: Option<String>,
    /// Bearer token the admin API requires; without one the API stays off
    /// [VIGIL_ADMIN_TOKEN].
    pub admin_token: Option<String>,
    /// Operators' own admin tokens (`vigil operators add NAME`), reloaded when the file
    /// changes; every admin operation is audited with the operator's name
    /// [VIGIL_ADMIN_TOKENS_FILE].
    pub admin_tokens_file: Option<PathBuf>,
    /// PEM certificate chain for HTTPS on the admin API; with `admin_tls_key` the admin API
    /// speaks HTTPS only. When unset, the edge's `tls_cert`/`tls_key` serve the admin API too.
    /// Reloaded when the file changes [VIGIL_ADMIN_TLS_CERT].
    pub admin_tls_cert: Option<PathBuf>,
    /// PEM private key of `admin_tls_cert` [VIGIL_ADMIN_TLS_KEY].
    pub admin_tls_key: Option<PathBuf>,
    /// Work-queue backlog (ready frames) above which the system is full [VIGIL_MAX_BACKLOG].
    pub max_backlog: u32,
    /// Mean frame-to-result latency above which the system is full, in ms
    /// [VIGIL_MAX_LATENCY_MS].
    pub max_latency_ms: u64,
    /// How often the edge checks the backlog, in ms [VIGIL_ADMISSION_POLL_MS].
    pub admission_poll_ms: u64,
    /// The frame rate live clients are asked to keep while the system is full
    /// [VIGIL_THROTTLE_FPS].
    pub throttle_fps: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// This worker's id, used as the source of its results. Random when unset
    /// [VIGIL_WORKER_ID].
    pub id: Option<String>,
    /// Analyzer to run: `identity` (the model stack), `frame-info` (JPEG markers only), or
    /// `delay` for benchmarks [VIGIL_ANALYZER].
    pub analyzer: String,
    /// Service time the `delay` analyzer spends per frame, in ms [VIGIL_DELAY_MS].
    pub delay_ms: u64,
    /// Unacked frames the broker may hand this worker at once [VIGIL_WORKER_PREFETCH].
    pub prefetch: u16,
    /// Threads for CPU-bound analysis (decode, models); 0 means one per core
    /// [VIGIL_WORKER_ANALYSIS_THREADS].
    pub analysis_threads: usize,
    /// Time to finish and ack in-flight frames on shutdown, in ms
    /// [VIGIL_WORKER_SHUTDOWN_GRACE_MS].
    pub shutdown_grace_ms: u64,
    /// Most frames an analysis thread takes at once (and at most `prefetch`), when frames wait
    /// for it: the recogniser and fr_liveness then run once on all their faces, and each model
    /// on the batch's frames in a row. A worker that keeps up takes one frame at a time; 1 never
    /// batches (README, "Cost per candidate") [VIGIL_WORKER_BATCH_MAX].
    pub batch_max: usize,
    /// How long a batch waits for more frames after its first, in ms
    /// [VIGIL_WORKER_BATCH_WAIT_MS].
    pub batch_wait_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            namespace: "vigil".into(),
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            broker_connect_timeout_ms: 30_000,
            broker_roles: crate::roles::RoleMode::Shared,
            broker_management_url: None,
            broker_management_ca_file: None,
            metrics_listen: "127.0.0.1:9090".parse().expect("valid address"),
            http_max_connections: 256,
            http_max_connections_per_address: 64,
            http_header_timeout_ms: 10_000,
            http_idle_timeout_ms: 60_000,
            topology_file: None,
            clients_dir: PathBuf::from("clients"),
            directory_url: None,
            directory_pool: 8,
            directory_timeout_ms: 5_000,
            log_format: LogFormat::Text,
            edge: EdgeConfig::default(),
            worker: WorkerConfig::default(),
            inference: InferenceConfig::default(),
            policy: crate::policy::PolicyConfig::default(),
            liveness: crate::liveness::LivenessConfig::default(),
            challenge: crate::challenge::ChallengeConfig::default(),
            evidence_dir: PathBuf::from("evidence"),
            audit_key: None,
            audit_public_key: None,
            audit_checkpoint_scan_ms: 30_000,
            audit_evidence_mb_per_client_day: 512,
            audit_retention_days: 0,
            webhooks: crate::webhooks::WebhookConfig::default(),
            audit_api: AuditApiConfig::default(),
            sessions: crate::session_tokens::SessionConfig::default(),
            capture_stream: false,
        }
    }
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".parse().expect("valid address"),
            id: None,
            max_frame_bytes: 512 * 1024,
            max_frame_pixels: 16 * 1024 * 1024,
            max_frame_side: 4096,
            write_timeout_ms: 2_000,
            max_fps: 30,
            flood_factor: 4,
            max_sessions: 10_000,
            max_unauthenticated: 1_024,
            max_unauthenticated_per_source: 64,
            failed_hellos_per_minute: 30,
            failed_hellos_per_id: 5,
            max_hello_bytes: 16_384,
            audit_views: 2,
            audit_view_wait_ms: 30_000,
            id_lockout_base_ms: 1_000,
            id_lockout_max_ms: 900_000,
            max_inflight: 2,
            hello_timeout_ms: 5_000,
            ping_interval_ms: 15_000,
            idle_timeout_ms: 60_000,
            lease_ms: 15_000,
            frame_deadline_ms: 3_000,
            max_bad_messages: 10,
            client_scores: false,
            phone_every: 3,
            recheck_ms: 1_000,
            track_margin: 0.05,
            recheck_chance: 0.15,
            trusted_proxies: crate::edge::proxy::TrustedProxies::default(),
            shutdown_grace_ms: 2_000,
            max_pending_audits: 1024,
            audit_retry_ms: 60_000,
            audit_drain_ms: 5_000,
            ws_read_buffer_bytes: 16 * 1024,
            ws_max_write_buffer_bytes: 4 * 1024 * 1024,
            tls_cert: None,
            web_dir: PathBuf::from("web/dist"),
            tls_key: None,
            admin_listen: None,
            admin_amqp_url: None,
            admin_token: None,
            admin_tokens_file: None,
            admin_tls_cert: None,
            admin_tls_key: None,
            max_backlog: 1000,
            max_latency_ms: 2000,
            admission_poll_ms: 500,
            throttle_fps: 5,
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            id: None,
            analyzer: "identity".into(),
            delay_ms: 20,
            prefetch: 16,
            analysis_threads: 0,
            shutdown_grace_ms: 5_000,
            batch_max: 8,
            batch_wait_ms: 3,
        }
    }
}

/// Analyzers a worker can run.
pub const ANALYZERS: &[&str] = &["identity", "frame-info", "delay"];

impl Config {
    /// Read the file (if any), apply environment overrides from `env`, and validate. Every
    /// problem found is returned.
    pub fn load(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, Vec<String>> {
        Self::load_for(None, path, env)
    }

    /// [`Config::load`], validating only what `role` reads (everything for `None`).
    pub fn load_for(
        role: Option<Role>,
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, Vec<String>> {
        let mut cfg = match path {
            None => Config::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| vec![format!("cannot read config {}: {e}", path.display())])?;
                toml::from_str(&text)
                    .map_err(|e| vec![format!("config {}: {e}", path.display())])?
            }
        };
        let mut errors = Vec::new();
        cfg.apply_env(&env, &mut errors);
        if let Err(more) = cfg.validate_for(role) {
            errors.extend(more);
        }
        if errors.is_empty() {
            Ok(cfg)
        } else {
            Err(errors)
        }
    }

    /// Load from the process environment.
    pub fn from_env(path: Option<&Path>) -> Result<Self, Vec<String>> {
        Self::load(path, |k| std::env::var(k).ok())
    }

    /// Load from the process environment for the service `role`.
    pub fn from_env_for(role: Role, path: Option<&Path>) -> Result<Self, Vec<String>> {
        Self::load_for(Some(role), path, |k| std::env::var(k).ok())
    }

    fn apply_env(&mut self, env: &impl Fn(&str) -> Option<String>, errors: &mut Vec<String>) {
        for var in vars::VARS {
            if let Some(raw) = env(var.name)
                && let Err(e) = var.apply(self, &raw)
            {
                errors.push(format!("{}={raw:?}: {e}", var.name));
            }
        }
    }

    /// Every problem with every setting, at once (what the `vigil` CLI checks).
    pub fn validate(&self) -> Result<(), Vec<String>> {
        self.validate_for(None)
    }

    /// Every problem with the settings `role` reads (every setting for `None`), at once: a
    /// worker does not refuse to start over the edge's admin token.
    pub fn validate_for(&self, role: Option<Role>) -> Result<(), Vec<String>> {
        let reads = |r: Role| role.is_none_or(|x| x == r);
        let mut errors = Vec::new();
        if let Err(e) = check_identifier("namespace", &self.namespace) {
            errors.push(e);
        }
        let urls = crate::broker::broker_urls(&self.amqp_url);
        if urls.is_empty() {
            errors.push("amqp_url is empty".into());
        }
        for url in urls {
            if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
                errors.push(format!(
                    "amqp_url `{}` must start with amqp:// or amqps:// (several nodes: \
                     separate their URLs with commas)",
                    crate::broker::redact_url(url)
                ));
            }
        }
        if let Err(e) = self.management() {
            errors.push(e.to_string());
        }
        if !(1..=65_536).contains(&self.http_max_connections) {
            errors.push(format!(
                "http_max_connections = {} must be within 1..=65536",
                self.http_max_connections
            ));
        }
        if !(1..=self.http_max_connections.max(1)).contains(&self.http_max_connections_per_address)
        {
            errors.push(format!(
                "http_max_connections_per_address = {} must be within 1..=http_max_connections ({})",
                self.http_max_connections_per_address, self.http_max_connections
            ));
        }
        if !(100..=600_000).contains(&self.http_header_timeout_ms) {
            errors.push(format!(
                "http_header_timeout_ms = {} must be within 100..=600000",
                self.http_header_timeout_ms
            ));
        }
        if !(100..=3_600_000).contains(&self.http_idle_timeout_ms) {
            errors.push(format!(
                "http_idle_timeout_ms = {} must be within 100..=3600000",
                self.http_idle_timeout_ms
            ));
        }
        for url in crate::broker::broker_urls(&self.amqp_url) {
            if let Err(e) = crate::broker::tls_ca(url) {
                errors.push(format!("amqp_url: {e}"));
            }
        }
        if reads(Role::Edge) {
            if let Err(e) =
                crate::directory::Location::of(self.directory_url.as_deref(), &self.clients_dir)
            {
                errors.push(format!("directory_url: {e}"));
            }
            if self.directory_pool == 0 || self.directory_timeout_ms == 0 {
                errors.push("directory_pool and directory_timeout_ms must be positive".into());
            }
            if self.edge.lease_ms < 3_000 {
                errors.push(format!(
                    "edge.lease_ms = {} is too short: an edge renews its lease every third of it",
                    self.edge.lease_ms
                ));
            }
            let e = &self.edge;
            if e.tls_cert.is_some() != e.tls_key.is_some() {
                errors
                    .push("edge.tls_cert and edge.tls_key go together: set both or neither".into());
            }
            if e.admin_tls_cert.is_some() != e.admin_tls_key.is_some() {
                errors.push(
                    "edge.admin_tls_cert and edge.admin_tls_key go together: set both or neither"
                        .into(),
                );
            }
            if let Some(id) = &e.id
                && let Err(msg) = check_identifier("edge.id", id)
            {
                errors.push(msg);
            }
            if self.broker_roles == crate::roles::RoleMode::Separate {
                // Each edge is a broker user of its own: its id is the one it was made for.
                let user = self.amqp_user();
                match (
                    crate::roles::edge_of_user(&self.namespace, &user),
                    e.id.as_deref(),
                ) {
                    (None, _) => errors.push(format!(
                        "with separate broker roles an edge connects as its own user \
                         `{ns}-edge-<edge id>` (`vigil broker provision --edge ID`), not `{user}`",
                        ns = self.namespace
                    )),
                    (Some(own), Some(id)) if own != id => errors.push(format!(
                        "edge.id `{id}` is not the edge of the broker user `{user}` (`{own}`)"
                    )),
                    _ => {}
                }
                if e.admin_listen.is_some() && e.admin_amqp_url.is_none() {
                    errors.push(
                        "with separate broker roles the admin API publishes as the operator role: \
                         set VIGIL_ADMIN_AMQP_URL to the operator user's URL"
                            .into(),
                    );
                }
            }
            if let Some(url) = &e.admin_amqp_url {
                let operator = crate::roles::user_of(&self.namespace, crate::roles::Role::Operator);
                let user = crate::broker::url_parts(url)
                    .map(|p| p.user)
                    .unwrap_or_default();
                if self.broker_roles != crate::roles::RoleMode::Separate {
                    errors.push(
                        "admin_amqp_url is for separate broker roles: with shared roles the \
                         admin API publishes over the edge's own link"
                            .into(),
                    );
                } else if user != operator {
                    errors.push(format!(
                        "admin_amqp_url connects as `{user}`, not the operator role's user \
                         `{operator}` (what the admin API publishes, and no more)"
                    ));
                }
                for u in crate::broker::broker_urls(url) {
                    if !(u.starts_with("amqp://") || u.starts_with("amqps://")) {
                        errors.push(format!(
                            "admin_amqp_url `{}` must start with amqp:// or amqps://",
                            crate::broker::redact_url(u)
                        ));
                    }
                }
            }
            // A client named `operators` would be the tokens file in the folder directory.
            if self.directory_url.is_none()
                && let Some(tokens) = &e.admin_tokens_file
                && lies_within(tokens, &self.clients_dir)
            {
                errors.push(format!(
                    "admin_tokens_file {} is inside the clients folder {}: keep it outside, \
                     where no client's file can take its name",
                    tokens.display(),
                    self.clients_dir.display()
                ));
            }
            if e.id_lockout_max_ms > 86_400_000 || e.id_lockout_base_ms > e.id_lockout_max_ms {
                errors.push(format!(
                    "edge.id_lockout_base_ms = {} and edge.id_lockout_max_ms = {}: the base must \
                     be at most the maximum, and the maximum at most a day (86400000)",
                    e.id_lockout_base_ms, e.id_lockout_max_ms
                ));
            }
            let positive = [
                ("edge.max_frame_bytes", e.max_frame_bytes as u64),
                ("edge.max_frame_pixels", e.max_frame_pixels),
                ("edge.max_frame_side", e.max_frame_side as u64),
                ("edge.write_timeout_ms", e.write_timeout_ms),
                ("edge.ping_interval_ms", e.ping_interval_ms),
                ("edge.idle_timeout_ms", e.idle_timeout_ms),
                ("edge.max_pending_audits", e.max_pending_audits as u64),
                ("edge.audit_retry_ms", e.audit_retry_ms),
                ("edge.max_unauthenticated", e.max_unauthenticated as u64),
                (
                    "edge.max_unauthenticated_per_source",
                    e.max_unauthenticated_per_source as u64,
                ),
                (
                    "edge.failed_hellos_per_minute",
                    e.failed_hellos_per_minute as u64,
                ),
                ("edge.failed_hellos_per_id", e.failed_hellos_per_id.into()),
                ("edge.max_hello_bytes", e.max_hello_bytes as u64),
                ("edge.audit_views", e.audit_views as u64),
                ("edge.audit_view_wait_ms", e.audit_view_wait_ms),
                ("edge.id_lockout_base_ms", e.id_lockout_base_ms),
                ("edge.id_lockout_max_ms", e.id_lockout_max_ms),
                ("edge.max_fps", e.max_fps.into()),
                ("edge.flood_factor", e.flood_factor.into()),
                ("edge.max_sessions", e.max_sessions as u64),
                ("edge.max_inflight", e.max_inflight as u64),
                ("edge.hello_timeout_ms", e.hello_timeout_ms),
                ("edge.frame_deadline_ms", e.frame_deadline_ms),
                ("edge.max_bad_messages", e.max_bad_messages.into()),
                ("edge.ws_read_buffer_bytes", e.ws_read_buffer_bytes as u64),
                ("edge.admission_poll_ms", e.admission_poll_ms),
                ("edge.throttle_fps", e.throttle_fps.into()),
            ];
            for (key, value) in positive {
                if value == 0 {
                    errors.push(format!("{key} must be greater than 0"));
                }
            }
            if e.max_frame_bytes > 16 * 1024 * 1024 {
                errors.push(format!(
                    "edge.max_frame_bytes = {} is above the 16 MiB ceiling",
                    e.max_frame_bytes
                ));
            }
            if let Some(token) = &e.admin_token
                && token.len() < 16
            {
                errors.push("edge.admin_token must be at least 16 characters".into());
            }
            if e.ws_max_write_buffer_bytes < 64 * 1024 {
                errors.push(format!(
                    "edge.ws_max_write_buffer_bytes = {} is below 64 KiB",
                    e.ws_max_write_buffer_bytes
                ));
            }
            if e.max_inflight > 64 {
                errors.push(format!(
                    "edge.max_inflight = {} is above 64",
                    e.max_inflight
                ));
            }
            // At 5 fps, a phone that comes into view waits at most `phone_every + 1` frames for
            // a check, then every frame is one: under the default phone rule, signed out within
            // 2 s up to 4 while results come back within a frame, and at 3 (the default) within
            // two frames (`cadence::tests::a_phone_in_view_signs_out_within_two_seconds`).
            // A stranger who takes the camera over on the track is fully analysed within
            // `recheck_ms`, and the wrong-person rule then locks within its frames.
            if e.recheck_ms != 0 && !(200..=1_000).contains(&e.recheck_ms) {
                errors.push(format!(
                    "edge.recheck_ms = {} must be 0 (off) or within 200..=1000",
                    e.recheck_ms
                ));
            }
            if !(0.05..=1.0).contains(&e.recheck_chance) {
                errors.push(format!(
                    "edge.recheck_chance = {} must be within 0.05..=1",
                    e.recheck_chance
                ));
            }
            if !(0.0..=0.5).contains(&e.track_margin) {
                errors.push(format!(
                    "edge.track_margin = {} must be within 0..=0.5",
                    e.track_margin
                ));
            }
            if !(1..=4).contains(&e.phone_every) {
                errors.push(format!(
                    "edge.phone_every = {} must be within 1..=4",
                    e.phone_every
                ));
            }
            errors.extend(self.policy.validate());
            errors.extend(self.liveness.validate());
            errors.extend(self.challenge.validate());
            errors.extend(self.sessions.validate());
            // A waiting challenge follows the client only as long as its saved state does.
            if self.policy.carry_over_ms < self.challenge.deadline_ms {
                errors.push(format!(
                    "policy.carry_over_ms = {} must be at least challenge.deadline_ms = {}: a reconnect would escape the challenge",
                    self.policy.carry_over_ms, self.challenge.deadline_ms
                ));
            }
        }
        errors.extend(
            self.audit_api
                .validate(reads(Role::Audit), reads(Role::Edge)),
        );
        if reads(Role::Audit) {
            errors.extend(self.webhooks.validate());
            if self.audit_checkpoint_scan_ms < 1_000 {
                errors.push(format!(
                    "audit_checkpoint_scan_ms = {} must be at least 1000: a shorter read ends \
                     before the stream does",
                    self.audit_checkpoint_scan_ms
                ));
            }
        }
        if reads(Role::Audit)
            && let Some(key) = &self.audit_key
            && lies_within(key, &self.evidence_dir)
        {
            errors.push(format!(
                "audit_key {} is inside the evidence folder {}: keep the signing key where \
                 whoever can write the evidence cannot read it",
                key.display(),
                self.evidence_dir.display()
            ));
        }
        if reads(Role::Worker) {
            let w = &self.worker;
            if let Some(id) = &w.id
                && let Err(msg) = check_identifier("worker.id", id)
            {
                errors.push(msg);
            }
            if !ANALYZERS.contains(&w.analyzer.as_str()) {
                errors.push(format!(
                    "worker.analyzer `{}` is unknown; choose one of: {}",
                    w.analyzer,
                    ANALYZERS.join(", ")
                ));
            }
            if w.prefetch == 0 {
                errors.push("worker.prefetch must be greater than 0".into());
            }
            if !(1..=64).contains(&w.batch_max) {
                errors.push(format!(
                    "worker.batch_max = {} must be within 1..=64",
                    w.batch_max
                ));
            }
            if w.batch_wait_ms > 50 {
                errors.push(format!(
                    "worker.batch_wait_ms = {} must be within 0..=50",
                    w.batch_wait_ms
                ));
            }
            let i = &self.inference;
            if i.intra_threads == 0 {
                errors.push("inference.intra_threads must be greater than 0".into());
            }
            if !(64 * 64..=100_000_000).contains(&i.max_pixels) {
                errors.push(format!(
                    "inference.max_pixels = {} must be within 4096..=100000000",
                    i.max_pixels
                ));
            }
            if !(1..=1000).contains(&i.max_jpeg_scans) {
                errors.push(format!(
                    "inference.max_jpeg_scans = {} must be within 1..=1000",
                    i.max_jpeg_scans
                ));
            }
            if !(64..=4096).contains(&i.max_side) {
                errors.push(format!(
                    "inference.max_side = {} must be within 64..=4096",
                    i.max_side
                ));
            }
            let t = &i.thresholds;
            for (key, v) in [
                ("thresholds.face_score", t.face_score),
                ("thresholds.face_nms_iou", t.face_nms_iou),
                ("thresholds.live_min", t.live_min),
                ("thresholds.phone_score", t.phone_score),
                ("thresholds.phone_nms_iou", t.phone_nms_iou),
                ("thresholds.track_iou_min", t.track_iou_min),
                ("thresholds.track_shift_max", t.track_shift_max),
            ] {
                if !(0.0..=1.0).contains(&v) {
                    errors.push(format!("inference.{key} = {v} must be within 0..=1"));
                }
            }
            if !(t.brightness_min < t.brightness_max && t.pitch_min < t.pitch_max) {
                errors.push(
                    "inference.thresholds: brightness_min and pitch_min must be below their maxima"
                        .into(),
                );
            }
            for (key, v) in [
                ("face_min_px", t.face_min_px),
                ("sharpness_min", t.sharpness_min),
                ("yaw_max", t.yaw_max),
            ] {
                if !(v.is_finite() && v >= 0.0) {
                    errors.push(format!(
                        "inference.thresholds.{key} = {v} must be 0 or more"
                    ));
                }
            }
            if !(-1.0..=1.0).contains(&i.thresholds.match_cosine) {
                errors.push(format!(
                    "inference.thresholds.match_cosine = {} must be within -1..=1",
                    i.thresholds.match_cosine
                ));
            }
        }
        if let Some(path) = &self.topology_file
            && let Err(e) = crate::topology::Topology::load(Some(path))
        {
            errors.push(e.to_string());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// The edge id, or one made once per process: the host's name plus a random suffix, so
    /// that edges on one host, or replicas sharing a name, never collide.
    ///
    /// With separate broker roles, the id is the one the edge's broker user was made for
    /// (`<namespace>-edge-<id>`) when none is set.
    pub fn edge_id(&self) -> String {
        if let Some(id) = &self.edge.id {
            return id.clone();
        }
        if self.broker_roles == crate::roles::RoleMode::Separate {
            let user = self.amqp_user();
            if let Some(id) = crate::roles::edge_of_user(&self.namespace, &user) {
                return id.to_owned();
            }
        }
        random_id(&host_name())
    }

    /// The broker user of the (first) broker URL.
    pub fn amqp_user(&self) -> String {
        crate::broker::url_parts(&self.amqp_url)
            .map(|p| p.user)
            .unwrap_or_default()
    }

    /// The topology (`VIGIL_TOPOLOGY`, else the built-in one), its tunables carried by policies
    /// when a management URL is set.
    pub fn topology(&self) -> Result<crate::topology::Topology, crate::topology::TopologyError> {
        let tunables = if self.broker_management_url.is_some() {
            crate::topology::Tunables::Policies
        } else {
            crate::topology::Tunables::Arguments
        };
        Ok(crate::topology::Topology::load(self.topology_file.as_deref())?.with_tunables(tunables))
    }

    /// Every exchange, queue and routing key of this namespace.
    pub fn names(&self) -> crate::topology::Names {
        crate::topology::Names::new(self.namespace.as_str())
    }

    /// The management API client for the broker's virtual host, when a URL is set.
    pub fn management(
        &self,
    ) -> Result<Option<crate::management::Management>, crate::management::ManagementError> {
        let Some(url) = &self.broker_management_url else {
            return Ok(None);
        };
        let vhost =
            crate::broker::url_parts(&self.amqp_url).map_or_else(|_| "/".to_owned(), |p| p.vhost);
        crate::management::Management::with_ca_file(
            url,
            &vhost,
            self.broker_management_ca_file.as_deref(),
        )
        .map(Some)
    }

    /// Put the policies `topo` needs: when its tunables are policies and this process's role
    /// may configure the broker (shared roles; with separate roles `vigil topology apply`, run
    /// as the admin role, puts them). Nothing otherwise.
    pub async fn put_policies(
        &self,
        topo: &crate::topology::Topology,
    ) -> Result<(), crate::management::ManagementError> {
        if topo.tunables != crate::topology::Tunables::Policies
            || self.broker_roles != crate::roles::RoleMode::Shared
        {
            return Ok(());
        }
        match self.management()? {
            Some(management) => management.put_policies(&topo.policies()).await,
            None => Ok(()),
        }
    }

    /// Where the client directory lives (checked by `validate`).
    pub fn directory_location(
        &self,
    ) -> Result<crate::directory::Location, crate::directory::DirectoryError> {
        crate::directory::Location::of(self.directory_url.as_deref(), &self.clients_dir)
    }

    /// Open the client directory (a PostgreSQL one is migrated first).
    pub fn open_directory(
        &self,
    ) -> Result<std::sync::Arc<dyn crate::directory::ClientStore>, crate::directory::DirectoryError>
    {
        crate::directory::open(&self.directory_location()?, &self.directory_limits())
    }

    /// The bounds a PostgreSQL directory runs under.
    pub fn directory_limits(&self) -> crate::directory::PgLimits {
        let bound = std::time::Duration::from_millis(self.directory_timeout_ms);
        crate::directory::PgLimits {
            pool: self.directory_pool,
            connect_timeout: bound,
            statement_timeout: bound,
        }
    }

    pub fn worker_id(&self) -> String {
        self.worker
            .id
            .clone()
            .unwrap_or_else(|| random_id("worker"))
    }
}

impl WorkerConfig {
    /// Analysis threads, with 0 meaning one per core.
    /// `batch_max`, but never more than the `prefetch` frames the broker hands over.
    pub fn effective_batch_max(&self) -> usize {
        self.batch_max.min(usize::from(self.prefetch)).max(1)
    }

    pub fn effective_analysis_threads(&self) -> usize {
        match self.analysis_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("unknown log format `{other}` (text or json)")),
        }
    }
}

/// This host's name, reduced to `[A-Za-z0-9-]` (it goes into routing keys, where `.` separates
/// words) and at most 48 characters; `edge` when it has none.
fn host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let name: String = raw
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(48)
        .collect();
    let name = name.trim_matches('-');
    if name.is_empty() {
        "edge".into()
    } else {
        name.to_owned()
    }
}

/// `<prefix>-<8 hex digits>`.
pub fn random_id(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}

/// Whether `path` lies within the folder `dir`, both made absolute with `.` and `..` resolved
/// by name (the files need not exist yet; symbolic links are not followed).
fn lies_within(path: &std::path::Path, dir: &std::path::Path) -> bool {
    let absolute = |p: &std::path::Path| {
        let mut out = PathBuf::new();
        for part in std::path::absolute(p).unwrap_or(p.to_owned()).components() {
            match part {
                std::path::Component::ParentDir => {
                    out.pop();
                }
                std::path::Component::CurDir => {}
                other => out.push(other),
            }
        }
        out
    };
    absolute(path).starts_with(absolute(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(file: Option<&str>, env: &[(&str, &str)]) -> Result<Config, Vec<String>> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let dir = std::env::temp_dir().join(format!("vigil-cfg-{}", rand::random::<u64>()));
        let path = file.map(|text| {
            std::fs::create_dir_all(&dir).unwrap();
            let p = dir.join("vigil.toml");
            std::fs::write(&p, text).unwrap();
            p
        });
        Config::load(path.as_deref(), |k| env.get(k).cloned())
    }

    /// An environment of these variables only.
    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| vars.get(k).cloned()
    }

    #[test]
    fn defaults_are_valid() {
        let cfg = load(None, &[]).unwrap();
        assert_eq!(cfg.namespace, "vigil");
        assert_eq!(cfg.edge.max_inflight, 2);
    }

    #[test]
    fn env_overrides_file() {
        let cfg = load(
            Some("namespace = \"fromfile\"\n[edge]\nmax_fps = 7\n"),
            &[("VIGIL_NAMESPACE", "fromenv"), ("VIGIL_EDGE_ID", "e1")],
        )
        .unwrap();
        assert_eq!(cfg.namespace, "fromenv");
        assert_eq!(cfg.edge.max_fps, 7);
        assert_eq!(cfg.edge.id.as_deref(), Some("e1"));
    }

    /// Every variable in the table is read (set to "7", it changes the configuration or is
    /// refused), and every variable a field's doc names is in the table.
    #[test]
    fn every_variable_in_the_table_is_read_and_every_documented_one_is_listed() {
        let default = format!("{:?}", load(None, &[]).unwrap());
        assert!(vars::VARS.len() > 70);
        for var in vars::VARS {
            assert!(!var.roles.is_empty(), "{} is read by no service", var.name);
            // The defaults are valid, so a refusal can only come from the variable.
            if let Ok(cfg) = load(None, &[(var.name, "7")]) {
                assert_ne!(
                    format!("{cfg:?}"),
                    default,
                    "{} is listed but not read",
                    var.name
                );
            }
        }
        let source = [
            include_str!("mod.rs"),
            include_str!("../../crates/vigil-inference/src/config.rs"),
        ]
        .concat();
        let documented = source
            .split('[')
            .skip(1)
            .filter_map(|s| s.split(']').next())
            .filter(|s| {
                s.starts_with("VIGIL_")
                    && s.bytes()
                        .all(|b| b == b'_' || b.is_ascii_uppercase() || b.is_ascii_digit())
            });
        for name in documented {
            assert!(
                vars::VARS.iter().any(|v| v.name == name),
                "{name} is documented on a field but not in config::vars::VARS"
            );
        }
    }

    /// The README's table of variables is the one the code makes (`vigil config vars`).
    #[test]
    fn the_readme_table_is_generated_from_the_code() {
        let readme = include_str!("../../README.md");
        let table = vars::markdown();
        assert!(
            readme.contains(&table),
            "README.md's table of variables differs from `vigil config vars`; paste its output \
             in place of the table:\n{table}"
        );
    }

    /// The audit writer's read API: a token of visible characters long enough on both sides,
    /// a URL without credentials, and TLS settings that go together.
    #[test]
    fn the_audit_read_api_needs_a_strong_token_and_a_clean_url() {
        let token = "0123456789abcdef0123456789abcdef";
        let serving = [
            ("VIGIL_AUDIT_API_LISTEN", "127.0.0.1:8082"),
            ("VIGIL_AUDIT_API_TOKEN", token),
        ];
        assert!(Config::load_for(Some(Role::Audit), None, env(&serving)).is_ok());
        // An edge does not serve it, so its listen setting is not the edge's to check.
        let listen_only = [("VIGIL_AUDIT_API_LISTEN", "127.0.0.1:8082")];
        assert!(Config::load_for(Some(Role::Edge), None, env(&listen_only)).is_ok());
        let url = ("VIGIL_AUDIT_API_URL", "https://audit:8082");
        let with_token = ("VIGIL_AUDIT_API_TOKEN", token);
        let refused: &[(&[(&str, &str)], &str)] = &[
            (&listen_only, "audit_api.token is unset"),
            (&[url], "audit_api.token is unset"),
            (&[url, ("VIGIL_AUDIT_API_TOKEN", "short")], "at least 32"),
            (
                &[
                    url,
                    ("VIGIL_AUDIT_API_TOKEN", "0123456789abcdef 0123456789abcdef"),
                ],
                "visible ASCII",
            ),
            (
                &[
                    ("VIGIL_AUDIT_API_URL", "https://u:p@audit:8082"),
                    with_token,
                ],
                "credentials",
            ),
            (
                &[("VIGIL_AUDIT_API_URL", "ftp://audit"), with_token],
                "http:// or https://",
            ),
            (
                &[
                    ("VIGIL_AUDIT_API_URL", "http://audit:8082"),
                    ("VIGIL_AUDIT_API_CA_FILE", "/ca.pem"),
                    with_token,
                ],
                "use https://",
            ),
            (
                &[
                    ("VIGIL_AUDIT_API_LISTEN", "0.0.0.0:8082"),
                    ("VIGIL_AUDIT_API_TLS_CERT", "/cert.pem"),
                    with_token,
                ],
                "go together",
            ),
            (
                &[url, with_token, ("VIGIL_AUDIT_API_MAX_BYTES", "10")],
                "max_bytes",
            ),
        ];
        for (vars, says) in refused {
            let error = Config::load_for(None, None, env(vars))
                .expect_err("refused")
                .join("; ");
            assert!(error.contains(says), "{vars:?}: {error}");
        }
    }

    /// A service validates the settings it reads, and only those.
    #[test]
    fn each_service_validates_only_its_own_settings() {
        let short_token = [("VIGIL_ADMIN_TOKEN", "short")];
        let for_role = |role| Config::load_for(role, None, env(&short_token));
        assert!(for_role(Some(Role::Worker)).is_ok());
        assert!(for_role(Some(Role::Audit)).is_ok());
        let errors = for_role(Some(Role::Edge)).unwrap_err().join("\n");
        assert!(errors.contains("admin_token"), "{errors}");
        assert!(for_role(None).is_err(), "the CLI checks everything");
        let bad_analyzer = [("VIGIL_ANALYZER", "nope")];
        assert!(Config::load_for(Some(Role::Edge), None, env(&bad_analyzer)).is_ok());
        assert!(Config::load_for(Some(Role::Worker), None, env(&bad_analyzer)).is_err());
        // Settings every service reads are checked by each.
        let bad_namespace = [("VIGIL_NAMESPACE", "no spaces")];
        for role in [Role::Edge, Role::Worker, Role::Audit] {
            assert!(Config::load_for(Some(role), None, env(&bad_namespace)).is_err());
        }
    }

    #[test]
    fn inference_settings_come_from_the_environment() {
        let cfg = load(
            Some("[inference]\nintra_threads = 2\n[inference.thresholds]\nlive_min = 0.2\n"),
            &[
                ("VIGIL_MODELS_DIR", "/opt/m"),
                ("VIGIL_ORT_DYLIB", "/opt/ort.so"),
                ("VIGIL_MATCH_COSINE", "0.5"),
                ("VIGIL_DEVICE", "cuda"),
            ],
        )
        .unwrap();
        let i = &cfg.inference;
        assert_eq!(i.models_dir, PathBuf::from("/opt/m"));
        assert_eq!(i.ort_dylib.as_deref(), Some(Path::new("/opt/ort.so")));
        assert_eq!(i.device, crate::domain::Device::Cuda);
        assert_eq!((i.intra_threads, i.thresholds.live_min), (2, 0.2));
        assert_eq!(i.thresholds.match_cosine, 0.5);
        let errors = load(None, &[("VIGIL_LIVE_MIN", "1.5"), ("VIGIL_DEVICE", "tpu")]).unwrap_err();
        let all = errors.join("\n");
        assert!(
            all.contains("live_min = 1.5") && all.contains("unknown device `tpu`"),
            "{all}"
        );
    }

    #[test]
    fn batches_are_bounded_by_the_prefetch_and_wait_briefly() {
        let cfg = load(
            None,
            &[
                ("VIGIL_WORKER_BATCH_MAX", "8"),
                ("VIGIL_WORKER_BATCH_WAIT_MS", "4"),
            ],
        )
        .unwrap();
        assert_eq!((cfg.worker.batch_max, cfg.worker.batch_wait_ms), (8, 4));
        // A batch cannot hold more than the broker hands over.
        let few = load(None, &[("VIGIL_WORKER_PREFETCH", "4")]).unwrap();
        assert_eq!(few.worker.effective_batch_max(), 4);
        assert_eq!(Config::default().worker.effective_batch_max(), 8);
        for (vars, error) in [
            (vec![("VIGIL_WORKER_BATCH_MAX", "0")], "batch_max = 0"),
            (vec![("VIGIL_WORKER_BATCH_MAX", "65")], "batch_max = 65"),
            (
                vec![("VIGIL_WORKER_BATCH_WAIT_MS", "51")],
                "batch_wait_ms = 51",
            ),
        ] {
            let all = load(None, &vars).unwrap_err().join("\n");
            assert!(all.contains(error), "{vars:?}: {all}");
        }
    }

    #[test]
    fn the_operators_tokens_file_is_kept_out_of_the_clients_folder() {
        let edge = |tokens: &str| {
            Config::load_for(
                Some(Role::Edge),
                None,
                env(&[
                    ("VIGIL_CLIENTS_DIR", "/srv/vigil/clients"),
                    ("VIGIL_ADMIN_TOKENS_FILE", tokens),
                ]),
            )
        };
        // Where a client named `operators` would write its record, or anywhere below.
        for inside in [
            "/srv/vigil/clients/operators.json",
            "/srv/vigil/clients/sub/tokens.json",
            "/srv/vigil/other/../clients/operators.json",
            "/srv/vigil/clients/./operators.json",
        ] {
            let errors = edge(inside).unwrap_err().join("\n");
            assert!(
                errors.contains("is inside the clients folder"),
                "{inside}: {errors}"
            );
        }
        assert!(edge("/srv/vigil/operators.json").is_ok());
        assert!(edge("/srv/vigil/clients/../operators.json").is_ok());
        // With PostgreSQL as the directory there is no folder to collide with.
        assert!(
            Config::load_for(
                Some(Role::Edge),
                None,
                env(&[
                    ("VIGIL_CLIENTS_DIR", "/srv/vigil/clients"),
                    (
                        "VIGIL_ADMIN_TOKENS_FILE",
                        "/srv/vigil/clients/operators.json"
                    ),
                    ("VIGIL_DIRECTORY_URL", "postgres://postgres@127.0.0.1/vigil"),
                ]),
            )
            .is_ok()
        );
    }

    #[test]
    fn separate_roles_tie_an_edge_to_its_broker_user() {
        let edge = |vars: &[(&str, &str)]| {
            let mut all = vec![("VIGIL_BROKER_ROLES", "separate")];
            all.extend_from_slice(vars);
            Config::load_for(Some(Role::Edge), None, env(&all))
        };
        let own = ("VIGIL_AMQP_URL", "amqp://vigil-edge-e7:pw@rabbit:5672/%2f");
        // The id comes from the user, or must be the user's.
        assert_eq!(edge(&[own]).unwrap().edge_id(), "e7");
        assert!(edge(&[own, ("VIGIL_EDGE_ID", "e7")]).is_ok());
        let wrong = edge(&[own, ("VIGIL_EDGE_ID", "e8")])
            .unwrap_err()
            .join("\n");
        assert!(wrong.contains("`e8` is not the edge"), "{wrong}");
        // A role user is no edge's, nor is the old shared edge user.
        for user in ["vigil-admin", "vigil-edge"] {
            let url = format!("amqp://{user}:pw@rabbit:5672/%2f");
            let errors = edge(&[("VIGIL_AMQP_URL", &url)]).unwrap_err().join("\n");
            assert!(errors.contains("connects as its own user"), "{errors}");
        }
        // The admin API needs the admin role's link.
        let admin = edge(&[own, ("VIGIL_ADMIN_LISTEN", "127.0.0.1:0")])
            .unwrap_err()
            .join("\n");
        assert!(admin.contains("VIGIL_ADMIN_AMQP_URL"), "{admin}");
        let dir = std::env::temp_dir().join(format!("vigil-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("admin-url");
        std::fs::write(&file, "amqp://vigil-operator:pw@rabbit:5672/%2f\n").unwrap();
        let cfg = edge(&[
            own,
            ("VIGIL_ADMIN_LISTEN", "127.0.0.1:0"),
            ("VIGIL_ADMIN_AMQP_URL_FILE", file.to_str().unwrap()),
        ])
        .unwrap();
        assert_eq!(
            cfg.edge.admin_amqp_url.as_deref(),
            Some("amqp://vigil-operator:pw@rabbit:5672/%2f"),
            "read from the file, its line end cut"
        );
        let not_admin = edge(&[
            own,
            (
                "VIGIL_ADMIN_AMQP_URL",
                "amqp://vigil-edge-e7:pw@rabbit:5672/%2f",
            ),
        ])
        .unwrap_err()
        .join("\n");
        assert!(
            not_admin.contains("not the operator role's user"),
            "{not_admin}"
        );
        let shared = Config::load_for(
            Some(Role::Edge),
            None,
            env(&[(
                "VIGIL_ADMIN_AMQP_URL",
                "amqp://vigil-admin:pw@rabbit:5672/%2f",
            )]),
        )
        .unwrap_err()
        .join("\n");
        assert!(shared.contains("for separate broker roles"), "{shared}");
        let missing = edge(&[("VIGIL_AMQP_URL_FILE", "/nonexistent/url")])
            .unwrap_err()
            .join("\n");
        assert!(missing.contains("/nonexistent/url"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_problem_is_listed() {
        let errors = load(
            None,
            &[
                ("VIGIL_NAMESPACE", "bad name"),
                ("VIGIL_EDGE_MAX_FPS", "fast"),
                ("VIGIL_EDGE_MAX_INFLIGHT", "0"),
                ("VIGIL_ANALYZER", "magic"),
                ("VIGIL_AMQP_URL", "http://x"),
            ],
        )
        .unwrap_err();
        let all = errors.join("\n");
        for want in [
            "namespace `bad name`",
            "VIGIL_EDGE_MAX_FPS=\"fast\"",
            "edge.max_inflight must be greater than 0",
            "worker.analyzer `magic` is unknown",
            "amqp_url",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
    }

    #[test]
    fn example_file_matches_the_defaults() {
        let text = include_str!("../../vigil.example.toml");
        let cfg = load(Some(text), &[]).unwrap();
        let d = Config::default();
        assert_eq!(format!("{:?}", cfg.edge), format!("{:?}", d.edge));
        assert_eq!(format!("{:?}", cfg.worker), format!("{:?}", d.worker));
        assert_eq!(format!("{:?}", cfg.inference), format!("{:?}", d.inference));
        assert_eq!(cfg.policy, d.policy);
        assert_eq!(cfg.liveness, d.liveness);
        assert_eq!(cfg.evidence_dir, d.evidence_dir);
        assert_eq!(cfg.namespace, d.namespace);
        assert_eq!(cfg.metrics_listen, d.metrics_listen);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let errors = load(Some("[edge]\nmax_fsp = 3\n"), &[]).unwrap_err();
        assert!(errors[0].contains("max_fsp"), "{errors:?}");
    }
}
