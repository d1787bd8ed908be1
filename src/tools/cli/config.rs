//! `vigil config`: every VIGIL_* variable, as a table or as JSON.

use clap::Subcommand;

use super::{CliError, print_report};

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Every VIGIL_* variable: the services that read it, its default and its meaning (the
    /// README's table).
    Vars {
        /// Print JSON to stdout.
        #[arg(long)]
        json: bool,
    },
}

pub(super) fn config(action: ConfigCmd) -> Result<(), CliError> {
    match action {
        ConfigCmd::Vars { json } => {
            let vars = crate::config::vars::VARS;
            print_report(json, &vars, crate::config::vars::markdown());
            Ok(())
        }
    }
}
