//! Every `VIGIL_*` variable, listed once: its name, the services that read it, its default as
//! a person reads it, what it means, and the [`Config`] field it sets. `Config::load` applies
//! them in this order; the README's table is generated from them (`vigil config vars`), and a
//! test keeps the two equal.

use std::fmt::Write as _;

use super::Config;

/// A service that reads a setting. Each service validates only its own settings; the `vigil`
/// CLI reads and validates them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Edge,
    Worker,
    Audit,
}

impl Role {
    /// The service's binary.
    pub fn binary(self) -> &'static str {
        match self {
            Role::Edge => "vigil-edge",
            Role::Worker => "vigil-worker",
            Role::Audit => "vigil-audit",
        }
    }
}

/// One environment variable.
#[derive(serde::Serialize)]
pub struct Var {
    pub name: &'static str,
    pub roles: &'static [Role],
    pub default: &'static str,
    pub meaning: &'static str,
    #[serde(skip)]
    apply: fn(&mut Config, &str) -> Result<(), String>,
}

impl Var {
    /// Set this variable's field from its raw value.
    pub(super) fn apply(&self, cfg: &mut Config, raw: &str) -> Result<(), String> {
        (self.apply)(cfg, raw)
    }
}

fn parse<T: std::str::FromStr>(raw: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    raw.trim().parse().map_err(|e: T::Err| e.to_string())
}

/// The secret in the file at `path` (a URL with its password, say), its trailing line end cut.
fn read_secret(path: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path.trim()).map_err(|e| format!("{path}: {e}"))?;
    let secret = text.trim_end_matches(['\n', '\r']).to_owned();
    if secret.is_empty() {
        return Err(format!("{path} is empty"));
    }
    Ok(secret)
}

macro_rules! var {
    ($name:literal, [$($role:ident),+], opt $($field:ident).+, $default:literal, $meaning:literal) => {
        Var {
            name: $name,
            roles: &[$(Role::$role),+],
            default: $default,
            meaning: $meaning,
            apply: |cfg, raw| {
                cfg.$($field).+ = Some(parse(raw)?);
                Ok(())
            },
        }
    };
    ($name:literal, [$($role:ident),+], $($field:ident).+, $default:literal, $meaning:literal) => {
        Var {
            name: $name,
            roles: &[$(Role::$role),+],
            default: $default,
            meaning: $meaning,
            apply: |cfg, raw| {
                cfg.$($field).+ = parse(raw)?;
                Ok(())
            },
        }
    };
}

/// Every variable, in the order they are applied and listed.
pub static VARS: &[Var] = &[
    var!(
        "VIGIL_NAMESPACE",
        [Edge, Worker, Audit],
        namespace,
        r#"`vigil`"#,
        r#"prefix of every exchange and queue"#
    ),
    var!(
        "VIGIL_AMQP_URL",
        [Edge, Worker, Audit],
        amqp_url,
        r#"`amqp://guest:guest@127.0.0.1:5672/%2f`"#,
        r#"the broker; `?connection_timeout=<ms>` bounds one connection attempt, handshake included (default 10000). `amqps://…?cacertfile=/path/ca.pem` speaks TLS (rustls) and trusts that CA besides the system's roots. Several URLs separated by commas are a cluster's nodes: a process connects to one and fails over to the others"#
    ),
    Var {
        name: "VIGIL_AMQP_URL_FILE",
        roles: &[Role::Edge, Role::Worker, Role::Audit],
        default: "none",
        meaning: "...or a file holding it (a secret mounted as a file; wins over VIGIL_AMQP_URL)",
        apply: |cfg, raw| {
            cfg.amqp_url = read_secret(raw)?;
            Ok(())
        },
    },
    var!(
        "VIGIL_BROKER_ROLES",
        [Edge, Worker, Audit],
        broker_roles,
        r#"`shared`"#,
        r#"`shared`: every role is this process's broker user. `separate`: each role is the user `<namespace>-<role>`, and each edge the user `<namespace>-edge-<edge id>`, from `vigil broker provision`; receivers accept each kind of event only from its roles, and what an edge says only for itself (see docs/security.md)"#
    ),
    var!(
        "VIGIL_BROKER_CONNECT_TIMEOUT_MS",
        [Edge, Worker, Audit],
        broker_connect_timeout_ms,
        r#"30000"#,
        r#"how long a process keeps retrying its first broker connection, in ms"#
    ),
    var!(
        "VIGIL_METRICS_LISTEN",
        [Edge, Worker, Audit],
        metrics_listen,
        r#"`127.0.0.1:9090`"#,
        r#"metrics and health (port 0 picks one)"#
    ),
    var!(
        "VIGIL_HTTP_MAX_CONNECTIONS",
        [Edge, Worker, Audit],
        http_max_connections,
        r#"256"#,
        r#"connections an HTTP listener (the admin API, `/metrics`) serves at once; when full, a newcomer from an address holding fewer takes the oldest place of the address holding most, else it is closed; counted by reason (`vigil_edge_admin_connections_refused_total`, `vigil_metrics_connections_refused_total`)"#
    ),
    var!(
        "VIGIL_HTTP_MAX_CONNECTIONS_PER_ADDRESS",
        [Edge, Worker, Audit],
        http_max_connections_per_address,
        r#"64"#,
        r#"connections one address may hold on an HTTP listener; more from it are closed as they are accepted (reason `per_address`); raise it when many operators share one address"#
    ),
    var!(
        "VIGIL_HTTP_HEADER_TIMEOUT_MS",
        [Edge, Worker, Audit],
        http_header_timeout_ms,
        r#"10000"#,
        r#"how long a request's headers may take to arrive, however slowly they trickle in; a connection past it is closed (and one kept alive with no next request)"#
    ),
    var!(
        "VIGIL_HTTP_IDLE_TIMEOUT_MS",
        [Edge, Worker, Audit],
        http_idle_timeout_ms,
        r#"60000"#,
        r#"an HTTP connection that sends or takes nothing this long (no headers, no next request) is closed; keep it above the longest request (an enrolment waits up to 30 s for a worker)"#
    ),
    var!(
        "VIGIL_TOPOLOGY",
        [Edge, Worker, Audit],
        opt topology_file,
        r#"built-in `exchanges.toml`"#,
        r#"topology file"#
    ),
    var!(
        "VIGIL_BROKER_MANAGEMENT_URL",
        [Edge, Worker, Audit],
        opt broker_management_url,
        r#"none"#,
        r#"RabbitMQ's management API (`http://user:pass@host:15672`, several separated by commas). When set, the shared queues' tunables (TTL, lengths, overflow, dead-lettering, stream age) are RabbitMQ policies put through it at start-up (and by `vigil topology apply`), not declare arguments: changing one in the topology changes the live queue instead of failing every later start with `PRECONDITION_FAILED`. Queues declared before with arguments must be deleted once"#
    ),
    Var {
        name: "VIGIL_BROKER_MANAGEMENT_URL_FILE",
        roles: &[Role::Edge, Role::Worker, Role::Audit],
        default: "none",
        meaning: "...or a file holding it (wins over VIGIL_BROKER_MANAGEMENT_URL)",
        apply: |cfg, raw| {
            cfg.broker_management_url = Some(read_secret(raw)?);
            Ok(())
        },
    },
    var!(
        "VIGIL_BROKER_MANAGEMENT_CA_FILE",
        [Edge, Worker, Audit],
        opt broker_management_ca_file,
        r#"none"#,
        r#"PEM certificates trusted for an `https://` management URL besides the system's roots"#
    ),
    var!(
        "VIGIL_CLIENTS_DIR",
        [Edge],
        clients_dir,
        r#"`clients`"#,
        r#"client directory folder (when `VIGIL_DIRECTORY_URL` is unset)"#
    ),
    var!(
        "VIGIL_DIRECTORY_URL",
        [Edge],
        opt directory_url,
        r#"none"#,
        r#"the client directory in PostgreSQL (`postgres://user:pass@host/db`), shared by every edge; migrated at connect. TLS by `sslmode` as libpq: `?sslmode=verify-full&sslrootcert=/path/ca.pem` (chain and host name checked; recommended), `verify-ca` (chain only), `require` (encrypted, certificate unchecked), `disable` or none (plain); `prefer` and `allow` are refused. `&sslcert=/path/client.pem&sslkey=/path/client.key` (0600) for a server that asks for a client certificate"#
    ),
    Var {
        name: "VIGIL_DIRECTORY_URL_FILE",
        roles: &[Role::Edge],
        default: "none",
        meaning: "...or a file holding it (wins over VIGIL_DIRECTORY_URL)",
        apply: |cfg, raw| {
            cfg.directory_url = Some(read_secret(raw)?);
            Ok(())
        },
    },
    var!(
        "VIGIL_DIRECTORY_POOL",
        [Edge],
        directory_pool,
        r#"8"#,
        r#"most PostgreSQL connections one process holds"#
    ),
    var!(
        "VIGIL_DIRECTORY_TIMEOUT_MS",
        [Edge],
        directory_timeout_ms,
        r#"5000"#,
        r#"bound on a directory connection, statement and row-lock wait"#
    ),
    var!(
        "VIGIL_EVIDENCE_DIR",
        [Audit],
        evidence_dir,
        r#"`evidence`"#,
        r#"evidence folder and audit log"#
    ),
    var!(
        "VIGIL_AUDIT_KEY",
        [Audit],
        opt audit_key,
        r#"none"#,
        r#"Ed25519 private key (PKCS#8 PEM, `vigil audit keygen`) the audit writer signs entries with; must be outside the evidence folder"#
    ),
    var!(
        "VIGIL_AUDIT_PUBLIC_KEY",
        [Edge, Audit],
        opt audit_public_key,
        r#"none"#,
        r#"the audit writer's public key (the `.pub` of `vigil audit keygen`): the admin API serves it for operators to pin, the writer checks the views it serves under it when it signs with no key of its own, and `vigil audit verify` uses it when given no --public-key"#
    ),
    var!(
        "VIGIL_AUDIT_CHECKPOINT_SCAN_MS",
        [Audit],
        audit_checkpoint_scan_ms,
        r#"30000"#,
        r#"the most time reading the checkpoint stream may take (the writer's start, `vigil audit verify`); a stream not read to its end is reported"#
    ),
    var!(
        "VIGIL_AUDIT_EVIDENCE_MB_PER_CLIENT_DAY",
        [Audit],
        audit_evidence_mb_per_client_day,
        r#"512"#,
        r#"evidence JPEGs kept per client and UTC day, in MiB; past it an entry keeps its frames' verdicts without their images (counted); 0: no limit"#
    ),
    var!(
        "VIGIL_AUDIT_RETENTION_DAYS",
        [Audit],
        audit_retention_days,
        r#"0"#,
        r#"the audit writer removes evidence files of actions older than this, hourly (entries stay, a prune entry lists the files); 0 keeps them"#
    ),
    var!(
        "VIGIL_AUDIT_API_LISTEN",
        [Audit],
        opt audit_api.listen,
        r#"none"#,
        r#"where the audit writer serves its read API, through which the console's audit view reads each client's trail and evidence (the edge never reads the writer's folder); unset: none"#
    ),
    var!(
        "VIGIL_AUDIT_API_TOKEN",
        [Edge, Audit],
        opt audit_api.token,
        r#"none"#,
        r#"the read API's bearer token, at least 32 characters (`head -c 32 /dev/urandom | base64`); the writer and the console's edge hold the same"#
    ),
    Var {
        name: "VIGIL_AUDIT_API_TOKEN_FILE",
        roles: &[Role::Edge, Role::Audit],
        default: "none",
        meaning: "...or a file holding it (wins over VIGIL_AUDIT_API_TOKEN)",
        apply: |cfg, raw| {
            cfg.audit_api.token = Some(read_secret(raw)?);
            Ok(())
        },
    },
    var!(
        "VIGIL_AUDIT_API_TLS_CERT",
        [Audit],
        opt audit_api.tls_cert,
        r#"none"#,
        r#"PEM certificate chain for HTTPS on the read API (with VIGIL_AUDIT_API_TLS_KEY it speaks HTTPS only); reloaded when the file changes"#
    ),
    var!(
        "VIGIL_AUDIT_API_TLS_KEY",
        [Audit],
        opt audit_api.tls_key,
        r#"none"#,
        r#"PEM private key of VIGIL_AUDIT_API_TLS_CERT"#
    ),
    var!(
        "VIGIL_AUDIT_API_VIEWS",
        [Audit],
        audit_api.views,
        r#"2"#,
        r#"trail views the writer builds at once; more wait their turn"#
    ),
    var!(
        "VIGIL_AUDIT_API_WAIT_MS",
        [Audit],
        audit_api.wait_ms,
        r#"10000"#,
        r#"how long a view waits for its turn at the writer before a 503 (counted)"#
    ),
    var!(
        "VIGIL_AUDIT_API_MAX_ENTRIES",
        [Audit],
        audit_api.max_entries,
        r#"5000"#,
        r#"the most entries one trail view holds, the newest (it says how many there are; counted when it bites)"#
    ),
    var!(
        "VIGIL_AUDIT_API_URL",
        [Edge],
        opt audit_api.url,
        r#"none"#,
        r#"where the edge's admin API reads the audit trail: the writer's VIGIL_AUDIT_API_LISTEN as `https://host:port` (or `http://` on a private network); unset: the console's audit view answers 503"#
    ),
    var!(
        "VIGIL_AUDIT_API_CA_FILE",
        [Edge],
        opt audit_api.ca_file,
        r#"none"#,
        r#"PEM certificates the edge trusts for an `https://` VIGIL_AUDIT_API_URL besides the system's roots"#
    ),
    var!(
        "VIGIL_AUDIT_API_MAX_BYTES",
        [Edge],
        audit_api.max_bytes,
        r#"67108864"#,
        r#"the largest trail view the edge takes from the writer (counted when it bites); an evidence frame may be VIGIL_EDGE_MAX_FRAME_BYTES"#
    ),
    var!(
        "VIGIL_WEBHOOK_URLS",
        [Audit],
        webhooks.urls,
        r#"none"#,
        r#"endpoints every audited entry is POSTed to as a signed webhook, comma-separated (see docs/webhooks.md)"#
    ),
    var!(
        "VIGIL_WEBHOOK_SECRET",
        [Audit],
        opt webhooks.secret,
        r#"none"#,
        r#"the webhooks' signing secret, `whsec_` and base64 (`vigil webhooks secret` makes one)"#
    ),
    var!(
        "VIGIL_WEBHOOK_SECRET_FILE",
        [Audit],
        opt webhooks.secret_file,
        r#"none"#,
        r#"...or a file holding it"#
    ),
    var!(
        "VIGIL_WEBHOOK_CA_FILE",
        [Audit],
        opt webhooks.ca_file,
        r#"none"#,
        r#"PEM certificates trusted for `https://` endpoints besides the system's roots"#
    ),
    var!(
        "VIGIL_WEBHOOK_TIMEOUT_MS",
        [Audit],
        webhooks.timeout_ms,
        r#"10000"#,
        r#"one webhook request (connect, send, answer) may take this long"#
    ),
    var!(
        "VIGIL_WEBHOOK_MAX_ATTEMPTS",
        [Audit],
        webhooks.max_attempts,
        r#"8"#,
        r#"tries per entry and endpoint (waits of 5 s, 30 s, 5 min, then 30 min, jittered) before it goes to `webhooks.failed`"#
    ),
    var!(
        "VIGIL_WEBHOOK_BREAKER_FAILURES",
        [Audit],
        webhooks.breaker_failures,
        r#"5"#,
        r#"failed webhook tries in a row after which an endpoint is paused"#
    ),
    var!(
        "VIGIL_WEBHOOK_BREAKER_OPEN_MS",
        [Audit],
        webhooks.breaker_open_ms,
        r#"30000"#,
        r#"how long such a pause lasts; then one request tries the endpoint again"#
    ),
    var!(
        "VIGIL_WEBHOOK_CONCURRENCY",
        [Audit],
        webhooks.concurrency,
        r#"16"#,
        r#"webhook requests in flight at once"#
    ),
    var!(
        "VIGIL_CAPTURE_STREAM",
        [Edge],
        capture_stream,
        r#"false"#,
        r#"keep recent frames in a stream queue for export and replay"#
    ),
    var!(
        "VIGIL_LOG_FORMAT",
        [Edge, Worker, Audit],
        log_format,
        r#"`text`"#,
        r#"`text` or `json` log lines"#
    ),
    var!(
        "VIGIL_EDGE_LISTEN",
        [Edge],
        edge.listen,
        r#"`127.0.0.1:8080`"#,
        r#"WebSocket address"#
    ),
    var!(
        "VIGIL_EDGE_ID",
        [Edge],
        opt edge.id,
        r#"host name + random suffix"#,
        r#"this edge's id (reply routing, presence)"#
    ),
    var!(
        "VIGIL_EDGE_MAX_FRAME_BYTES",
        [Edge],
        edge.max_frame_bytes,
        r#"524288"#,
        r#"largest JPEG accepted"#
    ),
    var!(
        "VIGIL_EDGE_MAX_FRAME_PIXELS",
        [Edge],
        edge.max_frame_pixels,
        r#"16777216"#,
        r#"most pixels a frame's JPEG header may declare (16 MP)"#
    ),
    var!(
        "VIGIL_EDGE_MAX_FRAME_SIDE",
        [Edge],
        edge.max_frame_side,
        r#"4096"#,
        r#"longest side a frame's JPEG header may declare"#
    ),
    var!(
        "VIGIL_EDGE_MAX_FPS",
        [Edge],
        edge.max_fps,
        r#"30"#,
        r#"frames per second per client"#
    ),
    var!(
        "VIGIL_EDGE_PING_INTERVAL_MS",
        [Edge],
        edge.ping_interval_ms,
        r#"15000"#,
        r#"the edge pings each client this often"#
    ),
    var!(
        "VIGIL_EDGE_IDLE_TIMEOUT_MS",
        [Edge],
        edge.idle_timeout_ms,
        r#"60000"#,
        r#"a client silent this long (not even a pong) is closed `idle` (4410)"#
    ),
    var!(
        "VIGIL_EDGE_LEASE_MS",
        [Edge],
        edge.lease_ms,
        r#"15000"#,
        r#"the edge's lease in the directory, renewed every third of it; a dead edge's clients read as disconnected once it runs out"#
    ),
    var!(
        "VIGIL_EDGE_WRITE_TIMEOUT_MS",
        [Edge],
        edge.write_timeout_ms,
        r#"2000"#,
        r#"every write to a client finishes within this, or the client is closed `slow_reader` (4408)"#
    ),
    var!(
        "VIGIL_EDGE_FLOOD_FACTOR",
        [Edge],
        edge.flood_factor,
        r#"4"#,
        r#"`max_fps` × this in one second closes with 4429"#
    ),
    var!(
        "VIGIL_EDGE_MAX_SESSIONS",
        [Edge],
        edge.max_sessions,
        r#"10000"#,
        r#"authenticated sessions per edge (4503 beyond)"#
    ),
    var!(
        "VIGIL_EDGE_MAX_UNAUTHENTICATED",
        [Edge],
        edge.max_unauthenticated,
        r#"1024"#,
        r#"connections still before their hello, per edge (closed at accept beyond)"#
    ),
    var!(
        "VIGIL_EDGE_MAX_UNAUTHENTICATED_PER_SOURCE",
        [Edge],
        edge.max_unauthenticated_per_source,
        r#"64"#,
        r#"the same, per source address"#
    ),
    var!(
        "VIGIL_EDGE_TRUSTED_PROXIES",
        [Edge],
        edge.trusted_proxies,
        r#"none"#,
        r#"load balancers (CIDRs or addresses, comma-separated) whose PROXY protocol v2 header, or else last `X-Forwarded-For` address, gives the client's real address; a PROXY header from any other peer is refused, its `X-Forwarded-For` ignored"#
    ),
    var!(
        "VIGIL_EDGE_FAILED_HELLOS_PER_MINUTE",
        [Edge],
        edge.failed_hellos_per_minute,
        r#"30"#,
        r#"failed hellos per address per minute before its hellos are refused (4429)"#
    ),
    var!(
        "VIGIL_EDGE_FAILED_HELLOS_PER_ID",
        [Edge],
        edge.failed_hellos_per_id,
        r#"5"#,
        r#"failed token hellos in a row for one client id, from any address, before that id's token hellos are refused (4429) without hashing; session tokens still get in"#
    ),
    var!(
        "VIGIL_EDGE_MAX_HELLO_BYTES",
        [Edge],
        edge.max_hello_bytes,
        r#"16384"#,
        r#"the largest message accepted before the hello; a larger one is refused and counts as a failed hello"#
    ),
    var!(
        "VIGIL_ADMIN_AUDIT_VIEWS",
        [Edge],
        edge.audit_views,
        r#"2"#,
        r#"audit-trail views the admin API builds at once; more wait their turn"#
    ),
    var!(
        "VIGIL_ADMIN_AUDIT_VIEW_WAIT_MS",
        [Edge],
        edge.audit_view_wait_ms,
        r#"30000"#,
        r#"how long an audit-trail view waits for its turn before a 503 (counted)"#
    ),
    var!(
        "VIGIL_EDGE_ID_LOCKOUT_BASE_MS",
        [Edge],
        edge.id_lockout_base_ms,
        r#"1000"#,
        r#"a client id's first lockout; each further failure doubles it"#
    ),
    var!(
        "VIGIL_EDGE_ID_LOCKOUT_MAX_MS",
        [Edge],
        edge.id_lockout_max_ms,
        r#"900000"#,
        r#"a client id's longest lockout"#
    ),
    var!(
        "VIGIL_EDGE_MAX_INFLIGHT",
        [Edge],
        edge.max_inflight,
        r#"2"#,
        r#"frames per client awaiting a result"#
    ),
    var!(
        "VIGIL_EDGE_HELLO_TIMEOUT_MS",
        [Edge],
        edge.hello_timeout_ms,
        r#"5000"#,
        r#"time to send hello"#
    ),
    var!(
        "VIGIL_EDGE_FRAME_DEADLINE_MS",
        [Edge],
        edge.frame_deadline_ms,
        r#"3000"#,
        r#"a frame's life from arrival to result"#
    ),
    var!(
        "VIGIL_EDGE_MAX_BAD_MESSAGES",
        [Edge],
        edge.max_bad_messages,
        r#"10"#,
        r#"consecutive unparseable messages tolerated before a session is closed with 4400"#
    ),
    var!(
        "VIGIL_EDGE_CLIENT_SCORES",
        [Edge],
        edge.client_scores,
        r#"false"#,
        r#"send clients the scores behind each verdict (off: verdicts and face boxes only)"#
    ),
    var!(
        "VIGIL_EDGE_PHONE_EVERY",
        [Edge],
        edge.phone_every,
        r#"3"#,
        r#"a steady candidate's frames run the phone detector about every this-many frames (gaps drawn from one fewer to one more), and every frame for the phone rule's `n` frames after a phone was seen or a verdict was not `ok`; a worker runs it on any frame whose verdict is not `ok` (1: every frame; 1..=4: under the default phone rule a phone in view signs out within 2 s at 5 fps while results come back within 200 ms, and at 3 within 400 ms)"#
    ),
    var!(
        "VIGIL_EDGE_RECHECK_MS",
        [Edge],
        edge.recheck_ms,
        r#"1000"#,
        r#"track reuse: a steady candidate's frames whose one face stays on a confirmed track skip the recogniser and the liveness models, with a full analysis at least this often and on any frame at random (`edge.recheck_chance`, 0.15), on every frame of a challenge, and after any full verdict but a confident, live `ok` or any liveness suspicion (0: every model on every frame; 200..=1000)"#
    ),
    var!(
        "VIGIL_SESSION_KEY",
        [Edge],
        opt sessions.key,
        r#"none"#,
        r#"Ed25519 private key (from `vigil sessions keygen`) the admin API mints short-lived session tokens with (`POST /v1/admin/sessions`)"#
    ),
    var!(
        "VIGIL_SESSION_PUBLIC_KEY",
        [Edge],
        opt sessions.public_key,
        r#"none"#,
        r#"its public key, which edges verify session tokens with (taken from the private key when unset); with neither, hellos take only permanent tokens"#
    ),
    var!(
        "VIGIL_SESSION_MAX_TTL_S",
        [Edge],
        sessions.max_ttl_s,
        r#"21600"#,
        r#"the longest life of a minted session token, in seconds"#
    ),
    var!(
        "VIGIL_EDGE_SHUTDOWN_GRACE_MS",
        [Edge],
        edge.shutdown_grace_ms,
        r#"2000"#,
        r#"grace for closing sessions on shutdown, in ms"#
    ),
    var!(
        "VIGIL_EDGE_MAX_PENDING_AUDITS",
        [Edge],
        edge.max_pending_audits,
        r#"1024"#,
        r#"actions waiting for the audit queue's confirm; past it a new action is counted in `vigil_edge_actions_unaudited_total` instead"#
    ),
    var!(
        "VIGIL_EDGE_AUDIT_RETRY_MS",
        [Edge],
        edge.audit_retry_ms,
        r#"60000"#,
        r#"how long an action keeps trying to reach the audit exchange (a broker restart, a failover) before it is counted unaudited"#
    ),
    var!(
        "VIGIL_EDGE_AUDIT_DRAIN_MS",
        [Edge],
        edge.audit_drain_ms,
        r#"5000"#,
        r#"on shutdown, after the sessions close, how long actions still on their way to the audit queue may take"#
    ),
    var!(
        "VIGIL_EDGE_WS_READ_BUFFER_BYTES",
        [Edge],
        edge.ws_read_buffer_bytes,
        r#"16384"#,
        r#"bytes read from a client socket at a time"#
    ),
    var!(
        "VIGIL_EDGE_WS_MAX_WRITE_BUFFER_BYTES",
        [Edge],
        edge.ws_max_write_buffer_bytes,
        r#"4194304"#,
        r#"bytes buffered for one slow client before its session waits"#
    ),
    var!(
        "VIGIL_ADMIN_LISTEN",
        [Edge],
        opt edge.admin_listen,
        r#"off"#,
        r#"admin API address"#
    ),
    var!(
        "VIGIL_ADMIN_AMQP_URL",
        [Edge],
        opt edge.admin_amqp_url,
        r#"the edge's own"#,
        r#"the broker as the operator role (`<namespace>-operator`), for what the admin API publishes (control, operators' notes, enrolments); required with `VIGIL_BROKER_ROLES=separate` and an admin listener, where an edge's own user may publish none of these"#
    ),
    Var {
        name: "VIGIL_ADMIN_AMQP_URL_FILE",
        roles: &[Role::Edge],
        default: "none",
        meaning: "...or a file holding it (wins over VIGIL_ADMIN_AMQP_URL)",
        apply: |cfg, raw| {
            cfg.edge.admin_amqp_url = Some(read_secret(raw)?);
            Ok(())
        },
    },
    var!(
        "VIGIL_ADMIN_TOKEN",
        [Edge],
        opt edge.admin_token,
        r#"none"#,
        r#"a shared admin API bearer token, audited as operator `admin`"#
    ),
    var!(
        "VIGIL_ADMIN_TOKENS_FILE",
        [Edge],
        opt edge.admin_tokens_file,
        r#"none"#,
        r#"operators' own admin tokens (`vigil operators add NAME`), reloaded when the file changes; the API is off with neither this nor `VIGIL_ADMIN_TOKEN`"#
    ),
    var!(
        "VIGIL_EDGE_TLS_CERT",
        [Edge],
        opt edge.tls_cert,
        r#"none"#,
        r#"PEM certificate chain: with `VIGIL_EDGE_TLS_KEY`, the listener speaks `wss://` only (rustls); a changed file is picked up by the next connection, no restart"#
    ),
    var!(
        "VIGIL_WEB_DIR",
        [Edge],
        edge.web_dir,
        r#"`web/dist`"#,
        r#"the candidate page's files (`npm run build` in `web/`), served at `/` on the edge's listener; read once at start; none served when missing"#
    ),
    var!(
        "VIGIL_EDGE_TLS_KEY",
        [Edge],
        opt edge.tls_key,
        r#"none"#,
        r#"PEM private key of that certificate"#
    ),
    var!(
        "VIGIL_ADMIN_TLS_CERT",
        [Edge],
        opt edge.admin_tls_cert,
        r#"the edge's"#,
        r#"PEM certificate chain for HTTPS on the admin API (with `VIGIL_ADMIN_TLS_KEY`); without it the edge's `VIGIL_EDGE_TLS_CERT`/`KEY` serve it, so the admin API is HTTPS whenever the edge is `wss://`; reloaded on change. At most 256 handshakes at once, each within `VIGIL_EDGE_HELLO_TIMEOUT_MS` (failures: `vigil_edge_admin_tls_failures_total`)"#
    ),
    var!(
        "VIGIL_ADMIN_TLS_KEY",
        [Edge],
        opt edge.admin_tls_key,
        r#"the edge's"#,
        r#"PEM private key of that certificate"#
    ),
    var!(
        "VIGIL_MAX_BACKLOG",
        [Edge],
        edge.max_backlog,
        r#"1000"#,
        r#"work backlog that makes the system full"#
    ),
    var!(
        "VIGIL_MAX_LATENCY_MS",
        [Edge],
        edge.max_latency_ms,
        r#"2000"#,
        r#"frame latency that makes the system full"#
    ),
    var!(
        "VIGIL_ADMISSION_POLL_MS",
        [Edge],
        edge.admission_poll_ms,
        r#"500"#,
        r#"how often the edge checks the backlog, in ms"#
    ),
    var!(
        "VIGIL_THROTTLE_FPS",
        [Edge],
        edge.throttle_fps,
        r#"5"#,
        r#"frame rate while full"#
    ),
    var!(
        "VIGIL_WORKER_ID",
        [Worker],
        opt worker.id,
        r#"random"#,
        r#"the worker's id"#
    ),
    var!(
        "VIGIL_ANALYZER",
        [Worker],
        worker.analyzer,
        r#"`identity`"#,
        r#"`identity`, `frame-info` (JPEG markers only) or `delay` (benchmarks)"#
    ),
    var!(
        "VIGIL_DELAY_MS",
        [Worker],
        worker.delay_ms,
        r#"20"#,
        r#"service time of the `delay` analyzer (benchmarks), in ms"#
    ),
    var!(
        "VIGIL_WORKER_PREFETCH",
        [Worker],
        worker.prefetch,
        r#"16"#,
        r#"unacked frames per worker"#
    ),
    var!(
        "VIGIL_WORKER_ANALYSIS_THREADS",
        [Worker],
        worker.analysis_threads,
        r#"cores"#,
        r#"CPU-bound analysis threads"#
    ),
    var!(
        "VIGIL_WORKER_BATCH_MAX",
        [Worker],
        worker.batch_max,
        r#"8"#,
        r#"most frames an analysis thread takes at once when frames wait for it (the recogniser and fr_liveness run once on their faces; 1..=64, at most the prefetch; 1 never batches)"#
    ),
    var!(
        "VIGIL_WORKER_BATCH_WAIT_MS",
        [Worker],
        worker.batch_wait_ms,
        r#"3"#,
        r#"how long a batch waits for more frames after its first, in ms (0..=50)"#
    ),
    var!(
        "VIGIL_WORKER_SHUTDOWN_GRACE_MS",
        [Worker],
        worker.shutdown_grace_ms,
        r#"5000"#,
        r#"time to finish and ack in-flight frames on shutdown, in ms"#
    ),
    var!(
        "VIGIL_MODELS_DIR",
        [Worker],
        inference.models_dir,
        r#"`models`"#,
        r#"model files"#
    ),
    var!(
        "VIGIL_ORT_DYLIB",
        [Worker],
        opt inference.ort_dylib,
        r#"searched"#,
        r#"`libonnxruntime.so.1.31.1`"#
    ),
    var!(
        "VIGIL_DEVICE",
        [Worker],
        inference.device,
        r#"`cpu`"#,
        r#"`cpu` or `cuda`"#
    ),
    var!(
        "VIGIL_INTRA_THREADS",
        [Worker],
        inference.intra_threads,
        r#"1"#,
        r#"ONNX Runtime threads per model run"#
    ),
    var!(
        "VIGIL_MAX_SIDE",
        [Worker],
        inference.max_side,
        r#"640"#,
        r#"frames are scaled to fit this many pixels a side before the models run"#
    ),
    var!(
        "VIGIL_MAX_PIXELS",
        [Worker],
        inference.max_pixels,
        r#"16777216"#,
        r#"most pixels an image may declare; checked before decoding, and the decoder's limit"#
    ),
    var!(
        "VIGIL_MAX_JPEG_SCANS",
        [Worker],
        inference.max_jpeg_scans,
        r#"64"#,
        r#"most scans a frame may hold (progressive files cost a pass per scan); the worker walks the file and refuses more before decoding"#
    ),
    var!(
        "VIGIL_FACE_SCORE",
        [Worker],
        inference.thresholds.face_score,
        r#"0.6"#,
        r#"minimum YuNet face score"#
    ),
    var!(
        "VIGIL_MATCH_COSINE",
        [Worker],
        inference.thresholds.match_cosine,
        r#"0.41"#,
        r#"same person at or above this similarity"#
    ),
    var!(
        "VIGIL_LIVE_MIN",
        [Worker],
        inference.thresholds.live_min,
        r#"0"#,
        r#"single-frame P(live) below which one frame alone is a spoof (off)"#
    ),
    var!(
        "VIGIL_PHONE_SCORE",
        [Worker],
        inference.thresholds.phone_score,
        r#"0.5"#,
        r#"minimum COCO-SSD "cell phone" score"#
    ),
    var!(
        "VIGIL_FACE_MIN_PX",
        [Worker],
        inference.thresholds.face_min_px,
        r#"32"#,
        r#"quality gate: smallest face side in pixels"#
    ),
    var!(
        "VIGIL_SHARPNESS_MIN",
        [Worker],
        inference.thresholds.sharpness_min,
        r#"4"#,
        r#"quality gate: least Laplacian variance of the aligned face"#
    ),
    var!(
        "VIGIL_LIVENESS_WINDOW_MS",
        [Edge],
        liveness.window_ms,
        r#"4000"#,
        r#"how far back the stream liveness looks"#
    ),
    var!(
        "VIGIL_POLICY_NO_FRAMES_MS",
        [Edge],
        policy.no_frames_ms,
        r#"10000"#,
        r#"a session that sends no frame for this long gets a `no_frames` verdict (again after each further period); 0 turns it off"#
    ),
    var!(
        "VIGIL_POLICY_CARRY_OVER_MS",
        [Edge],
        policy.carry_over_ms,
        r#"1800000"#,
        r#"how long a client's saved policy state is resumed by its next session"#
    ),
    var!(
        "VIGIL_LIVENESS_STILL_RATIO",
        [Edge],
        liveness.still_ratio,
        r#"1.5"#,
        r#"the still test holds when drift is at most this many times jitter (a suspicion once it holds for `still_faces` faces in a row)"#
    ),
    var!(
        "VIGIL_LIVENESS_PAD_WINDOW_MIN",
        [Edge],
        liveness.pad_window_min,
        r#"0.47"#,
        r#"a suspicion when the window's median presentation-attack P(real) is below this; 0 turns it off"#
    ),
    var!(
        "VIGIL_POLICY_SIGN_OUT_ENDS_SESSION",
        [Edge],
        policy.sign_out_ends_session,
        r#"true"#,
        r#"after `sign_out` the edge ends the session (close 4423) and refuses the client until an operator re-admits it"#
    ),
    var!(
        "VIGIL_CHALLENGE_ON_START",
        [Edge],
        challenge.on_start,
        r#"true"#,
        r#"every session starts with a liveness challenge"#
    ),
    var!(
        "VIGIL_CHALLENGE_EVERY_MS",
        [Edge],
        challenge.every_ms,
        r#"0"#,
        r#"also challenge at random intervals of about this many ms; 0 turns it off"#
    ),
    var!(
        "VIGIL_CHALLENGE_DEADLINE_MS",
        [Edge],
        challenge.deadline_ms,
        r#"12000"#,
        r#"time to finish a challenge's steps; a timeout is the `spoof` rule's next step"#
    ),
];

/// The README's table of variables.
pub fn markdown() -> String {
    let mut out = String::from("| variable | read by | default | meaning |\n|---|---|---|---|\n");
    for v in VARS {
        let roles: Vec<&str> = v.roles.iter().map(|r| r.binary()).collect();
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} |",
            v.name,
            roles.join(", "),
            v.default,
            v.meaning
        );
    }
    out
}
