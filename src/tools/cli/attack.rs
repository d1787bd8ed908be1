//! `vigil attack`: the hostile suite against a running edge, checked against budgets.

use std::path::PathBuf;
use std::time::Duration;

use super::load::add_clients;
use super::{CliError, directory_name, fail, parse_age, print_report};
use crate::config::Config;

#[derive(Debug, clap::Args)]
pub struct AttackArgs {
    /// The edge's stream endpoint (`ws://host:port/v1/stream`).
    #[arg(long)]
    pub url: String,
    /// Legitimate clients are `<prefix>0..`, the JPEG client `<prefix>jpeg`.
    #[arg(long, default_value = "attack-legit-")]
    pub client_prefix: String,
    /// Authenticated non-readers are `<prefix>0..`.
    #[arg(long, default_value = "attack-hostile-")]
    pub hostile_prefix: String,
    /// The token of every client the attack authenticates as.
    #[arg(long)]
    pub token: String,
    /// First add every client the attack uses to the directory at VIGIL_CLIENTS_DIR.
    #[arg(long)]
    pub create_clients: bool,
    #[arg(long, default_value_t = 10)]
    pub legit_clients: usize,
    /// Frames per second per legitimate client: keep the total within what the workers
    /// analyse, or the edge turns clients away as `system_full`.
    #[arg(long, default_value_t = 0.5)]
    pub legit_fps: f64,
    /// How long the legitimate clients stream alone, for the reference latency.
    #[arg(long, default_value = "20s", value_parser = parse_age)]
    pub unloaded: Duration,
    /// Hostile sockets: a third authenticate and never read, the rest never say hello (half
    /// of them flood pings).
    #[arg(long, default_value_t = 2000)]
    pub sockets: usize,
    /// Spread hostile sockets over this many loopback addresses (127.0.0.2, ...) when the edge
    /// is local; 0 connects from the default address.
    #[arg(long, default_value_t = 32)]
    pub sources: u8,
    /// How long hostile sockets are held and watched; longer than the edge's idle timeout.
    #[arg(long, default_value = "75s", value_parser = parse_age)]
    pub hold: Duration,
    #[arg(long, default_value_t = 30.0)]
    pub jpeg_fps: f64,
    #[arg(long, default_value = "60s", value_parser = parse_age)]
    pub jpeg_duration: Duration,
    /// The edge's process id, to watch its memory.
    #[arg(long)]
    pub edge_pid: Vec<u32>,
    /// Workers' process ids, to watch their memory and notice restarts.
    #[arg(long)]
    pub worker_pid: Vec<u32>,
    /// A JPEG the legitimate clients send (default: a synthetic 640x480 frame).
    #[arg(long)]
    pub image: Option<PathBuf>,
    #[arg(long, default_value_t = 2.0)]
    pub p99_factor: f64,
    #[arg(long, default_value_t = 256.0)]
    pub edge_rss_budget_mib: f64,
    #[arg(long, default_value_t = 200.0)]
    pub worker_rss_rise_budget_mib: f64,
    /// Bound on closing sockets that never authenticate (default: the edge's defaults, hello
    /// timeout 5 s + write timeout 2 s for the close itself + 1 s).
    #[arg(long, default_value_t = 8.0)]
    pub unauthenticated_close_s: f64,
    /// Bound on closing authenticated sockets that never read, from their handshake (default:
    /// hello timeout 5 s, within which the hello is verified, + idle timeout 60 s + write
    /// timeout 2 s for the close + 1 s).
    #[arg(long, default_value_t = 68.0)]
    pub authenticated_close_s: f64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub(super) async fn attack(cfg: &Config, args: AttackArgs) -> Result<(), CliError> {
    let frame = match &args.image {
        Some(path) => std::fs::read(path).map_err(|e| fail(format!("{}: {e}", path.display())))?,
        None => crate::inference::synthetic_jpeg(640, 480, 1, 40_000),
    };
    let json = args.json;
    let opts = crate::tools::attack::AttackOptions {
        url: args.url,
        client_prefix: args.client_prefix,
        token: args.token,
        legit_clients: args.legit_clients,
        legit_fps: args.legit_fps,
        unloaded: args.unloaded,
        sockets: args.sockets,
        sources: args.sources,
        hostile_prefix: args.hostile_prefix,
        hold: args.hold,
        jpeg_fps: args.jpeg_fps,
        jpeg_duration: args.jpeg_duration,
        edge_pids: args.edge_pid,
        worker_pids: args.worker_pid,
        frame,
        budgets: crate::tools::attack::Budgets {
            p99_factor: args.p99_factor,
            edge_rss_mib: args.edge_rss_budget_mib,
            worker_rss_rise_mib: args.worker_rss_rise_budget_mib,
            unauthenticated_close_s: args.unauthenticated_close_s,
            authenticated_close_s: args.authenticated_close_s,
        },
    };
    if args.create_clients {
        let ids = opts.client_ids();
        eprintln!("adding {} clients to {}", ids.len(), directory_name(cfg));
        add_clients(cfg, &ids, &opts.token)?;
    }
    let report = crate::tools::attack::run(opts, |phase| eprintln!("attack: {phase}"))
        .await
        .map_err(fail)?;
    print_report(json, &report, report.render());
    if report.passed() {
        Ok(())
    } else {
        let failed = report.checks.iter().filter(|c| !c.pass).count();
        Err(CliError {
            code: 1,
            message: format!("{failed} check(s) failed"),
        })
    }
}
