//! `vigil sessions`: the session tokens' key pair, and minting a token by hand (audited).

use std::path::PathBuf;

use clap::Subcommand;

use super::{CliError, admin_handle, cli_operator, fail};
use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum SessionsCmd {
    /// Make the Ed25519 key pair session tokens are signed with: the private key at OUT (for
    /// VIGIL_SESSION_KEY, on the edges that serve the admin API) and OUT.pub (for
    /// VIGIL_SESSION_PUBLIC_KEY, on every edge).
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Mint a session token for a client with VIGIL_SESSION_KEY, audited with the operator;
    /// prints the token (and its expiry on stderr).
    Mint {
        client: String,
        /// Its life in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
}

pub(super) async fn sessions(cfg: &Config, action: SessionsCmd) -> Result<(), CliError> {
    match action {
        SessionsCmd::Keygen { out } => {
            let public = crate::audit::signing::generate(&out).map_err(fail)?;
            eprintln!(
                "private key: {} (VIGIL_SESSION_KEY, where tokens are minted); public key: {}.pub (VIGIL_SESSION_PUBLIC_KEY, on every edge)",
                out.display(),
                out.display()
            );
            print!("{public}");
            Ok(())
        }
        SessionsCmd::Mint { client, ttl } => {
            let minter = crate::session_tokens::Minter::load(&cfg.sessions, &cfg.namespace)
                .map_err(fail)?
                .ok_or_else(|| fail("VIGIL_SESSION_KEY is not set (`vigil sessions keygen`)"))?;
            let store = cfg.open_directory().map_err(fail)?;
            let record = store
                .get(&client)
                .map_err(fail)?
                .ok_or_else(|| fail(format!("client `{client}` not found")))?;
            if matches!(
                record.status,
                crate::directory::ClientStatus::Blocked | crate::directory::ClientStatus::SignedOut
            ) {
                return Err(fail(format!(
                    "client `{client}` is blocked or signed out: unblock or re-admit it first"
                )));
            }
            let (token, expires_at) = minter
                .mint(
                    &record.id,
                    &record.session_binding(),
                    ttl,
                    crate::wire::now_ms(),
                )
                .map_err(fail)?;
            let (admin, broker) = admin_handle(cfg, store.clone()).await?;
            let audited = admin.audit(&client, "mint_session", &cli_operator()).await;
            broker.close().await;
            audited.map_err(fail)?;
            let expires = std::time::UNIX_EPOCH + std::time::Duration::from_secs(expires_at);
            eprintln!(
                "session token for `{client}`, valid until {}",
                humantime::format_rfc3339_seconds(expires)
            );
            println!("{token}");
            Ok(())
        }
    }
}
