//! Logs, health and the metrics endpoint shared by every binary, and the shutdown signal.
//!
//! `/metrics` serves the registry built in `main`; `/healthz` answers 200 while the process
//! runs; `/readyz` answers 200 only when every readiness check of [`Health`] holds.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder as _, Registry, TextEncoder};
use tokio_util::sync::CancellationToken;

use crate::config::LogFormat;

/// Install the global `tracing` subscriber. `RUST_LOG` filters (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,ort=error,refinery_core=warn,postgres=warn")
    });
    // A log line that cannot be written (stderr closed) is lost, never a panic: by default the
    // subscriber reports the failure with `eprintln!`, which panics on the same closed stderr
    // and would take the task that logged with it (the signal handler, for one).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Named readiness checks (`broker`, `topology`, `models`, ...). Ready when all are true.
#[derive(Clone, Default)]
pub struct Health {
    checks: Arc<Mutex<BTreeMap<&'static str, bool>>>,
}

impl Health {
    /// A health state with `checks` registered as not yet ready.
    pub fn new(checks: &[&'static str]) -> Self {
        let h = Self::default();
        for c in checks {
            h.set(c, false);
        }
        h
    }

    pub fn set(&self, check: &'static str, ok: bool) {
        self.checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(check, ok);
    }

    pub fn is_ready(&self) -> bool {
        self.checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .all(|ok| *ok)
    }

    fn report(&self) -> String {
        let checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        checks
            .iter()
            .map(|(k, v)| format!("{k}: {}\n", if *v { "ok" } else { "not ready" }))
            .collect()
    }
}

/// Serve `/metrics`, `/healthz` and `/readyz` until `shutdown`. Returns the bound address.
pub async fn serve_metrics(
    listen: SocketAddr,
    registry: Registry,
    health: Health,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let ready = health.clone();
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    let mut buf = Vec::new();
                    let _ = TextEncoder::new().encode(&registry.gather(), &mut buf);
                    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], buf)
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let health = ready.clone();
                async move {
                    let status = if health.is_ready() {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    (status, health.report()).into_response()
                }
            }),
        );
    tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "metrics server failed");
        }
    });
    Ok(addr)
}

/// A token cancelled on the first SIGINT or SIGTERM.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    let name = tokio::select! {
                        _ = ctrl_c => "SIGINT",
                        _ = term.recv() => "SIGTERM",
                    };
                    // Cancel first: nothing after the signal may stand in the way of shutdown.
                    t.cancel();
                    tracing::info!("{name} received, shutting down");
                    return;
                }
                Err(_) => {
                    let _ = ctrl_c.await;
                }
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        t.cancel();
    });
    token
}

/// The `main` of a service binary: load the config (exit 78, `EX_CONFIG`, on a bad one, listing every problem),
/// start the logs, build the registry, run until SIGINT or SIGTERM, and map the outcome to an exit
/// code.
pub fn service_main<F, Fut, E>(
    name: &str,
    config: Option<&std::path::Path>,
    run: F,
) -> std::process::ExitCode
where
    F: FnOnce(crate::config::Config, Registry, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    use std::process::ExitCode;
    let cfg = match crate::config::Config::from_env(config) {
        Ok(cfg) => cfg,
        Err(errors) => {
            eprintln!(
                "{name}: invalid configuration:\n  - {}",
                errors.join("\n  - ")
            );
            return ExitCode::from(crate::config::EXIT_BAD_CONFIG);
        }
    };
    init_logging(cfg.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = shutdown_on_signals();
        run(cfg, Registry::new(), shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Wait for a service's main task. A panic is a failure (`panicked` makes the service's error
/// from its message), so the process exits non-zero; an aborted task stopped on purpose.
pub async fn join_service<E>(
    task: tokio::task::JoinHandle<Result<(), E>>,
    panicked: impl FnOnce(String) -> E,
) -> Result<(), E> {
    match task.await {
        Ok(result) => result,
        Err(e) => match e.try_into_panic() {
            Ok(payload) => Err(panicked(
                payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic without a message".to_owned()),
            )),
            Err(_) => Ok(()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_every_check() {
        let h = Health::new(&["broker", "topology"]);
        assert!(!h.is_ready());
        h.set("broker", true);
        assert!(!h.is_ready());
        h.set("topology", true);
        assert!(h.is_ready());
        assert!(h.report().contains("broker: ok"));
    }
}
