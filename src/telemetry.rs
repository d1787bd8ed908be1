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

pub mod http;
pub(crate) mod tls;
pub use http::{Guarded, HttpLimits};

/// Install the global `tracing` subscriber. `RUST_LOG` filters (default `info`).
pub fn init_logging(format: LogFormat) {
    let _ = install(format, None);
}

/// What the log filter is when `RUST_LOG` is unset.
const DEFAULT_FILTER: &str = "info,ort=error,refinery_core=warn,postgres=warn";

/// The span exporter's tracer (the `otlp` feature); nothing to hold without it.
#[cfg(feature = "otlp")]
type Tracer = opentelemetry_sdk::trace::Tracer;
#[cfg(not(feature = "otlp"))]
type Tracer = std::convert::Infallible;

/// Install the subscriber: logs to stderr, and, with `otel`, spans to an OTLP exporter.
fn install(
    format: LogFormat,
    otel: Option<Tracer>,
) -> Result<(), tracing_subscriber::util::TryInitError> {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_FILTER));
    // A log line that cannot be written (stderr closed) is lost, never a panic: by default the
    // subscriber reports the failure with `eprintln!`, which panics on the same closed stderr
    // and would take the task that logged with it (the signal handler, for one).
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    let fmt = match format {
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    // Spans go to the exporter from Vigil's own code at debug level (one per frame on each
    // side), whatever the log filter says.
    #[cfg(feature = "otlp")]
    let spans = otel.map(|tracer| {
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target("vigil", tracing::Level::DEBUG),
            )
    });
    #[cfg(not(feature = "otlp"))]
    let spans: Option<tracing_subscriber::layer::Identity> = otel.map(|never| match never {});
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(spans)
        .try_init()
}

/// Spans exported over OTLP, flushed when this is dropped.
pub struct Tracing {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

#[cfg(feature = "otlp")]
impl Drop for Tracing {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            // Bounded by the exporter's own timeout (OTEL_EXPORTER_OTLP_TIMEOUT, 10 s).
            let _ = provider.shutdown();
        }
    }
}

/// Whether spans are exported: set once at start-up.
#[cfg(feature = "otlp")]
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Logs as [`init_logging`], and spans over OTLP/HTTP (JSON) when `OTEL_EXPORTER_OTLP_ENDPOINT`
/// (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, under service name `service`. Keep the
/// returned value until the process ends: dropping it flushes the spans still buffered.
pub fn init_tracing(service: &str, format: LogFormat) -> Tracing {
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
        .or_else(|| {
            std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
                .ok()
                .filter(|e| !e.is_empty())
                .map(|base| format!("{}/v1/traces", base.trim_end_matches('/')))
        });
    let Some(endpoint) = endpoint else {
        init_logging(format);
        return Tracing::none();
    };
    #[cfg(not(feature = "otlp"))]
    {
        init_logging(format);
        tracing::warn!(
            %endpoint,
            "spans are not exported: this build has no OTLP exporter (build with `--features vigil/otlp`; \
             the Docker image has it)"
        );
        let _ = service;
        Tracing::none()
    }
    #[cfg(feature = "otlp")]
    export(service, format, endpoint)
}

impl Tracing {
    fn none() -> Self {
        Self {
            #[cfg(feature = "otlp")]
            provider: None,
        }
    }
}

/// Logs, and spans exported to `endpoint` over OTLP/HTTP (JSON).
#[cfg(feature = "otlp")]
fn export(service: &str, format: LogFormat, endpoint: String) -> Tracing {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig as _;
    install_crypto_provider();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpJson)
        .with_endpoint(endpoint.clone())
        .build();
    let exporter = match exporter {
        Ok(e) => e,
        Err(e) => {
            init_logging(format);
            tracing::error!(error = %e, %endpoint, "spans are not exported: the OTLP exporter did not start");
            return Tracing::none();
        }
    };
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service.to_owned())
                .build(),
        )
        .build();
    let _ = install(format, Some(provider.tracer("vigil")));
    EXPORTING.store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(%endpoint, "exporting spans over OTLP");
    Tracing {
        provider: Some(provider),
    }
}

/// Make `span` part of the trace a W3C `traceparent` names (a frame's, carried in its
/// envelope and AMQP headers), so that the edge's and the worker's spans of one frame share
/// one trace id at the exporter. Nothing when spans are not exported.
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    #[cfg(not(feature = "otlp"))]
    let _ = (span, traceparent);
    #[cfg(feature = "otlp")]
    continue_exported(span, traceparent);
}

#[cfg(feature = "otlp")]
fn continue_exported(span: &tracing::Span, traceparent: &str) {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
    };
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    if !EXPORTING.load(std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    let Some(trace) = crate::wire::trace_id(traceparent) else {
        return;
    };
    // A well-formed header: `00-<trace:32>-<span:16>-<flags:2>`.
    let (Ok(trace), Ok(parent)) = (
        TraceId::from_hex(trace),
        SpanId::from_hex(&traceparent[36..52]),
    ) else {
        return;
    };
    let remote = SpanContext::new(
        trace,
        parent,
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
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

/// Serve `/metrics`, `/healthz` and `/readyz` until `shutdown`, within `limits`. Returns the
/// bound address.
pub async fn serve_metrics(
    listen: SocketAddr,
    limits: HttpLimits,
    registry: Registry,
    health: Health,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let refused = prometheus::IntCounterVec::new(
        prometheus::Opts::new(
            "vigil_metrics_connections_refused_total",
            "Connections to /metrics closed for want of a place, by reason: full (the listener \
             held VIGIL_HTTP_MAX_CONNECTIONS), per_address (the address held \
             VIGIL_HTTP_MAX_CONNECTIONS_PER_ADDRESS), evicted (a held one closed for an \
             address holding fewer)",
        ),
        &["reason"],
    )
    .expect("a valid metric");
    let _ = registry.register(Box::new(refused.clone()));
    let listener = Guarded::new(listener, limits, refused);
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
    tokio::spawn(http::serve(listener, app, limits.header_timeout, shutdown));
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

/// What every service binary takes on its command line. Every setting can also come from
/// `VIGIL_*` environment variables (see README.md).
#[derive(clap::Parser)]
struct ServiceArgs {
    /// Configuration file (TOML).
    #[arg(long, env = "VIGIL_CONFIG")]
    config: Option<std::path::PathBuf>,
}

/// A service binary's whole `main`: its command line (`--config`, `--help` saying `about`,
/// `--version`), then [`service_main`].
pub fn run_service<F, Fut, E>(
    role: crate::config::Role,
    about: &'static str,
    run: F,
) -> std::process::ExitCode
where
    F: FnOnce(crate::config::Config, Registry, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    use clap::{CommandFactory as _, FromArgMatches as _};
    let matches = ServiceArgs::command()
        .name(role.binary())
        .about(about)
        .version(env!("CARGO_PKG_VERSION"))
        .get_matches();
    let args = ServiceArgs::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    service_main(role, args.config.as_deref(), run)
}

/// The `main` of a service binary: load the config and validate what `role` reads (exit 78,
/// `EX_CONFIG`, on a bad one, listing every problem), start the logs, build the registry, run
/// until SIGINT or SIGTERM, and map the outcome to an exit code (a panicked main task is a
/// failure).
pub fn service_main<F, Fut, E>(
    role: crate::config::Role,
    config: Option<&std::path::Path>,
    run: F,
) -> std::process::ExitCode
where
    F: FnOnce(crate::config::Config, Registry, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    use std::process::ExitCode;
    let name = role.binary();
    let cfg = match crate::config::Config::from_env_for(role, config) {
        Ok(cfg) => cfg,
        Err(errors) => {
            eprintln!(
                "{name}: invalid configuration:\n  - {}",
                errors.join("\n  - ")
            );
            return ExitCode::from(crate::config::EXIT_BAD_CONFIG);
        }
    };
    let _tracing = init_tracing(name, cfg.log_format);
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

/// rustls's process-wide crypto provider, ring, as everywhere in Vigil. The HTTP clients that
/// do not take a TLS configuration of Vigil's own (the OTLP exporter's, the RabbitMQ management
/// API's) need one installed before they are built. Installing it twice is harmless.
pub fn install_crypto_provider() {
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
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

    #[tokio::test]
    async fn a_panicked_service_task_is_an_error_and_an_aborted_one_is_not() {
        let panicked = tokio::spawn(async {
            if std::hint::black_box(true) {
                panic!("the model file vanished");
            }
            Ok::<(), String>(())
        });
        let outcome = join_service(panicked, |message| format!("panicked: {message}")).await;
        assert_eq!(outcome, Err("panicked: the model file vanished".to_owned()));

        let aborted = tokio::spawn(async {
            std::future::pending::<()>().await;
            Ok::<(), String>(())
        });
        aborted.abort();
        assert_eq!(join_service(aborted, |m| m).await, Ok(()));
    }
}
