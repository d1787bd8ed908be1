//! The admin HTTP API every edge serves under `/v1/admin/` on `VIGIL_ADMIN_LISTEN`, behind a
//! bearer token: an operator's own (`VIGIL_ADMIN_TOKENS_FILE`, from `vigil operators add`,
//! reloaded when the file changes), or the shared `VIGIL_ADMIN_TOKEN` (operator `admin`).
//! Every operation is audited with the operator's name. Without any token the API is off.
//!
//! - `GET  /v1/admin/openapi.json`: this list as OpenAPI 3.1, generated from the handlers (no
//!   token needed)
//! - `GET  /v1/admin/clients?limit=&after=&status=` (a page in id order; `Link: rel="next"`,
//!   `X-Total-Count`), `GET /v1/admin/clients/{id}`
//! - `POST /v1/admin/clients` with `{"id","token","name"}`; without `token`, a 256-bit one is
//!   generated and returned once, as `token`, in the answer
//! - `POST /v1/admin/clients/{id}/{pause|resume|block|unblock|kick|remove}`
//! - `POST /v1/admin/clients/{id}/action` with `{"action":"sign_out"}`
//! - `GET  /v1/admin/sessions`: this edge's live sessions
//! - `GET  /v1/admin/clients/{id}/reference.jpg`: the photo the client was enrolled from
//! - `POST /v1/admin/clients/{id}/enroll` with `{"photos":["<base64 JPEG>",...]}` (1 to 5,
//!   each within `max_frame_bytes`): the photos go through the broker to a worker with the
//!   model stack, whose quality checks decide; the answer is the verdict (200 with the
//!   similarities, or 422 with the reason)
//! - `GET  /v1/admin/audit/clients/{id}`: the client's audit trail (actions with their
//!   evidence, and administrators' operations) and the chain's verification, read through the
//!   audit writer's API (`VIGIL_AUDIT_API_URL`, [`super::trail`]): no edge reads its folder
//! - `GET  /v1/admin/audit/evidence/{path}`: one evidence frame, the same way
//! - `GET  /console/`: the operator console (static; it signs in with an admin token)

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

use crate::admin::{self, Admin, AdminError, AdminOp};
use crate::directory::{ClientRecord, DirectoryError};
use crate::operators::{Operators, Role};
use crate::policy::Action;

/// What the admin API holds of its edge, and nothing more: its settings and metrics, its live
/// sessions (read-only), the session-token minter, the enrolment path, and what client
/// administration publishes with. Not the sessions' own machinery (the gate, the slots, the
/// token checks, the frame publisher).
pub(super) struct AdminEdge {
    pub cfg: crate::config::EdgeConfig,
    pub metrics: crate::metrics::EdgeMetrics,
    pub edge_id: String,
    pub sessions: Arc<super::registry::Registry<super::SessionEntry>>,
    /// Mints short-lived session tokens, when the private key is configured.
    pub session_minter: Option<crate::session_tokens::Minter>,
    pub enrolments: Arc<super::Enrolments>,
    pub enroll_exchange: String,
    /// The edge's event sequence (the envelope's `seq`).
    pub seq: Arc<std::sync::atomic::AtomicU64>,
    pub store: Arc<dyn crate::directory::ClientStore>,
    /// The operator role's link (`VIGIL_ADMIN_AMQP_URL`), or the edge's own.
    pub publisher: super::PublisherSlot,
    pub control_exchange: String,
    pub actions_exchange: String,
}

struct ApiState {
    operators: OperatorSource,
    admin: Admin,
    edge: AdminEdge,
    /// The audit writer's read API, when `VIGIL_AUDIT_API_URL` names it.
    trail: Option<super::trail::Trail>,
    /// The audit writer's public key (`VIGIL_AUDIT_PUBLIC_KEY`), served for pinning and for
    /// `vigil audit verify` elsewhere.
    audit_key: Option<ed25519_dalek::VerifyingKey>,
    /// Audit views built at once (`VIGIL_ADMIN_AUDIT_VIEWS`).
    audit_views: Arc<tokio::sync::Semaphore>,
    /// The console's files.
    console: super::web::WebAssets,
}

/// Who made a request, and their role (inserted by [`require_token`]).
#[derive(Clone)]
struct Operator(String, Role);

/// The role a request needs, by its method and path: reading the list, the sessions and the
/// trail needs a viewer; biometric images and acting on candidates a proctor; adding,
/// removing and enrolling clients an admin. Anything unlisted needs an admin. Segments are
/// percent-decoded first, as the router's path parameters are: `…/c1/%72emove` is a removal.
fn needed_role(method: &axum::http::Method, path: &str) -> Role {
    let decoded: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    let parts: Vec<&str> = decoded.iter().map(String::as_str).collect();
    let get = method == axum::http::Method::GET;
    match parts.as_slice() {
        ["v1", "admin", "clients", _, "reference.jpg"] if get => Role::Proctor,
        ["v1", "admin", "audit", "evidence", ..] if get => Role::Proctor,
        _ if get => Role::Viewer,
        ["v1", "admin", "clients"] => Role::Admin,
        ["v1", "admin", "clients", _, "enroll" | "remove"] => Role::Admin,
        ["v1", "admin", "clients", _, _] => Role::Proctor,
        ["v1", "admin", "sessions"] => Role::Proctor,
        _ => Role::Admin,
    }
}

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

    fn identify(&self, presented: &str) -> Option<(String, Role)> {
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
        current
            .1
            .identify(presented)
            .map(|(name, role)| (name.to_owned(), role))
    }
}

fn modified(path: &std::path::Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

type Api = Arc<ApiState>;

/// The API's description, generated from the handlers: `GET /v1/admin/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Vigil admin API",
        description = "Operators' API of every Vigil edge: clients, their sessions and tokens, and the audit trail. Every call but this document needs an operator's bearer token, and every change is audited with the operator's name."
    ),
    paths(list, show, add, op, force, mint_session, sessions, reference, enroll, audit_trail, evidence, public_key, me),
    components(schemas(ErrorBody)),
    modifiers(&BearerToken),
    tags(
        (name = "clients", description = "the directory of clients, and operations on them"),
        (name = "sessions", description = "live sessions and short-lived session tokens"),
        (name = "audit", description = "the audit trail, read-only"),
    )
)]
struct ApiDoc;

/// The operators' bearer token, as a security scheme.
struct BearerToken;

impl utoipa::Modify for BearerToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "operator",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(
                            "an operator's token (`vigil operators add`) or VIGIL_ADMIN_TOKEN",
                        ))
                        .build(),
                ),
            );
    }
}

/// The document, rendered once.
fn openapi_json() -> &'static str {
    static JSON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    JSON.get_or_init(|| {
        use utoipa::OpenApi as _;
        ApiDoc::openapi()
            .to_pretty_json()
            .expect("the API description renders")
    })
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], openapi_json()).into_response()
}

/// The audit trail the API shows: the writer's read API, and the writer's public key.
pub(super) struct AuditTrail {
    pub api: Option<super::trail::Trail>,
    pub key: Option<ed25519_dalek::VerifyingKey>,
}

/// Start the API; returns its address.
pub(super) async fn serve(
    listen: SocketAddr,
    limits: crate::telemetry::HttpLimits,
    operators: OperatorSource,
    trail: AuditTrail,
    tls: Option<Arc<crate::telemetry::tls::Tls>>,
    edge: AdminEdge,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let handshakes = crate::telemetry::tls::HandshakeLimits {
        handshake_timeout: std::time::Duration::from_millis(edge.cfg.hello_timeout_ms),
        failed: edge.metrics.admin_tls_failed.clone(),
    };
    let console = super::web::WebAssets::load(&edge.cfg.web_dir.join("console"))
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "no operator console is served (build it with `npm run build` in web/)");
            super::web::WebAssets::default()
        });
    let state = Arc::new(ApiState {
        operators,
        audit_views: Arc::new(tokio::sync::Semaphore::new(edge.cfg.audit_views.max(1))),
        trail: trail.api,
        audit_key: trail.key,
        console,
        admin: Admin {
            store: edge.store.clone(),
            publisher: edge.publisher.clone(),
            control_exchange: edge.control_exchange.clone(),
            actions_exchange: edge.actions_exchange.clone(),
            source: edge.edge_id.clone(),
        },
        edge,
    });
    let shared_limit = state.edge.cfg.max_frame_bytes;
    let refused = state.edge.metrics.admin_connections_refused.clone();
    let app = Router::new()
        .route("/v1/admin/clients", get(list).post(add))
        .route("/v1/admin/clients/{id}", get(show))
        .route("/v1/admin/clients/{id}/action", post(force))
        .route("/v1/admin/clients/{id}/{op}", post(op))
        .route("/v1/admin/sessions", get(sessions).post(mint_session))
        .route("/v1/admin/clients/{id}/reference.jpg", get(reference))
        .route(
            "/v1/admin/clients/{id}/enroll",
            post(enroll).layer(axum::extract::DefaultBodyLimit::max(enroll_body_limit(
                shared_limit,
            ))),
        )
        .route("/v1/admin/audit/key", get(public_key))
        .route("/v1/admin/me", get(me))
        .route("/v1/admin/audit/clients/{id}", get(audit_trail))
        .route("/v1/admin/audit/evidence/{*path}", get(evidence))
        // Authentication runs before any handler, so before a body is read or parsed.
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        // The API's description and the console's static files need no token; everything
        // the console asks for does.
        .route("/v1/admin/openapi.json", get(openapi))
        .route(
            "/console",
            get(|| async { axum::response::Redirect::permanent("/console/") }),
        )
        .route("/console/", get(console_file))
        .route("/console/{file}", get(console_file))
        .with_state(state);
    // Places are taken as TCP connections are accepted: with TLS, before the handshake.
    let listener = crate::telemetry::Guarded::new(listener, limits, refused);
    use crate::telemetry::http::serve;
    match tls {
        None => tokio::spawn(serve(listener, app, limits.header_timeout, shutdown)),
        Some(tls) => {
            let listener = crate::telemetry::tls::TlsListener::new(
                listener,
                tls,
                handshakes,
                shutdown.clone(),
            )?;
            tokio::spawn(serve(listener, app, limits.header_timeout, shutdown))
        }
    };
    Ok(addr)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(ErrorBody {
            error: message.into(),
        }),
    )
        .into_response()
}

/// The operator whose bearer token the request carries (compared in constant time).
fn authorized(api: &ApiState, headers: &HeaderMap) -> Option<(String, Role)> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))?;
    api.operators.identify(presented)
}

/// Refuse a request without a known bearer token before its handler (and its body) runs.
async fn require_token(State(api): State<Api>, mut request: Request, next: Next) -> Response {
    match authorized(&api, request.headers()) {
        Some((operator, role)) => {
            let needed = needed_role(request.method(), request.uri().path());
            if role < needed {
                api.edge
                    .metrics
                    .admin_forbidden
                    .with_label_values(&[role.as_str()])
                    .inc();
                return error(
                    StatusCode::FORBIDDEN,
                    format!(
                        "operator `{operator}` is a {}; this needs a {} or more",
                        role.as_str(),
                        needed.as_str()
                    ),
                );
            }
            // This connection is an operator's now: a full listener never evicts it.
            if let Some(mark) = request
                .extensions()
                .get::<crate::telemetry::http::Authenticated>()
            {
                mark.mark();
            }
            request.extensions_mut().insert(Operator(operator, role));
            next.run(request).await
        }
        None => unauthorized(),
    }
}

/// 401, and the connection is closed after it: a socket without a token keeps no place.
fn unauthorized() -> Response {
    let mut response = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    response.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    response
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
        AdminError::Audit(why) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the audit trail could not take the operation, so it was not made: {why}"),
        ),
        other => error(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
    }
}

/// Clients on a page of the list, when the request does not say.
const DEFAULT_PAGE: usize = 100;
/// The most a request may ask for at once.
const MAX_PAGE: usize = 1000;

/// `GET /v1/admin/clients`'s query.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// Clients per page: 1 to 1000, 100 when unset.
    limit: Option<usize>,
    /// Start after this client id (the `next` of the `Link` header).
    after: Option<String>,
    /// Only clients of this status.
    status: Option<crate::directory::ClientStatus>,
}

/// An error's answer.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct ErrorBody {
    error: String,
}

/// A page of clients, in id order, each with its presence. The `Link` header names the next
/// page (`rel="next"`) when there is one; `X-Total-Count` counts every matching client.
#[utoipa::path(
    get,
    path = "/v1/admin/clients",
    tag = "clients",
    params(ListQuery),
    responses(
        (status = 200, description = "a page of clients", body = [crate::admin::ClientView],
         headers(("link" = String, description = "`<...>; rel=\"next\"` when more follow"),
                 ("x-total-count" = usize, description = "clients matching, on every page"))),
        (status = 400, description = "a bad query", body = ErrorBody),
        (status = 401, description = "no or a wrong bearer token", body = ErrorBody),
    ),
    security(("operator" = []))
)]
async fn list(
    State(api): State<Api>,
    query: Result<axum::extract::Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(axum::extract::Query(q)) = query else {
        return error(
            StatusCode::BAD_REQUEST,
            "query: limit (1 to 1000), after (a client id), status (active, paused, blocked, signed_out)",
        );
    };
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("limit must be within 1..={MAX_PAGE}"),
        );
    }
    if let Some(after) = &q.after
        && crate::directory::check_client_id(after).is_err()
    {
        return error(StatusCode::BAD_REQUEST, "after must be a client id");
    }
    let store = api.admin.store.clone();
    let (after, status) = (q.after.clone(), q.status);
    let page = tokio::task::spawn_blocking(move || {
        admin::list_page(&*store, after.as_deref(), limit, status)
    })
    .await;
    match page {
        Ok(Ok(page)) => {
            let mut response = Json(page.clients).into_response();
            let headers = response.headers_mut();
            headers.insert("x-total-count", page.total.into());
            if let Some(next) = page.next {
                let status = q
                    .status
                    .map(|s| format!("&status={}", s.as_str()))
                    .unwrap_or_default();
                let link =
                    format!("</v1/admin/clients?limit={limit}&after={next}{status}>; rel=\"next\"");
                if let Ok(v) = header::HeaderValue::from_str(&link) {
                    headers.insert(header::LINK, v);
                }
            }
            response
        }
        Ok(Err(e)) => admin_error(e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// One client, with its presence.
#[utoipa::path(
    get,
    path = "/v1/admin/clients/{id}",
    tag = "clients",
    params(("id" = String, Path, description = "the client's id")),
    responses(
        (status = 200, description = "the client", body = crate::admin::ClientView),
        (status = 404, description = "no such client", body = ErrorBody),
    ),
    security(("operator" = []))
)]
async fn show(State(api): State<Api>, Path(id): Path<String>) -> Response {
    let store = api.admin.store.clone();
    match tokio::task::spawn_blocking(move || admin::show(&*store, &id)).await {
        Ok(Ok(view)) => Json(view).into_response(),
        Ok(Err(e)) => admin_error(e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// A client to add.
#[derive(Deserialize, utoipa::ToSchema)]
struct NewClient {
    id: String,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    name: String,
}

/// Add a client (audited). Without `token`, a 256-bit one is generated and returned once, as
/// `token`, in the answer.
#[utoipa::path(
    post,
    path = "/v1/admin/clients",
    tag = "clients",
    request_body = NewClient,
    responses(
        (status = 201, description = "added", body = crate::admin::ClientView),
        (status = 400, description = "a bad id or a weak token", body = ErrorBody),
        (status = 409, description = "the id is taken", body = ErrorBody),
    ),
    security(("operator" = []))
)]
async fn add(
    State(api): State<Api>,
    Extension(Operator(operator, _)): Extension<Operator>,
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

/// An operation on a client (audited): `pause`, `resume`, `block`, `unblock`, `kick`,
/// `remove`, `challenge` (a liveness challenge now), `readmit` (after a sign-out).
#[utoipa::path(
    post,
    path = "/v1/admin/clients/{id}/{op}",
    tag = "clients",
    params(("id" = String, Path, description = "the client's id"),
           ("op" = String, Path, description = "pause, resume, block, unblock, kick, remove, challenge or readmit")),
    responses(
        (status = 200, description = "done; the client as it is now", body = crate::admin::ClientView),
        (status = 204, description = "done (remove, kick, challenge)"),
        (status = 404, description = "no such client or operation", body = ErrorBody),
    ),
    security(("operator" = []))
)]
async fn op(
    State(api): State<Api>,
    Extension(Operator(operator, _)): Extension<Operator>,
    Path((id, op)): Path<(String, String)>,
) -> Response {
    let Some(op) = AdminOp::parse(&op) else {
        return error(
            StatusCode::NOT_FOUND,
            format!(
                "unknown operation `{op}` (pause, resume, block, unblock, kick, remove, challenge, readmit)"
            ),
        );
    };
    match api.admin.apply(&id, op, &operator).await {
        Ok(Some(view)) => Json(view).into_response(),
        Ok(None) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => admin_error(e),
    }
}

/// An action to enforce now.
#[derive(Deserialize, serde::Serialize, utoipa::ToSchema)]
struct Force {
    action: Action,
}

/// A forced action, accepted.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct Forced {
    client: String,
    action: Action,
}

/// Enforce an action on a client now, through the policy's own path (audited, webhooks
/// included).
#[utoipa::path(
    post,
    path = "/v1/admin/clients/{id}/action",
    tag = "clients",
    params(("id" = String, Path, description = "the client's id")),
    request_body = Force,
    responses(
        (status = 202, description = "accepted", body = Forced),
        (status = 404, description = "no such client", body = ErrorBody),
    ),
    security(("operator" = []))
)]
async fn force(
    State(api): State<Api>,
    Extension(Operator(operator, _)): Extension<Operator>,
    Path(id): Path<String>,
    Json(body): Json<Force>,
) -> Response {
    match api.admin.force(&id, body.action, &operator).await {
        Ok(()) => (
            StatusCode::ACCEPTED,
            Json(Forced {
                client: id,
                action: body.action,
            }),
        )
            .into_response(),
        Err(e) => admin_error(e),
    }
}

/// A session token to mint.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewSession {
    client_id: String,
    /// Seconds; `sessions.max_ttl_s` at most. One hour when unset.
    #[serde(default)]
    ttl_s: Option<u64>,
}

/// A minted session token.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct Minted {
    client_id: String,
    /// An EdDSA JWT: the hello's `token`. Never logged or stored.
    token: String,
    /// RFC 3339.
    expires_at: String,
    /// Unix seconds.
    expires_at_s: u64,
}

/// Mint a short-lived session token for one client, for its exam platform's back end to hand to
/// the candidate's page. The client must exist and be allowed in (not blocked or signed out).
/// Audited with the operator; the token itself is never logged or stored.
#[utoipa::path(
    post,
    path = "/v1/admin/sessions",
    tag = "sessions",
    request_body = NewSession,
    responses(
        (status = 201, description = "minted", body = Minted),
        (status = 400, description = "a ttl_s over the maximum", body = ErrorBody),
        (status = 404, description = "no such client", body = ErrorBody),
        (status = 409, description = "the client is blocked or signed out", body = ErrorBody),
        (status = 501, description = "session tokens are off on this edge", body = ErrorBody),
    ),
    security(("operator" = []))
)]
async fn mint_session(
    State(api): State<Api>,
    Extension(Operator(operator, _)): Extension<Operator>,
    Json(body): Json<NewSession>,
) -> Response {
    let Some(minter) = api.edge.session_minter.as_ref() else {
        return error(
            StatusCode::NOT_IMPLEMENTED,
            "session tokens are off on this edge: set VIGIL_SESSION_KEY (`vigil sessions keygen`)",
        );
    };
    let store = api.admin.store.clone();
    let id = body.client_id.clone();
    let record = match tokio::task::spawn_blocking(move || store.get(&id)).await {
        Ok(Ok(Some(r))) => r,
        Ok(Ok(None)) | Ok(Err(DirectoryError::BadId(_))) => {
            return admin_error(AdminError::NotFound(body.client_id));
        }
        Ok(Err(e)) => return admin_error(AdminError::Directory(e)),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    if matches!(
        record.status,
        crate::directory::ClientStatus::Blocked | crate::directory::ClientStatus::SignedOut
    ) {
        return error(
            StatusCode::CONFLICT,
            format!(
                "client `{}` is blocked or signed out: unblock or re-admit it first",
                record.id
            ),
        );
    }
    let ttl_s = body.ttl_s.unwrap_or(3600);
    let now_ms = crate::wire::now_ms();
    let (token, expires_at) =
        match minter.mint(&record.id, &record.session_binding(), ttl_s, now_ms) {
            Ok(minted) => minted,
            Err(e @ crate::session_tokens::SessionTokenError::Ttl { .. }) => {
                return error(StatusCode::BAD_REQUEST, e.to_string());
            }
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        };
    if let Err(e) = api.admin.audit(&record.id, "mint_session", &operator).await {
        // An unaudited token is not handed out.
        return admin_error(e);
    }
    api.edge.metrics.session_tokens_minted.inc();
    let expires = std::time::UNIX_EPOCH + std::time::Duration::from_secs(expires_at);
    (
        StatusCode::CREATED,
        Json(Minted {
            client_id: record.id,
            token,
            expires_at: humantime::format_rfc3339_seconds(expires).to_string(),
            expires_at_s: expires_at,
        }),
    )
        .into_response()
}

/// This edge's live sessions.
#[utoipa::path(
    get,
    path = "/v1/admin/sessions",
    tag = "sessions",
    responses((status = 200, description = "the sessions this edge holds", body = [super::SessionInfo])),
    security(("operator" = []))
)]
async fn sessions(State(api): State<Api>) -> Response {
    let sessions = api.edge.sessions.lock();
    let list: Vec<super::SessionInfo> = sessions
        .values()
        .map(|e| e.info.lock().unwrap_or_else(|e| e.into_inner()).clone())
        .collect();
    Json(list).into_response()
}

/// A file of the operator console, with the page's security headers.
async fn console_file(State(api): State<Api>, request: Request) -> Response {
    let path = request.uri().path().strip_prefix("/console").unwrap_or("/");
    match api.console.file(if path.is_empty() { "/" } else { path }) {
        Some((content_type, body)) => {
            let mut response = (StatusCode::OK, body).into_response();
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(content_type),
            );
            for (name, value) in super::web::SECURITY_HEADERS {
                headers.insert(*name, header::HeaderValue::from_static(value));
            }
            response
        }
        None => error(StatusCode::NOT_FOUND, "not found"),
    }
}

fn jpeg(bytes: Vec<u8>) -> Response {
    let mut response = (StatusCode::OK, bytes).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("image/jpeg"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("private, max-age=3600"),
    );
    headers.insert(
        "x-content-type-options",
        header::HeaderValue::from_static("nosniff"),
    );
    response
}

/// The photo the client was enrolled from.
#[utoipa::path(
    get,
    path = "/v1/admin/clients/{id}/reference.jpg",
    tag = "clients",
    params(("id" = String, Path, description = "the client's id")),
    responses(
        (status = 200, description = "the JPEG", content_type = "image/jpeg", body = Vec<u8>),
        (status = 404, description = "no reference photo", body = ErrorBody),
    ),
    security(("operator" = []))
)]
async fn reference(
    State(api): State<Api>,
    Extension(Operator(operator, _)): Extension<Operator>,
    Path(id): Path<String>,
) -> Response {
    let store = api.admin.store.clone();
    let client = id.clone();
    match tokio::task::spawn_blocking(move || store.reference_photo(&id)).await {
        Ok(Ok(Some(bytes))) => {
            match read_audited(&api, &client, "read:reference", &operator, String::new()).await {
                Ok(()) => jpeg(bytes),
                Err(refused) => refused,
            }
        }
        Ok(Ok(None)) => error(StatusCode::NOT_FOUND, "no reference photo"),
        Ok(Err(e)) => admin_error(AdminError::Directory(e)),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// One client's trail, newest first, and whether the whole chain holds.
#[utoipa::path(
    get,
    path = "/v1/admin/audit/clients/{id}",
    tag = "audit",
    params(("id" = String, Path, description = "the client's id")),
    responses(
        (status = 200, description = "`{client, chain, reference, entries}`: entries of kind `action`, `admin`, `session`, `prune`, newest first", body = Object),
        (status = 502, description = "the audit writer's API is unreachable or refused this edge", body = ErrorBody),
        (status = 503, description = "no VIGIL_AUDIT_API_URL, no audit log yet, or no turn for the view", body = ErrorBody),
        (status = 504, description = "the audit writer did not answer within VIGIL_ADMIN_AUDIT_VIEW_WAIT_MS", body = ErrorBody),
    ),
    security(("operator" = []))
)]
async fn audit_trail(State(api): State<Api>, Path(id): Path<String>) -> Response {
    let Some(trail) = &api.trail else {
        return no_trail(&api);
    };
    let _turn = match audit_turn(&api).await {
        Ok(turn) => turn,
        Err(refused) => return refused,
    };
    let mut view = match trail.view(&id).await {
        Ok(view) => view,
        Err(unread) => return unread_error(unread),
    };
    // A writer that checks the trail under another key than the one this edge publishes for
    // pinning is not shown as if it were the same.
    if let Some(key) = &api.audit_key {
        let expected = crate::audit::signing::fingerprint(key);
        if view["key"].as_str() != Some(expected.as_str()) {
            api.edge
                .metrics
                .audit_api_failed
                .with_label_values(&["key"])
                .inc();
            return error(
                StatusCode::BAD_GATEWAY,
                format!(
                    "the audit writer checks the trail under key {} and this edge's \
                     VIGIL_AUDIT_PUBLIC_KEY is {expected}: the trail is not shown",
                    view["key"].as_str().unwrap_or("none")
                ),
            );
        }
    }
    // The writer names each frame by its place in its folder; the console asks this API for
    // it, by a name no URL normalisation can turn into another route.
    if let Some(entries) = view["entries"].as_array_mut() {
        for evidence in entries
            .iter_mut()
            .filter_map(|e| e["evidence"].as_array_mut())
        {
            evidence.retain_mut(|frame| {
                let Some(file) = frame["file"]
                    .as_str()
                    .filter(|f| crate::audit::is_evidence_frame(f))
                else {
                    tracing::warn!(file = %frame["file"], "the audit writer named an evidence frame by an unexpected path; left out");
                    return false;
                };
                frame["url"] = serde_json::Value::String(format!("/v1/admin/audit/{file}"));
                true
            });
        }
    }
    let store = api.admin.store.clone();
    let client = id.clone();
    let reference = tokio::task::spawn_blocking(move || {
        store
            .get(&client)
            .ok()
            .flatten()
            .and_then(|r| r.reference)
            .map(|_| format!("/v1/admin/clients/{client}/reference.jpg"))
    })
    .await
    .ok()
    .flatten();
    view["reference"] = reference.map_or(serde_json::Value::Null, serde_json::Value::String);
    Json(view).into_response()
}

/// A turn among the audit reads in flight (`VIGIL_ADMIN_AUDIT_VIEWS`): a few at once, the
/// others wait within `VIGIL_ADMIN_AUDIT_VIEW_WAIT_MS`, then 503 (counted).
async fn audit_turn(api: &ApiState) -> Result<tokio::sync::OwnedSemaphorePermit, Response> {
    let wait = std::time::Duration::from_millis(api.edge.cfg.audit_view_wait_ms);
    match tokio::time::timeout(wait, api.audit_views.clone().acquire_owned()).await {
        Ok(Ok(turn)) => Ok(turn),
        _ => {
            api.edge.metrics.audit_views_refused.inc();
            Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many audit views at once; retry shortly",
            ))
        }
    }
}

/// 503: this edge has no audit writer's API to read the trail from.
fn no_trail(api: &ApiState) -> Response {
    api.edge
        .metrics
        .audit_api_failed
        .with_label_values(&["unset"])
        .inc();
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "this edge has no VIGIL_AUDIT_API_URL: the audit trail is read through the audit \
         writer's API (VIGIL_AUDIT_API_LISTEN)",
    )
}

fn unread_error(unread: super::trail::Unread) -> Response {
    error(
        StatusCode::from_u16(unread.status).unwrap_or(StatusCode::BAD_GATEWAY),
        unread.message,
    )
}

/// Biometric data is shown only once its reading is in the trail: with no broker to take the
/// entry, the read is refused (503).
async fn read_audited(
    api: &ApiState,
    client: &str,
    operation: &str,
    operator: &str,
    detail: String,
) -> Result<(), Response> {
    api.admin
        .audit_with(client, operation, operator, detail)
        .await
        .map_err(|e| {
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the read could not be audited, so it is refused: {e}"),
            )
        })
}

/// Who the caller is and what their role allows: the console shows it.
#[utoipa::path(
    get,
    path = "/v1/admin/me",
    tag = "clients",
    responses(
        (status = 200, description = "`{operator, role}`: the role is `viewer`, `proctor` or `admin`", body = Object),
    ),
    security(("operator" = []))
)]
async fn me(Extension(Operator(operator, role)): Extension<Operator>) -> Response {
    Json(serde_json::json!({"operator": operator, "role": role})).into_response()
}

/// The audit writer's public key, for verifying the trail elsewhere and for pinning.
#[utoipa::path(
    get,
    path = "/v1/admin/audit/key",
    tag = "audit",
    responses(
        (status = 200, description = "`{public_key, fingerprint}`: the PEM of `vigil audit keygen`'s `.pub`, and the SHA-256 of its DER form, first 16 bytes, hex", body = Object),
        (status = 404, description = "this edge has no VIGIL_AUDIT_PUBLIC_KEY", body = ErrorBody),
    ),
    security(("operator" = []))
)]
async fn public_key(State(api): State<Api>) -> Response {
    match &api.audit_key {
        Some(key) => Json(serde_json::json!({
            "public_key": crate::audit::signing::public_pem(key),
            "fingerprint": crate::audit::signing::fingerprint(key),
        }))
        .into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "this edge has no VIGIL_AUDIT_PUBLIC_KEY: the trail it shows is checked without the \
             writer's key",
        ),
    }
}

/// One evidence frame of the audit trail (inside the evidence folder only).
#[utoipa::path(
    get,
    path = "/v1/admin/audit/evidence/{path}",
    tag = "audit",
    params(("path" = String, Path, description = "the frame's path, as the trail names it")),
    responses(
        (status = 200, description = "the JPEG", content_type = "image/jpeg", body = Vec<u8>),
        (status = 404, description = "no such frame, or none its client's checked entries name", body = ErrorBody),
        (status = 409, description = "the frame, or the entry naming it, changed after it was written", body = ErrorBody),
        (status = 502, description = "the audit writer's API is unreachable or refused this edge", body = ErrorBody),
        (status = 503, description = "no VIGIL_AUDIT_API_URL, or no turn for the read", body = ErrorBody),
    ),
    security(("operator" = []))
)]
async fn evidence(
    State(api): State<Api>,
    Extension(Operator(operator, _)): Extension<Operator>,
    Path(path): Path<String>,
) -> Response {
    let file = format!("evidence/{path}");
    if !crate::audit::is_evidence_frame(&file) {
        return error(StatusCode::NOT_FOUND, "not an evidence frame");
    }
    let Some(trail) = &api.trail else {
        return no_trail(&api);
    };
    // evidence/<day>/<client>/<evidence id>/frame-<id>.jpg
    let client = path.split('/').nth(1).unwrap_or_default().to_owned();
    // Served only as the trail recorded it: the writer checks the frame against the SHA-256
    // its (checked) entry holds, and the read waits its turn with the audit views.
    let turn = match audit_turn(&api).await {
        Ok(turn) => turn,
        Err(refused) => return refused,
    };
    let bytes = match trail.evidence(&path).await {
        Ok(bytes) => bytes,
        Err(unread) => return unread_error(unread),
    };
    drop(turn);
    match read_audited(&api, &client, "read:evidence", &operator, file).await {
        Ok(()) => jpeg(bytes),
        Err(refused) => refused,
    }
}

/// How long an enrolment may wait for a worker's answer.
const ENROLL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The largest enrolment body: every photo at the frame limit, in base64, plus the JSON.
fn enroll_body_limit(max_frame_bytes: usize) -> usize {
    crate::wire::MAX_ENROLL_PHOTOS * max_frame_bytes.div_ceil(3) * 4 + 4096
}

/// Photos to enrol from.
#[derive(Deserialize, utoipa::ToSchema)]
struct EnrollBody {
    /// 1 to 5 JPEGs, base64 (a `data:` URL prefix is allowed), each within the frame limits.
    photos: Vec<String>,
}

/// Enrol a client from photos: checked here like frames, judged by a worker's model stack
/// (a request and its answer over the broker), saved in the directory, and audited.
#[utoipa::path(
    post,
    path = "/v1/admin/clients/{id}/enroll",
    tag = "clients",
    params(("id" = String, Path, description = "the client's id")),
    request_body = EnrollBody,
    responses(
        (status = 200, description = "enrolled: each photo's similarity to the template", body = Object),
        (status = 400, description = "not 1 to 5 JPEGs", body = ErrorBody),
        (status = 413, description = "a photo over the frame limits", body = ErrorBody),
        (status = 422, description = "refused by the quality checks, with the reason", body = ErrorBody),
        (status = 504, description = "no worker answered in time", body = ErrorBody),
    ),
    security(("operator" = []))
)]
async fn enroll(
    State(api): State<Api>,
    Extension(Operator(operator, _)): Extension<Operator>,
    Path(id): Path<String>,
    Json(body): Json<EnrollBody>,
) -> Response {
    use base64::Engine as _;
    let edge = &api.edge;
    let max = crate::wire::MAX_ENROLL_PHOTOS;
    if body.photos.is_empty() || body.photos.len() > max {
        return error(StatusCode::BAD_REQUEST, format!("send 1 to {max} photos"));
    }
    let mut photos = Vec::new();
    for (i, b64) in body.photos.iter().enumerate() {
        let n = i + 1;
        let text = b64.split_once(";base64,").map_or(b64.as_str(), |(_, b)| b);
        let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(text.trim()) else {
            return error(StatusCode::BAD_REQUEST, format!("photo {n} is not base64"));
        };
        if bytes.len() > edge.cfg.max_frame_bytes {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("photo {n} is over {} bytes", edge.cfg.max_frame_bytes),
            );
        }
        let checked = crate::wire::jpeg::info(&bytes).and_then(|info| {
            crate::wire::jpeg::check_supported(&info)?;
            Ok(info)
        });
        match checked {
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("photo {n}: {e}")),
            Ok(info) if info.pixels() > edge.cfg.max_frame_pixels => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("photo {n}: {} pixels is over the limit", info.pixels()),
                );
            }
            Ok(_) => photos.push(bytes),
        }
    }
    let old_template = match api.admin.store.get(&id) {
        Ok(Some(record)) => record.reference.map(|r| r.embedding_b64),
        Ok(None) => return admin_error(AdminError::NotFound(id)),
        Err(e) => return admin_error(AdminError::Directory(e)),
    };
    // The request, and a place for its answer (the reply consumer fills it).
    let request_id = uuid::Uuid::now_v7();
    // However this handler ends (answered, timed out, or dropped because the operator went
    // away), the waiting place goes with it.
    let (rx, _waiting) = edge.enrolments.wait(request_id);
    let now = crate::wire::now_ms();
    let env = crate::wire::Envelope {
        schema: crate::wire::SCHEMA,
        id: request_id,
        source: edge.edge_id.clone(),
        seq: edge.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        client_id: id.clone(),
        produced_at_ms: now,
        deadline_ms: now + ENROLL_TIMEOUT.as_millis() as u64,
        traceparent: crate::wire::new_traceparent(),
        payload: crate::wire::Payload::EnrollRequest(crate::wire::EnrollRequest {
            photos: photos
                .iter()
                .map(|p| serde_bytes::ByteBuf::from(p.clone()))
                .collect(),
        }),
    };
    let published = async {
        edge.publisher
            .get()
            .publish(&edge.enroll_exchange, "", &env)
            .await?
            .wait()
            .await
    };
    match tokio::time::timeout(std::time::Duration::from_secs(10), published).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the broker did not take the request: {e}"),
            );
        }
        Err(_) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the broker did not confirm the request within 10 s",
            );
        }
    }
    let outcome = match tokio::time::timeout(ENROLL_TIMEOUT, rx).await {
        Ok(Ok(outcome)) => outcome,
        _ => {
            return error(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "no worker with the model stack answered within {} s",
                    ENROLL_TIMEOUT.as_secs()
                ),
            );
        }
    };
    let (embedding, model, similarities, margin) = match outcome {
        crate::wire::EnrollOutcome::Refused { reason } => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("enrolment refused: {reason}"),
            );
        }
        crate::wire::EnrollOutcome::Enrolled {
            embedding,
            model,
            similarities,
            margin,
        } => (embedding, model, similarities, margin),
    };
    // The trail's entry, with the photos' and templates' hashes, before the reference is
    // replaced: with no broker to take it, nothing changes.
    let embedding_b64 = base64::engine::general_purpose::STANDARD.encode(&embedding);
    let detail = crate::admin::enrollment_detail(&photos, old_template.as_deref(), &embedding_b64);
    if let Err(e) = api.admin.audit_with(&id, "enroll", &operator, detail).await {
        return admin_error(e);
    }
    let store = api.admin.store.clone();
    let (client, first, model_name) = (id.clone(), photos.swap_remove(0), model.clone());
    let saved = tokio::task::spawn_blocking(move || -> Result<(), AdminError> {
        let photo_file = store.put_reference_photo(&client, &first)?;
        let reference = crate::directory::Reference {
            embedding_b64,
            photo_file,
            model: model_name,
            enrolled_at_ms: crate::wire::now_ms(),
        };
        // Only the reference changes: a block made while the worker enrolled stays.
        store.update(&client, &mut |record| {
            record.reference = Some(reference.clone());
        })?;
        Ok(())
    })
    .await;
    let failed = match saved {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(admin_error(e)),
        Err(e) => Some(error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    };
    if let Some(response) = failed {
        let note = api
            .admin
            .audit_with(&id, "enroll:failed", &operator, String::new());
        if let Err(e) = note.await {
            tracing::warn!(error = %e, client = %id, "the failed enrolment's entry was not audited");
        }
        return response;
    }
    Json(serde_json::json!({
        "client": id, "model": model, "photos": similarities.len(),
        "similarities": similarities, "margin": margin,
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `/v1/admin/` route this file gives the router, in OpenAPI's spelling.
    fn routed() -> std::collections::BTreeSet<String> {
        let source = include_str!("admin_api.rs");
        let mut paths = std::collections::BTreeSet::new();
        for part in source.split(".route(").skip(1) {
            let Some(path) = part
                .trim_start()
                .strip_prefix('"')
                .and_then(|p| p.split('"').next())
            else {
                continue;
            };
            if path.starts_with("/v1/admin/") && path != "/v1/admin/openapi.json" {
                paths.insert(path.replace("{*", "{"));
            }
        }
        paths
    }

    #[test]
    fn each_route_needs_its_role_however_its_path_is_spelled() {
        use axum::http::Method;
        let (get, post) = (Method::GET, Method::POST);
        assert_eq!(needed_role(&get, "/v1/admin/clients"), Role::Viewer);
        assert_eq!(
            needed_role(&get, "/v1/admin/audit/clients/c1"),
            Role::Viewer
        );
        assert_eq!(
            needed_role(&get, "/v1/admin/clients/c1/reference.jpg"),
            Role::Proctor
        );
        assert_eq!(
            needed_role(&get, "/v1/admin/audit/evidence/d/c1/e/f.jpg"),
            Role::Proctor
        );
        assert_eq!(
            needed_role(&post, "/v1/admin/clients/c1/block"),
            Role::Proctor
        );
        assert_eq!(needed_role(&post, "/v1/admin/sessions"), Role::Proctor);
        assert_eq!(needed_role(&post, "/v1/admin/clients"), Role::Admin);
        assert_eq!(
            needed_role(&post, "/v1/admin/clients/c1/remove"),
            Role::Admin
        );
        assert_eq!(
            needed_role(&post, "/v1/admin/clients/c1/enroll"),
            Role::Admin
        );
        assert_eq!(needed_role(&post, "/v1/admin/unknown"), Role::Admin);
        // The router decodes path parameters: so does the role check.
        assert_eq!(
            needed_role(&post, "/v1/admin/clients/c1/%72emove"),
            Role::Admin
        );
        assert_eq!(
            needed_role(&post, "/v1/admin/clients/c1/%65nroll"),
            Role::Admin
        );
        assert_eq!(
            needed_role(&get, "/v1/admin/clients/c1/reference%2Ejpg"),
            Role::Proctor
        );
        assert_eq!(
            needed_role(&get, "/v1/admin/%61udit/evidence/x.jpg"),
            Role::Proctor
        );
    }

    #[test]
    fn the_openapi_document_is_3_1_and_describes_every_route() {
        let doc: serde_json::Value = serde_json::from_str(openapi_json()).unwrap();
        assert!(
            doc["openapi"].as_str().unwrap().starts_with("3.1"),
            "{}",
            doc["openapi"]
        );
        let described: std::collections::BTreeSet<String> =
            doc["paths"].as_object().unwrap().keys().cloned().collect();
        let routed = routed();
        assert!(routed.len() >= 9, "{routed:?}");
        assert_eq!(described, routed, "every route described, nothing else");
        // Every operation but the document itself needs the operator's token.
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for (method, op) in ops.as_object().unwrap() {
                assert_eq!(
                    op["security"][0]["operator"],
                    serde_json::json!([]),
                    "{method} {path}"
                );
            }
        }
        assert_eq!(
            doc["components"]["securitySchemes"]["operator"]["scheme"],
            "bearer"
        );
        let view = &doc["components"]["schemas"]["ClientView"]["properties"];
        assert!(view["status"].is_object() && view["connection"].is_object());
    }
}
