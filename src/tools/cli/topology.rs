//! `vigil topology`: print, declare and delete the broker topology of exchanges.toml.

use clap::Subcommand;

use super::{CliError, cli_broker, fail};
use crate::config::Config;
use crate::topology::Topology;

#[derive(Debug, Subcommand)]
pub enum TopologyCmd {
    /// Show the topology resolved for VIGIL_NAMESPACE.
    Print,
    /// Declare it on the broker (idempotent).
    Apply,
    /// Delete the namespace's exchanges and queues from the broker, the capture stream and the
    /// audit checkpoints included: everything queued in them is lost. For starting a namespace
    /// over (its evidence folder wiped too), as the demo does.
    Delete {
        /// Say that you mean it.
        #[arg(long)]
        yes: bool,
    },
}

pub(super) async fn topology(cfg: &Config, action: TopologyCmd) -> Result<(), CliError> {
    let topo = cfg.topology().map_err(fail)?;
    match action {
        TopologyCmd::Print => {
            print!("{}", topo.shared(&cfg.namespace).render());
            print!(
                "{}",
                topo.per_node(&cfg.namespace, crate::topology::NodeKind::Edge, "<edge id>")
                    .render()
            );
            Ok(())
        }
        TopologyCmd::Apply => {
            apply_topology(cfg, &cfg.amqp_url, &topo).await?;
            println!("topology `{}` declared", cfg.namespace);
            Ok(())
        }
        TopologyCmd::Delete { yes } => {
            if !yes {
                return Err(fail(format!(
                    "this deletes every queue of `{}` with what is in it; add --yes",
                    cfg.namespace
                )));
            }
            let broker = cli_broker(&cfg.amqp_url).await?;
            for part in [
                topo.shared(&cfg.namespace),
                topo.streams(&cfg.namespace),
                topo.checkpoints(&cfg.namespace),
            ] {
                broker.delete(&part).await.map_err(fail)?;
            }
            broker.close().await;
            println!("topology `{}` deleted", cfg.namespace);
            Ok(())
        }
    }
}

/// Declare everything the services use: the shared topology, the audit checkpoint stream and,
/// when capture is on, the capture stream.
pub(super) async fn apply_topology(
    cfg: &Config,
    url: &str,
    topo: &Topology,
) -> Result<(), CliError> {
    let broker = cli_broker(url).await?;
    let mut parts = vec![
        topo.shared(&cfg.namespace),
        topo.checkpoints(&cfg.namespace),
    ];
    if cfg.capture_stream {
        parts.push(topo.streams(&cfg.namespace));
    }
    // The operator's CLI puts the policies whatever the services' roles: it acts as admin.
    let management = cfg.management().map_err(fail)?;
    for part in &parts {
        if let Some(m) = &management
            && part.tunables == crate::topology::Tunables::Policies
        {
            m.put_policies(&part.policies()).await.map_err(fail)?;
        }
        broker.declare(part).await.map_err(fail)?;
    }
    broker.close().await;
    Ok(())
}
