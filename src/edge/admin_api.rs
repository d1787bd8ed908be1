//! The admin HTTP API every edge serves under `/v1/admin/` on `VIGIL_ADMIN_LISTEN`, behind a
//! bearer token (`VIGIL_ADMIN_TOKEN`). Without the token configured the API is off.
//!
//! - `GET  /v1/admin/clients`, `GET /v1/admin/clients/{id}`
//! - `POST /v1/admin/clients` with `{"id","token","name"}`
//! - `POST /v1/admin/clients/{id}/{pause|resume|block|unblock|kick|remove}`
//! - `POST /v1/admin/clients/{id}/action` with `{"action":"sign_out"}`
//! - `GET  /v1/admin/sessions`: this edge's live sessions

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
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

/// Start the API; returns its address.
pub(super) async fn serve(
    listen: SocketAddr,
    token: String,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
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
        .with_state(state);
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
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let want = api.token.as_bytes();
    presented.len() == want.len()
        && presented
            .bytes()
            .zip(want)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
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

async fn list(State(api): State<Api>, headers: HeaderMap) -> Response {
    if !authorized(&api, &headers) {
        return unauthorized();
    }
    let store = api.admin.store.clone();
    match tokio::task::spawn_blocking(move || admin::list(&*store)).await {
        Ok(Ok(views)) => Json(views).into_response(),
        Ok(Err(e)) => admin_error(e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn show(State(api): State<Api>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if !authorized(&api, &headers) {
        return unauthorized();
    }
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
    token: String,
    #[serde(default)]
    name: String,
}

async fn add(State(api): State<Api>, headers: HeaderMap, Json(body): Json<NewClient>) -> Response {
    if !authorized(&api, &headers) {
        return unauthorized();
    }
    let store = api.admin.store.clone();
    let result = tokio::task::spawn_blocking(move || -> Result<_, AdminError> {
        let record = ClientRecord::new(&body.id, &body.name, &body.token)?;
        store.add(&record)?;
        admin::show(&*store, &body.id)
    })
    .await;
    match result {
        Ok(Ok(view)) => (StatusCode::CREATED, Json(view)).into_response(),
        Ok(Err(e)) => admin_error(e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn op(
    State(api): State<Api>,
    headers: HeaderMap,
    Path((id, op)): Path<(String, String)>,
) -> Response {
    if !authorized(&api, &headers) {
        return unauthorized();
    }
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
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(body): Json<Force>,
) -> Response {
    if !authorized(&api, &headers) {
        return unauthorized();
    }
    match api.admin.force(&id, body.action).await {
        Ok(()) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({"client": id, "action": body.action})),
        )
            .into_response(),
        Err(e) => admin_error(e),
    }
}

async fn sessions(State(api): State<Api>, headers: HeaderMap) -> Response {
    if !authorized(&api, &headers) {
        return unauthorized();
    }
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
