//! The audit writer, as a service: `start` opens the store, compares the log with the newest
//! checkpoint and consumes the audit queue (`Link`, made again by `reconnect`); `serve` and
//! `handle` store each delivery (a session change checked first), publish its checkpoint and
//! its webhook jobs (`Hooks`), then ack it. `AuditHandle` is the running writer.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use prometheus::Registry;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::checkpoints::Checkpoints;
use super::verify::against_checkpoint;
use super::{AuditError, AuditStore, Note, Verification, io, newest_checkpoint, notes, signing};
use crate::broker::{Broker, Delivery};
use crate::config::Config;
use crate::metrics::{AuditMetrics, BrokerMetrics};
use crate::telemetry::{self, Health};
use crate::topology::Topology;
use crate::wire::{Envelope, Payload};

/// A running audit writer.
pub struct AuditHandle {
    pub metrics_addr: SocketAddr,
    /// Where the read API listens (`VIGIL_AUDIT_API_LISTEN`), when it does.
    pub api_addr: Option<SocketAddr>,
    task: tokio::task::JoinHandle<Result<(), AuditError>>,
    webhooks: Option<tokio::task::JoinHandle<Result<(), String>>>,
}

impl AuditHandle {
    pub async fn join(self) -> Result<(), AuditError> {
        let written = crate::telemetry::join_service(self.task, AuditError::Panicked).await;
        if let Some(hooks) = self.webhooks {
            // The writer is done; the deliveries in flight end within their own bounds.
            match hooks.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "webhook delivery ended"),
                Err(e) if e.is_cancelled() => {}
                Err(e) => tracing::warn!(error = %e, "webhook delivery panicked"),
            }
        }
        written
    }

    /// Stop the writer at once, as a crash would (tests).
    pub fn abort(&self) {
        self.task.abort();
        if let Some(h) = &self.webhooks {
            h.abort();
        }
    }
}

/// Start the audit writer: consume the audit queue into the store at `cfg.evidence_dir`.
pub async fn start(
    cfg: Config,
    registry: Registry,
    shutdown: CancellationToken,
) -> Result<AuditHandle, AuditError> {
    let health = Health::new(&["broker", "topology", "storage"]);
    let metrics_addr = telemetry::serve_metrics(
        cfg.metrics_listen,
        telemetry::HttpLimits::of(&cfg),
        registry.clone(),
        health.clone(),
        shutdown.clone(),
    )
    .await
    .map_err(io(Path::new("metrics endpoint")))?;
    let metrics = AuditMetrics::new(&registry);
    let dir = cfg.evidence_dir.clone();
    let signer = cfg
        .audit_key
        .as_deref()
        .map(signing::load_private)
        .transpose()?;
    if signer.is_none() {
        tracing::warn!("VIGIL_AUDIT_KEY is not set: audit entries are hash-chained but not signed");
    }
    let mut store = tokio::task::spawn_blocking(move || AuditStore::open_with(&dir, signer))
        .await
        .map_err(|e| io(Path::new("audit store"))(std::io::Error::other(e.to_string())))??;
    store.limit_evidence(
        (cfg.audit_evidence_mb_per_client_day > 0)
            .then(|| cfg.audit_evidence_mb_per_client_day.saturating_mul(1 << 20)),
        Some(metrics.evidence_withheld.clone()),
    );
    health.set("storage", true);
    let topo = cfg.topology()?;
    let broker_metrics = BrokerMetrics::new(&registry);
    let broker = Broker::connect_with_retry(
        &cfg.amqp_url,
        "audit-writer",
        broker_metrics.clone(),
        Duration::from_millis(cfg.broker_connect_timeout_ms),
    )
    .await?;
    health.set("broker", true);
    let trust = broker.trust(cfg.broker_roles, &cfg.namespace);
    let link = Link::open(broker, &cfg, &topo).await?;
    health.set("topology", true);
    // The newest valid checkpoint says how long the log was. A log behind it, or differing
    // from it, lost entries: that is reported (and stays visible to `verify`, which finds the
    // same checkpoint), but never keeps the writer from starting: a checkpoint is evidence
    // about the log, not a lock on it.
    let key = store.signer.as_ref().map(SigningKey::verifying_key);
    let scan = newest_checkpoint(
        &link.broker,
        &cfg.names().audit_checkpoints(),
        &trust,
        key.as_ref(),
        cfg.broker_roles == crate::roles::RoleMode::Shared,
        Duration::from_millis(cfg.audit_checkpoint_scan_ms),
    )
    .await?;
    if scan.ignored > 0 {
        tracing::warn!(
            ignored = scan.ignored,
            read = scan.read,
            "the checkpoint stream holds messages that are not this writer's valid checkpoints"
        );
    }
    if !scan.complete {
        tracing::warn!(
            read = scan.read,
            "the checkpoint stream was not read to its end within VIGIL_AUDIT_CHECKPOINT_SCAN_MS"
        );
    }
    if let Some(newest) = &scan.newest
        && let Some(Verification::Broken { line, problem, .. }) =
            against_checkpoint(&cfg.evidence_dir, store.len(), newest)?
    {
        metrics.checkpoint_conflicts.inc();
        // Signed, the checkpoint is the writer's own word: the loss goes into the log, where
        // entries appended later cannot hide it. Unsigned, anyone could have published it.
        let noted = notes(&cfg.evidence_dir)?.iter().any(|n| {
            matches!(n, Note::Gap { checkpoint_seq, checkpoint_hash, .. }
                if *checkpoint_seq == newest.seq && *checkpoint_hash == newest.hash)
        });
        if key.is_some() && !noted {
            store.note(&Note::Gap {
                entry_id: Uuid::now_v7(),
                entries: store.len(),
                checkpoint_seq: newest.seq,
                checkpoint_hash: newest.hash.clone(),
                problem: problem.clone(),
                written_at_ms: crate::wire::now_ms(),
            })?;
        }
        tracing::error!(
            line,
            checkpoint = newest.seq,
            entries = store.len(),
            signed = key.is_some(),
            "the audit log does not match its newest checkpoint: {problem}. `vigil audit verify` \
             reports it until the log is restored"
        );
    }
    // The console's audit views, read through this writer's API: checked against the writer's
    // own key (or the configured public key, for a log signed before).
    let view_key = key.or(cfg
        .audit_public_key
        .as_deref()
        .map(signing::load_public)
        .transpose()?);
    let views = Arc::new(
        super::view::Views::new(
            cfg.evidence_dir.clone(),
            view_key,
            cfg.audit_api.max_bytes as u64,
        )
        .limit_entries(cfg.audit_api.max_entries, metrics.api_truncated.clone()),
    );
    let api_addr = super::api::serve(&cfg, views, metrics.clone(), shutdown.clone())
        .await
        .map_err(AuditError::Api)?;
    if let Some(addr) = api_addr {
        tracing::info!(%addr, tls = cfg.audit_api.tls_cert.is_some(), "audit read API listening");
    }
    let mut link = link.consume().await?;
    tracing::info!(queue = %link.queue, dir = %cfg.evidence_dir.display(), entries = store.len(), "audit writer consuming");
    let store = Arc::new(Mutex::new(store));
    // Webhooks are delivered beside the writer, on their own connection: a slow receiver never
    // holds up the trail. A secret or CA file that cannot be read stops the start.
    let webhooks = if cfg.webhooks.enabled() {
        cfg.webhooks.load_secret().map_err(AuditError::Webhooks)?;
        crate::webhooks::http_client(&cfg.webhooks).map_err(AuditError::Webhooks)?;
        let log = store.clone();
        let lookup: crate::webhooks::EntryLookup =
            Arc::new(move |id| log.lock().unwrap_or_else(|e| e.into_inner()).entry(id));
        let task = crate::webhooks::deliver(
            cfg.clone(),
            metrics.webhooks.clone(),
            broker_metrics.clone(),
            lookup,
            shutdown.clone(),
        );
        Some(tokio::spawn(async move {
            let ended = task.await;
            if let Err(e) = &ended {
                tracing::error!(error = %e, "webhook delivery stopped");
            }
            ended
        }))
    } else {
        None
    };
    let retention = (cfg.audit_retention_days > 0)
        .then(|| Duration::from_secs(u64::from(cfg.audit_retention_days) * 86_400));
    let task = tokio::spawn(async move {
        loop {
            let result = serve(&mut link, &store, &trust, retention, &metrics, &shutdown).await;
            link.close().await;
            match result {
                Ok(()) => return Ok(()),
                // The broker went away: reconnect and go on. Whatever was delivered and not
                // acked comes again, and the log skips what it holds already.
                Err(AuditError::Broker(e)) if !shutdown.is_cancelled() => {
                    tracing::warn!(error = %e, "lost the broker; reconnecting");
                    health.set("broker", false);
                    match reconnect(&cfg, &topo, &broker_metrics, &shutdown).await {
                        Some(fresh) => {
                            health.set("broker", true);
                            tracing::info!("audit writer reconnected to the broker");
                            link = fresh;
                        }
                        None => return Ok(()),
                    }
                }
                Err(AuditError::Broker(_)) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    });
    Ok(AuditHandle {
        metrics_addr,
        api_addr,
        task,
        webhooks,
    })
}

/// Run until `shutdown`.
pub async fn run(
    cfg: Config,
    registry: Registry,
    shutdown: CancellationToken,
) -> Result<(), AuditError> {
    start(cfg, registry, shutdown).await?.join().await
}

/// The writer's connection: the audit queue's consumer and the checkpoints' publisher.
struct Link {
    broker: Broker,
    checkpoints: Checkpoints,
    /// Publishes the webhook jobs of each written entry, when webhooks are on.
    webhooks: Option<Hooks>,
    consumer: Option<crate::broker::Consumer>,
    queue: String,
}

impl Link {
    /// Check (or declare) what the writer needs, and make the checkpoints' publisher.
    async fn open(broker: Broker, cfg: &Config, topo: &Topology) -> Result<Self, AuditError> {
        cfg.put_policies(&topo.shared(&cfg.namespace)).await?;
        cfg.put_policies(&topo.checkpoints(&cfg.namespace)).await?;
        broker
            .prepare(&topo.shared(&cfg.namespace), cfg.broker_roles)
            .await?;
        broker
            .prepare(&topo.checkpoints(&cfg.namespace), cfg.broker_roles)
            .await?;
        let checkpoints = Checkpoints {
            publisher: broker.publisher().await?,
            exchange: cfg.names().audit_checkpoints(),
        };
        let webhooks = if cfg.webhooks.enabled() {
            Some(Hooks {
                publisher: broker.publisher().await?,
                cfg: cfg.webhooks.clone(),
                names: cfg.names(),
            })
        } else {
            None
        };
        Ok(Self {
            broker,
            checkpoints,
            webhooks,
            consumer: None,
            queue: cfg.names().audit_queue(),
        })
    }

    /// Start consuming the audit queue.
    async fn consume(mut self) -> Result<Self, AuditError> {
        let consumer = self
            .broker
            .consume(&self.queue, "audit-writer", 16, true)
            .await?;
        self.consumer = Some(consumer);
        Ok(self)
    }

    async fn close(&self) {
        if let Some(c) = &self.consumer {
            c.close().await;
        }
        self.checkpoints.publisher.close().await;
        if let Some(h) = &self.webhooks {
            h.publisher.close().await;
        }
        self.broker.close().await;
    }
}

/// Connect again ([`crate::broker::relink`]) until it works or `shutdown`.
async fn reconnect(
    cfg: &Config,
    topo: &Topology,
    metrics: &BrokerMetrics,
    shutdown: &CancellationToken,
) -> Option<Link> {
    crate::broker::relink(
        &cfg.amqp_url,
        "audit-writer",
        metrics,
        shutdown,
        |b| async move { Link::open(b, cfg, topo).await?.consume().await },
    )
    .await
}

/// Where the writer publishes each written entry's webhook jobs.
struct Hooks {
    publisher: crate::broker::Publisher,
    cfg: crate::webhooks::WebhookConfig,
    names: crate::topology::Names,
}

impl Hooks {
    /// Publish the webhooks of the entry the envelope holds (written now, or before: a
    /// redelivered entry's jobs go out again, and receivers dedupe by `webhook-id`).
    async fn publish(
        &self,
        env: &Envelope,
        entry: crate::webhooks::EntryRef,
        metrics: &crate::metrics::WebhookMetrics,
    ) -> Result<(), AuditError> {
        use crate::webhooks::{Event, Job};
        let event = match &env.payload {
            Payload::Action(a) => Event::of_action(env, a, entry),
            Payload::AdminOp(op) => Event::of_admin(env, op, entry),
            Payload::Session(s) => Event::of_session(env, s, entry),
            _ => return Ok(()),
        };
        let jobs = Job::for_event(&self.cfg, &event);
        crate::webhooks::publish_jobs(&self.publisher, &self.names, &jobs).await?;
        metrics.published.inc_by(jobs.len() as u64);
        Ok(())
    }
}

/// Store what arrives until `shutdown` (Ok) or until the link fails (a broker error).
async fn serve(
    link: &mut Link,
    store: &Arc<Mutex<AuditStore>>,
    trust: &crate::roles::Trust,
    retention: Option<Duration>,
    metrics: &AuditMetrics,
    shutdown: &CancellationToken,
) -> Result<(), AuditError> {
    let Link {
        checkpoints,
        consumer,
        webhooks,
        ..
    } = link;
    let Some(consumer) = consumer.as_mut() else {
        return Ok(());
    };
    let mut prune = tokio::time::interval(Duration::from_secs(3600));
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let delivery = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = prune.tick(), if retention.is_some() => {
                let keep = retention.unwrap_or_default().as_millis() as u64;
                let before_ms = crate::wire::now_ms().saturating_sub(keep);
                let store = store.clone();
                let pruned = tokio::task::spawn_blocking(move || {
                    let mut store = store.lock().unwrap_or_else(|e| e.into_inner());
                    store.prune(before_ms).map(|r| (r, store.head()))
                })
                .await
                .map_err(|e| io(Path::new("audit store"))(std::io::Error::other(e.to_string())))??;
                let (report, head) = pruned;
                if report.files > 0 {
                    tracing::info!(files = report.files, actions = report.actions, bytes = report.bytes, "pruned old evidence");
                    metrics.pruned_files.inc_by(report.files as u64);
                    checkpoints.publish(&head, metrics).await;
                }
                continue;
            }
            d = consumer.next() => match d {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(e.into()),
                // The broker ended the consumer (the channel or the connection closed).
                None => return Err(AuditError::Broker(crate::broker::BrokerError::ConsumerEnded)),
            },
        };
        handle(
            &delivery,
            trust,
            store,
            checkpoints,
            webhooks.as_ref(),
            metrics,
        )
        .await?;
    }
    Ok(())
}

/// How an edge may end a session, as `SessionChange::reason` names it.
pub(crate) const SESSION_END_REASONS: [&str; 11] = [
    "closed",
    "connection_lost",
    "slow_reader",
    "idle",
    "replaced",
    "shutdown",
    "bad_messages",
    "flood",
    "signed_out",
    "blocked",
    "kicked",
];

/// What is wrong with a session's start or end, as the broker brought it: only what an edge
/// sends is written (a known event and reason, a tame client id, an address, a time that is
/// not in the future).
fn session_problem(env: &Envelope, s: &crate::wire::SessionChange, now_ms: u64) -> Option<String> {
    const DAY_MS: u64 = 86_400_000;
    if crate::directory::check_client_id(&env.client_id).is_err() {
        return Some("a malformed client id".into());
    }
    match (s.event.as_str(), s.reason.as_str()) {
        ("started", "") => {}
        ("ended", r) if SESSION_END_REASONS.contains(&r) => {}
        _ => return Some("an unknown event or reason".into()),
    }
    if !s.address.is_empty() && s.address.parse::<std::net::IpAddr>().is_err() {
        return Some("a malformed address".into());
    }
    if s.at_ms > now_ms + DAY_MS || env.source.len() > 128 {
        return Some("a time in the future or an oversized source".into());
    }
    None
}

/// Store one delivery, then settle it. Storage failures stop the writer (the delivery stays
/// unacked and is redelivered to the next writer).
async fn handle(
    delivery: &Delivery,
    trust: &crate::roles::Trust,
    store: &Arc<Mutex<AuditStore>>,
    checkpoints: &Checkpoints,
    hooks: Option<&Hooks>,
    metrics: &AuditMetrics,
) -> Result<(), AuditError> {
    let env = match Envelope::decode(delivery.data()) {
        Ok(env)
            if matches!(
                env.payload,
                Payload::Action(_) | Payload::AdminOp(_) | Payload::Session(_)
            ) =>
        {
            env
        }
        other => {
            tracing::warn!(error = ?other.err(), "not an action event; dead-lettering");
            metrics.rejected.inc();
            let _ = delivery.dead_letter().await;
            return Ok(());
        }
    };
    // Who may put what in the trail: an edge its own actions and sessions (the envelope's
    // source is the edge), an admin its operators' notes (and actions, from tools).
    let kind = match &env.payload {
        Payload::Action(_) => crate::roles::Kind::Action,
        Payload::AdminOp(_) => crate::roles::Kind::Note,
        _ => crate::roles::Kind::Session,
    };
    if !trust.admits_for(kind, delivery.user_id(), &env.source) {
        metrics.rejected.inc();
        let _ = delivery.dead_letter().await;
        return Ok(());
    }
    if let Payload::Session(s) = &env.payload
        && let Some(why) = session_problem(&env, s, crate::wire::now_ms())
    {
        tracing::warn!(client = %env.client_id.escape_debug(), source = %env.source.escape_debug(), %why, "a session event refused; dead-lettering");
        metrics.rejected.inc();
        let _ = delivery.dead_letter().await;
        return Ok(());
    }
    let started = Instant::now();
    let store = store.clone();
    let admin_op = matches!(env.payload, Payload::AdminOp(_) | Payload::Session(_));
    let fingerprint: [u8; 32] = Sha256::digest(delivery.data()).into();
    let (written, head, entry, env, same) = tokio::task::spawn_blocking(move || {
        let mut store = store.lock().unwrap_or_else(|e| e.into_inner());
        let written = match &env.payload {
            Payload::Action(event) => store.store(&env, event),
            Payload::AdminOp(op) => store.note(&Note::Admin {
                entry_id: env.id,
                operator: op.operator.clone(),
                operation: op.operation.clone(),
                client_id: env.client_id.clone(),
                source: env.source.clone(),
                detail: op.detail.clone(),
                at_ms: op.at_ms,
                written_at_ms: crate::wire::now_ms(),
            }),
            Payload::Session(s) => store.note(&Note::Session {
                entry_id: env.id,
                client_id: env.client_id.clone(),
                source: env.source.clone(),
                session: format!("{:016x}", s.session),
                event: s.event.clone(),
                reason: s.reason.clone(),
                address: s.address.clone(),
                at_ms: s.at_ms,
                written_at_ms: crate::wire::now_ms(),
            }),
            _ => unreachable!("checked above"),
        };
        let id = match &env.payload {
            Payload::Action(a) => a.action_id,
            _ => env.id,
        };
        let entry = store.entry(&id);
        written.map(|w| {
            let same = if w {
                store.fingerprints.remember(id, fingerprint);
                Some(true)
            } else {
                store.same_message(&id, &fingerprint)
            };
            (w, store.head(), entry, env, same)
        })
    })
    .await
    .map_err(|e| io(Path::new("audit store"))(std::io::Error::other(e.to_string())))??;
    if written && admin_op {
        checkpoints.publish(&head, metrics).await;
        metrics.notes.inc();
    } else if written {
        checkpoints.publish(&head, metrics).await;
        metrics.records.inc();
        metrics
            .write_seconds
            .observe(started.elapsed().as_secs_f64());
    } else {
        metrics.duplicates.inc();
    }
    // A second message with an entry's id: the same message again (a publisher's retry, or a
    // redelivery after a crash) has its webhooks sent again, since they may not have gone
    // out; another message is refused, so the exam platform never hears of what the trail does
    // not hold. An entry written before this writer started has no fingerprint here: only the
    // broker's redelivery (a message delivered before and never acked) is taken as the same.
    let resend = match same {
        Some(true) => true,
        Some(false) => {
            tracing::warn!(client = %env.client_id.escape_debug(), source = %env.source.escape_debug(), "a different message reuses a written entry's id; dead-lettering");
            metrics.rejected.inc();
            let _ = delivery.dead_letter().await;
            return Ok(());
        }
        None => delivery.redelivered(),
    };
    // The webhooks go out before the entry's message is acked: if publishing them fails, the
    // writer reconnects and the entry comes again, and so do they.
    if let (Some(hooks), Some(entry), true) = (hooks, entry, resend) {
        hooks.publish(&env, entry, &metrics.webhooks).await?;
    }
    delivery.ack().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_session_events_an_edge_sends_are_written() {
        let now = 1_765_000_000_000;
        let env = |client: &str, event: &str, reason: &str, address: &str, at_ms: u64| {
            let s = crate::wire::SessionChange {
                session: 7,
                event: event.into(),
                reason: reason.into(),
                at_ms,
                address: address.into(),
            };
            let e = Envelope {
                schema: crate::wire::SCHEMA,
                id: Uuid::now_v7(),
                source: "edge-1".into(),
                seq: 1,
                client_id: client.into(),
                produced_at_ms: at_ms,
                deadline_ms: 0,
                traceparent: String::new(),
                payload: Payload::Session(s.clone()),
            };
            session_problem(&e, &s, now)
        };
        assert_eq!(env("c1", "started", "", "203.0.113.9", now), None);
        assert_eq!(env("c1", "ended", "signed_out", "2001:db8::1", now), None);
        assert_eq!(env("c1", "ended", "closed", "", now - 3_600_000), None);
        for bad in [
            env("../c1", "started", "", "", now),
            env("c1", "hijacked", "", "", now),
            env("c1", "started", "closed", "", now),
            env("c1", "ended", "anything", "", now),
            env("c1", "ended", "closed", "not an address", now),
            env("c1", "started", "", "", u64::MAX),
        ] {
            assert!(bad.is_some());
        }
    }

    #[tokio::test]
    async fn a_panicking_writer_task_is_an_error_and_an_aborted_one_is_not() {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let panicking = AuditHandle {
            metrics_addr: addr,
            api_addr: None,
            task: tokio::spawn(async { panic!("disk on fire") }),
            webhooks: None,
        };
        match panicking.join().await {
            Err(AuditError::Panicked(message)) => assert_eq!(message, "disk on fire"),
            other => panic!("{other:?}"),
        }
        let aborted = AuditHandle {
            metrics_addr: addr,
            api_addr: None,
            task: tokio::spawn(std::future::pending()),
            webhooks: Some(tokio::spawn(std::future::pending())),
        };
        aborted.abort();
        assert!(aborted.join().await.is_ok());
    }
}
