//! Named admin tokens: one per operator, so that every admin operation says who made it, and
//! each with a role ([`Role`]) that bounds what it may do.
//!
//! The file (`VIGIL_ADMIN_TOKENS_FILE`, written by `vigil operators add`) is a JSON array of
//! `{"name","role","sha256","created_at_ms"}`; an entry written before roles existed has none
//! and is an `admin`, as it was. A token is 256 random bits, shown once; only its
//! SHA-256 is kept. A slow password hash would add nothing for a secret that cannot be guessed,
//! and would let every unauthenticated request burn CPU. Presented tokens are compared in
//! constant time against every entry.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("operators file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("operators file {path} is not a JSON list of operators: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{0}")]
    Name(String),
    #[error("operator `{0}` exists already (remove it first to issue a new token)")]
    Exists(String),
    #[error("no operator `{0}`")]
    NotFound(String),
}

/// What an operator may do. Each role may do what the ones before it may.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads the client list, the sessions and the audit trail; sees no biometric data and
    /// changes nothing.
    Viewer,
    /// A viewer who also sees reference photos and evidence frames (each read audited), and
    /// acts on candidates: pause, resume, block, unblock, kick, challenge, re-admit, forced
    /// actions, session tokens.
    Proctor,
    /// A proctor who also adds, removes and enrols clients. Entries without a role, and the
    /// shared `VIGIL_ADMIN_TOKEN`, are admins.
    #[default]
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Proctor => "proctor",
            Role::Admin => "admin",
        }
    }
}

/// One operator as the file keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct OperatorEntry {
    pub name: String,
    #[serde(default)]
    pub role: Role,
    /// SHA-256 (hex) of the token.
    pub sha256: String,
    pub created_at_ms: u64,
}

/// The operators an admin API accepts.
#[derive(Debug, Clone, Default)]
pub(crate) struct Operators {
    entries: Vec<(String, Role, [u8; 32])>,
}

/// The name the shared `VIGIL_ADMIN_TOKEN` is known by.
pub(crate) const SHARED_TOKEN_OPERATOR: &str = "admin";

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Operators {
    /// The operators of `file` (none when it is missing), plus `shared_token` as
    /// [`SHARED_TOKEN_OPERATOR`] when set.
    pub(crate) fn load(
        file: Option<&Path>,
        shared_token: Option<&str>,
    ) -> Result<Self, OperatorError> {
        let mut entries = Vec::new();
        if let Some(path) = file {
            for e in read(path)? {
                let mut hash = [0u8; 32];
                if hex::decode_to_slice(&e.sha256, &mut hash).is_err() {
                    return Err(OperatorError::Name(format!(
                        "operator `{}` in {} has no valid sha256",
                        e.name,
                        path.display()
                    )));
                }
                entries.push((e.name, e.role, hash));
            }
        }
        if let Some(token) = shared_token {
            entries.push((SHARED_TOKEN_OPERATOR.to_owned(), Role::Admin, digest(token)));
        }
        Ok(Self { entries })
    }

    /// The operator whose token `presented` is, if any. Every entry is compared, in constant
    /// time, whatever matches.
    pub(crate) fn identify(&self, presented: &str) -> Option<(&str, Role)> {
        use subtle::ConstantTimeEq;
        let hash = digest(presented);
        let mut found = None;
        for (name, role, want) in &self.entries {
            if bool::from(hash.ct_eq(want)) {
                found = Some((name.as_str(), *role));
            }
        }
        found
    }
}

/// The entries of an operators file (empty when it does not exist).
pub(crate) fn read(path: &Path) -> Result<Vec<OperatorEntry>, OperatorError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| OperatorError::Parse {
            path: path.to_owned(),
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(OperatorError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(feature = "tools")] // `vigil operators add|remove`
fn write(path: &Path, entries: &[OperatorEntry]) -> Result<(), OperatorError> {
    let bytes = serde_json::to_vec_pretty(entries).expect("operators encode");
    crate::directory::write_atomic(path, &bytes).map_err(|source| OperatorError::Io {
        path: path.to_owned(),
        source,
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    Ok(())
}

#[cfg(feature = "tools")] // `vigil operators add|remove`
/// Add operator `name` with a fresh token; returns the token (shown once).
pub(crate) fn add(path: &Path, name: &str, role: Role) -> Result<String, OperatorError> {
    crate::topology::check_identifier("operator name", name).map_err(OperatorError::Name)?;
    if name == SHARED_TOKEN_OPERATOR {
        return Err(OperatorError::Name(format!(
            "`{SHARED_TOKEN_OPERATOR}` names the shared VIGIL_ADMIN_TOKEN; choose another name"
        )));
    }
    let mut entries = read(path)?;
    if entries.iter().any(|e| e.name == name) {
        return Err(OperatorError::Exists(name.to_owned()));
    }
    let token = crate::directory::generate_token();
    entries.push(OperatorEntry {
        name: name.to_owned(),
        role,
        sha256: hex::encode(digest(&token)),
        created_at_ms: crate::wire::now_ms(),
    });
    write(path, &entries)?;
    Ok(token)
}

#[cfg(feature = "tools")] // `vigil operators add|remove`
/// Remove operator `name`: its token stops working at the next request.
pub(crate) fn remove(path: &Path, name: &str) -> Result<(), OperatorError> {
    let mut entries = read(path)?;
    let before = entries.len();
    entries.retain(|e| e.name != name);
    if entries.len() == before {
        return Err(OperatorError::NotFound(name.to_owned()));
    }
    write(path, &entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_name_their_operator_and_removed_ones_stop_working() {
        let path = std::env::temp_dir().join(format!("vigil-ops-{}.json", rand::random::<u64>()));
        let alice = add(&path, "alice", Role::Admin).unwrap();
        let bob = add(&path, "bob", Role::Viewer).unwrap();
        assert!(matches!(
            add(&path, "alice", Role::Admin),
            Err(OperatorError::Exists(_))
        ));
        assert!(add(&path, "../evil", Role::Admin).is_err());
        assert!(add(&path, SHARED_TOKEN_OPERATOR, Role::Admin).is_err());
        let ops = Operators::load(Some(&path), Some("a-shared-token-of-16+")).unwrap();
        assert_eq!(ops.identify(&alice), Some(("alice", Role::Admin)));
        assert_eq!(ops.identify(&bob), Some(("bob", Role::Viewer)));
        assert_eq!(
            ops.identify("a-shared-token-of-16+"),
            Some(("admin", Role::Admin))
        );
        assert_eq!(ops.identify("guess"), None);
        assert_eq!(ops.identify(""), None);
        // Only hashes are on disk.
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&alice));
        remove(&path, "alice").unwrap();
        let ops = Operators::load(Some(&path), None).unwrap();
        assert_eq!(ops.identify(&alice), None);
        assert_eq!(ops.identify(&bob), Some(("bob", Role::Viewer)));
        // An entry written before roles is an admin, as it was.
        let old: Vec<OperatorEntry> =
            serde_json::from_str(r#"[{"name":"carol","sha256":"00","created_at_ms":1}]"#).unwrap();
        assert_eq!(old[0].role, Role::Admin);
        assert!(Role::Viewer < Role::Proctor && Role::Proctor < Role::Admin);
        assert!(matches!(
            remove(&path, "alice"),
            Err(OperatorError::NotFound(_))
        ));
        let _ = std::fs::remove_file(&path);
    }
}
