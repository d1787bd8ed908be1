//! The audit writer's read API (`VIGIL_AUDIT_API_LISTEN`): the console's audit view, on an
//! edge's admin API, reads each client's trail and its evidence frames here, so no edge reads
//! the writer's folder. Behind one bearer token (`VIGIL_AUDIT_API_TOKEN`, compared in
//! constant time before any handler runs), HTTPS with `VIGIL_AUDIT_API_TLS_*`, on the
//! services' bounded HTTP stack; a few views are built at once (`VIGIL_AUDIT_API_VIEWS`), the
//! others wait their turn within `VIGIL_AUDIT_API_WAIT_MS`.
//!
//! - `GET /v1/audit/clients/{id}`: [`Views::trail`] as JSON.
//! - `GET /v1/audit/evidence/{path}`: one frame (`image/jpeg`), only as its checked entry
//!   recorded it ([`Views::evidence`]).
//!
//! Errors are `{"error": "..."}` with the status of [`super::view::EvidenceRefused::status`], 401 (no or a
//! wrong token), or 503 (no turn, or no log yet).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::view::Views;
use crate::config::Config;
use crate::metrics::AuditMetrics;
use crate::telemetry::{self, tls};

/// The path prefix of the trail views.
pub const TRAIL_PATH: &str = "/v1/audit/clients/";
/// The path prefix of the evidence frames.
pub const EVIDENCE_PATH: &str = "/v1/audit/evidence/";

struct ApiState {
    views: Arc<Views>,
    /// SHA-256 of the token: compared in constant time, whatever the length presented.
    token: [u8; 32],
    turns: Arc<Semaphore>,
    wait: Duration,
    metrics: AuditMetrics,
}

/// Serve the read API on `cfg.audit_api.listen`, when set; returns its address.
pub(super) async fn serve(
    cfg: &Config,
    views: Arc<Views>,
    metrics: AuditMetrics,
    shutdown: CancellationToken,
) -> Result<Option<SocketAddr>, String> {
    let api = &cfg.audit_api;
    let Some(listen) = api.listen else {
        return Ok(None);
    };
    // The config's validation requires it wherever `listen` is set.
    let token = api
        .token
        .as_deref()
        .ok_or("VIGIL_AUDIT_API_LISTEN is set without VIGIL_AUDIT_API_TOKEN")?;
    let tls = match (&api.tls_cert, &api.tls_key) {
        (Some(cert), Some(key)) => Some(Arc::new(tls::Tls::load("audit_api.tls", cert, key)?)),
        _ => None,
    };
    if tls.is_none() && !listen.ip().is_loopback() {
        tracing::warn!(
            %listen,
            "the audit read API speaks plain HTTP beyond the loopback: its token and the \
             evidence it serves cross the network in clear (set VIGIL_AUDIT_API_TLS_CERT and \
             VIGIL_AUDIT_API_TLS_KEY)"
        );
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("audit API on {listen}: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("audit API on {listen}: {e}"))?;
    let state = Arc::new(ApiState {
        views,
        token: Sha256::digest(token.as_bytes()).into(),
        turns: Arc::new(Semaphore::new(api.views.max(1))),
        wait: Duration::from_millis(api.wait_ms),
        metrics: metrics.clone(),
    });
    let app = Router::new()
        .route("/v1/audit/clients/{id}", get(trail))
        .route("/v1/audit/evidence/{*path}", get(evidence))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state);
    let limits = telemetry::HttpLimits::of(cfg);
    let listener = telemetry::Guarded::new(listener, limits, metrics.api_connections_refused);
    use telemetry::http::serve;
    match tls {
        None => tokio::spawn(serve(listener, app, limits.header_timeout, shutdown)),
        Some(tls) => {
            let handshakes = tls::HandshakeLimits {
                handshake_timeout: limits.header_timeout,
                failed: metrics.api_tls_failed,
            };
            let listener = tls::TlsListener::new(listener, tls, handshakes, shutdown.clone())
                .map_err(|e| format!("audit API on {listen}: {e}"))?;
            tokio::spawn(serve(listener, app, limits.header_timeout, shutdown))
        }
    };
    Ok(Some(addr))
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(serde_json::json!({ "error": message.into() })),
    )
        .into_response()
}

/// Whether `headers` carry the token (compared in constant time).
fn authorized(api: &ApiState, headers: &HeaderMap) -> bool {
    let Some(presented) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let presented: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    presented.ct_eq(&api.token).into()
}

/// Refuse a request without the token before its handler runs; the connection is closed
/// after the 401, so a socket without a token keeps no place.
async fn require_token(State(api): State<Arc<ApiState>>, request: Request, next: Next) -> Response {
    if !authorized(&api, request.headers()) {
        api.metrics.api_refused.with_label_values(&["token"]).inc();
        let mut response = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        return response;
    }
    // This connection is the edge's now: a full listener never evicts it.
    if let Some(mark) = request.extensions().get::<telemetry::http::Authenticated>() {
        mark.mark();
    }
    next.run(request).await
}

/// Run `build` on the blocking pool once a turn is free, within the wait. The turn goes with
/// the work: a request given up (its connection closed) frees it only when the work is done,
/// so abandoned requests cannot pile work up past `VIGIL_AUDIT_API_VIEWS`.
async fn in_turn<T: Send + 'static>(
    api: &ApiState,
    build: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Response> {
    let Ok(Ok(turn)) = tokio::time::timeout(api.wait, api.turns.clone().acquire_owned()).await
    else {
        api.metrics.api_refused.with_label_values(&["busy"]).inc();
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many audit views at once; retry shortly",
        ));
    };
    tokio::task::spawn_blocking(move || {
        let _turn = turn;
        build()
    })
    .await
    .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

async fn trail(State(api): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    let views = api.views.clone();
    match in_turn(&api, move || views.trail(&id)).await {
        Ok(Ok(body)) => axum::Json(body).into_response(),
        Ok(Err(message)) => error(StatusCode::SERVICE_UNAVAILABLE, message),
        Err(refused) => refused,
    }
}

async fn evidence(State(api): State<Arc<ApiState>>, Path(path): Path<String>) -> Response {
    let views = api.views.clone();
    let file = format!("evidence/{path}");
    match in_turn(&api, move || views.evidence(&file)).await {
        Ok(Ok(bytes)) => ([(header::CONTENT_TYPE, "image/jpeg")], bytes).into_response(),
        Ok(Err(refused)) => error(
            StatusCode::from_u16(refused.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            refused.to_string(),
        ),
        Err(refused) => refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(token: &str) -> ApiState {
        ApiState {
            views: Arc::new(Views::new(
                std::env::temp_dir().join("no-such-log"),
                None,
                1 << 20,
            )),
            token: Sha256::digest(token.as_bytes()).into(),
            turns: Arc::new(Semaphore::new(1)),
            wait: Duration::from_millis(10),
            metrics: AuditMetrics::new(&prometheus::Registry::new()),
        }
    }

    fn bearer(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, value.parse().unwrap());
        h
    }

    #[test]
    fn only_the_exact_token_is_authorized() {
        let token = "a-token-that-is-long-enough-for-the-api-0123";
        let api = state(token);
        assert!(authorized(&api, &bearer(&format!("Bearer {token}"))));
        assert!(!authorized(&api, &HeaderMap::new()));
        assert!(!authorized(&api, &bearer(token)), "without the scheme");
        assert!(!authorized(&api, &bearer(&format!("bearer {token}"))));
        assert!(!authorized(&api, &bearer(&format!("Bearer {token}x"))));
        assert!(!authorized(
            &api,
            &bearer(&format!("Bearer {}", &token[1..]))
        ));
        assert!(!authorized(&api, &bearer("Bearer ")));
    }

    #[tokio::test]
    async fn a_view_waits_its_turn_within_the_bound_then_is_refused() {
        let api = state("a-token-that-is-long-enough-for-the-api-0123");
        let held = api.turns.clone().acquire_owned().await.unwrap();
        let refused = in_turn(&api, || ()).await.unwrap_err();
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            api.metrics.api_refused.with_label_values(&["busy"]).get(),
            1
        );
        drop(held);
        assert!(in_turn(&api, || ()).await.is_ok());
    }
}
