//! `vigil-worker`: analyses frames from the work queue. See `vigil::worker`.

fn main() -> std::process::ExitCode {
    vigil::telemetry::run_service(
        vigil::config::Role::Worker,
        "Competes for frames on the work queue, analyses them and publishes the results.",
        vigil::worker::run,
    )
}
