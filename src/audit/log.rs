//! The log and its store: the record and entry types, the line format and its hash
//! (`entry_hash`, from `GENESIS`), the chain check every reader runs (`Chain`), and the one
//! writer's `AuditStore`: the append, the evidence files and their daily budget, the message
//! fingerprints, the lock and the files' modes.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::{AuditError, Checkpoint, Verification, io, signing, utc_date};
use crate::directory::write_atomic;
use crate::policy::Action;
use crate::wire::{ActionEvent, Analysis, Envelope};

pub(super) const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrameRecord {
    pub seq: u64,
    pub frame_id: Uuid,
    pub received_at_ms: u64,
    pub analysis: Analysis,
}

/// One line of the log.
#[derive(Serialize)]
pub(super) struct EntryOut<'a> {
    pub(super) seq: u64,
    pub(super) prev: &'a str,
    pub(super) hash: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) sig: Option<&'a str>,
    pub(super) record: &'a serde_json::value::RawValue,
}

#[derive(Deserialize)]
pub(super) struct EntryIn<'a> {
    pub(super) seq: u64,
    prev: String,
    pub(super) hash: String,
    #[serde(default)]
    pub(super) sig: Option<String>,
    #[serde(borrow)]
    pub(super) record: &'a serde_json::value::RawValue,
}

pub(super) fn entry_hash(seq: u64, prev: &str, record: &str) -> String {
    let mut h = Sha256::new();
    h.update(seq.to_string().as_bytes());
    h.update(b"\n");
    h.update(prev.as_bytes());
    h.update(b"\n");
    h.update(record.as_bytes());
    hex::encode(h.finalize())
}

/// The append-only, hash-chained audit log and the evidence folder beside it.
pub struct AuditStore {
    pub(super) root: PathBuf,
    pub(super) log_path: PathBuf,
    log: File,
    /// Held for the store's life: a second writer on the folder cannot open it.
    _lock: File,
    pub(super) signer: Option<SigningKey>,
    pub(super) last_hash: String,
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
    pub(super) fingerprints: Fingerprints,
}

/// The most message fingerprints kept; the oldest go first.
const MAX_FINGERPRINTS: usize = 65_536;

#[derive(Default)]
pub(super) struct Fingerprints {
    by_id: HashMap<Uuid, [u8; 32]>,
    order: std::collections::VecDeque<Uuid>,
}

impl Fingerprints {
    pub(super) fn remember(&mut self, id: Uuid, fingerprint: [u8; 32]) {
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

    /// Where the entry `id` sits in the log, if it is there.
    /// Whether the entry `id` came from a message with this `fingerprint` (its SHA-256):
    /// `None` when the entry was written before the store opened, or long ago.
    pub(super) fn same_message(&self, id: &Uuid, fingerprint: &[u8; 32]) -> Option<bool> {
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
    pub(super) fn append(&mut self, record_json: &str) -> Result<(u64, String), AuditError> {
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

    pub(super) fn scan(path: &Path, public: Option<&VerifyingKey>) -> Result<Scan, AuditError> {
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
pub(super) struct Chain {
    prev: String,
    pub(super) entries: u64,
    /// Whether the last entry is signed, and whether any is.
    signed: bool,
    any_signed: bool,
    /// With a key: the first signed entry's line, and the first unsigned one's.
    pub(super) signed_from: Option<u64>,
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
pub(super) struct Checked {
    id: Uuid,
    seq: u64,
    hash: String,
    /// Its record, as written.
    pub(super) record: String,
}

impl Chain {
    /// Check the next line of the log: its sequence number, link and hash, and with `public`
    /// its signature (unsigned entries may only open the log, before the signed entry that
    /// vouches for them).
    pub(super) fn check(
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
    pub(super) fn unfinished(&self) -> Option<Verification> {
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

pub(super) enum Scan {
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

/// Whether `file` has the exact shape of an evidence frame the writer names,
/// `evidence/<day>/<client>/<evidence id>/<frame>.jpg`, each part of `[A-Za-z0-9_.-]` and none
/// `.` or `..`: a name that is the same on disk, in a URL and in a browser, which no
/// normalisation can turn into another path.
pub fn is_evidence_frame(file: &str) -> bool {
    let parts: Vec<&str> = file.split('/').collect();
    file.len() <= 512
        && file.ends_with(".jpg")
        && parts.len() == 5
        && parts[0] == "evidence"
        && parts[1..].iter().all(|p| {
            !p.is_empty()
                && *p != "."
                && *p != ".."
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        })
}

/// Whether a path the log names stays inside the evidence folder.
pub(super) fn inside_evidence(file: &str) -> bool {
    Path::new(file).starts_with("evidence")
        && Path::new(file)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}

/// Every record of type `T` in the log at `path` (entries of other kinds are skipped).
pub(super) fn read_records<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<Vec<T>, AuditError> {
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

/// Whether an evidence path a record names may be read: inside the evidence folder.
pub fn is_evidence_path(file: &str) -> bool {
    inside_evidence(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::tests::{dir, event};
    use crate::audit::{records, verify};

    #[test]
    fn an_evidence_frame_has_one_shape() {
        let id = "0192f0c4-0000-7000-8000-000000000001";
        assert!(is_evidence_frame(&format!(
            "evidence/2026-12-07/alice/{id}/{id}.jpg"
        )));
        for bad in [
            format!("evidence/2026-12-07/alice/{id}"),
            format!("evidence/2026-12-07/alice/{id}/{id}.png"),
            format!("evidence/2026-12-07/alice/{id}/x/{id}.jpg"),
            format!("evidence/2026-12-07/../{id}/{id}.jpg"),
            format!("evidence/2026-12-07/./{id}/{id}.jpg"),
            format!("evidence/%2e%2e/alice/{id}/{id}.jpg"),
            format!("evidence/2026-12-07/al ice/{id}/{id}.jpg"),
            format!("evidence/2026-12-07/alice\\..\\x/{id}/{id}.jpg"),
            format!("evidence//alice/{id}/{id}.jpg"),
            format!("/evidence/2026-12-07/alice/{id}/{id}.jpg"),
            format!("evidence/2026-12-07/{}/{id}/{id}.jpg", "a".repeat(500)),
        ] {
            assert!(!is_evidence_frame(&bad), "{bad}");
        }
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
}
