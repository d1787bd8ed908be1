//! The admin HTTP API every edge serves under `/v1/admin/` on `VIGIL_ADMIN_LISTEN`, behind a
//! bearer token (`VIGIL_ADMIN_TOKEN`). Without the token configured the API is off.
//!
//! - `GET  /v1/admin/clients`, `GET /v1/admin/clients/{id}`
//! - `POST /v1/admin/clients` with `{"id","token","name"}`; without `token`, a 256-bit one is
//!   generated and returned once, as `token`, in the answer
//! - `POST /v1/admin/clients/{id}/{pause|resume|block|unblock|kick|remove}`
//! - `POST /v1/admin/clients/{id}/action` with `{"action":"sign_out"}`
//! - `GET  /v1/admin/sessions`: this edge's live sessions

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::admin::{self, Admin, AdminError, AdminOp};
use crate::directory::{ClientRecord, DirectoryError};
use crate::policy::Action;

struct ApiState {
    token: String,
    admin: Admin,
    shared: Arc<Shared>,
}

type Api = Arc<ApiState>;

/// TLS handshakes the admin API runs at once; more connections wait in the kernel's backlog.
const MAX_TLS_HANDSHAKES: usize = 256;

/// Start the API; returns its address.
pub(super) async fn serve(
    listen: SocketAddr,
    token: String,
    tls: Option<Arc<super::tls::Tls>>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let limits = super::tls::HandshakeLimits {
        max_handshakes: MAX_TLS_HANDSHAKES,
        handshake_timeout: std::time::Duration::from_millis(shared.cfg.hello_timeout_ms),
        failed: shared.metrics.admin_tls_failed.clone(),
    };
    let state = Arc::new(ApiState {
        token,
        admin: Admin {
            store: shared.store.clone(),
            publisher: shared.publisher.clone(),
            control_exchange: shared.control_exchange.clone(),
            issued_by: format!("admin-api@{}", shared.edge_id),
        },
        shared,
    });
    let app = Router::new()
        .route("/v1/admin/clients", get(list).post(add))
        .route("/v1/admin/clients/{id}", get(show))
        .route("/v1/admin/clients/{id}/action", post(force))
        .route("/v1/admin/clients/{id}/{op}", post(op))
        .route("/v1/admin/sessions", get(sessions))
        // Authentication runs before any handler, so before a body is read or parsed.
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state);
    let Some(tls) = tls else {
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
            {
                tracing::error!(error = %e, "admin API failed");
            }
        });
        return Ok(addr);
    };
    let listener = super::tls::TlsListener::new(listener, tls, limits, shutdown.clone())?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "admin API failed");
        }
    });
    Ok(addr)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({"error": message.into()}))).into_response()
}

/// Constant-time comparison of the presented bearer token.
fn authorized(api: &ApiState, headers: &HeaderMap) -> bool {
    use subtle::ConstantTimeEq;
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    presented.as_bytes().ct_eq(api.token.as_bytes()).into()
}

/// Refuse a request without the bearer token before its handler (and its body) runs.
async fn require_token(State(api): State<Api>, request: Request, next: Next) -> Response {
    if authorized(&api, request.headers()) {
        next.run(request).await
    } else {
        unauthorized()
    }
}

fn unauthorized() -> Response {
    error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token")
}

fn admin_error(e: AdminError) -> Response {
    match e {
        AdminError::NotFound(id) => {
            error(StatusCode::NOT_FOUND, format!("client `{id}` not found"))
        }
        AdminError::Directory(e @ (DirectoryError::BadId(_) | DirectoryError::WeakToken)) => {
            error(StatusCode::BAD_REQUEST, e.to_string())
        }
        AdminError::Directory(e @ DirectoryError::Exists(_)) => {
            error(StatusCode::CONFLICT, e.to_string())
        }
        other => error(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
    }
}

async fn list(State(api): State<Api>) -> Response {
    let store = api.admin.store.clone();
    match tokio::task::spawn_blocking(move || admin::list(&*store)).await {
        Ok(Ok(views)) => Json(views).into_response(),
        Ok(Err(e)) => admin_error(e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn show(State(api): State<Api>, Path(id): Path<String>) -> Response {
    let store = api.admin.store.clone();
    match tokio::task::spawn_blocking(move || admin::show(&*store, &id)).await {
        Ok(Ok(view)) => Json(view).into_response(),
        Ok(Err(e)) => admin_error(e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Deserialize)]
struct NewClient {
    id: String,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    name: String,
}

async fn add(State(api): State<Api>, Json(body): Json<NewClient>) -> Response {
    let store = api.admin.store.clone();
    let result = tokio::task::spawn_blocking(move || -> Result<_, AdminError> {
        let generated = body.token.is_none().then(crate::directory::generate_token);
        let token = body
            .token
            .as_deref()
            .or(generated.as_deref())
            .unwrap_or_default();
        let record = ClientRecord::new(&body.id, &body.name, token)?;
        store.add(&record)?;
        Ok((admin::show(&*store, &body.id)?, generated))
    })
    .await;
    match result {
        Ok(Ok((view, None))) => (StatusCode::CREATED, Json(view)).into_response(),
        Ok(Ok((view, Some(token)))) => {
            // Shown this once: only its hash is stored.
            let mut body = serde_json::to_value(view).unwrap_or_default();
            body["token"] = serde_json::Value::String(token);
            (StatusCode::CREATED, Json(body)).into_response()
        }
        Ok(Err(e)) => admin_error(e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn op(State(api): State<Api>, Path((id, op)): Path<(String, String)>) -> Response {
    let Some(op) = AdminOp::parse(&op) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("unknown operation `{op}` (pause, resume, block, unblock, kick, remove)"),
        );
    };
    match api.admin.apply(&id, op).await {
        Ok(Some(view)) => Json(view).into_response(),
        Ok(None) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => admin_error(e),
    }
}

#[derive(Deserialize)]
struct Force {
    action: Action,
}

async fn force(
    State(api): State<Api>,
    Path(id): Path<String>,
    Json(body): Json<Force>,
) -> Response {
    match api.admin.force(&id, body.action).await {
        Ok(()) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({"client": id, "action": body.action})),
        )
            .into_response(),
        Err(e) => admin_error(e),
    }
}

async fn sessions(State(api): State<Api>) -> Response {
    let sessions = api
        .shared
        .sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let list: Vec<super::SessionInfo> = sessions
        .values()
        .map(|e| e.info.lock().unwrap_or_else(|e| e.into_inner()).clone())
        .collect();
    Json(list).into_response()
}
