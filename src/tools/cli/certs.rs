//! `vigil certs`: a development CA and server certificate for HTTPS.

use std::path::PathBuf;

use clap::Subcommand;

use super::{CliError, fail, parse_owner};

#[derive(Debug, Subcommand)]
pub enum CertsCmd {
    /// A one-off CA (its key thrown away) and a server certificate it signed for the hosts:
    /// OUT/ca.pem to trust, OUT/server.pem and OUT/server.key for the edge's own TLS, and
    /// OUT/haproxy.pem (chain and key) for HAProxy.
    Dev {
        #[arg(long)]
        out: PathBuf,
        /// Host names and addresses the certificate is for (repeat the flag); localhost,
        /// 127.0.0.1 and ::1 when none is given.
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Days it stays valid.
        #[arg(long, default_value_t = 90)]
        days: u32,
        /// Replace certificates already in OUT.
        #[arg(long, conflicts_with = "if_missing")]
        force: bool,
        /// Keep a complete set already in OUT, or a haproxy.pem of the operator's own (a first
        /// start makes one, later starts keep it).
        #[arg(long)]
        if_missing: bool,
        /// Hand the files to this user, UID:GID: the process that reads the key (HAProxy's
        /// user in its official image is 99:99).
        #[arg(long, value_parser = parse_owner)]
        owner: Option<(u32, u32)>,
    },
}

pub(super) fn certs(action: CertsCmd) -> Result<(), CliError> {
    match action {
        CertsCmd::Dev {
            out,
            hosts,
            days,
            force,
            if_missing,
            owner,
        } => {
            let hosts = if hosts.is_empty() {
                vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
            } else {
                hosts
            };
            match crate::tools::certs::dev_owned(&out, &hosts, days, force, if_missing, owner)
                .map_err(fail)?
            {
                None => println!("certificates in {} kept", out.display()),
                Some(made) => {
                    println!(
                        "certificate for {} (valid {days} days) in {}",
                        made.hosts.join(", "),
                        out.display()
                    );
                    println!(
                        "  trust {} in the browsers (or the system's store) of the machines that open the page",
                        made.ca.display()
                    );
                    println!(
                        "  HAProxy: {}; the edge itself: {} and {}",
                        made.combined.display(),
                        made.cert.display(),
                        made.key.display()
                    );
                    println!("  server key's SPKI SHA-256: {}", made.spki_sha256);
                }
            }
            Ok(())
        }
    }
}
