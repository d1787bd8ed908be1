//! `vigil clients`: add, list, show, act on and enrol the clients of the directory; every
//! change goes through `crate::admin`, audited with the operator.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::Subcommand;

use super::{CliError, admin_handle, cli_operator, directory_name, fail, print_report};
use crate::config::Config;
use crate::directory::{ClientRecord, ClientStore};

#[derive(Debug, Subcommand)]
pub enum ClientsCmd {
    /// Add a client that authenticates with TOKEN.
    Add {
        id: String,
        /// The client's token (8 characters or more). Without it, a 256-bit token is generated
        /// and printed once.
        #[arg(long)]
        token: Option<String>,
        #[arg(long, default_value = "")]
        name: String,
    },
    /// List clients.
    List {
        /// Print JSON to stdout.
        #[arg(long)]
        json: bool,
    },
    /// A client's status, connection and enrolment (JSON).
    Show {
        id: String,
    },
    /// Stop analysing a client's frames until it is resumed (every edge, within a second).
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
    /// Close the client's session (4403) and refuse it until unblocked.
    Block {
        id: String,
    },
    Unblock {
        id: String,
    },
    /// Close the client's session now.
    Kick {
        id: String,
    },
    /// Delete the client (its session is closed).
    Remove {
        id: String,
    },
    /// Ask the client's live session for a liveness challenge now (audited).
    Challenge {
        id: String,
    },
    /// Let a client the policy signed out start sessions again, with a fresh policy state.
    Readmit {
        id: String,
    },
    /// Force an action on a connected client (audited like the policy's).
    Action {
        id: String,
        #[arg(value_parser = parse_action)]
        action: crate::policy::Action,
    },
    /// Enrol a client from reference photos: each must show exactly one face, good enough to
    /// judge, and all must show the same person.
    Enroll {
        id: String,
        /// A reference photo (JPEG); repeat for several (or frames of a short capture).
        #[arg(long, required = true)]
        reference: Vec<PathBuf>,
    },
}

fn parse_action(s: &str) -> Result<crate::policy::Action, String> {
    use crate::policy::Action;
    Ok(match s {
        "allow" => Action::Allow,
        "warn" => Action::Warn,
        "lock_screen" => Action::LockScreen,
        "sign_out" => Action::SignOut,
        other => {
            return Err(format!(
                "unknown action `{other}` (allow, warn, lock_screen, sign_out)"
            ));
        }
    })
}

pub(super) async fn clients(cfg: &Config, action: ClientsCmd) -> Result<(), CliError> {
    use crate::admin::AdminOp;
    let store = cfg.open_directory().map_err(fail)?;
    let op = match &action {
        ClientsCmd::Pause { id } => Some((id.clone(), AdminOp::Pause)),
        ClientsCmd::Resume { id } => Some((id.clone(), AdminOp::Resume)),
        ClientsCmd::Block { id } => Some((id.clone(), AdminOp::Block)),
        ClientsCmd::Unblock { id } => Some((id.clone(), AdminOp::Unblock)),
        ClientsCmd::Kick { id } => Some((id.clone(), AdminOp::Kick)),
        ClientsCmd::Remove { id } => Some((id.clone(), AdminOp::Remove)),
        ClientsCmd::Challenge { id } => Some((id.clone(), AdminOp::Challenge)),
        ClientsCmd::Readmit { id } => Some((id.clone(), AdminOp::Readmit)),
        _ => None,
    };
    if let Some((id, op)) = op {
        let (admin, broker) = admin_handle(cfg, store).await?;
        let view = admin.apply(&id, op, &cli_operator()).await.map_err(fail)?;
        broker.close().await;
        match view {
            Some(v) => println!(
                "client `{id}`: status {:?}, connection {}",
                v.status,
                v.connection.as_str()
            ),
            None => println!("client `{id}` removed"),
        }
        return Ok(());
    }
    if let ClientsCmd::Action { id, action } = &action {
        let (admin, broker) = admin_handle(cfg, store).await?;
        admin
            .force(id, *action, &cli_operator())
            .await
            .map_err(fail)?;
        broker.close().await;
        println!("{} sent to `{id}`", action.as_str());
        return Ok(());
    }
    match action {
        ClientsCmd::Show { id } => {
            let view = crate::admin::show(&*store, &id).map_err(fail)?;
            println!(
                "{}",
                serde_json::to_string_pretty(&view).unwrap_or_default()
            );
        }
        ClientsCmd::Add { id, token, name } => {
            let generated = token.is_none();
            let token = token.unwrap_or_else(crate::directory::generate_token);
            let record = ClientRecord::new(&id, &name, &token).map_err(fail)?;
            let (admin, broker) = admin_handle(cfg, store).await?;
            let added = admin.add(record, &cli_operator()).await;
            broker.close().await;
            added.map_err(fail)?;
            println!("client `{id}` added to {}", directory_name(cfg));
            if generated {
                // Only its hash is stored: this is the one time it can be read.
                println!("token (shown once, store it now): {token}");
            }
        }
        ClientsCmd::Enroll { id, reference } => {
            // The trail's entry, with the photos' and templates' hashes, goes first: with no
            // broker to take it, the reference is not replaced.
            let (admin, broker) = admin_handle(cfg, store.clone()).await?;
            let runtime = tokio::runtime::Handle::current();
            let (cfg2, client, photos) = (cfg.clone(), id.clone(), reference.clone());
            let enrolled = tokio::task::spawn_blocking(move || {
                enroll_photos(&cfg2, &*store, &client, &photos, &mut |detail| {
                    runtime
                        .block_on(admin.audit_with(&client, "enroll", &cli_operator(), detail))
                        .map_err(|e| fail(format!("{e}: the enrolment was not saved")))
                })
            })
            .await
            .map_err(fail)?;
            broker.close().await;
            let (record, e) = enrolled?;
            println!(
                "client `{id}` enrolled from {} photo(s) ({})",
                reference.len(),
                record.reference.map(|r| r.model).unwrap_or_default()
            );
            if reference.len() > 1 {
                // One photo is trivially similar to itself: a margin needs two or more.
                println!(
                    "each photo's similarity to the template: {}; genuine margin above the \
                     match threshold: {:.3}{}",
                    e.similarities
                        .iter()
                        .map(|s| format!("{s:.3}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    e.margin,
                    if e.margin < 0.15 {
                        " (small: add a clearer, frontal photo)"
                    } else {
                        ""
                    }
                );
            }
        }
        ClientsCmd::List { json } => {
            let clients = crate::admin::list(&*store).map_err(fail)?;
            let mut text = format!(
                "{:<28} {:<8} {:<17} {:<16} {:<8} NAME\n",
                "ID", "STATUS", "CONNECTION", "EDGE", "ENROLLED"
            );
            for c in &clients {
                let status = serde_json::to_value(c.status)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                let _ = writeln!(
                    text,
                    "{:<28} {:<8} {:<17} {:<16} {:<8} {}",
                    c.id,
                    status,
                    c.connection.as_str(),
                    c.edge.as_deref().unwrap_or("-"),
                    if c.enrolled { "yes" } else { "no" },
                    c.display_name
                );
            }
            print_report(json, &clients, text);
        }
        _ => unreachable!("handled above"),
    }
    Ok(())
}

/// Enrol `id` with the photo at `photo`: detect exactly one face, embed it, store the photo and
/// the embedding in the directory.
pub fn enroll(
    cfg: &Config,
    store: &dyn ClientStore,
    id: &str,
    photo: &Path,
) -> Result<ClientRecord, CliError> {
    enroll_photos(cfg, store, id, &[photo.to_path_buf()], &mut |_| Ok(())).map(|(record, _)| record)
}

/// Enrol a client from one or more reference photos (see [`IdentityStack::enroll_many`]);
/// the first photo is kept beside the record.
///
/// [`IdentityStack::enroll_many`]: crate::inference::IdentityStack::enroll_many
pub fn enroll_photos(
    cfg: &Config,
    store: &dyn ClientStore,
    id: &str,
    photos: &[PathBuf],
    before_saving: &mut dyn FnMut(String) -> Result<(), CliError>,
) -> Result<(ClientRecord, crate::inference::Enrollment), CliError> {
    use base64::Engine as _;
    let Some(old) = store.get(id).map_err(fail)? else {
        return Err(fail(format!("client `{id}` not found; add it first")));
    };
    let jpegs = photos
        .iter()
        .map(|p| std::fs::read(p).map_err(|e| fail(format!("{}: {e}", p.display()))))
        .collect::<Result<Vec<_>, _>>()?;
    let stack = crate::inference::IdentityStack::load(&cfg.inference, 1).map_err(fail)?;
    let enrollment = stack
        .enroll_many(&jpegs)
        .map_err(|e| fail(format!("enrolment refused: {e}")))?;
    let embedding = enrollment.embedding.clone();
    let embedding_b64 =
        base64::engine::general_purpose::STANDARD.encode(crate::wire::pack_embedding(&embedding));
    before_saving(crate::admin::enrollment_detail(
        &jpegs,
        old.reference.as_ref().map(|r| r.embedding_b64.as_str()),
        &embedding_b64,
    ))?;
    let photo_file = store.put_reference_photo(id, &jpegs[0]).map_err(fail)?;
    let reference = crate::directory::Reference {
        embedding_b64,
        photo_file,
        model: stack.recognition_model().to_owned(),
        enrolled_at_ms: crate::wire::now_ms(),
    };
    // Only the reference changes: a block made while the models ran stays.
    let record = store
        .update(id, &mut |record| record.reference = Some(reference.clone()))
        .map_err(fail)?;
    Ok((record, enrollment))
}
