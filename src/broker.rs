//! The AMQP side: connecting to RabbitMQ, declaring the topology, publishing under confirms
//! and consuming with prefetch. This module alone imports `lapin`; the rest of Vigil sees
//! [`Broker`], [`Publisher`], [`Consumer`] and [`Delivery`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use uuid::Uuid;

use crate::metrics::BrokerMetrics;
use crate::topology::{self, Topology};
use crate::wire::{self, Envelope, Payload};

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot connect to the broker at {url}: {source}")]
    Connect { url: String, source: lapin::Error },
    #[error(
        "the broker at {url} did not complete the AMQP handshake within {after:?} \
         (set connection_timeout=<ms> in the URL to change the limit)"
    )]
    HandshakeTimeout { url: String, after: Duration },
    #[error("broker TLS settings in {url}: {reason}")]
    Tls { url: String, reason: String },
    #[error("no broker URL is set")]
    NoUrl,
    #[error("broker {op} failed: {source}")]
    Amqp {
        op: &'static str,
        source: lapin::Error,
    },
    #[error(
        "{what} `{name}` does not exist, and this role may not declare it: \
         run `vigil topology apply` as the admin role first"
    )]
    Missing { what: &'static str, name: String },
    #[error("the broker ended the consumer")]
    ConsumerEnded,
    #[error("the broker refused (nacked) the message")]
    Nacked,
    #[error("cannot encode event: {0}")]
    Encode(#[from] wire::WireError),
}

fn amqp(op: &'static str) -> impl FnOnce(lapin::Error) -> BrokerError {
    move |source| BrokerError::Amqp { op, source }
}

/// Hide the password of an AMQP URL, for logs and errors.
pub fn redact_url(url: &str) -> String {
    if url.contains(',') {
        return broker_urls(url)
            .into_iter()
            .map(redact_url)
            .collect::<Vec<_>>()
            .join(",");
    }
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        // No scheme (a mistyped URL): whatever comes before an `@` may be a password.
        (None, Some(at)) => format!("***{}", &url[at..]),
        _ => url.to_owned(),
    }
}

/// The CA an `amqps://` URL names in its `cacertfile` query parameter (as in RabbitMQ's own
/// URI scheme), read as PEM: `Ok(None)` when the URL names none, and server certificates are
/// then checked against the system's roots.
pub fn tls_ca(url: &str) -> Result<Option<String>, String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
    let Some((_, path)) = parsed.query_pairs().find(|(k, _)| k == "cacertfile") else {
        return Ok(None);
    };
    if parsed.scheme() != "amqps" {
        return Err("cacertfile is for amqps:// URLs only".into());
    }
    let pem =
        std::fs::read_to_string(path.as_ref()).map_err(|e| format!("cacertfile {path}: {e}"))?;
    use tokio_rustls::rustls::pki_types::{CertificateDer, pem::PemObject as _};
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cacertfile {path}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("cacertfile {path}: no PEM certificate in it"));
    }
    Ok(Some(pem))
}

/// One connection to RabbitMQ.
pub struct Broker {
    conn: Connection,
    metrics: BrokerMetrics,
    /// The user this connection authenticated as; every publish carries it as `user_id`.
    user: String,
}

/// How long one connection attempt (TCP connect and AMQP handshake) may take when the URL
/// does not say (`?connection_timeout=<ms>`).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The limit on one connection attempt: the URL's `connection_timeout` query parameter (ms),
/// else [`DEFAULT_HANDSHAKE_TIMEOUT`].
pub fn handshake_timeout(url: &str) -> Duration {
    url.parse::<lapin::uri::AMQPUri>()
        .ok()
        .and_then(|u| u.query.connection_timeout)
        .map_or(DEFAULT_HANDSHAKE_TIMEOUT, Duration::from_millis)
}

/// The broker URLs of a setting: one URL, or several separated by commas (the nodes of one
/// cluster), tried in turn.
pub fn broker_urls(setting: &str) -> Vec<&str> {
    setting
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect()
}

/// The user and virtual host a broker setting's (first) URL connects as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlParts {
    pub user: String,
    pub vhost: String,
}

/// [`UrlParts`] of the first URL of `setting` ([`broker_urls`]), or why it does not parse.
pub fn url_parts(setting: &str) -> Result<UrlParts, String> {
    let first = broker_urls(setting).first().copied().unwrap_or_default();
    let uri = first
        .parse::<lapin::uri::AMQPUri>()
        .map_err(|e| e.to_string())?;
    Ok(UrlParts {
        user: uri.authority.userinfo.username,
        vhost: uri.vhost,
    })
}

impl Broker {
    /// Connect to the first node of `urls` (one URL, or a comma-separated list of a cluster's
    /// nodes) that answers, naming the connection after the node so the management UI shows
    /// who is who. The nodes are tried from a random one on, so that a cluster's clients
    /// spread over its nodes and a lost node's clients do not all land on the next one.
    ///
    /// Each attempt is bounded: a RabbitMQ node that is still booting can accept the socket
    /// and then never finish the handshake, and an unbounded attempt would wait forever.
    pub async fn connect(
        urls: &str,
        node_name: &str,
        metrics: BrokerMetrics,
    ) -> Result<Self, BrokerError> {
        let list = broker_urls(urls);
        if list.is_empty() {
            return Err(BrokerError::NoUrl);
        }
        let first = rand::random_range(0..list.len());
        let mut last = None;
        for i in 0..list.len() {
            let url = list[(first + i) % list.len()];
            match Self::connect_one(url, node_name, metrics.clone()).await {
                Ok(broker) => return Ok(broker),
                Err(e) => {
                    if list.len() > 1 {
                        tracing::warn!(error = %e, "broker node unreachable; trying the next");
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.expect("at least one URL was tried"))
    }

    async fn connect_one(
        url: &str,
        node_name: &str,
        metrics: BrokerMetrics,
    ) -> Result<Self, BrokerError> {
        let props = ConnectionProperties::default().with_connection_name(node_name.into());
        let limit = handshake_timeout(url);
        let tls = OwnedTLSConfig {
            identity: None,
            cert_chain: tls_ca(url).map_err(|reason| BrokerError::Tls {
                url: redact_url(url),
                reason,
            })?,
        };
        let runtime = lapin::runtime::default_runtime().map_err(|source| BrokerError::Connect {
            url: redact_url(url),
            source,
        })?;
        let connect = Connection::connect_with_config(url, props, tls, runtime);
        let conn = match tokio::time::timeout(limit, connect).await {
            Ok(conn) => conn.map_err(|source| BrokerError::Connect {
                url: redact_url(url),
                source,
            })?,
            Err(_) => {
                metrics.handshake_timeouts.inc();
                return Err(BrokerError::HandshakeTimeout {
                    url: redact_url(url),
                    after: limit,
                });
            }
        };
        let user = url
            .parse::<lapin::uri::AMQPUri>()
            .map(|u| u.authority.userinfo.username)
            .unwrap_or_else(|_| "guest".into());
        Ok(Self {
            conn,
            metrics,
            user,
        })
    }

    /// The broker user this connection authenticated as.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// What this process trusts on the broker (see [`crate::roles`]).
    pub fn trust(&self, mode: crate::roles::RoleMode, namespace: &str) -> crate::roles::Trust {
        crate::roles::Trust::new(mode, namespace, &self.user, self.metrics.clone())
    }

    /// Declare `topo` (`shared` roles), or only check that it exists (`separate` roles: a
    /// service's user may not configure shared resources, and a passive declare needs no
    /// permission; `vigil topology apply` as the admin role declares them).
    pub async fn prepare(
        &self,
        topo: &Topology,
        mode: crate::roles::RoleMode,
    ) -> Result<(), BrokerError> {
        match mode {
            crate::roles::RoleMode::Shared => self.declare(topo).await,
            crate::roles::RoleMode::Separate => self.check(topo).await,
        }
    }

    /// Check that every exchange and queue of `topo` exists (passive declares).
    pub async fn check(&self, topo: &Topology) -> Result<(), BrokerError> {
        let names = topo
            .exchanges
            .iter()
            .map(|e| (true, &e.name))
            .chain(topo.queues.iter().map(|q| (false, &q.name)));
        for (exchange, name) in names {
            // A failed passive declare closes its channel: one channel per check.
            let ch = self.channel().await?;
            let found = if exchange {
                let opts = ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                };
                ch.exchange_declare(
                    name.as_str().into(),
                    ExchangeKind::Fanout,
                    opts,
                    FieldTable::default(),
                )
                .await
                .is_ok()
            } else {
                let opts = QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                };
                ch.queue_declare(name.as_str().into(), opts, FieldTable::default())
                    .await
                    .is_ok()
            };
            if !found {
                return Err(BrokerError::Missing {
                    what: if exchange { "exchange" } else { "queue" },
                    name: name.clone(),
                });
            }
            let _ = ch.close(200, "checked".into()).await;
        }
        Ok(())
    }

    /// Connect, retrying with exponential backoff until `give_up` has passed.
    pub async fn connect_with_retry(
        url: &str,
        node_name: &str,
        metrics: BrokerMetrics,
        give_up: Duration,
    ) -> Result<Self, BrokerError> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(100);
        loop {
            match Self::connect(url, node_name, metrics.clone()).await {
                Ok(b) => return Ok(b),
                Err(e) if start.elapsed() + delay < give_up => {
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "broker not reachable yet");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// True while the connection is up (not closed, not failed).
    pub fn is_connected(&self) -> bool {
        self.conn.status().connected()
    }

    /// True while RabbitMQ blocks this connection's publishers (`connection.blocked`: a memory
    /// or disk alarm). Publishes then wait until the alarm clears.
    pub fn is_blocked(&self) -> bool {
        self.conn.status().blocked()
    }

    async fn channel(&self) -> Result<Channel, BrokerError> {
        self.conn
            .create_channel()
            .await
            .map_err(amqp("channel.open"))
    }

    /// Declare exchanges, queues and bindings. Idempotent: re-declaring with the same
    /// arguments is a no-op on the broker.
    pub async fn declare(&self, topo: &Topology) -> Result<(), BrokerError> {
        let ch = self.channel().await?;
        for e in &topo.exchanges {
            let kind = match e.kind {
                topology::ExchangeKind::Fanout => ExchangeKind::Fanout,
                topology::ExchangeKind::Topic => ExchangeKind::Topic,
                topology::ExchangeKind::Direct => ExchangeKind::Direct,
                topology::ExchangeKind::Headers => ExchangeKind::Headers,
            };
            let opts = ExchangeDeclareOptions {
                durable: e.durable,
                auto_delete: e.auto_delete,
                ..Default::default()
            };
            ch.exchange_declare(e.name.as_str().into(), kind, opts, FieldTable::default())
                .await
                .map_err(amqp("exchange.declare"))?;
        }
        for q in &topo.queues {
            let mut args = FieldTable::default();
            let mut put = |k: &str, v: AMQPValue| {
                args.insert(k.into(), v);
            };
            let q = q.as_declared(topo.tunables);
            if let Some(v) = q.message_ttl_ms {
                put("x-message-ttl", AMQPValue::LongLongInt(v.into()));
            }
            if let Some(v) = q.max_length {
                put("x-max-length", AMQPValue::LongLongInt(v.into()));
            }
            if let Some(v) = q.max_length_bytes {
                put("x-max-length-bytes", AMQPValue::LongLongInt(v as i64));
            }
            if let Some(v) = q.overflow {
                put("x-overflow", AMQPValue::LongString(v.as_str().into()));
            }
            if let Some(v) = &q.dead_letter_exchange {
                put(
                    "x-dead-letter-exchange",
                    AMQPValue::LongString(v.as_str().into()),
                );
            }
            if let Some(v) = &q.dead_letter_routing_key {
                put(
                    "x-dead-letter-routing-key",
                    AMQPValue::LongString(v.as_str().into()),
                );
            }
            if let Some(v) = &q.dead_letter_strategy {
                put(
                    "x-dead-letter-strategy",
                    AMQPValue::LongString(v.as_str().into()),
                );
            }
            if q.role.is_stream() {
                put("x-queue-type", AMQPValue::LongString("stream".into()));
            } else if q.queue_type == topology::QueueType::Quorum {
                put("x-queue-type", AMQPValue::LongString("quorum".into()));
            }
            if q.single_active_consumer {
                put("x-single-active-consumer", AMQPValue::Boolean(true));
            }
            if let Some(v) = &q.max_age {
                put("x-max-age", AMQPValue::LongString(v.as_str().into()));
            }
            let opts = QueueDeclareOptions {
                durable: q.durable,
                exclusive: q.exclusive,
                auto_delete: q.auto_delete,
                ..Default::default()
            };
            ch.queue_declare(q.name.as_str().into(), opts, args)
                .await
                .map_err(amqp("queue.declare"))?;
        }
        for b in &topo.bindings {
            ch.queue_bind(
                b.queue.as_str().into(),
                b.exchange.as_str().into(),
                b.routing_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp("queue.bind"))?;
        }
        let _ = ch.close(200, "declared".into()).await;
        Ok(())
    }

    /// Delete every queue and exchange of a topology (test and `vigil topology delete` use).
    pub async fn delete(&self, topo: &Topology) -> Result<(), BrokerError> {
        let ch = self.channel().await?;
        for q in &topo.queues {
            ch.queue_delete(q.name.as_str().into(), QueueDeleteOptions::default())
                .await
                .map_err(amqp("queue.delete"))?;
        }
        for e in &topo.exchanges {
            ch.exchange_delete(e.name.as_str().into(), Default::default())
                .await
                .map_err(amqp("exchange.delete"))?;
        }
        let _ = ch.close(200, "deleted".into()).await;
        Ok(())
    }

    /// A publisher on its own channel, with publisher confirms on.
    pub async fn publisher(&self) -> Result<Publisher, BrokerError> {
        let channel = self.channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(amqp("confirm.select"))?;
        Ok(Publisher {
            channel,
            metrics: self.metrics.clone(),
            user_id: self.user.as_str().into(),
        })
    }

    /// A consumer on its own channel. With `ack`, the broker sends at most `prefetch` unacked
    /// deliveries; without, deliveries are settled on send (for ephemeral reply queues).
    pub async fn consume(
        &self,
        queue: &str,
        consumer_tag: &str,
        prefetch: u16,
        ack: bool,
    ) -> Result<Consumer, BrokerError> {
        let options = BasicConsumeOptions {
            no_ack: !ack,
            ..Default::default()
        };
        self.consume_with(
            queue,
            consumer_tag,
            prefetch,
            options,
            FieldTable::default(),
        )
        .await
    }

    /// A consumer on its own channel, with `prefetch`, these options and arguments.
    async fn consume_with(
        &self,
        queue: &str,
        consumer_tag: &str,
        prefetch: u16,
        options: BasicConsumeOptions,
        args: FieldTable,
    ) -> Result<Consumer, BrokerError> {
        let channel = self.channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(amqp("basic.qos"))?;
        let inner = channel
            .basic_consume(queue.into(), consumer_tag.into(), options, args)
            .await
            .map_err(amqp("basic.consume"))?;
        Ok(Consumer { channel, inner })
    }

    /// Read a stream queue from `since_ms` (Unix ms) on. Deliveries must be acked: that is
    /// the stream's flow control.
    pub async fn consume_stream(
        &self,
        queue: &str,
        consumer_tag: &str,
        since_ms: u64,
        prefetch: u16,
    ) -> Result<Consumer, BrokerError> {
        self.consume_stream_at(
            queue,
            consumer_tag,
            AMQPValue::Timestamp(since_ms / 1000),
            prefetch,
        )
        .await
    }

    /// Read a stream from its first retained message on.
    pub async fn consume_stream_first(
        &self,
        queue: &str,
        consumer_tag: &str,
        prefetch: u16,
    ) -> Result<Consumer, BrokerError> {
        let first = AMQPValue::LongString("first".into());
        self.consume_stream_at(queue, consumer_tag, first, prefetch)
            .await
    }

    /// Read a stream from `offset` on.
    pub async fn consume_stream_from_offset(
        &self,
        queue: &str,
        consumer_tag: &str,
        offset: u64,
        prefetch: u16,
    ) -> Result<Consumer, BrokerError> {
        let at = AMQPValue::LongLongInt(i64::try_from(offset).unwrap_or(i64::MAX));
        self.consume_stream_at(queue, consumer_tag, at, prefetch)
            .await
    }

    pub async fn consume_stream_last(
        &self,
        queue: &str,
        consumer_tag: &str,
        prefetch: u16,
    ) -> Result<Consumer, BrokerError> {
        self.consume_stream_at(
            queue,
            consumer_tag,
            AMQPValue::LongString("last".into()),
            prefetch,
        )
        .await
    }

    async fn consume_stream_at(
        &self,
        queue: &str,
        consumer_tag: &str,
        offset: AMQPValue,
        prefetch: u16,
    ) -> Result<Consumer, BrokerError> {
        let mut args = FieldTable::default();
        args.insert("x-stream-offset".into(), offset);
        let options = BasicConsumeOptions::default();
        self.consume_with(queue, consumer_tag, prefetch, options, args)
            .await
    }

    /// Number of ready messages in a queue (a passive declare).
    pub async fn queue_len(&self, queue: &str) -> Result<u32, BrokerError> {
        Ok(self.queue_counts(queue).await?.0)
    }

    /// Ready messages and consumers of a queue (a passive declare).
    pub async fn queue_counts(&self, queue: &str) -> Result<(u32, u32), BrokerError> {
        let ch = self.channel().await?;
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(amqp("queue.declare"))?;
        let _ = ch.close(200, "done".into()).await;
        Ok((q.message_count(), q.consumer_count()))
    }

    /// Take one message from a queue, acking it (inspection of dead letters).
    pub async fn get(&self, queue: &str) -> Result<Option<RawMessage>, BrokerError> {
        let ch = self.channel().await?;
        let msg = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .map_err(amqp("basic.get"))?;
        let _ = ch.close(200, "done".into()).await;
        Ok(msg.map(|m| RawMessage {
            data: m.delivery.data,
            kind: m.delivery.properties.kind().as_ref().map(|s| s.to_string()),
            death_reason: first_death_reason(&m.delivery.properties),
        }))
    }

    /// Up to `max` ready messages of `queue`, left where they are: each is taken unacked and
    /// goes back, in its place, when the channel closes (`vigil webhooks list`).
    pub async fn peek(&self, queue: &str, max: usize) -> Result<Vec<RawMessage>, BrokerError> {
        let ch = self.channel().await?;
        let mut out = Vec::new();
        while out.len() < max {
            let got = ch
                .basic_get(queue.into(), BasicGetOptions { no_ack: false })
                .await
                .map_err(amqp("basic.get"))?;
            let Some(m) = got else { break };
            out.push(RawMessage {
                data: m.delivery.data,
                kind: m.delivery.properties.kind().as_ref().map(|s| s.to_string()),
                death_reason: first_death_reason(&m.delivery.properties),
            });
        }
        let _ = tokio::time::timeout(CLOSE_LIMIT, ch.close(200, "peeked".into())).await;
        Ok(out)
    }

    /// Move up to `max` messages from `queue` to `exchange` with `routing_key`, each as
    /// `rewrite` makes it: republished persistent under a confirm, and only then acked, so a
    /// failure leaves it where it was. A message `rewrite` turns down (`None`) stays in
    /// `queue`. Returns how many moved (`vigil webhooks retry`).
    pub async fn move_messages(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        max: usize,
        mut rewrite: impl FnMut(&[u8]) -> Option<Vec<u8>>,
    ) -> Result<usize, BrokerError> {
        let ch = self.channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(amqp("confirm.select"))?;
        let mut moved = 0;
        let mut seen = 0;
        while seen < max {
            let got = ch
                .basic_get(queue.into(), BasicGetOptions { no_ack: false })
                .await
                .map_err(amqp("basic.get"))?;
            let Some(m) = got else { break };
            seen += 1;
            // Left unacked, it goes back to the queue when the channel closes.
            let Some(bytes) = rewrite(&m.delivery.data) else {
                continue;
            };
            let props = m
                .delivery
                .properties
                .clone()
                .with_delivery_mode(2)
                .with_user_id(self.user.as_str().into());
            let confirm = ch
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    &bytes,
                    props,
                )
                .await
                .map_err(amqp("basic.publish"))?;
            match tokio::time::timeout(CLOSE_LIMIT, confirm).await {
                Ok(Ok(c)) if c.is_ack() => {}
                Ok(Ok(_)) => return Err(BrokerError::Nacked),
                Ok(Err(source)) => {
                    return Err(BrokerError::Amqp {
                        op: "publisher confirm",
                        source,
                    });
                }
                Err(_) => return Err(BrokerError::Nacked),
            }
            ch.basic_ack(m.delivery.delivery_tag, BasicAckOptions::default())
                .await
                .map_err(amqp("basic.ack"))?;
            moved += 1;
        }
        let _ = tokio::time::timeout(CLOSE_LIMIT, ch.close(200, "moved".into())).await;
        Ok(moved)
    }

    /// Remove every ready message from a queue.
    pub async fn purge(&self, queue: &str) -> Result<u32, BrokerError> {
        let ch = self.channel().await?;
        let n = ch
            .queue_purge(queue.into(), QueuePurgeOptions::default())
            .await
            .map_err(amqp("queue.purge"))?;
        let _ = ch.close(200, "done".into()).await;
        Ok(n)
    }

    /// Close the connection, waiting at most [`CLOSE_LIMIT`] for the broker's answer.
    pub async fn close(&self) {
        let _ = tokio::time::timeout(CLOSE_LIMIT, self.conn.close(200, "bye".into())).await;
    }
}

/// Retry `attempt` until it succeeds or `shutdown` (then `None`). Before each try, a random
/// wait in `[0, ceiling]` (full jitter), the ceiling doubling from 200 ms up to `max`: every
/// process that lost the same broker comes back spread out, not in lockstep. The one reconnect
/// loop of the edge, the worker and the audit writer.
/// How long the reconnect loop waits at most between two attempts.
pub const RECONNECT_MAX_WAIT: Duration = Duration::from_secs(2);

/// (Re)connect a service: connect as `name` and open what it needs on the broker (`open`:
/// declare, consume, make publishers), retrying with jitter ([`retry_jittered`]) until it
/// works, or `None` once `shutdown`. The edge, the worker and the audit writer all come back
/// through here, and each comeback is counted in `vigil_broker_reconnects_total`.
pub async fn relink<T, E, F, Fut>(
    url: &str,
    name: &str,
    metrics: &BrokerMetrics,
    shutdown: &tokio_util::sync::CancellationToken,
    open: F,
) -> Option<T>
where
    E: std::fmt::Display + From<BrokerError>,
    F: Fn(Broker) -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let linked = retry_jittered(shutdown, RECONNECT_MAX_WAIT, || async {
        let broker = Broker::connect(url, name, metrics.clone()).await?;
        open(broker).await
    })
    .await?;
    metrics.reconnects.inc();
    Some(linked)
}

pub async fn retry_jittered<T, E, F, Fut>(
    shutdown: &tokio_util::sync::CancellationToken,
    max: Duration,
    mut attempt: F,
) -> Option<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut ceiling = Duration::from_millis(200);
    loop {
        let wait = ceiling.mul_f64(rand::random::<f64>());
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(wait) => {}
        }
        match attempt().await {
            Ok(value) => return Some(value),
            Err(e) => tracing::debug!(error = %e, "broker still unreachable"),
        }
        ceiling = (ceiling * 2).min(max);
    }
}

/// The longest a close waits for the broker: a connection the broker no longer answers (it
/// is restarting, or the link is half-dead) must not hold a process that is shutting down.
pub const CLOSE_LIMIT: Duration = Duration::from_secs(5);

fn first_death_reason(props: &BasicProperties) -> Option<String> {
    let headers = props.headers().as_ref()?;
    match headers.inner().get("x-first-death-reason")? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// A message as taken from a queue by [`Broker::get`].
#[derive(Debug, Clone)]
pub struct RawMessage {
    pub data: Vec<u8>,
    /// The AMQP `type` property.
    pub kind: Option<String>,
    /// Why the broker dead-lettered it (`rejected`, `expired`, `maxlen`), if it did.
    pub death_reason: Option<String>,
}

/// AMQP properties for an event: content type, id, timestamp, type, and an expiration that
/// matches the event's deadline so the broker drops it when it is worthless.
fn properties(env: &Envelope, now_ms: u64) -> BasicProperties {
    let props = event_properties(
        &env.id,
        env.produced_at_ms,
        env.payload.kind(),
        // Actions must survive a broker restart on their way to the audit trail; frames and
        // results are worthless after their deadline.
        matches!(
            env.payload,
            Payload::Action(_) | Payload::AdminOp(_) | Payload::Session(_)
        ),
        (env.deadline_ms > 0).then(|| env.remaining_ms(now_ms)),
    );
    // The W3C trace context in the AMQP headers too, where tools that do not read Vigil's
    // MessagePack (tracing plugins, other consumers) find it.
    if wire::trace_id(&env.traceparent).is_some() {
        let mut headers = FieldTable::default();
        headers.insert(
            "traceparent".into(),
            AMQPValue::LongString(env.traceparent.as_str().into()),
        );
        props.with_headers(headers)
    } else {
        props
    }
}

fn event_properties(
    id: &Uuid,
    produced_at_ms: u64,
    kind: &str,
    persistent: bool,
    remaining_ms: Option<u64>,
) -> BasicProperties {
    let mut props = BasicProperties::default()
        .with_content_type(wire::CONTENT_TYPE.into())
        .with_message_id(id.to_string().into())
        .with_timestamp(produced_at_ms / 1000)
        .with_type(kind.into())
        .with_delivery_mode(if persistent { 2 } else { 1 });
    if let Some(remaining) = remaining_ms {
        // At least 1 ms: an expiration of 0 means "deliver now or never".
        props = props.with_expiration(remaining.max(1).to_string().into());
    }
    props
}

/// The publisher of whatever connection is current: a handle that outlives connections. Whoever
/// reconnects puts the new publisher in ([`PublisherSlot::swap`]); every publish takes the
/// current one ([`PublisherSlot::get`]).
#[derive(Clone)]
pub struct PublisherSlot(Arc<std::sync::RwLock<Arc<Publisher>>>);

impl PublisherSlot {
    pub fn new(publisher: Arc<Publisher>) -> Self {
        Self(Arc::new(std::sync::RwLock::new(publisher)))
    }

    /// The current publisher.
    pub fn get(&self) -> Arc<Publisher> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Put the publisher of a new connection in; publishes from now on use it.
    pub fn swap(&self, publisher: Arc<Publisher>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = publisher;
    }
}

/// Publishes on one confirm-mode channel. Cheap to share behind an `Arc`.
pub struct Publisher {
    channel: Channel,
    metrics: BrokerMetrics,
    /// Set on every message: RabbitMQ refuses a `user_id` that is not the connection's user,
    /// so receivers can trust it to name the publisher (see [`crate::roles`]).
    user_id: ShortString,
}

impl Publisher {
    /// True while its channel is open (a refused publish closes it).
    pub fn is_open(&self) -> bool {
        self.channel.status().connected()
    }

    /// Publish an event. The returned [`Confirm`] resolves when the broker has taken it.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        env: &Envelope,
    ) -> Result<Confirm, BrokerError> {
        let bytes = env.encode()?;
        self.publish_bytes(
            exchange,
            routing_key,
            &bytes,
            properties(env, wire::now_ms()),
        )
        .await
    }

    /// Publish pre-encoded bytes with bare properties (benchmarks and fault injection).
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        bytes: &[u8],
    ) -> Result<Confirm, BrokerError> {
        let props = BasicProperties::default().with_content_type(wire::CONTENT_TYPE.into());
        self.publish_bytes(exchange, routing_key, bytes, props)
            .await
    }

    /// Publish a JSON document that must survive a broker restart (a webhook's delivery job),
    /// with its id, and an expiration when it waits in a delay queue for its next try.
    pub async fn publish_durable_json(
        &self,
        exchange: &str,
        routing_key: &str,
        bytes: &[u8],
        message_id: &str,
        expiration_ms: Option<u64>,
    ) -> Result<Confirm, BrokerError> {
        let mut props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(message_id.into())
            .with_timestamp(wire::now_ms() / 1000)
            .with_type("vigil.webhook".into())
            .with_delivery_mode(2);
        if let Some(ms) = expiration_ms {
            props = props.with_expiration(ms.max(1).to_string().into());
        }
        self.publish_bytes(exchange, routing_key, bytes, props)
            .await
    }

    /// Publish pre-encoded bytes with the properties an event of type `kind` carries (a
    /// fresh message id, a timestamp, transient delivery, an expiration of `ttl_ms`), for
    /// benchmarks that compare the broker's cost of Vigil's messages with a bare loop's.
    pub async fn publish_raw_as_event(
        &self,
        exchange: &str,
        routing_key: &str,
        bytes: &[u8],
        kind: &str,
        ttl_ms: u64,
    ) -> Result<Confirm, BrokerError> {
        let now = wire::now_ms();
        let props = event_properties(&Uuid::now_v7(), now, kind, false, Some(ttl_ms));
        self.publish_bytes(exchange, routing_key, bytes, props)
            .await
    }

    async fn publish_bytes(
        &self,
        exchange: &str,
        routing_key: &str,
        bytes: &[u8],
        props: BasicProperties,
    ) -> Result<Confirm, BrokerError> {
        let started = Instant::now();
        let inner = self
            .channel
            .basic_publish(
                exchange.into(),
                ShortString::from(routing_key),
                BasicPublishOptions::default(),
                bytes,
                props.with_user_id(self.user_id.clone()),
            )
            .await
            .map_err(|source| {
                self.metrics.publish_failures.inc();
                BrokerError::Amqp {
                    op: "basic.publish",
                    source,
                }
            })?;
        Ok(Confirm {
            inner,
            started,
            metrics: self.metrics.clone(),
        })
    }

    /// Close the channel after the confirms still pending have arrived (each wait bounded by
    /// [`CLOSE_LIMIT`]).
    pub async fn close(&self) {
        let _ = tokio::time::timeout(CLOSE_LIMIT, self.channel.wait_for_confirms()).await;
        let _ = tokio::time::timeout(CLOSE_LIMIT, self.channel.close(200, "bye".into())).await;
    }
}

/// A pending publisher confirm.
pub struct Confirm {
    inner: lapin::PublisherConfirm,
    started: Instant,
    metrics: BrokerMetrics,
}

impl Confirm {
    /// Wait until the broker acks the message; a nack or a lost channel is an error.
    pub async fn wait(self) -> Result<(), BrokerError> {
        let result = match self.inner.await {
            Ok(c) if c.is_ack() => Ok(()),
            Ok(_) => Err(BrokerError::Nacked),
            Err(source) => Err(BrokerError::Amqp {
                op: "publisher confirm",
                source,
            }),
        };
        match &result {
            Ok(()) => self
                .metrics
                .confirm_seconds
                .observe(self.started.elapsed().as_secs_f64()),
            Err(_) => self.metrics.publish_failures.inc(),
        }
        result
    }
}

/// A stream of deliveries from one queue.
pub struct Consumer {
    channel: Channel,
    inner: lapin::Consumer,
}

impl Consumer {
    /// The next delivery; `None` when the consumer was cancelled or the channel closed.
    pub async fn next(&mut self) -> Option<Result<Delivery, BrokerError>> {
        let item = self.inner.next().await?;
        Some(item.map(Delivery::new).map_err(amqp("basic.deliver")))
    }

    /// Stop deliveries; deliveries already received stay valid to ack.
    pub async fn cancel(&self) -> Result<(), BrokerError> {
        self.channel
            .basic_cancel(self.inner.tag(), BasicCancelOptions::default())
            .await
            .map_err(amqp("basic.cancel"))
    }

    /// Ack the delivery `tag` and every earlier unacked one of this consumer, in one frame.
    pub async fn ack_up_to(&self, tag: u64) -> Result<(), BrokerError> {
        self.channel
            .basic_ack(tag, BasicAckOptions { multiple: true })
            .await
            .map_err(amqp("basic.ack"))
    }

    /// Close the channel (bounded by [`CLOSE_LIMIT`]); the broker requeues whatever is still
    /// unacked.
    pub async fn close(&self) {
        let _ = tokio::time::timeout(CLOSE_LIMIT, self.channel.close(200, "bye".into())).await;
    }
}

/// One message received from a queue. Its body is shared, so that decoding can hand out
/// views into it (a frame's JPEG) instead of copies.
pub struct Delivery {
    inner: lapin::message::Delivery,
    body: bytes::Bytes,
}

impl Delivery {
    fn new(mut inner: lapin::message::Delivery) -> Self {
        let body = bytes::Bytes::from(std::mem::take(&mut inner.data));
        Self { inner, body }
    }

    pub fn data(&self) -> &[u8] {
        &self.body
    }

    /// The body, shared.
    pub fn body(&self) -> &bytes::Bytes {
        &self.body
    }

    /// True when the broker delivered this message before (to this or another consumer).
    pub fn redelivered(&self) -> bool {
        self.inner.redelivered
    }

    /// The publisher's broker user, as RabbitMQ checked it (`None` when the publisher did not
    /// say, which no Vigil publisher does).
    pub fn user_id(&self) -> Option<&str> {
        self.inner.properties.user_id().as_ref().map(|u| u.as_str())
    }

    /// A stream message's offset (the `x-stream-offset` header RabbitMQ adds).
    pub fn stream_offset(&self) -> Option<u64> {
        let headers = self.inner.properties.headers().as_ref()?;
        match headers.inner().get("x-stream-offset")? {
            AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
            AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
            AMQPValue::LongUInt(n) => Some(u64::from(*n)),
            AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
            _ => None,
        }
    }

    /// The exchange the message was published to.
    pub fn exchange(&self) -> &str {
        self.inner.exchange.as_str()
    }

    /// The channel's delivery tag: increasing in delivery order.
    pub fn tag(&self) -> u64 {
        self.inner.delivery_tag
    }

    pub async fn ack(&self) -> Result<(), BrokerError> {
        self.inner
            .acker
            .ack(BasicAckOptions::default())
            .await
            .map(|_| ())
            .map_err(amqp("basic.ack"))
    }

    /// Reject without requeue: the queue's dead-letter exchange gets it.
    pub async fn dead_letter(&self) -> Result<(), BrokerError> {
        self.nack(false).await
    }

    /// Give it back to the queue for another try.
    pub async fn requeue(&self) -> Result<(), BrokerError> {
        self.nack(true).await
    }

    async fn nack(&self, requeue: bool) -> Result<(), BrokerError> {
        self.inner
            .acker
            .nack(BasicNackOptions {
                requeue,
                ..Default::default()
            })
            .await
            .map(|_| ())
            .map_err(amqp("basic.nack"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("amqp://127.0.0.1"), "amqp://127.0.0.1");
        // A URL that lost its scheme still hides what may be a password.
        assert_eq!(redact_url("guest:secret@host:5672"), "***@host:5672");
    }

    #[test]
    fn the_handshake_limit_comes_from_the_url() {
        assert_eq!(
            handshake_timeout("amqp://guest:guest@127.0.0.1:5672/%2f"),
            DEFAULT_HANDSHAKE_TIMEOUT
        );
        assert_eq!(
            handshake_timeout("amqp://127.0.0.1:5672/%2f?connection_timeout=1500"),
            Duration::from_millis(1500)
        );
    }

    /// A peer that accepts the socket and then says nothing (as a booting broker can) ends
    /// the attempt with a clear error at the limit, and the limit is counted.
    #[tokio::test]
    async fn a_silent_peer_is_abandoned_at_the_handshake_limit() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = tokio::spawn(async move {
            let mut sockets = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                sockets.push(socket);
            }
        });
        let registry = prometheus::Registry::new();
        let metrics = BrokerMetrics::new(&registry);
        let url = format!("amqp://guest:secret@127.0.0.1:{port}/%2f?connection_timeout=300");
        let err = match Broker::connect(&url, "test", metrics.clone()).await {
            Ok(_) => panic!("a silent peer cannot complete a handshake"),
            Err(e) => e,
        };
        assert!(
            matches!(err, BrokerError::HandshakeTimeout { after, .. } if after == Duration::from_millis(300)),
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.contains("connection_timeout") && !text.contains("secret"),
            "{text}"
        );
        assert_eq!(metrics.handshake_timeouts.get(), 1);
        held.abort();
    }
}
