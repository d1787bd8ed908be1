//! `vigil replay`: republish a capture's frames into `vigil.frames` under a replay edge id of
//! its own, collect every result, run the action policy per client, and compare with the
//! recorded results: a regression gate for a model, threshold or policy change.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use prometheus::Registry;
use serde::Serialize;
use uuid::Uuid;

use crate::broker::Broker;
use crate::config::Config;
use crate::liveness::{LivenessConfig, StreamLiveness};
use crate::metrics::BrokerMetrics;
use crate::policy::{ClientPolicy, PolicyConfig};
use crate::tools::capture::Capture;
use crate::topology::{self, NodeKind};
use crate::wire::{self, Analysis, Envelope, Payload};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Broker(#[from] crate::broker::BrokerError),
    #[error(transparent)]
    Topology(#[from] topology::TopologyError),
    #[error("the capture has no frames")]
    Empty,
}

/// How fast to replay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Speed {
    /// The original pacing scaled by this factor (1 = as recorded).
    Factor(f64),
    /// As fast as the in-flight window allows.
    Max,
}

impl std::str::FromStr for Speed {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "max" {
            return Ok(Speed::Max);
        }
        match s.parse::<f64>() {
            Ok(f) if f > 0.0 && f.is_finite() => Ok(Speed::Factor(f)),
            _ => Err(format!("speed `{s}` must be a positive number or `max`")),
        }
    }
}

/// When each frame is due, relative to the start, given their arrival times.
pub fn schedule(arrivals_ms: &[u64], speed: Speed) -> Vec<Duration> {
    let first = arrivals_ms.first().copied().unwrap_or(0);
    arrivals_ms
        .iter()
        .map(|t| match speed {
            Speed::Max => Duration::ZERO,
            Speed::Factor(f) => {
                Duration::from_secs_f64(t.saturating_sub(first) as f64 / 1000.0 / f)
            }
        })
        .collect()
}

pub struct ReplayOptions {
    pub speed: Speed,
    pub compare: bool,
    /// Tolerated share of differences (0 = none) before the gate fails.
    pub tolerance: f64,
    pub max_inflight: usize,
    pub policy: PolicyConfig,
    /// The stream liveness the edges fuse into each verdict before the policy.
    pub liveness: LivenessConfig,
}

/// A frame's outcome, comparable across runs: the verdict for identity analyses (after the
/// client's stream liveness, as an edge fuses it at `arrived_ms`), the facts for frame-info,
/// or the drop reason.
fn outcome(
    env: &Envelope,
    liveness: &mut StreamLiveness,
    cfg: &LivenessConfig,
    arrived_ms: u64,
) -> Option<String> {
    match &env.payload {
        Payload::Result(r) => Some(match &r.analysis {
            Analysis::Identity(a) => {
                let mut a = a.clone();
                liveness.fuse(cfg, arrived_ms, &mut a);
                a.verdict.as_str().to_owned()
            }
            Analysis::FrameInfo {
                width,
                height,
                components,
            } => format!("frame_info {width}x{height}x{components}"),
        }),
        Payload::Dropped(d) => Some(format!("dropped:{}", d.reason.as_str())),
        _ => None,
    }
}

fn key(env: &Envelope) -> Option<(String, u64, u64)> {
    match &env.payload {
        Payload::Frame(f) => Some((env.client_id.clone(), f.session, f.seq)),
        Payload::Result(r) => Some((env.client_id.clone(), r.session, r.seq)),
        Payload::Dropped(d) => Some((env.client_id.clone(), d.session, d.seq)),
        _ => None,
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ClientReport {
    pub frames: u64,
    pub outcomes: BTreeMap<String, u64>,
    /// `action (reason) at seq N`, in order.
    pub actions: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FrameDiff {
    pub client: String,
    pub seq: u64,
    pub recorded: String,
    pub replayed: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub frames_compared: u64,
    pub frame_differences: Vec<FrameDiff>,
    /// Per client: recorded actions vs replayed actions, where they differ.
    pub action_differences: BTreeMap<String, (Vec<String>, Vec<String>)>,
    pub difference_rate: f64,
    pub tolerance: f64,
    pub exceeded: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplayReport {
    pub replay_edge: String,
    pub frames: u64,
    pub results: u64,
    pub dropped: BTreeMap<String, u64>,
    pub unanswered: u64,
    pub latency_ms: BTreeMap<String, f64>,
    pub seconds: f64,
    pub clients: BTreeMap<String, ClientReport>,
    pub comparison: Option<Comparison>,
}

/// One frame's outcome in a run: (arrival ms, seq, outcome).
type Outcome = (u64, u64, Option<String>);

/// Run the policy over one client's outcomes in arrival order.
fn actions(policy: &PolicyConfig, outcomes: &[Outcome]) -> Vec<String> {
    let mut p = ClientPolicy::new();
    let mut out = Vec::new();
    for (arrived_ms, seq, outcome) in outcomes {
        let verdict = outcome.as_deref().and_then(|o| {
            serde_json::from_value::<wire::Verdict>(serde_json::Value::String(o.to_owned())).ok()
        });
        if let Some(v) = verdict
            && let Some(d) = p.observe(policy, v, *arrived_ms)
        {
            out.push(format!(
                "{} ({}) at seq {seq}",
                d.action.as_str(),
                d.reason.as_str()
            ));
        }
    }
    out
}

pub async fn replay(
    cfg: &Config,
    capture: &Capture,
    opts: &ReplayOptions,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<ReplayReport, ReplayError> {
    let frames: Vec<(u64, Envelope)> = capture
        .frames()
        .into_iter()
        .filter(|(_, e)| matches!(e.payload, Payload::Frame(_)))
        .collect();
    if frames.is_empty() {
        return Err(ReplayError::Empty);
    }
    let ns = &cfg.namespace;
    let replay_id = format!("replay-{:08x}", rand::random::<u32>());
    let broker = Broker::connect(
        &cfg.amqp_url,
        &replay_id,
        BrokerMetrics::new(&Registry::new()),
    )
    .await?;
    let topo = cfg.topology()?;
    broker.declare(&topo.shared(ns)).await?;
    broker
        .declare(&topo.per_node(ns, NodeKind::Edge, &replay_id))
        .await?;
    let reply_queue = cfg.names().resolve(topology::EDGE_REPLY_QUEUE, &replay_id);
    let mut replies = broker
        .consume(&reply_queue, &replay_id, 1000, false)
        .await?;
    let publisher = broker.publisher().await?;
    let exchange = cfg.names().frames_exchange();

    let arrivals: Vec<u64> = frames.iter().map(|(t, _)| *t).collect();
    let due = schedule(&arrivals, opts.speed);
    let mut sent_at: HashMap<(String, u64, u64), Instant> = HashMap::new();
    let mut replayed: HashMap<(String, u64, u64), Envelope> = HashMap::new();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("bounds");
    let started = Instant::now();
    let start = tokio::time::Instant::now();
    let deadline = Duration::from_millis(cfg.edge.frame_deadline_ms);
    let mut next = 0;
    let mut last_progress = tokio::time::Instant::now();
    loop {
        let inflight = sent_at.len();
        let can_send = next < frames.len() && inflight < opts.max_inflight.max(1);
        let due_at = start + due.get(next).copied().unwrap_or_default();
        if next == frames.len() && sent_at.is_empty() {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(due_at), if can_send => {
                let (_, original) = &frames[next];
                let now = wire::now_ms();
                let env = Envelope {
                    schema: wire::SCHEMA,
                    id: Uuid::now_v7(),
                    source: replay_id.clone(),
                    seq: next as u64,
                    client_id: original.client_id.clone(),
                    produced_at_ms: now,
                    deadline_ms: now + deadline.as_millis() as u64,
                    traceparent: wire::new_traceparent(),
                    payload: match &original.payload {
                        // A replay is a regression gate: every frame runs every model, whatever
                        // the recording edge's cadence skipped.
                        wire::Payload::Frame(f) => wire::Payload::Frame(wire::Frame {
                            phone_check: true,
                            track: None,
                            ..f.clone()
                        }),
                        other => other.clone(),
                    },
                };
                publisher.publish(&exchange, "", &env).await?.wait().await?;
                if let Some(k) = key(&env) {
                    sent_at.insert(k, Instant::now());
                }
                next += 1;
            }
            d = replies.next() => {
                let Some(Ok(d)) = d else { break };
                let Ok(env) = Envelope::decode(d.data()) else { continue };
                let Some(k) = key(&env) else { continue };
                if let Some(t) = sent_at.remove(&k) {
                    if matches!(env.payload, Payload::Result(_)) {
                        let _ = hist.record(t.elapsed().as_micros() as u64);
                    }
                    replayed.insert(k, env);
                }
            }
            _ = tokio::time::sleep(deadline + Duration::from_secs(5)) => {
                tracing::warn!(waiting = sent_at.len(), "no more results are coming");
                break;
            }
        }
        if last_progress.elapsed() > Duration::from_millis(100) {
            progress(next as u64, replayed.len() as u64);
            last_progress = tokio::time::Instant::now();
        }
    }
    progress(next as u64, replayed.len() as u64);
    let seconds = started.elapsed().as_secs_f64();
    replies.close().await;
    publisher.close().await;
    broker.close().await;

    // Per client, in arrival order: what was replayed, and what was recorded.
    let recorded: HashMap<(String, u64, u64), Envelope> = capture
        .results()
        .into_iter()
        .filter_map(|(_, e)| key(&e).map(|k| (k, e)))
        .collect();
    // Per client: (replayed, recorded) outcomes, each as (arrival ms, seq, outcome).
    let mut per_client: BTreeMap<String, (Vec<Outcome>, Vec<Outcome>)> = BTreeMap::new();
    let mut dropped: BTreeMap<String, u64> = BTreeMap::new();
    let mut results = 0;
    let mut diffs = Vec::new();
    let mut compared = 0;
    // Each run's stream liveness, per client, fed in arrival order as the edge was.
    let mut fusion: HashMap<String, (StreamLiveness, StreamLiveness)> = HashMap::new();
    for (arrived, env) in &frames {
        let Some(k) = key(env) else { continue };
        let (live_now, live_then) = fusion.entry(k.0.clone()).or_default();
        let now = replayed
            .get(&k)
            .and_then(|e| outcome(e, live_now, &opts.liveness, *arrived));
        match replayed.get(&k).map(|e| &e.payload) {
            Some(Payload::Result(_)) => results += 1,
            Some(Payload::Dropped(d)) => {
                *dropped.entry(d.reason.as_str().to_owned()).or_default() += 1
            }
            _ => {}
        }
        let then = recorded
            .get(&k)
            .and_then(|e| outcome(e, live_then, &opts.liveness, *arrived));
        if let (Some(a), Some(b)) = (&then, &now) {
            compared += 1;
            if a != b {
                diffs.push(FrameDiff {
                    client: k.0.clone(),
                    seq: k.2,
                    recorded: a.clone(),
                    replayed: b.clone(),
                });
            }
        }
        let entry = per_client.entry(k.0.clone()).or_default();
        entry.0.push((*arrived, k.2, now));
        entry.1.push((*arrived, k.2, then));
    }
    let mut clients = BTreeMap::new();
    let mut action_diffs = BTreeMap::new();
    let mut actions_compared = 0;
    let mut action_mismatches = 0;
    for (client, (now, then)) in &per_client {
        let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
        for (_, _, o) in now {
            *outcomes
                .entry(o.clone().unwrap_or_else(|| "unanswered".into()))
                .or_default() += 1;
        }
        let replayed_actions = actions(&opts.policy, now);
        if opts.compare && capture.header.results {
            let recorded_actions = actions(&opts.policy, then);
            let n = recorded_actions.len().max(replayed_actions.len());
            actions_compared += n;
            let mismatched = (0..n)
                .filter(|i| {
                    recorded_actions.get(*i).map(|s| s.split(" at ").next())
                        != replayed_actions.get(*i).map(|s| s.split(" at ").next())
                })
                .count();
            if mismatched > 0 {
                action_mismatches += mismatched;
                action_diffs.insert(client.clone(), (recorded_actions, replayed_actions.clone()));
            }
        }
        clients.insert(
            client.clone(),
            ClientReport {
                frames: now.len() as u64,
                outcomes,
                actions: replayed_actions,
            },
        );
    }
    let comparison = (opts.compare && capture.header.results).then(|| {
        let total = (compared + actions_compared as u64).max(1);
        let rate = (diffs.len() + action_mismatches) as f64 / total as f64;
        Comparison {
            frames_compared: compared,
            exceeded: rate > opts.tolerance,
            frame_differences: diffs,
            action_differences: action_diffs,
            difference_rate: rate,
            tolerance: opts.tolerance,
        }
    });
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let latency_ms = BTreeMap::from([
        ("p50".to_owned(), ms(0.5)),
        ("p90".to_owned(), ms(0.9)),
        ("p99".to_owned(), ms(0.99)),
        ("max".to_owned(), hist.max() as f64 / 1000.0),
    ]);
    Ok(ReplayReport {
        replay_edge: replay_id,
        frames: frames.len() as u64,
        results,
        unanswered: frames.len() as u64 - replayed.len() as u64,
        dropped,
        latency_ms,
        seconds,
        clients,
        comparison,
    })
}

impl ReplayReport {
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = format!(
            "replayed {} frames as {} in {:.1} s: {} results, {} unanswered, dropped {:?}\n\
             latency ms: p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}\n",
            self.frames,
            self.replay_edge,
            self.seconds,
            self.results,
            self.unanswered,
            self.dropped,
            self.latency_ms["p50"],
            self.latency_ms["p90"],
            self.latency_ms["p99"],
            self.latency_ms["max"],
        );
        for (client, r) in &self.clients {
            let _ = writeln!(
                out,
                "client {client}: {} frames, {:?}",
                r.frames, r.outcomes
            );
            for a in &r.actions {
                let _ = writeln!(out, "    action {a}");
            }
        }
        if let Some(c) = &self.comparison {
            let _ = writeln!(
                out,
                "compare: {} frames compared, {} verdict differences, {} clients with different actions; difference rate {:.4} (tolerance {})",
                c.frames_compared,
                c.frame_differences.len(),
                c.action_differences.len(),
                c.difference_rate,
                c.tolerance
            );
            for d in c.frame_differences.iter().take(20) {
                let _ = writeln!(
                    out,
                    "    {} seq {}: recorded {} now {}",
                    d.client, d.seq, d.recorded, d.replayed
                );
            }
            for (client, (then, now)) in &c.action_differences {
                let _ = writeln!(out, "    {client}: recorded actions {then:?}, now {now:?}");
            }
            let _ = writeln!(
                out,
                "{}",
                if c.exceeded {
                    "RESULT: differences exceed the tolerance"
                } else {
                    "RESULT: within tolerance"
                }
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_scale_with_speed() {
        let at = [1000, 1100, 1300];
        assert_eq!(
            schedule(&at, Speed::Factor(1.0)),
            [0, 100, 300].map(Duration::from_millis)
        );
        assert_eq!(
            schedule(&at, Speed::Factor(4.0)),
            [0, 25, 75].map(Duration::from_millis)
        );
        assert_eq!(schedule(&at, Speed::Max), [Duration::ZERO; 3]);
        assert!("0".parse::<Speed>().is_err() && "max".parse::<Speed>() == Ok(Speed::Max));
    }
}
