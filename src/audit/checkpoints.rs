//! The checkpoint stream: a `Checkpoint` is the log's head as the writer publishes it after
//! each entry (through `Checkpoints`), and `newest_checkpoint` reads the stream back for the
//! newest valid one (`CheckpointScan`), which `verify` and the writer's start compare the log with.

use std::time::Duration;

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{AuditError, signing};
use crate::broker::{Broker, Delivery};
use crate::metrics::AuditMetrics;

/// The head of the log as the writer last published it, to a second place (the checkpoint
/// stream): `verify` finds a log that ends before its newest checkpoint, or differs from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: u64,
    pub hash: String,
    /// The writer's signature of `seq`, `hash` and `written_at_ms`
    /// ([`signing::sign_checkpoint`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
    pub written_at_ms: u64,
}

impl Checkpoint {
    /// Whether `key` signed this checkpoint, its sequence number and time included.
    pub fn signed_by(&self, key: &VerifyingKey) -> bool {
        self.sig.as_deref().is_some_and(|sig| {
            signing::verify_checkpoint(key, self.seq, &self.hash, self.written_at_ms, sig)
        })
    }
}

/// What a read of the checkpoint stream found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CheckpointScan {
    /// The valid checkpoint with the highest sequence number.
    pub newest: Option<Checkpoint>,
    /// Messages read.
    pub read: u64,
    /// Messages ignored: from a publisher other than the audit writer's role, not a checkpoint,
    /// or (with a key) not signed by it.
    pub ignored: u64,
    /// Whether the stream was read to its end within the time allowed.
    pub complete: bool,
}

/// Messages a first look back from the stream's end reads; each further look reads twice as
/// many before the last.
const CHECKPOINT_WINDOW: u64 = 1024;

/// The newest valid checkpoint on the stream `queue`, within `wait` in all.
///
/// A message is a valid checkpoint only when the broker says the audit writer's role published
/// it (`user_id`, [`crate::roles::Kind::Checkpoint`]) and, with `key`, when its signature covers
/// its sequence number. Of the valid ones the highest sequence number wins, wherever it sits:
/// junk after it cannot hide it, and a replayed signature cannot claim a sequence number it was
/// not made for.
///
/// The read ends at the stream's end as the scan found it (the last chunk's highest offset), so
/// a busy stream is read to a fixed point. With `whole_stream` (when roles share one broker user,
/// anyone could replay an older checkpoint after the newest) every retained message is read;
/// otherwise only the writer publishes there, in order, and the scan looks back from the end
/// in doubling windows until one holds a valid checkpoint.
pub async fn newest_checkpoint(
    broker: &Broker,
    queue: &str,
    trust: &crate::roles::Trust,
    key: Option<&VerifyingKey>,
    whole_stream: bool,
    wait: Duration,
) -> Result<CheckpointScan, AuditError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut scan = CheckpointScan::default();
    let tag = || format!("verify-{}", Uuid::now_v7());
    // The end: the highest offset of the last chunk (delivered at once), the newest messages.
    let mut last = broker.consume_stream_last(queue, &tag(), 100).await?;
    let mut end: Option<u64> = None;
    let quiet = Duration::from_millis(300);
    for _ in 0..10_000 {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Ok(Some(d)) = tokio::time::timeout(quiet.min(left), last.next()).await else {
            break;
        };
        let d = d?;
        end = end.max(d.stream_offset());
        let _ = d.ack().await;
    }
    last.close().await;
    let Some(end) = end else {
        // An empty stream.
        scan.complete = true;
        return Ok(scan);
    };
    let (mut from, mut to) = if whole_stream {
        (0, end)
    } else {
        (end.saturating_sub(CHECKPOINT_WINDOW - 1), end)
    };
    loop {
        let mut consumer = broker
            .consume_stream_from_offset(queue, &tag(), from, 100)
            .await?;
        let mut first_seen: Option<u64> = None;
        let mut reached = false;
        while !reached {
            let Ok(next) = tokio::time::timeout_at(deadline, consumer.next()).await else {
                consumer.close().await;
                return Ok(scan);
            };
            let Some(d) = next else { break };
            let d = d?;
            let Some(offset) = d.stream_offset() else {
                let _ = d.ack().await;
                continue;
            };
            first_seen.get_or_insert(offset);
            reached = offset >= to;
            if offset <= to {
                scan.read += 1;
                consider(&mut scan, &d, trust, key);
            }
            let _ = d.ack().await;
        }
        consumer.close().await;
        // Done when a window holds a valid checkpoint, or the window began at or before the
        // stream's first retained message.
        let at_start = from == 0 || first_seen.is_some_and(|f| f > from);
        if scan.newest.is_some() || at_start {
            scan.complete = true;
            return Ok(scan);
        }
        let width = (to - from + 1).saturating_mul(2);
        to = from - 1;
        from = to.saturating_sub(width - 1);
    }
}

/// Count one message of the checkpoint stream, and keep it when it is the newest valid one.
/// Its signature is checked only when it would be the newest (a message with a sequence number
/// at or below the best so far cannot change the answer).
fn consider(
    scan: &mut CheckpointScan,
    d: &Delivery,
    trust: &crate::roles::Trust,
    key: Option<&VerifyingKey>,
) {
    let candidate = trust
        .admits(crate::roles::Kind::Checkpoint, d.user_id())
        .then(|| serde_json::from_slice::<Checkpoint>(d.data()).ok())
        .flatten();
    match candidate {
        Some(c) if scan.newest.as_ref().is_some_and(|n| c.seq <= n.seq) => {}
        Some(c) if key.is_none_or(|k| c.signed_by(k)) => scan.newest = Some(c),
        _ => scan.ignored += 1,
    }
}

/// Where the writer publishes its checkpoints.
pub(super) struct Checkpoints {
    pub(super) publisher: crate::broker::Publisher,
    /// The exchange bound to the checkpoint stream (the same name).
    pub(super) exchange: String,
}

impl Checkpoints {
    /// Publish the head under a confirm, bounded. A failure is counted and logged: the next
    /// entry's checkpoint covers this one.
    pub(super) async fn publish(&self, head: &Checkpoint, metrics: &AuditMetrics) {
        let bytes = serde_json::to_vec(head).expect("a checkpoint encodes");
        let confirmed = async {
            self.publisher
                .publish_raw(&self.exchange, "", &bytes)
                .await?
                .wait()
                .await
        };
        match tokio::time::timeout(Duration::from_secs(5), confirmed).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                metrics.checkpoint_failures.inc();
                tracing::warn!(error = %e, seq = head.seq, "audit checkpoint not published");
            }
            Err(_) => {
                metrics.checkpoint_failures.inc();
                tracing::warn!(seq = head.seq, "audit checkpoint not confirmed within 5 s");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;

    use super::*;
    use crate::audit::tests::{dir, event};
    use crate::audit::{AuditStore, Verification, verify_with_checkpoint};
    use crate::policy::Action;

    #[test]
    fn a_checkpoint_signature_holds_for_its_own_sequence_number_only() {
        let root = dir();
        let key = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
        let public = key.verifying_key();
        let mut store = AuditStore::open_with(&root, Some(key)).unwrap();
        let (env, ev) = event(Action::Warn);
        store.store(&env, &ev).unwrap();
        let head = store.head();
        assert!(head.signed_by(&public));
        // Replayed with a sequence number far ahead, as if the log had lost its tail.
        let replayed = Checkpoint {
            seq: u64::MAX,
            ..head.clone()
        };
        assert!(!replayed.signed_by(&public));
        assert!(
            !Checkpoint {
                sig: None,
                ..head.clone()
            }
            .signed_by(&public)
        );
        // Verified with the key, a forged checkpoint is named as such.
        drop(store);
        assert!(matches!(
            verify_with_checkpoint(&root, Some(&public), &replayed).unwrap(),
            Verification::Broken { ref problem, .. } if problem.contains("not signed")
        ));
        assert_eq!(
            verify_with_checkpoint(&root, Some(&public), &head).unwrap(),
            Verification::Intact { entries: 1 }
        );
        let _ = std::fs::remove_dir_all(&root);
    }
}
