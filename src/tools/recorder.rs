//! `vigil record`: capture live frame events (and, with `--results`, their results) from the
//! broker into a capture file, without disturbing the pipeline: the recorder binds a queue of its
//! own to `vigil.frames` (and to `vigil.replies`).

use std::path::Path;
use std::time::{Duration, Instant};

use prometheus::Registry;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::config::Config;
use crate::metrics::BrokerMetrics;
use crate::tools::capture::{
    CaptureError, CaptureHeader, CaptureRecord, CaptureWriter, FORMAT_VERSION, RecordKind,
};
use crate::topology::{self, BindingSpec, QueueRole, QueueSpec, Topology};

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Broker(#[from] crate::broker::BrokerError),
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error(transparent)]
    Topology(#[from] topology::TopologyError),
}

pub struct RecordOptions {
    pub results: bool,
    pub duration: Option<Duration>,
    pub max_frames: Option<u64>,
}

/// What a recording holds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Recorded {
    pub frames: u64,
    pub results: u64,
}

/// A transient queue of the recorder's own, bound where it listens.
fn tap(name: &str, bindings: Vec<BindingSpec>) -> Topology {
    Topology {
        exchanges: vec![],
        queues: vec![QueueSpec {
            name: name.into(),
            role: QueueRole::PerNode,
            owner: None,
            durable: false,
            exclusive: true,
            auto_delete: true,
            message_ttl_ms: None,
            // Bounded: a recorder that cannot keep up loses the oldest events, never the broker.
            max_length: Some(10_000),
            max_length_bytes: Some(512 << 20),
            overflow: Some(topology::Overflow::DropHead),
            dead_letter_exchange: None,
            dead_letter_routing_key: None,
            dead_letter_strategy: None,
            max_age: None,
            single_active_consumer: false,
            queue_type: topology::QueueType::Classic,
        }],
        bindings,
        tunables: topology::Tunables::Arguments,
    }
}

/// Record until the options or `stop` say so. `progress` sees the running counts.
pub async fn record(
    cfg: &Config,
    out: &Path,
    opts: &RecordOptions,
    stop: CancellationToken,
    progress: &mut (dyn FnMut(Recorded) + Send),
) -> Result<Recorded, RecordError> {
    let ns = &cfg.namespace;
    let broker = Broker::connect(
        &cfg.amqp_url,
        "vigil-record",
        BrokerMetrics::new(&Registry::new()),
    )
    .await?;
    broker.declare(&cfg.topology()?.shared(ns)).await?;
    let frames_exchange = cfg.names().frames_exchange();
    let replies_exchange = cfg.names().replies_exchange();
    // A private queue, bound to the frames and replies exchanges for as long as it records.
    let queue = cfg
        .names()
        .resolve("record.{node}", &format!("{:08x}", rand::random::<u32>()));
    let mut bindings = vec![BindingSpec {
        exchange: frames_exchange.clone(),
        queue: queue.clone(),
        routing_key: String::new(),
    }];
    if opts.results {
        bindings.push(BindingSpec {
            exchange: replies_exchange,
            queue: queue.clone(),
            routing_key: "#".into(),
        });
    }
    broker.declare(&tap(&queue, bindings)).await?;
    let mut consumer = broker.consume(&queue, "vigil-record", 1000, false).await?;
    let header = CaptureHeader {
        format_version: FORMAT_VERSION,
        namespace: ns.clone(),
        started_at_ms: crate::wire::now_ms(),
        tool_version: env!("CARGO_PKG_VERSION").into(),
        results: opts.results,
        source: "live".into(),
    };
    let mut writer = CaptureWriter::new(
        std::fs::File::create(out).map_err(CaptureError::Io)?,
        &header,
    )?;
    let mut counts = Recorded::default();
    let started = Instant::now();
    let deadline = opts.duration.map(|d| started + d);
    loop {
        if opts.max_frames.is_some_and(|n| counts.frames >= n) {
            break;
        }
        let wait = deadline.map_or(Duration::from_secs(3600), |d| {
            d.saturating_duration_since(Instant::now())
        });
        let delivery = tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(wait) => break,
            d = consumer.next() => match d {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(e.into()),
                None => break,
            },
        };
        let kind = if delivery.exchange() == frames_exchange {
            RecordKind::Frame
        } else {
            RecordKind::Result
        };
        writer.write(&CaptureRecord {
            arrived_at_ms: crate::wire::now_ms(),
            kind,
            event: delivery.data().to_vec(),
        })?;
        match kind {
            RecordKind::Frame => counts.frames += 1,
            RecordKind::Result => counts.results += 1,
        }
        progress(counts);
    }
    // With --frames N, the results of the last frames are still on their way.
    if opts.results && opts.max_frames.is_some() {
        let grace = Instant::now() + Duration::from_millis(cfg.edge.frame_deadline_ms);
        while counts.results < counts.frames && Instant::now() < grace {
            let next = tokio::time::timeout(grace - Instant::now(), consumer.next()).await;
            let Ok(Some(Ok(d))) = next else { break };
            if d.exchange() != frames_exchange {
                writer.write(&CaptureRecord {
                    arrived_at_ms: crate::wire::now_ms(),
                    kind: RecordKind::Result,
                    event: d.data().to_vec(),
                })?;
                counts.results += 1;
                progress(counts);
            }
        }
    }
    writer.finish()?;
    consumer.close().await;
    broker.close().await;
    Ok(counts)
}

/// How long an export from the capture stream waits for its first delivery.
const FIRST_DELIVERY: Duration = Duration::from_secs(10);
/// A gap this long after the last delivery is the stream's tail.
const QUIET_GAP: Duration = Duration::from_secs(1);
/// How far before the asked start an export first enters the stream (by the broker's clock).
const FIRST_LOOK_BACK: Duration = Duration::from_secs(60);
/// Past this look-back, an export reads the stream from its first retained message.
const WHOLE_STREAM: Duration = Duration::from_secs(15 * 60);

/// Export the capture stream from `since_ms` on into a capture (no planned recording needed).
///
/// The stream is entered by the broker's clock (its chunks' timestamps), but frames are kept by
/// their producer's (`produced_at_ms`), and the two clocks may disagree. So the read starts a
/// minute early and skips older frames; when the first frame it sees is already inside the
/// window, the window's start may have been missed, and it starts over four times further
/// back, up to the whole retained stream. Each read stops once the stream has nothing newer
/// for a second (after up to ten for the first delivery).
pub async fn from_stream(
    cfg: &Config,
    since_ms: u64,
) -> Result<crate::tools::capture::Capture, RecordError> {
    let ns = &cfg.namespace;
    let broker = Broker::connect(
        &cfg.amqp_url,
        "vigil-record-stream",
        BrokerMetrics::new(&Registry::new()),
    )
    .await?;
    let topo = cfg.topology()?;
    broker.declare(&topo.shared(ns)).await?;
    broker.declare(&topo.streams(ns)).await?;
    let stream = cfg.names().capture_stream();
    let mut back = FIRST_LOOK_BACK;
    let records = loop {
        let whole = back > WHOLE_STREAM;
        let mut consumer = if whole {
            broker
                .consume_stream_first(&stream, "vigil-record-stream", 500)
                .await?
        } else {
            let from = since_ms.saturating_sub(back.as_millis() as u64);
            broker
                .consume_stream(&stream, "vigil-record-stream", from, 500)
                .await?
        };
        let (records, saw_before) = read_window(&mut consumer, since_ms).await;
        consumer.close().await;
        if saw_before || whole {
            break records;
        }
        back *= 4;
    };
    broker.close().await;
    Ok(crate::tools::capture::Capture {
        header: CaptureHeader {
            format_version: FORMAT_VERSION,
            namespace: ns.clone(),
            started_at_ms: since_ms,
            tool_version: env!("CARGO_PKG_VERSION").into(),
            results: false,
            source: "stream".into(),
        },
        records,
        truncated: false,
    })
}

/// Read a stream consumer to its tail, keeping the frames produced from `since_ms` on. Also
/// says whether a frame from before `since_ms` came first (then the window was entered in
/// time, and nothing in it was missed).
async fn read_window(
    consumer: &mut crate::broker::Consumer,
    since_ms: u64,
) -> (Vec<CaptureRecord>, bool) {
    let mut records = Vec::new();
    let mut saw_before = false;
    // A busy broker can take a while to start a stream consumer, so the first delivery gets
    // longer than the gaps after it; the read ends at the first quiet gap (the stream's tail).
    let mut wait = FIRST_DELIVERY;
    while let Ok(Some(Ok(d))) = tokio::time::timeout(wait, consumer.next()).await {
        wait = QUIET_GAP;
        let _ = d.ack().await;
        let Ok(env) = crate::wire::Envelope::decode(d.data()) else {
            continue;
        };
        if env.produced_at_ms < since_ms {
            // The stream keeps whole chunks: older frames come first, and are skipped.
            saw_before |= records.is_empty();
            continue;
        }
        records.push(CaptureRecord {
            arrived_at_ms: env.produced_at_ms,
            kind: RecordKind::Frame,
            event: d.data().to_vec(),
        });
    }
    (records, saw_before)
}

/// Write a capture read back (or exported) to a file.
pub fn write_capture(
    capture: &crate::tools::capture::Capture,
    out: &Path,
) -> Result<(), RecordError> {
    let mut w = CaptureWriter::new(
        std::fs::File::create(out).map_err(CaptureError::Io)?,
        &capture.header,
    )?;
    for r in &capture.records {
        w.write(r)?;
    }
    w.finish()?;
    Ok(())
}
