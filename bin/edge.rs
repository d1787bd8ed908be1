//! `vigil-edge`: the WebSocket edge node. See `vigil::edge`.

fn main() -> std::process::ExitCode {
    vigil::telemetry::run_service(
        vigil::config::Role::Edge,
        "Holds client WebSocket connections and routes their frames through RabbitMQ.",
        vigil::edge::run,
    )
}
