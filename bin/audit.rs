//! `vigil-audit`: the audit writer. See `vigil::audit`.

fn main() -> std::process::ExitCode {
    vigil::telemetry::run_service(
        vigil::config::Role::Audit,
        "Writes actions and operators' operations into the signed, hash-chained audit log with \
         their evidence files, and publishes checkpoints of the log's head.",
        vigil::audit::run,
    )
}
