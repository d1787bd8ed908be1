//! `vigil-worker`: analyses frames from the work queue. See `vigil::worker`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Competes for frames on the work queue, analyses them and publishes the results.
/// Every setting can come from VIGIL_* environment variables (see README.md).
#[derive(Parser)]
#[command(name = "vigil-worker", version)]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, env = "VIGIL_CONFIG")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    vigil::telemetry::service_main(
        vigil::config::Role::Worker,
        args.config.as_deref(),
        vigil::worker::run,
    )
}
