//! The durable, tamper-evident audit trail of enforced actions.
//!
//! Layout under `VIGIL_EVIDENCE_DIR`:
//! - `audit.log`: one JSON entry per line, `{"seq","prev","hash","sig","record"}`, where `hash`
//!   is the SHA-256 of `seq`, `prev` (the hash of the entry before, zeros for the first) and the
//!   exact bytes of `record`, and `sig` the Ed25519 signature of `hash` with the key at
//!   `VIGIL_AUDIT_KEY` ([`signing`]). Editing any byte of an entry breaks its hash or the next
//!   entry's link; re-hashing the log without the key breaks the signatures.
//! - `evidence/<YYYY-MM-DD>/<client>/<evidence id>/`: the triggering frames as JPEG files named
//!   by frame id, whose SHA-256 the record holds, and `record.json`.
//! - `audit.lock`: held (an exclusive file lock) by the one writer.
//!
//! Most entries record an action ([`AuditRecord`]). The others are [`Note`]s: an
//! administrator's operation on a client (with the operator), and a prune, which lists the
//! evidence files it removed so that `verify` accepts them missing while their entries keep
//! their hashes.
//!
//! The writer consumes the durable audit queue. Writes are idempotent by `action_id`: an action
//! already in the log is acked without writing. A delivery is acked only after its evidence,
//! record and log entry are on disk (fsync).
//!
//! Its modules: `log` holds the record and entry types, the hash chain and the store (the one
//! writer's append, evidence files and lock); `verify` reads the log back (verify, adopt, the
//! readers of records and notes); `prune` removes old evidence; `checkpoints` publishes and
//! reads the checkpoint stream; `writer` is the service that consumes the audit queue; `view`
//! builds the console's audit views from the log, which `api` serves (the writer's read API,
//! the only way the trail leaves this folder for the console).

use std::path::Path;

pub mod follow;
pub mod signing;
pub mod view;

pub mod api;
mod checkpoints;
mod log;
mod prune;
mod verify;
mod writer;

pub use checkpoints::{Checkpoint, CheckpointScan, newest_checkpoint};
pub use log::{AuditRecord, AuditStore, FrameRecord, Note, is_evidence_frame, is_evidence_path};
pub use prune::{PruneReport, prune};
pub use verify::{adopt, notes, records, trail, unsigned_entries, verify, verify_with_checkpoint};
// The edge's session tests check its end reasons against these.
#[cfg(test)]
pub(crate) use writer::SESSION_END_REASONS;
pub use writer::{AuditHandle, run, start};

use crate::broker::BrokerError;
use crate::topology;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit storage {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("audit log {path} is damaged at line {line}: {problem}")]
    Damaged {
        path: String,
        line: usize,
        problem: String,
    },
    #[error("audit key {0}")]
    Key(String),
    #[error("webhooks: {0}")]
    Webhooks(String),
    #[error("audit read API: {0}")]
    Api(String),
    #[error("the audit writer's task panicked: {0}")]
    Panicked(String),
    #[error(
        "another audit writer holds {path}: one writer per evidence folder (stop the other, or \
         give this one its own VIGIL_EVIDENCE_DIR)"
    )]
    Locked { path: String },
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Topology(#[from] topology::TopologyError),
    #[error(transparent)]
    Management(#[from] crate::management::ManagementError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// `YYYY-MM-DD` (UTC) of a Unix time in ms.
pub fn utc_date(ms: u64) -> String {
    // Howard Hinnant's civil-from-days.
    let z = (ms / 86_400_000) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The outcome of `verify`.
#[derive(Debug, Clone, PartialEq)]
pub enum Verification {
    Intact {
        entries: u64,
    },
    /// The first entry that does not hold, 1-based, with the action it names when readable.
    Broken {
        line: usize,
        action_id: Option<String>,
        problem: String,
    },
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::PathBuf;

    use uuid::Uuid;

    use super::*;
    use crate::policy::Action;
    use crate::wire::{ActionEvent, Analysis, Envelope, EvidenceFrame, Payload, SCHEMA};

    pub(crate) fn event(action: Action) -> (Envelope, ActionEvent) {
        let ev = ActionEvent {
            action_id: Uuid::now_v7(),
            evidence_id: Uuid::now_v7(),
            action,
            reason: "wrong_person".into(),
            origin: "policy".into(),
            session: 7,
            decided_at_ms: 1_763_777_000_000,
            rule: "5 of the last 8 frames".into(),
            evidence: vec![EvidenceFrame {
                seq: 3,
                frame_id: Uuid::now_v7(),
                received_at_ms: 1_763_776_999_000,
                jpeg: bytes::Bytes::from_static(&[0xFF, 0xD8, 0xFF, 0xD9]),
                analysis: Analysis::FrameInfo {
                    width: 1,
                    height: 1,
                    components: 3,
                },
            }],
            operator: None,
            challenge: None,
        };
        let env = Envelope {
            schema: SCHEMA,
            id: ev.action_id,
            source: "edge-1".into(),
            seq: 1,
            client_id: "alice".into(),
            produced_at_ms: 0,
            deadline_ms: 0,
            traceparent: String::new(),
            payload: Payload::Action(ev.clone()),
        };
        (env, ev)
    }

    pub(crate) fn dir() -> PathBuf {
        std::env::temp_dir().join(format!("vigil-audit-{:08x}", rand::random::<u32>()))
    }

    #[test]
    fn dates_are_utc_days() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(1_763_777_000_000), "2025-11-22");
        assert_eq!(utc_date(951_782_400_000), "2000-02-29");
    }
}
