//! `vigil`: the operator CLI. See `vigil::cli`.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = vigil::cli::Cli::parse();
    // `vigil audit serve` is a service: it starts its logs from its config (VIGIL_LOG_FORMAT).
    let service = matches!(
        &cli.command,
        vigil::cli::Command::Audit {
            action: vigil::cli::AuditCmd::Serve
        }
    );
    if !service {
        vigil::telemetry::init_logging(vigil::config::LogFormat::Text);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vigil: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(vigil::cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vigil: {e}");
            ExitCode::from(e.code)
        }
    }
}
