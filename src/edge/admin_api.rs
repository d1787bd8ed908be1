//! The admin HTTP API every edge serves under `/v1/admin/` on `VIGIL_ADMIN_LISTEN`, behind a
//! bearer token: an operator's own (`VIGIL_ADMIN_TOKENS_FILE`, from `vigil operators add`,
//! reloaded when the file changes), or the shared `VIGIL_ADMIN_TOKEN` (operator `admin`).
//! Every operation is audited with the operator's name. Without any token the API is off.
//!
//! - `GET  /v1/admin/clients`, `GET /v1/admin/clients/{id}`
//! - `POST /v1/admin/clients` with `{"id","token","name"}`; without `token`, a 256-bit one is
//!   generated and returned once, as `token`, in the answer
//! - `POST /v1/admin/clients/{id}/{pause|resume|block|unblock|kick|remove}`
//! - `POST /v1/admin/clients/{id}/action` with `{"action":"sign_out"}`
//! - `GET  /v1/admin/sessions`: this edge's live sessions

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Extension, Path, Request, State};
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
use crate::operators::Operators;
use crate::policy::Action;

struct ApiState {
    operators: OperatorSource,
    admin: Admin,
    shared: Arc<Shared>,
}

/// Who made a request (inserted by [`require_token`]).
#[derive(Clone)]
struct Operator(String);

/// The accepted tokens, reloaded when the operators file changes.
pub(super) struct OperatorSource {
    file: Option<std::path::PathBuf>,
    shared: Option<String>,
    current: std::sync::RwLock<(Option<std::time::SystemTime>, Operators)>,
}

impl OperatorSource {
    pub(super) fn new(
        file: Option<std::path::PathBuf>,
        shared: Option<String>,
    ) -> Result<Self, crate::operators::OperatorError> {
        let modified = file.as_deref().and_then(modified);
        let operators = Operators::load(file.as_deref(), shared.as_deref())?;
        Ok(Self {
            file,
            shared,
            current: std::sync::RwLock::new((modified, operators)),
        })
    }

    fn identify(&self, presented: &str) -> Option<String> {
        if let Some(file) = &self.file {
            let now = modified(file);
            let stale = self.current.read().unwrap_or_else(|e| e.into_inner()).0 != now;
            if stale {
                match Operators::load(Some(file), self.shared.as_deref()) {
                    Ok(fresh) => {
                        *self.current.write().unwrap_or_else(|e| e.into_inner()) = (now, fresh);
                    }
                    // Keep the tokens in force; say why the new ones are not.
                    Err(e) => tracing::warn!(error = %e, "operators file not reloaded"),
                }
            }
        }
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        current.1.identify(presented).map(str::to_owned)
    }
}

fn modified(path: &std::path::Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

type Api = Arc<ApiState>;

/// TLS handshakes the admin API runs at once; more connections wait in the kernel's backlog.
const MAX_TLS_HANDSHAKES: usize = 256;

/// Start the API; returns its address.
pub(super) async fn serve(
    listen: SocketAddr,
    operators: OperatorSource,
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
        operators,
        admin: Admin {
            store: shared.store.clone(),
            publisher: shared.publisher.clone(),
            control_exchange: shared.control_exchange.clone(),
            actions_exchange: shared.actions_exchange.clone(),
            source: shared.edge_id.clone(),
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

/// The operator whose bearer token the request carries (compared in constant time).
fn authorized(api: &ApiState, headers: &HeaderMap) -> Option<String> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))?;
    api.operators.identify(presented)
}

/// Refuse a request without a known bearer token before its handler (and its body) runs.
async fn require_token(State(api): State<Api>, mut request: Request, next: Next) -> Response {
    match authorized(&api, request.headers()) {
        Some(operator) => {
            request.extensions_mut().insert(Operator(operator));
            next.run(request).await
        }
        None => unauthorized(),
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

async fn add(
    State(api): State<Api>,
    Extension(Operator(operator)): Extension<Operator>,
    Json(body): Json<NewClient>,
) -> Response {
    let generated = body.token.is_none().then(crate::directory::generate_token);
    let token = body.token.clone().or(generated.clone()).unwrap_or_default();
    // Hashing the token (argon2) is slow on purpose: off the async threads.
    let record = tokio::task::spawn_blocking(move || {
        ClientRecord::new(&body.id, &body.name, &token).map_err(AdminError::from)
    })
    .await;
    let record = match record {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return admin_error(e),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    match (api.admin.add(record, &operator).await, generated) {
        (Ok(view), None) => (StatusCode::CREATED, Json(view)).into_response(),
        (Ok(view), Some(token)) => {
            // Shown this once: only its hash is stored.
            let mut body = serde_json::to_value(view).unwrap_or_default();
            body["token"] = serde_json::Value::String(token);
            (StatusCode::CREATED, Json(body)).into_response()
        }
        (Err(e), _) => admin_error(e),
    }
}

async fn op(
    State(api): State<Api>,
    Extension(Operator(operator)): Extension<Operator>,
    Path((id, op)): Path<(String, String)>,
) -> Response {
    let Some(op) = AdminOp::parse(&op) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("unknown operation `{op}` (pause, resume, block, unblock, kick, remove)"),
        );
    };
    match api.admin.apply(&id, op, &operator).await {
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
    Extension(Operator(operator)): Extension<Operator>,
    Path(id): Path<String>,
    Json(body): Json<Force>,
) -> Response {
    match api.admin.force(&id, body.action, &operator).await {
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
