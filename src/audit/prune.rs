//! Pruning old evidence: `AuditStore::prune` (and `prune`, as the writer) lists the evidence
//! files of old actions in a prune entry, then removes them; `pruned_files` reads those lists
//! back, so that `verify` accepts the files missing while their entries keep their hashes.

use std::collections::HashSet;
use std::path::Path;

use ed25519_dalek::SigningKey;
use serde::Serialize;
use uuid::Uuid;

use super::log::{inside_evidence, read_records};
use super::{AuditError, AuditRecord, AuditStore, Note, io};

/// What `prune` did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PruneReport {
    pub before_ms: u64,
    pub actions: usize,
    pub files: usize,
    pub bytes: u64,
}

impl AuditStore {
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
}

/// The evidence files the log's prune entries say were removed.
pub(super) fn pruned_files(path: &Path) -> Result<HashSet<String>, AuditError> {
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

/// Prune the evidence folder at `root` as its writer: takes the writer's lock (so it refuses
/// while a writer runs) and signs the prune entry with `signer`.
pub fn prune(
    root: &Path,
    signer: Option<SigningKey>,
    before_ms: u64,
) -> Result<PruneReport, AuditError> {
    AuditStore::open_with(root, signer)?.prune(before_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::tests::{dir, event};
    use crate::audit::{Verification, notes, records, verify};
    use crate::policy::Action;

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
}
