//! Benchmarks that print numbers: `vigil bench transport` runs clients through an edge, one
//! `frame-info` worker and RabbitMQ, and in the same run a bare publish → consume → reply loop
//! with the same payload size and frames in flight, through the default exchange and through
//! Vigil's own topology, then prints all three and the ratios.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use prometheus::Registry;
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, Publisher};
use crate::config::Config;
use crate::directory::{ClientRecord, ClientStore, FolderStore};
use crate::edge::{self, client::Connection, client::Incoming};
use crate::metrics::BrokerMetrics;
use crate::topology::{NodeKind, QueueRole, QueueSpec, Topology};
use crate::wire::client::{Encoding, ServerMsg};
use crate::{inference, worker};

/// Parameters of `vigil bench transport`.
#[derive(Debug, Clone)]
pub struct TransportBench {
    /// Base configuration (broker URL, topology, edge and worker settings); the bench
    /// overrides the namespace, addresses, limits that would throttle it, and the analyzer.
    pub base: Config,
    pub clients: usize,
    /// Frames per second per client; 0 runs closed-loop at saturation.
    pub fps: u32,
    pub frame_bytes: usize,
    /// Frames in flight per client (the edge's `max_inflight`).
    pub inflight_per_client: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Rounds of every side, rotating which goes first, so drift on a shared machine hits all.
    pub rounds: usize,
    /// Run only one side (for profiling); the report then holds zeros for the other.
    pub only: Option<Side>,
    /// The namespace Vigil's side runs in (a fresh random one when unset), so that broker
    /// settings made for its names (a topic permission, a policy) can be measured.
    pub namespace: Option<String>,
}

/// The paths the transport benchmark measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Side {
    /// WebSocket clients → edge → RabbitMQ → `frame-info` worker → edge → clients.
    Vigil,
    /// A bare lapin loop through the default exchange, with bare message properties: the
    /// baseline the throughput target is set against.
    Bare,
    /// The same bare loop through Vigil's own broker topology: frames into the `frames`
    /// fanout exchange and its work queue (TTL, max length, dead-lettering), replies through
    /// the `replies` topic exchange to a per-edge queue, and every message with an event's
    /// properties (id, timestamp, type, expiration). What is left between this and `vigil`
    /// is the cost of Vigil's own code; between this and `bare`, the broker's cost of the
    /// topology.
    BareRouted,
}

/// One side's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figures {
    pub frames: u64,
    pub seconds: f64,
    pub frames_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub dropped: u64,
    /// CPU time of this process (clients, edge and worker, or the bare loop) per frame.
    pub own_cpu_us_per_frame: f64,
    /// CPU time of the local RabbitMQ node per frame, when it runs on this machine.
    pub broker_cpu_us_per_frame: Option<f64>,
}

impl Figures {
    fn empty() -> Self {
        Self {
            frames: 0,
            seconds: 0.0,
            frames_per_s: 0.0,
            p50_ms: 0.0,
            p99_ms: 0.0,
            dropped: 0,
            own_cpu_us_per_frame: 0.0,
            broker_cpu_us_per_frame: None,
        }
    }

    fn from(hist: &Histogram<u64>, frames: u64, dropped: u64, seconds: f64, cpu: CpuSpent) -> Self {
        let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
        let per_frame = |s: f64| s * 1e6 / frames.max(1) as f64;
        Self {
            frames,
            seconds,
            frames_per_s: frames as f64 / seconds,
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            dropped,
            own_cpu_us_per_frame: per_frame(cpu.own),
            broker_cpu_us_per_frame: cpu.broker.map(per_frame),
        }
    }
}

/// One measured window of one side.
struct Sample {
    hist: Histogram<u64>,
    frames: u64,
    dropped: u64,
    seconds: f64,
    cpu: CpuSpent,
}

impl Sample {
    /// Several windows of the same side, pooled: frames and seconds add up, latency
    /// quantiles come from the merged histogram.
    fn pool(samples: &[Sample]) -> Figures {
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
        for s in samples {
            let _ = hist.add(&s.hist);
        }
        let sum = |f: fn(&Sample) -> f64| samples.iter().map(f).sum::<f64>();
        let broker = samples.iter().map(|s| s.cpu.broker).sum::<Option<f64>>();
        Figures::from(
            &hist,
            samples.iter().map(|s| s.frames).sum(),
            samples.iter().map(|s| s.dropped).sum(),
            sum(|s| s.seconds),
            CpuSpent {
                own: sum(|s| s.cpu.own),
                broker,
            },
        )
    }

    fn frames_per_s(&self) -> f64 {
        self.frames as f64 / self.seconds
    }
}

/// CPU seconds spent during a measurement window.
#[derive(Debug, Clone, Copy)]
struct CpuSpent {
    own: f64,
    broker: Option<f64>,
}

/// A reading of process CPU clocks, from /proc (Linux); zero elsewhere.
#[derive(Debug, Clone, Copy)]
struct CpuClock {
    own: f64,
    broker: Option<f64>,
}

impl CpuClock {
    fn now() -> Self {
        Self {
            own: proc_cpu_seconds("self").unwrap_or(0.0),
            broker: broker_pid().and_then(|pid| proc_cpu_seconds(&pid)),
        }
    }

    fn since(self, start: CpuClock) -> CpuSpent {
        CpuSpent {
            own: self.own - start.own,
            broker: self.broker.zip(start.broker).map(|(a, b)| a - b),
        }
    }
}

/// utime + stime of a process, in seconds (clock ticks are 100 Hz on Linux).
pub(crate) fn proc_cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// The pid of a local RabbitMQ (Erlang `beam.smp`) node, if one runs here.
fn broker_pid() -> Option<String> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let name = e.file_name().into_string().ok()?;
        name.bytes().all(|b| b.is_ascii_digit()).then_some(())?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        let cmdline = std::fs::read_to_string(e.path().join("cmdline")).unwrap_or_default();
        (comm.trim() == "beam.smp" && cmdline.contains("rabbit")).then_some(name)
    })
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TransportReport {
    pub clients: usize,
    pub inflight_total: usize,
    pub frame_bytes: usize,
    pub vigil: Figures,
    pub bare: Figures,
    pub bare_routed: Figures,
    /// Each round's frames/s of every side (0 for a side not run).
    pub rounds: Vec<Round>,
    /// Vigil over the bare loop: the median of the rounds' ratios.
    pub throughput_ratio: f64,
    /// Vigil over the bare loop through Vigil's topology: the median of the rounds' ratios.
    pub routed_ratio: f64,
    /// Vigil's p50 minus the bare loop's.
    pub p50_delta_ms: f64,
}

/// One round's frames/s per side.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Round {
    pub vigil: f64,
    pub bare: f64,
    pub bare_routed: f64,
}

/// The median of `f` over the rounds where both sides ran.
fn median_ratio(rounds: &[Round], f: impl Fn(&Round) -> (f64, f64)) -> f64 {
    let mut ratios: Vec<f64> = rounds
        .iter()
        .map(&f)
        .filter(|(a, b)| *a > 0.0 && *b > 0.0)
        .map(|(a, b)| a / b)
        .collect();
    ratios.sort_by(f64::total_cmp);
    ratios.get(ratios.len() / 2).copied().unwrap_or(f64::NAN)
}

impl TransportReport {
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = format!(
            "transport benchmark: {} clients, {} frames in flight, {}-byte frames, {} round(s)\n",
            self.clients,
            self.inflight_total,
            self.frame_bytes,
            self.rounds.len(),
        );
        for (i, r) in self.rounds.iter().enumerate() {
            let _ = writeln!(
                out,
                "round {}: vigil {:.0}, bare {:.0}, bare routed {:.0} frames/s",
                i + 1,
                r.vigil,
                r.bare,
                r.bare_routed
            );
        }
        let _ = writeln!(
            out,
            "{:<40} {:>9} {:>9} {:>9} {:>8} {:>12} {:>12}",
            "path", "frames/s", "p50 ms", "p99 ms", "dropped", "cpu us/frame", "broker us/fr"
        );
        for (name, f) in [
            ("vigil (ws → edge → mq → worker → ws)", &self.vigil),
            ("bare lapin loop (default exchange)", &self.bare),
            ("bare lapin loop (vigil's exchanges)", &self.bare_routed),
        ] {
            let _ = writeln!(
                out,
                "{:<40} {:>9.0} {:>9.3} {:>9.3} {:>8} {:>12.1} {:>12}",
                name,
                f.frames_per_s,
                f.p50_ms,
                f.p99_ms,
                f.dropped,
                f.own_cpu_us_per_frame,
                fmt_opt(f.broker_cpu_us_per_frame),
            );
        }
        let _ = writeln!(
            out,
            "throughput ratio (vigil / bare, median of rounds): {:.3}",
            self.throughput_ratio
        );
        let _ = writeln!(
            out,
            "throughput ratio (vigil / bare through vigil's exchanges): {:.3}",
            self.routed_ratio
        );
        let _ = writeln!(
            out,
            "p50 difference (vigil - bare): {:+.3} ms",
            self.p50_delta_ms
        );
        out
    }
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1}"))
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("bench setup: {0}")]
    Setup(String),
}

fn setup<E: std::fmt::Display>(e: E) -> BenchError {
    BenchError::Setup(e.to_string())
}

pub async fn transport(b: &TransportBench) -> Result<TransportReport, BenchError> {
    let jpeg = Arc::new(inference::synthetic_jpeg(320, 240, 42, b.frame_bytes));
    let inflight_total = b.clients * b.inflight_per_client;
    let (mut vigil, mut bare, mut routed) = (Vec::new(), Vec::new(), Vec::new());
    let mut rounds = Vec::new();
    let order = [Side::Vigil, Side::Bare, Side::BareRouted];
    for round in 0..b.rounds.max(1) {
        // Rotate which side goes first, so none always runs on a warmer (or busier) machine.
        let mut r = Round::default();
        for i in 0..order.len() {
            let side = order[(i + round) % order.len()];
            if b.only.is_some_and(|only| only != side) {
                continue;
            }
            let sample = match side {
                Side::Vigil => vigil_side(b, jpeg.clone()).await?,
                Side::Bare => bare_side(b, jpeg.len(), inflight_total, Route::Default).await?,
                Side::BareRouted => bare_side(b, jpeg.len(), inflight_total, Route::Vigil).await?,
            };
            let (slot, samples) = match side {
                Side::Vigil => (&mut r.vigil, &mut vigil),
                Side::Bare => (&mut r.bare, &mut bare),
                Side::BareRouted => (&mut r.bare_routed, &mut routed),
            };
            *slot = sample.frames_per_s();
            samples.push(sample);
        }
        rounds.push(r);
    }
    let pooled = |s: &[Sample]| {
        if s.is_empty() {
            Figures::empty()
        } else {
            Sample::pool(s)
        }
    };
    let (vigil, bare, bare_routed) = (pooled(&vigil), pooled(&bare), pooled(&routed));
    Ok(TransportReport {
        clients: b.clients,
        inflight_total,
        frame_bytes: jpeg.len(),
        throughput_ratio: median_ratio(&rounds, |r| (r.vigil, r.bare)),
        routed_ratio: median_ratio(&rounds, |r| (r.vigil, r.bare_routed)),
        rounds,
        p50_delta_ms: vigil.p50_ms - bare.p50_ms,
        vigil,
        bare,
        bare_routed,
    })
}

async fn vigil_side(b: &TransportBench, jpeg: Arc<Vec<u8>>) -> Result<Sample, BenchError> {
    let namespace = b
        .namespace
        .clone()
        .unwrap_or_else(|| format!("bench-{:08x}", rand::random::<u32>()));
    let clients_dir = std::env::temp_dir().join(format!("{namespace}-clients"));
    let store = FolderStore::open(&clients_dir).map_err(setup)?;
    let token = "bench-token-0000";
    for i in 0..b.clients {
        store
            .put(&ClientRecord::new(&format!("bench-{i}"), "", token).map_err(setup)?)
            .map_err(setup)?;
    }
    let mut cfg = Config {
        namespace: namespace.clone(),
        metrics_listen: "127.0.0.1:0".parse().expect("addr"),
        clients_dir: clients_dir.clone(),
        ..b.base.clone()
    };
    cfg.edge.id = None;
    cfg.worker.id = None;
    cfg.edge.listen = "127.0.0.1:0".parse().expect("addr");
    cfg.edge.max_inflight = b.inflight_per_client;
    cfg.edge.max_fps = 100_000;
    cfg.edge.max_frame_bytes = b.frame_bytes.max(1024) * 2;
    cfg.worker.prefetch = (b.clients * b.inflight_per_client * 2).clamp(8, 1000) as u16;
    cfg.worker.analyzer = "frame-info".into();

    let shutdown = CancellationToken::new();
    let worker = worker::start(cfg.clone(), Registry::new(), shutdown.clone())
        .await
        .map_err(setup)?;
    let edge = edge::start(cfg.clone(), Registry::new(), shutdown.clone())
        .await
        .map_err(setup)?;
    let url = edge.url();

    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for i in 0..b.clients {
        let (conn, _) = Connection::connect(&url, &format!("bench-{i}"), token, Encoding::MsgPack)
            .await
            .map_err(setup)?;
        let (jpeg, measuring, stop) = (jpeg.clone(), measuring.clone(), stop.clone());
        let inflight = b.inflight_per_client;
        let period = (b.fps > 0).then(|| Duration::from_secs_f64(1.0 / b.fps as f64));
        // One task per client, like a real client: closed loop (keep `inflight` frames
        // outstanding) or open loop (send at `fps`).
        tasks.push(tokio::spawn(async move {
            let mut conn = conn;
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            let (mut done, mut dropped) = (0u64, 0u64);
            let mut sent_at = std::collections::HashMap::<u64, Instant>::new();
            let mut seq = 0u64;
            let mut next = tokio::time::Instant::now();
            let mut credits = if period.is_none() { inflight } else { 0 };
            loop {
                while credits > 0 {
                    credits -= 1;
                    seq += 1;
                    sent_at.insert(seq, Instant::now());
                    if conn
                        .send_frame(seq, crate::wire::now_ms(), &jpeg)
                        .await
                        .is_err()
                    {
                        return (hist, done, dropped);
                    }
                }
                let tick = async {
                    match period {
                        Some(_) => tokio::time::sleep_until(next).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick => {
                        next += period.expect("open loop");
                        credits = 1;
                    }
                    msg = conn.recv() => {
                        let Some(Ok(Incoming::Msg(msg))) = msg else { break };
                        let (seq, ok) = match msg {
                            ServerMsg::Result { seq, .. } => (seq, true),
                            ServerMsg::Dropped { seq, .. } => (seq, false),
                            _ => continue,
                        };
                        let t = sent_at.remove(&seq);
                        if measuring.load(Ordering::Relaxed) {
                            if ok {
                                if let Some(t) = t {
                                    let _ = hist.record(t.elapsed().as_micros() as u64);
                                }
                                done += 1;
                            } else {
                                dropped += 1;
                            }
                        }
                        if period.is_none() {
                            credits = 1;
                        }
                    }
                }
            }
            conn.close().await;
            (hist, done, dropped)
        }));
    }
    tokio::time::sleep(b.warmup).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let cpu_start = CpuClock::now();
    tokio::time::sleep(b.duration).await;
    measuring.store(false, Ordering::Relaxed);
    let cpu = CpuClock::now().since(cpu_start);
    let seconds = started.elapsed().as_secs_f64();
    stop.cancel();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let (mut done, mut dropped) = (0u64, 0u64);
    for t in tasks {
        if let Ok((h, d, x)) = t.await {
            let _ = hist.add(&h);
            done += d;
            dropped += x;
        }
    }
    shutdown.cancel();
    let _ = edge.join().await;
    let _ = worker.join().await;
    cleanup(&cfg.amqp_url, &namespace, &cfg).await;
    let _ = std::fs::remove_dir_all(&clients_dir);
    Ok(Sample {
        hist,
        frames: done,
        dropped,
        seconds,
        cpu,
    })
}

async fn cleanup(url: &str, namespace: &str, cfg: &Config) {
    if let Ok(broker) =
        Broker::connect(url, "bench-cleanup", BrokerMetrics::new(&Registry::new())).await
    {
        if let Ok(topo) = cfg.topology() {
            let _ = broker.delete(&topo.shared(namespace)).await;
        }
        broker.close().await;
    }
}

/// Where the bare loop's messages go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// Straight to the queues through the default exchange, with bare properties.
    Default,
    /// Through Vigil's exchanges and queues (from the topology file, in a bench namespace),
    /// with the properties Vigil's events carry.
    Vigil,
}

/// The loop's queues and exchanges, and where each side publishes.
struct BareRoutes {
    /// What to declare (and delete afterwards).
    shared: Topology,
    /// Declared on the client's connection: the reply queue may be exclusive to it.
    client_owned: Topology,
    work_queue: String,
    reply_queue: String,
    /// (exchange, routing key) of requests and of replies.
    request_to: (String, String),
    reply_to: (String, String),
    /// When messages carry an event's properties: their expiration (ms).
    event_ttl_ms: Option<u64>,
}

impl BareRoutes {
    fn new(b: &TransportBench, route: Route) -> Result<Self, BenchError> {
        let ns = match &b.namespace {
            Some(ns) => format!("{ns}-bare"),
            None => format!("bench-bare-{:08x}", rand::random::<u32>()),
        };
        Ok(match route {
            Route::Default => {
                let queue = |name: &str| QueueSpec {
                    name: name.into(),
                    role: QueueRole::Durable,
                    owner: None,
                    durable: false,
                    exclusive: false,
                    auto_delete: false,
                    message_ttl_ms: None,
                    max_length: None,
                    max_length_bytes: None,
                    overflow: None,
                    dead_letter_exchange: None,
                    dead_letter_routing_key: None,
                    dead_letter_strategy: None,
                    max_age: None,
                    single_active_consumer: false,
                    queue_type: crate::topology::QueueType::Classic,
                };
                let (work, reply) = (format!("{ns}.work"), format!("{ns}.reply"));
                Self {
                    shared: Topology {
                        exchanges: vec![],
                        queues: vec![queue(&work), queue(&reply)],
                        bindings: vec![],
                        tunables: crate::topology::Tunables::Arguments,
                    },
                    client_owned: Topology::default(),
                    request_to: (String::new(), work.clone()),
                    reply_to: (String::new(), reply.clone()),
                    work_queue: work,
                    reply_queue: reply,
                    event_ttl_ms: None,
                }
            }
            Route::Vigil => {
                let topo = b.base.topology().map_err(setup)?;
                let node = "bench";
                let names = crate::topology::Names::new(ns.as_str());
                let reply_queue = names.resolve(crate::topology::EDGE_REPLY_QUEUE, node);
                let mut client_owned = topo.per_node(&ns, NodeKind::Edge, node);
                client_owned.queues.retain(|q| q.name == reply_queue);
                client_owned.bindings.retain(|bd| bd.queue == reply_queue);
                Self {
                    shared: topo.shared(&ns),
                    client_owned,
                    work_queue: names.work_queue(),
                    reply_queue,
                    request_to: (names.frames_exchange(), String::new()),
                    // As a worker routes a result.
                    reply_to: (
                        names.replies_exchange(),
                        crate::topology::Names::reply_key(node, "bench-0"),
                    ),
                    event_ttl_ms: Some(b.base.edge.frame_deadline_ms),
                }
            }
        })
    }
}

/// Publish one message of the bare loop, with event properties when the route asks for them.
async fn bare_publish(
    publisher: &Publisher,
    to: &(String, String),
    body: &[u8],
    kind: &str,
    event_ttl_ms: Option<u64>,
) -> Result<crate::broker::Confirm, crate::broker::BrokerError> {
    match event_ttl_ms {
        Some(ttl_ms) => {
            publisher
                .publish_raw_as_event(&to.0, &to.1, body, kind, ttl_ms)
                .await
        }
        None => publisher.publish_raw(&to.0, &to.1, body).await,
    }
}

/// The baseline: a client publishes raw payloads (with confirms); a consumer with the same
/// prefetch publishes a reply (with confirms) and acks after the confirm; the client
/// consumes replies. `inflight` messages are kept outstanding.
async fn bare_side(
    b: &TransportBench,
    payload_len: usize,
    inflight: usize,
    route: Route,
) -> Result<Sample, BenchError> {
    let routes = Arc::new(BareRoutes::new(b, route)?);
    let metrics = BrokerMetrics::new(&Registry::new());
    let client = Broker::connect(&b.base.amqp_url, "bench-bare-client", metrics.clone())
        .await
        .map_err(setup)?;
    let server = Broker::connect(&b.base.amqp_url, "bench-bare-server", metrics)
        .await
        .map_err(setup)?;
    client.declare(&routes.shared).await.map_err(setup)?;
    client.declare(&routes.client_owned).await.map_err(setup)?;

    // Server: consume, reply, ack after the reply's confirm.
    let server_pub = Arc::new(server.publisher().await.map_err(setup)?);
    let mut server_consumer = server
        .consume(
            &routes.work_queue,
            "bare-server",
            (inflight * 2).clamp(8, 1000) as u16,
            true,
        )
        .await
        .map_err(setup)?;
    let server_routes = routes.clone();
    let server_task = tokio::spawn(async move {
        let mut pending = futures_util::stream::FuturesUnordered::new();
        loop {
            use futures_util::StreamExt as _;
            tokio::select! {
                Some(()) = pending.next(), if !pending.is_empty() => {}
                d = server_consumer.next() => {
                    let Some(Ok(d)) = d else { break };
                    let publisher = server_pub.clone();
                    let routes = server_routes.clone();
                    pending.push(async move {
                        // The reply carries the request's first 16 bytes (its id), like a result.
                        let body = d.data()[..16.min(d.data().len())].to_vec();
                        let to = &routes.reply_to;
                        if let Ok(c) =
                            bare_publish(&publisher, to, &body, "vigil.result", routes.event_ttl_ms)
                                .await
                        {
                            let _ = c.wait().await;
                        }
                        let _ = d.ack().await;
                    });
                }
            }
        }
    });

    let publisher = Arc::new(client.publisher().await.map_err(setup)?);
    let mut replies = client
        .consume(&routes.reply_queue, "bare-client", 1000, false)
        .await
        .map_err(setup)?;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let mut sent_at = std::collections::HashMap::<u64, Instant>::new();
    let mut seq = 0u64;
    let mut payload = vec![0xA5u8; payload_len.max(16)];
    let mut send = |seq: u64, sent_at: &mut std::collections::HashMap<u64, Instant>| {
        payload[..8].copy_from_slice(&seq.to_le_bytes());
        sent_at.insert(seq, Instant::now());
        let publisher = publisher.clone();
        let body = payload.clone();
        let routes = routes.clone();
        tokio::spawn(async move {
            let to = &routes.request_to;
            if let Ok(c) =
                bare_publish(&publisher, to, &body, "vigil.frame", routes.event_ttl_ms).await
            {
                let _ = c.wait().await;
            }
        });
    };
    for _ in 0..inflight {
        seq += 1;
        send(seq, &mut sent_at);
    }
    let mut measuring = false;
    let mut frames = 0u64;
    let start = Instant::now();
    let mut measure_start = start;
    let mut cpu_start = CpuClock::now();
    let end_at = start + b.warmup + b.duration;
    while Instant::now() < end_at {
        let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(5), replies.next()).await
        else {
            return Err(BenchError::Setup("bare loop stalled".into()));
        };
        if !measuring && start.elapsed() >= b.warmup {
            measuring = true;
            measure_start = Instant::now();
            cpu_start = CpuClock::now();
        }
        let id = u64::from_le_bytes(d.data()[..8].try_into().unwrap_or([0; 8]));
        if let Some(t) = sent_at.remove(&id)
            && measuring
        {
            let _ = hist.record(t.elapsed().as_micros() as u64);
            frames += 1;
        }
        seq += 1;
        send(seq, &mut sent_at);
    }
    let seconds = measure_start.elapsed().as_secs_f64();
    let cpu = CpuClock::now().since(cpu_start);
    server_task.abort();
    let _ = client.delete(&routes.client_owned).await;
    let _ = client.delete(&routes.shared).await;
    client.close().await;
    server.close().await;
    Ok(Sample {
        hist,
        frames,
        dropped: 0,
        seconds,
        cpu,
    })
}

/// Parameters of `vigil bench models`.
pub struct ModelsBench {
    pub inference: crate::config::InferenceConfig,
    /// Photos to make camera frames from.
    pub photos: Vec<Vec<u8>>,
    /// Frames to time.
    pub frames: usize,
    /// A Python with onnxruntime==1.31.1 and numpy, to time the bare model runs.
    pub python: Option<std::path::PathBuf>,
    pub script: std::path::PathBuf,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelsReport {
    pub frames: usize,
    pub intra_threads: usize,
    /// Mean milliseconds per frame of each stage on the Rust side (each model's own pre- and
    /// postprocessing included; `preprocess` is decoding and scaling the frame).
    pub rust_ms: std::collections::BTreeMap<String, f64>,
    pub rust_frame_ms: f64,
    pub rust_frames_per_s: f64,
    /// Mean milliseconds of onnxruntime's Python `InferenceSession.run` per model.
    pub python_ms: Option<std::collections::BTreeMap<String, f64>>,
    pub python_sum_ms: Option<f64>,
    /// Rust time per frame over the sum of the bare model runs (target: at most 1.1).
    pub ratio: Option<f64>,
}

impl ModelsReport {
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = format!(
            "model stack on CPU: {} frames, {} intra-op thread(s) per model\n{:<12} {:>12} {:>14}\n",
            self.frames, self.intra_threads, "stage", "vigil ms", "python ort ms"
        );
        for (stage, ms) in &self.rust_ms {
            let py = self
                .python_ms
                .as_ref()
                .and_then(|p| p.get(stage))
                .map_or("-".to_owned(), |v| format!("{v:.2}"));
            let _ = writeln!(out, "{stage:<12} {ms:>12.2} {py:>14}");
        }
        let _ = writeln!(
            out,
            "{:<12} {:>12.2} {:>14}",
            "per frame",
            self.rust_frame_ms,
            self.python_sum_ms.map_or("-".into(), |v| format!("{v:.2}"))
        );
        let _ = writeln!(
            out,
            "stack throughput: {:.1} frames/s per analysis thread",
            self.rust_frames_per_s
        );
        if let Some(r) = self.ratio {
            let _ = writeln!(
                out,
                "vigil per frame / sum of bare model runs: {r:.3} (target <= 1.1)"
            );
        }
        out
    }
}

pub fn models(b: &ModelsBench) -> Result<ModelsReport, BenchError> {
    use std::collections::BTreeMap;
    let stack = crate::inference::IdentityStack::load(&b.inference, 1).map_err(setup)?;
    // Camera frames with one face each, so that every model runs on every frame.
    let mut frames = Vec::new();
    for photo in &b.photos {
        let Ok((jpeg, w, h)) = inference::camera_frame(photo, 640) else {
            continue;
        };
        if let Ok(reference) = stack.enroll(&jpeg) {
            frames.push((jpeg, reference, w, h));
        }
        if frames.len() >= b.frames.max(1) {
            break;
        }
    }
    if frames.is_empty() {
        return Err(BenchError::Setup("no photo with exactly one face".into()));
    }
    // Warm-up, then the timed pass.
    for (jpeg, reference, _, _) in frames.iter().take(3) {
        stack.analyze(jpeg, Some(reference)).map_err(setup)?;
    }
    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    let started = Instant::now();
    for (jpeg, reference, _, _) in &frames {
        let (_, stages) = stack.analyze(jpeg, Some(reference)).map_err(setup)?;
        for (stage, secs) in stages {
            *sums.entry(stage.to_owned()).or_default() += secs * 1e3;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let n = frames.len() as f64;
    let rust_ms: BTreeMap<String, f64> = sums.into_iter().map(|(k, v)| (k, v / n)).collect();
    let rust_frame_ms = rust_ms.values().sum::<f64>();

    let python_ms = match &b.python {
        None => None,
        Some(python) => {
            let sizes: Vec<[u32; 2]> = frames.iter().map(|(_, _, w, h)| [*h, *w]).collect();
            let out = std::process::Command::new(python)
                .arg(&b.script)
                .arg(&b.inference.models_dir)
                .arg(b.inference.intra_threads.to_string())
                .arg(frames.len().to_string())
                .arg(serde_json::to_string(&sizes).expect("sizes encode"))
                .output()
                .map_err(|e| BenchError::Setup(format!("cannot run {}: {e}", python.display())))?;
            if !out.status.success() {
                return Err(BenchError::Setup(format!(
                    "python timing failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            Some(
                serde_json::from_slice::<BTreeMap<String, f64>>(&out.stdout)
                    .map_err(|e| BenchError::Setup(format!("python output: {e}")))?,
            )
        }
    };
    let python_sum_ms = python_ms.as_ref().map(|p| p.values().sum::<f64>());
    Ok(ModelsReport {
        frames: frames.len(),
        intra_threads: b.inference.intra_threads,
        rust_frames_per_s: n / elapsed,
        ratio: python_sum_ms.map(|s| rust_frame_ms / s),
        rust_ms,
        rust_frame_ms,
        python_ms,
        python_sum_ms,
    })
}
