//! The broker topology as typed data: parsing and validating `exchanges.toml`, applying the
//! namespace prefix and resolving per-node names. Declaring it on a broker is `broker`'s job.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The topology this build ships with (the repository's `exchanges.toml`).
pub const EMBEDDED: &str = include_str!("../exchanges.toml");

/// Logical names the code relies on; validation checks that they are declared.
pub const FRAMES_EXCHANGE: &str = "frames";
pub const REPLIES_EXCHANGE: &str = "replies";
pub const ACTIONS_EXCHANGE: &str = "actions";
pub const CONTROL_EXCHANGE: &str = "control";
pub const DEAD_EXCHANGE: &str = "dead";
pub const WORK_QUEUE: &str = "frames.work";
pub const DEAD_LETTER_QUEUE: &str = "dead.letters";
pub const AUDIT_QUEUE: &str = "audit";
pub const ENROLL_EXCHANGE: &str = "enroll";
pub const ENROLL_QUEUE: &str = "enroll.requests";
pub const CAPTURE_STREAM: &str = "frames.stream";
pub const AUDIT_CHECKPOINTS: &str = "audit.checkpoints";
pub const WEBHOOKS_EXCHANGE: &str = "webhooks";
pub const WEBHOOKS_QUEUE: &str = "webhooks";
pub const WEBHOOKS_FAILED_QUEUE: &str = "webhooks.failed";
/// The back-off's steps: `webhooks.wait.1` to `webhooks.wait.<this>`, routed `wait.<n>`.
pub const WEBHOOK_RETRY_STEPS: usize = 4;
pub const EDGE_REPLY_QUEUE: &str = "replies.edge.{node}";
pub const EDGE_CONTROL_QUEUE: &str = "control.edge.{node}";

/// The routing key of a worker's answer (a result, a drop, an enrolment's outcome) for
/// `client` on the edge `edge`. Validation checks that the reply queue's binding routes it.
const REPLY_KEY: &str = "edge.{node}.{client}";

/// Every exchange, queue and routing key of one namespace, made in one place: the services and
/// the tools ask it for names instead of building them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    namespace: String,
}

impl Names {
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// A logical name from `exchanges.toml` under this namespace, `{node}` replaced by `node`.
    pub fn resolve(&self, logical: &str, node: &str) -> String {
        format!("{}.{}", self.namespace, logical.replace("{node}", node))
    }

    fn shared(&self, logical: &str) -> String {
        format!("{}.{logical}", self.namespace)
    }

    pub fn frames_exchange(&self) -> String {
        self.shared(FRAMES_EXCHANGE)
    }

    pub fn replies_exchange(&self) -> String {
        self.shared(REPLIES_EXCHANGE)
    }

    pub fn actions_exchange(&self) -> String {
        self.shared(ACTIONS_EXCHANGE)
    }

    pub fn control_exchange(&self) -> String {
        self.shared(CONTROL_EXCHANGE)
    }

    pub fn enroll_exchange(&self) -> String {
        self.shared(ENROLL_EXCHANGE)
    }

    pub fn work_queue(&self) -> String {
        self.shared(WORK_QUEUE)
    }

    pub fn enroll_queue(&self) -> String {
        self.shared(ENROLL_QUEUE)
    }

    pub fn audit_queue(&self) -> String {
        self.shared(AUDIT_QUEUE)
    }

    pub fn capture_stream(&self) -> String {
        self.shared(CAPTURE_STREAM)
    }

    pub fn webhooks_exchange(&self) -> String {
        self.shared(WEBHOOKS_EXCHANGE)
    }

    pub fn webhooks_queue(&self) -> String {
        self.shared(WEBHOOKS_QUEUE)
    }

    pub fn webhooks_failed_queue(&self) -> String {
        self.shared(WEBHOOKS_FAILED_QUEUE)
    }

    /// The stream of the audit writer's signed checkpoints (an exchange and a queue).
    pub fn audit_checkpoints(&self) -> String {
        self.shared(AUDIT_CHECKPOINTS)
    }

    /// The edge `node`'s own control queue.
    pub fn edge_control_queue(&self, node: &str) -> String {
        self.resolve(EDGE_CONTROL_QUEUE, node)
    }

    /// The routing key of a worker's answer for `client`, held by the edge `edge`.
    pub fn reply_key(edge: &str, client: &str) -> String {
        REPLY_KEY
            .replace("{node}", edge)
            .replace("{client}", client)
    }
}

/// Does an AMQP topic binding `pattern` route `key`? Words are separated by `.`; `*` matches
/// one word and `#` zero or more.
fn topic_matches(pattern: &str, key: &str) -> bool {
    fn go(p: &[&str], k: &[&str]) -> bool {
        match (p.first(), k.first()) {
            (None, None) => true,
            (Some(&"#"), _) => go(&p[1..], k) || (!k.is_empty() && go(p, &k[1..])),
            (Some(&"*"), Some(_)) => go(&p[1..], &k[1..]),
            (Some(w), Some(x)) if w == x => go(&p[1..], &k[1..]),
            _ => false,
        }
    }
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = key.split('.').collect();
    go(&p, &k)
}

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot read topology file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid topology toml: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("invalid topology:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeKind {
    Fanout,
    Topic,
    Direct,
    Headers,
}

impl ExchangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Direct => "direct",
            ExchangeKind::Headers => "headers",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeSpec {
    pub name: String,
    pub kind: ExchangeKind,
    #[serde(default = "yes")]
    pub durable: bool,
    #[serde(default)]
    pub auto_delete: bool,
}

/// What a queue is for; decides who declares it and what validation asks of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueRole {
    /// Shared by competing consumers; must have a dead-letter exchange.
    Work,
    /// Holds what other queues dead-letter.
    DeadLetter,
    /// A durable queue with one consumer service (for example the audit writer).
    Durable,
    /// One per node, named with `{node}`; declared by the node that owns it.
    PerNode,
    /// A RabbitMQ stream (`x-queue-type=stream`) kept for capture; declared only when enabled.
    Stream,
    /// A RabbitMQ stream of the audit writer's signed checkpoints (the head of its log), a
    /// second place that `vigil audit verify` compares the log with; declared by the writer.
    Checkpoints,
}

impl QueueRole {
    /// Whether the queue is a RabbitMQ stream (`x-queue-type=stream`).
    pub fn is_stream(self) -> bool {
        matches!(self, QueueRole::Stream | QueueRole::Checkpoints)
    }
}

/// Which kind of node declares a per-node queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeKind {
    Edge,
    Worker,
    Any,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Overflow {
    #[serde(rename = "drop-head")]
    DropHead,
    #[serde(rename = "reject-publish")]
    RejectPublish,
    #[serde(rename = "reject-publish-dlx")]
    RejectPublishDlx,
}

impl Overflow {
    pub fn as_str(self) -> &'static str {
        match self {
            Overflow::DropHead => "drop-head",
            Overflow::RejectPublish => "reject-publish",
            Overflow::RejectPublishDlx => "reject-publish-dlx",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSpec {
    pub name: String,
    pub role: QueueRole,
    /// For `per_node` queues: which node kind declares them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<NodeKind>,
    #[serde(default = "yes")]
    pub durable: bool,
    #[serde(default)]
    pub exclusive: bool,
    #[serde(default)]
    pub auto_delete: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_ttl_ms: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overflow: Option<Overflow>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_exchange: Option<String>,
    /// The routing key a dead-lettered message is given (else it keeps its own): how a delay
    /// queue hands an expired message back to the queue it waited for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_routing_key: Option<String>,
    /// `at-least-once`: a quorum queue hands what it dead-letters over under publisher
    /// confirms, keeping it until the target queue has it (RabbitMQ drops a message
    /// dead-lettered at most once, the default, when the target cannot take it, as while a
    /// node restarts). Needs `overflow = "reject-publish"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_strategy: Option<String>,
    /// Stream retention by age, as RabbitMQ reads it (`10m`, `1h`, `7D`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<String>,
    /// At most one consumer gets deliveries; the others wait (`x-single-active-consumer`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub single_active_consumer: bool,
    /// `quorum`: replicated over a cluster's nodes (Raft), so the queue and what it holds
    /// survive the loss of a minority of nodes. `classic` (the default) lives on one node.
    /// Streams are streams by their role.
    #[serde(default, skip_serializing_if = "QueueType::is_classic")]
    pub queue_type: QueueType,
}

/// How RabbitMQ keeps a queue (`x-queue-type`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueType {
    #[default]
    Classic,
    Quorum,
}

impl QueueType {
    pub fn is_classic(&self) -> bool {
        *self == QueueType::Classic
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingSpec {
    pub exchange: String,
    pub queue: String,
    #[serde(default)]
    pub routing_key: String,
}

/// The topology: exchanges, queues and bindings, named with or without the namespace prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    #[serde(default, rename = "exchange")]
    pub exchanges: Vec<ExchangeSpec>,
    #[serde(default, rename = "queue")]
    pub queues: Vec<QueueSpec>,
    #[serde(default, rename = "binding")]
    pub bindings: Vec<BindingSpec>,
    /// How the shared queues' tunables reach the broker: set by the process's configuration
    /// (see [`Tunables`]), never by the file.
    #[serde(skip)]
    pub tunables: Tunables,
}

/// Where a shared queue's tunables (TTL, max length, overflow, dead-lettering, stream age)
/// live on the broker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Tunables {
    /// As declare arguments: fixed for the queue's life, so changing one makes every later
    /// declare fail (`PRECONDITION_FAILED`) until the queue is deleted.
    #[default]
    Arguments,
    /// As RabbitMQ policies, one per queue (put through the management API): declares carry
    /// only what a policy cannot set (queue type, single active consumer), and a changed
    /// tunable is a changed policy, applied to the live queue.
    Policies,
}

/// One RabbitMQ policy: the tunables of the one queue its pattern matches.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicySpec {
    pub name: String,
    /// `^<queue name, regex-escaped>$`.
    pub pattern: String,
    pub definition: serde_json::Map<String, serde_json::Value>,
}

impl QueueSpec {
    /// Whether this queue's tunables go in a policy when policies are on: every queue that
    /// outlives its declarer. Exclusive and auto-delete queues are declared afresh each time,
    /// so their arguments never conflict.
    pub fn takes_policy(&self) -> bool {
        self.durable && !self.exclusive && !self.auto_delete
    }

    /// This queue as it is declared: without the tunables a policy carries (a changed policy
    /// is applied to the live queue, where a changed argument would fail every later declare).
    pub fn as_declared(&self, tunables: Tunables) -> std::borrow::Cow<'_, QueueSpec> {
        if tunables == Tunables::Policies && self.takes_policy() {
            std::borrow::Cow::Owned(QueueSpec {
                message_ttl_ms: None,
                max_length: None,
                max_length_bytes: None,
                overflow: None,
                dead_letter_exchange: None,
                dead_letter_routing_key: None,
                dead_letter_strategy: None,
                max_age: None,
                ..self.clone()
            })
        } else {
            std::borrow::Cow::Borrowed(self)
        }
    }

    /// The tunables as a policy definition (RabbitMQ's keys).
    pub fn policy_definition(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut d = serde_json::Map::new();
        if let Some(v) = self.message_ttl_ms {
            d.insert("message-ttl".into(), v.into());
        }
        if let Some(v) = self.max_length {
            d.insert("max-length".into(), v.into());
        }
        if let Some(v) = self.max_length_bytes {
            d.insert("max-length-bytes".into(), v.into());
        }
        if let Some(v) = self.overflow {
            d.insert("overflow".into(), v.as_str().into());
        }
        if let Some(v) = &self.dead_letter_exchange {
            d.insert("dead-letter-exchange".into(), v.as_str().into());
        }
        if let Some(v) = &self.dead_letter_routing_key {
            d.insert("dead-letter-routing-key".into(), v.as_str().into());
        }
        if let Some(v) = &self.dead_letter_strategy {
            d.insert("dead-letter-strategy".into(), v.as_str().into());
        }
        if let Some(v) = &self.max_age {
            d.insert("max-age".into(), v.as_str().into());
        }
        d
    }
}

fn yes() -> bool {
    true
}

/// `name` with the characters a regular expression gives meaning to escaped.
fn regex_escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 8);
    for c in name.chars() {
        if "\\.+*?()|[]{}^$-".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl Topology {
    /// Parse and validate a topology written in TOML.
    pub fn parse(text: &str) -> Result<Self, TopologyError> {
        let topo: Topology = toml::from_str(text)?;
        topo.validate().map_err(TopologyError::Invalid)?;
        Ok(topo)
    }

    /// Load from a file, or the embedded default when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Self, TopologyError> {
        match path {
            None => Self::parse(EMBEDDED),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                Self::parse(&text)
            }
        }
    }

    /// Every problem at once: duplicates, dangling bindings, work queues without a dead-letter
    /// exchange, misplaced `{node}` placeholders, and missing names the code relies on.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        let exchange = |n: &str| self.exchanges.iter().any(|e| e.name == n);
        let queue = |n: &str| self.queues.iter().find(|q| q.name == n);

        for (i, e) in self.exchanges.iter().enumerate() {
            if self.exchanges[..i].iter().any(|o| o.name == e.name) {
                errors.push(format!("exchange `{}` is declared twice", e.name));
            }
            check_name(&mut errors, "exchange", &e.name, false);
        }
        for (i, q) in self.queues.iter().enumerate() {
            if self.queues[..i].iter().any(|o| o.name == q.name) {
                errors.push(format!("queue `{}` is declared twice", q.name));
            }
            let per_node = q.role == QueueRole::PerNode;
            check_name(&mut errors, "queue", &q.name, per_node);
            if per_node && q.owner.is_none() {
                errors.push(format!("per_node queue `{}` needs an `owner`", q.name));
            }
            if q.role == QueueRole::Work && q.dead_letter_exchange.is_none() {
                errors.push(format!(
                    "work queue `{}` has no dead_letter_exchange",
                    q.name
                ));
            }
            if let Some(s) = &q.dead_letter_strategy
                && (s != "at-least-once"
                    || q.queue_type != QueueType::Quorum
                    || q.overflow != Some(Overflow::RejectPublish)
                    || q.dead_letter_exchange.is_none())
            {
                errors.push(format!(
                    "queue `{}`: dead_letter_strategy `{s}` needs `at-least-once` on a quorum queue with overflow `reject-publish` and a dead_letter_exchange",
                    q.name
                ));
            }
            if let Some(dlx) = &q.dead_letter_exchange
                && !exchange(dlx)
            {
                errors.push(format!(
                    "queue `{}` dead-letters to undeclared exchange `{dlx}`",
                    q.name
                ));
            }
            if q.role.is_stream() && (!q.durable || q.exclusive || q.auto_delete) {
                errors.push(format!(
                    "stream `{}` must be durable, not exclusive, not auto_delete",
                    q.name
                ));
            }
            if q.queue_type == QueueType::Quorum
                && (!q.durable || q.exclusive || q.auto_delete || q.role.is_stream())
            {
                errors.push(format!(
                    "quorum queue `{}` must be durable, not exclusive, not auto_delete, not a stream",
                    q.name
                ));
            }
            if q.exclusive && q.role != QueueRole::PerNode {
                errors.push(format!(
                    "queue `{}` is exclusive but not per_node; only its declaring node could use it",
                    q.name
                ));
            }
        }
        for b in &self.bindings {
            if !exchange(&b.exchange) {
                errors.push(format!(
                    "binding names undeclared exchange `{}`",
                    b.exchange
                ));
            }
            match queue(&b.queue) {
                None => errors.push(format!("binding names undeclared queue `{}`", b.queue)),
                Some(q) => {
                    if q.role != QueueRole::PerNode && b.routing_key.contains("{node}") {
                        errors.push(format!(
                            "binding to `{}` uses {{node}} but the queue is not per_node",
                            b.queue
                        ));
                    }
                }
            }
        }
        for (what, name) in [
            ("exchange", FRAMES_EXCHANGE),
            ("exchange", REPLIES_EXCHANGE),
            ("exchange", ACTIONS_EXCHANGE),
            ("exchange", CONTROL_EXCHANGE),
            ("exchange", DEAD_EXCHANGE),
            ("exchange", ENROLL_EXCHANGE),
            ("exchange", WEBHOOKS_EXCHANGE),
        ] {
            if !exchange(name) {
                errors.push(format!("required {what} `{name}` is not declared"));
            }
        }
        for name in [
            WORK_QUEUE,
            DEAD_LETTER_QUEUE,
            AUDIT_QUEUE,
            ENROLL_QUEUE,
            EDGE_REPLY_QUEUE,
            EDGE_CONTROL_QUEUE,
            WEBHOOKS_QUEUE,
            WEBHOOKS_FAILED_QUEUE,
        ] {
            if queue(name).is_none() {
                errors.push(format!("required queue `{name}` is not declared"));
            }
        }
        // Each back-off step waits in its own queue and goes back to the delivery queue.
        for step in 1..=WEBHOOK_RETRY_STEPS {
            let name = format!("{WEBHOOKS_QUEUE}.wait.{step}");
            let back = queue(&name).is_some_and(|q| {
                q.dead_letter_exchange.as_deref() == Some(WEBHOOKS_EXCHANGE)
                    && q.dead_letter_routing_key.as_deref() == Some("deliver")
            });
            let bound = self.bindings.iter().any(|b| {
                b.exchange == WEBHOOKS_EXCHANGE
                    && b.queue == name
                    && b.routing_key == format!("wait.{step}")
            });
            if !back || !bound {
                errors.push(format!(
                    "queue `{name}` must be bound from `{WEBHOOKS_EXCHANGE}` with `wait.{step}` and dead-letter to `{WEBHOOKS_EXCHANGE}` with routing key `deliver`"
                ));
            }
        }
        // The key a worker answers with must reach the edge that holds the client, and only
        // that edge.
        let key = Names::reply_key("edge-a", "client-1");
        let routes_to = |node: &str| {
            self.bindings.iter().any(|b| {
                b.exchange == REPLIES_EXCHANGE
                    && b.queue == EDGE_REPLY_QUEUE
                    && topic_matches(&b.routing_key.replace("{node}", node), &key)
            })
        };
        if !routes_to("edge-a") {
            errors.push(format!(
                "no binding of `{REPLY_KEY}` (the workers' reply key) from `{REPLIES_EXCHANGE}` to `{EDGE_REPLY_QUEUE}`"
            ));
        }
        if routes_to("edge-b") {
            errors.push(format!(
                "the binding from `{REPLIES_EXCHANGE}` to `{EDGE_REPLY_QUEUE}` routes one edge's replies to every edge"
            ));
        }
        if self
            .exchanges
            .iter()
            .any(|e| e.name == REPLIES_EXCHANGE && e.kind != ExchangeKind::Topic)
        {
            errors.push(format!(
                "exchange `{REPLIES_EXCHANGE}` must be a topic exchange"
            ));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// The policies that carry this (resolved) topology's tunables, one per queue that takes
    /// one and has any.
    pub fn policies(&self) -> Vec<PolicySpec> {
        self.queues
            .iter()
            .filter(|q| q.takes_policy())
            .filter_map(|q| {
                let definition = q.policy_definition();
                (!definition.is_empty()).then(|| PolicySpec {
                    name: q.name.clone(),
                    pattern: format!("^{}$", regex_escape(&q.name)),
                    definition,
                })
            })
            .collect()
    }

    /// This topology with its tunables applied as `tunables` says.
    pub fn with_tunables(mut self, tunables: Tunables) -> Self {
        self.tunables = tunables;
        self
    }

    /// The shared part (no per-node queues), with every name under `namespace.`.
    pub fn shared(&self, namespace: &str) -> Topology {
        self.resolve(
            namespace,
            |q| !matches!(q.role, QueueRole::PerNode) && !q.role.is_stream(),
            "",
            true,
        )
    }

    /// The capture streams and their bindings (declared when stream capture is on).
    pub fn streams(&self, namespace: &str) -> Topology {
        self.resolve(namespace, |q| q.role == QueueRole::Stream, "", false)
    }

    /// The audit writer's checkpoint stream.
    pub fn checkpoints(&self, namespace: &str) -> Topology {
        self.resolve(namespace, |q| q.role == QueueRole::Checkpoints, "", false)
    }

    /// The per-node queues that `kind` declares for node `node`, with their bindings.
    pub fn per_node(&self, namespace: &str, kind: NodeKind, node: &str) -> Topology {
        self.resolve(
            namespace,
            |q| {
                q.role == QueueRole::PerNode
                    && matches!(q.owner, Some(o) if o == kind || o == NodeKind::Any)
            },
            node,
            false,
        )
    }

    /// Keep the queues `keep` selects (and their bindings), name everything under `namespace.`
    /// with `{node}` replaced, and keep the exchanges only when `with_exchanges` (a per-node
    /// slice re-declares nothing shared).
    fn resolve(
        &self,
        namespace: &str,
        keep: impl Fn(&QueueSpec) -> bool,
        node: &str,
        with_exchanges: bool,
    ) -> Topology {
        let names = Names::new(namespace);
        let name = |n: &str| names.resolve(n, node);
        let kept: Vec<&QueueSpec> = self.queues.iter().filter(|q| keep(q)).collect();
        Topology {
            tunables: self.tunables,
            exchanges: if !with_exchanges {
                Vec::new()
            } else {
                self.exchanges
                    .iter()
                    .map(|e| ExchangeSpec {
                        name: name(&e.name),
                        ..e.clone()
                    })
                    .collect()
            },
            queues: kept
                .iter()
                .map(|q| QueueSpec {
                    name: name(&q.name),
                    dead_letter_exchange: q.dead_letter_exchange.as_deref().map(name),
                    ..(*q).clone()
                })
                .collect(),
            bindings: self
                .bindings
                .iter()
                .filter(|b| kept.iter().any(|q| q.name == b.queue))
                .map(|b| BindingSpec {
                    exchange: name(&b.exchange),
                    queue: name(&b.queue),
                    routing_key: b.routing_key.replace("{node}", node),
                })
                .collect(),
        }
    }

    /// A human-readable listing, as `vigil topology print` shows it.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for e in &self.exchanges {
            let _ = writeln!(
                out,
                "exchange {:<28} {:<7} durable={}",
                e.name,
                e.kind.as_str(),
                e.durable
            );
        }
        for q in &self.queues {
            let mut args = Vec::new();
            if let Some(v) = q.message_ttl_ms {
                args.push(format!("ttl={v}ms"));
            }
            if let Some(v) = q.max_length {
                args.push(format!("max_length={v}"));
            }
            if let Some(v) = q.max_length_bytes {
                args.push(format!("max_bytes={v}"));
            }
            if let Some(v) = q.overflow {
                args.push(format!("overflow={}", v.as_str()));
            }
            if let Some(v) = &q.dead_letter_exchange {
                args.push(format!("dlx={v}"));
            }
            if let Some(v) = &q.dead_letter_routing_key {
                args.push(format!("dlrk={v}"));
            }
            if q.queue_type == QueueType::Quorum {
                args.push("quorum".into());
            }
            let _ = writeln!(
                out,
                "queue    {:<28} {:<11} durable={} exclusive={} {}",
                q.name,
                format!("{:?}", q.role).to_lowercase(),
                q.durable,
                q.exclusive,
                args.join(" ")
            );
        }
        for b in &self.bindings {
            let _ = writeln!(
                out,
                "binding  {} -> {} key={:?}",
                b.exchange, b.queue, b.routing_key
            );
        }
        out
    }
}

fn check_name(errors: &mut Vec<String>, what: &str, name: &str, per_node: bool) {
    if name.is_empty() || name.len() > 200 {
        errors.push(format!("{what} name `{name}` must be 1..=200 bytes"));
    }
    if name.contains("{node}") != per_node {
        if per_node {
            errors.push(format!("per_node {what} `{name}` must contain {{node}}"));
        } else {
            errors.push(format!(
                "{what} `{name}` contains {{node}} but is not per_node"
            ));
        }
    }
}

/// Validate a namespace or node id: it becomes part of queue names and routing keys.
pub fn check_identifier(what: &str, value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} `{value}` must be 1..=64 characters of [A-Za-z0-9_-]"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_patterns_match_as_rabbitmq_does() {
        assert!(topic_matches("edge.n1.#", "edge.n1.c1"));
        assert!(topic_matches("edge.n1.#", "edge.n1"));
        assert!(topic_matches("edge.*.c1", "edge.n1.c1"));
        assert!(topic_matches("#", "a.b.c"));
        assert!(!topic_matches("edge.n1.#", "edge.n2.c1"));
        assert!(!topic_matches("edge.*", "edge.n1.c1"));
        assert!(!topic_matches("edge.n1.*", "edge.n1"));
    }

    #[test]
    fn names_are_made_in_one_place() {
        let names = Names::new("ns");
        assert_eq!(names.work_queue(), "ns.frames.work");
        assert_eq!(names.edge_control_queue("e1"), "ns.control.edge.e1");
        assert_eq!(Names::reply_key("e1", "c1"), "edge.e1.c1");
        let topo = Topology::load(None)
            .unwrap()
            .per_node("ns", NodeKind::Edge, "e1");
        assert!(
            topo.queues
                .iter()
                .any(|q| q.name == names.resolve(EDGE_REPLY_QUEUE, "e1"))
        );
    }

    #[test]
    fn a_reply_binding_that_misses_the_workers_key_is_refused() {
        // The binding's key no longer matches what workers publish: replies would vanish.
        let text = EMBEDDED.replace(
            "routing_key = \"edge.{node}.#\"",
            "routing_key = \"reply.{node}.#\"",
        );
        let errors = Topology::parse(&text).unwrap_err().to_string();
        assert!(errors.contains("the workers' reply key"), "{errors}");
        // One that routes every edge's replies to every edge is refused too.
        let text = EMBEDDED.replace(
            "routing_key = \"edge.{node}.#\"",
            "routing_key = \"edge.*.#\"",
        );
        let errors = Topology::parse(&text).unwrap_err().to_string();
        assert!(errors.contains("to every edge"), "{errors}");
    }

    #[test]
    fn embedded_topology_is_valid() {
        let t = Topology::parse(EMBEDDED).unwrap();
        let shared = t.shared("vigil");
        let work = shared
            .queues
            .iter()
            .find(|q| q.name == "vigil.frames.work")
            .unwrap();
        assert_eq!(work.overflow, Some(Overflow::DropHead));
        assert_eq!(work.dead_letter_exchange.as_deref(), Some("vigil.dead"));
        assert!(work.message_ttl_ms.is_some() && work.max_length.is_some());
        assert!(shared.queues.iter().all(|q| !q.name.contains("{node}")));
        assert!(
            shared
                .exchanges
                .iter()
                .any(|e| e.name == "vigil.replies" && e.kind == ExchangeKind::Topic)
        );
    }

    #[test]
    fn per_node_queue_is_resolved() {
        let t = Topology::parse(EMBEDDED).unwrap();
        let edge = t.per_node("ns1", NodeKind::Edge, "e7");
        assert_eq!(edge.queues.len(), 2);
        assert_eq!(edge.queues[0].name, "ns1.replies.edge.e7");
        assert!(edge.queues[0].exclusive && edge.queues[0].auto_delete);
        let reply = edge
            .bindings
            .iter()
            .find(|b| b.exchange == "ns1.replies")
            .unwrap();
        assert_eq!(
            (reply.queue.as_str(), reply.routing_key.as_str()),
            ("ns1.replies.edge.e7", "edge.e7.#")
        );
        let control = edge
            .bindings
            .iter()
            .find(|b| b.exchange == "ns1.control")
            .unwrap();
        assert_eq!(control.queue, "ns1.control.edge.e7");
        assert!(t.per_node("ns1", NodeKind::Worker, "w").queues.is_empty());
    }

    #[test]
    fn validation_lists_every_error() {
        let text = r#"
            [[exchange]]
            name = "frames"
            kind = "fanout"
            [[queue]]
            name = "frames.work"
            role = "work"
            [[binding]]
            exchange = "nowhere"
            queue = "missing"
        "#;
        let Err(TopologyError::Invalid(errors)) = Topology::parse(text) else {
            panic!("expected validation errors")
        };
        let all = errors.join("\n");
        for want in [
            "work queue `frames.work` has no dead_letter_exchange",
            "undeclared exchange `nowhere`",
            "undeclared queue `missing`",
            "required exchange `replies`",
            "required queue `dead.letters`",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let text = "[[exchange]]\nname = \"x\"\nkind = \"fanout\"\ncolour = \"red\"\n";
        assert!(matches!(
            Topology::parse(text),
            Err(TopologyError::Parse(_))
        ));
    }

    #[test]
    fn identifiers() {
        assert!(check_identifier("namespace", "test-1_a").is_ok());
        assert!(check_identifier("namespace", "a.b").is_err());
        assert!(check_identifier("namespace", "").is_err());
    }

    #[test]
    fn tunables_become_one_policy_per_durable_queue() {
        let topo = Topology::load(None)
            .unwrap()
            .with_tunables(Tunables::Policies);
        let shared = topo.shared("t-ns");
        assert_eq!(shared.tunables, Tunables::Policies);
        let policies = shared.policies();
        let work = policies
            .iter()
            .find(|p| p.name == "t-ns.frames.work")
            .expect("the work queue has a policy");
        assert_eq!(work.pattern, "^t\\-ns\\.frames\\.work$");
        assert_eq!(work.definition["message-ttl"], 5000);
        assert_eq!(work.definition["overflow"], "drop-head");
        assert_eq!(work.definition["dead-letter-exchange"], "t-ns.dead");
        // Declared, the work queue carries none of what its policy does; without policies,
        // all of it.
        let spec = shared
            .queues
            .iter()
            .find(|q| q.name == "t-ns.frames.work")
            .unwrap();
        let declared = spec.as_declared(Tunables::Policies);
        assert_eq!(
            (
                declared.message_ttl_ms,
                declared.overflow,
                declared.queue_type
            ),
            (None, None, QueueType::Quorum)
        );
        assert_eq!(*spec.as_declared(Tunables::Arguments), *spec);
        // The audit queue has no tunables: no policy, rather than an empty one.
        assert!(policies.iter().all(|p| p.name != "t-ns.audit"));
        // Queues declared afresh by their node keep their tunables as arguments.
        let per_node = topo.per_node("t-ns", NodeKind::Edge, "e1");
        assert!(per_node.queues.iter().all(|q| !q.takes_policy()));
        assert!(per_node.policies().is_empty());
    }
}
