//! The edge node: holds client WebSocket connections, publishes their frames to the broker and
//! routes results back to the right socket. This module alone imports `tokio_tungstenite`
//! (server side here and in [`session`], client side in [`client`]).
//!
//! Flow: accept → WebSocket handshake on `/v1/stream` → hello (with timeout) → authenticate
//! against the client directory → session loop. A single reply consumer per edge reads the
//! edge's own reply queue and hands each result to its session through a bounded channel; a
//! session that cannot keep up loses its own results, never anybody else's.

mod admin_api;
mod admin_link;
pub mod client;
pub(crate) use vigil_core::enforcement;
mod gate;
mod lease;
pub mod proxy;
mod registry;
mod session;
use crate::telemetry::tls;
mod tokens;
mod trail;
mod web;
use vigil_core::window;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::broker::{Broker, BrokerError, Publisher, PublisherSlot};
use crate::config::{Config, EdgeConfig};
use crate::directory::{ClientStatus, ClientStore, DirectoryError};
use crate::metrics::{BrokerMetrics, EdgeMetrics};
use crate::roles::Kind;
use crate::telemetry::{self, Health};
use crate::topology::{self, NodeKind, Topology};
use crate::wire::client::{Encoding, ErrorCode};
use crate::wire::{ControlCommand, DropReason, Envelope, Payload};

/// The WebSocket path clients connect to.
pub const STREAM_PATH: &str = "/v1/stream";

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Topology(#[from] topology::TopologyError),
    #[error(transparent)]
    Management(#[from] crate::management::ManagementError),
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    #[error(transparent)]
    Operators(#[from] crate::operators::OperatorError),
    #[error("TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    SessionTokens(#[from] crate::session_tokens::SessionTokenError),
    #[error(transparent)]
    AuditKey(#[from] crate::audit::AuditError),
    #[error("the audit writer's read API (VIGIL_AUDIT_API_URL): {0}")]
    AuditApi(String),
    #[error("the edge's main task panicked: {0}")]
    Panicked(String),
}

/// A message for one session, from the reply consumer or from another session.
pub(crate) enum SessionEvent {
    Reply(Box<Envelope>),
    /// A command, and who issued it.
    Control(ControlCommand, String),
    /// Keep to this frame rate (the system is full, or no longer).
    Throttle {
        max_fps: u32,
    },
}

/// Where a live session can be reached, and what the admin API shows of it.
pub(crate) struct SessionEntry {
    pub session: u64,
    pub tx: mpsc::Sender<SessionEvent>,
    pub closer: session::Closer,
    pub info: Arc<Mutex<SessionInfo>>,
}

/// A live session as `GET /v1/admin/sessions` lists it.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct SessionInfo {
    pub client_id: String,
    pub session_id: String,
    pub edge: String,
    pub connected_since_ms: u64,
    /// Frames per second over the session's recent frames.
    pub fps: f64,
    pub frames: u64,
    pub paused: bool,
    pub last_verdict: Option<String>,
    pub last_action: Option<String>,
}

/// Enrolments asked through the admin API and waiting for a worker's answer, by request id:
/// the admin API takes a place ([`Enrolments::wait`]), the reply consumer fills it
/// ([`Enrolments::answer`]), and the place goes when its guard is dropped, however the request
/// ends.
#[derive(Default)]
pub(crate) struct Enrolments {
    waiting: Mutex<HashMap<uuid::Uuid, tokio::sync::oneshot::Sender<crate::wire::EnrollOutcome>>>,
}

/// A place among the [`Enrolments`], given back when dropped.
pub(crate) struct EnrolmentPlace {
    enrolments: Arc<Enrolments>,
    id: uuid::Uuid,
}

impl Enrolments {
    /// A place for request `id`'s answer.
    pub(crate) fn wait(
        self: &Arc<Self>,
        id: uuid::Uuid,
    ) -> (
        tokio::sync::oneshot::Receiver<crate::wire::EnrollOutcome>,
        EnrolmentPlace,
    ) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        let place = EnrolmentPlace {
            enrolments: self.clone(),
            id,
        };
        (rx, place)
    }

    /// Hand request `id` its answer, when it is still waiting.
    fn answer(&self, id: uuid::Uuid, outcome: crate::wire::EnrollOutcome) {
        let waiting = self
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        if let Some(tx) = waiting {
            let _ = tx.send(outcome);
        }
    }
}

impl Drop for EnrolmentPlace {
    fn drop(&mut self) {
        self.enrolments
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// State shared by every connection of one edge.
pub(crate) struct Shared {
    pub cfg: EdgeConfig,
    pub policy: crate::policy::PolicyConfig,
    pub liveness: crate::liveness::LivenessConfig,
    pub challenge: crate::challenge::ChallengeConfig,
    /// Places for connections that have not authenticated yet, and the failed-hello throttle.
    pub gate: gate::Gate,
    /// Failed hellos per client id.
    pub id_budget: gate::IdBudget,
    /// Session slots (`max_sessions`), taken once a client has authenticated.
    pub slots: Arc<Semaphore>,
    /// Token checks, on their own low-priority threads (argon2 is deliberately costly). A
    /// hello whose check cannot start before its hello deadline is refused.
    pub tokens: tokens::TokenChecker,
    /// Verifies short-lived session tokens by their signature, when a session key is
    /// configured.
    pub session_tokens: Option<crate::session_tokens::Verifier>,
    /// TLS for `wss://`, when configured.
    pub tls: Option<tls::Tls>,
    /// The candidate page, served at `/` on the same listener.
    pub web: web::WebAssets,
    /// Enrolment requests waiting for a worker's answer (the admin API's), by request id.
    pub enrolments: Arc<Enrolments>,
    pub edge_id: String,
    pub frames_exchange: String,
    pub actions_exchange: String,
    pub metrics: EdgeMetrics,
    pub store: Arc<dyn ClientStore>,
    pub publisher: PublisherSlot,
    /// What the admin API publishes with: the operator role's link (`VIGIL_ADMIN_AMQP_URL`), or
    /// the edge's own.
    pub admin_publisher: PublisherSlot,
    /// Live sessions by client id; a session's place is given back when it ends, panics
    /// included.
    pub sessions: Arc<registry::Registry<SessionEntry>>,
    /// Per-edge event sequence (the envelope's `seq`), shared with the admin API.
    pub seq: Arc<AtomicU64>,
    pub shutdown: CancellationToken,
    pub control_exchange: String,
    /// Set while the system is full: new sessions are refused, live ones throttled.
    pub full: AtomicBool,
    /// True while the broker blocks this edge's publishers (a resource alarm): frames are
    /// answered `broker_unavailable` at once instead of waiting.
    pub broker_blocked: AtomicBool,
    /// Recent mean frame-to-result latency, in microseconds (an exponential average).
    pub latency_ewma_us: AtomicU64,
    /// Actions on their way to the audit trail: tracked, so that shutdown waits for them.
    pub audits: tokio_util::task::TaskTracker,
}

impl Shared {
    /// The publisher of the current broker connection.
    pub(crate) fn publisher(&self) -> Arc<Publisher> {
        self.publisher.get()
    }

    /// Count a session refused, and why.
    pub(crate) fn refused(&self, reason: &str) {
        self.metrics
            .sessions_refused
            .with_label_values(&[reason])
            .inc();
    }

    /// Fold one frame-to-result latency into the running average.
    pub(crate) fn observe_latency(&self, latency: Duration) {
        let us = latency.as_micros() as u64;
        let old = self.latency_ewma_us.load(Ordering::Relaxed);
        let new = if old == 0 { us } else { (old * 15 + us) / 16 };
        self.latency_ewma_us.store(new, Ordering::Relaxed);
    }

    /// The frame rate sessions should keep now.
    pub(crate) fn current_max_fps(&self) -> u32 {
        if self.full.load(Ordering::Relaxed) {
            self.cfg.throttle_fps.min(self.cfg.max_fps)
        } else {
            self.cfg.max_fps
        }
    }

    pub(crate) fn drop_reason_counter(&self, reason: DropReason) -> prometheus::IntCounter {
        self.metrics
            .frames_dropped
            .with_label_values(&[reason.as_str()])
    }
}

/// A running edge.
pub struct EdgeHandle {
    pub id: String,
    /// The WebSocket address (useful with port 0).
    pub ws_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// The admin API's address, when it is on.
    pub admin_addr: Option<SocketAddr>,
    task: tokio::task::JoinHandle<Result<(), EdgeError>>,
}

impl EdgeHandle {
    pub fn url(&self) -> String {
        format!("ws://{}{STREAM_PATH}", self.ws_addr)
    }

    /// Wait until the edge has stopped.
    pub async fn join(self) -> Result<(), EdgeError> {
        crate::telemetry::join_service(self.task, EdgeError::Panicked).await
    }
}

/// Start an edge: metrics endpoint, broker, topology, reply queue, listener. Returns once it
/// accepts connections; it stops when `shutdown` is cancelled.
pub async fn start(
    cfg: Config,
    registry: Registry,
    shutdown: CancellationToken,
) -> Result<EdgeHandle, EdgeError> {
    let edge_id = cfg.edge_id();
    let health = Health::new(&["broker", "topology", "directory"]);
    let metrics_addr = telemetry::serve_metrics(
        cfg.metrics_listen,
        telemetry::HttpLimits::of(&cfg),
        registry.clone(),
        health.clone(),
        shutdown.clone(),
    )
    .await
    .map_err(|source| EdgeError::Bind {
        addr: cfg.metrics_listen,
        source,
    })?;
    let metrics = EdgeMetrics::new(&registry);
    for reason in DropReason::ALL {
        metrics.frames_dropped.with_label_values(&[reason.as_str()]);
    }
    let broker_metrics = BrokerMetrics::new(&registry);
    let topo = cfg.topology()?;
    let store = cfg.open_directory()?;
    tokio::spawn(lease::keep(
        store.clone(),
        edge_id.clone(),
        Duration::from_millis(cfg.edge.lease_ms),
        health.clone(),
        metrics.lease_failures.clone(),
        shutdown.clone(),
    ));

    let listener = TcpListener::bind(cfg.edge.listen)
        .await
        .map_err(|source| EdgeError::Bind {
            addr: cfg.edge.listen,
            source,
        })?;
    let ws_addr = listener.local_addr().map_err(|source| EdgeError::Bind {
        addr: cfg.edge.listen,
        source,
    })?;

    let broker = Broker::connect_with_retry(
        &cfg.amqp_url,
        &edge_id,
        broker_metrics.clone(),
        Duration::from_millis(cfg.broker_connect_timeout_ms),
    )
    .await?;
    health.set("broker", true);
    let links = Links::open(broker, &cfg, &topo, &edge_id).await?;
    health.set("topology", true);
    let publisher = PublisherSlot::new(links.publisher.clone());
    let admin_publisher = match &cfg.edge.admin_amqp_url {
        Some(url) if cfg.edge.admin_listen.is_some() => {
            admin_link::start(
                url.clone(),
                &edge_id,
                broker_metrics.clone(),
                Duration::from_millis(cfg.broker_connect_timeout_ms),
                shutdown.clone(),
            )
            .await?
        }
        _ => publisher.clone(),
    };

    let tls = match (&cfg.edge.tls_cert, &cfg.edge.tls_key) {
        (Some(cert), Some(key)) => {
            Some(tls::Tls::load("edge.tls", cert, key).map_err(EdgeError::Tls)?)
        }
        _ => None,
    };
    let web = match web::WebAssets::load(&cfg.edge.web_dir) {
        Ok(assets) => assets,
        Err(e) => {
            tracing::warn!(error = %e, "no candidate page is served (build it with `npm run build` in web/, or set VIGIL_WEB_DIR)");
            web::WebAssets::default()
        }
    };
    let session_tokens = crate::session_tokens::Verifier::load(&cfg.sessions, &cfg.namespace)?;
    let session_minter = crate::session_tokens::Minter::load(&cfg.sessions, &cfg.namespace)?;
    let sessions = Arc::new(registry::Registry::new(metrics.sessions_active.clone()));
    let enrolments = Arc::new(Enrolments::default());
    let seq = Arc::new(AtomicU64::new(0));
    let shared = Arc::new(Shared {
        session_tokens,
        web,
        enrolments: enrolments.clone(),
        cfg: cfg.edge.clone(),
        policy: cfg.policy.clone(),
        liveness: cfg.liveness.clone(),
        challenge: cfg.challenge.clone(),
        gate: gate::Gate::new(
            cfg.edge.max_unauthenticated,
            cfg.edge.max_unauthenticated_per_source,
            cfg.edge.failed_hellos_per_minute,
        ),
        id_budget: gate::IdBudget::new(
            cfg.edge.failed_hellos_per_id,
            Duration::from_millis(cfg.edge.id_lockout_base_ms),
            Duration::from_millis(cfg.edge.id_lockout_max_ms),
        ),
        slots: Arc::new(Semaphore::new(cfg.edge.max_sessions)),
        tokens: tokens::TokenChecker::start(
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            cfg.edge.max_unauthenticated,
        ),
        tls,
        edge_id: edge_id.clone(),
        frames_exchange: cfg.names().frames_exchange(),
        actions_exchange: cfg.names().actions_exchange(),
        metrics,
        store,
        publisher: publisher.clone(),
        admin_publisher,
        sessions,
        seq: seq.clone(),
        shutdown: shutdown.clone(),
        control_exchange: cfg.names().control_exchange(),
        full: AtomicBool::new(false),
        broker_blocked: AtomicBool::new(false),
        latency_ewma_us: AtomicU64::new(0),
        audits: tokio_util::task::TaskTracker::new(),
    });
    let admin_tokens = cfg.edge.admin_token.is_some() || cfg.edge.admin_tokens_file.is_some();
    let admin_addr = match cfg.edge.admin_listen {
        Some(listen) if admin_tokens => {
            let operators = admin_api::OperatorSource::new(
                cfg.edge.admin_tokens_file.clone(),
                cfg.edge.admin_token.clone(),
            )?;
            // The admin API's own certificate, else the edge's: HTTPS whenever TLS is configured.
            let admin_tls = match (&cfg.edge.admin_tls_cert, &cfg.edge.admin_tls_key) {
                (Some(cert), Some(key)) => {
                    Some(tls::Tls::load("edge.admin_tls", cert, key).map_err(EdgeError::Tls)?)
                }
                _ => match (&cfg.edge.tls_cert, &cfg.edge.tls_key) {
                    (Some(cert), Some(key)) => {
                        Some(tls::Tls::load("edge.tls", cert, key).map_err(EdgeError::Tls)?)
                    }
                    _ => None,
                },
            };
            let audit_key = cfg
                .audit_public_key
                .as_deref()
                .map(crate::audit::signing::load_public)
                .transpose()?;
            let addr = admin_api::serve(
                listen,
                telemetry::HttpLimits::of(&cfg),
                operators,
                admin_api::AuditTrail {
                    api: trail::Trail::new(&cfg, shared.metrics.audit_api_failed.clone())
                        .map_err(EdgeError::AuditApi)?,
                    key: audit_key,
                },
                admin_tls.map(Arc::new),
                admin_api::AdminEdge {
                    cfg: cfg.edge.clone(),
                    metrics: shared.metrics.clone(),
                    edge_id: edge_id.clone(),
                    sessions: shared.sessions.clone(),
                    session_minter,
                    enrolments,
                    enroll_exchange: cfg.names().enroll_exchange(),
                    seq,
                    store: shared.store.clone(),
                    publisher: shared.admin_publisher.clone(),
                    control_exchange: shared.control_exchange.clone(),
                    actions_exchange: shared.actions_exchange.clone(),
                },
                shutdown.clone(),
            )
            .await
            .map_err(|source| EdgeError::Bind {
                addr: listen,
                source,
            })?;
            tracing::info!(%addr, "admin API listening");
            Some(addr)
        }
        Some(_) => {
            tracing::warn!(
                "VIGIL_ADMIN_LISTEN is set but neither VIGIL_ADMIN_TOKENS_FILE nor \
                 VIGIL_ADMIN_TOKEN is: the admin API stays off"
            );
            None
        }
        None => None,
    };
    let work_queue = cfg.names().work_queue();
    let span = tracing::info_span!("edge", edge = %edge_id);
    tracing::info!(parent: &span, %ws_addr, %metrics_addr, "edge listening");
    let reconnect = Reconnect {
        cfg: cfg.clone(),
        topo,
        metrics: broker_metrics,
        health,
    };
    let task = tokio::spawn(
        serve(shared, links, listener, work_queue, reconnect, shutdown).instrument(span),
    );
    Ok(EdgeHandle {
        id: edge_id,
        ws_addr,
        metrics_addr,
        admin_addr,
        task,
    })
}

/// Run until `shutdown`.
pub async fn run(
    cfg: Config,
    registry: Registry,
    shutdown: CancellationToken,
) -> Result<(), EdgeError> {
    start(cfg, registry, shutdown).await?.join().await
}

/// Everything this edge holds on one broker connection.
struct Links {
    /// Shared with the admission task, which polls through it.
    broker: Arc<Broker>,
    replies: crate::broker::Consumer,
    control: crate::broker::Consumer,
    publisher: Arc<Publisher>,
    /// Who may send results and control over this connection.
    trust: crate::roles::Trust,
}

impl Links {
    /// Declare the topology and this edge's own queues, and start consuming them.
    async fn open(
        broker: Broker,
        cfg: &Config,
        topo: &Topology,
        edge_id: &str,
    ) -> Result<Self, EdgeError> {
        cfg.put_policies(&topo.shared(&cfg.namespace)).await?;
        broker
            .prepare(&topo.shared(&cfg.namespace), cfg.broker_roles)
            .await?;
        if cfg.capture_stream {
            cfg.put_policies(&topo.streams(&cfg.namespace)).await?;
            broker
                .prepare(&topo.streams(&cfg.namespace), cfg.broker_roles)
                .await?;
        }
        broker
            .declare(&topo.per_node(&cfg.namespace, NodeKind::Edge, edge_id))
            .await?;
        let names = cfg.names();
        let own_queue = |logical: &str| names.resolve(logical, edge_id);
        let control = broker
            .consume(
                &own_queue(topology::EDGE_CONTROL_QUEUE),
                edge_id,
                100,
                false,
            )
            .await?;
        // Replies are settled on send: the queue is exclusive to this connection, so nothing
        // would survive us anyway, and the volume is bounded by sessions x max_inflight.
        let replies = broker
            .consume(&own_queue(topology::EDGE_REPLY_QUEUE), edge_id, 1000, false)
            .await?;
        let publisher = Arc::new(broker.publisher().await?);
        let trust = broker.trust(cfg.broker_roles, &cfg.namespace);
        Ok(Self {
            trust,
            broker: Arc::new(broker),
            replies,
            control,
            publisher,
        })
    }

    /// Hand the replies and control consumers each to a task of its own, which feeds the
    /// session registry until the connection is lost (`Running::lost`) or it is closed.
    fn start(self, shared: &Arc<Shared>) -> Running {
        let stop = CancellationToken::new();
        let lost = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let feeds = [
            (self.replies, dispatch as Handler),
            (self.control, apply_control),
        ];
        for (consumer, handle) in feeds {
            tasks.spawn(feed(
                consumer,
                self.trust.clone(),
                handle,
                shared.clone(),
                stop.clone(),
                lost.clone(),
            ));
        }
        Running {
            broker: self.broker,
            publisher: self.publisher,
            stop,
            lost,
            tasks,
        }
    }
}

/// An edge's live broker connection: its consumers run on their own tasks.
struct Running {
    broker: Arc<Broker>,
    publisher: Arc<Publisher>,
    stop: CancellationToken,
    /// Cancelled by a consumer task when its consumer ends: the connection is gone.
    lost: CancellationToken,
    tasks: JoinSet<()>,
}

impl Running {
    async fn close(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        self.publisher.close().await;
        self.broker.close().await;
    }
}

/// How far ahead of this edge's clock another edge's may run: a session announced as starting
/// later than this is ignored.
const MAX_CLOCK_SKEW_MS: u64 = 60_000;

/// What takes one delivery off a consumer: it checks who published it (the AMQP `user_id`,
/// checked by the broker) against what it says, and never waits.
type Handler = fn(&Shared, &crate::roles::Trust, Option<&str>, &[u8]);

/// Feed one consumer's deliveries to `handle`, until the consumer ends (then `lost` is
/// cancelled) or `stop`.
async fn feed(
    mut consumer: crate::broker::Consumer,
    trust: crate::roles::Trust,
    handle: Handler,
    shared: Arc<Shared>,
    stop: CancellationToken,
    lost: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            delivery = consumer.next() => match delivery {
                Some(Ok(d)) => handle(&shared, &trust, d.user_id(), d.data()),
                _ => {
                    lost.cancel();
                    break;
                }
            },
        }
    }
    consumer.close().await;
}

/// What the edge needs to reconnect.
struct Reconnect {
    cfg: Config,
    topo: Topology,
    metrics: BrokerMetrics,
    health: Health,
}

impl Reconnect {
    /// Reconnect with backoff until it works or `shutdown`. Sessions stay up meanwhile; their
    /// frames are answered `broker_unavailable`.
    async fn run(&self, shared: &Shared, shutdown: &CancellationToken) -> Option<Links> {
        self.health.set("broker", false);
        self.health.set("topology", false);
        let edge_id = &shared.edge_id;
        let links =
            crate::broker::relink(&self.cfg.amqp_url, edge_id, &self.metrics, shutdown, |b| {
                Links::open(b, &self.cfg, &self.topo, edge_id)
            })
            .await?;
        shared.publisher.swap(links.publisher.clone());
        self.health.set("broker", true);
        self.health.set("topology", true);
        tracing::info!("reconnected to the broker");
        Some(links)
    }
}

/// Admission control, every `admission_poll_ms`: the broker's flow control, the work backlog
/// and the frame latency decide whether the system is full; and the unauthenticated places are
/// pruned.
async fn admission(
    shared: Arc<Shared>,
    broker: tokio::sync::watch::Receiver<Arc<Broker>>,
    work_queue: String,
    health: Health,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(shared.cfg.admission_poll_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A blocked broker may stop answering this connection: each poll is bounded.
    let poll = Duration::from_millis(shared.cfg.admission_poll_ms.max(100));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let current = broker.borrow().clone();
        watch_blocked(&shared, &current, &health);
        let _ = tokio::time::timeout(poll, check_admission(&shared, &current, &work_queue)).await;
        shared.gate.prune();
        shared.id_budget.prune();
    }
}

async fn serve(
    shared: Arc<Shared>,
    links: Links,
    listener: TcpListener,
    work_queue: String,
    reconnect: Reconnect,
    shutdown: CancellationToken,
) -> Result<(), EdgeError> {
    let mut connections = JoinSet::new();
    // Admission runs on its own task: its broker round trip never delays accepts, replies or
    // control. It follows the current connection through `broker`.
    let (broker, watched) = tokio::sync::watch::channel(links.broker.clone());
    // Replies and control run on their own tasks too, feeding the session registry.
    let mut running = links.start(&shared);
    let admission = tokio::spawn(admission(
        shared.clone(),
        watched,
        work_queue,
        reconnect.health.clone(),
        shutdown.clone(),
    ));
    loop {
        let lost = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = running.lost.cancelled() => true,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Behind a trusted proxy the client's address comes in the PROXY header:
                    // its per-address place is taken once that is read.
                    let admitted = if shared.cfg.trusted_proxies.trusts(peer.ip()) {
                        shared.gate.admit_unplaced()
                    } else {
                        shared.gate.admit(peer.ip())
                    };
                    match admitted {
                        Ok(pending) => {
                            let _ = stream.set_nodelay(true);
                            // The kernel notices a peer that vanished without a FIN, even
                            // while the session has nothing to send.
                            let keepalive = socket2::TcpKeepalive::new()
                                .with_time(Duration::from_secs(30))
                                .with_interval(Duration::from_secs(10));
                            let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
                            let shared = shared.clone();
                            connections.spawn(
                                connection(shared, stream, peer, pending)
                                    .instrument(tracing::debug_span!("conn", %peer)),
                            );
                        }
                        Err(refusal) => {
                            // Closed at once: no handshake, no task, nothing held.
                            shared
                                .metrics
                                .sessions_refused
                                .with_label_values(&[refusal.as_str()])
                                .inc();
                            drop(stream);
                        }
                    }
                    false
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    false
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => false,
        };
        if lost && !shutdown.is_cancelled() {
            tracing::warn!(
                "lost the broker; sessions stay up, frames are answered broker_unavailable"
            );
            // New connections wait in the listen backlog until the broker is back.
            match reconnect.run(&shared, &shutdown).await {
                Some(fresh) => {
                    broker.send_replace(fresh.broker.clone());
                    std::mem::replace(&mut running, fresh.start(&shared))
                        .close()
                        .await;
                    // Control events published while this edge was away are gone: the
                    // directory says what they would have said.
                    let shared = shared.clone();
                    tokio::task::spawn_blocking(move || recheck_sessions(&shared));
                }
                None => break,
            }
        }
    }
    // Stop accepting; sessions see the same token and close with 1001.
    drop(listener);
    shutdown.cancel();
    let _ = admission.await;
    let grace = Duration::from_millis(shared.cfg.shutdown_grace_ms);
    if tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!(
            left = connections.len(),
            "sessions did not close within the grace period"
        );
        connections.abort_all();
    }
    // Actions fired up to the last moment (a forced sign-out, a lock as a session closed)
    // still reach the audit trail, within a bound.
    shared.audits.close();
    let drain = Duration::from_millis(shared.cfg.audit_drain_ms);
    if tokio::time::timeout(drain, shared.audits.wait())
        .await
        .is_err()
    {
        let left = shared.audits.len();
        shared.metrics.actions_unaudited.inc_by(left as u64);
        tracing::error!(
            left,
            "actions still unconfirmed by the audit queue at shutdown"
        );
    }
    running.close().await;
    tracing::info!("edge stopped");
    Ok(())
}

/// Record a session's start or end in the audit trail (and so in the webhooks).
pub(crate) fn audit_session(
    shared: &Arc<Shared>,
    client_id: &str,
    session: u64,
    event: &str,
    reason: &str,
    address: std::net::IpAddr,
) {
    // Starts and ends give way to actions: past half the budget (a broker outage, a storm of
    // reconnects), they are counted and left out, so the actions keep their half.
    if shared.audits.len() >= shared.cfg.max_pending_audits / 2 {
        shared.metrics.session_events_unaudited.inc();
        tracing::warn!(client = %client_id, event, "too many audits pending; a session's {event} is not audited");
        return;
    }
    let at_ms = crate::wire::now_ms();
    let env = Envelope {
        schema: crate::wire::SCHEMA,
        id: uuid::Uuid::now_v7(),
        source: shared.edge_id.clone(),
        seq: shared.seq.fetch_add(1, Ordering::Relaxed),
        client_id: client_id.to_owned(),
        produced_at_ms: at_ms,
        deadline_ms: 0,
        traceparent: crate::wire::new_traceparent(),
        payload: Payload::Session(crate::wire::SessionChange {
            session,
            event: event.to_owned(),
            reason: reason.to_owned(),
            at_ms,
            address: address.to_string(),
        }),
    };
    submit_audit(shared, env);
}

/// Send an action on its way to the audit trail, tracked so that shutdown waits for it, and
/// bounded: past `max_pending_audits`, it is counted unaudited and logged instead.
pub(crate) fn submit_audit(shared: &Arc<Shared>, env: Envelope) {
    if shared.audits.len() >= shared.cfg.max_pending_audits {
        shared.metrics.actions_unaudited.inc();
        tracing::error!(action_id = %env.id, client = %env.client_id, pending = shared.audits.len(), "too many actions waiting for the audit queue; this one is not audited");
        return;
    }
    let shared2 = shared.clone();
    shared.metrics.audits_pending.inc();
    shared.audits.spawn(async move {
        audit_action(&shared2, &env).await;
        shared2.metrics.audits_pending.dec();
    });
}

/// Publish an action to the audit exchange under confirms, retrying (backing off to 2 s) for
/// `audit_retry_ms`, long enough for a broker restart; an action that still cannot be handed
/// over is logged and counted (the client has it already).
pub(crate) async fn audit_action(shared: &Shared, env: &Envelope) {
    let mut delay = Duration::from_millis(200);
    let give_up = std::time::Instant::now() + Duration::from_millis(shared.cfg.audit_retry_ms);
    let mut attempt = 0u32;
    while std::time::Instant::now() < give_up {
        attempt += 1;
        let published = match shared
            .publisher()
            .publish(&shared.actions_exchange, "", env)
            .await
        {
            Ok(confirm) => confirm.wait().await,
            Err(e) => Err(e),
        };
        match published {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, attempt, action_id = %env.id, "action not confirmed by the broker");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
    shared.metrics.actions_unaudited.inc();
    tracing::error!(action_id = %env.id, client = %env.client_id, "action could not reach the audit trail");
}

/// Apply one control event to the sessions of this edge.
/// A control command, from the operator or admin role; or a session's announcement, from the edge it
/// names (an edge can end other edges' sessions only by starting a newer one itself).
fn apply_control(shared: &Shared, trust: &crate::roles::Trust, user_id: Option<&str>, data: &[u8]) {
    let env = match Envelope::decode(data) {
        Ok(Envelope {
            payload: Payload::Control(c),
            client_id,
            ..
        }) => (client_id, c),
        _ => {
            shared
                .metrics
                .bad_messages
                .with_label_values(&["control"])
                .inc();
            return;
        }
    };
    let (client_id, event) = env;
    let admitted = match &event.command {
        ControlCommand::SessionStarted { edge, since_ms, .. } => {
            // A start from the future would be newer than any session to come: no edge may
            // claim one (beyond clock skew).
            if *since_ms > crate::wire::now_ms() + MAX_CLOCK_SKEW_MS {
                shared
                    .metrics
                    .bad_messages
                    .with_label_values(&["control"])
                    .inc();
                tracing::warn!(client = %client_id.escape_debug(), edge = %edge.escape_debug(), since_ms, "a session announced as starting in the future; ignored");
                return;
            }
            trust.admits_for(Kind::Session, user_id, edge)
        }
        _ => trust.admits(Kind::Control, user_id),
    };
    if !admitted {
        return;
    }
    let sessions = shared.sessions.lock();
    let Some(entry) = sessions.get(&client_id) else {
        return;
    };
    let name = match &event.command {
        ControlCommand::Block => {
            entry.closer.close_with_error(
                ErrorCode::Blocked,
                "this client was blocked by an administrator",
            );
            "block"
        }
        ControlCommand::Kick => {
            entry
                .closer
                .close_with_error(ErrorCode::Kicked, "disconnected by an administrator");
            "kick"
        }
        ControlCommand::SessionStarted {
            session,
            edge,
            since_ms,
        } => {
            let local_since = entry
                .info
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .connected_since_ms;
            // Only a newer session ends this one; an older one's late announcement does not.
            if (*since_ms, *session) <= (local_since, entry.session) {
                return;
            }
            tracing::info!(client = %client_id, newer_on = %edge, "a newer session replaces this one");
            entry.closer.close_with_error(
                ErrorCode::DuplicateSession,
                "a newer session for this client replaced this one",
            );
            "session_started"
        }
        ControlCommand::Unblock => return,
        ControlCommand::Pause
        | ControlCommand::Resume
        | ControlCommand::ForceAction { .. }
        | ControlCommand::Challenge => {
            let name = match event.command {
                ControlCommand::Pause => "pause",
                ControlCommand::Resume => "resume",
                ControlCommand::Challenge => "challenge",
                _ => "force_action",
            };
            if entry
                .tx
                .try_send(SessionEvent::Control(event.command, event.issued_by))
                .is_err()
            {
                tracing::warn!(client = %client_id, command = name, "session busy; control command not delivered");
                return;
            }
            name
        }
    };
    shared
        .metrics
        .control_applied
        .with_label_values(&[name])
        .inc();
}

/// Hold every live session against the directory: a client blocked or removed meanwhile is
/// closed, a pause or resume is applied. Run after a broker reconnect, when control events
/// published during the outage never reached this edge.
fn recheck_sessions(shared: &Shared) {
    let live: Vec<(String, bool)> = shared
        .sessions
        .lock()
        .iter()
        .map(|(id, e)| {
            let paused = e.info.lock().unwrap_or_else(|e| e.into_inner()).paused;
            (id.clone(), paused)
        })
        .collect();
    for (client_id, paused) in live {
        let record = match shared.store.get(&client_id) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(client = %client_id, error = %e, "cannot re-check a session");
                continue;
            }
        };
        let sessions = shared.sessions.lock();
        let Some(entry) = sessions.get(&client_id) else {
            continue;
        };
        let name = match record.map(|r| r.status) {
            None => {
                entry
                    .closer
                    .close_with_error(ErrorCode::Kicked, "this client was removed");
                "recheck_removed"
            }
            Some(ClientStatus::Blocked) => {
                entry.closer.close_with_error(
                    ErrorCode::Blocked,
                    "this client was blocked by an administrator",
                );
                "recheck_block"
            }
            Some(ClientStatus::SignedOut) => {
                entry
                    .closer
                    .close_with_error(ErrorCode::SignedOut, "this client was signed out");
                "recheck_signed_out"
            }
            Some(ClientStatus::Paused) if !paused => {
                let _ = entry.tx.try_send(SessionEvent::Control(
                    ControlCommand::Pause,
                    "directory".into(),
                ));
                "recheck_pause"
            }
            Some(ClientStatus::Active) if paused => {
                let _ = entry.tx.try_send(SessionEvent::Control(
                    ControlCommand::Resume,
                    "directory".into(),
                ));
                "recheck_resume"
            }
            Some(_) => continue,
        };
        tracing::info!(client = %client_id, change = name, "session re-checked after a reconnect");
        shared
            .metrics
            .control_applied
            .with_label_values(&[name])
            .inc();
    }
}

/// Decide whether the system is full: the shared work queue's backlog (the same for every
/// edge, so the signal is cluster-wide) or this edge's recent frame latency. On a change, tell
/// every live session its new frame rate.
/// Follow the broker's `connection.blocked` state: while blocked, frames are refused at once
/// and `/readyz` says the broker is not ready.
fn watch_blocked(shared: &Shared, broker: &Broker, health: &Health) {
    let blocked = broker.is_blocked();
    if shared.broker_blocked.swap(blocked, Ordering::Relaxed) != blocked {
        tracing::warn!(blocked, "broker publisher flow control changed");
        shared.metrics.broker_blocked.set(i64::from(blocked));
        health.set("broker", !blocked);
    }
}

async fn check_admission(shared: &Shared, broker: &Broker, work_queue: &str) {
    let Ok(backlog) = broker.queue_len(work_queue).await else {
        return;
    };
    shared.metrics.work_backlog.set(backlog.into());
    let latency_ms = shared.latency_ewma_us.load(Ordering::Relaxed) / 1000;
    let cfg = &shared.cfg;
    let was_full = shared.full.load(Ordering::Relaxed);
    // Hysteresis: full above the limits, clear again below half of them.
    let full = if was_full {
        backlog > cfg.max_backlog / 2 || latency_ms > cfg.max_latency_ms / 2
    } else {
        backlog > cfg.max_backlog || latency_ms > cfg.max_latency_ms
    };
    if full == was_full {
        return;
    }
    shared.full.store(full, Ordering::Relaxed);
    shared.metrics.system_full.set(i64::from(full));
    tracing::warn!(full, backlog, latency_ms, "system full signal changed");
    let max_fps = shared.current_max_fps();
    let sessions = shared.sessions.lock();
    for entry in sessions.values() {
        let _ = entry.tx.try_send(SessionEvent::Throttle { max_fps });
    }
}

/// Hand one reply to its session, without ever waiting on it.
fn dispatch(shared: &Shared, trust: &crate::roles::Trust, user_id: Option<&str>, data: &[u8]) {
    // Before any decoding: results come only from workers.
    if !trust.admits(Kind::Result, user_id) {
        return;
    }
    let env = match Envelope::decode(data) {
        Ok(env) => env,
        Err(e) => {
            shared
                .metrics
                .bad_messages
                .with_label_values(&["reply"])
                .inc();
            tracing::warn!(error = %e, "undecodable reply discarded");
            return;
        }
    };
    if let Payload::EnrollResult(r) = env.payload {
        // The admin API request that asked waits on it (or gave up: then it is dropped).
        shared.enrolments.answer(r.request_id, r.outcome);
        return;
    }
    let Some((session, _, _)) = env.payload.answers() else {
        shared
            .metrics
            .bad_messages
            .with_label_values(&["reply"])
            .inc();
        return;
    };
    let sessions = shared.sessions.lock();
    match sessions.get(&env.client_id) {
        Some(entry) if entry.session == session => {
            if entry
                .tx
                .try_send(SessionEvent::Reply(Box::new(env)))
                .is_err()
            {
                // The session is not keeping up (or just ended); its frame will be answered
                // `expired` by the session's own deadline sweep.
                shared.metrics.results_orphaned.inc();
            }
        }
        _ => shared.metrics.results_orphaned.inc(),
    }
}

/// WebSocket limits. The hard cap on one message is a frame at the limit, base64-encoded in
/// JSON, plus room for the other fields: larger messages close the connection (1009), and
/// messages between the frame limit and this cap get a `dropped` with reason
/// `frame_too_large`. Writes to a client are bounded too.
fn ws_config(cfg: &EdgeConfig) -> WebSocketConfig {
    let cap = cfg.max_frame_bytes * 2 + 64 * 1024;
    WebSocketConfig::default()
        .max_message_size(Some(cap))
        .max_frame_size(Some(cap))
        .read_buffer_size(cfg.ws_read_buffer_bytes)
        .write_buffer_size(0)
        .max_write_buffer_size(cfg.ws_max_write_buffer_bytes)
}

async fn connection(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    mut peer: std::net::SocketAddr,
    mut pending: gate::Pending,
) {
    // The PROXY header of a trusted load balancer names the client; anyone else's is refused.
    let trusted = shared.cfg.trusted_proxies.trusts(peer.ip());
    let proxy_peer = peer;
    let first_bytes = Duration::from_millis(shared.cfg.hello_timeout_ms);
    match proxy::read_preamble(&mut stream, trusted, first_bytes).await {
        Ok(proxy::Preamble::Client(client)) => {
            tracing::debug!(proxy = %peer, %client, "client address from the PROXY header");
            peer = client;
        }
        Ok(proxy::Preamble::None | proxy::Preamble::Local) => {}
        Err(e) => {
            shared.refused(e.reason());
            if e != proxy::ProxyError::Closed {
                tracing::warn!(%peer, error = %e, "connection refused");
            }
            return;
        }
    }
    let proxied = peer != proxy_peer;
    // The subprotocol the client and the edge agree on, if the client offered any.
    let negotiated = Arc::new(std::sync::OnceLock::new());
    let chosen = negotiated.clone();
    #[allow(clippy::result_large_err)] // the signature is tungstenite's callback contract
    let check = move |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() != STREAM_PATH {
            let mut err = ErrorResponse::new(Some(format!(
                "no such endpoint; connect to {STREAM_PATH}\n"
            )));
            *err.status_mut() = StatusCode::NOT_FOUND;
            return Err(err);
        }
        let offered: Vec<&str> = req
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        if offered.is_empty() {
            return Ok(resp);
        }
        match offered.iter().find_map(|p| Encoding::from_subprotocol(p)) {
            Some(encoding) => {
                let name = encoding.subprotocol();
                let _ = chosen.set(encoding);
                resp.headers_mut().insert(
                    "sec-websocket-protocol",
                    tokio_tungstenite::tungstenite::http::HeaderValue::from_static(name),
                );
                Ok(resp)
            }
            None => {
                let mut err = ErrorResponse::new(Some(
                    "unsupported subprotocol: offer vigil.v1.msgpack or vigil.v1.json\n".into(),
                ));
                *err.status_mut() = StatusCode::BAD_REQUEST;
                Err(err)
            }
        }
    };
    let hello_timeout = Duration::from_millis(shared.cfg.hello_timeout_ms);
    // The TLS handshake and the request head are part of the same bounded wait.
    let handshake = async {
        let mut stream: tls::Stream = match &shared.tls {
            Some(tls) => match tls.acceptor().accept(stream).await {
                Ok(s) => tokio_util::either::Either::Right(s),
                Err(e) => {
                    return Err(tokio_tungstenite::tungstenite::Error::Io(e));
                }
            },
            None => tokio_util::either::Either::Left(stream),
        };
        let mut read = Vec::new();
        let head = web::read_head(&mut stream, &mut read).await;
        let forwarded_for = head.as_ref().ok().and_then(|h| h.forwarded_for);
        if !head.as_ref().is_ok_and(|h| h.websocket) {
            // A page request (or not HTTP at all): answered, and the connection ends.
            let status = web::respond(
                &mut stream,
                &shared.web,
                head.as_ref(),
                STREAM_PATH,
                Duration::from_millis(shared.cfg.write_timeout_ms),
            )
            .await;
            shared
                .metrics
                .http_requests
                .with_label_values(&[&status.to_string()])
                .inc();
            return Ok(None);
        }
        tokio_tungstenite::accept_hdr_async_with_config(
            web::Rewind::new(read, stream),
            check,
            Some(ws_config(&shared.cfg)),
        )
        .await
        .map(|ws| Some((ws, forwarded_for)))
    };
    let ws = match tokio::time::timeout(hello_timeout, handshake).await {
        Ok(Ok(Some((ws, forwarded_for)))) => {
            // A trusted proxy that names no client in a PROXY header (an HTTP ingress) names
            // it in X-Forwarded-For; from anyone else the header means nothing.
            if trusted
                && !proxied
                && let Some(client) = forwarded_for
            {
                peer = std::net::SocketAddr::new(client, 0);
            }
            ws
        }
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            shared
                .metrics
                .sessions_refused
                .with_label_values(&["handshake"])
                .inc();
            tracing::debug!(error = %e, "websocket handshake failed");
            return;
        }
        Err(_) => {
            shared
                .metrics
                .sessions_refused
                .with_label_values(&["handshake"])
                .inc();
            return;
        }
    };
    // Behind a trusted proxy the connection's per-address place is taken now, by the client's
    // own address.
    if trusted {
        pending = match shared.gate.place(pending, peer.ip()) {
            Ok(placed) => placed,
            Err(refusal) => {
                shared.refused(refusal.as_str());
                return;
            }
        };
    }
    let negotiated = negotiated.get().copied();
    session::run(shared, ws, peer, pending, negotiated).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::EnrollOutcome;

    fn refused(why: &str) -> EnrollOutcome {
        EnrollOutcome::Refused { reason: why.into() }
    }

    fn waiting(enrolments: &Enrolments) -> usize {
        enrolments.waiting.lock().unwrap().len()
    }

    #[tokio::test]
    async fn an_enrolment_gets_its_own_answer_and_its_place_goes_however_it_ends() {
        let enrolments = Arc::new(Enrolments::default());
        let (first, second) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
        let (rx1, place1) = enrolments.wait(first);
        let (rx2, place2) = enrolments.wait(second);
        assert_eq!(waiting(&enrolments), 2);
        // Answers go to their own request, in any order; an unknown one is dropped.
        enrolments.answer(uuid::Uuid::now_v7(), refused("nobody asked"));
        enrolments.answer(second, refused("two"));
        enrolments.answer(first, refused("one"));
        assert!(matches!(rx2.await, Ok(EnrollOutcome::Refused { reason }) if reason == "two"));
        assert!(matches!(rx1.await, Ok(EnrollOutcome::Refused { reason }) if reason == "one"));
        drop((place1, place2));
        assert_eq!(waiting(&enrolments), 0);
        // A request given up (its handler dropped) leaves no place, and a late answer for it
        // goes nowhere.
        let third = uuid::Uuid::now_v7();
        let (rx3, place3) = enrolments.wait(third);
        drop(place3);
        assert_eq!(waiting(&enrolments), 0);
        enrolments.answer(third, refused("late"));
        assert!(rx3.await.is_err());
    }
}
