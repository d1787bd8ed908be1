//! One client connection: hello, authentication, then the frame/result loop with its limits.
//!
//! Per session: at most `max_inflight` frames are published and awaiting a result; one more
//! may wait, and a newer frame replaces the waiting one (the client is told which seq was
//! dropped). Every frame the session accepts gets exactly one `result` or `dropped`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use uuid::Uuid;

use super::enforcement::{Effect, Enforcement};
use super::window::{Offer, Pending, Window};
use super::{SessionEntry, SessionEvent, SessionInfo, Shared};
use crate::broker::BrokerError;
use crate::challenge::Trigger;
use crate::directory::{AuthError, ClientRecord, ClientStatus, Connection, Credential, Presence};
use crate::domain::Action;
use crate::liveness::StreamLiveness;
use crate::wire::client::{
    self, CaptureState, ClientFrame, ClientMsg, Encoding, ErrorCode, ProtocolError, ServerMsg,
};
use crate::wire::{
    self, ActionEvent, ControlCommand, DropReason, Envelope, EvidenceFrame, Frame, Payload, Verdict,
};

type Ws = WebSocketStream<super::web::Rewind<crate::telemetry::tls::Stream>>;

/// How long past a frame's deadline the edge waits for the worker's own answer before it
/// answers `expired` itself.
const SWEEP_GRACE: Duration = Duration::from_millis(250);

/// Ends a session from outside: a newer session of the same client, or an administrator.
#[derive(Clone, Default)]
pub(crate) struct Closer {
    token: CancellationToken,
    reason: Arc<OnceLock<(ErrorCode, String)>>,
}

impl Closer {
    /// Tell the client `code` and `message`, then close with the code's close code.
    pub(crate) fn close_with_error(&self, code: ErrorCode, message: impl Into<String>) {
        let _ = self.reason.set((code, message.into()));
        self.token.cancel();
    }
}

pub(super) async fn run(
    shared: Arc<Shared>,
    mut ws: Ws,
    peer: std::net::SocketAddr,
    pending: super::gate::Pending,
    negotiated: Option<Encoding>,
) {
    // Before the hello, errors go out in the negotiated encoding, else in JSON.
    let early = negotiated.unwrap_or(Encoding::Json);
    if shared.full.load(Ordering::Relaxed) {
        shared.refused("system_full");
        let message = "the system is full; retry later";
        refuse(&shared, &mut ws, early, ErrorCode::SystemFull, message).await;
        return;
    }
    if shared.gate.throttled(peer.ip()) {
        // Refused before the token is hashed: failed hellos cannot buy CPU.
        shared.refused("hello_throttled");
        let message = "too many failed hellos from this address; retry later";
        refuse(&shared, &mut ws, early, ErrorCode::TooFast, message).await;
        return;
    }
    let Some((record, encoding)) = hello(&shared, &mut ws, peer, negotiated).await else {
        return;
    };
    // Authenticated: the connection leaves the unauthenticated places and takes a session
    // slot, which anonymous sockets can therefore never hold.
    drop(pending);
    let Ok(_permit) = shared.slots.clone().try_acquire_owned() else {
        shared.refused("full");
        let message = "this edge is at its session limit; retry later or elsewhere";
        refuse(&shared, &mut ws, encoding, ErrorCode::SystemFull, message).await;
        return;
    };
    let client_id = record.id.clone();
    let paused = record.status == ClientStatus::Paused;
    let reference = record
        .reference
        .as_ref()
        .and_then(|r| r.embedding_bytes())
        .map(serde_bytes::ByteBuf::from);

    // Escalation, cooldowns and recent verdicts carry over from the client's last session, on
    // this edge or another.
    let saved = {
        let store = shared.store.clone();
        let id = client_id.clone();
        match tokio::task::spawn_blocking(move || store.policy(&id)).await {
            Ok(Ok(saved)) => saved,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, client = %client_id, "policy state unreadable; starting afresh");
                None
            }
            Err(_) => None,
        }
    };

    let session_id: u64 = rand::random();
    let enforcement = Enforcement::resume(&shared.policy, saved, wire::now_ms(), session_id);
    // Signed out, and not re-admitted: the record read before the token check may predate a
    // sign-out that raced this hello, so the status is read again, and the saved state says
    // it too (a re-admission saves a fresh one).
    if shared.policy.sign_out_ends_session {
        let store = shared.store.clone();
        let id = client_id.clone();
        let status = tokio::task::spawn_blocking(move || store.get(&id))
            .await
            .ok()
            .and_then(Result::ok)
            .flatten()
            .map(|r| r.status);
        if enforcement.signed_out() || status == Some(ClientStatus::SignedOut) {
            shared.refused("signed_out");
            let message = "this client was signed out; an operator must re-admit it";
            refuse(&shared, &mut ws, encoding, ErrorCode::SignedOut, message).await;
            return;
        }
    }
    let (tx, rx) = mpsc::channel(shared.cfg.max_inflight * 4 + 16);
    let closer = Closer::default();
    let since_ms = wire::now_ms();
    let info = Arc::new(Mutex::new(SessionInfo {
        client_id: client_id.clone(),
        session_id: format!("{session_id:016x}"),
        edge: shared.edge_id.clone(),
        connected_since_ms: since_ms,
        fps: 0.0,
        frames: 0,
        paused,
        last_verdict: None,
        last_action: None,
    }));
    // Given back when dropped, at the end of this function or by a panic that unwinds it.
    let (registration, older) = shared.sessions.register(
        &client_id,
        SessionEntry {
            session: session_id,
            tx,
            closer: closer.clone(),
            info: info.clone(),
        },
    );
    if let Some(older) = older {
        // One session per client: the newer connection wins.
        older.closer.close_with_error(
            ErrorCode::DuplicateSession,
            "a newer session for this client replaced this one",
        );
    }
    tracing::info!(client = %client_id, session = format_args!("{session_id:016x}"), "session started");
    super::audit_session(&shared, &client_id, session_id, "started", "", peer.ip());
    set_presence(
        &shared,
        &client_id,
        session_id,
        since_ms,
        Connection::Active,
    )
    .await;
    // Every edge ends any other session of this client (newer wins across the cluster).
    {
        let shared = shared.clone();
        let client_id = client_id.clone();
        tokio::spawn(async move {
            let command = ControlCommand::SessionStarted {
                edge: shared.edge_id.clone(),
                session: session_id,
                since_ms,
            };
            if let Err(e) = crate::admin::publish_control(
                &shared.publisher(),
                &shared.control_exchange,
                &client_id,
                &shared.edge_id,
                command,
            )
            .await
            {
                tracing::warn!(error = %e, "could not announce the session to the cluster");
            }
        });
    }

    let welcome = ServerMsg::Welcome {
        session_id: format!("{session_id:016x}"),
        max_frame_bytes: shared.cfg.max_frame_bytes,
        max_fps: shared.cfg.max_fps,
        max_inflight: shared.cfg.max_inflight,
    };
    let mut outbox = vec![welcome];
    if paused {
        outbox.push(ServerMsg::Status {
            state: "paused".into(),
        });
    }
    let mut session = Session {
        paused,
        info,
        last_frame_at: None,
        silent_since: Instant::now(),
        capture: CaptureState::Ok,
        capture_judged: None,
        presence_at: Instant::now(),
        presence_said: (0, None, None),
        id: session_id,
        client_id: client_id.clone(),
        reference,
        encoding,
        window: Window::new(
            shared.cfg.max_inflight,
            Duration::from_millis(shared.cfg.frame_deadline_ms),
        ),
        confirms: FuturesUnordered::new(),
        rate: RateLimit::new(shared.current_max_fps(), shared.cfg.flood_factor),
        last_seq: 0,
        bad_streak: 0,
        outbox,
        enforcement,
        liveness: StreamLiveness::new(),
        // While the phone rule counts, it sees every frame.
        phone_cadence: crate::cadence::PhoneCadence::new(
            shared.cfg.phone_every,
            shared
                .policy
                .rules
                .get(&Verdict::Phone)
                .map_or(6, |r| r.n as u32),
        ),
        identity_cadence: crate::cadence::IdentityCadence::new(
            shared.cfg.recheck_ms,
            shared.cfg.recheck_chance,
            shared.cfg.track_margin,
            shared.liveness.pad_low,
        ),
        last_seen: Instant::now(),
        next_random_ms: random_after(&shared.challenge, wire::now_ms()),
        ending: None,
        start_due: false,
        paused_at_ms: paused.then(wire::now_ms),
        shared: shared.clone(),
    };
    // A challenge still waiting from the client's last session goes on, with the time it has
    // left; otherwise every session starts with one.
    let now = wire::now_ms();
    if let Some(waiting) = session.enforcement.tell(now) {
        session.outbox.push(waiting);
    } else if shared.challenge.on_start {
        // A paused client sends nothing to answer with: its start challenge waits for the
        // resume.
        session.start_due = true;
        if !paused {
            session.start_due = false;
            session.challenge(Trigger::Start, None);
        }
    }
    let end = session.run(&mut ws, rx, &closer).await;
    tracing::info!(client = %client_id, ?end, "session ended");
    let reason = match (&end, closer.reason.get()) {
        // Ended from outside: by a newer session, a block or a kick.
        (End::Replaced, Some((ErrorCode::Blocked, _))) => "blocked",
        (End::Replaced, Some((ErrorCode::Kicked, _))) => "kicked",
        (End::Replaced, Some((ErrorCode::SignedOut, _))) => "signed_out",
        _ => end.reason(),
    };
    super::audit_session(&shared, &client_id, session_id, "ended", reason, peer.ip());
    // A replaced session leaves the state to its successor, which loaded it already.
    if !matches!(end, End::Replaced) {
        // Saved whatever changed, so that the carry-over counts from the end of the session.
        session.enforcement.touch();
        session.save_policy().await;
    }
    let connection = match end {
        End::ClientGone | End::SlowReader | End::Idle => Connection::ConnectionError,
        _ => Connection::Deactivated,
    };
    set_presence(&shared, &client_id, session_id, since_ms, connection).await;
    drop(registration);
}

/// Record this session's connection state in the directory, unless a newer session of the
/// client has taken over its presence.
async fn set_presence(
    shared: &Shared,
    client_id: &str,
    session: u64,
    since_ms: u64,
    connection: Connection,
) {
    let presence = Presence {
        connection,
        edge: shared.edge_id.clone(),
        session: format!("{session:016x}"),
        since_ms,
        updated_ms: wire::now_ms(),
        fps: 0.0,
        last_verdict: None,
        last_action: None,
    };
    // A session's start always takes the presence; its end and its refreshes only while no
    // newer session has.
    write_presence(
        shared,
        client_id,
        presence,
        connection != Connection::Active,
    )
    .await;
}

async fn write_presence(shared: &Shared, client_id: &str, presence: Presence, only_if_ours: bool) {
    let store = shared.store.clone();
    let id = client_id.to_owned();
    let result = tokio::task::spawn_blocking(move || {
        if only_if_ours
            && let Ok(Some(current)) = store.presence(&id)
            && current.session != presence.session
        {
            return Ok(());
        }
        store.set_presence(&id, &presence)
    })
    .await;
    if let Ok(Err(e)) = result {
        tracing::warn!(error = %e, client = %client_id, "could not record presence");
    }
}

/// A client id as a log line may show it: whatever a client sent, escaped (no newlines or
/// control characters reach the log) and cut to 64 characters.
pub(crate) struct LogId<'a>(pub &'a str);

impl std::fmt::Display for LogId<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const MAX: usize = 64;
        for c in self.0.chars().take(MAX) {
            write!(f, "{}", c.escape_debug())?;
        }
        if self.0.chars().nth(MAX).is_some() {
            write!(f, "…({} bytes)", self.0.len())?;
        }
        Ok(())
    }
}

/// Wait for a valid hello and authenticate it. On failure the client has been told why and the
/// socket is closed.
async fn hello(
    shared: &Shared,
    ws: &mut Ws,
    peer: std::net::SocketAddr,
    negotiated: Option<Encoding>,
) -> Option<(ClientRecord, Encoding)> {
    let timeout = Duration::from_millis(shared.cfg.hello_timeout_ms);
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let (parsed, encoding) = loop {
        tokio::select! {
            _ = &mut deadline => {
                shared.refused("hello_timeout");
                let msg = format!("no hello within {} ms", timeout.as_millis());
                refuse(shared, ws, negotiated.unwrap_or(Encoding::Json), ErrorCode::HelloTimeout, &msg).await;
                return None;
            }
            msg = ws.next() => match msg {
                // A negotiated subprotocol decides the replies' encoding; without one, the
                // hello's own does.
                Some(Ok(Message::Text(text))) if text.len() <= shared.cfg.max_hello_bytes => break (client::parse_text(&text), negotiated.unwrap_or(Encoding::Json)),
                Some(Ok(Message::Binary(bytes))) if bytes.len() <= shared.cfg.max_hello_bytes => break (client::parse_binary(&bytes), negotiated.unwrap_or(Encoding::MsgPack)),
                // A hello is small; a big message before it is refused, and counts against the
                // address like a failed hello.
                Some(Ok(Message::Text(_) | Message::Binary(_))) => {
                    shared.refused("hello_too_large");
                    shared.gate.failed(peer.ip());
                    let msg = format!("a message before the hello may be at most {} bytes", shared.cfg.max_hello_bytes);
                    refuse(shared, ws, negotiated.unwrap_or(Encoding::Json), ErrorCode::BadRequest, &msg).await;
                    return None;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    shared.refused("disconnected");
                    return None;
                }
            },
        }
    };
    let (client_id, token) = match parsed {
        // Ids are names of files and log fields: anything else is refused before any lookup.
        Ok(ClientMsg::Hello { client_id, .. })
            if crate::directory::check_client_id(&client_id).is_err() =>
        {
            shared.refused("bad_hello");
            shared.gate.failed(peer.ip());
            tracing::warn!(client = %LogId(&client_id), %peer, "hello refused: not a client id");
            let msg =
                "client_id must be 1 to 64 characters of A-Z a-z 0-9 _ . - (not starting with .)";
            refuse(shared, ws, encoding, ErrorCode::BadRequest, msg).await;
            return None;
        }
        Ok(ClientMsg::Hello { client_id, token }) => (client_id, token),
        Ok(ClientMsg::Frame(_) | ClientMsg::Ping { .. } | ClientMsg::Presence { .. }) => {
            shared.refused("bad_hello");
            refuse(
                shared,
                ws,
                encoding,
                ErrorCode::BadRequest,
                "the first message must be a hello",
            )
            .await;
            return None;
        }
        Err(e) => {
            shared.refused("bad_hello");
            refuse(
                shared,
                ws,
                encoding,
                ErrorCode::BadRequest,
                &format!("bad hello: {e}"),
            )
            .await;
            return None;
        }
    };
    // A session token is checked by its signature here, at once; the record is still read
    // below, where a blocked, signed-out, removed or re-keyed client revokes it.
    let credential = if crate::session_tokens::looks_like_jwt(&token) {
        let verified = match &shared.session_tokens {
            Some(verifier) => verifier
                .verify(&token, &client_id)
                .map_err(|e| e.to_string()),
            None => Err("session tokens are not configured on this edge".to_owned()),
        };
        match verified {
            Ok(claims) => Credential::Session {
                issued_at_ms: claims.issued_at_ms(),
                binding: claims.tkb,
            },
            Err(why) => {
                shared.refused("unauthorized");
                shared.metrics.session_tokens_refused.inc();
                let throttled = shared.gate.failed(peer.ip());
                // Who tried, from where, and why; never the token.
                tracing::warn!(client = %LogId(&client_id), %peer, throttled, reason = %why, "hello refused: bad session token");
                let msg = if why.ends_with("expired") {
                    "session token expired"
                } else {
                    "unknown client or wrong token"
                };
                refuse(shared, ws, encoding, ErrorCode::Unauthorized, msg).await;
                return None;
            }
        }
    } else {
        Credential::Token(token)
    };
    // A permanent token for an id over its failure budget is refused before it is hashed; the
    // refusal counts against the address too. Session tokens, checked by signature above,
    // are not held up.
    let permanent = matches!(credential, Credential::Token(_));
    let attempt = if permanent {
        Some(shared.id_budget.begin(&client_id))
    } else {
        None
    };
    if let Some(Err(left)) = attempt {
        shared.refused("id_locked");
        let throttled = shared.gate.failed(peer.ip());
        tracing::warn!(client = %LogId(&client_id), %peer, throttled, "hello refused: this client id is locked out after failed hellos");
        let msg = format!(
            "too many failed hellos for this client; retry in {} s",
            left.as_secs().max(1)
        );
        refuse(shared, ws, encoding, ErrorCode::TooFast, &msg).await;
        return None;
    }
    // Ids that failed recently wait behind those that did not.
    let priority = if shared.id_budget.suspect(&client_id) {
        super::tokens::Priority::Suspect
    } else {
        super::tokens::Priority::Honest
    };
    // The token check must start within the same hello deadline.
    let checked = shared
        .tokens
        .check(
            shared.store.clone(),
            client_id.clone(),
            credential,
            deadline.deadline().into_std(),
            priority,
        )
        .await;
    let Ok(auth) = checked else {
        shared.refused("auth_busy");
        let msg = "the edge is busy checking other clients' tokens; retry shortly";
        refuse(shared, ws, encoding, ErrorCode::SystemFull, msg).await;
        return None;
    };
    match auth {
        Ok(record) => {
            if permanent {
                shared.id_budget.succeeded(&client_id);
            }
            Some((record, encoding))
        }
        Err(AuthError::Unauthorized) => {
            shared.refused("unauthorized");
            let throttled = shared.gate.failed(peer.ip());
            let locked = permanent
                .then(|| shared.id_budget.failed(&client_id))
                .flatten();
            // Who tried, from where; never the token.
            tracing::warn!(client = %LogId(&client_id), %peer, throttled, locked_for = ?locked, "hello refused: unknown client or wrong token");
            refuse(
                shared,
                ws,
                encoding,
                ErrorCode::Unauthorized,
                "unknown client or wrong token",
            )
            .await;
            None
        }
        Err(AuthError::Unavailable) => {
            // The directory's fault, not the client's: not counted against its address.
            shared.refused("directory_unavailable");
            refuse(
                shared,
                ws,
                encoding,
                ErrorCode::SystemFull,
                "the client directory is unavailable; retry shortly",
            )
            .await;
            None
        }
        Err(AuthError::SignedOut) => {
            shared.refused("signed_out");
            refuse(
                shared,
                ws,
                encoding,
                ErrorCode::SignedOut,
                "this client was signed out; an operator must re-admit it",
            )
            .await;
            None
        }
        Err(AuthError::Blocked) => {
            shared.refused("blocked");
            refuse(
                shared,
                ws,
                encoding,
                ErrorCode::Blocked,
                "this client is blocked",
            )
            .await;
            None
        }
    }
}

/// Run one write to the client within `edge.write_timeout_ms`. A peer that stops reading
/// fills its socket and would hold the write (and with it the session, its slot and its
/// task) forever: past the deadline the write is abandoned and the peer counted as a slow
/// reader. `Err` when the client is gone or too slow.
async fn bounded<T, E>(
    shared: &Shared,
    write: impl Future<Output = Result<T, E>>,
) -> Result<T, Gone> {
    match tokio::time::timeout(Duration::from_millis(shared.cfg.write_timeout_ms), write).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(_)) => Err(Gone::Closed),
        Err(_) => {
            shared.metrics.slow_readers.inc();
            Err(Gone::SlowReader)
        }
    }
}

/// Why a write to the client failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gone {
    Closed,
    SlowReader,
}

/// Send an error and close with its code.
async fn refuse(shared: &Shared, ws: &mut Ws, encoding: Encoding, code: ErrorCode, message: &str) {
    let msg = ServerMsg::Error {
        code,
        message: message.to_owned(),
    };
    if bounded(shared, ws.send(to_message(&msg, encoding)))
        .await
        .is_ok()
    {
        close(shared, ws, code.close_code(), message).await;
    }
}

/// Close with `code`, then wait briefly for the client's close reply. Both are bounded.
async fn close(shared: &Shared, ws: &mut Ws, code: u16, reason: &str) {
    // Close reasons are limited to 123 bytes by the protocol.
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let frame = CloseFrame {
        code: code.into(),
        reason: reason[..cut].into(),
    };
    if bounded(shared, ws.close(Some(frame))).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

fn to_message(msg: &ServerMsg, encoding: Encoding) -> Message {
    let bytes = msg.encode(encoding);
    match encoding {
        Encoding::Json => Message::Text(String::from_utf8(bytes).expect("json is utf-8").into()),
        Encoding::MsgPack => Message::Binary(bytes.into()),
    }
}

/// Why a session ended.
#[derive(Debug)]
enum End {
    ClientClosed,
    ClientGone,
    /// The client stopped reading (closed 4408).
    SlowReader,
    /// Nothing arrived from the client within the idle timeout (closed 4410).
    Idle,
    Replaced,
    Shutdown,
    TooManyBadMessages,
    Flood,
    /// The policy signed the client out (closed 4423).
    SignedOut,
}

impl End {
    /// How the audit trail names it.
    fn reason(&self) -> &'static str {
        match self {
            End::ClientClosed => "closed",
            End::ClientGone => "connection_lost",
            End::SlowReader => "slow_reader",
            End::Idle => "idle",
            End::Replaced => "replaced",
            End::Shutdown => "shutdown",
            End::TooManyBadMessages => "bad_messages",
            End::Flood => "flood",
            End::SignedOut => "signed_out",
        }
    }
}

type ConfirmFuture = BoxFuture<'static, (u64, Uuid, Result<(), BrokerError>)>;

struct Session {
    shared: Arc<Shared>,
    /// Paused by an administrator: frames are answered `dropped` (paused), not analysed.
    paused: bool,
    info: Arc<Mutex<SessionInfo>>,
    last_frame_at: Option<Instant>,
    /// Since when no frame arrived (or since the last `no_frames` verdict).
    silent_since: Instant,
    /// What the client last said of its capture, and when a report of it was last judged.
    capture: CaptureState,
    capture_judged: Option<Instant>,
    /// When the presence's live figures were last written, and what they said.
    presence_at: Instant,
    presence_said: (u64, Option<String>, Option<String>),
    id: u64,
    client_id: String,
    /// The enrolled reference embedding, attached to every frame.
    reference: Option<serde_bytes::ByteBuf>,
    encoding: Encoding,
    /// The frames published and awaiting an answer, and the one waiting for a slot.
    window: Window,
    confirms: FuturesUnordered<ConfirmFuture>,
    rate: RateLimit,
    last_seq: u64,
    bad_streak: u32,
    /// Messages for the client, written after each event.
    outbox: Vec<ServerMsg>,
    /// The client's policy and the frames kept as evidence.
    enforcement: Enforcement,
    /// Liveness over this client's stream, fused into each verdict before the policy sees it.
    liveness: StreamLiveness,
    /// Which frames run the phone detector.
    phone_cadence: crate::cadence::PhoneCadence,
    identity_cadence: crate::cadence::IdentityCadence,
    /// When anything (a message, a ping or pong) last arrived from the client.
    last_seen: Instant,
    /// When the next random challenge is due (`challenge.every_ms`).
    next_random_ms: Option<u64>,
    /// The session must end, once the outbox is written (a sign-out).
    ending: Option<(ErrorCode, String)>,
    /// The start challenge is owed (the session started paused).
    start_due: bool,
    /// Since when the session is paused.
    paused_at_ms: Option<u64>,
}

/// When a random challenge is next due after `now_ms`: uniform in half to one and a half of
/// `every_ms`; never when it is 0.
fn random_after(cfg: &crate::challenge::ChallengeConfig, now_ms: u64) -> Option<u64> {
    (cfg.every_ms > 0).then(|| now_ms + cfg.every_ms / 2 + rand::random_range(0..=cfg.every_ms))
}

/// Whether the frame's face is turned at least `turn_yaw` either way.
fn turned(frame: &EvidenceFrame, turn_yaw: f32) -> bool {
    matches!(&frame.analysis, wire::Analysis::Identity(a)
        if a.quality.as_ref().is_some_and(|q| q.yaw.abs() >= turn_yaw))
}

/// Picks a challenge's steps.
fn draw(n: usize) -> usize {
    rand::random_range(0..n)
}

impl Session {
    async fn run(
        &mut self,
        ws: &mut Ws,
        mut events: mpsc::Receiver<SessionEvent>,
        closer: &Closer,
    ) -> End {
        let shutdown = self.shared.shutdown.clone();
        let ping_every = Duration::from_millis(self.shared.cfg.ping_interval_ms);
        let idle_after = Duration::from_millis(self.shared.cfg.idle_timeout_ms);
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sweep = tokio::time::interval(Duration::from_millis(100));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.ending.is_some() {
                self.keep_out().await;
            }
            self.save_policy().await;
            match self.flush(ws).await {
                Ok(()) if self.ending.is_some() => {
                    let (code, message) = self
                        .ending
                        .take()
                        .unwrap_or((ErrorCode::Internal, String::new()));
                    self.end_with(ws, code, &message).await;
                    return End::SignedOut;
                }
                Ok(()) => {}
                Err(Gone::Closed) => return End::ClientGone,
                Err(Gone::SlowReader) => {
                    self.drop_all(DropReason::ShuttingDown, "session closed");
                    close(
                        &self.shared,
                        ws,
                        ErrorCode::SlowReader.close_code(),
                        "slow_reader",
                    )
                    .await;
                    return End::SlowReader;
                }
            }
            let end = tokio::select! {
                biased;
                _ = closer.token.cancelled() => {
                    let (code, message) = closer
                        .reason
                        .get()
                        .cloned()
                        .unwrap_or((ErrorCode::Internal, String::new()));
                                        self.end_with(ws, code, &message).await;
                    Some(End::Replaced)
                }
                _ = shutdown.cancelled() => {
                    self.drop_all(DropReason::ShuttingDown, "edge shutting down");
                    let _ = self.flush(ws).await;
                    close(&self.shared, ws, 1001, "edge shutting down").await;
                    Some(End::Shutdown)
                }
                Some(event) = events.recv() => {
                    match event {
                        SessionEvent::Reply(env) => self.on_reply(*env).await,
                        SessionEvent::Control(command, issued_by) => self.on_control(command, issued_by),
                        SessionEvent::Throttle { max_fps } => {
                            self.rate.set_rate(max_fps);
                            self.shared.metrics.throttles.inc();
                            self.outbox.push(ServerMsg::Throttle { max_fps });
                        }
                    }
                    None
                }
                Some((seq, id, result)) = self.confirms.next(), if !self.confirms.is_empty() => {
                    self.on_confirm(seq, id, result).await;
                    None
                }
                msg = ws.next() => {
                    self.last_seen = Instant::now();
                    self.on_client(ws, msg).await
                }
                _ = ping.tick() => {
                    match bounded(&self.shared, ws.send(Message::Ping(Default::default()))).await {
                        Ok(()) => None,
                        Err(Gone::Closed) => Some(End::ClientGone),
                        // The next flush (at the top of the loop) finds it slow as well.
                        Err(Gone::SlowReader) => Some(End::SlowReader),
                    }
                }
                _ = sweep.tick() => {
                    // Idleness is checked on every sweep, so a silent client is closed within
                    // 100 ms of idle_timeout_ms, whatever the ping interval.
                    if self.last_seen.elapsed() > idle_after {
                        self.shared.metrics.idle_closed.inc();
                        self.drop_all(DropReason::ShuttingDown, "session closed");
                        close(&self.shared, ws, ErrorCode::Idle.close_code(), "idle").await;
                        Some(End::Idle)
                    } else {
                        self.sweep().await;
                        None
                    }
                }
            };
            if let Some(end) = end {
                return end;
            }
        }
    }

    /// Write everything in the outbox, within the write deadline.
    async fn flush(&mut self, ws: &mut Ws) -> Result<(), Gone> {
        if self.outbox.is_empty() {
            return Ok(());
        }
        let messages: Vec<Message> = self
            .outbox
            .drain(..)
            .map(|m| to_message(&m, self.encoding))
            .collect();
        bounded(&self.shared, async {
            for m in messages {
                ws.feed(m).await?;
            }
            ws.flush().await
        })
        .await
    }

    /// [`Session::drop_frame`] for a frame that was published (the cadences counted it): a
    /// full analysis or a phone check it was meant to be is made up on the next frame. Drops
    /// before publishing are not told to the cadences: their seq, the client's own, may be that
    /// of another frame in flight.
    fn drop_published(&mut self, seq: u64, reason: DropReason, detail: impl Into<String>) {
        self.identity_cadence.dropped(seq);
        self.phone_cadence.dropped(seq);
        self.drop_frame(seq, reason, detail);
    }

    fn drop_frame(&mut self, seq: u64, reason: DropReason, detail: impl Into<String>) {
        self.shared.drop_reason_counter(reason).inc();
        match reason {
            // Not an image: not presence, and counted by the policy.
            DropReason::NotJpeg => {
                self.shared
                    .metrics
                    .verdicts
                    .with_label_values(&[Verdict::InvalidFrame.as_str()])
                    .inc();
                self.judge(Verdict::InvalidFrame, None);
            }
            // Dropped for the system's reasons: the client did send, so it counts as presence.
            DropReason::Expired
            | DropReason::Superseded
            | DropReason::BrokerUnavailable
            | DropReason::ShuttingDown
            | DropReason::AnalyzerFailed
            | DropReason::Paused => self.silent_since = Instant::now(),
            // The client's own excess: neither presence nor a verdict.
            DropReason::RateLimited | DropReason::FrameTooLarge | DropReason::DuplicateSeq => {}
        }
        self.outbox.push(ServerMsg::Dropped {
            seq,
            reason,
            detail: detail.into(),
        });
    }

    fn drop_all(&mut self, reason: DropReason, detail: &str) {
        for seq in self.window.drain() {
            self.drop_frame(seq, reason, detail);
        }
    }

    async fn on_client(
        &mut self,
        ws: &mut Ws,
        msg: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    ) -> Option<End> {
        let parsed = match msg {
            Some(Ok(Message::Text(text))) => client::parse_text(&text),
            Some(Ok(Message::Binary(bytes))) => client::parse_binary(&bytes),
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => return None,
            Some(Ok(Message::Close(_))) => return Some(End::ClientClosed),
            Some(Err(e)) => {
                tracing::debug!(error = %e, "websocket error");
                if matches!(e, tokio_tungstenite::tungstenite::Error::Capacity(_)) {
                    self.shared
                        .metrics
                        .bad_messages
                        .with_label_values(&["oversize"])
                        .inc();
                    close(
                        &self.shared,
                        ws,
                        1009,
                        "message larger than the edge accepts",
                    )
                    .await;
                }
                return Some(End::ClientGone);
            }
            None => return Some(End::ClientGone),
        };
        let end = match parsed {
            Ok(ClientMsg::Frame(frame)) => {
                self.bad_streak = 0;
                self.on_frame(frame).await;
                self.rate.flooded.then_some(End::Flood)
            }
            Ok(ClientMsg::Ping { id }) => {
                self.bad_streak = 0;
                self.outbox.push(ServerMsg::Pong { id });
                None
            }
            Ok(ClientMsg::Presence { state }) => {
                self.bad_streak = 0;
                self.capture_report(state);
                None
            }
            Ok(ClientMsg::Hello { .. }) => self.bad_message(ProtocolError::Json(
                "hello was already accepted for this session".into(),
            )),
            Err(e) => self.bad_message(e),
        }?;
        let (code, message) = match end {
            End::Flood => (
                ErrorCode::TooFast,
                format!(
                    "more than {} frames in one second",
                    self.shared.cfg.max_fps * self.shared.cfg.flood_factor
                ),
            ),
            _ => (
                ErrorCode::BadRequest,
                format!(
                    "{} unparseable messages in a row",
                    self.shared.cfg.max_bad_messages
                ),
            ),
        };
        self.end_with(ws, code, &message).await;
        Some(end)
    }

    /// End the session: answer every frame still in flight, tell the client `code` and
    /// `message`, and close with the code's close code.
    async fn end_with(&mut self, ws: &mut Ws, code: ErrorCode, message: &str) {
        self.drop_all(DropReason::ShuttingDown, "session closed");
        self.outbox.push(ServerMsg::Error {
            code,
            message: message.to_owned(),
        });
        let _ = self.flush(ws).await;
        close(&self.shared, ws, code.close_code(), message).await;
    }

    fn bad_message(&mut self, e: ProtocolError) -> Option<End> {
        self.bad_streak += 1;
        self.shared
            .metrics
            .bad_messages
            .with_label_values(&["client"])
            .inc();
        self.outbox.push(ServerMsg::Error {
            code: ErrorCode::BadRequest,
            message: e.to_string(),
        });
        (self.bad_streak >= self.shared.cfg.max_bad_messages).then_some(End::TooManyBadMessages)
    }

    /// Admit, refuse or queue one frame.
    async fn on_frame(&mut self, frame: ClientFrame) {
        let shared = self.shared.clone();
        let cfg = &shared.cfg;
        shared.metrics.frames_received.inc();
        let now = Instant::now();
        let seq = frame.seq.unwrap_or(self.last_seq + 1);
        self.last_seq = self.last_seq.max(seq);
        {
            let mut info = self.info.lock().unwrap_or_else(|e| e.into_inner());
            info.frames += 1;
            if let Some(last) = self.last_frame_at {
                let gap = now.duration_since(last).as_secs_f64().max(1e-3);
                info.fps = if info.fps == 0.0 {
                    1.0 / gap
                } else {
                    info.fps * 0.8 + 0.2 / gap
                };
            }
        }
        self.last_frame_at = Some(now);
        // Presence is a frame analysed (or one the system dropped), not any message: see
        // `on_reply` and `drop_frame`.
        if self.paused {
            self.drop_frame(seq, DropReason::Paused, "paused by an administrator");
            return;
        }

        match self.rate.admit(now) {
            Admit::Yes => {}
            Admit::Limited => {
                self.drop_frame(
                    seq,
                    DropReason::RateLimited,
                    format!("limit is {} frames per second", cfg.max_fps),
                );
                return;
            }
            Admit::Flood => {
                self.drop_frame(seq, DropReason::RateLimited, "flood");
                return;
            }
        }
        if frame.jpeg.len() > cfg.max_frame_bytes {
            let detail = format!(
                "{} bytes is over the {}-byte limit",
                frame.jpeg.len(),
                cfg.max_frame_bytes
            );
            self.drop_frame(seq, DropReason::FrameTooLarge, detail);
            return;
        }
        // The markers up to the start-of-frame: a broken header never reaches a worker, and
        // neither does a frame that declares more pixels than the limit (a few hundred bytes
        // can declare gigabytes).
        match wire::jpeg::info(&frame.jpeg) {
            Err(e) => {
                let detail = match e {
                    wire::jpeg::JpegError::Malformed(_) => format!("not a JPEG: {e}"),
                    _ => e.to_string(),
                };
                self.drop_frame(seq, DropReason::NotJpeg, detail);
                return;
            }
            Ok(info)
                if info.pixels() > cfg.max_frame_pixels
                    || u32::from(info.width.max(info.height)) > cfg.max_frame_side =>
            {
                let detail = format!(
                    "{}x{} = {} pixels is over the limits ({} a side, {} in all)",
                    info.width,
                    info.height,
                    info.pixels(),
                    cfg.max_frame_side,
                    cfg.max_frame_pixels
                );
                self.drop_frame(seq, DropReason::FrameTooLarge, detail);
                return;
            }
            Ok(info) => {
                if let Err(e) = wire::jpeg::check_supported(&info) {
                    self.drop_frame(seq, DropReason::NotJpeg, e.to_string());
                    return;
                }
            }
        }
        let pending = Pending {
            seq,
            frame,
            received: now,
            received_ms: wire::now_ms(),
        };
        match self.window.offer(pending) {
            Offer::Publish(pending) => self.publish(pending).await,
            Offer::Queued { superseded } => {
                if let Some(older) = superseded {
                    self.drop_frame(
                        older,
                        DropReason::Superseded,
                        "a newer frame arrived while this one waited",
                    );
                }
            }
            Offer::Duplicate => {
                self.drop_frame(seq, DropReason::DuplicateSeq, "this seq is still in flight")
            }
        }
    }

    async fn publish(&mut self, p: Pending) {
        let shared = self.shared.clone();
        let deadline_ms = p.received_ms + shared.cfg.frame_deadline_ms;
        if wire::now_ms() >= deadline_ms {
            self.drop_frame(p.seq, DropReason::Expired, "deadline passed while waiting");
            return;
        }
        if shared.broker_blocked.load(Ordering::Relaxed) {
            self.drop_frame(
                p.seq,
                DropReason::BrokerUnavailable,
                "the broker is refusing new messages (a resource alarm); retry shortly",
            );
            return;
        }
        let env = Envelope {
            schema: wire::SCHEMA,
            id: Uuid::now_v7(),
            source: shared.edge_id.clone(),
            seq: shared.seq.fetch_add(1, Ordering::Relaxed),
            client_id: self.client_id.clone(),
            produced_at_ms: wire::now_ms(),
            deadline_ms,
            traceparent: wire::new_traceparent(),
            payload: Payload::Frame(Frame {
                session: self.id,
                seq: p.seq,
                captured_at_ms: p.frame.captured_at_ms,
                jpeg: p.frame.jpeg.clone(),
                reference: self.reference.clone(),
                // A challenge's frames are evidence: every model runs on them.
                phone_check: self.phone_cadence.due(p.seq) || self.enforcement.challenging(),
                track: self.identity_cadence.track_for(
                    p.seq,
                    p.received_ms,
                    self.enforcement.challenging(),
                ),
            }),
        };
        let span = tracing::debug_span!(
            "frame",
            trace_id = wire::trace_id(&env.traceparent).unwrap_or(""),
            client = %self.client_id,
            seq = p.seq,
        );
        crate::telemetry::continue_trace(&span, &env.traceparent);
        // Bounded: a publish into a broker that stopped reading must not hold the session.
        let remaining = Duration::from_millis(deadline_ms.saturating_sub(wire::now_ms()));
        let published = match tokio::time::timeout(
            remaining,
            shared
                .publisher()
                .publish(&shared.frames_exchange, "", &env)
                .instrument(span),
        )
        .await
        {
            Ok(published) => published,
            Err(_) => {
                self.drop_published(
                    p.seq,
                    DropReason::BrokerUnavailable,
                    "the broker did not take the frame before its deadline",
                );
                return;
            }
        };
        match published {
            Ok(confirm) => {
                let (seq, id) = (p.seq, env.id);
                self.window.published(p, id);
                self.confirms
                    .push(Box::pin(async move { (seq, id, confirm.wait().await) }));
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot publish frame");
                self.drop_published(p.seq, DropReason::BrokerUnavailable, e.to_string());
            }
        }
    }

    async fn on_confirm(&mut self, seq: u64, id: Uuid, result: Result<(), BrokerError>) {
        match result {
            Ok(()) => self.shared.metrics.frames_published.inc(),
            Err(e) => {
                if self.window.fail(seq, id) {
                    self.drop_published(seq, DropReason::BrokerUnavailable, e.to_string());
                    self.promote().await;
                }
            }
        }
    }

    async fn on_reply(&mut self, env: Envelope) {
        let Some((_, seq, frame_id)) = env.payload.answers() else {
            return;
        };
        let Some(inflight) = self.window.answer(seq, frame_id) else {
            // Answered already (a redelivered frame analysed twice, or swept as expired).
            self.shared.metrics.results_duplicate.inc();
            return;
        };
        let latency = inflight.received.elapsed();
        let trace_id = wire::trace_id(&env.traceparent).unwrap_or("").to_owned();
        let span =
            tracing::debug_span!("result", trace_id = %trace_id, client = %self.client_id, seq);
        crate::telemetry::continue_trace(&span, &env.traceparent);
        span.in_scope(|| tracing::debug!(latency_ms = latency.as_secs_f64() * 1e3, "answered"));
        match env.payload {
            Payload::Result(mut r) => {
                // An analysed frame is presence.
                self.silent_since = Instant::now();
                // The stream's liveness evidence joins the frame's own, and the face
                // appearance stops here: it never reaches the client or the audit trail.
                let mut suspicion = None;
                if let wire::Analysis::Identity(a) = &mut r.analysis {
                    self.phone_cadence.observe(
                        seq,
                        a.skipped.is_empty(),
                        a.phone.is_some(),
                        a.verdict == Verdict::Ok,
                    );
                    suspicion = self
                        .liveness
                        .fuse(&self.shared.liveness, inflight.received_ms, a)
                        .map(|s| s.as_str());
                    // A spoof verdict from a worker is a single frame's passive signal too.
                    if a.verdict == Verdict::Spoof {
                        suspicion = suspicion.or(Some("frame"));
                    }
                    self.identity_cadence.observe(seq, a, suspicion.is_some());
                }
                let m = &self.shared.metrics;
                m.results_delivered.inc();
                m.frame_latency_seconds.observe(latency.as_secs_f64());
                self.shared.observe_latency(latency);
                let verdict = r.analysis.verdict();
                // Only analyses with a verdict feed the policy (and may become evidence).
                let analysis = verdict.map(|_| {
                    let mut a = r.analysis.clone();
                    // Where the face was is for the next frames, not for the audit trail.
                    if let wire::Analysis::Identity(a) = &mut a {
                        a.track = None;
                    }
                    a
                });
                // The client learns its verdict, not the scores behind it (unless configured),
                // and never which models ran: that would tell it which frames are judged.
                if let wire::Analysis::Identity(a) = &mut r.analysis {
                    if self.shared.cfg.client_scores {
                        a.skipped.clear();
                        a.carried.clear();
                        a.track = None;
                    } else {
                        a.strip_scores();
                    }
                }
                self.outbox.push(ServerMsg::Result {
                    seq,
                    latency_ms: latency.as_secs_f64() * 1000.0,
                    frame_id: r.frame_id.to_string(),
                    trace_id,
                    analyzer: r.analyzer,
                    analysis: r.analysis,
                });
                if let (Some(verdict), Some(analysis)) = (verdict, analysis) {
                    m.verdicts.with_label_values(&[verdict.as_str()]).inc();
                    let frame = EvidenceFrame {
                        seq,
                        frame_id: r.frame_id,
                        received_at_ms: inflight.received_ms,
                        jpeg: inflight.jpeg,
                        analysis,
                    };
                    if self.enforcement.challenging() {
                        let effects =
                            self.enforcement
                                .answer(&self.shared.challenge, &frame, wire::now_ms());
                        self.apply(effects);
                    }
                    // Passive liveness never acts: a spoof verdict is not the policy's. Nor is a
                    // face turned to answer a waiting challenge (a turned face scores lower).
                    let answering = self.enforcement.challenging()
                        && turned(&frame, self.shared.challenge.turn_yaw);
                    if verdict != Verdict::Spoof && !answering {
                        self.judge(verdict, Some(frame));
                    }
                    if let Some(signal) = suspicion
                        && self.challenge(Trigger::Suspicion, Some(signal))
                    {
                        self.shared
                            .metrics
                            .suspicions
                            .with_label_values(&[signal])
                            .inc();
                    }
                }
            }
            Payload::Dropped(d) => self.drop_published(seq, d.reason, d.detail),
            Payload::Frame(_)
            | Payload::Action(_)
            | Payload::Control(_)
            | Payload::AdminOp(_)
            | Payload::EnrollRequest(_)
            | Payload::EnrollResult(_)
            | Payload::Session(_) => {}
        }
        self.promote().await;
    }

    /// An administrator's command for this session.
    fn on_control(&mut self, command: ControlCommand, issued_by: String) {
        match command {
            ControlCommand::Pause | ControlCommand::Resume => {
                let was_paused = self.paused;
                self.paused = command == ControlCommand::Pause;
                let now_ms = wire::now_ms();
                match (was_paused, self.paused) {
                    (false, true) => self.paused_at_ms = Some(now_ms),
                    (true, false) => {
                        // The waiting challenge's clock did not run while paused.
                        let since = self.paused_at_ms.take().unwrap_or(now_ms);
                        self.enforcement.postpone(now_ms.saturating_sub(since));
                        if std::mem::take(&mut self.start_due) {
                            self.challenge(Trigger::Start, None);
                        }
                    }
                    _ => {}
                }
                // A paused client is not expected to send; its silence counts from the resume.
                self.silent_since = Instant::now();
                self.info.lock().unwrap_or_else(|e| e.into_inner()).paused = self.paused;
                self.outbox.push(ServerMsg::Status {
                    state: if self.paused { "paused" } else { "active" }.into(),
                });
            }
            ControlCommand::ForceAction { action } => {
                let event = self.enforcement.force(action, issued_by, wire::now_ms());
                self.enforce(event);
            }
            ControlCommand::Challenge => {
                self.challenge(Trigger::Operator, None);
            }
            // Handled by the edge itself (closing the session).
            ControlCommand::Block
            | ControlCommand::Unblock
            | ControlCommand::Kick
            | ControlCommand::SessionStarted { .. } => {}
        }
    }

    /// Run the policy on one verdict; when it fires, tell the client at once and send the
    /// action with its evidence to the audit trail.
    /// `frame` is the analysed frame behind the verdict (`None` for `no_frames`).
    /// The client's own word that it cannot capture (camera lost, encoder failed, tab hidden):
    /// the candidate is away now, not after `no_frames_ms` of silence, so it is judged
    /// `no_frames` at once. Only a change from capturing to not capturing is judged, and at
    /// most once per `no_frames_ms`: a client cannot flood the policy's window with reports
    /// (to crowd out other verdicts) any faster than silence would. Its word that it captures
    /// again changes nothing: only analysed frames are presence.
    fn capture_report(&mut self, state: CaptureState) {
        if self.capture == state {
            return;
        }
        let was_capturing = self.capture == CaptureState::Ok;
        self.capture = state;
        self.shared
            .metrics
            .capture_reports
            .with_label_values(&[state.as_str()])
            .inc();
        if state == CaptureState::Ok || !was_capturing || self.paused {
            tracing::debug!(client = %self.client_id, state = state.as_str(), "the client reports its capture");
            return;
        }
        let period = Duration::from_millis(self.shared.policy.no_frames_ms.max(1_000));
        let now = Instant::now();
        if self
            .capture_judged
            .is_some_and(|at| now.duration_since(at) < period)
        {
            return;
        }
        self.capture_judged = Some(now);
        tracing::info!(client = %self.client_id, state = state.as_str(), "the client reports it cannot capture");
        self.absent(now);
    }

    /// The candidate is away (silence, or the client's own report): a `no_frames` verdict,
    /// counted like any verdict, and the silence clock starts over.
    fn absent(&mut self, now: Instant) {
        self.silent_since = now;
        self.shared
            .metrics
            .verdicts
            .with_label_values(&[Verdict::NoFrames.as_str()])
            .inc();
        self.judge(Verdict::NoFrames, None);
    }

    fn judge(&mut self, verdict: Verdict, frame: Option<EvidenceFrame>) {
        self.info
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last_verdict = Some(verdict.as_str().into());
        let policy = &self.shared.policy;
        if let Some(event) = self
            .enforcement
            .judge(policy, verdict, frame, wire::now_ms())
        {
            self.enforce(event);
        }
    }

    /// Issue a challenge (unless one is waiting, or a suspicion comes within the grace of a
    /// pass).
    fn challenge(&mut self, trigger: Trigger, detail: Option<&str>) -> bool {
        if self.paused {
            return false;
        }
        let effects = self.enforcement.issue(
            &self.shared.challenge,
            trigger,
            detail,
            wire::now_ms(),
            draw,
        );
        let issued = !effects.is_empty();
        self.apply(effects);
        issued
    }

    /// Carry out what enforcement decided.
    fn apply(&mut self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Tell(msg) => self.outbox.push(msg),
                Effect::Act(event) => self.enforce(event),
                Effect::Audit(event) => {
                    if let Some(note) = &event.challenge {
                        let trigger = note.trigger.split(':').next().unwrap_or("");
                        self.shared
                            .metrics
                            .challenges
                            .with_label_values(&[note.outcome.as_str(), trigger])
                            .inc();
                    }
                    self.audit(event);
                }
            }
        }
    }

    /// Send an action to the client and, in the background, to the audit exchange. A
    /// sign-out ends the session and, when configured, keeps the client out until an
    /// operator re-admits it.
    fn enforce(&mut self, event: ActionEvent) {
        let shared = self.shared.clone();
        shared
            .metrics
            .actions
            .with_label_values(&[event.action.as_str()])
            .inc();
        tracing::info!(
            client = %self.client_id,
            action = event.action.as_str(),
            reason = %event.reason,
            action_id = %event.action_id,
            "action"
        );
        self.info
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last_action = Some(event.action.as_str().into());
        self.outbox.push(ServerMsg::Action {
            action: event.action,
            reason: event.reason.clone(),
            action_id: event.action_id.to_string(),
            evidence_id: event.evidence_id.to_string(),
        });
        if let Some(note) = &event.challenge {
            let trigger = note.trigger.split(':').next().unwrap_or("");
            shared
                .metrics
                .challenges
                .with_label_values(&[note.outcome.as_str(), trigger])
                .inc();
        }
        if event.action == Action::SignOut && shared.policy.sign_out_ends_session {
            self.sign_out();
        }
        self.audit(event);
    }

    /// Keep the client out until re-admitted (saved first, so that a reconnect racing this
    /// close is refused), and end the session once the action is written.
    fn sign_out(&mut self) {
        self.ending = Some((
            ErrorCode::SignedOut,
            "signed out; an operator must re-admit this client".into(),
        ));
    }

    /// Keep a signed-out client out: its status is written (and the policy state saved, by
    /// the loop) before the session tells the client and closes, so that a reconnect racing
    /// the close is refused by either.
    async fn keep_out(&mut self) {
        let store = self.shared.store.clone();
        let id = self.client_id.clone();
        let written = tokio::task::spawn_blocking(move || {
            store.update(&id, &mut |r| {
                if r.status != ClientStatus::Blocked {
                    r.status = ClientStatus::SignedOut;
                }
                // The session tokens handed out so far end with the sign-out.
                r.sessions_not_before_ms = wire::now_ms();
            })
        })
        .await;
        match written {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, client = %self.client_id, "signed-out status not saved; the saved policy state still refuses the client")
            }
            Err(e) => tracing::error!(error = %e, "signed-out status write failed"),
        }
    }

    /// Send an event to the audit exchange, in the background.
    fn audit(&mut self, event: ActionEvent) {
        let shared = self.shared.clone();
        let env = Envelope {
            schema: wire::SCHEMA,
            id: event.action_id,
            source: shared.edge_id.clone(),
            seq: shared.seq.fetch_add(1, Ordering::Relaxed),
            client_id: self.client_id.clone(),
            produced_at_ms: wire::now_ms(),
            deadline_ms: 0,
            traceparent: wire::new_traceparent(),
            payload: Payload::Action(event),
        };
        super::submit_audit(&shared, env);
    }

    /// Publish the waiting frame when a slot is free.
    async fn promote(&mut self) {
        if let Some(p) = self.window.next_to_publish() {
            self.publish(p).await;
        }
    }

    /// Save the policy state in the directory, where the client's next session finds it.
    async fn save_policy(&mut self) {
        let Some(saved) = self.enforcement.take_unsaved(wire::now_ms()) else {
            return;
        };
        let store = self.shared.store.clone();
        let id = self.client_id.clone();
        match tokio::task::spawn_blocking(move || store.put_policy(&id, &saved)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, client = %self.client_id, "policy state not saved")
            }
            Err(e) => tracing::warn!(error = %e, "policy state save failed"),
        }
    }

    /// Every few seconds, write the session's live figures into its presence, when they
    /// changed, so that a console on any edge shows them.
    async fn refresh_presence(&mut self) {
        if self.presence_at.elapsed() < PRESENCE_REFRESH {
            return;
        }
        self.presence_at = Instant::now();
        let info = self.info.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let said = (
            info.frames,
            info.last_verdict.clone(),
            info.last_action.clone(),
        );
        if said == self.presence_said {
            return;
        }
        self.presence_said = said;
        let presence = Presence {
            connection: Connection::Active,
            edge: self.shared.edge_id.clone(),
            session: format!("{:016x}", self.id),
            since_ms: info.connected_since_ms,
            updated_ms: wire::now_ms(),
            fps: (info.fps * 10.0).round() / 10.0,
            last_verdict: info.last_verdict,
            last_action: info.last_action,
        };
        write_presence(&self.shared, &self.client_id, presence, true).await;
    }

    /// Answer `expired` for frames whose result is overdue, judge a silent stream, fail a
    /// challenge past its deadline, and issue a random one when due.
    async fn sweep(&mut self) {
        self.refresh_presence().await;
        let now_ms = wire::now_ms();
        if !self.paused {
            let effects =
                self.enforcement
                    .tick(&self.shared.policy, &self.shared.challenge, now_ms, draw);
            self.apply(effects);
        }
        if self.next_random_ms.is_some_and(|at| now_ms >= at) && !self.paused {
            self.next_random_ms = random_after(&self.shared.challenge, now_ms);
            self.challenge(Trigger::Random, None);
        }
        let now = Instant::now();
        let silence = Duration::from_millis(self.shared.policy.no_frames_ms);
        if !silence.is_zero() && !self.paused && now.duration_since(self.silent_since) >= silence {
            // Again after each further silent period.
            self.absent(now);
        }
        let overdue = self.window.overdue(now, SWEEP_GRACE);
        for seq in &overdue.published {
            self.drop_published(
                *seq,
                DropReason::Expired,
                "no result within the frame deadline",
            );
        }
        if let Some(seq) = overdue.waiting {
            self.drop_frame(seq, DropReason::Expired, "deadline passed while waiting");
        }
        if !overdue.published.is_empty() {
            self.promote().await;
        }
    }
}

/// How often a live session's figures reach the directory (when they changed).
const PRESENCE_REFRESH: Duration = Duration::from_secs(2);

enum Admit {
    Yes,
    Limited,
    Flood,
}

/// A token bucket of `max_fps` tokens refilled at `max_fps` per second, plus a flood detector
/// that counts every frame in the current one-second window.
struct RateLimit {
    per_sec: f64,
    tokens: f64,
    last: Instant,
    window_start: Instant,
    window_count: u32,
    flood_limit: u32,
    flooded: bool,
}

impl RateLimit {
    fn new(max_fps: u32, flood_factor: u32) -> Self {
        let now = Instant::now();
        Self {
            per_sec: max_fps as f64,
            tokens: max_fps as f64,
            last: now,
            window_start: now,
            window_count: 0,
            flood_limit: max_fps.saturating_mul(flood_factor),
            flooded: false,
        }
    }

    /// Change the rate (a throttle, or its end); the flood limit stays as configured.
    fn set_rate(&mut self, max_fps: u32) {
        self.per_sec = f64::from(max_fps.max(1));
        self.tokens = self.tokens.min(self.per_sec);
    }

    fn admit(&mut self, now: Instant) -> Admit {
        if now.duration_since(self.window_start) >= Duration::from_secs(1) {
            self.window_start = now;
            self.window_count = 0;
        }
        self.window_count += 1;
        if self.window_count > self.flood_limit {
            self.flooded = true;
            return Admit::Flood;
        }
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.per_sec);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Admit::Yes
        } else {
            Admit::Limited
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_logged_client_id_is_escaped_and_cut() {
        // A forged line, a terminal escape, and a megabyte of id.
        let forged = "c1\nERROR admin login ok\r\u{1b}[2J";
        let shown = LogId(forged).to_string();
        assert!(!shown.contains(['\n', '\r', '\u{1b}']), "{shown}");
        assert_eq!(shown, "c1\\nERROR admin login ok\\r\\u{1b}[2J");
        let huge = "x".repeat(1 << 20);
        let shown = LogId(&huge).to_string();
        assert_eq!(shown, format!("{}…({} bytes)", "x".repeat(64), 1 << 20));
        assert_eq!(LogId("alice").to_string(), "alice");
    }

    #[test]
    fn every_way_a_session_ends_is_one_the_audit_writer_takes() {
        for end in [
            End::ClientClosed,
            End::ClientGone,
            End::SlowReader,
            End::Idle,
            End::Replaced,
            End::Shutdown,
            End::TooManyBadMessages,
            End::Flood,
            End::SignedOut,
        ] {
            assert!(
                crate::audit::SESSION_END_REASONS.contains(&end.reason()),
                "{end:?}"
            );
        }
        for outside in ["blocked", "kicked", "signed_out"] {
            assert!(crate::audit::SESSION_END_REASONS.contains(&outside));
        }
    }

    #[test]
    fn rate_limit_admits_max_fps_then_limits() {
        let mut r = RateLimit::new(10, 4);
        let t0 = Instant::now();
        let admitted = (0..15)
            .filter(|_| matches!(r.admit(t0), Admit::Yes))
            .count();
        assert_eq!(admitted, 10);
        // Half a second later, five more tokens.
        let t1 = t0 + Duration::from_millis(500);
        let admitted = (0..10)
            .filter(|_| matches!(r.admit(t1), Admit::Yes))
            .count();
        assert_eq!(admitted, 5);
        // Past 4x the limit in one window is a flood.
        let flood = (0..40).any(|_| matches!(r.admit(t1), Admit::Flood));
        assert!(flood && r.flooded);
    }
}
