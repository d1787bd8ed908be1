//! `vigil audit`: the audit trail: serve (the writer), verify, adopt signing, keygen, list,
//! show and prune.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use prometheus::Registry;

use super::{CliError, fail, parse_age, print_report, since_ms};
use crate::broker::Broker;
use crate::config::Config;
use crate::metrics::BrokerMetrics;

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Run the audit writer: store every action from the audit queue with its evidence.
    Serve,
    /// Check the whole log: every hash and link, every evidence file against its SHA-256, and
    /// with --public-key every entry's signature. Exits non-zero and names the first broken
    /// entry.
    Verify {
        /// The writer's public key (the `.pub` file `vigil audit keygen` wrote).
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// Skip the comparison with the newest checkpoint on the broker (a deleted tail then
        /// goes unnoticed).
        #[arg(long)]
        offline: bool,
    },
    /// Start signing a log whose entries so far are unsigned (with VIGIL_AUDIT_KEY): vouch for
    /// the head you checked (`vigil audit verify --offline` prints nothing to copy; the writer's
    /// refusal names it). Refused when the log has a signed entry, or when the checkpoint
    /// stream holds a checkpoint signed by the key (then the log was signed before, and its
    /// signatures were removed).
    Adopt {
        /// The hash of the log's last entry, as checked.
        #[arg(long)]
        head: String,
    },
    /// Make a new Ed25519 key pair for signing the audit log: the private key at OUT (for
    /// VIGIL_AUDIT_KEY, kept outside the evidence folder) and the public key at OUT.pub.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Recent actions, oldest first.
    List {
        #[arg(long)]
        client: Option<String>,
        /// Only actions decided within this long (`90s`, `10m`, `2h`, `7d`).
        #[arg(long, value_parser = parse_age)]
        since: Option<Duration>,
        /// Print JSON to stdout.
        #[arg(long)]
        json: bool,
    },
    /// One action, with the paths of its evidence files.
    Show { action_id: String },
    /// Remove the evidence files of actions decided longer ago than --older-than. The log
    /// keeps every entry and hash, and a prune entry (signed with VIGIL_AUDIT_KEY) lists the
    /// files, so `verify` stays green. Takes the writer's lock: with a writer running, set
    /// VIGIL_AUDIT_RETENTION_DAYS for it instead.
    Prune {
        /// `30d`, `12h`.
        #[arg(long, value_parser = parse_age)]
        older_than: Duration,
        /// Print JSON to stdout.
        #[arg(long)]
        json: bool,
    },
}

pub(super) async fn audit(cfg: Config, action: AuditCmd) -> Result<(), CliError> {
    use crate::audit::{self, Verification};
    let root = cfg.evidence_dir.clone();
    match action {
        AuditCmd::Serve => {
            let shutdown = crate::telemetry::shutdown_on_signals();
            audit::run(cfg, Registry::new(), shutdown)
                .await
                .map_err(fail)
        }
        AuditCmd::Prune { older_than, json } => {
            let signer = cfg
                .audit_key
                .as_deref()
                .map(audit::signing::load_private)
                .transpose()
                .map_err(fail)?;
            let before_ms = since_ms(Some(older_than));
            let report = audit::prune(&cfg.evidence_dir, signer, before_ms).map_err(fail)?;
            let text = format!(
                "pruned {} evidence files ({} bytes) of {} actions decided before {}; \
                 their entries stay in the log\n",
                report.files,
                report.bytes,
                report.actions,
                audit::utc_date(before_ms)
            );
            print_report(json, &report, text);
            Ok(())
        }
        AuditCmd::Adopt { head } => {
            let path = cfg
                .audit_key
                .as_deref()
                .ok_or_else(|| fail("set VIGIL_AUDIT_KEY to the private key to sign with"))?;
            let signer = audit::signing::load_private(path).map_err(fail)?;
            // A log signed before, stripped of its signatures, must not be vouched for anew.
            let broker = Broker::connect(
                &cfg.amqp_url,
                "audit-adopt",
                BrokerMetrics::new(&Registry::new()),
            )
            .await
            .map_err(fail)?;
            let queue = cfg.names().audit_checkpoints();
            let signed_before = if broker.queue_len(&queue).await.is_ok() {
                let trust = broker.trust(cfg.broker_roles, &cfg.namespace);
                audit::newest_checkpoint(
                    &broker,
                    &queue,
                    &trust,
                    Some(&signer.verifying_key()),
                    true,
                    Duration::from_millis(cfg.audit_checkpoint_scan_ms),
                )
                .await
                .map_err(fail)?
                .newest
            } else {
                None
            };
            broker.close().await;
            if let Some(c) = signed_before {
                return Err(fail(format!(
                    "the checkpoint stream holds entry {}'s checkpoint signed by this key: the \
                     log was signed before, and its signatures are gone. Restore it",
                    c.seq
                )));
            }
            let n = audit::adopt(&root, signer, &head).map_err(fail)?;
            println!(
                "signing from entry {}: the first {n} entries are vouched for by their head {head}",
                n + 1
            );
            Ok(())
        }
        AuditCmd::Keygen { out } => {
            let public = audit::signing::generate(&out).map_err(fail)?;
            eprintln!(
                "private key: {} (set VIGIL_AUDIT_KEY to it; keep it outside the evidence folder)",
                out.display()
            );
            print!("{public}");
            Ok(())
        }
        AuditCmd::Verify {
            public_key,
            offline,
        } => {
            let key = public_key
                .as_deref()
                .or(cfg.audit_public_key.as_deref())
                .map(audit::signing::load_public)
                .transpose()
                .map_err(fail)?;
            if key.is_none() {
                eprintln!(
                    "WARNING: no public key (--public-key or VIGIL_AUDIT_PUBLIC_KEY), so this \
                     proves only that the log is consistent with itself. Whoever can write \
                     audit.log can rewrite any entry (a sign_out into an allow), append a prune \
                     note that deletes evidence, re-chain every hash after it and pass this \
                     check, and forge the checkpoint it is compared with."
                );
            }
            let checkpoint = if offline {
                None
            } else {
                let broker = Broker::connect(
                    &cfg.amqp_url,
                    "audit-verify",
                    BrokerMetrics::new(&Registry::new()),
                )
                .await
                .map_err(|e| fail(format!("{e} (--offline skips the checkpoint)")))?;
                let queue = cfg.names().audit_checkpoints();
                // A passive declare: is there a checkpoint stream at all?
                let newest = if broker.queue_len(&queue).await.is_err() {
                    if key.is_some() {
                        return Err(fail(format!(
                            "no checkpoint stream {queue} on the broker: a signing writer keeps \
                             one, so it was deleted or this is the wrong broker or namespace \
                             (--offline skips the checkpoint)"
                        )));
                    }
                    eprintln!("no checkpoint stream {queue} on the broker");
                    None
                } else {
                    let trust = broker.trust(cfg.broker_roles, &cfg.namespace);
                    let scan = audit::newest_checkpoint(
                        &broker,
                        &queue,
                        &trust,
                        key.as_ref(),
                        cfg.broker_roles == crate::roles::RoleMode::Shared,
                        Duration::from_millis(cfg.audit_checkpoint_scan_ms),
                    )
                    .await
                    .map_err(|e| fail(format!("{e} (--offline skips the checkpoint)")))?;
                    if scan.ignored > 0 {
                        eprintln!(
                            "ignored {} of the stream's {} messages: not valid checkpoints of the \
                             audit writer{}",
                            scan.ignored,
                            scan.read,
                            if key.is_some() { " under the key" } else { "" }
                        );
                    }
                    if !scan.complete {
                        return Err(fail(format!(
                            "the checkpoint stream {queue} was not read to its end within \
                             VIGIL_AUDIT_CHECKPOINT_SCAN_MS ({} ms; {} messages read): raise it, \
                             or --offline skips the checkpoint",
                            cfg.audit_checkpoint_scan_ms, scan.read
                        )));
                    }
                    scan.newest
                };
                broker.close().await;
                newest
            };
            let verified = match &checkpoint {
                Some(c) => audit::verify_with_checkpoint(&root, key.as_ref(), c),
                None => audit::verify(&root, key.as_ref()),
            };
            if checkpoint.is_none() && !offline {
                eprintln!("no checkpoint on the broker yet: the log's tail is not compared");
            }
            match verified.map_err(fail)? {
                Verification::Intact { entries } => {
                    let unsigned = match &key {
                        Some(k) => audit::unsigned_entries(&root, k).map_err(fail)?,
                        None => entries,
                    };
                    // Signed entries always come with signed checkpoints: none valid means
                    // the stream was emptied, or aged out under junk.
                    if key.is_some() && !offline && checkpoint.is_none() && entries > unsigned {
                        return Err(CliError {
                            code: crate::config::EXIT_AUDIT_BROKEN,
                            message: format!(
                                "the log has {} signed entries, but the checkpoint stream holds \
                                 no valid checkpoint of them: it was emptied or flooded, so a \
                                 cut-off tail cannot be ruled out (--offline skips the checkpoint)",
                                entries - unsigned
                            ),
                        });
                    }
                    println!(
                        "audit log intact: {entries} entries, every hash, link and evidence file holds{}{}",
                        match (&key, unsigned) {
                            (Some(k), 0) => format!(
                                ", every entry signed by the key {}",
                                audit::signing::fingerprint(k)
                            ),
                            (Some(k), n) => format!(
                                ", every entry after the first {n} signed by the key {} (the \
                                 first {n} predate signing: the key vouches only for their head)",
                                audit::signing::fingerprint(k)
                            ),
                            (None, _) => " (UNSIGNED CHECK: see the warning above)".into(),
                        },
                        checkpoint
                            .as_ref()
                            .map(|c| format!(
                                ", and it matches the newest checkpoint (entry {})",
                                c.seq
                            ))
                            .unwrap_or_default()
                    );
                    Ok(())
                }
                Verification::Broken {
                    line,
                    action_id,
                    problem,
                } => Err(CliError {
                    code: crate::config::EXIT_AUDIT_BROKEN,
                    message: format!(
                        "audit log broken at entry {line}{}: {problem}",
                        action_id
                            .map(|a| format!(" (action {a})"))
                            .unwrap_or_default()
                    ),
                }),
            }
        }
        AuditCmd::List {
            client,
            since,
            json,
        } => {
            let cutoff = since.map(|d| crate::wire::now_ms().saturating_sub(d.as_millis() as u64));
            let records: Vec<audit::AuditRecord> = audit::records(&root)
                .map_err(fail)?
                .into_iter()
                .filter(|r| {
                    client.as_ref().is_none_or(|c| *c == r.client_id)
                        && cutoff.is_none_or(|c| r.decided_at_ms >= c)
                })
                .collect();
            let mut text = format!(
                "{:<36} {:<19} {:<12} {:<15} {:<24} EDGE\n",
                "ACTION ID", "DECIDED (UTC DAY)", "ACTION", "REASON", "CLIENT"
            );
            for r in &records {
                let _ = writeln!(
                    text,
                    "{:<36} {:<19} {:<12} {:<15} {:<24} {}",
                    r.action_id,
                    audit::utc_date(r.decided_at_ms),
                    r.action.as_str(),
                    r.reason,
                    r.client_id,
                    r.edge
                );
            }
            print_report(json, &records, text);
            Ok(())
        }
        AuditCmd::Show { action_id } => {
            let record = audit::records(&root)
                .map_err(fail)?
                .into_iter()
                .find(|r| r.action_id.to_string() == action_id)
                .ok_or_else(|| fail(format!("no action {action_id} in {}", root.display())))?;
            println!(
                "{}",
                serde_json::to_string_pretty(&record).unwrap_or_default()
            );
            for f in &record.evidence_files {
                println!("evidence: {}", root.join(f).display());
            }
            Ok(())
        }
    }
}
