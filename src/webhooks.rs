//! Webhooks: every audited entry (an action, a challenge's outcome, an operator's operation),
//! POSTed as JSON to the exam platform's endpoints, signed as the Standard Webhooks
//! specification says (<https://www.standardwebhooks.com/>).
//!
//! The audit writer owns them. Once an entry is durably in the log, the writer publishes one
//! delivery job per endpoint to the `webhooks` queue under a confirm, and only then acks the
//! entry's message: a crash in between redelivers the entry, and the job goes out again (at
//! least once; receivers dedupe by `webhook-id`, the entry's id). A separate task of the writer,
//! on its own connection, delivers the jobs, so a slow or dead receiver never delays the audit
//! trail. A failed try goes to a delay queue (`webhooks.wait.<step>`) with a jittered
//! expiration, then back to the `webhooks` queue; after `max_attempts` tries the job goes to
//! `webhooks.failed`, which `vigil webhooks list` shows and `vigil webhooks retry` re-sends.
//!
//! Each request carries `webhook-id` (the entry id), `webhook-timestamp` (Unix seconds of this
//! try) and `webhook-signature` (`v1,` and the base64 HMAC-SHA256 of `id.timestamp.body` under
//! the secret). `docs/webhooks.md` says how a receiver checks them.
//!
//! The pure parts (the secret, the signature, the body of an entry, the back-off) are here with
//! their tests; the delivery loop is at the bottom.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, BrokerError, Delivery, Publisher};
use crate::metrics::WebhookMetrics;
use crate::topology::{Names, WEBHOOK_RETRY_STEPS};
use crate::wire::{ActionEvent, AdminOpEvent, Envelope};

/// `[webhooks]` in the config file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// Endpoints every audited entry is POSTed to, comma-separated (`https://`, or `http://`
    /// for a receiver on the same host or network); none turns webhooks off
    /// [VIGIL_WEBHOOK_URLS].
    pub urls: Endpoints,
    /// The signing secret, `whsec_` and the base64 of 24 to 64 random bytes
    /// (`vigil webhooks secret` makes one) [VIGIL_WEBHOOK_SECRET].
    pub secret: Option<String>,
    /// ...or a file holding it [VIGIL_WEBHOOK_SECRET_FILE].
    pub secret_file: Option<PathBuf>,
    /// PEM certificates trusted for `https://` endpoints besides the system's roots
    /// [VIGIL_WEBHOOK_CA_FILE].
    pub ca_file: Option<PathBuf>,
    /// One request (connect, send, answer) may take this long, in ms
    /// [VIGIL_WEBHOOK_TIMEOUT_MS].
    pub timeout_ms: u64,
    /// Tries per entry and endpoint before it goes to `webhooks.failed`
    /// [VIGIL_WEBHOOK_MAX_ATTEMPTS].
    pub max_attempts: u32,
    /// The waits before the 2nd, 3rd, ... try, in ms; the last repeats. Each is jittered by
    /// ±20 %. At most as many as the topology has retry queues (4).
    pub backoff_ms: Vec<u64>,
    /// Requests in flight at once [VIGIL_WEBHOOK_CONCURRENCY].
    pub concurrency: u16,
    /// Failed tries in a row after which an endpoint is paused (its circuit opens), so a dead
    /// receiver cannot hold every request slot [VIGIL_WEBHOOK_BREAKER_FAILURES].
    pub breaker_failures: u32,
    /// How long such a pause lasts, in ms; then one request tries the endpoint again
    /// [VIGIL_WEBHOOK_BREAKER_OPEN_MS].
    pub breaker_open_ms: u64,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            urls: Endpoints::default(),
            secret: None,
            secret_file: None,
            ca_file: None,
            timeout_ms: 10_000,
            max_attempts: 8,
            // 5 s, 30 s, 5 min, then every 30 min: eight tries span about two and a half hours.
            backoff_ms: vec![5_000, 30_000, 300_000, 1_800_000],
            concurrency: 16,
            breaker_failures: 5,
            breaker_open_ms: 30_000,
        }
    }
}

/// Webhook endpoints: a list in the config file, comma-separated in the environment.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct Endpoints(pub Vec<String>);

impl std::str::FromStr for Endpoints {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(
            s.split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(str::to_owned)
                .collect(),
        ))
    }
}

impl WebhookConfig {
    /// Whether any endpoint is configured.
    pub fn enabled(&self) -> bool {
        !self.urls.0.is_empty()
    }

    /// Every problem at once (the secret file is read when the writer starts).
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        for u in &self.urls.0 {
            match url::Url::parse(u) {
                Ok(url) if !matches!(url.scheme(), "http" | "https") => errors.push(format!(
                    "webhooks.urls: `{u}` is not an http:// or https:// URL"
                )),
                Ok(url) if !url.username().is_empty() || url.password().is_some() => {
                    errors.push(format!(
                        "webhooks.urls: `{}` carries credentials; receivers authenticate Vigil by the signature",
                        redact(u)
                    ))
                }
                Ok(url) if url.host_str().is_none() => {
                    errors.push(format!("webhooks.urls: `{u}` has no host"))
                }
                Ok(_) => {}
                Err(e) => errors.push(format!("webhooks.urls: `{u}`: {e}")),
            }
        }
        if self.enabled() && self.secret.is_none() && self.secret_file.is_none() {
            errors.push(
                "webhooks.urls is set but there is no signing secret (VIGIL_WEBHOOK_SECRET or VIGIL_WEBHOOK_SECRET_FILE; `vigil webhooks secret` makes one)".into(),
            );
        }
        if self.enabled()
            && let Some(s) = &self.secret
            && let Err(e) = Secret::parse(s)
        {
            errors.push(format!("webhooks.secret: {e}"));
        }
        if !(100..=120_000).contains(&self.timeout_ms) {
            errors.push(format!(
                "webhooks.timeout_ms = {} must be within 100..=120000",
                self.timeout_ms
            ));
        }
        if !(1..=100).contains(&self.max_attempts) {
            errors.push(format!(
                "webhooks.max_attempts = {} must be within 1..=100",
                self.max_attempts
            ));
        }
        if self.backoff_ms.is_empty() || self.backoff_ms.len() > WEBHOOK_RETRY_STEPS {
            errors.push(format!(
                "webhooks.backoff_ms must have 1 to {WEBHOOK_RETRY_STEPS} waits (one per retry queue)"
            ));
        }
        if self
            .backoff_ms
            .iter()
            .any(|ms| !(100..=86_400_000).contains(ms))
        {
            errors.push("webhooks.backoff_ms: each wait must be within 100..=86400000 ms".into());
        }
        if !(1..=10_000).contains(&self.breaker_failures) {
            errors.push(format!(
                "webhooks.breaker_failures = {} must be within 1..=10000",
                self.breaker_failures
            ));
        }
        if !(100..=3_600_000).contains(&self.breaker_open_ms) {
            errors.push(format!(
                "webhooks.breaker_open_ms = {} must be within 100..=3600000",
                self.breaker_open_ms
            ));
        }
        if !(1..=1024).contains(&self.concurrency) {
            errors.push(format!(
                "webhooks.concurrency = {} must be within 1..=1024",
                self.concurrency
            ));
        }
        errors
    }

    /// The secret, from the setting or its file.
    pub fn load_secret(&self) -> Result<Secret, String> {
        match (&self.secret, &self.secret_file) {
            (Some(s), _) => Secret::parse(s),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("reading {}: {e}", path.display()))?;
                Secret::parse(text.trim())
            }
            (None, None) => Err("no webhook signing secret is configured".into()),
        }
    }
}

/// A URL with any credentials or query string cut off, for logs and listings.
pub fn redact(u: &str) -> String {
    match url::Url::parse(u) {
        Ok(mut url) => {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.set_query(None);
            url.to_string()
        }
        Err(_) => "(not a URL)".into(),
    }
}

/// The signing key, as the specification encodes it: `whsec_` and base64.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    pub fn parse(text: &str) -> Result<Self, String> {
        let b64 = text
            .strip_prefix("whsec_")
            .ok_or("must start with `whsec_` (`vigil webhooks secret` makes one)")?;
        let key = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| format!("is not base64 after `whsec_`: {e}"))?;
        if !(24..=64).contains(&key.len()) {
            return Err(format!(
                "holds {} bytes; it must hold 24 to 64 random bytes",
                key.len()
            ));
        }
        Ok(Self(key))
    }

    /// A fresh random secret of 32 bytes, encoded.
    pub fn generate() -> String {
        let key: [u8; 32] = rand::random();
        format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode(key)
        )
    }

    /// `webhook-signature`: `v1,` and the base64 of HMAC-SHA256(`id.timestamp.body`).
    pub fn sign(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        )
    }
}

/// Where an entry sits in the log: what a webhook names so a receiver can ask for it and check
/// it against `vigil audit verify`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntryRef {
    /// The entry's id: the action's id, or the operation's.
    pub id: uuid::Uuid,
    /// Its 1-based place in the log.
    pub seq: u64,
    /// Its hash in the chain.
    pub hash: String,
}

/// The JSON body of one webhook (`type`, `timestamp`, `data`, as the specification suggests).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// `action.<action>` (`action.lock_screen`, `action.sign_out`, ...),
    /// `challenge.<outcome>` (`challenge.issued`, `challenge.passed`, `challenge.failed`), or
    /// `admin.<operation>` (`admin.block`, `admin.readmit`, `admin.force.sign_out`, ...).
    #[serde(rename = "type")]
    pub kind: String,
    /// When it was decided (RFC 3339, UTC).
    pub timestamp: String,
    pub data: EventData,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventData {
    pub entry: EntryRef,
    pub client_id: String,
    /// The enforced action (`allow`, `warn`, `lock_screen`, `sign_out`), for an action or a
    /// challenge's outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<crate::domain::Action>,
    /// The verdict or cause that fired it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The rule that fired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The session it happened in (the edge's session number, hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The operation, for an operator's entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    /// Who, for an operator's entry or a forced action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    /// The challenge, for a challenge's entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub challenge: Option<crate::wire::ChallengeNote>,
    /// The node that decided it (an edge, or `cli`).
    pub source: String,
    /// When it was decided, Unix ms.
    pub at_ms: u64,
}

/// RFC 3339, for any `ms` a message may carry: past 9999-12-31 (which RFC 3339 cannot write,
/// and humantime's formatter refuses) it says that last instant instead of failing.
fn rfc3339(ms: u64) -> String {
    const LAST_MS: u64 = 253_402_300_799_999;
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms.min(LAST_MS)))
        .to_string()
}

/// Keep a type's parts to what a receiver can route on: lower-case letters, digits, `_`, `.`.
fn type_part(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '_' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '.',
        })
        .collect()
}

impl Event {
    /// The webhook of an action (or a challenge's entry) written as `entry`.
    pub fn of_action(env: &Envelope, event: &ActionEvent, entry: EntryRef) -> Self {
        let kind = match &event.challenge {
            Some(c) => format!("challenge.{}", type_part(&c.outcome)),
            None => format!("action.{}", event.action.as_str()),
        };
        Self {
            kind,
            timestamp: rfc3339(event.decided_at_ms),
            data: EventData {
                entry,
                client_id: env.client_id.clone(),
                action: Some(event.action),
                reason: Some(event.reason.clone()),
                rule: Some(event.rule.clone()),
                session: Some(format!("{:016x}", event.session)),
                operation: None,
                operator: event.operator.clone(),
                challenge: event.challenge.clone(),
                source: env.source.clone(),
                at_ms: event.decided_at_ms,
            },
        }
    }

    /// The webhook of a session's start or end written as `entry`.
    pub fn of_session(env: &Envelope, s: &crate::wire::SessionChange, entry: EntryRef) -> Self {
        Self {
            kind: format!("session.{}", type_part(&s.event)),
            timestamp: rfc3339(s.at_ms),
            data: EventData {
                entry,
                client_id: env.client_id.clone(),
                action: None,
                reason: (!s.reason.is_empty()).then(|| s.reason.clone()),
                rule: None,
                session: Some(format!("{:016x}", s.session)),
                operation: None,
                operator: None,
                challenge: None,
                source: env.source.clone(),
                at_ms: s.at_ms,
            },
        }
    }

    /// The webhook of an operator's operation written as `entry`.
    pub fn of_admin(env: &Envelope, op: &AdminOpEvent, entry: EntryRef) -> Self {
        Self {
            kind: format!("admin.{}", type_part(&op.operation)),
            timestamp: rfc3339(op.at_ms),
            data: EventData {
                entry,
                client_id: env.client_id.clone(),
                action: None,
                reason: None,
                rule: None,
                session: None,
                operation: Some(op.operation.clone()),
                operator: Some(op.operator.clone()),
                challenge: None,
                source: env.source.clone(),
                at_ms: op.at_ms,
            },
        }
    }
}

/// One delivery of one entry to one endpoint: the body of a message on the `webhooks` queues.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// `webhook-id`: the entry's id, the receiver's idempotency key.
    pub id: String,
    pub endpoint: String,
    /// The exact bytes sent and signed (the [`Event`] as JSON), the same on every try.
    pub body: String,
    /// Tries so far.
    pub attempts: u32,
    pub created_at_ms: u64,
    /// How the last try went, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_try_at_ms: Option<u64>,
}

impl Job {
    /// The jobs of one written entry: one per endpoint.
    pub fn for_event(cfg: &WebhookConfig, event: &Event) -> Vec<Job> {
        let body = serde_json::to_string(event).expect("an event encodes");
        let now = crate::wire::now_ms();
        cfg.urls
            .0
            .iter()
            .map(|endpoint| Job {
                id: event.data.entry.id.to_string(),
                endpoint: endpoint.clone(),
                body: body.clone(),
                attempts: 0,
                created_at_ms: now,
                last_error: None,
                last_try_at_ms: None,
            })
            .collect()
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a job encodes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }
}

/// What to do with a job after a failed try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Wait in `webhooks.wait.<step>` for `wait_ms`, then try again.
    Retry { step: usize, wait_ms: u64 },
    /// Give up: to `webhooks.failed`.
    GiveUp,
}

/// After `attempts` failed tries: wait (the back-off's `attempts`-th step, the last one
/// repeating, jittered by `jitter` in -1..=1 times 20 %), or give up.
pub fn next_after(cfg: &WebhookConfig, attempts: u32, jitter: f64) -> Next {
    if attempts >= cfg.max_attempts || cfg.backoff_ms.is_empty() {
        return Next::GiveUp;
    }
    let i = (attempts.max(1) as usize - 1).min(cfg.backoff_ms.len() - 1);
    let base = cfg.backoff_ms[i] as f64;
    let wait_ms = (base * (1.0 + 0.2 * jitter.clamp(-1.0, 1.0)))
        .round()
        .max(1.0) as u64;
    Next::Retry {
        step: i + 1,
        wait_ms,
    }
}

/// Publish the jobs of one entry, each under a confirm (bounded). The writer acks the entry's
/// message only after this succeeds.
pub async fn publish_jobs(
    publisher: &Publisher,
    names: &Names,
    jobs: &[Job],
) -> Result<(), BrokerError> {
    for job in jobs {
        let confirm = publisher
            .publish_durable_json(
                &names.webhooks_exchange(),
                "deliver",
                &job.encode(),
                &job.id,
                None,
            )
            .await?;
        tokio::time::timeout(crate::broker::CLOSE_LIMIT, confirm.wait())
            .await
            .map_err(|_| BrokerError::Nacked)??;
    }
    Ok(())
}

/// The HTTP client for the endpoints: rustls with the system's roots and `ca_file`, bounded
/// time per request, no redirects (a signed request goes where it was configured to, or
/// fails).
pub fn http_client(cfg: &WebhookConfig) -> Result<reqwest::Client, String> {
    crate::telemetry::http::client(
        cfg.ca_file.as_deref(),
        Duration::from_millis(cfg.timeout_ms),
        concat!("vigil-webhooks/", env!("CARGO_PKG_VERSION")),
    )
}

/// How one try went.
#[derive(Debug)]
enum Tried {
    Delivered,
    Failed(String),
    /// Not tried: the endpoint's circuit is open (it failed `breaker_failures` times in a row),
    /// so the job waits without spending a try or a request slot.
    Paused {
        until_ms: u64,
    },
    /// Never sent: the job names an endpoint that is not configured, or no audited entry.
    Refused(String),
}

/// Tries a job may claim to have had: more is not a job this writer made.
const MAX_CLAIMED_ATTEMPTS: u32 = 1_000;
/// After the broker refused to take a job back (its queue full), wait this long before giving
/// it back to the queue it came from.
const REFUSED_PAUSE: Duration = Duration::from_secs(5);

/// Where an endpoint stands: its consecutive failures, and until when its circuit is open.
#[derive(Debug, Default, Clone, Copy)]
struct Circuit {
    failures: u32,
    open_until_ms: u64,
}

/// Where an entry sits in the audit log, by its id: how a job is checked against the trail.
pub type EntryLookup = Arc<dyn Fn(&uuid::Uuid) -> Option<EntryRef> + Send + Sync>;

/// The delivery side, shared by the tasks that each carry one job.
struct Sender {
    cfg: WebhookConfig,
    secret: Secret,
    client: reqwest::Client,
    names: Names,
    metrics: WebhookMetrics,
    circuits: std::sync::Mutex<std::collections::HashMap<String, Circuit>>,
    lookup: EntryLookup,
}

impl Sender {
    /// POST the job's body to its endpoint, signed for this try.
    async fn try_once(&self, job: &Job) -> Tried {
        let timestamp = crate::wire::now_ms() / 1000;
        let signature = self.secret.sign(&job.id, timestamp, job.body.as_bytes());
        let started = Instant::now();
        let sent = self
            .client
            .post(&job.endpoint)
            .header("content-type", "application/json")
            .header("webhook-id", &job.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(job.body.clone())
            .send()
            .await;
        self.metrics
            .request_seconds
            .observe(started.elapsed().as_secs_f64());
        match sent {
            Ok(r) if r.status().is_success() => Tried::Delivered,
            Ok(r) => Tried::Failed(format!("HTTP {}", r.status().as_u16())),
            Err(e) if e.is_timeout() => {
                Tried::Failed(format!("no answer within {} ms", self.cfg.timeout_ms))
            }
            // Without the URL: its query may hold a receiver's secret.
            Err(e) if e.is_connect() => {
                Tried::Failed(format!("could not connect: {}", e.without_url()))
            }
            Err(e) => Tried::Failed(e.without_url().to_string()),
        }
    }

    /// Whether the job names an entry of the audit trail as it is (its id, place and hash):
    /// only then is its body signed and sent.
    async fn audited(&self, job: &Job) -> bool {
        let Ok(event) = serde_json::from_str::<Event>(&job.body) else {
            return false;
        };
        if event.data.entry.id.to_string() != job.id {
            return false;
        }
        let lookup = self.lookup.clone();
        let id = event.data.entry.id;
        let logged = tokio::task::spawn_blocking(move || lookup(&id))
            .await
            .ok()
            .flatten();
        logged.as_ref() == Some(&event.data.entry)
    }

    /// The circuit of `endpoint`, as a try would find it at `now_ms`.
    fn open_until(&self, endpoint: &str, now_ms: u64) -> Option<u64> {
        let circuits = self.circuits.lock().unwrap_or_else(|e| e.into_inner());
        circuits
            .get(endpoint)
            .filter(|c| c.open_until_ms > now_ms)
            .map(|c| c.open_until_ms)
    }

    /// Count a try's outcome for its endpoint's circuit.
    fn record(&self, endpoint: &str, delivered: bool, now_ms: u64) {
        let mut circuits = self.circuits.lock().unwrap_or_else(|e| e.into_inner());
        let c = circuits.entry(endpoint.to_owned()).or_default();
        if delivered {
            *c = Circuit::default();
        } else {
            c.failures = c.failures.saturating_add(1);
            if c.failures >= self.cfg.breaker_failures {
                c.open_until_ms = now_ms + self.cfg.breaker_open_ms;
                c.failures = 0;
            }
        }
    }

    async fn outcome(&self, job: &Job) -> Tried {
        if !self.cfg.urls.0.contains(&job.endpoint) {
            // Only configured endpoints get a request: a job naming another (an endpoint
            // removed since, or a forged job) is kept with the failures, never sent.
            return Tried::Refused("the endpoint is no longer configured".into());
        }
        if !self.audited(job).await {
            return Tried::Refused("it names no entry of the audit trail".into());
        }
        let now = crate::wire::now_ms();
        if let Some(until_ms) = self.open_until(&job.endpoint, now) {
            return Tried::Paused { until_ms };
        }
        let tried = self.try_once(job).await;
        self.record(
            &job.endpoint,
            matches!(tried, Tried::Delivered),
            crate::wire::now_ms(),
        );
        tried
    }

    /// Carry one delivery: try it, then ack it, or put it on its next wait (or with the
    /// failures) first and ack it then. A broker failure leaves it unacked: it comes again.
    async fn carry(&self, publisher: &Publisher, delivery: &Delivery, mut job: Job) {
        let outcome = self.outcome(&job).await;
        let now = crate::wire::now_ms();
        let (key, wait, label) = match outcome {
            Tried::Delivered => {
                self.metrics
                    .outcomes
                    .with_label_values(&["delivered"])
                    .inc();
                if let Err(e) = delivery.ack().await {
                    tracing::warn!(error = %e, "webhook job not acked; it comes again");
                }
                return;
            }
            Tried::Paused { until_ms } => {
                // Not a try: it waits for the circuit, in the back-off's first step.
                let wait = until_ms.saturating_sub(now) + rand::random::<u64>() % 1_000;
                job.last_error = Some("the endpoint keeps failing; paused".into());
                ("wait.1".to_owned(), Some(wait), "paused")
            }
            Tried::Refused(why) => {
                tracing::warn!(id = %job.id, endpoint = %redact(&job.endpoint), error = %why, "webhook job not sent");
                job.last_error = Some(why);
                job.last_try_at_ms = Some(now);
                ("failed".to_owned(), None, "rejected")
            }
            Tried::Failed(why) => {
                job.attempts = job.attempts.saturating_add(1);
                job.last_error = Some(why.clone());
                job.last_try_at_ms = Some(now);
                let next = next_after(&self.cfg, job.attempts, rand::random::<f64>() * 2.0 - 1.0);
                let (key, wait) = match next {
                    Next::Retry { step, wait_ms } => (format!("wait.{step}"), Some(wait_ms)),
                    Next::GiveUp => ("failed".to_owned(), None),
                };
                tracing::warn!(
                    id = %job.id,
                    endpoint = %redact(&job.endpoint),
                    attempts = job.attempts,
                    error = %why,
                    next = %key,
                    "webhook not delivered"
                );
                let label = if wait.is_some() { "retried" } else { "failed" };
                (key, wait, label)
            }
        };
        let published = async {
            publisher
                .publish_durable_json(
                    &self.names.webhooks_exchange(),
                    &key,
                    &job.encode(),
                    &job.id,
                    wait,
                )
                .await?
                .wait()
                .await
        };
        match tokio::time::timeout(crate::broker::CLOSE_LIMIT, published).await {
            Ok(Ok(())) => {
                self.metrics.outcomes.with_label_values(&[label]).inc();
                if let Err(e) = delivery.ack().await {
                    tracing::warn!(error = %e, "webhook job not acked; it comes again");
                }
            }
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "no publisher confirm within 5 s".to_owned(),
                };
                // The broker would not take it (a full `webhooks.failed`, say): it goes back
                // where it was, after a pause, so a refusal never becomes a busy loop.
                self.metrics.outcomes.with_label_values(&["stuck"]).inc();
                tracing::warn!(error = %why, id = %job.id, next = %key, "webhook job not moved on; it comes again");
                tokio::time::sleep(REFUSED_PAUSE).await;
                let _ = delivery.requeue().await;
            }
        }
    }
}

/// Deliver the `webhooks` queue's jobs until `shutdown`, reconnecting when the broker goes
/// away. Runs beside the audit writer, on its own connection; `lookup` finds an entry in the
/// writer's log, which every job is checked against before it is signed.
pub async fn deliver(
    cfg: crate::config::Config,
    metrics: WebhookMetrics,
    broker_metrics: crate::metrics::BrokerMetrics,
    lookup: EntryLookup,
    shutdown: CancellationToken,
) -> Result<(), String> {
    use futures_util::FutureExt as _;
    let secret = cfg.webhooks.load_secret()?;
    let client = http_client(&cfg.webhooks)?;
    let sender = Arc::new(Sender {
        cfg: cfg.webhooks.clone(),
        secret,
        client,
        names: cfg.names(),
        metrics,
        circuits: std::sync::Mutex::default(),
        lookup,
    });
    let queue = cfg.names().webhooks_queue();
    let prefetch = cfg.webhooks.concurrency;
    let (roles, namespace) = (cfg.broker_roles, cfg.namespace.clone());
    let open = |b: Broker| {
        let (queue, namespace) = (queue.clone(), namespace.clone());
        async move {
            let publisher = Arc::new(b.publisher().await?);
            let consumer = b.consume(&queue, "webhooks", prefetch, true).await?;
            let trust = b.trust(roles, &namespace);
            Ok::<_, BrokerError>((b, publisher, consumer, trust))
        }
    };
    let first = Broker::connect_with_retry(
        &cfg.amqp_url,
        "webhooks",
        broker_metrics.clone(),
        Duration::from_millis(cfg.broker_connect_timeout_ms),
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut link = open(first).await.map_err(|e| e.to_string())?;
    tracing::info!(
        endpoints = cfg.webhooks.urls.0.len(),
        queue = %queue,
        "delivering webhooks"
    );
    let reject = |sender: &Sender| {
        sender
            .metrics
            .outcomes
            .with_label_values(&["rejected"])
            .inc()
    };
    loop {
        let (broker, publisher, mut consumer, trust) = link;
        let mut tasks = tokio::task::JoinSet::new();
        let ended = loop {
            // Reap finished deliveries as they end.
            while tasks.try_join_next().is_some() {}
            let delivery = tokio::select! {
                _ = shutdown.cancelled() => break None,
                d = consumer.next() => d,
            };
            match delivery {
                Some(Ok(d)) => {
                    if !trust.admits(crate::roles::Kind::Webhook, d.user_id()) {
                        reject(&sender);
                        let _ = d.dead_letter().await;
                        continue;
                    }
                    match Job::decode(d.data()) {
                        Ok(job) if job.attempts <= MAX_CLAIMED_ATTEMPTS => {
                            let (sender, publisher) = (sender.clone(), publisher.clone());
                            tasks.spawn(async move {
                                // Whatever goes wrong in carrying it, the delivery is settled:
                                // a job that cannot be carried is dropped, not left unacked
                                // holding a slot of the prefetch.
                                let carried =
                                    std::panic::AssertUnwindSafe(sender.carry(&publisher, &d, job))
                                        .catch_unwind()
                                        .await;
                                if carried.is_err() {
                                    tracing::error!("carrying a webhook job panicked; dropping it");
                                    reject(&sender);
                                    let _ = d.dead_letter().await;
                                }
                            });
                        }
                        other => {
                            tracing::warn!(error = ?other.err(), "not a webhook job; dropping it");
                            reject(&sender);
                            let _ = d.dead_letter().await;
                        }
                    }
                }
                Some(Err(e)) => break Some(e.to_string()),
                None => break Some("the consumer ended".to_owned()),
            }
        };
        // Each request is bounded by its timeout, each publish by its confirm's.
        let grace = Duration::from_millis(cfg.webhooks.timeout_ms)
            + crate::broker::CLOSE_LIMIT * 2
            + REFUSED_PAUSE;
        let _ =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        consumer.close().await;
        publisher.close().await;
        broker.close().await;
        let Some(why) = ended else {
            return Ok(());
        };
        tracing::warn!(error = %why, "webhooks lost the broker; reconnecting");
        let relinked =
            crate::broker::relink(&cfg.amqp_url, "webhooks", &broker_metrics, &shutdown, open)
                .await;
        match relinked {
            Some(l) => link = l,
            None => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_time_a_message_carries_formats_without_panicking() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_765_012_345_120), "2025-12-06T09:12:25.120Z");
        assert_eq!(rfc3339(u64::MAX), "9999-12-31T23:59:59.999Z");
        assert_eq!(rfc3339(253_402_300_800_000), "9999-12-31T23:59:59.999Z");
    }

    /// The specification's own example (standard-webhooks, libraries' test suites).
    #[test]
    fn signs_the_specifications_example() {
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            secret.sign(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn secrets_are_checked() {
        assert!(Secret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        assert!(Secret::parse("whsec_not*base64").is_err());
        assert!(Secret::parse("whsec_c2hvcnQ=").is_err(), "5 bytes");
        let fresh = Secret::generate();
        assert!(Secret::parse(&fresh).is_ok(), "{fresh}");
        assert_ne!(fresh, Secret::generate());
    }

    #[test]
    fn the_back_off_steps_repeat_the_last_and_give_up_at_the_limit() {
        let cfg = WebhookConfig {
            max_attempts: 6,
            backoff_ms: vec![1_000, 10_000, 60_000],
            ..WebhookConfig::default()
        };
        let waits: Vec<Next> = (1..=6).map(|n| next_after(&cfg, n, 0.0)).collect();
        assert_eq!(
            waits,
            [
                Next::Retry {
                    step: 1,
                    wait_ms: 1_000
                },
                Next::Retry {
                    step: 2,
                    wait_ms: 10_000
                },
                Next::Retry {
                    step: 3,
                    wait_ms: 60_000
                },
                Next::Retry {
                    step: 3,
                    wait_ms: 60_000
                },
                Next::Retry {
                    step: 3,
                    wait_ms: 60_000
                },
                Next::GiveUp,
            ]
        );
        // Jitter stays within ±20 %.
        assert_eq!(
            next_after(&cfg, 1, 1.0),
            Next::Retry {
                step: 1,
                wait_ms: 1_200
            }
        );
        assert_eq!(
            next_after(&cfg, 1, -5.0),
            Next::Retry {
                step: 1,
                wait_ms: 800
            }
        );
    }

    fn sender(lookup: EntryLookup) -> Sender {
        let cfg = WebhookConfig {
            urls: "http://a.test/h".parse().unwrap(),
            ..WebhookConfig::default()
        };
        Sender {
            client: http_client(&cfg).unwrap(),
            secret: Secret::parse(&Secret::generate()).unwrap(),
            names: Names::new("t"),
            metrics: WebhookMetrics::new(&prometheus::Registry::new()),
            circuits: std::sync::Mutex::default(),
            lookup,
            cfg,
        }
    }

    #[test]
    fn an_endpoint_that_keeps_failing_is_paused_then_tried_again() {
        let s = sender(Arc::new(|_| None));
        let e = "http://a.test/h";
        for i in 1..s.cfg.breaker_failures {
            s.record(e, false, 1_000 + u64::from(i));
        }
        assert_eq!(
            s.open_until(e, 1_200),
            None,
            "fewer failures leave it closed"
        );
        s.record(e, false, 1_200);
        let until = 1_200 + s.cfg.breaker_open_ms;
        assert_eq!(s.open_until(e, 1_300), Some(until));
        assert_eq!(s.open_until("http://b.test/h", 1_300), None, "per endpoint");
        assert_eq!(s.open_until(e, until), None, "then one request tries it");
        s.record(e, true, until + 10);
        s.record(e, false, until + 20);
        assert_eq!(
            s.open_until(e, until + 30),
            None,
            "a success starts the count over"
        );
    }

    #[tokio::test]
    async fn a_job_is_sent_only_for_an_entry_of_the_trail_as_logged() {
        let entry = EntryRef {
            id: uuid::Uuid::now_v7(),
            seq: 3,
            hash: "cd".repeat(32),
        };
        let logged = entry.clone();
        let s = sender(Arc::new(move |id| {
            (*id == logged.id).then(|| logged.clone())
        }));
        let event = |entry: EntryRef| Event {
            kind: "admin.readmit".into(),
            timestamp: rfc3339(0),
            data: EventData {
                entry,
                client_id: "c".into(),
                action: None,
                reason: None,
                rule: None,
                session: None,
                operation: Some("readmit".into()),
                operator: Some("x".into()),
                challenge: None,
                source: "cli".into(),
                at_ms: 0,
            },
        };
        let job = |e: Event| Job::for_event(&s.cfg, &e).remove(0);
        assert!(s.audited(&job(event(entry.clone()))).await);
        let mut other_hash = entry.clone();
        other_hash.hash = "ab".repeat(32);
        assert!(!s.audited(&job(event(other_hash))).await);
        let unknown = EntryRef {
            id: uuid::Uuid::now_v7(),
            ..entry.clone()
        };
        assert!(!s.audited(&job(event(unknown))).await);
        let mut renamed = job(event(entry));
        renamed.id = "someone-else".into();
        assert!(!s.audited(&renamed).await);
    }

    #[test]
    fn config_problems_are_named() {
        let cfg = WebhookConfig {
            urls: "https://exam.example/hooks, ftp://x/y, https://u:p@exam.example/"
                .parse()
                .unwrap(),
            backoff_ms: vec![1, 2, 3, 4, 5],
            ..WebhookConfig::default()
        };
        let errors = cfg.validate().join("\n");
        assert!(errors.contains("ftp://x/y"), "{errors}");
        assert!(errors.contains("carries credentials"), "{errors}");
        assert!(!errors.contains(":p@"), "a password in an error: {errors}");
        assert!(errors.contains("no signing secret"), "{errors}");
        assert!(errors.contains("1 to 4 waits"), "{errors}");
        assert!(WebhookConfig::default().validate().is_empty());
    }

    #[test]
    fn an_events_type_and_body_name_the_entry() {
        let op = AdminOpEvent {
            detail: String::new(),
            operator: "ops".into(),
            operation: "force:sign_out".into(),
            at_ms: 1_700_000_000_123,
        };
        let env = Envelope {
            schema: crate::wire::SCHEMA,
            id: uuid::Uuid::now_v7(),
            source: "e1".into(),
            seq: 0,
            client_id: "alice".into(),
            produced_at_ms: 0,
            deadline_ms: 0,
            traceparent: String::new(),
            payload: crate::wire::Payload::AdminOp(op.clone()),
        };
        let op = &op;
        let entry = EntryRef {
            id: env.id,
            seq: 7,
            hash: "ab".repeat(32),
        };
        let event = Event::of_admin(&env, op, entry.clone());
        assert_eq!(event.kind, "admin.force.sign_out");
        assert_eq!(event.timestamp, "2023-11-14T22:13:20.123Z");
        let cfg = WebhookConfig {
            urls: "http://a.test/h,http://b.test/h".parse().unwrap(),
            ..WebhookConfig::default()
        };
        let jobs = Job::for_event(&cfg, &event);
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].id, env.id.to_string());
        let body: serde_json::Value = serde_json::from_str(&jobs[1].body).unwrap();
        assert_eq!(body["data"]["entry"]["seq"], 7);
        assert_eq!(body["data"]["client_id"], "alice");
        assert_eq!(body["type"], "admin.force.sign_out");
        assert_eq!(Job::decode(&jobs[1].encode()).unwrap(), jobs[1]);
    }
}
