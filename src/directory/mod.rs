//! The client directory: who may connect, with which token, and in what status.
//!
//! [`ClientStore`] is the storage seam, with two backends:
//! - [`FolderStore`], the embedded default for one machine: one JSON file per client in a
//!   folder, written atomically (temporary file, fsync, rename), read-modify-writes serialized
//!   by a file lock;
//! - [`PgStore`], for a cluster: PostgreSQL, selected by `VIGIL_DIRECTORY_URL=postgres://...`,
//!   with its schema migrated at start-up and every read-modify-write in one transaction.
//!
//! Tokens are stored as argon2id hashes, never in clear. Presence (which edge holds a client)
//! is kept apart from the record and is only as good as its edge's lease: see [`live_presence`].

mod folder;
mod pg;

use std::sync::Arc;

pub use folder::FolderStore;
pub(crate) use folder::{private_dir, write_atomic};
pub use pg::PgStore;

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
    #[error("edge id `{0}` must be 1..=128 characters of [A-Za-z0-9_.-], not starting with '.'")]
    BadEdgeId(String),
    #[error("the client directory is busy: {0}")]
    Busy(String),
    #[error("client directory database: {0}")]
    Database(String),
    #[error("client directory URL: {0}")]
    Url(String),
    #[error("import: {0}")]
    Import(String),
}

/// Whether a client may stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ClientStatus {
    Active,
    Paused,
    Blocked,
    /// The policy signed the client out: no session until an operator re-admits it.
    SignedOut,
}

impl ClientStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientStatus::Active => "active",
            ClientStatus::Paused => "paused",
            ClientStatus::Blocked => "blocked",
            ClientStatus::SignedOut => "signed_out",
        }
    }
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
    /// Bumped by every [`ClientStore::update`]: two updates never see the same revision.
    #[serde(default)]
    pub revision: u64,
    /// The enrolled reference, once `vigil clients enroll` has run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<Reference>,
    /// Session tokens issued before this (Unix ms) are refused: set when the client is blocked
    /// or signed out, so that unblocking or re-admitting it does not bring back the tokens
    /// handed out before.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub sessions_not_before_ms: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
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
            revision: 0,
            reference: None,
            sessions_not_before_ms: 0,
        })
    }

    /// What binds a session token to this client's permanent token: a digest of the token's
    /// stored hash (never the token itself), so rotating the permanent token revokes every
    /// session token minted before.
    pub fn session_binding(&self) -> String {
        use sha2::Digest as _;
        let digest =
            sha2::Sha256::digest(format!("vigil-session-binding\n{}", self.token_hash).as_bytes());
        hex::encode(&digest[..16])
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
/// Most argon2 passes (`t`) and lanes (`p`) a stored hash may ask for: more is refused, on
/// import and at every check, so a planted hash cannot make each hello cost seconds.
const MAX_ARGON2_PASSES: u32 = 10;
const MAX_ARGON2_LANES: u32 = 8;

/// Whether a stored token hash asks for argon2 work within the caps (legacy SHA-256 hashes ask
/// for none).
pub fn token_hash_within_limits(phc: &str) -> Result<(), String> {
    if !phc.starts_with("$argon2") {
        return Ok(());
    }
    let hash = argon2::password_hash::PasswordHash::new(phc)
        .map_err(|e| format!("not an argon2 hash: {e}"))?;
    let params = argon2::Params::try_from(&hash).map_err(|e| format!("argon2 parameters: {e}"))?;
    if params.m_cost() > MAX_ARGON2_KIB
        || params.t_cost() > MAX_ARGON2_PASSES
        || params.p_cost() > MAX_ARGON2_LANES
    {
        return Err(format!(
            "argon2 m={} t={} p={} is over the limits m={MAX_ARGON2_KIB} t={MAX_ARGON2_PASSES} \
             p={MAX_ARGON2_LANES}",
            params.m_cost(),
            params.t_cost(),
            params.p_cost()
        ));
    }
    Ok(())
}

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
/// A hash of a random token, made as a client's is, for unknown ids to be checked against.
fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| {
        ClientRecord::new("decoy", "", &generate_token())
            .map(|r| r.token_hash)
            .unwrap_or_default()
    })
}

#[cfg(test)]
thread_local! {
    /// Argon2 checks run on this thread, for tests.
    static CHECKS_HERE: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn verify_argon2(phc: &str, token: &str) -> bool {
    #[cfg(test)]
    CHECKS_HERE.with(|c| c.set(c.get() + 1));
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
    if params.m_cost() > MAX_ARGON2_KIB
        || params.t_cost() > MAX_ARGON2_PASSES
        || params.p_cost() > MAX_ARGON2_LANES
    {
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
    if is_tame(id, 64) {
        Ok(())
    } else {
        Err(DirectoryError::BadId(id.to_owned()))
    }
}

/// 1..=`max` characters of `[A-Za-z0-9_.-]`, not starting with `.`: safe as a file name.
fn is_tame(id: &str, max: usize) -> bool {
    !id.is_empty()
        && id.len() <= max
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// What every `update` does after its change: the id kept, the revision bumped, the time set.
fn stamp_update(record: &mut ClientRecord, id: &str) {
    record.id = id.to_owned();
    record.revision += 1;
    record.updated_at_ms = crate::wire::now_ms();
}

/// Whether a client is connected, as the edges last reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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

/// Where client records live. Every write is atomic; [`ClientStore::add`] and
/// [`ClientStore::update`] are atomic read-modify-writes, so concurrent operators (or an
/// enrolment racing a block) never lose each other's changes.
///
/// Calls block: call them from a blocking context (`spawn_blocking`, a plain thread), not
/// from an async task.
pub trait ClientStore: Send + Sync {
    fn get(&self, id: &str) -> Result<Option<ClientRecord>, DirectoryError>;
    /// Write a whole record, replacing any (used by import; admin paths use `update`).
    fn put(&self, record: &ClientRecord) -> Result<(), DirectoryError>;
    /// Add a new client; refuses an id that exists, atomically.
    fn add(&self, record: &ClientRecord) -> Result<(), DirectoryError>;
    /// Change a client in one atomic step: `change` sees the current record, and what it
    /// leaves is saved with `revision` bumped and `updated_at_ms` set. Returns the saved record.
    fn update(
        &self,
        id: &str,
        change: &mut (dyn FnMut(&mut ClientRecord) + Send),
    ) -> Result<ClientRecord, DirectoryError>;
    /// Remove a client with its presence, policy state and reference photo.
    fn remove(&self, id: &str) -> Result<(), DirectoryError>;
    fn list(&self) -> Result<Vec<ClientRecord>, DirectoryError>;
    /// The console's page: up to `limit` clients after `after` in id order, of `status` when
    /// given, and how many there are of that status in all. PostgreSQL reads it in two small
    /// queries on the presence reads' own pool, so a console polling every second never takes
    /// the connections that hellos need.
    fn page(
        &self,
        after: Option<&str>,
        limit: usize,
        status: Option<ClientStatus>,
    ) -> Result<(Vec<ClientRecord>, usize), DirectoryError> {
        let mut records = self.list()?;
        records.retain(|r| status.is_none_or(|s| r.status == s));
        records.sort_by(|a, b| a.id.cmp(&b.id));
        let total = records.len();
        let start = after.map_or(0, |a| records.partition_point(|r| r.id.as_str() <= a));
        let page = records
            .into_iter()
            .skip(start)
            .take(limit)
            .collect::<Vec<_>>();
        Ok((page, total))
    }
    /// The edge's last word on the client, as written (see [`live_presence`]).
    fn presence(&self, id: &str) -> Result<Option<Presence>, DirectoryError>;
    fn set_presence(&self, id: &str, presence: &Presence) -> Result<(), DirectoryError>;
    /// The client's saved policy state (escalation, cooldowns, recent verdicts).
    fn policy(&self, id: &str) -> Result<Option<SavedPolicy>, DirectoryError>;
    fn put_policy(&self, id: &str, saved: &SavedPolicy) -> Result<(), DirectoryError>;
    /// The photo the client was enrolled from, when there is one.
    fn reference_photo(&self, id: &str) -> Result<Option<Vec<u8>>, DirectoryError>;
    /// Keep the photo a client is enrolled from; returns the name its reference records.
    fn put_reference_photo(&self, id: &str, jpeg: &[u8]) -> Result<String, DirectoryError>;
    /// Extend `edge`'s lease until `until_ms` (Unix ms). An edge renews it while it lives.
    fn renew_lease(&self, edge: &str, until_ms: u64) -> Result<(), DirectoryError>;
    /// Until when `edge`'s lease runs, if it ever took one.
    fn lease(&self, edge: &str) -> Result<Option<u64>, DirectoryError>;
    /// The presence of each of `ids` that has one, as it stands at `now_ms` (see
    /// [`live_presence`]): one read where the store can (the console asks every second).
    fn live_presences(
        &self,
        ids: &[String],
        now_ms: u64,
    ) -> Result<std::collections::HashMap<String, Presence>, DirectoryError> {
        let mut out = std::collections::HashMap::new();
        for id in ids {
            let Some(mut presence) = self.presence(id)? else {
                continue;
            };
            if presence.connection == Connection::Active
                && self
                    .lease(&presence.edge)?
                    .is_none_or(|until| until < now_ms)
            {
                presence.connection = Connection::ConnectionError;
            }
            out.insert(id.clone(), presence);
        }
        Ok(out)
    }
}

/// A client's presence as it stands at `now_ms`: an `active` presence whose edge's lease has
/// run out (the edge died, or lost the directory) reads as `connection_error`, so a dead edge's
/// clients are released within one lease.
pub fn live_presence(
    store: &dyn ClientStore,
    id: &str,
    now_ms: u64,
) -> Result<Option<Presence>, DirectoryError> {
    let Some(mut presence) = store.presence(id)? else {
        return Ok(None);
    };
    if presence.connection == Connection::Active {
        let lease = store.lease(&presence.edge)?;
        if lease.is_none_or(|until| until < now_ms) {
            presence.connection = Connection::ConnectionError;
        }
    }
    Ok(Some(presence))
}

/// Edge ids name lease files and rows: keep them tame (a hostname plus a suffix fits).
pub fn check_edge_id(id: &str) -> Result<(), DirectoryError> {
    if is_tame(id, 128) {
        Ok(())
    } else {
        Err(DirectoryError::BadEdgeId(id.to_owned()))
    }
}

/// Where the directory lives: a folder, or a PostgreSQL URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Folder(std::path::PathBuf),
    Postgres(String),
}

impl Location {
    /// `VIGIL_DIRECTORY_URL` when set (`postgres://` or `postgresql://`), else the folder.
    pub fn of(url: Option<&str>, folder: &std::path::Path) -> Result<Self, DirectoryError> {
        match url.filter(|u| !u.is_empty()) {
            None => Ok(Location::Folder(folder.to_path_buf())),
            Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
                Ok(Location::Postgres(u.to_owned()))
            }
            Some(u) if u.starts_with("file://") => {
                Ok(Location::Folder(u["file://".len()..].into()))
            }
            Some(_) => Err(DirectoryError::Url(
                "expected postgres://..., postgresql://... or file://FOLDER".into(),
            )),
        }
    }
}

/// Open the directory at `location`. A PostgreSQL directory is migrated first.
pub fn open(
    location: &Location,
    limits: &PgLimits,
) -> Result<Arc<dyn ClientStore>, DirectoryError> {
    Ok(match location {
        Location::Folder(dir) => Arc::new(FolderStore::open(dir)?),
        Location::Postgres(url) => Arc::new(PgStore::connect(url, limits)?),
    })
}

/// Bounds on a PostgreSQL directory's connections and statements.
#[derive(Debug, Clone, PartialEq)]
pub struct PgLimits {
    /// Most connections one process holds [VIGIL_DIRECTORY_POOL].
    pub pool: u32,
    /// Longest wait for a connection, new or pooled.
    pub connect_timeout: std::time::Duration,
    /// Longest any statement may run (PostgreSQL `statement_timeout`), and longest a
    /// transaction may wait for a row lock (`lock_timeout`).
    pub statement_timeout: std::time::Duration,
}

impl Default for PgLimits {
    fn default() -> Self {
        Self {
            pool: 8,
            connect_timeout: std::time::Duration::from_secs(5),
            statement_timeout: std::time::Duration::from_secs(5),
        }
    }
}

/// One client as `vigil directory export` writes it: a JSON line with the record, the
/// reference photo and the policy state (presence is live state and is not moved).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exported {
    pub record: ClientRecord,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_jpeg_b64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<SavedPolicy>,
}

/// Write every client of `store` to `out` as JSON lines; returns how many.
pub fn export(
    store: &dyn ClientStore,
    out: &mut dyn std::io::Write,
) -> Result<usize, DirectoryError> {
    use base64::Engine as _;
    let records = store.list()?;
    for record in &records {
        let line = Exported {
            reference_jpeg_b64: store
                .reference_photo(&record.id)?
                .map(|jpeg| base64::engine::general_purpose::STANDARD.encode(jpeg)),
            policy: store.policy(&record.id)?,
            record: record.clone(),
        };
        let mut bytes = serde_json::to_vec(&line).expect("an exported client encodes");
        bytes.push(b'\n');
        out.write_all(&bytes).map_err(|source| DirectoryError::Io {
            path: "export".into(),
            source,
        })?;
    }
    Ok(records.len())
}

/// What an import did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Imported {
    pub added: usize,
    /// Clients that existed and were replaced (with `replace`).
    pub replaced: usize,
    /// Clients that existed and were left as they are.
    pub kept: usize,
}

/// An import whose every client was checked ([`check_import`]): the only thing [`import`]
/// takes, so nothing is imported unchecked.
#[derive(Debug, Clone)]
pub struct CheckedImport {
    clients: Vec<Exported>,
    /// Each client's reference photo, decoded, in order.
    photos: Vec<Option<Vec<u8>>>,
}

impl CheckedImport {
    /// Each client, with its reference photo's bytes.
    pub fn clients(&self) -> impl Iterator<Item = (&Exported, Option<&[u8]>)> {
        self.clients
            .iter()
            .zip(self.photos.iter().map(Option::as_deref))
    }
}

/// Check a whole import before any of it is audited or made: every id valid and given once,
/// every token hash within the limits, every reference photo decodable.
pub fn check_import(clients: Vec<Exported>) -> Result<CheckedImport, DirectoryError> {
    use base64::Engine as _;
    let mut seen = std::collections::HashSet::new();
    let photos = clients
        .iter()
        .map(|client| {
            let id = &client.record.id;
            check_client_id(id)?;
            if !seen.insert(id.as_str()) {
                return Err(DirectoryError::Import(format!(
                    "client `{id}` is in the import twice"
                )));
            }
            token_hash_within_limits(&client.record.token_hash)
                .map_err(|e| DirectoryError::Import(format!("client `{id}`: token hash: {e}")))?;
            client
                .reference_jpeg_b64
                .as_deref()
                .map(|b64| {
                    base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .map_err(|e| {
                            DirectoryError::Import(format!("client `{id}`: reference photo: {e}"))
                        })
                })
                .transpose()
        })
        .collect::<Result<_, _>>()?;
    Ok(CheckedImport { clients, photos })
}

/// Import checked clients into `store`: existing ids are kept unless `replace`.
pub fn import(
    store: &dyn ClientStore,
    checked: &CheckedImport,
    replace: bool,
) -> Result<Imported, DirectoryError> {
    let mut done = Imported::default();
    for (client, jpeg) in checked.clients() {
        let id = &client.record.id;
        match store.add(&client.record) {
            Ok(()) => done.added += 1,
            Err(DirectoryError::Exists(_)) if replace => {
                store.put(&client.record)?;
                done.replaced += 1;
            }
            Err(DirectoryError::Exists(_)) => {
                done.kept += 1;
                continue;
            }
            Err(e) => return Err(e),
        }
        if let Some(jpeg) = jpeg {
            let name = store.put_reference_photo(id, jpeg)?;
            if client
                .record
                .reference
                .as_ref()
                .is_some_and(|r| r.photo_file != name)
            {
                store.update(id, &mut |r| {
                    if let Some(reference) = r.reference.as_mut() {
                        reference.photo_file = name.clone();
                    }
                })?;
            }
        }
        if let Some(policy) = &client.policy {
            store.put_policy(id, policy)?;
        }
    }
    Ok(done)
}

/// Why a hello was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// Unknown client or wrong token (deliberately not told apart).
    Unauthorized,
    Blocked,
    /// Signed out by the policy, not yet re-admitted.
    SignedOut,
    /// The directory could not be read: no fault of the client's, so not a failed hello.
    Unavailable,
}

/// What a hello presents.
#[derive(Clone)]
pub enum Credential {
    /// The client's permanent token.
    Token(String),
    /// A session token already verified by its signature: its binding to the client's
    /// permanent token ([`ClientRecord::session_binding`]) and when it was issued (Unix ms).
    Session { binding: String, issued_at_ms: u64 },
}

impl std::fmt::Debug for Credential {
    // Never a token in a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Token(_) => f.write_str("Token(..)"),
            Credential::Session { .. } => f.write_str("Session(..)"),
        }
    }
}

/// Check a hello against the directory.
pub fn authenticate(
    store: &dyn ClientStore,
    client_id: &str,
    credential: &Credential,
) -> Result<ClientRecord, AuthError> {
    let record = match store.get(client_id) {
        Ok(Some(r)) => r,
        Ok(None) | Err(DirectoryError::BadId(_)) => {
            // An unknown id costs the argon2 check a known one does, so that how long the
            // refusal takes does not tell which ids exist.
            if let Credential::Token(token) = credential {
                let _ = verify_argon2(decoy_hash(), token);
            }
            return Err(AuthError::Unauthorized);
        }
        Err(e) => {
            tracing::error!(error = %e, "client directory unreadable");
            return Err(AuthError::Unavailable);
        }
    };
    let genuine = match credential {
        Credential::Token(token) => record.verify_token(token),
        Credential::Session {
            binding,
            issued_at_ms,
        } => {
            use subtle::ConstantTimeEq as _;
            bool::from(
                record
                    .session_binding()
                    .as_bytes()
                    .ct_eq(binding.as_bytes()),
            ) && *issued_at_ms >= record.sessions_not_before_ms
        }
    };
    if !genuine {
        return Err(AuthError::Unauthorized);
    }
    match record.status {
        ClientStatus::Blocked => return Err(AuthError::Blocked),
        ClientStatus::SignedOut => return Err(AuthError::SignedOut),
        ClientStatus::Active | ClientStatus::Paused => {}
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory that cannot be read (a database down, a disk gone).
    struct Down;

    fn down<T>() -> Result<T, DirectoryError> {
        Err(DirectoryError::Busy("down".into()))
    }

    impl ClientStore for Down {
        fn get(&self, _: &str) -> Result<Option<ClientRecord>, DirectoryError> {
            down()
        }
        fn put(&self, _: &ClientRecord) -> Result<(), DirectoryError> {
            down()
        }
        fn add(&self, _: &ClientRecord) -> Result<(), DirectoryError> {
            down()
        }
        fn update(
            &self,
            _: &str,
            _: &mut (dyn FnMut(&mut ClientRecord) + Send),
        ) -> Result<ClientRecord, DirectoryError> {
            down()
        }
        fn remove(&self, _: &str) -> Result<(), DirectoryError> {
            down()
        }
        fn list(&self) -> Result<Vec<ClientRecord>, DirectoryError> {
            down()
        }
        fn presence(&self, _: &str) -> Result<Option<Presence>, DirectoryError> {
            down()
        }
        fn set_presence(&self, _: &str, _: &Presence) -> Result<(), DirectoryError> {
            down()
        }
        fn policy(&self, _: &str) -> Result<Option<SavedPolicy>, DirectoryError> {
            down()
        }
        fn put_policy(&self, _: &str, _: &SavedPolicy) -> Result<(), DirectoryError> {
            down()
        }
        fn reference_photo(&self, _: &str) -> Result<Option<Vec<u8>>, DirectoryError> {
            down()
        }
        fn put_reference_photo(&self, _: &str, _: &[u8]) -> Result<String, DirectoryError> {
            down()
        }
        fn renew_lease(&self, _: &str, _: u64) -> Result<(), DirectoryError> {
            down()
        }
        fn lease(&self, _: &str) -> Result<Option<u64>, DirectoryError> {
            down()
        }
    }

    #[test]
    fn a_directory_that_cannot_be_read_is_not_the_clients_fault() {
        let refused = authenticate(&Down, "c1", &Credential::Token("a-token-123".into()));
        assert!(
            matches!(refused, Err(AuthError::Unavailable)),
            "{refused:?}"
        );
    }

    #[test]
    fn an_unknown_id_costs_the_same_argon2_check_as_a_known_one() {
        let s = store();
        s.add(&ClientRecord::new("known", "", "right-token-123").unwrap())
            .unwrap();
        let checks = || CHECKS_HERE.with(std::cell::Cell::get);
        let before = checks();
        let wrong = authenticate(&s, "known", &Credential::Token("wrong-token-1".into()));
        assert!(matches!(wrong, Err(AuthError::Unauthorized)));
        assert_eq!(checks(), before + 1);
        let unknown = authenticate(&s, "nobody", &Credential::Token("wrong-token-1".into()));
        assert!(matches!(unknown, Err(AuthError::Unauthorized)));
        assert_eq!(
            checks(),
            before + 2,
            "the unknown id was checked against a decoy"
        );
    }

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
        assert!(authenticate(&s, "bob", &Credential::Token("correct-horse".into())).is_ok());
        assert_eq!(
            authenticate(&s, "bob", &Credential::Token("wrong-horse".into())).unwrap_err(),
            AuthError::Unauthorized
        );
        assert_eq!(
            authenticate(&s, "nobody", &Credential::Token("x".into())).unwrap_err(),
            AuthError::Unauthorized
        );
        assert_eq!(
            authenticate(&s, "../etc/passwd", &Credential::Token("x".into())).unwrap_err(),
            AuthError::Unauthorized
        );
        r.status = ClientStatus::Blocked;
        s.put(&r).unwrap();
        assert_eq!(
            authenticate(&s, "bob", &Credential::Token("correct-horse".into())).unwrap_err(),
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
    fn stored_hashes_asking_for_too_much_work_are_refused_on_import_and_at_checks() {
        use argon2::password_hash::{PasswordHasher as _, SaltString};
        let heavy = |t: u32, p: u32| {
            let params = argon2::Params::new(8 * p, t, p, None).unwrap();
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
                .hash_password(
                    b"correct-horse",
                    &SaltString::generate(&mut argon2::password_hash::rand_core::OsRng),
                )
                .unwrap()
                .to_string()
        };
        let mut r = ClientRecord::new("erin", "", "correct-horse").unwrap();
        assert!(token_hash_within_limits(&r.token_hash).is_ok());
        for (t, p) in [(MAX_ARGON2_PASSES + 1, 1), (1, MAX_ARGON2_LANES + 1)] {
            r.token_hash = heavy(t, p);
            assert!(!r.verify_token("correct-horse"), "t={t} p={p} was checked");
            assert!(token_hash_within_limits(&r.token_hash).is_err());
            let s = store();
            let refused = check_import(vec![Exported {
                record: r.clone(),
                reference_jpeg_b64: None,
                policy: None,
            }])
            .and_then(|checked| import(&s, &checked, true));
            assert!(
                matches!(refused, Err(DirectoryError::Import(ref m)) if m.contains("over the limits")),
                "{refused:?}"
            );
            assert!(s.get("erin").unwrap().is_none());
        }
        r.token_hash = heavy(2, 1);
        assert!(r.verify_token("correct-horse"));
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

    #[test]
    fn updates_are_atomic_and_each_bumps_the_revision() {
        let s = store();
        s.add(&ClientRecord::new("dora", "", "correct-horse").unwrap())
            .unwrap();
        // Eight threads, 25 changes each, each setting a different field than a racing
        // enrolment would: none is lost.
        std::thread::scope(|scope| {
            for t in 0..8 {
                let s = &s;
                scope.spawn(move || {
                    for i in 0..25 {
                        let status = if (t + i) % 2 == 0 {
                            ClientStatus::Paused
                        } else {
                            ClientStatus::Active
                        };
                        s.update("dora", &mut |r| r.status = status).unwrap();
                    }
                });
            }
        });
        assert_eq!(s.get("dora").unwrap().unwrap().revision, 200);
        // A change keeps what it does not touch.
        let blocked = s
            .update("dora", &mut |r| r.status = ClientStatus::Blocked)
            .unwrap();
        let enrolled = s
            .update("dora", &mut |r| r.display_name = "Dora".into())
            .unwrap();
        assert_eq!(enrolled.status, ClientStatus::Blocked);
        assert_eq!(enrolled.revision, blocked.revision + 1);
        assert!(matches!(
            s.update("nobody", &mut |_| {}),
            Err(DirectoryError::NotFound(_))
        ));
    }

    #[test]
    fn presence_counts_only_while_its_edges_lease_runs() {
        let s = store();
        s.add(&ClientRecord::new("erin", "", "correct-horse").unwrap())
            .unwrap();
        let presence = Presence {
            connection: Connection::Active,
            edge: "host-a-1234".into(),
            session: "s1".into(),
            since_ms: 1_000,
            updated_ms: 1_000,
            fps: 5.0,
            last_verdict: None,
            last_action: None,
        };
        s.set_presence("erin", &presence).unwrap();
        // No lease at all: the edge never said it was alive.
        let seen = live_presence(&s, "erin", 2_000).unwrap().unwrap();
        assert_eq!(seen.connection, Connection::ConnectionError);
        s.renew_lease("host-a-1234", 10_000).unwrap();
        assert_eq!(s.lease("host-a-1234").unwrap(), Some(10_000));
        let seen = live_presence(&s, "erin", 9_999).unwrap().unwrap();
        assert_eq!(seen, presence);
        // The lease ran out: the edge is gone, and so is the session.
        let seen = live_presence(&s, "erin", 10_001).unwrap().unwrap();
        assert_eq!(seen.connection, Connection::ConnectionError);
        assert!(s.renew_lease("../x", 1).is_err());
        // Read for a page at once, presences say the same.
        let ids = ["erin".to_owned(), "nobody".to_owned()];
        let page = s.live_presences(&ids, 9_999).unwrap();
        assert_eq!(page.len(), 1);
        assert_eq!(page["erin"], presence);
        let page = s.live_presences(&ids, 10_001).unwrap();
        assert_eq!(page["erin"].connection, Connection::ConnectionError);
    }

    #[test]
    fn export_then_import_moves_every_client_whole() {
        let from = store();
        let mut fred = ClientRecord::new("fred", "Fred", "correct-horse").unwrap();
        from.add(&fred).unwrap();
        let photo = from.put_reference_photo("fred", b"\xff\xd8jpeg").unwrap();
        fred = from
            .update("fred", &mut |r| {
                r.reference = Some(Reference {
                    embedding_b64: "AAAA".into(),
                    photo_file: photo.clone(),
                    model: "m:1".into(),
                    enrolled_at_ms: 5,
                })
            })
            .unwrap();
        from.add(&ClientRecord::new("gail", "", "correct-horse").unwrap())
            .unwrap();
        let mut out = Vec::new();
        assert_eq!(export(&from, &mut out).unwrap(), 2);
        let lines: Vec<Exported> = out
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        let into = store();
        into.add(&ClientRecord::new("gail", "kept", "correct-horse").unwrap())
            .unwrap();
        let done = import(&into, &check_import(lines.clone()).unwrap(), false).unwrap();
        assert_eq!(
            done,
            Imported {
                added: 1,
                replaced: 0,
                kept: 1
            }
        );
        assert_eq!(into.get("fred").unwrap().unwrap(), fred);
        assert_eq!(
            into.reference_photo("fred").unwrap().as_deref(),
            Some(&b"\xff\xd8jpeg"[..])
        );
        assert_eq!(into.get("gail").unwrap().unwrap().display_name, "kept");
        let done = import(&into, &check_import(lines).unwrap(), true).unwrap();
        assert_eq!(done.replaced, 2);
        assert_eq!(into.get("gail").unwrap().unwrap().display_name, "");
    }
}
