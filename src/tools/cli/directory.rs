//! `vigil directory`: the directory's storage: migrate its schema, export it, and import
//! into it (the import audited before it is made).

use std::path::{Path, PathBuf};

use clap::Subcommand;

use super::{CliError, admin_handle, cli_operator, directory_name, fail, print_report};
use crate::config::Config;
use crate::directory::ClientStore;

#[derive(Debug, Subcommand)]
pub enum DirectoryCmd {
    /// Bring a PostgreSQL directory's schema up to date (services also do it at start-up).
    Migrate,
    /// Write every client (record, reference photo, policy state) as JSON lines.
    Export {
        /// The file to write; standard output when unset.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Read clients into the directory: from a file `export` wrote, or straight from a
    /// directory folder. Clients that exist are kept unless --replace.
    Import {
        /// An export file, or a folder directory.
        from: PathBuf,
        /// Replace clients that exist.
        #[arg(long)]
        replace: bool,
        /// Print JSON to stdout.
        #[arg(long)]
        json: bool,
    },
}

pub(super) async fn directory(cfg: &Config, action: DirectoryCmd) -> Result<(), CliError> {
    use crate::directory::{self, Exported, Location};
    match action {
        DirectoryCmd::Migrate => match cfg.directory_location().map_err(fail)? {
            Location::Postgres(url) => {
                // Connecting migrates; a second run finds nothing left to apply.
                let store =
                    directory::PgStore::connect(&url, &cfg.directory_limits()).map_err(fail)?;
                let applied = store.migrate().map_err(fail)?;
                println!(
                    "{} is up to date{}",
                    directory_name(cfg),
                    if applied.is_empty() {
                        ""
                    } else {
                        " (migrated)"
                    }
                );
                Ok(())
            }
            Location::Folder(dir) => {
                println!("{} is a folder: it has no schema to migrate", dir.display());
                Ok(())
            }
        },
        DirectoryCmd::Export { out } => {
            let store = cfg.open_directory().map_err(fail)?;
            let n = match &out {
                Some(path) => {
                    let mut file = std::io::BufWriter::new(
                        std::fs::File::create(path)
                            .map_err(|e| fail(format!("{}: {e}", path.display())))?,
                    );
                    let n = directory::export(&*store, &mut file).map_err(fail)?;
                    std::io::Write::flush(&mut file)
                        .map_err(|e| fail(format!("{}: {e}", path.display())))?;
                    n
                }
                None => directory::export(&*store, &mut std::io::stdout().lock()).map_err(fail)?,
            };
            eprintln!("exported {n} client(s) from {}", directory_name(cfg));
            Ok(())
        }
        DirectoryCmd::Import {
            from,
            replace,
            json,
        } => {
            let clients: Vec<Exported> = if from.is_dir() {
                let source = directory::FolderStore::open(&from).map_err(fail)?;
                let mut buf = Vec::new();
                directory::export(&source, &mut buf).map_err(fail)?;
                parse_export(&buf, &from)?
            } else {
                let bytes =
                    std::fs::read(&from).map_err(|e| fail(format!("{}: {e}", from.display())))?;
                parse_export(&bytes, &from)?
            };
            // Checked whole first: an import the trail records is one that can be made.
            let checked = directory::check_import(clients).map_err(fail)?;
            let store = cfg.open_directory().map_err(fail)?;
            let (admin, broker) = admin_handle(cfg, store.clone()).await?;
            let planned = audit_import(&admin, &*store, &checked, replace, &from).await;
            // What the import then did, or why it stopped, follows the plan into the trail (an
            // import that changes nothing leaves no entry).
            let done = match planned {
                Err(e) => Err(e),
                Ok(false) => directory::import(&*store, &checked, replace).map_err(fail),
                Ok(true) => {
                    let made = directory::import(&*store, &checked, replace);
                    let (operation, detail) = match &made {
                        Ok(d) => (
                            "directory:import:done",
                            format!("added={} replaced={} kept={}", d.added, d.replaced, d.kept),
                        ),
                        Err(e) => (
                            "directory:import:failed",
                            format!("error={}", e.to_string().escape_debug()),
                        ),
                    };
                    let noted = admin
                        .audit_with("", operation, &cli_operator(), detail)
                        .await;
                    match (made, noted) {
                        (Err(e), _) => Err(fail(e)),
                        (Ok(_), Err(e)) => Err(fail(format!(
                            "{e}: the import was made, but its outcome is not in the trail"
                        ))),
                        (Ok(d), Ok(())) => Ok(d),
                    }
                }
            };
            broker.close().await;
            let done = done?;
            let text = format!(
                "imported into {}: {} added, {} replaced, {} kept as they were\n",
                directory_name(cfg),
                done.added,
                done.replaced,
                done.kept
            );
            print_report(json, &done, text);
            Ok(())
        }
    }
}

/// Put an import in the trail before it is made: one entry for the whole import (where from,
/// the SHA-256 of what is imported, how many clients it would add and replace), and one on
/// each client it would add or replace, with the SHA-256 of the record, of the reference photo
/// (the JPEG's bytes, as an enrolment records them) and of the policy the client gets. With no
/// broker to take them, nothing is imported. Whether the import changes anything (and so
/// has entries to follow).
async fn audit_import(
    admin: &crate::admin::Admin,
    store: &dyn ClientStore,
    checked: &crate::directory::CheckedImport,
    replace: bool,
    from: &std::path::Path,
) -> Result<bool, CliError> {
    use sha2::Digest as _;
    let sha = |bytes: &[u8]| hex::encode(sha2::Sha256::digest(bytes));
    let mut changes = Vec::new();
    for (client, photo) in checked.clients() {
        let id = &client.record.id;
        let change = match store.get(id).map_err(fail)? {
            None => "import:add",
            Some(_) if replace => "import:replace",
            Some(_) => continue,
        };
        let record = serde_json::to_vec(&client.record).map_err(fail)?;
        let policy = client
            .policy
            .as_ref()
            .map(serde_json::to_vec)
            .transpose()
            .map_err(fail)?;
        let or_none = |bytes: Option<&[u8]>| bytes.map_or_else(|| "none".to_owned(), sha);
        changes.push((
            id.clone(),
            change,
            format!(
                "record_sha256={} photo_sha256={} policy_sha256={}",
                sha(&record),
                or_none(photo),
                or_none(policy.as_deref()),
            ),
        ));
    }
    if changes.is_empty() {
        return Ok(false);
    }
    let whole =
        serde_json::to_vec(&checked.clients().map(|(c, _)| c).collect::<Vec<_>>()).map_err(fail)?;
    let operator = cli_operator();
    let replaced = changes.iter().filter(|c| c.1 == "import:replace").count();
    let sent = async {
        admin
            .audit_with(
                "",
                "directory:import",
                &operator,
                format!(
                    "from={} sha256={} add={} replace={replaced}",
                    from.display().to_string().escape_debug(),
                    sha(&whole),
                    changes.len() - replaced,
                ),
            )
            .await?;
        for (id, change, detail) in &changes {
            admin
                .audit_with(id, change, &operator, detail.clone())
                .await?;
        }
        Ok::<_, crate::admin::AdminError>(())
    }
    .await;
    sent.map(|()| true)
        .map_err(|e| fail(format!("{e}: nothing was imported")))
}

/// The clients of an export file, one JSON line each; a bad line is named.
fn parse_export(bytes: &[u8], from: &Path) -> Result<Vec<crate::directory::Exported>, CliError> {
    bytes
        .split(|b| *b == b'\n')
        .enumerate()
        .filter(|(_, line)| !line.iter().all(u8::is_ascii_whitespace))
        .map(|(i, line)| {
            serde_json::from_slice(line)
                .map_err(|e| fail(format!("{} line {}: {e}", from.display(), i + 1)))
        })
        .collect()
}
