//! `vigil bench cost`: what a candidate costs. Real footage of N candidates at 5 fps streams
//! through the live pipeline (an edge, one `identity` worker per core, RabbitMQ), once as the
//! full stack on every frame (`phone_every = 1`) and once as configured (the phone detector on
//! its cadence, [`crate::cadence`]), alternating in one run. Each side reports the process's
//! CPU-seconds per candidate-hour, candidates per core at the frame rate, each model's time per
//! frame, the verdict latency, and how long a swap of person took to lock the screen.
//!
//! The CPU and the latency are measured on steady candidates; the swap (client 0 hands the
//! camera to the next clip's person) comes after, within the same round, and is timed alone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use prometheus::Registry;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::directory::{ClientStore, FolderStore};
use crate::domain::Action;
use crate::edge::client::{Connection, Incoming};
use crate::wire::client::{Encoding, ServerMsg};
use crate::{edge, worker};

/// Parameters of `vigil bench cost`.
#[derive(Debug, Clone)]
pub struct CostBench {
    /// Base configuration (broker URL, models, thresholds); the bench overrides the namespace,
    /// addresses, the directory, challenges and the phone cadence.
    pub base: Config,
    pub clients: usize,
    pub fps: f64,
    /// Folders of a clip's frames (JPEG, in name order); client `i` streams clip `i % n`, in a
    /// loop, enrolled from its first frame.
    pub clips: Vec<PathBuf>,
    pub warmup: Duration,
    pub duration: Duration,
    pub rounds: usize,
    /// Workers (one analysis thread each); the machine's cores by default.
    pub workers: usize,
}

/// One side of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// Every model on every frame.
    Full,
    /// As configured: the phone detector on its cadence, and track reuse (the recogniser and
    /// the liveness models on a steady candidate's full frames only).
    Cadence,
}

impl Side {
    fn as_str(self) -> &'static str {
        match self {
            Side::Full => "full",
            Side::Cadence => "cadence",
        }
    }
}

/// One side's figures, pooled over its rounds.
#[derive(Debug, Clone, Serialize)]
pub struct SideReport {
    pub side: Side,
    pub phone_every: u32,
    /// `VIGIL_EDGE_RECHECK_MS` on this side (0: track reuse off).
    pub recheck_ms: u64,
    pub frames: u64,
    pub dropped: u64,
    pub seconds: f64,
    /// The whole process (edge, workers, simulated clients): CPU per answered frame, in ms.
    pub cpu_ms_per_frame: f64,
    /// ...and CPU-seconds per candidate-hour at the frame rate.
    pub cpu_s_per_candidate_hour: f64,
    /// Candidates one core serves at the frame rate, from the process's CPU.
    pub candidates_per_core: f64,
    /// Inference (every model and the preprocessing) per answered frame, in ms.
    pub inference_ms_per_frame: f64,
    /// Each stage's ms per answered frame.
    pub stages_ms_per_frame: BTreeMap<String, f64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// From the first frame of another person to the `lock_screen` for `wrong_person`, one per
    /// round (none when the swap was not caught within the round).
    pub swap_caught_s: Vec<Option<f64>>,
    /// Sessions that ended before their round did (a sign-out that ends it, a lost socket).
    pub ended_early: u64,
    /// `VIGIL_WORKER_BATCH_MAX`.
    pub batch_max: usize,
    /// Frames per batch the workers analysed, when they batched (`batch_max` above 1).
    pub frames_per_batch: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CostReport {
    pub clients: usize,
    pub fps: f64,
    pub workers: usize,
    pub clips: Vec<String>,
    pub rounds: usize,
    pub sides: Vec<SideReport>,
    /// Cadence CPU per answered frame over full CPU per answered frame (the process's).
    pub cpu_ratio: f64,
}

impl CostReport {
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = format!(
            "{} candidates at {} fps, {} worker(s), {} round(s), clips: {}\n",
            self.clients,
            self.fps,
            self.workers,
            self.rounds,
            self.clips.join(", ")
        );
        for s in &self.sides {
            let _ = writeln!(
                out,
                "{:<8} phone every {}, recheck {} ms: {} frames answered in {:.0} s ({} dropped, {} sessions \
                 ended early); CPU {:.1} ms/frame, {:.0} s per candidate-hour, {:.2} candidates \
                 per core; inference {:.1} ms/frame ({}); latency p50 {:.0} ms, p99 {:.0} ms; \
                 swap caught in {}",
                s.side.as_str(),
                s.phone_every,
                s.recheck_ms,
                s.frames,
                s.seconds,
                s.dropped,
                s.ended_early,
                s.cpu_ms_per_frame,
                s.cpu_s_per_candidate_hour,
                s.candidates_per_core,
                s.inference_ms_per_frame,
                s.stages_ms_per_frame
                    .iter()
                    .map(|(k, v)| format!("{k} {v:.1}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                s.p50_ms,
                s.p99_ms,
                s.swap_caught_s
                    .iter()
                    .map(|c| c.map_or_else(|| "not caught".to_owned(), |s| format!("{s:.1} s")))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            if let Some(n) = s.frames_per_batch {
                let _ = writeln!(
                    out,
                    "         batches of up to {}: {n:.2} frames per batch",
                    s.batch_max
                );
            }
        }
        let _ = writeln!(
            out,
            "cadence / full CPU per answered frame: {:.2}",
            self.cpu_ratio
        );
        if self
            .sides
            .iter()
            .any(|s| s.dropped > 0 || s.ended_early > 0)
        {
            out.push_str(
                "note: frames were dropped or sessions ended early: the machine could not keep \
                 up, and the sides may not have carried the same load\n",
            );
        }
        if self
            .sides
            .iter()
            .all(|s| s.phone_every == 1 && s.recheck_ms == 0)
        {
            out.push_str(
                "note: VIGIL_EDGE_PHONE_EVERY is 1 and VIGIL_EDGE_RECHECK_MS 0: both sides are \
                 the full stack\n",
            );
        }
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CostError {
    #[error("bench cost: {0}")]
    Setup(String),
}

fn setup<E: std::fmt::Display>(e: E) -> CostError {
    CostError::Setup(e.to_string())
}

/// A clip's frames, in name order.
fn clip_frames(dir: &Path) -> Result<Vec<Vec<u8>>, CostError> {
    let files = crate::tools::eval::jpegs(dir).map_err(setup)?;
    if files.len() < 2 {
        return Err(setup(format!(
            "{} holds fewer than 2 frames",
            dir.display()
        )));
    }
    files
        .iter()
        .map(|p| std::fs::read(p).map_err(|e| setup(format!("{}: {e}", p.display()))))
        .collect()
}

/// What one round of one side measured.
struct Sample {
    frames: u64,
    dropped: u64,
    seconds: f64,
    cpu: f64,
    hist: Histogram<u64>,
    /// Seconds and count of each inference stage.
    stages: BTreeMap<String, (f64, u64)>,
    /// Frames and batches the workers analysed ([`crate::config::WorkerConfig::batch_max`]).
    batches: (f64, u64),
    swap: Option<f64>,
    ended_early: u64,
}

pub async fn run(b: &CostBench) -> Result<CostReport, CostError> {
    if b.clips.len() < 2 {
        return Err(setup(
            "give at least two clips (two people): the swap needs another person",
        ));
    }
    if b.clients == 0 || !(b.fps.is_finite() && b.fps > 0.0 && b.fps <= 100.0) {
        return Err(setup("--clients must be above 0 and --fps within (0, 100]"));
    }
    let clips: Vec<Arc<Vec<Vec<u8>>>> = b
        .clips
        .iter()
        .map(|c| clip_frames(c).map(Arc::new))
        .collect::<Result<_, _>>()?;
    // Each client is enrolled once, from its clip's first frame; every round and side gets
    // fresh ids with that reference, so that no policy state carries over.
    let clients_dir =
        std::env::temp_dir().join(format!("vigil-cost-{:08x}", rand::random::<u32>()));
    let store = FolderStore::open(&clients_dir).map_err(setup)?;
    let token = "cost-bench-token-0000";
    // The folder holds token hashes and reference embeddings: it goes however the run ends.
    let _remove = RemoveOnDrop(clients_dir.clone());
    let mut references = Vec::new();
    for (i, clip) in b.clips.iter().enumerate() {
        let first = clip_first_file(clip)?;
        let id = format!("reference-{i}");
        store
            .put(&crate::directory::ClientRecord::new(&id, "", token).map_err(setup)?)
            .map_err(setup)?;
        let record = {
            let cfg = Config {
                clients_dir: clients_dir.clone(),
                ..b.base.clone()
            };
            let store: &dyn ClientStore = &store;
            crate::tools::cli::enroll(&cfg, store, &id, &first).map_err(setup)?
        };
        references.push(record);
    }
    let phone_every = b.base.edge.phone_every.max(1);
    let recheck_ms = b.base.edge.recheck_ms;
    let mut samples: BTreeMap<&'static str, Vec<Sample>> = BTreeMap::new();
    for round in 0..b.rounds.max(1) {
        // Alternate which side goes first.
        let order = if round % 2 == 0 {
            [Side::Full, Side::Cadence]
        } else {
            [Side::Cadence, Side::Full]
        };
        for side in order {
            let (every, recheck) = match side {
                Side::Full => (1, 0),
                Side::Cadence => (phone_every, recheck_ms),
            };
            let ids: Vec<String> = (0..b.clients)
                .map(|i| format!("cost-{round}-{}-{i}", side.as_str()))
                .collect();
            for (i, id) in ids.iter().enumerate() {
                let mut record = references[i % references.len()].clone();
                record.id = id.clone();
                store.put(&record).map_err(setup)?;
            }
            let sample = side_round(b, &clients_dir, &ids, token, &clips, every, recheck).await?;
            samples.entry(side.as_str()).or_default().push(sample);
        }
    }
    let sides: Vec<SideReport> = [Side::Full, Side::Cadence]
        .into_iter()
        .map(|side| {
            let (every, recheck) = match side {
                Side::Full => (1, 0),
                Side::Cadence => (phone_every, recheck_ms),
            };
            pool(side, every, recheck, &samples[side.as_str()], b)
        })
        .collect();
    Ok(CostReport {
        clients: b.clients,
        fps: b.fps,
        workers: b.workers,
        clips: b
            .clips
            .iter()
            .map(|c| {
                c.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect(),
        rounds: b.rounds.max(1),
        cpu_ratio: sides[1].cpu_ms_per_frame / sides[0].cpu_ms_per_frame.max(f64::MIN_POSITIVE),
        sides,
    })
}

fn clip_first_file(dir: &Path) -> Result<PathBuf, CostError> {
    crate::tools::eval::jpegs(dir)
        .map_err(setup)?
        .into_iter()
        .next()
        .ok_or_else(|| setup(format!("{} holds no .jpg", dir.display())))
}

fn pool(side: Side, every: u32, recheck_ms: u64, samples: &[Sample], b: &CostBench) -> SideReport {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let (mut frames, mut dropped, mut seconds, mut cpu, mut ended) = (0, 0, 0.0, 0.0, 0);
    let mut stages: BTreeMap<String, (f64, u64)> = BTreeMap::new();
    let (mut batched, mut batches) = (0.0, 0);
    for s in samples {
        batched += s.batches.0;
        batches += s.batches.1;
        let _ = hist.add(&s.hist);
        frames += s.frames;
        dropped += s.dropped;
        seconds += s.seconds;
        cpu += s.cpu;
        ended += s.ended_early;
        for (k, (sum, n)) in &s.stages {
            let e = stages.entry(k.clone()).or_default();
            e.0 += sum;
            e.1 += n;
        }
    }
    let candidate_seconds = seconds * b.clients as f64;
    let cpu_per_candidate_second = cpu / candidate_seconds.max(f64::MIN_POSITIVE);
    let answered = frames.max(1) as f64;
    let stages_ms: BTreeMap<String, f64> = stages
        .iter()
        .map(|(k, (sum, _))| (k.clone(), sum * 1e3 / answered))
        .collect();
    SideReport {
        side,
        phone_every: every,
        recheck_ms,
        frames,
        dropped,
        seconds,
        cpu_ms_per_frame: cpu * 1e3 / answered,
        cpu_s_per_candidate_hour: cpu_per_candidate_second * 3600.0,
        candidates_per_core: 1.0 / cpu_per_candidate_second.max(f64::MIN_POSITIVE),
        inference_ms_per_frame: stages_ms.values().sum(),
        stages_ms_per_frame: stages_ms,
        p50_ms: hist.value_at_quantile(0.5) as f64 / 1e3,
        p99_ms: hist.value_at_quantile(0.99) as f64 / 1e3,
        swap_caught_s: samples.iter().map(|s| s.swap).collect(),
        ended_early: ended,
        batch_max: b.base.worker.effective_batch_max(),
        frames_per_batch: (batches > 0).then(|| batched / batches as f64),
    }
}

/// Removes a folder when dropped, however its owner ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The longest any one step of a round may take (a connection, a send, a service's stop).
const STEP_LIMIT: Duration = Duration::from_secs(30);
/// How long a round waits, after its measured part, for a swap of person to be locked; one
/// that is not is reported as not caught.
const SWAP_WAIT: Duration = Duration::from_secs(10);

/// One side for one round: a fresh namespace, `b.workers` workers and an edge; every client
/// streams its clip at `b.fps`; after the measured time client 0 turns into the next clip's
/// person. The services stop and the namespace goes however the round ends.
async fn side_round(
    b: &CostBench,
    clients_dir: &Path,
    ids: &[String],
    token: &str,
    clips: &[Arc<Vec<Vec<u8>>>],
    phone_every: u32,
    recheck_ms: u64,
) -> Result<Sample, CostError> {
    let namespace = format!("cost-{:08x}", rand::random::<u32>());
    let mut cfg = Config {
        namespace: namespace.clone(),
        metrics_listen: "127.0.0.1:0".parse().expect("addr"),
        clients_dir: clients_dir.to_owned(),
        directory_url: None,
        capture_stream: false,
        ..b.base.clone()
    };
    cfg.edge.id = None;
    cfg.edge.listen = "127.0.0.1:0".parse().expect("addr");
    cfg.edge.admin_listen = None;
    cfg.edge.phone_every = phone_every;
    cfg.edge.recheck_ms = recheck_ms;
    cfg.edge.max_frame_bytes = cfg.edge.max_frame_bytes.max(4 << 20);
    // Cost only: no challenge asks these recordings to turn their heads, and a sign-out does
    // not end a session (every candidate streams the whole round).
    cfg.challenge.on_start = false;
    cfg.challenge.every_ms = 0;
    cfg.policy.sign_out_ends_session = false;
    cfg.worker.id = None;
    cfg.worker.analyzer = "identity".into();
    cfg.worker.analysis_threads = 1;
    cfg.inference.intra_threads = 1;

    let shutdown = CancellationToken::new();
    let registries: Vec<Registry> = (0..b.workers.max(1)).map(|_| Registry::new()).collect();
    let mut workers = Vec::new();
    let mut edge = None;
    let started = async {
        for r in &registries {
            workers.push(
                worker::start(cfg.clone(), r.clone(), shutdown.clone())
                    .await
                    .map_err(setup)?,
            );
        }
        let e = edge::start(cfg.clone(), Registry::new(), shutdown.clone())
            .await
            .map_err(setup)?;
        let url = e.url();
        edge = Some(e);
        Ok::<_, CostError>(url)
    }
    .await;
    let measured = match started {
        Ok(url) => measure(b, &url, ids, token, clips, &registries).await,
        Err(e) => Err(e),
    };
    shutdown.cancel();
    if let Some(e) = edge {
        let _ = tokio::time::timeout(STEP_LIMIT, e.join()).await;
    }
    for w in workers {
        let _ = tokio::time::timeout(STEP_LIMIT, w.join()).await;
    }
    let cleanup = async {
        let broker = crate::broker::Broker::connect(
            &cfg.amqp_url,
            "cost-cleanup",
            crate::metrics::BrokerMetrics::new(&Registry::new()),
        )
        .await
        .ok()?;
        if let Ok(topo) = cfg.topology() {
            let _ = broker.delete(&topo.shared(&namespace)).await;
        }
        broker.close().await;
        Some(())
    };
    let _ = tokio::time::timeout(STEP_LIMIT, cleanup).await;
    measured
}

/// Stream the clients through the edge at `url` and measure.
async fn measure(
    b: &CostBench,
    url: &str,
    ids: &[String],
    token: &str,
    clips: &[Arc<Vec<Vec<u8>>>],
    registries: &[Registry],
) -> Result<Sample, CostError> {
    let measuring = Arc::new(AtomicBool::new(false));
    let swap = Arc::new(AtomicBool::new(false));
    let swap_caught = Arc::new(tokio::sync::Notify::new());
    let stop = CancellationToken::new();
    let period = Duration::from_secs_f64(1.0 / b.fps);
    let mut tasks = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let (mut conn, _) = tokio::time::timeout(
            STEP_LIMIT,
            Connection::connect(url, id, token, Encoding::MsgPack),
        )
        .await
        .map_err(|_| setup(format!("{id} could not connect within {STEP_LIMIT:?}")))?
        .map_err(setup)?;
        let own = clips[i % clips.len()].clone();
        let other = clips[(i + 1) % clips.len()].clone();
        let (measuring, stop) = (measuring.clone(), stop.clone());
        // Only client 0 changes person.
        let swap = (i == 0).then(|| swap.clone());
        let swap_caught = swap_caught.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            let (mut done, mut dropped) = (0u64, 0u64);
            // When the first frame of the other person went out, and when it was caught.
            let (mut swapped_at, mut caught) = (None::<Instant>, None);
            let mut sent_at = std::collections::HashMap::<u64, Instant>::new();
            let mut next = tokio::time::Instant::now();
            let mut seq = 0u64;
            let mut ended_early = true;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => {
                        ended_early = false;
                        break;
                    }
                    _ = tokio::time::sleep_until(next) => {
                        next += period;
                        seq += 1;
                        let swapped = swap.as_ref().is_some_and(|s| s.load(Ordering::Relaxed));
                        if swapped && swapped_at.is_none() {
                            swapped_at = Some(Instant::now());
                        }
                        let frames = if swapped { &other } else { &own };
                        let jpeg = &frames[(seq as usize) % frames.len()];
                        sent_at.insert(seq, Instant::now());
                        let sent = tokio::time::timeout(
                            STEP_LIMIT,
                            conn.send_frame(seq, crate::wire::now_ms(), jpeg),
                        )
                        .await;
                        if !matches!(sent, Ok(Ok(()))) {
                            break;
                        }
                    }
                    msg = conn.recv() => {
                        let Some(Ok(Incoming::Msg(msg))) = msg else { break };
                        match msg {
                            ServerMsg::Result { seq, .. } => {
                                let t = sent_at.remove(&seq);
                                if measuring.load(Ordering::Relaxed) {
                                    if let Some(t) = t {
                                        let _ = hist.record(t.elapsed().as_micros() as u64);
                                    }
                                    done += 1;
                                }
                            }
                            ServerMsg::Dropped { seq, .. } => {
                                sent_at.remove(&seq);
                                if measuring.load(Ordering::Relaxed) {
                                    dropped += 1;
                                }
                            }
                            ServerMsg::Action {
                                action: Action::LockScreen | Action::SignOut,
                                reason,
                                ..
                            } if reason == "wrong_person" && caught.is_none() => {
                                caught = swapped_at.map(|at| at.elapsed().as_secs_f64());
                                if caught.is_some() {
                                    swap_caught.notify_one();
                                }
                            }
                            _ => {}
                        }
                    }
                }
            }
            let _ = tokio::time::timeout(STEP_LIMIT, conn.close()).await;
            (hist, done, dropped, caught, ended_early)
        }));
    }
    tokio::time::sleep(b.warmup).await;
    let stages_before = stage_totals(registries);
    let batches_before = batch_totals(registries);
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let cpu_start = crate::tools::bench::proc_cpu_seconds("self").unwrap_or(0.0);
    // The cost is that of steady candidates: the swap comes after it is measured (a stranger's
    // frames are all fully analysed, and would weigh on the side that skips work).
    tokio::time::sleep(b.duration).await;
    measuring.store(false, Ordering::Relaxed);
    let cpu = crate::tools::bench::proc_cpu_seconds("self").unwrap_or(0.0) - cpu_start;
    let seconds = started.elapsed().as_secs_f64();
    let stages_after = stage_totals(registries);
    let batches_after = batch_totals(registries);
    swap.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(SWAP_WAIT, swap_caught.notified()).await;
    stop.cancel();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let (mut frames, mut dropped, mut caught, mut ended_early) = (0, 0, None, 0);
    for t in tasks {
        match tokio::time::timeout(STEP_LIMIT, t).await {
            Ok(Ok((h, d, x, c, early))) => {
                let _ = hist.add(&h);
                frames += d;
                dropped += x;
                caught = caught.or(c);
                ended_early += u64::from(early);
            }
            _ => ended_early += 1,
        }
    }
    let stages = stages_after
        .into_iter()
        .map(|(k, (sum, n))| {
            let (s0, n0) = stages_before.get(&k).copied().unwrap_or_default();
            (k, (sum - s0, n - n0))
        })
        .collect();
    Ok(Sample {
        frames,
        dropped,
        seconds,
        cpu,
        hist,
        stages,
        batches: (
            batches_after.0 - batches_before.0,
            batches_after.1 - batches_before.1,
        ),
        swap: caught,
        ended_early,
    })
}

/// Frames analysed in batches and the batches' count, over the workers' registries.
fn batch_totals(registries: &[Registry]) -> (f64, u64) {
    let mut out = (0.0, 0);
    for r in registries {
        for family in r.gather() {
            if family.name() == "vigil_worker_batch_frames" {
                for m in family.get_metric() {
                    out.0 += m.get_histogram().get_sample_sum();
                    out.1 += m.get_histogram().get_sample_count();
                }
            }
        }
    }
    out
}

/// Seconds and count of each inference stage, over the workers' registries.
fn stage_totals(registries: &[Registry]) -> BTreeMap<String, (f64, u64)> {
    let mut out: BTreeMap<String, (f64, u64)> = BTreeMap::new();
    for r in registries {
        for family in r.gather() {
            if family.name() != "vigil_worker_inference_seconds" {
                continue;
            }
            for m in family.get_metric() {
                let stage = m
                    .get_label()
                    .iter()
                    .find(|l| l.name() == "model")
                    .map(|l| l.value().to_owned())
                    .unwrap_or_default();
                let h = m.get_histogram();
                let e = out.entry(stage).or_default();
                e.0 += h.get_sample_sum();
                e.1 += h.get_sample_count();
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clip_needs_frames_and_the_bench_two_people() {
        let dir =
            std::env::temp_dir().join(format!("vigil-cost-clip-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(clip_frames(&dir).is_err());
        std::fs::write(dir.join("0002.jpg"), b"b").unwrap();
        std::fs::write(dir.join("0001.jpg"), b"a").unwrap();
        std::fs::write(dir.join("notes.txt"), b"x").unwrap();
        assert_eq!(
            clip_frames(&dir).unwrap(),
            vec![b"a".to_vec(), b"b".to_vec()]
        );
        assert_eq!(clip_first_file(&dir).unwrap(), dir.join("0001.jpg"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pooled_figures_are_per_candidate_and_per_frame() {
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        hist.record(100_000).unwrap();
        let sample = Sample {
            frames: 100,
            dropped: 0,
            seconds: 10.0,
            cpu: 5.0,
            hist,
            stages: BTreeMap::from([
                ("yunet".to_owned(), (1.5, 100)),
                ("sface".to_owned(), (4.5, 100)),
            ]),
            batches: (100.0, 40),
            swap: Some(1.5),
            ended_early: 0,
        };
        let b = CostBench {
            base: Config::default(),
            clients: 2,
            fps: 5.0,
            clips: vec![],
            warmup: Duration::ZERO,
            duration: Duration::ZERO,
            rounds: 1,
            workers: 1,
        };
        let s = pool(Side::Full, 1, 0, &[sample], &b);
        // 5 CPU-seconds over 20 candidate-seconds: 0.25 s per candidate-second.
        assert!((s.cpu_s_per_candidate_hour - 900.0).abs() < 1e-9);
        assert!((s.cpu_ms_per_frame - 50.0).abs() < 1e-9);
        assert!((s.candidates_per_core - 4.0).abs() < 1e-9);
        assert!((s.inference_ms_per_frame - 60.0).abs() < 1e-9);
        assert!((s.stages_ms_per_frame["sface"] - 45.0).abs() < 1e-9);
        assert_eq!(s.swap_caught_s, vec![Some(1.5)]);
        assert_eq!(s.frames_per_batch, Some(2.5));
        // A report whose sides dropped frames says so.
        let mut dropped = s.clone();
        dropped.dropped = 3;
        let report = CostReport {
            clients: 2,
            fps: 5.0,
            workers: 1,
            clips: vec![],
            rounds: 1,
            sides: vec![s, dropped],
            cpu_ratio: 1.0,
        };
        let text = report.render();
        assert!(text.contains("could not keep up"), "{text}");
        assert!(text.contains("both sides are the full stack"), "{text}");
        assert!(text.contains("2.50 frames per batch"), "{text}");
    }
}
