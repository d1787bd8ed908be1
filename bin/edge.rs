//! `vigil-edge`: the WebSocket edge node. See `vigil::edge`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Holds client WebSocket connections and routes their frames through RabbitMQ.
/// Every setting can come from VIGIL_* environment variables (see README.md).
#[derive(Parser)]
#[command(name = "vigil-edge", version)]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, env = "VIGIL_CONFIG")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    vigil::telemetry::service_main(
        vigil::config::Role::Edge,
        args.config.as_deref(),
        vigil::edge::run,
    )
}
