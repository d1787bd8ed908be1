//! What the console's audit view shows, as the audit writer builds it from its own folder
//! (served by [`super::api`]): one client's entries, newest first, with the state of the whole
//! chain, and each evidence frame only as its checked entry recorded it. Both read through one
//! [`Follower`], so a view costs what was appended since the last one.

use std::path::PathBuf;
use std::sync::Mutex;

use ed25519_dalek::VerifyingKey;
use sha2::{Digest as _, Sha256};

use super::follow::{EvidenceCheck, Follower};
use super::{AuditRecord, Note, Verification, is_evidence_frame, signing};

/// The audit views of one evidence folder.
pub struct Views {
    dir: PathBuf,
    key: Option<VerifyingKey>,
    follower: Mutex<Follower>,
    /// The largest evidence file served.
    max_frame_bytes: u64,
    /// The most entries one trail view holds (the newest).
    max_entries: usize,
    /// Views cut at `max_entries`.
    truncated: Option<prometheus::IntCounter>,
}

/// Why an evidence frame is not served; each maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvidenceRefused {
    #[error("not an evidence frame")]
    NotEvidence,
    #[error("no such evidence frame (pruned?)")]
    Missing,
    #[error("no checked audit entry names this evidence frame")]
    NotInTrail,
    #[error(
        "this evidence frame does not match the SHA-256 its audit entry records: it was \
         altered after it was written"
    )]
    Altered,
    #[error(
        "the audit entry that names this evidence frame changed after it was checked: the log \
         is broken there"
    )]
    EntryChanged,
    #[error("{0}")]
    Unreadable(String),
}

impl EvidenceRefused {
    /// The HTTP status it is answered with.
    pub fn status(&self) -> u16 {
        match self {
            Self::NotEvidence | Self::Missing | Self::NotInTrail => 404,
            Self::Altered | Self::EntryChanged => 409,
            Self::Unreadable(_) => 500,
        }
    }
}

impl Views {
    /// Views of the log in `dir`, its signatures checked with `key` when there is one; no
    /// evidence file larger than `max_frame_bytes` is read.
    pub fn new(dir: PathBuf, key: Option<VerifyingKey>, max_frame_bytes: u64) -> Self {
        let follower = Mutex::new(Follower::new(&dir, key));
        Self {
            dir,
            key,
            follower,
            max_frame_bytes,
            max_entries: usize::MAX,
            truncated: None,
        }
    }

    /// At most `max` entries a view (the newest), each cut counted in `truncated`.
    pub fn limit_entries(mut self, max: usize, truncated: prometheus::IntCounter) -> Self {
        self.max_entries = max.max(1);
        self.truncated = Some(truncated);
        self
    }

    /// `client`'s trail: `{client, verification, key, total, entries}`, entries of kind
    /// `action` (with `evidence: [{file, verdict}]`, `file` relative to the evidence folder),
    /// `admin` and `session`, newest first, at most the newest `max_entries` of the `total`.
    /// Blocking: it reads the log.
    pub fn trail(&self, client: &str) -> Result<serde_json::Value, String> {
        if !self.dir.join("audit.log").exists() {
            return Err(format!(
                "no audit log in {} (the audit writer's VIGIL_EVIDENCE_DIR)",
                self.dir.display()
            ));
        }
        // Only what was appended since the last view is checked; the client's entries are
        // found through the follower's index.
        let mut follower = self.follower.lock().unwrap_or_else(|e| e.into_inner());
        follower.update().map_err(|e| e.to_string())?;
        let unsigned = follower.unsigned();
        let found = follower.records_of(client).map_err(|e| e.to_string())?;
        // After the read-back: an entry rewritten since it was checked breaks the log here.
        let checked = follower.status();
        drop(follower);
        let verification = match checked {
            Verification::Intact { entries } if self.key.is_some() => {
                format!(
                    "intact: {entries} entries, every hash and evidence file checked, and every \
                     signature under the writer's key{} (a cut-off tail shows only against the \
                     checkpoints: `vigil audit verify`)",
                    if unsigned > 0 {
                        format!(
                            " from entry {} on (the first {unsigned} predate signing)",
                            unsigned + 1
                        )
                    } else {
                        String::new()
                    }
                )
            }
            Verification::Intact { entries } => format!(
                "UNSIGNED CHECK: {entries} entries whose hashes and evidence files agree with \
                 each other; without the writer's public key (VIGIL_AUDIT_PUBLIC_KEY) a \
                 rewritten log passes this too"
            ),
            Verification::Broken { line, problem, .. } => {
                format!("BROKEN at entry {line}: {problem}")
            }
        };
        let records = found
            .iter()
            .filter_map(|r| serde_json::from_str::<AuditRecord>(r).ok());
        let notes = found
            .iter()
            .filter_map(|r| serde_json::from_str::<Note>(r).ok());
        let mut entries: Vec<serde_json::Value> = records
            .map(|r| {
                let evidence: Vec<serde_json::Value> = r
                    .evidence_files
                    .iter()
                    .zip(&r.frames)
                    .map(|(file, frame)| {
                        serde_json::json!({
                            "file": file,
                            "verdict": frame.analysis.verdict().map_or("—", |v| v.as_str()),
                        })
                    })
                    .collect();
                serde_json::json!({
                    "kind": "action", "at_ms": r.decided_at_ms, "action": r.action,
                    "reason": r.reason, "origin": r.origin, "operator": r.operator,
                    "rule": r.rule, "action_id": r.action_id, "evidence": evidence,
                })
            })
            .collect();
        entries.extend(notes.filter_map(|n| match n {
            Note::Admin {
                operator,
                operation,
                client_id,
                source,
                at_ms,
                ..
            } if client_id == client => Some(serde_json::json!({
                "kind": "admin", "at_ms": at_ms, "operator": operator,
                "operation": operation, "source": source,
            })),
            Note::Session {
                client_id,
                source,
                session,
                event,
                reason,
                address,
                at_ms,
                ..
            } if client_id == client => Some(serde_json::json!({
                "kind": "session", "at_ms": at_ms, "event": event,
                "reason": reason, "session": session, "source": source,
                "address": address,
            })),
            _ => None,
        }));
        entries.sort_by_key(|e| std::cmp::Reverse(e["at_ms"].as_u64().unwrap_or(0)));
        let total = entries.len();
        if total > self.max_entries {
            entries.truncate(self.max_entries);
            if let Some(counter) = &self.truncated {
                counter.inc();
            }
        }
        Ok(serde_json::json!({
            "client": client, "verification": verification,
            "key": self.key.as_ref().map(signing::fingerprint),
            "total": total, "entries": entries,
        }))
    }

    /// The evidence frame at `file` (`evidence/<day>/<client>/<evidence id>/<frame>.jpg`),
    /// served only as the trail recorded it: named by the client's checked entry, and with the
    /// SHA-256 it holds. Blocking.
    pub fn evidence(&self, file: &str) -> Result<Vec<u8>, EvidenceRefused> {
        if !is_evidence_frame(file) {
            return Err(EvidenceRefused::NotEvidence);
        }
        let client = file.split('/').nth(2).unwrap_or_default();
        // The trail first: a file no checked entry names is not opened at all.
        let recorded = {
            let mut follower = self.follower.lock().unwrap_or_else(|e| e.into_inner());
            follower
                .update()
                .and_then(|_| follower.evidence_sha256(client, file))
                .map_err(|e| unreadable(file, &e.to_string()))?
        };
        match recorded {
            EvidenceCheck::NotInTrail => return Err(EvidenceRefused::NotInTrail),
            EvidenceCheck::EntryChanged => return Err(EvidenceRefused::EntryChanged),
            EvidenceCheck::Sha256(_) | EvidenceCheck::Unhashed => {}
        }
        let bytes = self.read_frame(file)?;
        match recorded {
            EvidenceCheck::Sha256(want) if hex::encode(Sha256::digest(&bytes)) == want => Ok(bytes),
            // A log from before evidence was hashed: its (checked) entry names the frame.
            EvidenceCheck::Unhashed => Ok(bytes),
            EvidenceCheck::Sha256(_) => Err(EvidenceRefused::Altered),
            EvidenceCheck::EntryChanged => Err(EvidenceRefused::EntryChanged),
            EvidenceCheck::NotInTrail => Err(EvidenceRefused::NotInTrail),
        }
    }

    /// The bytes of the regular file at `file`, reached through no link (the path the
    /// folder's own resolves to, plus `file`'s parts, is where it is), within the size bound.
    fn read_frame(&self, file: &str) -> Result<Vec<u8>, EvidenceRefused> {
        use std::io::Read as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let gone = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::NotFound => EvidenceRefused::Missing,
            _ => unreadable(file, &e.to_string()),
        };
        let root = std::fs::canonicalize(&self.dir).map_err(gone)?;
        let real = std::fs::canonicalize(self.dir.join(file)).map_err(gone)?;
        if real != root.join(file) {
            return Err(unreadable(file, "it is reached through a link"));
        }
        let mut opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&real)
            .map_err(gone)?;
        let meta = opened.metadata().map_err(gone)?;
        if !meta.is_file() || meta.len() > self.max_frame_bytes {
            return Err(unreadable(
                file,
                &format!(
                    "not a regular file of at most {} bytes",
                    self.max_frame_bytes
                ),
            ));
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        (&mut opened)
            .take(self.max_frame_bytes + 1)
            .read_to_end(&mut bytes)
            .map_err(gone)?;
        if bytes.len() as u64 > self.max_frame_bytes {
            return Err(unreadable(file, "it grew past the size bound"));
        }
        Ok(bytes)
    }
}

/// A frame that cannot be served: the detail goes to the writer's log, not to the caller.
fn unreadable(file: &str, why: &str) -> EvidenceRefused {
    tracing::warn!(file, why, "an evidence frame could not be served");
    EvidenceRefused::Unreadable("the evidence frame could not be read".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditStore;
    use crate::audit::tests::{dir, event};
    use crate::policy::Action;

    #[test]
    fn a_trail_names_its_frames_and_a_frame_is_served_only_as_recorded() {
        let root = dir();
        let mut store = AuditStore::open(&root).unwrap();
        let (env, ev) = event(Action::LockScreen);
        assert!(store.store(&env, &ev).unwrap());
        let views = Views::new(root.clone(), None, 1 << 20);
        assert!(
            views.trail("bob").unwrap()["entries"]
                .as_array()
                .unwrap()
                .is_empty()
        );
        let trail = views.trail("alice").unwrap();
        assert_eq!(trail["client"], "alice");
        assert!(
            trail["verification"]
                .as_str()
                .unwrap()
                .starts_with("UNSIGNED CHECK: 1 entries"),
            "{trail}"
        );
        let action = &trail["entries"][0];
        assert_eq!(action["kind"], "action");
        assert_eq!(action["action_id"], ev.action_id.to_string());
        let file = action["evidence"][0]["file"].as_str().unwrap().to_owned();
        assert!(
            file.starts_with("evidence/") && file.ends_with(".jpg"),
            "{file}"
        );
        assert_eq!(views.evidence(&file).unwrap(), vec![0xFF, 0xD8, 0xFF, 0xD9]);

        // Anything but a frame below evidence/ is refused before the disk is read.
        std::fs::write(root.join("secret.jpg"), b"not evidence").unwrap();
        for path in [
            "audit.log",
            "secret.jpg",
            "/etc/passwd",
            "evidence/../secret.jpg",
            "evidence/2026-01-01/alice/x/../../../../secret.jpg",
            "evidence/%2e%2e/%2e%2e/clients/bob/reference.jpg",
            "evidence/2026-01-01/alice/x\\..\\..\\secret.jpg",
            "evidence//alice/x/frame.jpg",
            file.trim_end_matches(".jpg"),
        ] {
            assert_eq!(
                views.evidence(path),
                Err(EvidenceRefused::NotEvidence),
                "{path}"
            );
        }
        // Files no checked entry of that client names are not opened.
        let other = file.replacen("/alice/", "/bob/", 1);
        std::fs::create_dir_all(root.join(&other).parent().unwrap()).unwrap();
        std::fs::copy(root.join(&file), root.join(&other)).unwrap();
        assert_eq!(views.evidence(&other), Err(EvidenceRefused::NotInTrail));
        let beside = format!("{}/frame-0.jpg", file.rsplit_once('/').unwrap().0);
        std::fs::copy(root.join(&file), root.join(&beside)).unwrap();
        assert_eq!(views.evidence(&beside), Err(EvidenceRefused::NotInTrail));
        // One byte changed after it was written: refused, with 409.
        let original = std::fs::read(root.join(&file)).unwrap();
        std::fs::write(root.join(&file), [0xFF, 0xD8, 0x00, 0xD9]).unwrap();
        let altered = views.evidence(&file).unwrap_err();
        assert_eq!(
            (altered.clone(), altered.status()),
            (EvidenceRefused::Altered, 409)
        );
        // Put back through a link (to a copy with the right bytes): not served.
        let outside = root.join("copy.jpg");
        std::fs::write(&outside, &original).unwrap();
        std::fs::remove_file(root.join(&file)).unwrap();
        std::os::unix::fs::symlink(&outside, root.join(&file)).unwrap();
        let linked = views.evidence(&file).unwrap_err();
        assert_eq!(linked.status(), 500, "{linked:?}");
        // Too large for the bound, and gone.
        std::fs::remove_file(root.join(&file)).unwrap();
        std::fs::write(root.join(&file), &original).unwrap();
        let small = Views::new(root.clone(), None, 3);
        assert_eq!(small.evidence(&file).unwrap_err().status(), 500);
        assert_eq!(views.evidence(&file).unwrap(), original);
        std::fs::remove_file(root.join(&file)).unwrap();
        assert_eq!(views.evidence(&file), Err(EvidenceRefused::Missing));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_view_holds_the_newest_entries_within_its_bound() {
        let root = dir();
        let mut store = AuditStore::open(&root).unwrap();
        for _ in 0..5 {
            let (env, ev) = event(Action::Warn);
            assert!(store.store(&env, &ev).unwrap());
        }
        let counter = prometheus::IntCounter::new("cut", "cut").unwrap();
        let views = Views::new(root.clone(), None, 1 << 20).limit_entries(2, counter.clone());
        let trail = views.trail("alice").unwrap();
        assert_eq!(trail["total"], 5);
        assert_eq!(trail["entries"].as_array().unwrap().len(), 2);
        assert_eq!(counter.get(), 1);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn no_log_is_a_clear_error() {
        let views = Views::new(dir(), None, 1 << 20);
        let error = views.trail("alice").unwrap_err();
        assert!(error.contains("no audit log in"), "{error}");
    }
}
