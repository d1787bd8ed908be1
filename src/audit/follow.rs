//! The log as a reader beside the writer follows it: the admin API's audit views. Each view
//! checks only what was appended since the last one (the chain, signatures, gaps and evidence
//! files of the new entries), and finds a client's entries through an index of where they sit,
//! so a view of a long log costs what was appended, not the whole log.
//!
//! What a view shows is what was checked: each entry indexed keeps the SHA-256 of its line as
//! checked, and an entry read back for a view that no longer matches it (rewritten in place,
//! at the same length) breaks the log from that entry on. An evidence frame is served only
//! when its bytes match the SHA-256 its entry records. An entry or file that no view reads is
//! not read again here: `vigil audit verify` reads everything.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;
use sha2::{Digest as _, Sha256};

use super::{AuditError, AuditRecord, Chain, EntryIn, Note, Verification, entry_problem, io};

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
}

/// Where an entry sits in the log, and what its line was when it was checked.
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
        let path = self.root.join("audit.log");
        let len = match std::fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io(&path)(e)),
        };
        if len < self.bytes {
            // Shorter than what was checked: replaced or restored. Start over.
            *self = Self::new(&self.root, self.key);
        }
        if self.broken.is_none() && len > self.bytes {
            self.follow(&path, len)?;
        }
        Ok(self.status())
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
            let client = match serde_json::from_str::<AuditRecord>(&record) {
                Ok(r) => {
                    if !r.evidence_files.is_empty() {
                        with_evidence.push((lineno, record.clone()));
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
                self.by_client.entry(client).or_default().push(Indexed {
                    offset,
                    len: line.len() as u32,
                    line: lineno as u32,
                    sha256: Sha256::digest(line).into(),
                });
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
            buf.resize(place.len as usize, 0);
            let read = file
                .seek(SeekFrom::Start(place.offset))
                .and_then(|_| file.read_exact(&mut buf));
            match read {
                Ok(()) => {}
                // Shorter now: the next update starts over; meanwhile nothing more is shown.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    changed.get_or_insert(place.line);
                    break;
                }
                Err(e) => return Err(io(&path)(e)),
            }
            if Sha256::digest(&buf)[..] != place.sha256 {
                changed.get_or_insert(place.line);
                continue;
            }
            if let Ok(entry) = serde_json::from_slice::<EntryIn>(&buf) {
                out.push(entry.record.get().to_owned());
            }
        }
        if let Some(line) = changed {
            let earlier = matches!(&self.broken, Some(Verification::Broken { line: at, .. }) if *at <= line as usize);
            if !earlier {
                self.broken = Some(Verification::Broken {
                    line: line as usize,
                    action_id: None,
                    problem: "the entry changed after it was checked (rewritten in place)".into(),
                });
            }
        }
        Ok(out)
    }

    /// The SHA-256 (hex) that `client`'s checked entries record for the evidence file `file`
    /// (relative to the evidence folder), if one of them names it.
    pub fn evidence_sha256(
        &mut self,
        client: &str,
        file: &str,
    ) -> Result<Option<String>, AuditError> {
        Ok(self.records_of(client)?.iter().find_map(|record| {
            let r = serde_json::from_str::<AuditRecord>(record).ok()?;
            let at = r.evidence_files.iter().position(|f| f == file)?;
            r.evidence_sha256.get(at).cloned()
        }))
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
            "seq": 6, "prev": last["hash"], "hash": super::super::entry_hash(6, last["hash"].as_str().unwrap(), "{}"),
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
        let _ = std::fs::remove_dir_all(&root);
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
        let want = follower.evidence_sha256("alice", file).unwrap().unwrap();
        assert_eq!(
            want,
            hex::encode(Sha256::digest(std::fs::read(root.join(file)).unwrap()))
        );
        assert_eq!(
            follower
                .evidence_sha256("alice", "evidence/elsewhere.jpg")
                .unwrap(),
            None
        );
        assert_eq!(follower.evidence_sha256("bob", file).unwrap(), None);
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
        // And it stays broken on the next update.
        assert!(matches!(
            follower.update().unwrap(),
            Verification::Broken { line: 1, .. }
        ));
        let _ = std::fs::remove_dir_all(&root);
    }
}
