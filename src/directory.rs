//! The client directory: who may connect, with which token, and in what status.
//!
//! [`ClientStore`] is the storage seam; [`FolderStore`] is the embedded default, one JSON file
//! per client in a folder, written atomically (temporary file, fsync, rename). Tokens are
//! stored as argon2id hashes, never in clear.

use std::path::{Path, PathBuf};

use crate::policy::SavedPolicy;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("client id `{0}` must be 1..=64 characters of [A-Za-z0-9_.-], not starting with '.'")]
    BadId(String),
    #[error("client `{0}` already exists")]
    Exists(String),
    #[error("client `{0}` not found")]
    NotFound(String),
    #[error("token must be at least 8 characters")]
    WeakToken,
    #[error("cannot hash the token: {0}")]
    Hash(String),
    #[error("client directory {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("client record {path} is corrupt: {source}")]
    Corrupt {
        path: String,
        source: serde_json::Error,
    },
}

/// Whether a client may stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientStatus {
    Active,
    Paused,
    Blocked,
}

/// One enrolled client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientRecord {
    pub id: String,
    pub display_name: String,
    /// The token's argon2id hash as a PHC string (`$argon2id$...`, salt included). Records
    /// made before argon2 hold the hex SHA-256 of `salt || token`, still verified.
    pub token_hash: String,
    /// Hex salt of a legacy SHA-256 hash; empty for argon2id.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token_salt: String,
    pub status: ClientStatus,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// The enrolled reference, once `vigil clients enroll` has run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<Reference>,
}

/// An enrolled reference photo and its embedding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reference {
    /// The embedding as base64 of little-endian `f32`s.
    pub embedding_b64: String,
    /// The photo, stored beside the record.
    pub photo_file: String,
    /// `name:version` of the recognition model that made the embedding.
    pub model: String,
    pub enrolled_at_ms: u64,
}

impl Reference {
    /// The embedding in its wire form (little-endian `f32` bytes).
    pub fn embedding_bytes(&self) -> Option<Vec<u8>> {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(&self.embedding_b64)
            .ok()
    }
}

impl ClientRecord {
    /// A new active client with `token` hashed by argon2id under a fresh salt.
    pub fn new(id: &str, display_name: &str, token: &str) -> Result<Self, DirectoryError> {
        check_client_id(id)?;
        if token.len() < 8 {
            return Err(DirectoryError::WeakToken);
        }
        let now = crate::wire::now_ms();
        Ok(Self {
            id: id.to_owned(),
            display_name: display_name.to_owned(),
            token_hash: hash_token(token)?,
            token_salt: String::new(),
            status: ClientStatus::Active,
            created_at_ms: now,
            updated_at_ms: now,
            reference: None,
        })
    }

    /// Check a presented token: argon2id (in [`verify_argon2`]), or the legacy salted
    /// SHA-256, compared in constant time.
    pub fn verify_token(&self, token: &str) -> bool {
        use subtle::ConstantTimeEq;
        if self.token_hash.starts_with("$argon2") {
            return verify_argon2(&self.token_hash, token);
        }
        let Ok(salt) = hex::decode(&self.token_salt) else {
            return false;
        };
        let mut h = Sha256::new();
        h.update(&salt);
        h.update(token.as_bytes());
        let presented = hex::encode(h.finalize());
        presented
            .as_bytes()
            .ct_eq(self.token_hash.as_bytes())
            .into()
    }
}

/// Most argon2 working memory one check may use, in KiB; a stored hash asking for more is
/// refused rather than allocated.
const MAX_ARGON2_KIB: u32 = 64 * 1024;

/// Argon2's working memory (19 MiB with the default parameters), kept for reuse: one buffer
/// per core, so that a burst of hellos costs `cores x 19 MiB` once, rather than an allocation
/// per check that the allocator may keep per thread. A check waits for a free buffer.
struct Argon2Memory {
    free: std::sync::Mutex<Vec<Vec<argon2::Block>>>,
    returned: std::sync::Condvar,
}

fn argon2_memory() -> &'static Argon2Memory {
    static MEMORY: std::sync::OnceLock<Argon2Memory> = std::sync::OnceLock::new();
    MEMORY.get_or_init(|| {
        let n = std::thread::available_parallelism().map_or(2, |n| n.get());
        Argon2Memory {
            free: std::sync::Mutex::new((0..n).map(|_| Vec::new()).collect()),
            returned: std::sync::Condvar::new(),
        }
    })
}

/// Verify `token` against an argon2 PHC string, in constant time, with pooled memory.
fn verify_argon2(phc: &str, token: &str) -> bool {
    use argon2::password_hash::PasswordHash;
    use subtle::ConstantTimeEq;
    let Ok(hash) = PasswordHash::new(phc) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (hash.salt, hash.hash) else {
        return false;
    };
    let (Ok(algorithm), Ok(params)) = (
        argon2::Algorithm::try_from(hash.algorithm),
        argon2::Params::try_from(&hash),
    ) else {
        return false;
    };
    if params.m_cost() > MAX_ARGON2_KIB {
        return false;
    }
    let version = hash
        .version
        .map_or(Ok(argon2::Version::default()), argon2::Version::try_from);
    let Ok(version) = version else {
        return false;
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let blocks = params.block_count();
    let argon = argon2::Argon2::new(algorithm, version, params);
    let pool = argon2_memory();
    let mut memory = {
        let mut free = pool.free.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(m) = free.pop() {
                break m;
            }
            free = pool.returned.wait(free).unwrap_or_else(|e| e.into_inner());
        }
    };
    if memory.len() < blocks {
        memory.resize(blocks, argon2::Block::default());
    }
    let mut out = vec![0u8; expected.len()];
    let ok = argon
        .hash_password_into_with_memory(token.as_bytes(), salt, &mut out, &mut memory[..blocks])
        .is_ok();
    pool.free
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(memory);
    pool.returned.notify_one();
    ok && bool::from(out.as_slice().ct_eq(expected.as_bytes()))
}

/// The argon2id hash of `token` (default parameters, a fresh 16-byte salt) as a PHC string.
fn hash_token(token: &str) -> Result<String, DirectoryError> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt_bytes: [u8; 16] = rand::random();
    let salt =
        SaltString::encode_b64(&salt_bytes).map_err(|e| DirectoryError::Hash(e.to_string()))?;
    argon2::Argon2::default()
        .hash_password(token.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| DirectoryError::Hash(e.to_string()))
}

/// A new client token: 256 random bits, URL-safe base64 (43 characters).
pub fn generate_token() -> String {
    use base64::Engine as _;
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Client ids become file names and log fields: keep them tame.
pub fn check_client_id(id: &str) -> Result<(), DirectoryError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(DirectoryError::BadId(id.to_owned()))
    }
}

/// Whether a client is connected, as the edges last reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Connection {
    /// Connected to an edge.
    Active,
    /// Enrolled but not connected (it closed, was closed, or never connected).
    Deactivated,
    /// Dropped without a close handshake.
    ConnectionError,
}

impl Connection {
    pub fn as_str(self) -> &'static str {
        match self {
            Connection::Active => "active",
            Connection::Deactivated => "deactivated",
            Connection::ConnectionError => "connection_error",
        }
    }
}

/// An edge's last word on a client's connection. Kept apart from the record, and written only
/// by edges, so that admin changes and presence never overwrite each other.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Presence {
    pub connection: Connection,
    pub edge: String,
    pub session: String,
    /// When the session started.
    pub since_ms: u64,
    pub updated_ms: u64,
    /// What the session saw lately, refreshed every few seconds while it is live, so that a
    /// console on any edge shows every edge's sessions.
    #[serde(default)]
    pub fps: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verdict: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_action: Option<String>,
}

/// Where client records live. Implementations must make each `put` atomic.
pub trait ClientStore: Send + Sync {
    fn get(&self, id: &str) -> Result<Option<ClientRecord>, DirectoryError>;
    fn put(&self, record: &ClientRecord) -> Result<(), DirectoryError>;
    fn remove(&self, id: &str) -> Result<(), DirectoryError>;
    fn list(&self) -> Result<Vec<ClientRecord>, DirectoryError>;
    fn presence(&self, id: &str) -> Result<Option<Presence>, DirectoryError>;
    fn set_presence(&self, id: &str, presence: &Presence) -> Result<(), DirectoryError>;
    /// The client's saved policy state (escalation, cooldowns, recent verdicts).
    fn policy(&self, id: &str) -> Result<Option<SavedPolicy>, DirectoryError>;
    fn put_policy(&self, id: &str, saved: &SavedPolicy) -> Result<(), DirectoryError>;
    /// The photo the client was enrolled from, when there is one.
    fn reference_photo(&self, id: &str) -> Result<Option<Vec<u8>>, DirectoryError>;
    /// Keep the photo a client is enrolled from; returns the name its reference records.
    fn put_reference_photo(&self, id: &str, jpeg: &[u8]) -> Result<String, DirectoryError>;

    /// Add a new client; refuses an id that exists.
    fn add(&self, record: &ClientRecord) -> Result<(), DirectoryError> {
        if self.get(&record.id)?.is_some() {
            return Err(DirectoryError::Exists(record.id.clone()));
        }
        self.put(record)
    }
}

/// One `<id>.json` per client in a folder.
#[derive(Debug, Clone)]
pub struct FolderStore {
    dir: PathBuf,
}

impl FolderStore {
    /// Open (and create) the folder.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, DirectoryError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| io(&dir, source))?;
        Ok(Self { dir })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }
}

fn io(path: &Path, source: std::io::Error) -> DirectoryError {
    DirectoryError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A JSON file, or `None` when it does not exist.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, DirectoryError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| DirectoryError::Corrupt {
                    path: path.display().to_string(),
                    source,
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path, e)),
    }
}

/// Write `bytes` to `path` atomically: a temporary file in the same folder, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.{:016x}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("record"),
        rand::random::<u64>()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

impl ClientStore for FolderStore {
    fn get(&self, id: &str) -> Result<Option<ClientRecord>, DirectoryError> {
        check_client_id(id)?;
        read_json(&self.path(id))
    }

    fn put(&self, record: &ClientRecord) -> Result<(), DirectoryError> {
        check_client_id(&record.id)?;
        let path = self.path(&record.id);
        let bytes = serde_json::to_vec_pretty(record).expect("client record encodes");
        write_atomic(&path, &bytes).map_err(|e| io(&path, e))
    }

    fn remove(&self, id: &str) -> Result<(), DirectoryError> {
        check_client_id(id)?;
        let path = self.path(id);
        let _ = std::fs::remove_file(self.dir.join(format!("{id}.presence")));
        let _ = std::fs::remove_file(self.dir.join(format!("{id}.policy")));
        let _ = std::fs::remove_file(self.dir.join(format!("{id}.reference.jpg")));
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(DirectoryError::NotFound(id.to_owned()))
            }
            Err(e) => Err(io(&path, e)),
        }
    }

    fn presence(&self, id: &str) -> Result<Option<Presence>, DirectoryError> {
        check_client_id(id)?;
        read_json(&self.dir.join(format!("{id}.presence")))
    }

    fn set_presence(&self, id: &str, presence: &Presence) -> Result<(), DirectoryError> {
        check_client_id(id)?;
        let path = self.dir.join(format!("{id}.presence"));
        let bytes = serde_json::to_vec_pretty(presence).expect("presence encodes");
        write_atomic(&path, &bytes).map_err(|e| io(&path, e))
    }

    fn policy(&self, id: &str) -> Result<Option<SavedPolicy>, DirectoryError> {
        check_client_id(id)?;
        read_json(&self.dir.join(format!("{id}.policy")))
    }

    fn put_policy(&self, id: &str, saved: &SavedPolicy) -> Result<(), DirectoryError> {
        check_client_id(id)?;
        let path = self.dir.join(format!("{id}.policy"));
        let bytes = serde_json::to_vec(saved).expect("policy state encodes");
        write_atomic(&path, &bytes).map_err(|e| io(&path, e))
    }

    fn put_reference_photo(&self, id: &str, jpeg: &[u8]) -> Result<String, DirectoryError> {
        check_client_id(id)?;
        let name = format!("{id}.reference.jpg");
        let path = self.dir.join(&name);
        write_atomic(&path, jpeg).map_err(|e| io(&path, e))?;
        Ok(name)
    }

    fn reference_photo(&self, id: &str) -> Result<Option<Vec<u8>>, DirectoryError> {
        let Some(reference) = self.get(id)?.and_then(|r| r.reference) else {
            return Ok(None);
        };
        // The record names the file: only a plain name inside this folder is read.
        let name = std::path::Path::new(&reference.photo_file);
        if name.components().count() != 1
            || !matches!(
                name.components().next(),
                Some(std::path::Component::Normal(_))
            )
        {
            return Ok(None);
        }
        let path = self.dir.join(name);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path, e)),
        }
    }

    fn list(&self) -> Result<Vec<ClientRecord>, DirectoryError> {
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&self.dir).map_err(|e| io(&self.dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io(&self.dir, e))?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if check_client_id(id).is_err() {
                continue;
            }
            if let Some(record) = self.get(id)? {
                out.push(record);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }
}

/// Why a hello was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// Unknown client or wrong token (deliberately not told apart).
    Unauthorized,
    Blocked,
}

/// Check a hello against the directory.
pub fn authenticate(
    store: &dyn ClientStore,
    client_id: &str,
    token: &str,
) -> Result<ClientRecord, AuthError> {
    let record = match store.get(client_id) {
        Ok(Some(r)) => r,
        Ok(None) | Err(DirectoryError::BadId(_)) => return Err(AuthError::Unauthorized),
        Err(e) => {
            tracing::error!(error = %e, "client directory unreadable");
            return Err(AuthError::Unauthorized);
        }
    };
    if !record.verify_token(token) {
        return Err(AuthError::Unauthorized);
    }
    if record.status == ClientStatus::Blocked {
        return Err(AuthError::Blocked);
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> FolderStore {
        FolderStore::open(std::env::temp_dir().join(format!("vigil-dir-{}", rand::random::<u64>())))
            .unwrap()
    }

    #[test]
    fn add_get_list_remove() {
        let s = store();
        let r = ClientRecord::new("alice", "Alice", "secret-token").unwrap();
        s.add(&r).unwrap();
        assert!(matches!(s.add(&r), Err(DirectoryError::Exists(_))));
        assert_eq!(s.get("alice").unwrap().unwrap(), r);
        assert_eq!(s.list().unwrap().len(), 1);
        // The token is not stored in clear.
        let raw = std::fs::read_to_string(s.path("alice")).unwrap();
        assert!(!raw.contains("secret-token"));
        s.remove("alice").unwrap();
        assert!(s.get("alice").unwrap().is_none());
    }

    #[test]
    fn authentication() {
        let s = store();
        let mut r = ClientRecord::new("bob", "", "correct-horse").unwrap();
        s.add(&r).unwrap();
        assert!(authenticate(&s, "bob", "correct-horse").is_ok());
        assert_eq!(
            authenticate(&s, "bob", "wrong-horse").unwrap_err(),
            AuthError::Unauthorized
        );
        assert_eq!(
            authenticate(&s, "nobody", "x").unwrap_err(),
            AuthError::Unauthorized
        );
        assert_eq!(
            authenticate(&s, "../etc/passwd", "x").unwrap_err(),
            AuthError::Unauthorized
        );
        r.status = ClientStatus::Blocked;
        s.put(&r).unwrap();
        assert_eq!(
            authenticate(&s, "bob", "correct-horse").unwrap_err(),
            AuthError::Blocked
        );
    }

    #[test]
    fn tokens_are_argon2id_and_legacy_hashes_still_verify() {
        let r = ClientRecord::new("carol", "", "correct-horse").unwrap();
        assert!(r.token_hash.starts_with("$argon2id$"), "{}", r.token_hash);
        assert!(r.token_salt.is_empty());
        assert!(r.verify_token("correct-horse") && !r.verify_token("correct-horsf"));
        // Two records of one token never share a hash (fresh salts).
        let again = ClientRecord::new("carol", "", "correct-horse").unwrap();
        assert_ne!(r.token_hash, again.token_hash);
        // A record written before argon2: hex SHA-256 of salt || token.
        let mut legacy = r.clone();
        legacy.token_salt = "00112233445566778899aabbccddeeff".into();
        let mut h = Sha256::new();
        h.update(hex::decode(&legacy.token_salt).unwrap());
        h.update(b"old-token-123");
        legacy.token_hash = hex::encode(h.finalize());
        assert!(legacy.verify_token("old-token-123") && !legacy.verify_token("old-token-124"));
        // Generated tokens: 256 bits, URL-safe, never the same twice.
        let (a, b) = (generate_token(), generate_token());
        assert_eq!(a.len(), 43);
        assert!(
            a != b
                && a.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
    }

    #[test]
    fn bad_ids_and_tokens() {
        for id in ["", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(ClientRecord::new(id, "", "long-enough").is_err(), "{id:?}");
        }
        assert!(matches!(
            ClientRecord::new("ok", "", "short"),
            Err(DirectoryError::WeakToken)
        ));
    }
}
