//! `vigil-audit`: the audit writer. See `vigil::audit`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Consumes actions and operators' operations from the audit queue into the signed,
/// hash-chained log and its evidence files, and publishes checkpoints of the log's head.
/// Every setting can come from VIGIL_* environment variables (see README.md).
#[derive(Parser)]
#[command(name = "vigil-audit", version)]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, env = "VIGIL_CONFIG")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    vigil::telemetry::service_main(
        vigil::config::Role::Audit,
        args.config.as_deref(),
        vigil::audit::run,
    )
}
