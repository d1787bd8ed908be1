//! `vigil loadgen`: N simulated WebSocket clients, each sending F frames per second for a while,
//! from a folder of images or a capture file; reports frames sent, results, drops by reason,
//! errors and latency percentiles from an HDR histogram.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::edge::client::{ClientError, Connection, Incoming};

/// How long a client refused as busy (`system_full`) keeps retrying its connection.
const CONNECT_RETRY_FOR: Duration = Duration::from_secs(30);
use crate::wire::client::{Encoding, ServerMsg};

pub struct LoadOptions {
    pub url: String,
    pub clients: usize,
    pub fps: f64,
    pub duration: Duration,
    pub client_prefix: String,
    pub token: String,
    pub frames: Vec<Vec<u8>>,
    pub encoding: Encoding,
}

#[derive(Debug, Default)]
struct Tally {
    connect_retries: u64,
    sent: u64,
    results: u64,
    dropped: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    verdicts: BTreeMap<String, u64>,
    actions: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub clients: usize,
    pub fps_per_client: f64,
    pub frames_sent: u64,
    pub results: u64,
    pub dropped: u64,
    pub dropped_by_reason: BTreeMap<String, u64>,
    pub errors: u64,
    pub errors_by_kind: BTreeMap<String, u64>,
    /// Connections refused as busy (`system_full`) and tried again.
    pub connect_retries: u64,
    pub verdicts: BTreeMap<String, u64>,
    pub actions: BTreeMap<String, u64>,
    pub duration_s: f64,
    pub results_per_s: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl LoadReport {
    pub fn render(&self) -> String {
        let mut out = format!(
            "loadgen: {} clients x {} fps for {:.1} s\n\
             | frames sent | results | results/s | dropped | errors | p50 ms | p90 ms | p99 ms | max ms |\n\
             |---|---|---|---|---|---|---|---|---|\n\
             | {} | {} | {:.1} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            self.clients,
            self.fps_per_client,
            self.duration_s,
            self.frames_sent,
            self.results,
            self.results_per_s,
            self.dropped,
            self.errors,
            self.p50_ms,
            self.p90_ms,
            self.p99_ms,
            self.max_ms
        );
        out += &format!("drops by reason: {:?}\n", self.dropped_by_reason);
        if self.connect_retries > 0 {
            out += &format!(
                "connections refused as busy and retried: {}\n",
                self.connect_retries
            );
        }
        if !self.errors_by_kind.is_empty() {
            out += &format!("errors: {:?}\n", self.errors_by_kind);
        }
        if !self.verdicts.is_empty() {
            out += &format!(
                "verdicts: {:?}\nactions: {:?}\n",
                self.verdicts, self.actions
            );
        }
        out
    }
}

/// Run the load; `progress` is called about once a second with (sent, results).
pub async fn run(
    opts: LoadOptions,
    progress: impl Fn(u64, u64) + Send + Sync + 'static,
) -> LoadReport {
    let hist = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("bounds"),
    ));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let frames = Arc::new(opts.frames);
    let started = Instant::now();
    let stop_at = started + opts.duration;
    let mut tasks = Vec::new();
    for i in 0..opts.clients {
        let (url, token, frames, hist, tally) = (
            opts.url.clone(),
            opts.token.clone(),
            frames.clone(),
            hist.clone(),
            tally.clone(),
        );
        let client = format!("{}{i}", opts.client_prefix);
        let period = Duration::from_secs_f64(1.0 / opts.fps.max(0.01));
        let encoding = opts.encoding;
        tasks.push(tokio::spawn(async move {
            let count = |tally: &Mutex<Tally>, f: &dyn Fn(&mut Tally)| {
                f(&mut tally.lock().expect("tally lock"))
            };
            // A client turned away because the edge is busy (4503) retries with backoff and
            // jitter, as the protocol asks, for up to CONNECT_RETRY_FOR.
            let give_up = Instant::now() + CONNECT_RETRY_FOR;
            let mut backoff = Duration::from_millis(250);
            let conn = loop {
                match Connection::connect(&url, &client, &token, encoding).await {
                    Ok((c, _)) => break c,
                    Err(ClientError::Refused { code, .. })
                        if code == "system_full" && Instant::now() + backoff < give_up =>
                    {
                        count(&tally, &|t| t.connect_retries += 1);
                        let jitter = rand::random_range(0.5..1.5);
                        tokio::time::sleep(backoff.mul_f64(jitter)).await;
                        backoff = (backoff * 2).min(Duration::from_secs(4));
                    }
                    Err(e) => {
                        let kind =
                            format!("connect: {}", e.to_string().split(':').next().unwrap_or(""));
                        count(&tally, &|t| *t.errors.entry(kind.clone()).or_default() += 1);
                        return;
                    }
                }
            };
            let (mut tx, mut rx) = conn.split();
            let sent_at: Arc<Mutex<BTreeMap<u64, Instant>>> = Arc::default();
            let reader = {
                let (sent_at, hist, tally) = (sent_at.clone(), hist.clone(), tally.clone());
                tokio::spawn(async move {
                    while let Some(msg) = rx.recv().await {
                        match msg {
                            Ok(Incoming::Msg(ServerMsg::Result { seq, analysis, .. })) => {
                                if let Some(t) = sent_at.lock().expect("lock").remove(&seq) {
                                    let _ = hist
                                        .lock()
                                        .expect("lock")
                                        .record(t.elapsed().as_micros() as u64);
                                }
                                let verdict = analysis.verdict().map(|v| v.as_str().to_owned());
                                count(&tally, &|t| {
                                    t.results += 1;
                                    if let Some(v) = &verdict {
                                        *t.verdicts.entry(v.clone()).or_default() += 1;
                                    }
                                });
                            }
                            Ok(Incoming::Msg(ServerMsg::Dropped { seq, reason, .. })) => {
                                sent_at.lock().expect("lock").remove(&seq);
                                count(&tally, &|t| {
                                    *t.dropped.entry(reason.as_str().to_owned()).or_default() += 1
                                });
                            }
                            Ok(Incoming::Msg(ServerMsg::Action { action, .. })) => {
                                count(&tally, &|t| {
                                    *t.actions.entry(action.as_str().to_owned()).or_default() += 1
                                });
                            }
                            Ok(Incoming::Msg(_)) => {}
                            Ok(Incoming::Closed { code, .. }) => {
                                count(&tally, &|t| {
                                    *t.errors.entry(format!("closed {code}")).or_default() += 1
                                });
                                break;
                            }
                            Err(_) => {
                                count(&tally, &|t| {
                                    *t.errors.entry("socket".into()).or_default() += 1
                                });
                                break;
                            }
                        }
                    }
                })
            };
            // Spread the clients' first frames over one period.
            let mut next = Instant::now() + period.mul_f64(i as f64 / 64.0 % 1.0);
            let mut seq = 0u64;
            while next < stop_at {
                tokio::time::sleep_until(next.into()).await;
                seq += 1;
                let jpeg = &frames[(seq as usize + i) % frames.len()];
                sent_at.lock().expect("lock").insert(seq, Instant::now());
                if tx
                    .send_frame(seq, crate::wire::now_ms(), jpeg)
                    .await
                    .is_err()
                {
                    count(&tally, &|t| {
                        *t.errors.entry("send".into()).or_default() += 1
                    });
                    break;
                }
                count(&tally, &|t| t.sent += 1);
                next += period;
            }
            // Answers for the last frames.
            tokio::time::sleep(Duration::from_secs(3)).await;
            reader.abort();
            tx.close().await;
        }));
    }
    let watcher = {
        let tally = tally.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let (s, r) = {
                    let t = tally.lock().expect("lock");
                    (t.sent, t.results)
                };
                progress(s, r);
            }
        })
    };
    for t in tasks {
        let _ = t.await;
    }
    watcher.abort();
    let duration_s = opts.duration.as_secs_f64();
    let t = tally.lock().expect("lock");
    let h = hist.lock().expect("lock");
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    LoadReport {
        clients: opts.clients,
        fps_per_client: opts.fps,
        frames_sent: t.sent,
        results: t.results,
        dropped: t.dropped.values().sum(),
        dropped_by_reason: t.dropped.clone(),
        errors: t.errors.values().sum(),
        errors_by_kind: t.errors.clone(),
        connect_retries: t.connect_retries,
        verdicts: t.verdicts.clone(),
        actions: t.actions.clone(),
        duration_s,
        results_per_s: t.results as f64 / duration_s,
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        max_ms: h.max() as f64 / 1000.0,
    }
}
