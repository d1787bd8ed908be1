//! `vigil webhooks`: the deliveries given up on, re-sending them, and a new signing secret.

use clap::Subcommand;

use super::{CliError, cli_broker, fail};
use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum WebhooksCmd {
    /// The deliveries given up on after their last try (`webhooks.failed`), oldest first:
    /// entry id, endpoint, tries and the last error. They stay where they are.
    List {
        /// Show at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print JSON lines to stdout.
        #[arg(long)]
        json: bool,
    },
    /// Send failed deliveries again, from their first try: every one, or those of one entry.
    Retry {
        /// Only the deliveries of this entry id.
        #[arg(long, conflicts_with = "all")]
        id: Option<String>,
        /// Every failed delivery.
        #[arg(long)]
        all: bool,
        /// Move at most this many.
        #[arg(long, default_value_t = 10_000)]
        limit: usize,
    },
    /// Print a new random signing secret (`whsec_...`) for VIGIL_WEBHOOK_SECRET.
    Secret,
}

pub(super) async fn webhooks(cfg: &Config, action: WebhooksCmd) -> Result<(), CliError> {
    use crate::webhooks::{Job, Secret, redact};
    let names = cfg.names();
    match action {
        WebhooksCmd::Secret => {
            println!("{}", Secret::generate());
            Ok(())
        }
        WebhooksCmd::List { limit, json } => {
            let broker = cli_broker(&cfg.amqp_url).await?;
            let failed = broker
                .peek(&names.webhooks_failed_queue(), limit)
                .await
                .map_err(fail);
            broker.close().await;
            let failed = failed?;
            if !json {
                println!("{} failed deliveries", failed.len());
            }
            for m in failed {
                match Job::decode(&m.data) {
                    Ok(job) if json => println!("{}", job_line(&job)),
                    Ok(job) => println!(
                        "{}  {}  {} tries  {}",
                        job.id,
                        redact(&job.endpoint),
                        job.attempts,
                        job.last_error.as_deref().unwrap_or("")
                    ),
                    Err(e) => println!("(not a webhook job: {e})"),
                }
            }
            Ok(())
        }
        WebhooksCmd::Retry { id, all, limit } => {
            if id.is_none() && !all {
                return Err(fail(
                    "name an entry with --id, or re-send every one with --all",
                ));
            }
            let broker = cli_broker(&cfg.amqp_url).await?;
            // At most what is there now: a job that fails again while this runs lands back in
            // the queue, and must not be moved twice.
            let (waiting, _) = broker
                .queue_counts(&names.webhooks_failed_queue())
                .await
                .map_err(fail)?;
            let moved = broker
                .move_messages(
                    &names.webhooks_failed_queue(),
                    &names.webhooks_exchange(),
                    "deliver",
                    limit.min(waiting as usize),
                    |bytes| {
                        let mut job = Job::decode(bytes).ok()?;
                        if id.as_ref().is_some_and(|id| *id != job.id) {
                            return None;
                        }
                        // From the first try again; the last error stays until a new one.
                        job.attempts = 0;
                        Some(job.encode())
                    },
                )
                .await
                .map_err(fail);
            broker.close().await;
            println!("{} deliveries sent back to the webhooks queue", moved?);
            Ok(())
        }
    }
}

/// One line of `vigil webhooks list --json`: the job without its body, the endpoint redacted.
pub(super) fn job_line(job: &crate::webhooks::Job) -> serde_json::Value {
    serde_json::json!({
        "id": job.id,
        "endpoint": crate::webhooks::redact(&job.endpoint),
        "attempts": job.attempts,
        "last_error": job.last_error,
        "last_try_at_ms": job.last_try_at_ms,
        "created_at_ms": job.created_at_ms,
    })
}
