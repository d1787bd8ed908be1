//! The directory in PostgreSQL, for several edges on several hosts.
//!
//! The schema lives in `migrations/` and is applied when a store connects (or by
//! `vigil directory migrate`), under an advisory lock so that edges starting together migrate
//! once. Every read-modify-write is one transaction holding the row (`SELECT ... FOR UPDATE`),
//! so concurrent operators never lose an update; every statement and lock wait is bounded by
//! `statement_timeout` and `lock_timeout`, and every connection by `connect_timeout`.
//!
//! The `postgres` client is synchronous and runs its own small runtime, which must never run
//! (nor be dropped) on an async task: calls made from inside a Tokio runtime hop to a plain
//! thread, and the pool is dropped on one.

use postgres::types::Json;
use r2d2_postgres::PostgresConnectionManager;
use r2d2_postgres::postgres::{self, NoTls};
use r2d2_postgres::r2d2;

use super::{
    ClientRecord, ClientStore, DirectoryError, PgLimits, Presence, check_client_id, check_edge_id,
};
use crate::policy::SavedPolicy;

mod embedded {
    refinery::embed_migrations!("src/directory/migrations");
}

/// Any number will do, as long as nothing else on the database uses it for a lock.
const MIGRATION_LOCK: i64 = 0x7669_6769_6c5f_6d69; // "vigil_mi"

type Pool = r2d2::Pool<PostgresConnectionManager<NoTls>>;

/// A client directory in PostgreSQL.
pub struct PgStore {
    /// Always `Some` until dropped (see `Drop`).
    pool: Option<Pool>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

fn db(e: impl std::fmt::Display) -> DirectoryError {
    DirectoryError::Database(e.to_string())
}

impl PgStore {
    /// Connect to `url` and bring its schema up to date.
    pub fn connect(url: &str, limits: &PgLimits) -> Result<Self, DirectoryError> {
        let store = off_runtime(|| -> Result<Self, DirectoryError> {
            let mut config: postgres::Config = url
                .parse()
                .map_err(|e| DirectoryError::Url(format!("{e}")))?;
            config.connect_timeout(limits.connect_timeout);
            if config.get_application_name().is_none() {
                config.application_name("vigil");
            }
            let bound = limits.statement_timeout.as_millis();
            let options = format!(
                "{} -c statement_timeout={bound} -c lock_timeout={bound}",
                config.get_options().unwrap_or_default()
            );
            config.options(options.trim());
            let pool = r2d2::Pool::builder()
                .max_size(limits.pool.max(1))
                .min_idle(Some(0))
                .connection_timeout(limits.connect_timeout)
                .build(PostgresConnectionManager::new(config, NoTls))
                .map_err(db)?;
            Ok(Self { pool: Some(pool) })
        })?;
        store.migrate()?;
        Ok(store)
    }

    /// Apply the migrations this build knows that the database lacks; returns their names.
    pub fn migrate(&self) -> Result<Vec<String>, DirectoryError> {
        self.run(|client| {
            client
                .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
                .map_err(db)?;
            let report = embedded::migrations::runner().run(&mut *client);
            let unlocked = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]);
            let report = report.map_err(|e| DirectoryError::Database(format!("migration: {e}")))?;
            unlocked.map_err(db)?;
            Ok(report
                .applied_migrations()
                .iter()
                .map(|m| m.to_string())
                .collect())
        })
    }

    /// Run `f` on a pooled connection, off any async runtime.
    fn run<T: Send>(
        &self,
        f: impl FnOnce(&mut postgres::Client) -> Result<T, DirectoryError> + Send,
    ) -> Result<T, DirectoryError> {
        let pool = self.pool.as_ref().expect("the pool lives until drop");
        off_runtime(|| {
            let mut conn = pool
                .get()
                .map_err(|e| DirectoryError::Busy(format!("no database connection: {e}")))?;
            f(&mut conn)
        })
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Dropping a connection runs the client's runtime: never on an async task.
        if let Some(pool) = self.pool.take() {
            off_runtime(move || drop(pool));
        }
    }
}

/// Run `f` here, or on a plain scoped thread when this thread is inside a Tokio runtime (the
/// synchronous client would panic there).
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if tokio::runtime::Handle::try_current().is_err() {
        return f();
    }
    std::thread::scope(|s| {
        s.spawn(f)
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

fn status_of(record: &ClientRecord) -> &'static str {
    record.status.as_str()
}

fn decode_record(id: &str, value: serde_json::Value) -> Result<ClientRecord, DirectoryError> {
    decode("vigil_clients", id, value)
}

/// A JSON column's value as `T`; a value that does not decode names its table and row.
fn decode<T: serde::de::DeserializeOwned>(
    table: &str,
    id: &str,
    value: serde_json::Value,
) -> Result<T, DirectoryError> {
    serde_json::from_value(value).map_err(|source| DirectoryError::Corrupt {
        path: format!("{table}/{id}"),
        source,
    })
}

/// The one JSON column of the row of `table` whose `client_id` is `id`, decoded.
fn json_of<T: serde::de::DeserializeOwned>(
    c: &mut postgres::Client,
    table: &str,
    column: &str,
    id: &str,
) -> Result<Option<T>, DirectoryError> {
    // `table` and `column` are this module's constants, never input.
    let row = c
        .query_opt(
            &format!("SELECT {column} FROM {table} WHERE client_id = $1"),
            &[&id],
        )
        .map_err(db)?;
    row.map(|r| decode(table, id, r.get::<_, serde_json::Value>(0)))
        .transpose()
}

fn is_unique_violation(e: &postgres::Error) -> bool {
    e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION)
}

impl ClientStore for PgStore {
    fn get(&self, id: &str) -> Result<Option<ClientRecord>, DirectoryError> {
        check_client_id(id)?;
        self.run(|c| {
            let row = c
                .query_opt("SELECT record FROM vigil_clients WHERE id = $1", &[&id])
                .map_err(db)?;
            row.map(|r| decode_record(id, r.get::<_, serde_json::Value>(0)))
                .transpose()
        })
    }

    fn put(&self, record: &ClientRecord) -> Result<(), DirectoryError> {
        check_client_id(&record.id)?;
        self.run(|c| {
            c.execute(
                "INSERT INTO vigil_clients (id, status, revision, record) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (id) DO UPDATE
                 SET status = $2, revision = $3, record = $4, updated_at = now()",
                &[
                    &record.id,
                    &status_of(record),
                    &(record.revision as i64),
                    &Json(record),
                ],
            )
            .map_err(db)?;
            Ok(())
        })
    }

    fn add(&self, record: &ClientRecord) -> Result<(), DirectoryError> {
        check_client_id(&record.id)?;
        self.run(|c| {
            match c.execute(
                "INSERT INTO vigil_clients (id, status, revision, record) VALUES ($1, $2, $3, $4)",
                &[
                    &record.id,
                    &status_of(record),
                    &(record.revision as i64),
                    &Json(record),
                ],
            ) {
                Ok(_) => Ok(()),
                Err(e) if is_unique_violation(&e) => Err(DirectoryError::Exists(record.id.clone())),
                Err(e) => Err(db(e)),
            }
        })
    }

    fn update(
        &self,
        id: &str,
        change: &mut (dyn FnMut(&mut ClientRecord) + Send),
    ) -> Result<ClientRecord, DirectoryError> {
        check_client_id(id)?;
        self.run(|c| {
            let mut tx = c.transaction().map_err(db)?;
            let row = tx
                .query_opt(
                    "SELECT record FROM vigil_clients WHERE id = $1 FOR UPDATE",
                    &[&id],
                )
                .map_err(db)?
                .ok_or_else(|| DirectoryError::NotFound(id.to_owned()))?;
            let mut record = decode_record(id, row.get::<_, serde_json::Value>(0))?;
            change(&mut record);
            super::stamp_update(&mut record, id);
            tx.execute(
                "UPDATE vigil_clients SET status = $2, revision = $3, record = $4, updated_at = now()
                 WHERE id = $1",
                &[&id, &status_of(&record), &(record.revision as i64), &Json(&record)],
            )
            .map_err(db)?;
            tx.commit().map_err(db)?;
            Ok(record)
        })
    }

    fn remove(&self, id: &str) -> Result<(), DirectoryError> {
        check_client_id(id)?;
        self.run(|c| {
            let n = c
                .execute("DELETE FROM vigil_clients WHERE id = $1", &[&id])
                .map_err(db)?;
            if n == 0 {
                return Err(DirectoryError::NotFound(id.to_owned()));
            }
            Ok(())
        })
    }

    fn list(&self) -> Result<Vec<ClientRecord>, DirectoryError> {
        self.run(|c| {
            c.query("SELECT id, record FROM vigil_clients ORDER BY id", &[])
                .map_err(db)?
                .into_iter()
                .map(|r| decode_record(r.get::<_, &str>(0), r.get::<_, serde_json::Value>(1)))
                .collect()
        })
    }

    fn presence(&self, id: &str) -> Result<Option<Presence>, DirectoryError> {
        check_client_id(id)?;
        self.run(|c| json_of(c, "vigil_presence", "presence", id))
    }

    fn set_presence(&self, id: &str, presence: &Presence) -> Result<(), DirectoryError> {
        check_client_id(id)?;
        // A client removed meanwhile has no presence to keep: nothing is written.
        self.run(|c| {
            c.execute(
                "INSERT INTO vigil_presence (client_id, edge, presence)
                 SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM vigil_clients WHERE id = $1)
                 ON CONFLICT (client_id) DO UPDATE SET edge = $2, presence = $3",
                &[&id, &presence.edge, &Json(presence)],
            )
            .map_err(db)?;
            Ok(())
        })
    }

    fn policy(&self, id: &str) -> Result<Option<SavedPolicy>, DirectoryError> {
        check_client_id(id)?;
        self.run(|c| json_of(c, "vigil_policy_state", "state", id))
    }

    fn put_policy(&self, id: &str, saved: &SavedPolicy) -> Result<(), DirectoryError> {
        check_client_id(id)?;
        self.run(|c| {
            c.execute(
                "INSERT INTO vigil_policy_state (client_id, state)
                 SELECT $1, $2 WHERE EXISTS (SELECT 1 FROM vigil_clients WHERE id = $1)
                 ON CONFLICT (client_id) DO UPDATE SET state = $2",
                &[&id, &Json(saved)],
            )
            .map_err(db)?;
            Ok(())
        })
    }

    fn reference_photo(&self, id: &str) -> Result<Option<Vec<u8>>, DirectoryError> {
        check_client_id(id)?;
        self.run(|c| {
            let row = c
                .query_opt(
                    "SELECT jpeg FROM vigil_reference_photos WHERE client_id = $1",
                    &[&id],
                )
                .map_err(db)?;
            Ok(row.map(|r| r.get::<_, Vec<u8>>(0)))
        })
    }

    fn put_reference_photo(&self, id: &str, jpeg: &[u8]) -> Result<String, DirectoryError> {
        check_client_id(id)?;
        let name = format!("{id}.reference.jpg");
        self.run(|c| {
            let n = c
                .execute(
                    "INSERT INTO vigil_reference_photos (client_id, name, jpeg)
                     SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM vigil_clients WHERE id = $1)
                     ON CONFLICT (client_id) DO UPDATE SET name = $2, jpeg = $3",
                    &[&id, &name, &jpeg],
                )
                .map_err(db)?;
            if n == 0 {
                return Err(DirectoryError::NotFound(id.to_owned()));
            }
            Ok(())
        })?;
        Ok(name)
    }

    fn renew_lease(&self, edge: &str, until_ms: u64) -> Result<(), DirectoryError> {
        check_edge_id(edge)?;
        self.run(|c| {
            c.execute(
                "INSERT INTO vigil_edge_leases (edge, lease_until_ms) VALUES ($1, $2)
                 ON CONFLICT (edge) DO UPDATE SET lease_until_ms = $2",
                &[&edge, &(until_ms as i64)],
            )
            .map_err(db)?;
            Ok(())
        })
    }

    fn lease(&self, edge: &str) -> Result<Option<u64>, DirectoryError> {
        check_edge_id(edge)?;
        self.run(|c| {
            let row = c
                .query_opt(
                    "SELECT lease_until_ms FROM vigil_edge_leases WHERE edge = $1",
                    &[&edge],
                )
                .map_err(db)?;
            Ok(row.map(|r| r.get::<_, i64>(0).max(0) as u64))
        })
    }
}
