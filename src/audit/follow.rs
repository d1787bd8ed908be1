//! The log as a reader beside the writer follows it: the admin API's audit views. Each view
//! checks only what was appended since the last one (the chain, signatures, gaps and evidence
//! files of the new entries), and finds a client's entries through an index of where they sit,
//! so a view of a long log costs what was appended, not the whole log.
//!
//! What a view shows is what was checked: each entry indexed keeps the SHA-256 of its line as
//! checked, and an entry read back for a view that no longer matches it (rewritten in place,
//! at the same length) breaks the log from that entry on. An evidence frame is served only
//! when its bytes match the SHA-256 its entry records, and that entry is read back the same
//! way. Each update also reads back the last line checked and the file's identity (device and
//! inode): a log replaced, even by a longer one, is followed from its start again. An entry
//! or file that no view reads is not read again here: `vigil audit verify` reads everything.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;
use sha2::{Digest as _, Sha256};
use uuid::Uuid;

use super::log::{Chain, EntryIn};
use super::verify::entry_problem;
use super::{AuditError, AuditRecord, Note, Verification, io};

pub struct Follower {
    root: PathBuf,
    key: Option<VerifyingKey>,
    /// Bytes of the log checked so far (whole lines only).
    bytes: u64,
    chain: Chain,
    /// The log only grows: once broken, it stays broken.
    broken: Option<Verification>,
    pruned: HashSet<String>,
    /// Each client's entries, oldest first.
    by_client: HashMap<String, Vec<Indexed>>,
    /// The action entry of each evidence folder (named by the action's id).
    evidence: HashMap<Uuid, Indexed>,
    /// The last line checked, read back at each update.
    last: Option<Indexed>,
    /// The log file's device and inode when it was first read.
    identity: Option<(u64, u64)>,
}

/// What the trail says of one evidence frame ([`Follower::evidence_sha256`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EvidenceCheck {
    /// The SHA-256 (hex) its checked entry records.
    Sha256(String),
    /// Its entry names it but records no hash (a log from before hashes were kept).
    Unhashed,
    /// No checked entry of that client names it.
    NotInTrail,
    /// Its entry changed after it was checked: the log is broken there.
    EntryChanged,
}

/// Where an entry sits in the log, and what its line was when it was checked.
#[derive(Debug, Clone, Copy)]
struct Indexed {
    offset: u64,
    len: u32,
    /// 1-based, as `verify` counts.
    line: u32,
    sha256: [u8; 32],
}

impl Follower {
    pub fn new(root: &Path, key: Option<VerifyingKey>) -> Self {
        Self {
            root: root.to_owned(),
            key,
            bytes: 0,
            chain: Chain::default(),
            broken: None,
            pruned: HashSet::new(),
            by_client: HashMap::new(),
            evidence: HashMap::new(),
            last: None,
            identity: None,
        }
    }

    /// Entries checked so far.
    pub fn entries(&self) -> u64 {
        self.chain.entries
    }

    /// With a key: how many entries open the log unsigned, vouched for by the first signed one.
    pub fn unsigned(&self) -> u64 {
        self.chain.signed_from.map_or(0, |first| first - 1)
    }

    /// Check what was appended since the last call, and say how the whole log stands.
    pub fn update(&mut self) -> Result<Verification, AuditError> {
        use std::os::unix::fs::MetadataExt as _;
        let path = self.root.join("audit.log");
        let (len, identity) = match std::fs::metadata(&path) {
            Ok(m) => (m.len(), Some((m.dev(), m.ino()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0, None),
            Err(e) => return Err(io(&path)(e)),
        };
        // Shorter than what was checked, another file, or a last line that changed: replaced
        // or restored. Start over.
        let replaced = self.identity.is_some() && identity != self.identity;
        if len < self.bytes || replaced || !self.last_line_holds(&path)? {
            *self = Self::new(&self.root, self.key);
        }
        self.identity = identity;
        if self.broken.is_none() && len > self.bytes {
            self.follow(&path, len)?;
        }
        Ok(self.status())
    }

    /// Whether the last line checked still reads as it did.
    fn last_line_holds(&self, path: &Path) -> Result<bool, AuditError> {
        let Some(last) = self.last else {
            return Ok(true);
        };
        let mut file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io(path)(e)),
        };
        read_back(&mut file, &last, &mut Vec::new()).map_err(io(path))
    }

    /// How the log stands, as far as it was checked (and read back since).
    pub fn status(&self) -> Verification {
        if let Some(broken) = &self.broken {
            return broken.clone();
        }
        self.chain.unfinished().unwrap_or(Verification::Intact {
            entries: self.chain.entries,
        })
    }

    /// The new bytes up to `len`, in one read: the chain, the index, prune lists and gaps as
    /// each entry comes; the evidence of new actions once the read is done (a prune entry
    /// comes after the entries whose files it removed).
    fn follow(&mut self, path: &Path, len: u64) -> Result<(), AuditError> {
        let start = self.bytes;
        let mut end = start;
        let mut with_evidence: Vec<(usize, String)> = Vec::new();
        let mut problem = None;
        for_lines(path, start, len, |offset, line| {
            let lineno = self.chain.entries as usize + 1;
            let checked = match self.chain.check(line, self.key.as_ref()) {
                Ok(checked) => checked,
                Err(broken) => {
                    self.broken = Some(broken);
                    return false;
                }
            };
            let record = checked.record;
            let place = Indexed {
                offset,
                len: line.len() as u32,
                line: lineno as u32,
                sha256: Sha256::digest(line).into(),
            };
            self.last = Some(place);
            let client = match serde_json::from_str::<AuditRecord>(&record) {
                Ok(r) => {
                    if !r.evidence_files.is_empty() {
                        with_evidence.push((lineno, record.clone()));
                        self.evidence.insert(r.action_id, place);
                    }
                    Some(r.client_id)
                }
                Err(_) => match serde_json::from_str::<Note>(&record) {
                    Ok(Note::Admin { client_id, .. } | Note::Session { client_id, .. }) => {
                        Some(client_id)
                    }
                    Ok(Note::Prune { files, .. }) => {
                        self.pruned.extend(files);
                        None
                    }
                    Ok(Note::Gap { .. }) => {
                        problem = Some((lineno, record.clone()));
                        None
                    }
                    _ => None,
                },
            };
            if let Some(client) = client {
                self.by_client.entry(client).or_default().push(place);
            }
            end = offset + line.len() as u64 + 1;
            problem.is_none()
        })?;
        self.bytes = end;
        if let Some((line, record)) = problem {
            self.broken = entry_problem(&self.root, line, &record, &self.pruned)?;
            return Ok(());
        }
        for (line, record) in with_evidence {
            if let Some(broken) = entry_problem(&self.root, line, &record, &self.pruned)? {
                self.broken = Some(broken);
                return Ok(());
            }
        }
        Ok(())
    }

    /// The record of each of `client`'s entries (actions, operations, sessions), oldest first,
    /// each read back and matched against its line as checked. An entry that changed since
    /// breaks the log ([`Follower::status`]) and is left out; the log stays broken until it
    /// is restored.
    pub fn records_of(&mut self, client: &str) -> Result<Vec<String>, AuditError> {
        let Some(places) = self.by_client.get(client) else {
            return Ok(Vec::new());
        };
        let path = self.root.join("audit.log");
        let mut file = File::open(&path).map_err(io(&path))?;
        let mut out = Vec::with_capacity(places.len());
        let mut buf = Vec::new();
        let mut changed = None;
        for place in places {
            if !read_back(&mut file, place, &mut buf).map_err(io(&path))? {
                changed.get_or_insert(place.line);
                continue;
            }
            if let Ok(entry) = serde_json::from_slice::<EntryIn>(&buf) {
                out.push(entry.record.get().to_owned());
            }
        }
        if let Some(line) = changed {
            self.changed_at(line);
        }
        Ok(out)
    }

    /// The entry at `line` no longer reads as it did when it was checked.
    fn changed_at(&mut self, line: u32) {
        let earlier = matches!(&self.broken, Some(Verification::Broken { line: at, .. }) if *at <= line as usize);
        if !earlier {
            self.broken = Some(Verification::Broken {
                line: line as usize,
                action_id: None,
                problem: "the entry changed after it was checked (rewritten in place)".into(),
            });
        }
    }

    /// What `client`'s checked entry says of the evidence file `file` (relative to the
    /// evidence folder, `evidence/<day>/<client>/<action id>/...`): found through the index
    /// of evidence folders, and read back against its line as checked.
    pub fn evidence_sha256(
        &mut self,
        client: &str,
        file: &str,
    ) -> Result<EvidenceCheck, AuditError> {
        let Some(place) = file
            .split('/')
            .nth(3)
            .and_then(|id| Uuid::parse_str(id).ok())
            .and_then(|id| self.evidence.get(&id).copied())
        else {
            return Ok(EvidenceCheck::NotInTrail);
        };
        let path = self.root.join("audit.log");
        let mut log = File::open(&path).map_err(io(&path))?;
        let mut buf = Vec::new();
        if !read_back(&mut log, &place, &mut buf).map_err(io(&path))? {
            self.changed_at(place.line);
            return Ok(EvidenceCheck::EntryChanged);
        }
        let record = serde_json::from_slice::<EntryIn>(&buf)
            .ok()
            .and_then(|e| serde_json::from_str::<AuditRecord>(e.record.get()).ok());
        let Some(record) = record.filter(|r| r.client_id == client) else {
            return Ok(EvidenceCheck::NotInTrail);
        };
        let Some(at) = record.evidence_files.iter().position(|f| f == file) else {
            return Ok(EvidenceCheck::NotInTrail);
        };
        Ok(match record.evidence_sha256.get(at) {
            Some(sha) => EvidenceCheck::Sha256(sha.clone()),
            None => EvidenceCheck::Unhashed,
        })
    }
}

/// Read the line at `place` into `buf`; whether it still hashes as it did when checked
/// (false also when the file is now too short to hold it).
fn read_back(file: &mut File, place: &Indexed, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    buf.resize(place.len as usize, 0);
    match file
        .seek(SeekFrom::Start(place.offset))
        .and_then(|_| file.read_exact(buf))
    {
        Ok(()) => Ok(Sha256::digest(&buf[..])[..] == place.sha256),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// Call `each` with the offset and bytes (without the newline) of every whole line of the
/// file between `start` and `end`, until it returns false. A last line without its newline
/// (the writer is appending it) is left for the next time.
fn for_lines(
    path: &Path,
    start: u64,
    end: u64,
    mut each: impl FnMut(u64, &[u8]) -> bool,
) -> Result<(), AuditError> {
    let mut file = File::open(path).map_err(io(path))?;
    file.seek(SeekFrom::Start(start)).map_err(io(path))?;
    let mut reader = BufReader::new(file).take(end - start);
    let mut offset = start;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).map_err(io(path))?;
        if n == 0 || !line.ends_with(b"\n") {
            return Ok(());
        }
        if !each(offset, &line[..n - 1]) {
            return Ok(());
        }
        offset += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditStore;
    use crate::audit::tests::{dir, event};
    use crate::policy::Action;

    fn event_of(client: &str) -> (crate::wire::Envelope, crate::wire::ActionEvent) {
        let (mut env, ev) = event(Action::Warn);
        env.client_id = client.into();
        (env, ev)
    }

    #[test]
    fn a_follower_checks_only_what_was_appended_and_agrees_with_verify() {
        let root = dir();
        let key = ed25519_dalek::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
        let public = key.verifying_key();
        let mut store = AuditStore::open_with(&root, Some(key)).unwrap();
        let mut follower = Follower::new(&root, Some(public));
        assert_eq!(
            follower.update().unwrap(),
            Verification::Intact { entries: 0 }
        );
        for _ in 0..3 {
            let (env, ev) = event_of("alice");
            store.store(&env, &ev).unwrap();
        }
        let (env, ev) = event_of("bob");
        store.store(&env, &ev).unwrap();
        assert_eq!(
            follower.update().unwrap(),
            Verification::Intact { entries: 4 }
        );
        assert_eq!(follower.records_of("alice").unwrap().len(), 3);
        assert_eq!(follower.records_of("bob").unwrap().len(), 1);
        assert!(follower.records_of("carol").unwrap().is_empty());
        // A torn last line is left for later; the whole one is then taken.
        let (env, ev) = event_of("bob");
        store.store(&env, &ev).unwrap();
        drop(store);
        let log = root.join("audit.log");
        let full = std::fs::read(&log).unwrap();
        std::fs::write(&log, &full[..full.len() - 10]).unwrap();
        assert_eq!(
            follower.update().unwrap(),
            Verification::Intact { entries: 4 }
        );
        std::fs::write(&log, &full).unwrap();
        assert_eq!(
            follower.update().unwrap(),
            Verification::Intact { entries: 5 }
        );
        // An entry appended without the key breaks it, as `verify` says.
        let mut unsigned = full.clone();
        let last: serde_json::Value = serde_json::from_slice(
            full[..full.len() - 1]
                .rsplit(|b| *b == b'\n')
                .next()
                .unwrap(),
        )
        .unwrap();
        let forged = serde_json::json!({
            "seq": 6, "prev": last["hash"], "hash": super::super::log::entry_hash(6, last["hash"].as_str().unwrap(), "{}"),
            "record": {},
        });
        unsigned.extend_from_slice(format!("{forged}\n").as_bytes());
        std::fs::write(&log, &unsigned).unwrap();
        let broken = follower.update().unwrap();
        assert!(
            matches!(broken, Verification::Broken { line: 6, .. }),
            "{broken:?}"
        );
        assert_eq!(
            broken,
            crate::audit::verify(&root, Some(&public)).unwrap(),
            "the follower and verify disagree"
        );
        // Restored shorter, the log is followed from the start again.
        std::fs::write(&log, &full[..full.len() - 1]).unwrap();
        assert_eq!(
            follower.update().unwrap(),
            Verification::Intact { entries: 4 }
        );
        let mut fresh = Follower::new(&root, Some(public));
        std::fs::write(&log, &full).unwrap();
        assert_eq!(fresh.update().unwrap(), Verification::Intact { entries: 5 });
        // Replaced by another, longer log (renamed over it): followed from its start.
        let other = dir();
        let mut store = AuditStore::open_with(&other, None).unwrap();
        for _ in 0..7 {
            let (env, ev) = event_of("carol");
            store.store(&env, &ev).unwrap();
        }
        drop(store);
        std::fs::rename(other.join("audit.log"), &log).unwrap();
        let status = fresh.update().unwrap();
        // Unsigned under a follower that expects the key, its evidence elsewhere: broken at its
        // first entry, as `verify` says, and not read on from the old log's offset.
        assert!(
            matches!(
                crate::audit::verify(&root, Some(&public)).unwrap(),
                Verification::Broken { line: 1, .. }
            ),
            "verify"
        );
        assert!(
            matches!(status, Verification::Broken { line: 1, .. }),
            "{status:?}"
        );
        let mut keyless = Follower::new(&root, None);
        keyless.update().unwrap();
        std::fs::rename(&log, other.join("audit.log")).unwrap();
        std::fs::write(&log, &full).unwrap();
        assert_eq!(
            keyless.update().unwrap(),
            Verification::Intact { entries: 5 },
            "a log swapped back is followed from its start"
        );
        let _ = std::fs::remove_dir_all(&root);
        let _ = std::fs::remove_dir_all(&other);
    }

    #[test]
    fn an_entry_rewritten_in_place_after_it_was_checked_breaks_the_view() {
        let root = dir();
        let mut store = AuditStore::open_with(&root, None).unwrap();
        for _ in 0..2 {
            let (env, ev) = event_of("alice");
            store.store(&env, &ev).unwrap();
        }
        drop(store);
        let mut follower = Follower::new(&root, None);
        assert_eq!(
            follower.update().unwrap(),
            Verification::Intact { entries: 2 }
        );
        let records = follower.records_of("alice").unwrap();
        assert_eq!(records.len(), 2);
        // What the trail recorded for an evidence file is found, and matches the file.
        let first: AuditRecord = serde_json::from_str(&records[0]).unwrap();
        let file = &first.evidence_files[0];
        let want = hex::encode(Sha256::digest(std::fs::read(root.join(file)).unwrap()));
        assert_eq!(
            follower.evidence_sha256("alice", file).unwrap(),
            EvidenceCheck::Sha256(want)
        );
        assert_eq!(
            follower
                .evidence_sha256("alice", "evidence/elsewhere.jpg")
                .unwrap(),
            EvidenceCheck::NotInTrail
        );
        assert_eq!(
            follower.evidence_sha256("bob", file).unwrap(),
            EvidenceCheck::NotInTrail
        );
        // The first entry's action rewritten at the same length: the log has not grown, so
        // update() checks nothing new, but the read-back sees it.
        let log = root.join("audit.log");
        let text = std::fs::read_to_string(&log).unwrap();
        let (line1, rest) = text.split_once('\n').unwrap();
        let forged = line1.replacen("wrong_person", "right_person", 1);
        assert_ne!(forged, line1);
        assert_eq!(forged.len(), line1.len());
        std::fs::write(&log, format!("{forged}\n{rest}")).unwrap();
        assert_eq!(
            follower.update().unwrap(),
            Verification::Intact { entries: 2 }
        );
        let shown = follower.records_of("alice").unwrap();
        assert_eq!(shown.len(), 1, "the rewritten entry is not shown");
        assert!(
            matches!(
                follower.status(),
                Verification::Broken { line: 1, ref problem, .. } if problem.contains("changed after")
            ),
            "{:?}",
            follower.status()
        );
        // Its evidence is refused too.
        assert_eq!(
            follower.evidence_sha256("alice", file).unwrap(),
            EvidenceCheck::EntryChanged
        );
        // And it stays broken on the next update.
        assert!(matches!(
            follower.update().unwrap(),
            Verification::Broken { line: 1, .. }
        ));
        let _ = std::fs::remove_dir_all(&root);
    }
}
