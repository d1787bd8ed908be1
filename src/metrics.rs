//! Every Prometheus metric Vigil exports, in one place.
//!
//! Names follow `vigil_<subsystem>_<noun>_<unit>[_total]`. Labels carry bounded sets (reasons,
//! model names), never client ids. The registry is built in each binary's `main` and passed down;
//! nothing here is global.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// Latency buckets from 0.5 ms to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048,
    4.096, 10.0,
];

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("valid metric");
    registry
        .register(Box::new(h.clone()))
        .expect("metric registered once");
    h
}

fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("valid metric");
    registry
        .register(Box::new(h.clone()))
        .expect("metric registered once");
    h
}

/// Metrics of the AMQP client, shared by every binary.
#[derive(Clone)]
pub struct BrokerMetrics {
    pub confirm_seconds: Histogram,
    pub reconnects: IntCounter,
    pub publish_failures: IntCounter,
    pub handshake_timeouts: IntCounter,
    pub untrusted: IntCounterVec,
}

impl BrokerMetrics {
    pub fn new(registry: &Registry) -> Self {
        Self {
            confirm_seconds: histogram(
                registry,
                "vigil_broker_confirm_seconds",
                "Time from publish to the broker's confirm",
                LATENCY_BUCKETS,
            ),
            reconnects: counter(
                registry,
                "vigil_broker_reconnects_total",
                "Connections to the broker re-established after a loss",
            ),
            publish_failures: counter(
                registry,
                "vigil_broker_publish_failures_total",
                "Publishes that failed or were nacked by the broker",
            ),
            handshake_timeouts: counter(
                registry,
                "vigil_broker_handshake_timeouts_total",
                "Connection attempts abandoned because the broker did not finish the handshake in time",
            ),
            untrusted: counter_vec(
                registry,
                "vigil_broker_untrusted_messages_total",
                "Messages dropped because their publisher's role may not send that kind",
                &["kind"],
            ),
        }
    }
}

/// Metrics of an edge node.
#[derive(Clone)]
pub struct EdgeMetrics {
    pub sessions_active: IntGauge,
    pub sessions_refused: IntCounterVec,
    pub session_tokens_refused: IntCounter,
    pub capture_reports: IntCounterVec,
    pub session_tokens_minted: IntCounter,
    pub frames_received: IntCounter,
    pub frames_published: IntCounter,
    pub frames_dropped: IntCounterVec,
    pub results_delivered: IntCounter,
    pub results_orphaned: IntCounter,
    pub results_duplicate: IntCounter,
    pub bad_messages: IntCounterVec,
    pub http_requests: IntCounterVec,
    pub frame_latency_seconds: Histogram,
    pub verdicts: IntCounterVec,
    pub actions: IntCounterVec,
    pub actions_unaudited: IntCounter,
    pub session_events_unaudited: IntCounter,
    pub control_applied: IntCounterVec,
    pub challenges: IntCounterVec,
    pub suspicions: IntCounterVec,
    pub system_full: IntGauge,
    pub work_backlog: IntGauge,
    pub throttles: IntCounter,
    pub slow_readers: IntCounter,
    pub idle_closed: IntCounter,
    pub broker_blocked: IntGauge,
    pub admin_tls_failed: IntCounter,
    pub admin_connections_refused: IntCounterVec,
    pub admin_forbidden: IntCounterVec,
    pub audit_views_refused: IntCounter,
    pub audit_api_failed: IntCounterVec,
    pub lease_failures: IntCounter,
    pub audits_pending: IntGauge,
}

impl EdgeMetrics {
    pub fn new(registry: &Registry) -> Self {
        Self {
            sessions_active: gauge(
                registry,
                "vigil_edge_sessions_active",
                "Client sessions currently open on this edge",
            ),
            sessions_refused: counter_vec(
                registry,
                "vigil_edge_sessions_refused_total",
                "Connections refused or closed before a session started, by reason",
                &["reason"],
            ),
            capture_reports: counter_vec(
                registry,
                "vigil_edge_capture_reports_total",
                "Clients' reports of their capture: camera_lost, encoder_failed, hidden, ok",
                &["state"],
            ),
            session_tokens_refused: counter(
                registry,
                "vigil_edge_session_tokens_refused_total",
                "Hellos with a session token that is forged, expired, for another client or deployment",
            ),
            session_tokens_minted: counter(
                registry,
                "vigil_edge_session_tokens_minted_total",
                "Session tokens minted by the admin API",
            ),
            frames_received: counter(
                registry,
                "vigil_edge_frames_received_total",
                "Frames received from clients",
            ),
            frames_published: counter(
                registry,
                "vigil_edge_frames_published_total",
                "Frames published to the broker and confirmed",
            ),
            frames_dropped: counter_vec(
                registry,
                "vigil_edge_frames_dropped_total",
                "Frames answered with `dropped`, by reason",
                &["reason"],
            ),
            results_delivered: counter(
                registry,
                "vigil_edge_results_delivered_total",
                "Results handed to client sessions",
            ),
            results_orphaned: counter(
                registry,
                "vigil_edge_results_orphaned_total",
                "Results whose session had gone away (or could not keep up), discarded",
            ),
            results_duplicate: counter(
                registry,
                "vigil_edge_results_duplicate_total",
                "Results for a frame that was already answered, discarded",
            ),
            http_requests: counter_vec(
                registry,
                "vigil_edge_http_requests_total",
                "Plain HTTP requests on the WebSocket listener (the candidate page), by status",
                &["status"],
            ),
            bad_messages: counter_vec(
                registry,
                "vigil_edge_bad_messages_total",
                "Client or broker messages that could not be parsed, by kind",
                &["kind"],
            ),
            frame_latency_seconds: histogram(
                registry,
                "vigil_edge_frame_latency_seconds",
                "Time from a frame's arrival at the edge to its result leaving the edge",
                LATENCY_BUCKETS,
            ),
            verdicts: counter_vec(
                registry,
                "vigil_edge_verdicts_total",
                "Per-frame verdicts delivered to clients, by verdict",
                &["verdict"],
            ),
            actions: counter_vec(
                registry,
                "vigil_edge_actions_total",
                "Actions the policy fired, by action",
                &["action"],
            ),
            actions_unaudited: counter(
                registry,
                "vigil_edge_actions_unaudited_total",
                "Actions that could not be handed to the audit exchange after retries",
            ),
            session_events_unaudited: counter(
                registry,
                "vigil_edge_session_events_unaudited_total",
                "Sessions' starts and ends left out of the audit trail because half the pending-audit budget was in use (actions keep the other half)",
            ),
            control_applied: counter_vec(
                registry,
                "vigil_edge_control_applied_total",
                "Control commands applied to a live session on this edge, by command",
                &["command"],
            ),
            challenges: counter_vec(
                registry,
                "vigil_edge_challenges_total",
                "Liveness challenges, by outcome (issued, passed, failed) and trigger",
                &["outcome", "trigger"],
            ),
            suspicions: counter_vec(
                registry,
                "vigil_edge_suspicions_total",
                "Suspicions raised by the passive liveness signals, by signal",
                &["signal"],
            ),
            system_full: gauge(
                registry,
                "vigil_edge_system_full",
                "1 while the system is full (new sessions refused, clients throttled)",
            ),
            work_backlog: gauge(
                registry,
                "vigil_edge_work_backlog",
                "Ready frames in the work queue, as last polled",
            ),
            throttles: counter(
                registry,
                "vigil_edge_throttles_total",
                "Throttle messages sent to clients",
            ),
            slow_readers: counter(
                registry,
                "vigil_edge_slow_readers_total",
                "Connections dropped because a write to them missed edge.write_timeout_ms",
            ),
            idle_closed: counter(
                registry,
                "vigil_edge_idle_closed_total",
                "Sessions closed because nothing arrived within edge.idle_timeout_ms",
            ),
            broker_blocked: gauge(
                registry,
                "vigil_edge_broker_blocked",
                "1 while RabbitMQ blocks this edge's publishers (a resource alarm)",
            ),
            admin_tls_failed: counter(
                registry,
                "vigil_edge_admin_tls_failures_total",
                "Admin API connections dropped because their TLS handshake failed or timed out",
            ),
            admin_connections_refused: counter_vec(
                registry,
                "vigil_edge_admin_connections_refused_total",
                "Admin API connections closed for want of a place, by reason: full (the listener \
                 held VIGIL_HTTP_MAX_CONNECTIONS), per_address (the address held \
                 VIGIL_HTTP_MAX_CONNECTIONS_PER_ADDRESS), evicted (a held one closed for an \
                 address holding fewer)",
                &["reason"],
            ),
            admin_forbidden: counter_vec(
                registry,
                "vigil_edge_admin_forbidden_total",
                "Admin API requests refused (403) because the operator's role is too low, by role",
                &["role"],
            ),
            audit_views_refused: counter(
                registry,
                "vigil_edge_audit_views_refused_total",
                "Audit-trail views refused (503) after waiting VIGIL_ADMIN_AUDIT_VIEW_WAIT_MS for a turn",
            ),
            audit_api_failed: counter_vec(
                registry,
                "vigil_edge_audit_api_failed_total",
                "Reads of the audit writer's API that failed, by reason: unset (no \
                 VIGIL_AUDIT_API_URL), unreachable, timeout (past VIGIL_ADMIN_AUDIT_VIEW_WAIT_MS), \
                 too_large (past VIGIL_AUDIT_API_MAX_BYTES, or a frame past \
                 VIGIL_EDGE_MAX_FRAME_BYTES), altered (an evidence frame or its entry changed \
                 after it was written), key (the writer checks under another key than \
                 VIGIL_AUDIT_PUBLIC_KEY), refused (the writer answered another error)",
                &["reason"],
            ),
            lease_failures: counter(
                registry,
                "vigil_edge_lease_failures_total",
                "Renewals of this edge's directory lease that failed (the directory was unreachable)",
            ),
            audits_pending: gauge(
                registry,
                "vigil_edge_audits_pending",
                "Actions on their way to the audit trail (published, waiting for the broker's confirm)",
            ),
        }
    }
}

/// The webhook deliveries of the audit writer.
#[derive(Clone)]
pub struct WebhookMetrics {
    /// Tries by outcome: `delivered`, `retried` (failed, waiting for the next try), `failed`
    /// (given up on, in `webhooks.failed`), `rejected` (not a job, or from an untrusted
    /// publisher).
    pub outcomes: IntCounterVec,
    pub request_seconds: Histogram,
    /// Jobs published for written entries.
    pub published: IntCounter,
}

impl WebhookMetrics {
    pub fn new(registry: &Registry) -> Self {
        Self {
            outcomes: counter_vec(
                registry,
                "vigil_audit_webhooks_total",
                "Webhook tries by outcome: delivered, retried, failed (given up on), rejected",
                &["outcome"],
            ),
            request_seconds: histogram(
                registry,
                "vigil_audit_webhook_request_seconds",
                "Time of one webhook request, answer or timeout",
                LATENCY_BUCKETS,
            ),
            published: counter(
                registry,
                "vigil_audit_webhook_jobs_total",
                "Webhook jobs published for written entries (one per entry and endpoint)",
            ),
        }
    }
}

/// Metrics of the audit writer.
#[derive(Clone)]
pub struct AuditMetrics {
    pub records: IntCounter,
    pub duplicates: IntCounter,
    pub rejected: IntCounter,
    pub write_seconds: Histogram,
    pub checkpoint_failures: IntCounter,
    pub checkpoint_conflicts: IntCounter,
    pub evidence_withheld: IntCounter,
    pub pruned_files: IntCounter,
    pub notes: IntCounter,
    pub webhooks: WebhookMetrics,
    pub api_refused: IntCounterVec,
    pub api_connections_refused: IntCounterVec,
    pub api_tls_failed: IntCounter,
    pub api_truncated: IntCounter,
}

impl AuditMetrics {
    pub fn new(registry: &Registry) -> Self {
        Self {
            records: counter(
                registry,
                "vigil_audit_records_total",
                "Actions written to the audit log with their evidence",
            ),
            duplicates: counter(
                registry,
                "vigil_audit_duplicates_total",
                "Redelivered actions already in the log, acked without writing",
            ),
            rejected: counter(
                registry,
                "vigil_audit_rejected_total",
                "Events on the audit queue that are not actions, dead-lettered",
            ),
            write_seconds: histogram(
                registry,
                "vigil_audit_write_seconds",
                "Time to store one action durably (evidence, record, log entry)",
                LATENCY_BUCKETS,
            ),
            checkpoint_failures: counter(
                registry,
                "vigil_audit_checkpoint_failures_total",
                "Checkpoints of the log's head the broker did not confirm within 5 s",
            ),
            checkpoint_conflicts: counter(
                registry,
                "vigil_audit_checkpoint_conflicts_total",
                "Starts at which the log fell short of, or differed from, its newest valid checkpoint",
            ),
            evidence_withheld: counter(
                registry,
                "vigil_audit_evidence_withheld_total",
                "Evidence frames not kept: their client was over VIGIL_AUDIT_EVIDENCE_MB_PER_CLIENT_DAY",
            ),
            pruned_files: counter(
                registry,
                "vigil_audit_pruned_files_total",
                "Evidence files removed past VIGIL_AUDIT_RETENTION_DAYS (their entries stay)",
            ),
            notes: counter(
                registry,
                "vigil_audit_admin_operations_total",
                "Administrators' operations written to the audit log",
            ),
            webhooks: WebhookMetrics::new(registry),
            api_refused: counter_vec(
                registry,
                "vigil_audit_api_refused_total",
                "Requests to the audit writer's read API refused, by reason: token (401, no or \
                 a wrong bearer token), busy (503, no turn within VIGIL_AUDIT_API_WAIT_MS)",
                &["reason"],
            ),
            api_connections_refused: counter_vec(
                registry,
                "vigil_audit_api_connections_refused_total",
                "Read API connections closed for want of a place, by reason (as for the admin API)",
                &["reason"],
            ),
            api_tls_failed: counter(
                registry,
                "vigil_audit_api_tls_failures_total",
                "Read API connections dropped because their TLS handshake failed or timed out",
            ),
            api_truncated: counter(
                registry,
                "vigil_audit_api_views_truncated_total",
                "Trail views cut to their newest VIGIL_AUDIT_API_MAX_ENTRIES entries",
            ),
        }
    }
}

/// Metrics of a worker.
#[derive(Clone)]
pub struct WorkerMetrics {
    pub frames_consumed: IntCounter,
    pub frames_analyzed: IntCounter,
    pub frames_expired: IntCounter,
    pub decode_errors: IntCounterVec,
    pub dead_lettered: IntCounterVec,
    pub inference_seconds: HistogramVec,
    pub inflight: IntGauge,
    pub redelivered: IntCounter,
    pub acks: IntCounter,
    pub batch_frames: Histogram,
}

impl WorkerMetrics {
    pub fn new(registry: &Registry) -> Self {
        Self {
            frames_consumed: counter(
                registry,
                "vigil_worker_frames_consumed_total",
                "Frame events taken from the work queue",
            ),
            acks: counter(
                registry,
                "vigil_worker_acks_total",
                "basic.ack frames sent; each covers every confirmed frame up to its tag",
            ),
            frames_analyzed: counter(
                registry,
                "vigil_worker_frames_analyzed_total",
                "Frames analysed and answered",
            ),
            frames_expired: counter(
                registry,
                "vigil_worker_frames_expired_total",
                "Frames past their deadline, answered `expired` without analysis",
            ),
            decode_errors: counter_vec(
                registry,
                "vigil_worker_decode_errors_total",
                "Events that could not be decoded, by kind (envelope; for frames: malformed, truncated, unsupported, too_many_scans, too_large, jpeg when the decoder itself failed)",
                &["kind"],
            ),
            dead_lettered: counter_vec(
                registry,
                "vigil_worker_dead_lettered_total",
                "Events rejected to the dead-letter exchange, by reason",
                &["reason"],
            ),
            inference_seconds: histogram_vec(
                registry,
                "vigil_worker_inference_seconds",
                "Time spent in each model (or analyzer stage) per frame",
                &["model"],
                LATENCY_BUCKETS,
            ),
            inflight: gauge(
                registry,
                "vigil_worker_frames_inflight",
                "Frames taken from the queue and not yet acked",
            ),
            redelivered: counter(
                registry,
                "vigil_worker_frames_redelivered_total",
                "Frames the broker delivered again (another worker died holding them)",
            ),
            batch_frames: histogram(
                registry,
                "vigil_worker_batch_frames",
                "Frames analysed together in one batch (worker.batch_max caps it)",
                &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0],
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `vigil_*` series the Grafana dashboard queries is one this build exports.
    #[test]
    fn dashboard_queries_only_exported_metrics() {
        let registry = Registry::new();
        let (_b, _e, _w) = (
            BrokerMetrics::new(&registry),
            EdgeMetrics::new(&registry),
            WorkerMetrics::new(&registry),
        );
        // Vectors appear in `gather` only once they have a child, so they are listed by name.
        let exported: Vec<String> = registry
            .gather()
            .iter()
            .map(|f| f.name().to_owned())
            .chain(
                [
                    "vigil_edge_sessions_refused_total",
                    "vigil_edge_frames_dropped_total",
                    "vigil_edge_bad_messages_total",
                    "vigil_worker_decode_errors_total",
                    "vigil_worker_dead_lettered_total",
                    "vigil_worker_inference_seconds",
                ]
                .map(String::from),
            )
            .collect();
        let dashboard = include_str!("../deploy/grafana/vigil-dashboard.json");
        let mut checked = 0;
        for (i, _) in dashboard.match_indices("vigil_") {
            let name: String = dashboard[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            if base == "vigil_" || name.starts_with("vigil_overview") {
                continue;
            }
            assert!(
                exported.iter().any(|m| m == base),
                "the dashboard queries `{name}`, which no component exports"
            );
            checked += 1;
        }
        assert!(checked > 10);
    }
}
