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

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::Registry;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub mod follow;
pub mod signing;

use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::broker::{Broker, BrokerError, Delivery};
use crate::config::Config;
use crate::directory::write_atomic;
use crate::metrics::{AuditMetrics, BrokerMetrics};
use crate::policy::Action;
use crate::telemetry::{self, Health};
use crate::topology::{self, Topology};
use crate::wire::{ActionEvent, Analysis, Envelope, Payload};

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

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

/// What the log keeps about one action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub action_id: Uuid,
    pub evidence_id: Uuid,
    pub action: Action,
    pub reason: String,
    pub origin: String,
    pub client_id: String,
    pub edge: String,
    pub session: String,
    pub rule: String,
    pub decided_at_ms: u64,
    pub written_at_ms: u64,
    /// Each evidence frame's verdict and scores.
    pub frames: Vec<FrameRecord>,
    /// Model versions and thresholds behind the verdicts.
    pub models: Vec<String>,
    pub thresholds: std::collections::BTreeMap<String, f32>,
    /// Evidence files, relative to the evidence folder's root.
    pub evidence_files: Vec<String>,
    /// The SHA-256 (hex) of each evidence file, in the same order; `verify` checks the files.
    #[serde(default)]
    pub evidence_sha256: Vec<String>,
    /// For an action forced by an administrator: who.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    /// For a liveness challenge's entry: which, and how it went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub challenge: Option<crate::wire::ChallengeNote>,
    /// Evidence frames whose JPEGs were not kept: the client was over its daily evidence
    /// budget (`VIGIL_AUDIT_EVIDENCE_MB_PER_CLIENT_DAY`). Their verdicts are in `frames`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub evidence_withheld: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// An entry that is not an action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Note {
    /// An administrator's operation on a client.
    Admin {
        entry_id: Uuid,
        /// Who did it: the operator's name (admin API token, or the CLI's user).
        operator: String,
        /// `add`, `pause`, `resume`, `block`, `unblock`, `kick`, `remove`, `enroll`, or
        /// `force:<action>`.
        operation: String,
        client_id: String,
        /// The node that carried it out (an edge, or `cli`).
        source: String,
        /// What it changed or read (see [`crate::wire::AdminOpEvent::detail`]).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        detail: String,
        at_ms: u64,
        written_at_ms: u64,
    },
    /// A candidate's session started or ended on an edge.
    Session {
        entry_id: Uuid,
        client_id: String,
        /// The edge that held it.
        source: String,
        /// The edge's session number, hex.
        session: String,
        /// `started` or `ended`.
        event: String,
        /// For an end, why (`closed`, `replaced`, `blocked`, `signed_out`, ...).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
        /// The candidate's address, as the edge saw it.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        address: String,
        at_ms: u64,
        written_at_ms: u64,
    },
    /// Signing was turned on for a log whose entries so far were unsigned. This entry is the
    /// first signed one: it vouches, under the key, for the unsigned head before it. `verify`
    /// with the key accepts those entries only through it, and says that the key proves nothing
    /// about them beyond their hash chain.
    Signing {
        entry_id: Uuid,
        /// How many unsigned entries come before this one.
        unsigned_entries: u64,
        /// The hash of the last of them.
        unsigned_head: String,
        /// The fingerprint of the key that signs from here on ([`signing::fingerprint`]).
        key: String,
        written_at_ms: u64,
    },
    /// A signing writer started on a log that falls short of, or differs from, its newest
    /// signed checkpoint: entries were lost. The note keeps that in the log for good, so
    /// that entries appended after it cannot hide it; `verify` reports it.
    Gap {
        entry_id: Uuid,
        /// The log's entries when the writer found it.
        entries: u64,
        /// The checkpoint it fell short of.
        checkpoint_seq: u64,
        checkpoint_hash: String,
        problem: String,
        written_at_ms: u64,
    },
    /// Evidence files removed by `vigil audit prune` (their entries keep their hashes).
    Prune {
        entry_id: Uuid,
        /// Evidence of actions decided before this Unix time (ms) was removed.
        before_ms: u64,
        files: Vec<String>,
        written_at_ms: u64,
    },
}

impl Note {
    fn id(&self) -> Uuid {
        match self {
            Note::Admin { entry_id, .. }
            | Note::Session { entry_id, .. }
            | Note::Signing { entry_id, .. }
            | Note::Gap { entry_id, .. }
            | Note::Prune { entry_id, .. } => *entry_id,
        }
    }
}

/// What `prune` did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PruneReport {
    pub before_ms: u64,
    pub actions: usize,
    pub files: usize,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrameRecord {
    pub seq: u64,
    pub frame_id: Uuid,
    pub received_at_ms: u64,
    pub analysis: Analysis,
}

/// One line of the log.
#[derive(Serialize)]
struct EntryOut<'a> {
    seq: u64,
    prev: &'a str,
    hash: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    sig: Option<&'a str>,
    record: &'a serde_json::value::RawValue,
}

#[derive(Deserialize)]
struct EntryIn<'a> {
    seq: u64,
    prev: String,
    hash: String,
    #[serde(default)]
    sig: Option<String>,
    #[serde(borrow)]
    record: &'a serde_json::value::RawValue,
}

fn entry_hash(seq: u64, prev: &str, record: &str) -> String {
    let mut h = Sha256::new();
    h.update(seq.to_string().as_bytes());
    h.update(b"\n");
    h.update(prev.as_bytes());
    h.update(b"\n");
    h.update(record.as_bytes());
    hex::encode(h.finalize())
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

/// The append-only, hash-chained audit log and the evidence folder beside it.
pub struct AuditStore {
    root: PathBuf,
    log_path: PathBuf,
    log: File,
    /// Held for the store's life: a second writer on the folder cannot open it.
    _lock: File,
    signer: Option<SigningKey>,
    last_hash: String,
    next_seq: u64,
    /// Every entry's id, with its place and hash in the chain.
    ids: HashMap<Uuid, (u64, String)>,
    /// Evidence bytes one client may fill per UTC day ([`AuditStore::limit_evidence`]).
    evidence_budget: Option<u64>,
    /// Evidence bytes kept per (day, client folder), read from the folder at first use.
    evidence_spent: HashMap<(String, String), u64>,
    /// Frames withheld over the budget (`vigil_audit_evidence_withheld_total`).
    withheld_frames: Option<prometheus::IntCounter>,
    /// The SHA-256 of the message behind each entry written since the store opened, so that a
    /// second message with an entry's id is known for the same message or another.
    fingerprints: Fingerprints,
}

/// The most message fingerprints kept; the oldest go first.
const MAX_FINGERPRINTS: usize = 65_536;

#[derive(Default)]
struct Fingerprints {
    by_id: HashMap<Uuid, [u8; 32]>,
    order: std::collections::VecDeque<Uuid>,
}

impl Fingerprints {
    fn remember(&mut self, id: Uuid, fingerprint: [u8; 32]) {
        if self.by_id.insert(id, fingerprint).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > MAX_FINGERPRINTS {
            if let Some(old) = self.order.pop_front() {
                self.by_id.remove(&old);
            }
        }
    }
}

/// Files the writer creates are its owner's only (0600), like the folder they are in.
fn private(options: &mut OpenOptions) -> &mut OpenOptions {
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(options, 0o600);
    options
}

impl AuditStore {
    /// Open (or create) an unsigned store at `root`. The existing log must verify.
    pub fn open(root: &Path) -> Result<Self, AuditError> {
        Self::open_with(root, None)
    }

    /// Open (or create) the store at `root`, signing new entries with `signer`. The existing log
    /// must verify, its signatures included when there is a key: a log rewritten without the
    /// key is refused, not extended.
    pub fn open_with(root: &Path, signer: Option<SigningKey>) -> Result<Self, AuditError> {
        crate::directory::private_dir(&root.join("evidence")).map_err(io(root))?;
        let lock_path = root.join("audit.lock");
        let lock = private(OpenOptions::new().create(true).truncate(false).write(true))
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(AuditError::Locked {
                    path: lock_path.display().to_string(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
        }
        let log_path = root.join("audit.log");
        Self::drop_torn_tail(&log_path)?;
        let public = signer.as_ref().map(SigningKey::verifying_key);
        let scan = Self::scan(&log_path, public.as_ref())?;
        // A key for a log that was never signed: an operator vouches for its head first
        // (`vigil audit adopt`), never the writer by itself, which cannot tell an old unsigned
        // log from a signed one stripped of its signatures.
        if public.is_some()
            && matches!(scan, Scan::Broken(_))
            && let Scan::Ok {
                entries,
                any_signed: false,
                last_hash,
                ..
            } = Self::scan(&log_path, None)?
            && entries > 0
        {
            return Err(AuditError::Key(format!(
                "is set, but the log's {entries} entries are not signed. Check them (`vigil audit \
                 verify --offline`), then vouch for their head with `vigil audit adopt --head \
                 {last_hash}`, which signs from there on"
            )));
        }
        let (entries, last_hash, ids) = match scan {
            Scan::Ok {
                signed: true,
                entries,
                ..
            } if public.is_none() => {
                return Err(AuditError::Key(format!(
                    "is needed: the log's {entries} entries are signed, and an unsigned entry \
                     would break it (set VIGIL_AUDIT_KEY)"
                )));
            }
            Scan::Ok {
                entries,
                last_hash,
                ids,
                ..
            } => (entries, last_hash, ids),
            Scan::Broken(Verification::Broken { line, problem, .. }) => {
                return Err(AuditError::Damaged {
                    path: log_path.display().to_string(),
                    line,
                    problem,
                });
            }
            Scan::Broken(Verification::Intact { .. }) => unreachable!("scan reports breaks only"),
        };
        let log = private(OpenOptions::new().create(true).append(true))
            .open(&log_path)
            .map_err(io(&log_path))?;
        Ok(Self {
            root: root.to_owned(),
            log_path,
            log,
            _lock: lock,
            signer,
            last_hash,
            next_seq: entries + 1,
            ids,
            evidence_budget: None,
            evidence_spent: HashMap::new(),
            withheld_frames: None,
            fingerprints: Fingerprints::default(),
        })
    }

    /// Keep at most `bytes` of evidence frames per client and UTC day: past it, an action's
    /// entry still records every frame's verdict and scores, but its JPEGs are withheld (and
    /// counted in the record), so that one candidate cannot fill the disk.
    pub fn limit_evidence(&mut self, bytes: Option<u64>, withheld: Option<prometheus::IntCounter>) {
        self.evidence_budget = bytes;
        self.withheld_frames = withheld;
    }

    /// Evidence bytes already kept for `client_dir` (under `evidence/<day>/`) on `day`.
    fn evidence_spent(&mut self, day: &str, client_dir: &str) -> &mut u64 {
        let key = (day.to_owned(), client_dir.to_owned());
        let root = self.root.clone();
        self.evidence_spent.entry(key).or_insert_with(|| {
            let dir = root.join("evidence").join(day).join(client_dir);
            let mut total = 0;
            for action in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                for file in std::fs::read_dir(action.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    if file.file_name().to_string_lossy().ends_with(".jpg") {
                        total += file.metadata().map_or(0, |m| m.len());
                    }
                }
            }
            total
        })
    }

    /// A crash during an append can leave a last line without its newline. That entry was never
    /// acked (the broker will redeliver its action), so it is cut off.
    fn drop_torn_tail(path: &Path) -> Result<(), AuditError> {
        let Ok(bytes) = std::fs::read(path) else {
            return Ok(());
        };
        if bytes.is_empty() || bytes.ends_with(b"\n") {
            return Ok(());
        }
        let keep = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        tracing::warn!(path = %path.display(), dropped_bytes = bytes.len() - keep, "cutting a torn last entry off the audit log");
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io(path))?;
        f.set_len(keep as u64)
            .and_then(|_| f.sync_all())
            .map_err(io(path))
    }

    /// The newest entry's sequence number, hash and signature.
    pub fn head(&self) -> Checkpoint {
        let (seq, written_at_ms) = (self.len(), crate::wire::now_ms());
        Checkpoint {
            seq,
            hash: self.last_hash.clone(),
            sig: self
                .signer
                .as_ref()
                .map(|k| signing::sign_checkpoint(k, seq, &self.last_hash, written_at_ms)),
            written_at_ms,
        }
    }

    pub fn contains(&self, action_id: &Uuid) -> bool {
        self.ids.contains_key(action_id)
    }

    pub fn len(&self) -> u64 {
        self.next_seq - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Store one action: evidence files and record (each fsynced), then the log entry (fsynced).
    /// Returns false when the action was already in the log.
    pub fn store(&mut self, env: &Envelope, event: &ActionEvent) -> Result<bool, AuditError> {
        if self.contains(&event.action_id) {
            return Ok(false);
        }
        // Named by the action's id, which the writer checks for duplicates above, never by the
        // publisher's `evidence_id`: another action's files are out of reach of a publisher
        // that reuses it.
        let rel = PathBuf::from("evidence")
            .join(utc_date(event.decided_at_ms))
            .join(safe(&env.client_id))
            .join(event.action_id.to_string());
        let dir = self.root.join(&rel);
        crate::directory::private_dir(&dir).map_err(io(&dir))?;
        // New folders are durable only once their parents say so.
        for folder in rel.ancestors().filter(|p| !p.as_os_str().is_empty()) {
            let path = self.root.join(folder);
            File::open(&path)
                .and_then(|d| d.sync_all())
                .map_err(io(&path))?;
        }
        let mut files = Vec::new();
        let mut hashes = Vec::new();
        let mut withheld = 0u32;
        let day = utc_date(event.decided_at_ms);
        let client_dir = safe(&env.client_id);
        for frame in &event.evidence {
            if let Some(budget) = self.evidence_budget {
                let spent = self.evidence_spent(&day, &client_dir);
                if *spent + frame.jpeg.len() as u64 > budget {
                    withheld += 1;
                    continue;
                }
                *spent += frame.jpeg.len() as u64;
            }
            // Named by frame id: a client's own seq can repeat, a frame id cannot.
            let name = format!("frame-{}.jpg", frame.frame_id);
            write_atomic(&dir.join(&name), &frame.jpeg).map_err(io(&dir))?;
            files.push(rel.join(name).display().to_string());
            hashes.push(hex::encode(Sha256::digest(&frame.jpeg)));
        }
        let (models, thresholds) = event
            .evidence
            .iter()
            .find_map(|f| match &f.analysis {
                Analysis::Identity(a) => Some((a.models.clone(), a.thresholds.clone())),
                _ => None,
            })
            .unwrap_or_default();
        let record = AuditRecord {
            action_id: event.action_id,
            evidence_id: event.evidence_id,
            action: event.action,
            reason: event.reason.clone(),
            origin: event.origin.clone(),
            client_id: env.client_id.clone(),
            edge: env.source.clone(),
            session: format!("{:016x}", event.session),
            rule: event.rule.clone(),
            decided_at_ms: event.decided_at_ms,
            written_at_ms: crate::wire::now_ms(),
            frames: event
                .evidence
                .iter()
                .map(|f| FrameRecord {
                    seq: f.seq,
                    frame_id: f.frame_id,
                    received_at_ms: f.received_at_ms,
                    analysis: f.analysis.clone(),
                })
                .collect(),
            models,
            thresholds,
            evidence_files: files,
            evidence_sha256: hashes,
            operator: event.operator.clone(),
            challenge: event.challenge.clone(),
            evidence_withheld: withheld,
        };
        if withheld > 0 {
            if let Some(counter) = &self.withheld_frames {
                counter.inc_by(u64::from(withheld));
            }
            tracing::warn!(client = %env.client_id.escape_debug(), withheld, "evidence over the client's daily budget: frames withheld");
        }
        let record_json = serde_json::to_string(&record).expect("audit record encodes");
        let pretty = serde_json::to_vec_pretty(&record).expect("audit record encodes");
        write_atomic(&dir.join("record.json"), &pretty).map_err(io(&dir))?;
        let entry = self.append(&record_json)?;
        self.ids.insert(event.action_id, entry);
        Ok(true)
    }

    /// Append a note (an admin operation, a prune). Returns false when its id is logged already.
    pub fn note(&mut self, note: &Note) -> Result<bool, AuditError> {
        if self.contains(&note.id()) {
            return Ok(false);
        }
        let json = serde_json::to_string(note).expect("audit note encodes");
        let entry = self.append(&json)?;
        self.ids.insert(note.id(), entry);
        Ok(true)
    }

    /// Remove the evidence files of actions decided before `before_ms`. A prune entry listing
    /// them goes into the log first (fsynced), then the files go: a crash in between leaves
    /// files that still match their hashes, and `verify` accepts listed files missing.
    pub fn prune(&mut self, before_ms: u64) -> Result<PruneReport, AuditError> {
        let pruned = pruned_files(&self.log_path)?;
        let mut actions = 0;
        let mut files = Vec::new();
        let mut bytes = 0;
        for record in read_records::<AuditRecord>(&self.log_path)? {
            if record.decided_at_ms >= before_ms {
                continue;
            }
            let before = files.len();
            for file in &record.evidence_files {
                if pruned.contains(file) || !inside_evidence(file) {
                    continue;
                }
                if let Ok(meta) = std::fs::metadata(self.root.join(file)) {
                    bytes += meta.len();
                    files.push(file.clone());
                }
            }
            actions += usize::from(files.len() > before);
        }
        let report = PruneReport {
            before_ms,
            actions,
            files: files.len(),
            bytes,
        };
        if files.is_empty() {
            return Ok(report);
        }
        self.note(&Note::Prune {
            entry_id: Uuid::now_v7(),
            before_ms,
            files: files.clone(),
            written_at_ms: crate::wire::now_ms(),
        })?;
        for file in &files {
            let path = self.root.join(file);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&path)(e)),
            }
        }
        Ok(report)
    }

    /// Where the entry `id` sits in the log, if it is there.
    /// Whether the entry `id` came from a message with this `fingerprint` (its SHA-256):
    /// `None` when the entry was written before the store opened, or long ago.
    fn same_message(&self, id: &Uuid, fingerprint: &[u8; 32]) -> Option<bool> {
        self.fingerprints.by_id.get(id).map(|f| f == fingerprint)
    }

    pub fn entry(&self, id: &Uuid) -> Option<crate::webhooks::EntryRef> {
        self.ids
            .get(id)
            .map(|(seq, hash)| crate::webhooks::EntryRef {
                id: *id,
                seq: *seq,
                hash: hash.clone(),
            })
    }

    /// Append one entry, durably; its place and hash.
    fn append(&mut self, record_json: &str) -> Result<(u64, String), AuditError> {
        let seq = self.next_seq;
        let hash = entry_hash(seq, &self.last_hash, record_json);
        let sig = self.signer.as_ref().map(|k| signing::sign(k, &hash));
        let raw = serde_json::value::RawValue::from_string(record_json.to_owned())
            .expect("record is valid json");
        let mut line = serde_json::to_string(&EntryOut {
            seq,
            prev: &self.last_hash,
            hash: &hash,
            sig: sig.as_deref(),
            record: &raw,
        })
        .expect("entry encodes");
        line.push('\n');
        self.log
            .write_all(line.as_bytes())
            .and_then(|_| self.log.sync_data())
            .map_err(io(&self.log_path))?;
        self.last_hash = hash.clone();
        self.next_seq += 1;
        Ok((seq, hash))
    }

    fn scan(path: &Path, public: Option<&VerifyingKey>) -> Result<Scan, AuditError> {
        let mut chain = Chain::default();
        let mut ids = HashMap::new();
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(chain.ok(ids)),
            Err(e) => return Err(io(path)(e)),
        };
        for line in BufReader::new(file).split(b'\n') {
            let line = line.map_err(io(path))?;
            match chain.check(&line, public) {
                Ok(entry) => {
                    ids.insert(entry.id, (entry.seq, entry.hash));
                }
                Err(broken) => return Ok(Scan::Broken(broken)),
            }
        }
        if let Some(broken) = chain.unfinished() {
            return Ok(Scan::Broken(broken));
        }
        Ok(chain.ok(ids))
    }
}

/// The hash chain as far as it was checked: what the next entry must link to, and, with a
/// key, where signing began.
#[derive(Debug, Clone)]
struct Chain {
    prev: String,
    entries: u64,
    /// Whether the last entry is signed, and whether any is.
    signed: bool,
    any_signed: bool,
    /// With a key: the first signed entry's line, and the first unsigned one's.
    signed_from: Option<u64>,
    first_unsigned: Option<(usize, Option<String>)>,
}

impl Default for Chain {
    fn default() -> Self {
        Self {
            prev: GENESIS.to_owned(),
            entries: 0,
            signed: false,
            any_signed: false,
            signed_from: None,
            first_unsigned: None,
        }
    }
}

/// One entry that holds, as [`Chain::check`] read it.
struct Checked {
    id: Uuid,
    seq: u64,
    hash: String,
    /// Its record, as written.
    record: String,
}

impl Chain {
    /// Check the next line of the log: its sequence number, link and hash, and with `public`
    /// its signature (unsigned entries may only open the log, before the signed entry that
    /// vouches for them).
    fn check(
        &mut self,
        line: &[u8],
        public: Option<&VerifyingKey>,
    ) -> Result<Checked, Verification> {
        let lineno = self.entries as usize + 1;
        let broken = |action_id: Option<String>, problem: String| Verification::Broken {
            line: lineno,
            action_id,
            problem,
        };
        let Ok(text) = std::str::from_utf8(line) else {
            return Err(broken(None, "not UTF-8".into()));
        };
        let entry: EntryIn = match serde_json::from_str(text) {
            Ok(e) => e,
            Err(e) => return Err(broken(None, format!("not a log entry: {e}"))),
        };
        let action_id = serde_json::from_str::<AuditRecord>(entry.record.get())
            .ok()
            .map(|r| r.action_id)
            .or_else(|| {
                serde_json::from_str::<Note>(entry.record.get())
                    .ok()
                    .map(|n| n.id())
            });
        // Name the action even when tampering broke the rest of the record (read only when
        // something is wrong).
        let id_text = || {
            serde_json::from_str::<serde_json::Value>(entry.record.get())
                .ok()
                .and_then(|v| v.get("action_id")?.as_str().map(str::to_owned))
        };
        if entry.seq != lineno as u64 {
            return Err(broken(
                id_text(),
                format!("sequence {} where {lineno} belongs", entry.seq),
            ));
        }
        if entry.prev != self.prev {
            return Err(broken(
                id_text(),
                "does not link to the entry before it".into(),
            ));
        }
        if entry_hash(entry.seq, &entry.prev, entry.record.get()) != entry.hash {
            return Err(broken(
                id_text(),
                "its content does not match its hash".into(),
            ));
        }
        if let Some(key) = public {
            match &entry.sig {
                // Unsigned entries may only open the log, before the entry that turned
                // signing on; [`Chain::unfinished`] checks that one came.
                None if self.signed_from.is_none() => {
                    self.first_unsigned
                        .get_or_insert_with(|| (lineno, id_text()));
                }
                None => return Err(broken(id_text(), "it is not signed".into())),
                Some(sig) if !signing::verify(key, &entry.hash, sig) => {
                    return Err(broken(
                        id_text(),
                        "its signature does not hold: the log was rewritten without the key, \
                         or signed with another"
                            .into(),
                    ));
                }
                Some(_) if self.signed_from.is_none() => {
                    let unsigned = self.entries;
                    if unsigned > 0 {
                        let vouches = matches!(
                            serde_json::from_str::<Note>(entry.record.get()),
                            Ok(Note::Signing { unsigned_entries, unsigned_head, .. })
                                if unsigned_entries == unsigned && unsigned_head == self.prev
                        );
                        if !vouches {
                            return Err(broken(
                                id_text(),
                                format!(
                                    "the first signed entry follows {unsigned} unsigned ones \
                                     without vouching for them (a signing entry)"
                                ),
                            ));
                        }
                    }
                    self.signed_from = Some(lineno as u64);
                }
                Some(_) => {}
            }
        }
        let Some(id) = action_id else {
            return Err(broken(None, "its record is not an audit record".into()));
        };
        self.signed = entry.sig.is_some();
        self.any_signed |= self.signed;
        self.prev = entry.hash.clone();
        self.entries += 1;
        Ok(Checked {
            id,
            seq: entry.seq,
            hash: entry.hash,
            record: entry.record.get().to_owned(),
        })
    }

    /// With a key, unsigned entries that no signed entry vouched for.
    fn unfinished(&self) -> Option<Verification> {
        match (&self.signed_from, &self.first_unsigned) {
            (None, Some((line, action_id))) => Some(Verification::Broken {
                line: *line,
                action_id: action_id.clone(),
                problem: "it is not signed".into(),
            }),
            _ => None,
        }
    }

    fn ok(&self, ids: HashMap<Uuid, (u64, String)>) -> Scan {
        Scan::Ok {
            entries: self.entries,
            last_hash: self.prev.clone(),
            ids,
            signed: self.signed,
            any_signed: self.any_signed,
            signed_from: self.signed_from,
        }
    }
}

enum Scan {
    Ok {
        entries: u64,
        last_hash: String,
        ids: HashMap<Uuid, (u64, String)>,
        /// Whether the last entry is signed.
        signed: bool,
        /// Whether any entry is.
        any_signed: bool,
        /// With a key: the first signed entry (the rest of the log is signed from it on).
        signed_from: Option<u64>,
    },
    Broken(Verification),
}

/// Client ids are checked on the way in, but never trust a path component.
fn safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect::<String>()
        .trim_start_matches('.')
        .to_owned()
}

/// Check the whole chain of the log at `root`: every hash and link; with `public`, every
/// entry's signature; and every evidence file against the SHA-256 its entry holds.
pub fn verify(root: &Path, public: Option<&VerifyingKey>) -> Result<Verification, AuditError> {
    let path = root.join("audit.log");
    let entries = match AuditStore::scan(&path, public)? {
        Scan::Ok { entries, .. } => entries,
        Scan::Broken(v) => return Ok(v),
    };
    let Ok(file) = File::open(&path) else {
        return Ok(Verification::Intact { entries });
    };
    let pruned = pruned_files(&path)?;
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io(&path))?;
        let Ok(entry) = serde_json::from_str::<EntryIn>(&line) else {
            continue;
        };
        if let Some(broken) = entry_problem(root, i + 1, entry.record.get(), &pruned)? {
            return Ok(broken);
        }
    }
    Ok(Verification::Intact { entries })
}

/// What an entry whose chain holds may still say is wrong: a gap the writer recorded, or an
/// evidence file that is missing (and not pruned), altered, or named outside the evidence
/// folder.
fn entry_problem(
    root: &Path,
    line: usize,
    record: &str,
    pruned: &HashSet<String>,
) -> Result<Option<Verification>, AuditError> {
    if let Ok(Note::Gap {
        entries,
        checkpoint_seq,
        problem,
        ..
    }) = serde_json::from_str::<Note>(record)
    {
        return Ok(Some(Verification::Broken {
            line,
            action_id: None,
            problem: format!(
                "entries were lost: the writer found {entries} entries here, short of (or \
                 differing from) its signed checkpoint of entry {checkpoint_seq} ({problem})"
            ),
        }));
    }
    let Ok(record) = serde_json::from_str::<AuditRecord>(record) else {
        return Ok(None);
    };
    let broken = |problem: String| {
        Ok(Some(Verification::Broken {
            line,
            action_id: Some(record.action_id.to_string()),
            problem,
        }))
    };
    for (n, file) in record.evidence_files.iter().enumerate() {
        let Some(want) = record.evidence_sha256.get(n) else {
            continue;
        };
        // The log names the files, so a rewritten log could point anywhere (`/dev/zero`,
        // `../../etc/shadow`): only paths inside the evidence folder are read.
        if !inside_evidence(file) {
            return broken(format!("evidence path {file} leaves the evidence folder"));
        }
        match std::fs::read(root.join(file)) {
            Ok(bytes) if hex::encode(Sha256::digest(&bytes)) == *want => {}
            Ok(_) => return broken(format!("evidence file {file} does not match its SHA-256")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !pruned.contains(file) {
                    return broken(format!("evidence file {file} is missing"));
                }
            }
            Err(e) => return Err(io(&root.join(file))(e)),
        }
    }
    Ok(None)
}

/// Whether a path the log names stays inside the evidence folder.
fn inside_evidence(file: &str) -> bool {
    Path::new(file).starts_with("evidence")
        && Path::new(file)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}

/// Every record of type `T` in the log at `path` (entries of other kinds are skipped).
fn read_records<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>, AuditError> {
    let Ok(file) = File::open(path) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line.map_err(io(path))?;
        if let Ok(entry) = serde_json::from_str::<EntryIn>(&line)
            && let Ok(r) = serde_json::from_str::<T>(entry.record.get())
        {
            out.push(r);
        }
    }
    Ok(out)
}

/// The evidence files the log's prune entries say were removed.
fn pruned_files(path: &Path) -> Result<HashSet<String>, AuditError> {
    Ok(read_records::<Note>(path)?
        .into_iter()
        .flat_map(|n| match n {
            Note::Prune { files, .. } => files,
            Note::Admin { .. } | Note::Session { .. } | Note::Signing { .. } | Note::Gap { .. } => {
                Vec::new()
            }
        })
        .collect())
}

/// How many entries open the log unsigned, before the signed entry that vouched for them
/// ([`adopt`]), as a scan under `key` finds them (0 when every entry is signed).
pub fn unsigned_entries(root: &Path, key: &VerifyingKey) -> Result<u64, AuditError> {
    Ok(
        match AuditStore::scan(&root.join("audit.log"), Some(key))? {
            Scan::Ok { signed_from, .. } => signed_from.map_or(0, |first| first - 1),
            Scan::Broken(_) => 0,
        },
    )
}

/// Start signing a log whose entries so far are unsigned: an operator who has checked them
/// vouches for their head (`expected_head`, the last entry's hash), and the first signed entry
/// ([`Note::Signing`]) says so. Refused for a log with any signed entry, for an empty one, and
/// when the head is not the one the operator checked. Returns the number of entries vouched for.
pub fn adopt(root: &Path, signer: SigningKey, expected_head: &str) -> Result<u64, AuditError> {
    let mut store = AuditStore::open_with(root, None)?;
    if let Scan::Ok {
        any_signed: true, ..
    } = AuditStore::scan(&store.log_path, None)?
    {
        return Err(AuditError::Key(
            "adopts only a log with no signed entry: this one has some (were signatures \
             removed?)"
                .into(),
        ));
    }
    let entries = store.len();
    if entries == 0 {
        return Err(AuditError::Key(
            "adopts a log with entries: an empty one is signed from its first entry".into(),
        ));
    }
    if store.last_hash != expected_head {
        return Err(AuditError::Key(format!(
            "the log's head (entry {entries}) is {}, not {expected_head}: it changed since it \
             was checked",
            store.last_hash
        )));
    }
    let key = signer.verifying_key();
    store.signer = Some(signer);
    store.note(&Note::Signing {
        entry_id: Uuid::now_v7(),
        unsigned_entries: entries,
        unsigned_head: store.last_hash.clone(),
        key: signing::fingerprint(&key),
        written_at_ms: crate::wire::now_ms(),
    })?;
    Ok(entries)
}

/// Every action record and every note in the log at `root`, oldest first, without verifying
/// it (a reader beside a running writer: a torn last line is skipped).
pub fn trail(root: &Path) -> Result<(Vec<AuditRecord>, Vec<Note>), AuditError> {
    let path = root.join("audit.log");
    Ok((read_records(&path)?, read_records(&path)?))
}

/// Whether an evidence path a record names may be read: inside the evidence folder.
pub fn is_evidence_path(file: &str) -> bool {
    inside_evidence(file)
}

/// The log's notes (admin operations and prunes), oldest first.
pub fn notes(root: &Path) -> Result<Vec<Note>, AuditError> {
    read_records(&root.join("audit.log"))
}

/// Prune the evidence folder at `root` as its writer: takes the writer's lock (so it refuses
/// while a writer runs) and signs the prune entry with `signer`.
pub fn prune(
    root: &Path,
    signer: Option<SigningKey>,
    before_ms: u64,
) -> Result<PruneReport, AuditError> {
    AuditStore::open_with(root, signer)?.prune(before_ms)
}

/// [`verify`], then compare the log with the newest checkpoint: a log that ends before it lost
/// its tail; an entry that differs from it was rewritten. With `public`, the checkpoint's own
/// signature must hold too (anyone who can publish to the stream could forge an unsigned one).
pub fn verify_with_checkpoint(
    root: &Path,
    public: Option<&VerifyingKey>,
    checkpoint: &Checkpoint,
) -> Result<Verification, AuditError> {
    let entries = match verify(root, public)? {
        Verification::Intact { entries } => entries,
        broken => return Ok(broken),
    };
    if let Some(key) = public
        && !checkpoint.signed_by(key)
    {
        return Ok(Verification::Broken {
            line: checkpoint.seq as usize,
            action_id: None,
            problem: "the newest checkpoint is not signed by the key (forged?)".into(),
        });
    }
    Ok(against_checkpoint(root, entries, checkpoint)?.unwrap_or(Verification::Intact { entries }))
}

/// How a log of `entries` entries (which verify) falls short of `checkpoint`, if it does.
fn against_checkpoint(
    root: &Path,
    entries: u64,
    checkpoint: &Checkpoint,
) -> Result<Option<Verification>, AuditError> {
    if checkpoint.seq > entries {
        return Ok(Some(Verification::Broken {
            line: entries as usize + 1,
            action_id: None,
            problem: format!(
                "the log ends at entry {entries}, but the newest checkpoint is entry {}: \
                 its last {} entries were removed",
                checkpoint.seq,
                checkpoint.seq - entries
            ),
        }));
    }
    if checkpoint.seq > 0 {
        let path = root.join("audit.log");
        let file = File::open(&path).map_err(io(&path))?;
        let line = BufReader::new(file)
            .lines()
            .nth(checkpoint.seq as usize - 1)
            .transpose()
            .map_err(io(&path))?
            .unwrap_or_default();
        let hash = serde_json::from_str::<EntryIn>(&line)
            .map(|e| e.hash)
            .unwrap_or_default();
        if hash != checkpoint.hash {
            return Ok(Some(Verification::Broken {
                line: checkpoint.seq as usize,
                action_id: None,
                problem: "this entry differs from its checkpoint: the log was rewritten".into(),
            }));
        }
    }
    Ok(None)
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

/// Every record in the log, oldest first (the log must verify).
pub fn records(root: &Path) -> Result<Vec<AuditRecord>, AuditError> {
    let path = root.join("audit.log");
    if let Verification::Broken { line, problem, .. } = verify(root, None)? {
        return Err(AuditError::Damaged {
            path: path.display().to_string(),
            line,
            problem,
        });
    }
    let Ok(file) = File::open(&path) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line.map_err(io(&path))?;
        let entry: EntryIn = serde_json::from_str(&line).map_err(|e| AuditError::Damaged {
            path: path.display().to_string(),
            line: out.len() + 1,
            problem: e.to_string(),
        })?;
        if let Ok(r) = serde_json::from_str::<AuditRecord>(entry.record.get()) {
            out.push(r);
        }
    }
    Ok(out)
}

/// A running audit writer.
pub struct AuditHandle {
    pub metrics_addr: SocketAddr,
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

/// Where the writer publishes its checkpoints.
struct Checkpoints {
    publisher: crate::broker::Publisher,
    /// The exchange bound to the checkpoint stream (the same name).
    exchange: String,
}

impl Checkpoints {
    /// Publish the head under a confirm, bounded. A failure is counted and logged: the next
    /// entry's checkpoint covers this one.
    async fn publish(&self, head: &Checkpoint, metrics: &AuditMetrics) {
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
pub(crate) mod tests {
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
    use crate::wire::{EvidenceFrame, SCHEMA};

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
    fn store_verify_reopen_and_idempotence() {
        let root = dir();
        let mut store = AuditStore::open(&root).unwrap();
        let (env, ev) = event(Action::LockScreen);
        assert!(store.store(&env, &ev).unwrap());
        assert!(
            !store.store(&env, &ev).unwrap(),
            "the same action twice is one entry"
        );
        let (env2, ev2) = event(Action::SignOut);
        assert!(store.store(&env2, &ev2).unwrap());
        drop(store);
        assert_eq!(
            verify(&root, None).unwrap(),
            Verification::Intact { entries: 2 }
        );
        let store = AuditStore::open(&root).unwrap();
        assert!(store.contains(&ev.action_id) && store.len() == 2);
        let recs = records(&root).unwrap();
        assert_eq!(recs[0].action_id, ev.action_id);
        let jpeg = root.join(&recs[0].evidence_files[0]);
        assert!(
            jpeg.starts_with(root.join("evidence/2025-11-22/alice")),
            "{}",
            jpeg.display()
        );
        assert_eq!(std::fs::read(jpeg).unwrap(), [0xFF, 0xD8, 0xFF, 0xD9]);
    }

    #[test]
    fn a_flipped_byte_names_the_broken_entry() {
        let root = dir();
        let mut store = AuditStore::open(&root).unwrap();
        let mut ids = Vec::new();
        for _ in 0..3 {
            let (env, ev) = event(Action::Warn);
            store.store(&env, &ev).unwrap();
            ids.push(ev.action_id.to_string());
        }
        drop(store);
        let path = root.join("audit.log");
        let mut bytes = std::fs::read(&path).unwrap();
        let second = bytes.iter().position(|b| *b == b'\n').unwrap() + 1;
        let at = second
            + bytes[second..]
                .windows(6)
                .position(|w| w == b"policy")
                .unwrap();
        bytes[at] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        match verify(&root, None).unwrap() {
            Verification::Broken {
                line, action_id, ..
            } => {
                assert_eq!(line, 2);
                assert_eq!(action_id.as_deref(), Some(ids[1].as_str()));
            }
            other => panic!("verification passed a damaged log: {other:?}"),
        }
        assert!(matches!(
            AuditStore::open(&root),
            Err(AuditError::Damaged { line: 2, .. })
        ));
    }

    #[test]
    fn a_torn_last_line_is_cut_off_on_open() {
        let root = dir();
        let mut store = AuditStore::open(&root).unwrap();
        let (env, ev) = event(Action::Warn);
        store.store(&env, &ev).unwrap();
        drop(store);
        let path = root.join("audit.log");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":2,\"prev\":\"ab").unwrap();
        drop(f);
        let store = AuditStore::open(&root).unwrap();
        assert_eq!(store.len(), 1);
        assert_eq!(
            verify(&root, None).unwrap(),
            Verification::Intact { entries: 1 }
        );
    }

    #[test]
    fn signed_entries_catch_a_log_rehashed_without_the_key() {
        let root = dir();
        let key = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
        let public = key.verifying_key();
        let mut store = AuditStore::open_with(&root, Some(key.clone())).unwrap();
        for _ in 0..3 {
            let (env, ev) = event(Action::Warn);
            store.store(&env, &ev).unwrap();
        }
        drop(store);
        assert_eq!(
            verify(&root, Some(&public)).unwrap(),
            Verification::Intact { entries: 3 }
        );
        // Whoever can write the log edits entry 2 and recomputes every hash after it: the
        // chain holds again, the signatures do not.
        rechain(
            &root,
            |i, r| {
                if i == 1 {
                    r.replace("policy", "admin!")
                } else {
                    r
                }
            },
            false,
        );
        assert!(
            matches!(verify(&root, None).unwrap(), Verification::Intact { .. }),
            "the re-hashed chain should hold without the key"
        );
        match verify(&root, Some(&public)).unwrap() {
            Verification::Broken { line, problem, .. } => {
                assert_eq!(line, 2, "{problem}");
                assert!(problem.contains("signature"), "{problem}");
            }
            other => panic!("a re-hashed log verified with the key: {other:?}"),
        }
        // The writer refuses to extend it.
        assert!(matches!(
            AuditStore::open_with(&root, Some(key)),
            Err(AuditError::Damaged { line: 2, .. })
        ));
    }

    /// Rewrite the log as whoever can write it would: `edit` may change each record (by its
    /// 0-based line), then every hash and link is recomputed; signatures are kept as they were
    /// unless `unsign` drops them.
    fn rechain(root: &Path, edit: impl Fn(usize, String) -> String, unsign: bool) {
        let path = root.join("audit.log");
        let text = std::fs::read_to_string(&path).unwrap();
        let mut prev = GENESIS.to_owned();
        let mut rewritten = String::new();
        for (i, line) in text.lines().enumerate() {
            let entry: EntryIn = serde_json::from_str(line).unwrap();
            let record = edit(i, entry.record.get().to_owned());
            let hash = entry_hash(entry.seq, &prev, &record);
            let raw = serde_json::value::RawValue::from_string(record).unwrap();
            rewritten += &serde_json::to_string(&EntryOut {
                seq: entry.seq,
                prev: &prev,
                hash: &hash,
                sig: entry.sig.as_deref().filter(|_| !unsign),
                record: &raw,
            })
            .unwrap();
            rewritten.push('\n');
            prev = hash;
        }
        std::fs::write(&path, rewritten).unwrap();
    }

    #[test]
    fn signing_an_old_log_takes_an_operators_word_for_its_head_and_nothing_after_is_unsigned() {
        let root = dir();
        let mut store = AuditStore::open(&root).unwrap();
        for _ in 0..2 {
            let (env, ev) = event(Action::SignOut);
            store.store(&env, &ev).unwrap();
        }
        let head = store.head().hash;
        drop(store);
        let key = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
        let public = key.verifying_key();
        // Unsigned entries under a key: refused until a signed entry vouches for them.
        assert!(matches!(
            verify(&root, Some(&public)).unwrap(),
            Verification::Broken { line: 1, ref problem, .. } if problem.contains("not signed")
        ));
        // The writer does not vouch by itself: it names the command and the head.
        match AuditStore::open_with(&root, Some(key.clone())) {
            Err(AuditError::Key(why)) => {
                assert!(why.contains(&format!("adopt --head {head}")), "{why}")
            }
            other => panic!("a keyed writer took an unsigned log: {:?}", other.err()),
        }
        // An operator vouches for the head they checked, and only that one.
        assert!(matches!(
            adopt(&root, key.clone(), "not-the-head"),
            Err(AuditError::Key(_))
        ));
        assert_eq!(adopt(&root, key.clone(), &head).unwrap(), 2);
        let mut store = AuditStore::open_with(&root, Some(key.clone())).unwrap();
        assert_eq!(store.len(), 3);
        let (env, ev) = event(Action::Warn);
        store.store(&env, &ev).unwrap();
        drop(store);
        assert_eq!(
            verify(&root, Some(&public)).unwrap(),
            Verification::Intact { entries: 4 }
        );
        assert_eq!(unsigned_entries(&root, &public).unwrap(), 2);
        match &notes(&root).unwrap()[..] {
            [
                Note::Signing {
                    unsigned_entries: 2,
                    key: fp,
                    ..
                },
            ] => {
                assert_eq!(*fp, signing::fingerprint(&public));
            }
            other => panic!("no signing entry: {other:?}"),
        }
        // A signed log is not adopted again.
        assert!(matches!(
            adopt(&root, key.clone(), &head),
            Err(AuditError::Key(_))
        ));
        // A sign_out in the unsigned part rewritten to an allow, and the chain redone: the
        // signed statement no longer matches what it vouched for.
        let clean = std::fs::read_to_string(root.join("audit.log")).unwrap();
        rechain(
            &root,
            |i, r| {
                if i == 0 {
                    r.replace("sign_out", "allow")
                } else {
                    r
                }
            },
            false,
        );
        assert!(matches!(
            verify(&root, None).unwrap(),
            Verification::Intact { .. }
        ));
        assert!(matches!(
            verify(&root, Some(&public)).unwrap(),
            Verification::Broken { line: 3, ref problem, .. } if problem.contains("signature")
        ));
        // Every signature stripped and the chain redone, to pass as an old unsigned log: the
        // keyed writer refuses it (and `vigil audit adopt` finds the signed checkpoints).
        std::fs::write(root.join("audit.log"), &clean).unwrap();
        assert!(
            matches!(AuditStore::open_with(&root, None), Err(AuditError::Key(_))),
            "an unsigned writer extended a signed log"
        );
        rechain(
            &root,
            |i, r| {
                if i == 1 {
                    r.replace("sign_out", "allow")
                } else {
                    r
                }
            },
            true,
        );
        assert!(matches!(
            AuditStore::open_with(&root, Some(key.clone())),
            Err(AuditError::Key(_))
        ));
        // A prune note appended without the key, to delete evidence: refused under the key.
        AuditStore::open_with(&root, None)
            .unwrap()
            .note(&Note::Prune {
                entry_id: Uuid::now_v7(),
                before_ms: u64::MAX,
                files: Vec::new(),
                written_at_ms: 0,
            })
            .unwrap();
        assert!(matches!(
            verify(&root, None).unwrap(),
            Verification::Intact { entries: 5 }
        ));
        assert!(matches!(
            verify(&root, Some(&public)).unwrap(),
            Verification::Broken { line: 1, ref problem, .. } if problem.contains("not signed")
        ));
        let _ = std::fs::remove_dir_all(&root);
    }

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

    #[test]
    fn the_log_and_its_evidence_are_their_owners_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let root = dir();
        let mut store = AuditStore::open(&root).unwrap();
        let (env, ev) = event(Action::Warn);
        store.store(&env, &ev).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&root.join("audit.log")), 0o600);
        assert_eq!(mode(&root.join("audit.lock")), 0o600);
        assert_eq!(mode(&root.join("evidence")), 0o700);
        let record = &records(&root).unwrap()[0];
        assert_eq!(mode(&root.join(&record.evidence_files[0])), 0o600);
        drop(store);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_client_over_its_daily_evidence_budget_keeps_verdicts_not_images() {
        let root = dir();
        let counter = prometheus::IntCounter::new("withheld", "frames withheld").unwrap();
        let open = || {
            let mut store = AuditStore::open(&root).unwrap();
            // Each test frame is 4 bytes: room for one a day.
            store.limit_evidence(Some(6), Some(counter.clone()));
            store
        };
        let mut store = open();
        let store_for = |store: &mut AuditStore, client: &str| {
            let (mut env, ev) = event(Action::Warn);
            env.client_id = client.into();
            store.store(&env, &ev).unwrap();
        };
        store_for(&mut store, "alice");
        store_for(&mut store, "alice");
        store_for(&mut store, "bob");
        drop(store);
        // A restarted writer counts what the folder holds already.
        let mut store = open();
        store_for(&mut store, "alice");
        drop(store);
        let kept: Vec<(String, usize, u32)> = records(&root)
            .unwrap()
            .into_iter()
            .map(|r| (r.client_id, r.evidence_files.len(), r.evidence_withheld))
            .collect();
        assert_eq!(
            kept,
            [
                ("alice".to_owned(), 1, 0),
                ("alice".to_owned(), 0, 1),
                ("bob".to_owned(), 1, 0),
                ("alice".to_owned(), 0, 1),
            ]
        );
        assert_eq!(counter.get(), 2);
        assert_eq!(
            verify(&root, None).unwrap(),
            Verification::Intact { entries: 4 }
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn an_altered_or_deleted_evidence_file_is_named() {
        let root = dir();
        let mut store = AuditStore::open(&root).unwrap();
        let (env, ev) = event(Action::LockScreen);
        store.store(&env, &ev).unwrap();
        let (env2, ev2) = event(Action::SignOut);
        store.store(&env2, &ev2).unwrap();
        drop(store);
        let recs = records(&root).unwrap();
        assert_eq!(recs[1].evidence_sha256.len(), 1);
        let second = root.join(&recs[1].evidence_files[0]);
        std::fs::write(&second, [0xFF, 0xD8, 0x00, 0xFF, 0xD9]).unwrap();
        match verify(&root, None).unwrap() {
            Verification::Broken {
                line,
                action_id,
                problem,
            } => {
                assert_eq!(line, 2);
                assert_eq!(action_id, Some(ev2.action_id.to_string()));
                assert!(problem.contains("does not match"), "{problem}");
            }
            other => panic!("{other:?}"),
        }
        let first = root.join(&recs[0].evidence_files[0]);
        std::fs::remove_file(&first).unwrap();
        match verify(&root, None).unwrap() {
            Verification::Broken { line, problem, .. } => {
                assert_eq!(line, 1);
                assert!(problem.contains("missing"), "{problem}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn evidence_paths_outside_the_evidence_folder_are_not_read() {
        let template = dir();
        let mut store = AuditStore::open(&template).unwrap();
        let (env, ev) = event(Action::Warn);
        store.store(&env, &ev).unwrap();
        drop(store);
        let record = records(&template).unwrap().remove(0);
        for path in ["/dev/zero", "../outside.jpg", "evidence/../../outside.jpg"] {
            // A log whose chain holds but whose record names a file outside the folder.
            let mut forged = record.clone();
            forged.evidence_files = vec![path.to_owned()];
            let root = dir();
            let mut store = AuditStore::open(&root).unwrap();
            store
                .append(&serde_json::to_string(&forged).unwrap())
                .unwrap();
            drop(store);
            match verify(&root, None).unwrap() {
                Verification::Broken { line, problem, .. } => {
                    assert_eq!(line, 1);
                    assert!(problem.contains("leaves the evidence folder"), "{problem}");
                }
                other => panic!("{path}: {other:?}"),
            }
        }
    }

    #[test]
    fn prune_removes_old_evidence_and_verify_stays_green() {
        let root = dir();
        let key = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
        let public = key.verifying_key();
        let mut store = AuditStore::open_with(&root, Some(key.clone())).unwrap();
        // Two old actions, one recent.
        for decided_at_ms in [1_000, 2_000, 10_000] {
            let (env, mut ev) = event(Action::Warn);
            ev.decided_at_ms = decided_at_ms;
            store.store(&env, &ev).unwrap();
        }
        let report = store.prune(5_000).unwrap();
        assert_eq!((report.actions, report.files), (2, 2));
        // Nothing older is left: a second prune changes nothing and logs nothing.
        assert_eq!(store.prune(5_000).unwrap().files, 0);
        assert_eq!(store.len(), 4);
        drop(store);
        assert_eq!(
            verify(&root, Some(&public)).unwrap(),
            Verification::Intact { entries: 4 }
        );
        let recs = records(&root).unwrap();
        assert!(!root.join(&recs[0].evidence_files[0]).exists());
        assert!(!root.join(&recs[1].evidence_files[0]).exists());
        // The entries keep their hashes, and the prune entry names the files.
        assert_eq!(recs[0].evidence_sha256.len(), 1);
        assert!(
            matches!(&notes(&root).unwrap()[..], [Note::Prune { files, .. }] if files.len() == 2)
        );
        // A file that was not pruned is still missed.
        std::fs::remove_file(root.join(&recs[2].evidence_files[0])).unwrap();
        assert!(matches!(
            verify(&root, Some(&public)).unwrap(),
            Verification::Broken { line: 3, .. }
        ));
        // Without the key, nothing can be appended to a signed log.
        assert!(matches!(
            prune(&root, None, 20_000),
            Err(AuditError::Key(_))
        ));
    }

    #[test]
    fn a_second_writer_on_the_same_folder_refuses_to_start() {
        let root = dir();
        let first = AuditStore::open(&root).unwrap();
        let err = AuditStore::open(&root)
            .err()
            .expect("two writers opened one log");
        assert!(matches!(err, AuditError::Locked { .. }), "{err}");
        assert!(err.to_string().contains("another audit writer"), "{err}");
        drop(first);
        AuditStore::open(&root).expect("the folder is free once the first writer is gone");
    }

    #[tokio::test]
    async fn a_panicking_writer_task_is_an_error_and_an_aborted_one_is_not() {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let panicking = AuditHandle {
            metrics_addr: addr,
            task: tokio::spawn(async { panic!("disk on fire") }),
            webhooks: None,
        };
        match panicking.join().await {
            Err(AuditError::Panicked(message)) => assert_eq!(message, "disk on fire"),
            other => panic!("{other:?}"),
        }
        let aborted = AuditHandle {
            metrics_addr: addr,
            task: tokio::spawn(std::future::pending()),
            webhooks: Some(tokio::spawn(std::future::pending())),
        };
        aborted.abort();
        assert!(aborted.join().await.is_ok());
    }

    #[test]
    fn dates_are_utc_days() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(1_763_777_000_000), "2025-11-22");
        assert_eq!(utc_date(951_782_400_000), "2000-02-29");
    }
}
