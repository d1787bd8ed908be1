//! The embedded directory: one folder on one machine.

use std::path::{Path, PathBuf};

use super::{ClientRecord, ClientStore, DirectoryError, Presence, check_client_id, check_edge_id};
use crate::policy::SavedPolicy;

/// One `<id>.json` per client in a folder.
#[derive(Debug, Clone)]
pub struct FolderStore {
    dir: PathBuf,
}

impl FolderStore {
    /// Open (and create) the folder.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, DirectoryError> {
        let dir = dir.into();
        private_dir(&dir).map_err(|source| io(&dir, source))?;
        Ok(Self { dir })
    }

    pub(super) fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// The folder's write lock (an exclusive file lock on `.lock`), shared with every process
    /// on this folder: the edge, the CLI and other edges on a shared disk. Waits at most
    /// [`LOCK_WAIT`].
    fn lock(&self) -> Result<std::fs::File, DirectoryError> {
        let path = self.dir.join(".lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(file),
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(DirectoryError::Busy(format!(
                        "{} stayed locked for {} s",
                        path.display(),
                        LOCK_WAIT.as_secs()
                    )));
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io(&path, e)),
            }
        }
    }
}

/// Longest a write waits for the folder's lock.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The folder (inside the directory) of edges' lease files.
const LEASES: &str = ".edges";

#[derive(serde::Serialize, serde::Deserialize)]
struct Lease {
    until_ms: u64,
}

pub(super) fn io(path: &Path, source: std::io::Error) -> DirectoryError {
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
/// Create `dir` and its missing parents, readable by their owner only (0700).
pub(crate) fn private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    // Records, reference photos and evidence are for their owner only.
    let create = |tmp: &Path| {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        options.open(tmp)
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.{:016x}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("record"),
        rand::random::<u64>()
    ));
    let result = (|| {
        let mut f = create(&tmp)?;
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

    fn add(&self, record: &ClientRecord) -> Result<(), DirectoryError> {
        check_client_id(&record.id)?;
        let _lock = self.lock()?;
        if self.get(&record.id)?.is_some() {
            return Err(DirectoryError::Exists(record.id.clone()));
        }
        self.put(record)
    }

    fn update(
        &self,
        id: &str,
        change: &mut (dyn FnMut(&mut ClientRecord) + Send),
    ) -> Result<ClientRecord, DirectoryError> {
        check_client_id(id)?;
        let _lock = self.lock()?;
        let mut record = self
            .get(id)?
            .ok_or_else(|| DirectoryError::NotFound(id.to_owned()))?;
        change(&mut record);
        super::stamp_update(&mut record, id);
        self.put(&record)?;
        Ok(record)
    }

    fn renew_lease(&self, edge: &str, until_ms: u64) -> Result<(), DirectoryError> {
        check_edge_id(edge)?;
        let dir = self.dir.join(LEASES);
        private_dir(&dir).map_err(|e| io(&dir, e))?;
        let path = dir.join(format!("{edge}.lease"));
        let bytes = serde_json::to_vec(&Lease { until_ms }).expect("a lease encodes");
        write_atomic(&path, &bytes).map_err(|e| io(&path, e))
    }

    fn lease(&self, edge: &str) -> Result<Option<u64>, DirectoryError> {
        check_edge_id(edge)?;
        let path = self.dir.join(LEASES).join(format!("{edge}.lease"));
        Ok(read_json::<Lease>(&path)?.map(|l| l.until_ms))
    }

    fn remove(&self, id: &str) -> Result<(), DirectoryError> {
        check_client_id(id)?;
        let _lock = self.lock()?;
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

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use crate::directory::ClientRecord;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn records_and_photos_are_their_owners_only() {
        let dir = std::env::temp_dir()
            .join(format!("vigil-folder-{:08x}", rand::random::<u32>()))
            .join("clients");
        let store = FolderStore::open(&dir).unwrap();
        store
            .put(&ClientRecord::new("alice", "", "correct-horse").unwrap())
            .unwrap();
        let photo = store
            .put_reference_photo("alice", &[0xFF, 0xD8, 0xFF, 0xD9])
            .unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&store.path("alice")), 0o600);
        assert_eq!(mode(&dir.join(photo)), 0o600);
        let _ = std::fs::remove_dir_all(dir.parent().unwrap());
    }
}
