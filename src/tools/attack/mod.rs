//! `vigil attack`: the hostile suite, run against a live edge, so an operator can check their
//! own deployment. It prints what an attacker achieves and checks it against budgets.
//!
//! 1. **Unloaded.** Legitimate clients stream frames; their result latency is the reference.
//! 2. **Hostile sockets.** While the same clients stream again, many sockets connect and
//!    misbehave without reading ([`sockets::Kind`]), spread over several source addresses.
//!    The legitimate clients' p99 is compared with the unloaded one, the edge's memory is
//!    watched, and each hostile socket's closing time is recorded.
//! 3. **Hostile JPEGs.** One authenticated client streams [`jpegs::set`] round robin; every
//!    frame must get an answer, the workers' memory must stay within its budget over its
//!    baseline, and no worker may restart.
//!
//! Memory is read from `/proc` for the process ids given, so those checks need the edge and
//! workers on the machine that runs the attack.

pub mod jpegs;
pub mod sockets;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::edge::client::{Connection, Incoming};
use crate::tools::loadgen::{self, LoadOptions, LoadReport};
use crate::wire::client::{Encoding, ServerMsg};

pub struct AttackOptions {
    /// `ws://` or `wss://` URL of the edge's stream endpoint.
    pub url: String,
    /// Legitimate clients are `<prefix>0..`; the JPEG client is `<prefix>jpeg`.
    pub client_prefix: String,
    pub token: String,
    pub legit_clients: usize,
    pub legit_fps: f64,
    pub unloaded: Duration,
    pub sockets: usize,
    /// Loopback addresses (127.0.0.2, 127.0.0.3, ...) to spread hostile sockets over, when
    /// the edge is on this machine; 0 connects from the default address.
    pub sources: u8,
    /// The authenticated non-readers are `<hostile_prefix>0..`, with `token`.
    pub hostile_prefix: String,
    /// How long the hostile sockets are held (and watched).
    pub hold: Duration,
    pub jpeg_fps: f64,
    pub jpeg_duration: Duration,
    pub edge_pids: Vec<u32>,
    pub worker_pids: Vec<u32>,
    /// The frame legitimate clients send.
    pub frame: Vec<u8>,
    pub budgets: Budgets,
}

/// What the figures must stay within.
#[derive(Debug, Clone, Serialize)]
pub struct Budgets {
    pub p99_factor: f64,
    pub edge_rss_mib: f64,
    pub worker_rss_rise_mib: f64,
    /// Sockets that never authenticate are closed within this.
    pub unauthenticated_close_s: f64,
    /// Authenticated sockets that never read are closed within this.
    pub authenticated_close_s: f64,
}

impl AttackOptions {
    /// Authenticated non-readers among the hostile sockets (a third).
    pub fn hostile_authenticated(&self) -> usize {
        self.sockets / 3
    }

    /// Every client id the attack authenticates as, for provisioning.
    pub fn client_ids(&self) -> Vec<String> {
        (0..self.legit_clients)
            .map(|i| format!("{}{i}", self.client_prefix))
            .chain([format!("{}jpeg", self.client_prefix)])
            .chain((0..self.hostile_authenticated()).map(|i| format!("{}{i}", self.hostile_prefix)))
            .collect()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SocketKindReport {
    pub kind: sockets::Kind,
    pub sockets: usize,
    pub connect_failed: usize,
    pub refused_at_accept: usize,
    pub closed: usize,
    pub still_open: usize,
    /// Seconds from the handshake (or from connect, when refused) to the edge's close.
    pub p50_close_s: f64,
    pub max_close_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    pub pid: u32,
    pub before_mib: f64,
    pub max_mib: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct JpegReport {
    pub fps: f64,
    pub duration_s: f64,
    pub sent: u64,
    pub answered: u64,
    pub unanswered: u64,
    /// For each hostile frame, the answers it got (`result`, `dropped <reason>: <detail>`).
    pub answers: BTreeMap<String, BTreeMap<String, u64>>,
    /// Each hostile frame sent once more on its own, after the stream, and its answer: with
    /// nothing else in flight, no load answer (`superseded`, `expired`) can hide what Vigil
    /// does with it.
    pub probe: BTreeMap<String, String>,
    /// Frames answered other than their set entry says (in the stream, load answers such as
    /// `superseded` aside; in the probe, none aside).
    pub unexpected: Vec<String>,
    pub workers: Vec<Memory>,
    pub worker_restarts: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub what: String,
    pub pass: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct AttackReport {
    pub unloaded: LoadReport,
    pub under_attack: LoadReport,
    pub sockets: Vec<SocketKindReport>,
    pub sources: usize,
    pub edges: Vec<Memory>,
    pub jpegs: JpegReport,
    pub budgets: Budgets,
    pub checks: Vec<Check>,
}

impl AttackReport {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.pass)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let load = |name: &str, r: &LoadReport| {
            format!(
                "| {name} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} |\n",
                r.clients,
                r.connect_retries,
                r.frames_sent,
                r.results,
                r.errors,
                r.p50_ms,
                r.p99_ms,
                r.max_ms
            )
        };
        out += "## Legitimate clients\n\n| phase | clients | connections retried (busy) | frames | results | errors | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|---|---|---|---|\n";
        out += &load("unloaded", &self.unloaded);
        out += &load("under attack", &self.under_attack);
        out += &format!(
            "\n## Hostile sockets (from {} source address{})\n\n| kind | sockets | connect failed | refused at accept | closed by the edge | still open | p50 close s | max close s |\n|---|---|---|---|---|---|---|---|\n",
            self.sources,
            if self.sources == 1 { "" } else { "es" }
        );
        for k in &self.sockets {
            out += &format!(
                "| {} | {} | {} | {} | {} | {} | {:.1} | {:.1} |\n",
                k.kind.as_str(),
                k.sockets,
                k.connect_failed,
                k.refused_at_accept,
                k.closed,
                k.still_open,
                k.p50_close_s,
                k.max_close_s
            );
        }
        for m in &self.edges {
            out += &format!(
                "\nedge pid {}: RSS {:.1} MiB before, {:.1} MiB at most\n",
                m.pid, m.before_mib, m.max_mib
            );
        }
        let j = &self.jpegs;
        out += &format!(
            "\n## Hostile JPEGs ({:.0} fps for {:.0} s)\n\nsent {}, answered {}, unanswered {}, worker restarts {}\n\n| frame | answers |\n|---|---|\n",
            j.fps, j.duration_s, j.sent, j.answered, j.unanswered, j.worker_restarts
        );
        out = out.replace(
            "| frame | answers |\n|---|---|\n",
            "| frame | in the stream | alone |\n|---|---|---|\n",
        );
        for (name, answers) in &j.answers {
            let list: Vec<String> = answers.iter().map(|(a, n)| format!("{n} × {a}")).collect();
            let alone = j.probe.get(name).map_or("-", String::as_str);
            out += &format!("| {name} | {} | {alone} |\n", list.join("; "));
        }
        for m in &j.workers {
            out += &format!(
                "\nworker pid {}: RSS {:.1} MiB before, {:.1} MiB at most (+{:.1})\n",
                m.pid,
                m.before_mib,
                m.max_mib,
                m.max_mib - m.before_mib
            );
        }
        out += "\n## Checks\n\n";
        for c in &self.checks {
            out += &format!(
                "- [{}] {}: {}\n",
                if c.pass { "pass" } else { "FAIL" },
                c.what,
                c.detail
            );
        }
        out
    }
}

/// Resident memory of a process in MiB, from /proc (Linux).
pub fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// When a process started (clock ticks since boot), to tell a restart from the same process.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: count fields after it.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// Samples the resident memory of some processes every 100 ms until stopped.
struct MemoryWatch {
    before: Vec<(u32, f64)>,
    max: Arc<Mutex<BTreeMap<u32, f64>>>,
    stop: tokio_util::sync::CancellationToken,
}

impl MemoryWatch {
    fn start(pids: &[u32]) -> Self {
        let before: Vec<(u32, f64)> = pids
            .iter()
            .map(|&p| (p, rss_mib(p).unwrap_or(0.0)))
            .collect();
        let max = Arc::new(Mutex::new(
            before.iter().copied().collect::<BTreeMap<_, _>>(),
        ));
        let stop = tokio_util::sync::CancellationToken::new();
        let (pids, max2, stop2) = (pids.to_vec(), max.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            while !stop2.is_cancelled() {
                tick.tick().await;
                for &p in &pids {
                    if let Some(m) = rss_mib(p) {
                        let mut max = max2.lock().expect("memory lock");
                        let e = max.entry(p).or_default();
                        *e = e.max(m);
                    }
                }
            }
        });
        Self { before, max, stop }
    }

    fn finish(self) -> Vec<Memory> {
        self.stop.cancel();
        let max = self.max.lock().expect("memory lock");
        self.before
            .iter()
            .map(|&(pid, before_mib)| Memory {
                pid,
                before_mib,
                max_mib: max.get(&pid).copied().unwrap_or(before_mib),
            })
            .collect()
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn legit_load(opts: &AttackOptions, duration: Duration) -> LoadOptions {
    LoadOptions {
        url: opts.url.clone(),
        clients: opts.legit_clients,
        fps: opts.legit_fps,
        duration,
        client_prefix: opts.client_prefix.clone(),
        token: opts.token.clone(),
        frames: vec![opts.frame.clone()],
        encoding: Encoding::MsgPack,
    }
}

/// The edge's address, from its URL, for raw sockets.
async fn resolve(url: &str) -> Result<SocketAddr, String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("{url}: {e}"))?;
    let host = parsed
        .host_str()
        .ok_or_else(|| format!("{url}: no host"))?
        .trim_matches(['[', ']']);
    let port = parsed
        .port_or_known_default()
        .ok_or_else(|| format!("{url}: no port"))?;
    tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("{url}: {e}"))?
        .next()
        .ok_or_else(|| format!("{url}: the host has no address"))
}

async fn hostile_sockets(opts: &AttackOptions, addr: SocketAddr) -> (Vec<SocketKindReport>, usize) {
    let sources: Vec<Option<IpAddr>> = if opts.sources == 0 || !addr.ip().is_loopback() {
        vec![None]
    } else {
        (0..opts.sources)
            .map(|i| Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i))))
            .collect()
    };
    let until = Instant::now() + opts.hold;
    let n_auth = opts.hostile_authenticated();
    let per_kind = [
        (sockets::Kind::AuthenticatedNonReader, n_auth),
        (sockets::Kind::PingFlood, (opts.sockets - n_auth) / 2),
        (
            sockets::Kind::NoHello,
            opts.sockets - n_auth - (opts.sockets - n_auth) / 2,
        ),
    ];
    let mut tasks = Vec::new();
    let mut i = 0usize;
    for (kind, count) in per_kind {
        for k in 0..count {
            let target = sockets::Target {
                url: opts.url.clone(),
                addr,
                source: sources[i % sources.len()],
            };
            i += 1;
            let creds = (kind == sockets::Kind::AuthenticatedNonReader)
                .then(|| (format!("{}{k}", opts.hostile_prefix), opts.token.clone()));
            tasks.push(tokio::spawn(async move {
                (kind, sockets::run(&target, kind, creds, until).await)
            }));
            // Open them over about two seconds rather than in one burst.
            if i.is_multiple_of(50) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let mut outcomes: BTreeMap<sockets::Kind, Vec<sockets::Outcome>> = BTreeMap::new();
    for t in tasks {
        if let Ok((kind, outcome)) = t.await {
            outcomes.entry(kind).or_default().push(outcome);
        }
    }
    let reports = sockets::Kind::ALL
        .iter()
        .map(|&kind| {
            let list = outcomes.remove(&kind).unwrap_or_default();
            let mut closes: Vec<f64> = list
                .iter()
                .filter_map(|o| match o {
                    sockets::Outcome::Closed { after }
                    | sockets::Outcome::RefusedAtAccept { after } => Some(after.as_secs_f64()),
                    _ => None,
                })
                .collect();
            closes.sort_by(f64::total_cmp);
            let count = |f: fn(&sockets::Outcome) -> bool| list.iter().filter(|o| f(o)).count();
            SocketKindReport {
                kind,
                sockets: list.len(),
                connect_failed: count(|o| matches!(o, sockets::Outcome::ConnectFailed)),
                refused_at_accept: count(|o| matches!(o, sockets::Outcome::RefusedAtAccept { .. })),
                closed: count(|o| matches!(o, sockets::Outcome::Closed { .. })),
                still_open: count(|o| matches!(o, sockets::Outcome::StillOpen)),
                p50_close_s: percentile(&closes, 0.5),
                max_close_s: closes.last().copied().unwrap_or(0.0),
            }
        })
        .collect();
    (reports, sources.len())
}

/// Answers a hostile frame may get because of load rather than because of what it is.
const LOAD_ANSWERS: [&str; 4] = [
    "superseded",
    "rate_limited",
    "expired",
    "broker_unavailable",
];

async fn hostile_jpegs(opts: &AttackOptions) -> Result<JpegReport, String> {
    let set = Arc::new(jpegs::set());
    let client = format!("{}jpeg", opts.client_prefix);
    // The edge may still be refusing sessions while the previous phase's backlog drains
    // (system_full): retry for a while.
    let give_up = Instant::now() + Duration::from_secs(60);
    let conn = loop {
        match Connection::connect(&opts.url, &client, &opts.token, Encoding::MsgPack).await {
            Ok((conn, _)) => break conn,
            Err(e) if Instant::now() < give_up => {
                tracing::info!(error = %e, "the JPEG client retries");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(e) => return Err(format!("the JPEG client {client} cannot connect: {e}")),
        }
    };
    let (mut tx, mut rx) = conn.split();
    let starts: Vec<Option<u64>> = opts.worker_pids.iter().map(|&p| start_time(p)).collect();
    let watch = MemoryWatch::start(&opts.worker_pids);
    let answers: Arc<Mutex<BTreeMap<u64, String>>> = Arc::default();
    let reader = {
        let answers = answers.clone();
        tokio::spawn(async move {
            while let Some(Ok(msg)) = rx.recv().await {
                let (seq, answer) = match msg {
                    Incoming::Msg(ServerMsg::Result { seq, .. }) => (seq, "result".to_owned()),
                    Incoming::Msg(ServerMsg::Dropped {
                        seq,
                        reason,
                        detail,
                    }) => {
                        // The detail's first clause: numbers vary, the kind of problem does not.
                        let detail: String = detail
                            .split([':', ';'])
                            .take(2)
                            .collect::<Vec<_>>()
                            .join(":");
                        (
                            seq,
                            format!("dropped {}: {}", reason.as_str(), detail.trim()),
                        )
                    }
                    Incoming::Closed { .. } => break,
                    Incoming::Msg(_) => continue,
                };
                answers.lock().expect("answers lock").insert(seq, answer);
            }
        })
    };
    let mut unexpected_probe = Vec::new();
    let period = Duration::from_secs_f64(1.0 / opts.jpeg_fps.max(0.1));
    let started = Instant::now();
    let mut next = started;
    let mut sent = 0u64;
    while started.elapsed() < opts.jpeg_duration {
        tokio::time::sleep_until(next.into()).await;
        let frame = &set[(sent as usize) % set.len()];
        sent += 1;
        let send = tx.send_frame(sent, crate::wire::now_ms(), &frame.bytes);
        match tokio::time::timeout(Duration::from_secs(5), send).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("the JPEG client's socket failed: {e}")),
            Err(_) => return Err("the edge stopped reading the JPEG client's frames".into()),
        }
        next += period;
    }
    // Every frame's answer, within a bound.
    let grace = Instant::now() + Duration::from_secs(15);
    while answers.lock().expect("answers lock").len() < sent as usize && Instant::now() < grace {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let streamed = sent;
    // The probe: each frame alone, its answer awaited (bounded).
    let mut probe = BTreeMap::new();
    for frame in set.iter() {
        sent += 1;
        let send = tx.send_frame(sent, crate::wire::now_ms(), &frame.bytes);
        if !matches!(
            tokio::time::timeout(Duration::from_secs(5), send).await,
            Ok(Ok(()))
        ) {
            return Err("the JPEG client's socket failed during the probe".into());
        }
        let wait_until = Instant::now() + Duration::from_secs(20);
        let answer = loop {
            if let Some(a) = answers.lock().expect("answers lock").get(&sent) {
                break a.clone();
            }
            if Instant::now() > wait_until {
                break "no answer".to_owned();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if !answer.starts_with(frame.expect) {
            unexpected_probe.push(format!(
                "probe {}: {answer} (expected {})",
                frame.name, frame.expect
            ));
        }
        probe.insert(frame.name.to_owned(), answer);
    }
    reader.abort();
    tx.close().await;
    let workers = watch.finish();
    let worker_restarts = opts
        .worker_pids
        .iter()
        .zip(&starts)
        .filter(|(p, s)| start_time(**p) != **s || s.is_none())
        .count();
    let answers: BTreeMap<u64, String> = answers
        .lock()
        .expect("answers lock")
        .range(..=streamed)
        .map(|(s, a)| (*s, a.clone()))
        .collect();
    let mut by_frame: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    let mut unexpected = unexpected_probe;
    for (seq, answer) in &answers {
        let frame = &set[((seq - 1) as usize) % set.len()];
        *by_frame
            .entry(frame.name.to_owned())
            .or_default()
            .entry(answer.clone())
            .or_default() += 1;
        let load = LOAD_ANSWERS
            .iter()
            .any(|r| answer.starts_with(&format!("dropped {r}")));
        if !load && !answer.starts_with(frame.expect) {
            unexpected.push(format!(
                "{}: {answer} (expected {})",
                frame.name, frame.expect
            ));
        }
    }
    unexpected.sort();
    unexpected.dedup();
    Ok(JpegReport {
        fps: opts.jpeg_fps,
        duration_s: opts.jpeg_duration.as_secs_f64(),
        sent: streamed,
        answered: answers.len() as u64,
        unanswered: streamed.saturating_sub(answers.len() as u64),
        answers: by_frame,
        probe,
        unexpected,
        workers,
        worker_restarts,
    })
}

fn checks(r: &AttackReport, b: &Budgets) -> Vec<Check> {
    let mut out = Vec::new();
    let mut check = |what: &str, pass: bool, detail: String| {
        out.push(Check {
            what: what.to_owned(),
            pass,
            detail,
        })
    };
    let u = &r.under_attack;
    check(
        "legitimate clients connect and get results under attack",
        u.errors == 0 && u.results > 0,
        format!("{} results, errors {:?}", u.results, u.errors_by_kind),
    );
    check(
        "legitimate p99 within the factor of unloaded",
        u.p99_ms <= b.p99_factor * r.unloaded.p99_ms.max(1.0),
        format!(
            "{:.1} ms under attack, {:.1} ms unloaded (budget {}x)",
            u.p99_ms, r.unloaded.p99_ms, b.p99_factor
        ),
    );
    for m in &r.edges {
        check(
            "edge memory within budget",
            m.max_mib <= b.edge_rss_mib,
            format!(
                "pid {} at most {:.1} MiB (budget {} MiB)",
                m.pid, m.max_mib, b.edge_rss_mib
            ),
        );
    }
    for k in &r.sockets {
        let bound = if k.kind == sockets::Kind::AuthenticatedNonReader {
            b.authenticated_close_s
        } else {
            b.unauthenticated_close_s
        };
        check(
            &format!("every {} socket closed within its bound", k.kind.as_str()),
            k.still_open == 0 && k.max_close_s <= bound && k.sockets > 0,
            format!(
                "{} of {} closed or refused, slowest {:.1} s (bound {bound} s)",
                k.closed + k.refused_at_accept,
                k.sockets,
                k.max_close_s
            ),
        );
    }
    let j = &r.jpegs;
    check(
        "every hostile frame answered",
        j.unanswered == 0 && j.sent > 0,
        format!("{} sent, {} answered", j.sent, j.answered),
    );
    check(
        "every hostile frame answered as expected",
        j.unexpected.is_empty(),
        if j.unexpected.is_empty() {
            "yes".into()
        } else {
            j.unexpected.join("; ")
        },
    );
    for m in &j.workers {
        check(
            "worker memory rise within budget",
            m.max_mib - m.before_mib <= b.worker_rss_rise_mib,
            format!(
                "pid {} +{:.1} MiB (budget {} MiB)",
                m.pid,
                m.max_mib - m.before_mib,
                b.worker_rss_rise_mib
            ),
        );
    }
    check(
        "no worker restarted",
        j.worker_restarts == 0,
        format!("{} restarts", j.worker_restarts),
    );
    out
}

/// Run the whole suite; `progress` hears each phase as it starts.
pub async fn run(opts: AttackOptions, progress: impl Fn(&str)) -> Result<AttackReport, String> {
    let addr = resolve(&opts.url).await?;
    progress("unloaded: legitimate clients alone");
    let unloaded = loadgen::run(legit_load(&opts, opts.unloaded), |_, _| {}).await;
    if unloaded.results == 0 {
        return Err(format!(
            "the legitimate clients got no results unloaded (errors {:?}): check --url, \
             --client-prefix and --token",
            unloaded.errors_by_kind
        ));
    }
    progress("hostile sockets, with the legitimate clients streaming");
    let edge_watch = MemoryWatch::start(&opts.edge_pids);
    let legit = tokio::spawn(loadgen::run(legit_load(&opts, opts.hold), |_, _| {}));
    let (sockets, sources) = hostile_sockets(&opts, addr).await;
    let under_attack = legit.await.map_err(|e| e.to_string())?;
    let edges = edge_watch.finish();
    progress("hostile JPEGs");
    let jpegs = hostile_jpegs(&opts).await?;
    let mut report = AttackReport {
        unloaded,
        under_attack,
        sockets,
        sources,
        edges,
        jpegs,
        budgets: opts.budgets.clone(),
        checks: Vec::new(),
    };
    report.checks = checks(&report, &opts.budgets);
    Ok(report)
}
