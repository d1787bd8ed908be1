//! The worker: competes for frames on the work queue, analyses each one, and publishes the
//! result to the reply exchange under the frame's edge routing key.
//!
//! Invariants: a frame is acked only after its reply is confirmed by the broker; malformed
//! events are dead-lettered, never retried; CPU-bound analysis runs on a bounded blocking pool.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt as _, StreamExt as _};
use prometheus::Registry;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::analyzer::{self, AnalyzeError, Analyzed, Analyzer, FrameInput};
use crate::broker::{Broker, BrokerError, Consumer, Delivery, Publisher};
use crate::config::Config;
use crate::metrics::{BrokerMetrics, WorkerMetrics};
use crate::telemetry::{self, Health};
use crate::topology;
use crate::wire::{
    self, DropReason, Dropped, EnrollOutcome, EnrollResult, Envelope, FrameResult,
    MAX_ENROLL_PHOTOS, Payload,
};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("the worker's main task panicked: {0}")]
    Panicked(String),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Topology(#[from] topology::TopologyError),
    #[error(transparent)]
    Management(#[from] crate::management::ManagementError),
    #[error("cannot start the analyzer: {0}")]
    Analyzer(String),
    #[error("the broker ended the work queue consumer")]
    ConsumerEnded,
    #[error("metrics endpoint: {0}")]
    Metrics(std::io::Error),
}

/// A running worker.
pub struct WorkerHandle {
    pub id: String,
    pub metrics_addr: SocketAddr,
    task: tokio::task::JoinHandle<Result<(), WorkerError>>,
}

impl WorkerHandle {
    /// Wait until the worker has stopped (after shutdown, or on a fatal error).
    pub async fn join(self) -> Result<(), WorkerError> {
        crate::telemetry::join_service(self.task, WorkerError::Panicked).await
    }
}

/// Start a worker: metrics endpoint, broker connection, topology, consumer. Returns once it is
/// consuming; it stops when `shutdown` is cancelled.
pub async fn start(
    cfg: Config,
    registry: Registry,
    shutdown: CancellationToken,
) -> Result<WorkerHandle, WorkerError> {
    // Models load off the runtime: it takes a while and blocks.
    let build = cfg.clone();
    let analyzer: Arc<dyn Analyzer> =
        tokio::task::spawn_blocking(move || analyzer::from_config(&build))
            .await
            .map_err(|e| WorkerError::Analyzer(e.to_string()))?
            .map_err(|e| WorkerError::Analyzer(e.to_string()))?
            .into();
    start_with(cfg, registry, shutdown, analyzer).await
}

/// [`start`] with an analyzer built by the caller.
pub async fn start_with(
    cfg: Config,
    registry: Registry,
    shutdown: CancellationToken,
    analyzer: Arc<dyn Analyzer>,
) -> Result<WorkerHandle, WorkerError> {
    let id = cfg.worker_id();
    let health = Health::new(&["broker", "topology", "models"]);
    // The analyzer is built (its models loaded) before the worker starts.
    health.set("models", true);
    let metrics_addr = telemetry::serve_metrics(
        cfg.metrics_listen,
        telemetry::HttpLimits::of(&cfg),
        registry.clone(),
        health.clone(),
        shutdown.clone(),
    )
    .await
    .map_err(WorkerError::Metrics)?;
    let broker_metrics = BrokerMetrics::new(&registry);
    let metrics = WorkerMetrics::new(&registry);
    let topo = cfg.topology()?;

    let broker = Broker::connect_with_retry(
        &cfg.amqp_url,
        &id,
        broker_metrics.clone(),
        Duration::from_millis(cfg.broker_connect_timeout_ms),
    )
    .await?;
    health.set("broker", true);
    let broker = link(broker, &cfg, &topo).await?;
    health.set("topology", true);

    let threads = cfg.worker.effective_analysis_threads();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads * cfg.inference.intra_threads > cores && cfg.worker.analyzer == "identity" {
        tracing::warn!(
            threads,
            intra_threads = cfg.inference.intra_threads,
            cores,
            "analysis threads x intra-op threads exceed the cores; runs will contend"
        );
    }
    let pool = Arc::new(Semaphore::new(threads));
    let batches = (cfg.worker.effective_batch_max() > 1 && analyzer.is_blocking()).then(|| {
        // Bounded like the deliveries that feed it: at most `prefetch` frames are unacked.
        let (tx, rx) = tokio::sync::mpsc::channel(usize::from(cfg.worker.prefetch));
        tokio::spawn(batcher(
            rx,
            analyzer.clone(),
            pool.clone(),
            metrics.batch_frames.clone(),
            BatchLimits {
                frames: cfg.worker.effective_batch_max(),
                pixels: cfg.inference.max_pixels,
                wait: Duration::from_millis(cfg.worker.batch_wait_ms),
            },
        ));
        tx
    });
    let ctx = Arc::new(Ctx {
        worker_id: id.clone(),
        replies_exchange: cfg.names().replies_exchange(),
        analyzer,
        pool,
        batches,
        metrics,
        seq: AtomicU64::new(0),
        max_pixels: cfg.inference.max_pixels,
        max_jpeg_scans: cfg.inference.max_jpeg_scans,
        trust: broker.trust(cfg.broker_roles, &cfg.namespace),
    });
    let work_queue = cfg.names().work_queue();
    let span = tracing::info_span!("worker", worker = %id);
    tracing::info!(parent: &span, analyzer = ctx.analyzer.name(), threads, prefetch = cfg.worker.prefetch, "worker consuming {work_queue}");
    let task = tokio::spawn(
        run_loop(
            cfg,
            broker,
            broker_metrics,
            ctx,
            work_queue,
            health,
            shutdown,
        )
        .instrument(span),
    );
    Ok(WorkerHandle {
        id,
        metrics_addr,
        task,
    })
}

/// Run until `shutdown`.
pub async fn run(
    cfg: Config,
    registry: Registry,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    start(cfg, registry, shutdown).await?.join().await
}

struct Ctx {
    worker_id: String,
    replies_exchange: String,
    analyzer: Arc<dyn Analyzer>,
    pool: Arc<Semaphore>,
    metrics: WorkerMetrics,
    seq: AtomicU64,
    /// Most pixels a frame may declare (`inference.max_pixels`), checked for every analyzer.
    max_pixels: u64,
    /// Most scans a frame may hold (`inference.max_jpeg_scans`).
    max_jpeg_scans: u32,
    /// Who may publish frames.
    trust: crate::roles::Trust,
    /// Where frames go to be analysed in batches (`worker.batch_max` above 1).
    batches: Option<tokio::sync::mpsc::Sender<BatchJob>>,
}

impl Ctx {
    /// This worker's answer to a client's event: same client and deadline, the trace carried on.
    fn reply(
        &self,
        client_id: &str,
        deadline_ms: u64,
        traceparent: &str,
        payload: Payload,
    ) -> Envelope {
        Envelope {
            schema: wire::SCHEMA,
            id: Uuid::now_v7(),
            source: self.worker_id.clone(),
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
            client_id: client_id.to_owned(),
            produced_at_ms: wire::now_ms(),
            deadline_ms,
            traceparent: wire::child_traceparent(traceparent),
            payload,
        }
    }
}

/// Consume until shutdown; when the broker connection is lost, reconnect with backoff and
/// declare the topology again. Unacked frames of a lost connection are redelivered by the
/// broker to whichever worker is connected.
async fn run_loop(
    cfg: Config,
    mut broker: Broker,
    broker_metrics: BrokerMetrics,
    ctx: Arc<Ctx>,
    work_queue: String,
    health: Health,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let topo = cfg.topology()?;
    loop {
        let outcome = consume(&cfg, &broker, &ctx, &work_queue, &shutdown).await;
        broker.close().await;
        if shutdown.is_cancelled() {
            tracing::info!("worker stopped");
            return outcome;
        }
        if let Err(e) = &outcome {
            tracing::warn!(error = %e, "lost the broker; reconnecting");
        }
        health.set("broker", false);
        health.set("topology", false);
        let (cfg_ref, topo_ref) = (&cfg, &topo);
        let fresh = crate::broker::relink(
            &cfg.amqp_url,
            &ctx.worker_id,
            &broker_metrics,
            &shutdown,
            |b| link(b, cfg_ref, topo_ref),
        )
        .await;
        let Some(fresh) = fresh else {
            return Ok(());
        };
        broker = fresh;
        health.set("broker", true);
        health.set("topology", true);
        tracing::info!("reconnected to the broker");
    }
}

/// What a worker needs of a connection, at start-up and after every reconnect alike: the shared
/// queues' policies (when this role puts them) and the shared topology.
async fn link(
    broker: Broker,
    cfg: &Config,
    topo: &topology::Topology,
) -> Result<Broker, WorkerError> {
    cfg.put_policies(&topo.shared(&cfg.namespace)).await?;
    broker
        .prepare(&topo.shared(&cfg.namespace), cfg.broker_roles)
        .await?;
    Ok(broker)
}

/// One connection's worth of consuming. Returns when shutdown is asked (after draining) or
/// when the connection fails.
async fn consume(
    cfg: &Config,
    broker: &Broker,
    ctx: &Arc<Ctx>,
    work_queue: &str,
    shutdown: &CancellationToken,
) -> Result<(), WorkerError> {
    let publisher = Arc::new(broker.publisher().await?);
    let mut consumer = broker
        .consume(work_queue, &ctx.worker_id, cfg.worker.prefetch, true)
        .await?;
    // Enrolment requests, one at a time, for a worker whose analyzer can enrol.
    let mut enroll = match ctx.analyzer.enroller() {
        Some(_) => {
            let queue = cfg.names().enroll_queue();
            let tag = format!("{}-enroll", ctx.worker_id);
            Some(broker.consume(&queue, &tag, 1, true).await?)
        }
        None => None,
    };
    let mut enrolling = FuturesUnordered::new();
    // At most `prefetch` deliveries are unacked, so this set and `acks` are bounded by the
    // broker.
    let mut inflight = FuturesUnordered::new();
    let mut acks = Acks::default();
    let result = loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            Some((tag, ack)) = inflight.next(), if !inflight.is_empty() => {
                acks.done(tag, ack);
                // Everything else that finished by now goes into the same ack.
                while let Some(Some((tag, ack))) = inflight.next().now_or_never() {
                    acks.done(tag, ack);
                }
                acks.flush(&consumer, &ctx.metrics).await;
            }
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    ctx.metrics.inflight.inc();
                    acks.received(delivery.tag());
                    inflight.push(handle(ctx.clone(), publisher.clone(), delivery));
                }
                Some(Err(e)) => break Err(e.into()),
                None => break Err(WorkerError::ConsumerEnded),
            },
            Some(()) = enrolling.next(), if !enrolling.is_empty() => {}
            next = async {
                match enroll.as_mut() {
                    Some(c) => c.next().await,
                    None => std::future::pending().await,
                }
            } => match next {
                Some(Ok(delivery)) => {
                    enrolling.push(enroll_one(ctx.clone(), publisher.clone(), delivery));
                }
                Some(Err(e)) => break Err(e.into()),
                None => break Err(WorkerError::ConsumerEnded),
            },
        }
    };
    // An enrolment in progress is finished (it is one request, bounded by the pool).
    while enrolling.next().await.is_some() {}
    if let Some(c) = enroll {
        c.close().await;
    }
    if shutdown.is_cancelled() {
        // Graceful stop: no new deliveries, finish and ack what we hold, then close. Whatever
        // is still unacked after the grace period goes back to the queue with the channel.
        let _ = consumer.cancel().await;
        let grace = Duration::from_millis(cfg.worker.shutdown_grace_ms);
        let drained = tokio::time::timeout(grace, async {
            while let Some((tag, ack)) = inflight.next().await {
                acks.done(tag, ack);
                acks.flush(&consumer, &ctx.metrics).await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                left = inflight.len(),
                "grace period over; unfinished frames go back to the queue"
            );
        }
    }
    consumer.close().await;
    publisher.close().await;
    result
}

/// Process one delivery to its end. Requeues and dead-letters are settled here; a frame whose
/// reply is confirmed comes back marked for the (coalesced) ack.
async fn handle(ctx: Arc<Ctx>, publisher: Arc<Publisher>, delivery: Delivery) -> (u64, bool) {
    ctx.metrics.frames_consumed.inc();
    if delivery.redelivered() {
        ctx.metrics.redelivered.inc();
    }
    let ack = process(&ctx, &publisher, &delivery).await;
    ctx.metrics.inflight.dec();
    (delivery.tag(), ack)
}

/// True when the frame is answered and confirmed and wants its ack; false when it is settled
/// already (dead-lettered or requeued).
async fn process(ctx: &Ctx, publisher: &Publisher, delivery: &Delivery) -> bool {
    // Before any decoding: only an edge (or an admin's tool) may hand a worker a frame, and
    // the frame's `source` decides where the answer goes.
    if !ctx
        .trust
        .admits(crate::roles::Kind::Frame, delivery.user_id())
    {
        dead_letter(ctx, delivery, "untrusted").await;
        return false;
    }
    let env = match Envelope::decode_shared(delivery.body()) {
        Ok(env) => env,
        Err(e) => {
            ctx.metrics
                .decode_errors
                .with_label_values(&["envelope"])
                .inc();
            tracing::warn!(error = %e, bytes = delivery.data().len(), "malformed event, dead-lettering");
            dead_letter(ctx, delivery, "malformed").await;
            return false;
        }
    };
    // An edge's frame is answered to that edge: an edge may not send frames in another's name.
    if !ctx
        .trust
        .admits_for(crate::roles::Kind::Frame, delivery.user_id(), &env.source)
    {
        dead_letter(ctx, delivery, "untrusted").await;
        return false;
    }
    let Payload::Frame(frame) = env.payload else {
        tracing::warn!(
            kind = env.payload.kind(),
            "unexpected event on the work queue, dead-lettering"
        );
        dead_letter(ctx, delivery, "unexpected_payload").await;
        return false;
    };
    let span = tracing::debug_span!(
        "frame",
        trace_id = wire::trace_id(&env.traceparent).unwrap_or(""),
        client = %env.client_id,
        seq = frame.seq,
    );
    crate::telemetry::continue_trace(&span, &env.traceparent);
    async {
        let reply = |payload| ctx.reply(&env.client_id, env.deadline_ms, &env.traceparent, payload);
        let dropped = |reason, detail: String| {
            Payload::Dropped(Dropped {
                session: frame.session,
                seq: frame.seq,
                frame_id: env.id,
                reason,
                detail,
            })
        };
        let routing_key = crate::topology::Names::reply_key(&env.source, &env.client_id);

        if wire::now_ms() > env.deadline_ms {
            ctx.metrics.frames_expired.inc();
            let out = reply(dropped(
                DropReason::Expired,
                "deadline passed in the queue".into(),
            ));
            return settle(
                publisher,
                &ctx.replies_exchange,
                &routing_key,
                &out,
                delivery,
                Settle::Ack,
            )
            .await;
        }

        let started = Instant::now();
        let reference = frame
            .reference
            .as_ref()
            .and_then(|bytes| wire::unpack_embedding(bytes));
        // A frame is checked, not trusted: anyone who can publish to the exchange can send one
        // whose header declares gigabytes of pixels. It is refused before any analyzer runs.
        // The whole file is walked, without decoding, before any analyzer sees it: too many
        // scans, a cut-off file and scan data too short for the declared size are refused.
        let mut jpeg_problem = "jpeg";
        let outcome = match wire::jpeg::survey(&frame.jpeg, ctx.max_jpeg_scans) {
            Err(e) => {
                jpeg_problem = e.kind();
                Err(AnalyzeError::BadJpeg(e.to_string()))
            }
            Ok(s) if s.info.pixels() > ctx.max_pixels => {
                jpeg_problem = "too_large";
                Err(AnalyzeError::BadJpeg(format!(
                    "{}x{} = {} pixels is over the {}-pixel limit",
                    s.info.width,
                    s.info.height,
                    s.info.pixels(),
                    ctx.max_pixels
                )))
            }
            Ok(s) => {
                analyze(
                    ctx,
                    &env.client_id,
                    s.info.pixels(),
                    frame.jpeg,
                    reference,
                    frame.phone_check,
                    // A track from the broker is checked: one that is not a box is no track.
                    frame.track.filter(crate::wire::Track::is_valid),
                )
                .await
            }
        };
        let (out, how) = match outcome {
            Ok(Analyzed { analysis, stages }) => {
                if stages.is_empty() {
                    ctx.metrics
                        .inference_seconds
                        .with_label_values(&[ctx.analyzer.name()])
                        .observe(started.elapsed().as_secs_f64());
                }
                for (stage, seconds) in stages {
                    ctx.metrics
                        .inference_seconds
                        .with_label_values(&[stage])
                        .observe(seconds);
                }
                ctx.metrics.frames_analyzed.inc();
                let out = reply(Payload::Result(FrameResult {
                    session: frame.session,
                    seq: frame.seq,
                    frame_id: env.id,
                    analyzer: ctx.analyzer.name().to_owned(),
                    analyze_us: started.elapsed().as_micros() as u64,
                    analysis,
                }));
                (out, Settle::Ack)
            }
            Err(AnalyzeError::BadJpeg(detail)) => {
                // Tell the client, and keep the frame in the dead letters for inspection.
                ctx.metrics
                    .decode_errors
                    .with_label_values(&[jpeg_problem])
                    .inc();
                ctx.metrics
                    .dead_lettered
                    .with_label_values(&["bad_jpeg"])
                    .inc();
                (
                    reply(dropped(DropReason::NotJpeg, detail)),
                    Settle::DeadLetter,
                )
            }
            Err(AnalyzeError::Internal(detail)) if !delivery.redelivered() => {
                tracing::warn!(%detail, "analysis failed; requeueing once");
                let _ = delivery.requeue().await;
                return false;
            }
            Err(AnalyzeError::Internal(detail)) => {
                tracing::error!(%detail, "analysis failed twice; dead-lettering");
                ctx.metrics
                    .dead_lettered
                    .with_label_values(&["analyzer_failed"])
                    .inc();
                let out = reply(dropped(DropReason::AnalyzerFailed, detail));
                (out, Settle::DeadLetter)
            }
        };
        settle(
            publisher,
            &ctx.replies_exchange,
            &routing_key,
            &out,
            delivery,
            how,
        )
        .await
    }
    .instrument(span)
    .await
}

/// Run the analyzer, off the runtime when it does real work, on at most `pool` threads.
/// `pixels` is what the JPEG declares, as the survey before found it.
async fn analyze(
    ctx: &Ctx,
    client_id: &str,
    pixels: u64,
    jpeg: bytes::Bytes,
    reference: Option<Vec<f32>>,
    phone_check: bool,
    track: Option<crate::wire::Track>,
) -> Result<Analyzed, AnalyzeError> {
    if !ctx.analyzer.is_blocking() {
        return ctx.analyzer.analyze(&FrameInput {
            client_id,
            jpeg: &jpeg,
            reference: reference.as_deref(),
            phone_check,
            track: track.as_ref(),
        });
    }
    if let Some(batches) = &ctx.batches {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job = BatchJob {
            client_id: client_id.to_owned(),
            pixels,
            jpeg,
            reference,
            phone_check,
            track,
            answer,
        };
        // The channel holds as many frames as may be unacked, so this does not wait; it fails
        // at once if the batcher is gone.
        if batches.send(job).await.is_err() {
            return Err(AnalyzeError::Internal("the batcher has stopped".into()));
        }
        return answered
            .await
            .unwrap_or_else(|_| Err(AnalyzeError::Internal("analysis panicked".into())));
    }
    let _permit = ctx
        .pool
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| AnalyzeError::Internal("analysis pool closed".into()))?;
    let analyzer = ctx.analyzer.clone();
    let client_id = client_id.to_owned();
    tokio::task::spawn_blocking(move || {
        analyzer.analyze(&FrameInput {
            client_id: &client_id,
            jpeg: &jpeg,
            reference: reference.as_deref(),
            phone_check,
            track: track.as_ref(),
        })
    })
    .await
    .unwrap_or_else(|e| Err(AnalyzeError::Internal(format!("analysis panicked: {e}"))))
}

/// A frame waiting for a batch, and where its analysis goes.
struct BatchJob {
    client_id: String,
    /// The pixels the JPEG declares (checked within `inference.max_pixels`).
    pixels: u64,
    jpeg: bytes::Bytes,
    reference: Option<Vec<f32>>,
    phone_check: bool,
    track: Option<crate::wire::Track>,
    answer: tokio::sync::oneshot::Sender<Result<Analyzed, AnalyzeError>>,
}

/// How much one batch may hold.
#[derive(Debug, Clone, Copy)]
struct BatchLimits {
    /// `worker.batch_max`.
    frames: usize,
    /// Decoded pixels, as the frames declare them (`inference.max_pixels`, one largest frame's
    /// worth): a batch of large frames holds fewer of them. A batch always takes one frame.
    pixels: u64,
    /// `worker.batch_wait_ms`: how long after its first frame a batch waits for more.
    wait: Duration,
}

/// Take frames in batches: once an analysis thread is free, the frames waiting then, and more
/// that arrive within `wait` of the first, up to the limits, are analysed together on it. What
/// waits is shared out over the threads free at that moment, so that one thread does not take a
/// backlog that others could share. Ends when every sender is gone.
async fn batcher(
    mut jobs: tokio::sync::mpsc::Receiver<BatchJob>,
    analyzer: Arc<dyn Analyzer>,
    pool: Arc<Semaphore>,
    sizes: prometheus::Histogram,
    limits: BatchLimits,
) {
    // A frame that did not fit the last batch starts the next.
    let mut carry: Option<BatchJob> = None;
    loop {
        let first = match carry.take() {
            Some(job) => job,
            None => match jobs.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        let until = tokio::time::Instant::now() + limits.wait;
        // Frames keep arriving while every thread is busy; they join this batch.
        let Ok(permit) = pool.clone().acquire_owned().await else {
            return;
        };
        // This thread's share of what waits now, among the threads free now.
        let share = (1 + jobs.len()).div_ceil(1 + pool.available_permits());
        let most = share.clamp(1, limits.frames.max(1));
        let mut held = first.pixels;
        let mut batch = vec![first];
        while batch.len() < most {
            match tokio::time::timeout_at(until, jobs.recv()).await {
                Ok(Some(job)) => {
                    let p = job.pixels;
                    if held.saturating_add(p) > limits.pixels {
                        carry = Some(job);
                        break;
                    }
                    held += p;
                    batch.push(job);
                }
                Ok(None) | Err(_) => break,
            }
        }
        run_batch(&analyzer, permit, &sizes, batch);
    }
}

/// Analyse `batch` on the analysis thread `permit` stands for, and answer each frame. A panic
/// fails the batch's frames with its message (each is requeued once, as a failed analysis is).
fn run_batch(
    analyzer: &Arc<dyn Analyzer>,
    permit: tokio::sync::OwnedSemaphorePermit,
    sizes: &prometheus::Histogram,
    batch: Vec<BatchJob>,
) {
    // A frame whose handler is gone (its broker channel lost, a shutdown) is not analysed: the
    // broker delivers it again.
    let batch: Vec<BatchJob> = batch
        .into_iter()
        .filter(|j| !j.answer.is_closed())
        .collect();
    if batch.is_empty() {
        return;
    }
    sizes.observe(batch.len() as f64);
    let analyzer = analyzer.clone();
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let frames: Vec<FrameInput<'_>> = batch
            .iter()
            .map(|j| FrameInput {
                client_id: &j.client_id,
                jpeg: &j.jpeg,
                reference: j.reference.as_deref(),
                phone_check: j.phone_check,
                track: j.track.as_ref(),
            })
            .collect();
        let results = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            analyzer.analyze_batch(&frames)
        }));
        drop(frames);
        match results {
            Ok(results) => {
                for (job, result) in batch.into_iter().zip(results) {
                    // A handler that went away no longer needs its answer.
                    let _ = job.answer.send(result);
                }
            }
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(frames = batch.len(), %message, "a batch's analysis panicked");
                for job in batch {
                    let _ = job.answer.send(Err(AnalyzeError::Internal(format!(
                        "analysis panicked: {message}"
                    ))));
                }
            }
        }
    });
}

enum Settle {
    Ack,
    DeadLetter,
}

/// Publish the reply and wait for its confirm. Then a dead-letter is settled here, and an ack
/// is asked of the caller (true). If the reply cannot be confirmed, the frame is requeued so
/// another attempt answers it.
async fn settle(
    publisher: &Publisher,
    exchange: &str,
    routing_key: &str,
    reply: &Envelope,
    delivery: &Delivery,
    settle: Settle,
) -> bool {
    let confirmed = match publisher.publish(exchange, routing_key, reply).await {
        Ok(confirm) => confirm.wait().await,
        Err(e) => Err(e),
    };
    let outcome = match (confirmed, settle) {
        (Ok(()), Settle::Ack) => return true,
        (Ok(()), Settle::DeadLetter) => delivery.dead_letter().await,
        (Err(e), _) => {
            tracing::warn!(error = %e, "reply not confirmed; requeueing the frame");
            delivery.requeue().await
        }
    };
    if let Err(e) = outcome {
        // The channel is gone; the broker requeues the frame itself.
        tracing::debug!(error = %e, "could not settle delivery");
    }
    false
}

/// Acks, coalesced. Deliveries are tracked by tag from arrival; once every delivery up to some
/// tag is settled, one `basic.ack` with `multiple` covers the confirmed ones among them. An ack
/// never covers a frame whose reply is not confirmed yet, so "ack after confirm" holds.
#[derive(Default)]
struct Acks {
    /// Tag → `None` while in flight, `Some(true)` confirmed and waiting for the ack,
    /// `Some(false)` settled otherwise (dead-lettered or requeued).
    tags: std::collections::BTreeMap<u64, Option<bool>>,
}

impl Acks {
    fn received(&mut self, tag: u64) {
        self.tags.insert(tag, None);
    }

    fn done(&mut self, tag: u64, ack: bool) {
        self.tags.insert(tag, Some(ack));
    }

    /// Ack everything that can be acked now, in one frame.
    async fn flush(&mut self, consumer: &Consumer, metrics: &crate::metrics::WorkerMetrics) {
        let mut last = None;
        while let Some(entry) = self.tags.first_entry() {
            let Some(ack) = *entry.get() else { break };
            let (tag, _) = entry.remove_entry();
            if ack {
                last = Some(tag);
            }
        }
        if let Some(tag) = last {
            metrics.acks.inc();
            if let Err(e) = consumer.ack_up_to(tag).await {
                // The channel is gone; the broker requeues the frames itself.
                tracing::debug!(error = %e, "could not ack");
            }
        }
    }
}

/// Enrol from one request's photos with the model stack, answer the edge that asked, then
/// settle the request (ack once the answer is confirmed; requeue once if it is not).
async fn enroll_one(ctx: Arc<Ctx>, publisher: Arc<Publisher>, delivery: Delivery) {
    if !ctx
        .trust
        .admits(crate::roles::Kind::Enroll, delivery.user_id())
    {
        dead_letter(&ctx, &delivery, "untrusted").await;
        return;
    }
    let Ok(env) = Envelope::decode_shared(delivery.body()) else {
        dead_letter(&ctx, &delivery, "malformed").await;
        return;
    };
    let Payload::EnrollRequest(request) = &env.payload else {
        dead_letter(&ctx, &delivery, "unexpected_payload").await;
        return;
    };
    if wire::now_ms() > env.deadline_ms {
        // Nobody waits for it any more.
        ctx.metrics.frames_expired.inc();
        let _ = delivery.ack().await;
        return;
    }
    // Photos are checked like frames before any model sees them.
    let mut refused = None;
    if request.photos.is_empty() || request.photos.len() > MAX_ENROLL_PHOTOS {
        refused = Some(format!(
            "send 1 to {MAX_ENROLL_PHOTOS} photos, not {}",
            request.photos.len()
        ));
    }
    for (i, photo) in request.photos.iter().enumerate() {
        match wire::jpeg::survey(photo, ctx.max_jpeg_scans) {
            Err(e) => refused = refused.or(Some(format!("photo {}: {e}", i + 1))),
            Ok(s) if s.info.pixels() > ctx.max_pixels => {
                refused = refused.or(Some(format!(
                    "photo {}: {} pixels is over the {}-pixel limit",
                    i + 1,
                    s.info.pixels(),
                    ctx.max_pixels
                )));
            }
            Ok(_) => {}
        }
    }
    let outcome = match refused {
        Some(reason) => EnrollOutcome::Refused { reason },
        None => {
            let photos: Vec<Vec<u8>> = request.photos.iter().map(|p| p.to_vec()).collect();
            let permit = ctx.pool.clone().acquire_owned().await;
            let c = ctx.clone();
            let run = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                let stack = c
                    .analyzer
                    .enroller()
                    .expect("only enrollers consume requests");
                match stack.enroll_many(&photos) {
                    Ok(e) => EnrollOutcome::Enrolled {
                        embedding: serde_bytes::ByteBuf::from(wire::pack_embedding(&e.embedding)),
                        model: stack.recognition_model().to_owned(),
                        similarities: e.similarities,
                        margin: e.margin,
                    },
                    Err(e) => EnrollOutcome::Refused {
                        reason: e.to_string(),
                    },
                }
            });
            match run.await {
                Ok(outcome) => outcome,
                Err(e) => EnrollOutcome::Refused {
                    reason: format!("the enrolment failed: {e}"),
                },
            }
        }
    };
    let reply = ctx.reply(
        &env.client_id,
        env.deadline_ms,
        &env.traceparent,
        Payload::EnrollResult(EnrollResult {
            request_id: env.id,
            outcome,
        }),
    );
    let routing_key = crate::topology::Names::reply_key(&env.source, &env.client_id);
    let confirmed = match publisher
        .publish(&ctx.replies_exchange, &routing_key, &reply)
        .await
    {
        Ok(confirm) => confirm.wait().await,
        Err(e) => Err(e),
    };
    let settled = match confirmed {
        Ok(()) => delivery.ack().await,
        Err(e) => {
            tracing::warn!(error = %e, "enrolment answer not confirmed; requeueing the request");
            delivery.requeue().await
        }
    };
    if let Err(e) = settled {
        tracing::debug!(error = %e, "could not settle an enrolment request");
    }
}

async fn dead_letter(ctx: &Ctx, delivery: &Delivery, reason: &str) {
    ctx.metrics.dead_lettered.with_label_values(&[reason]).inc();
    if let Err(e) = delivery.dead_letter().await {
        tracing::debug!(error = %e, "could not dead-letter delivery");
    }
}
