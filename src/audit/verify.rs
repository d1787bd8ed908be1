//! Reading the log back: `verify` (every hash, link and signature, and every evidence file
//! against its SHA-256), `verify_with_checkpoint`, the unsigned head of a log (`unsigned_entries`)
//! and `adopt`, which starts signing it, and the readers of its records and notes (`records`,
//! `notes`, `trail`).

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::log::{EntryIn, Scan, inside_evidence, read_records};
use super::prune::pruned_files;
use super::{AuditError, AuditRecord, AuditStore, Checkpoint, Note, Verification, io, signing};

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
pub(super) fn entry_problem(
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

/// The log's notes (admin operations and prunes), oldest first.
pub fn notes(root: &Path) -> Result<Vec<Note>, AuditError> {
    read_records(&root.join("audit.log"))
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
pub(super) fn against_checkpoint(
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

#[cfg(test)]
mod tests {
    use super::super::log::{EntryOut, GENESIS, entry_hash};
    use super::*;
    use crate::audit::tests::{dir, event};
    use crate::policy::Action;

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
}
