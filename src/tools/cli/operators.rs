//! `vigil operators`: operators' admin tokens in VIGIL_ADMIN_TOKENS_FILE, each change audited.

use std::fmt::Write as _;

use clap::Subcommand;

use super::{CliError, admin_handle, cli_operator, fail, print_report};
use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum OperatorsCmd {
    /// Add an operator; prints their token once (only its SHA-256 is kept). Audited.
    Add {
        name: String,
        /// What they may do: viewer (read only, no biometric data), proctor (also act on
        /// candidates and see their photos and evidence), admin (also add, remove and enrol
        /// clients).
        #[arg(long, value_enum, default_value = "proctor")]
        role: crate::operators::Role,
    },
    /// The operators and when each was added.
    List {
        /// Print JSON to stdout.
        #[arg(long)]
        json: bool,
    },
    /// Remove an operator: their token stops working at the edges' next request. Audited.
    Remove { name: String },
}

pub(super) async fn operators(cfg: &Config, action: OperatorsCmd) -> Result<(), CliError> {
    use crate::operators;
    let path = cfg
        .edge
        .admin_tokens_file
        .as_deref()
        .ok_or_else(|| fail("set VIGIL_ADMIN_TOKENS_FILE to the operators file"))?;
    // A change of who may act is itself an entry of the trail, written before the change: with
    // no broker to take it, nothing changes.
    let audited = async |operation: &str, detail: String| -> Result<(), CliError> {
        let store = cfg.open_directory().map_err(fail)?;
        let (admin, broker) = admin_handle(cfg, store).await?;
        let sent = admin
            .audit_with("", operation, &cli_operator(), detail)
            .await;
        broker.close().await;
        sent.map_err(|e| fail(format!("{e}: the change was not made")))
    };
    match action {
        OperatorsCmd::Add { name, role } => {
            if operators::read(path)
                .map_err(fail)?
                .iter()
                .any(|e| e.name == name)
            {
                return Err(fail(operators::OperatorError::Exists(name)));
            }
            crate::topology::check_identifier("operator name", &name).map_err(fail)?;
            audited(
                "operator:add",
                format!("operator={name} role={}", role.as_str()),
            )
            .await?;
            let token = operators::add(path, &name, role).map_err(fail)?;
            println!(
                "operator `{name}` ({}) added to {}",
                role.as_str(),
                path.display()
            );
            println!("admin token (shown once, give it to {name} now): {token}");
        }
        OperatorsCmd::List { json } => {
            let entries = operators::read(path).map_err(fail)?;
            let mut text = String::new();
            for e in &entries {
                let _ = writeln!(
                    text,
                    "{:<24} {:<8} added {}",
                    e.name,
                    e.role.as_str(),
                    crate::audit::utc_date(e.created_at_ms)
                );
            }
            print_report(json, &public_entries(&entries), text);
        }
        OperatorsCmd::Remove { name } => {
            if !operators::read(path)
                .map_err(fail)?
                .iter()
                .any(|e| e.name == name)
            {
                return Err(fail(operators::OperatorError::NotFound(name)));
            }
            audited("operator:remove", format!("operator={name}")).await?;
            operators::remove(path, &name).map_err(fail)?;
            println!("operator `{name}` removed; their token no longer works");
        }
    }
    Ok(())
}

/// What `vigil operators list --json` shows of each operator: never the token's hash.
pub(super) fn public_entries(
    entries: &[crate::operators::OperatorEntry],
) -> Vec<serde_json::Value> {
    entries
        .iter()
        .map(|e| {
            serde_json::json!({
                "name": e.name, "role": e.role, "created_at_ms": e.created_at_ms,
            })
        })
        .collect()
}
